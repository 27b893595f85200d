//! Applying image layers (tar streams) to a root directory, safely.
//!
//! A layer is hostile input: its entry names, link targets and the symlinks earlier
//! entries planted are all chosen by whoever built the image. Every path is resolved
//! inside the root the way the container will later see it (an absolute symlink means
//! the root's `/`, `..` stops at the root), so nothing is ever created, changed or
//! removed outside the root. Whiteouts (`.wh.NAME`, `.wh..wh..opq`) follow the OCI
//! image spec.

use std::cell::Cell;
use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{fchownat, Gid, Uid};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
/// Most symlinks followed while resolving one path (Linux's own limit).
const MAX_SYMLINKS: usize = 40;
/// Most bytes read to find one entry: its header blocks and the long names and PAX
/// records before it, which the tar reader holds in memory whole (a gzip layer of a
/// few KiB could otherwise claim a long name of gigabytes).
const MAX_ENTRY_HEADERS: u64 = 4 << 20;
/// Most entries one layer may have: bounds the bookkeeping of paths written, and an
/// inode bomb. Real layers have tens of thousands.
pub const MAX_LAYER_ENTRIES: usize = 1 << 20;
/// Most entries an image may have over all its layers: many layers just under the
/// per-layer cap must not add up to an inode bomb.
pub const MAX_IMAGE_ENTRIES: usize = 4 << 20;
/// Linux's PATH_MAX, which counts the terminating NUL: an entry name or link target
/// must be shorter. The tar format itself has no limit (GNU long names, PAX).
pub const PATH_MAX: usize = 4096;
/// Linux's NAME_MAX: the longest component of an entry name.
pub const NAME_MAX: usize = 255;
/// How much of a hostile name an error message shows.
const NAME_IN_MESSAGES: usize = 200;

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("cannot read the layer")]
    Read(#[source] std::io::Error),
    #[error("the layer has more than {0} entries")]
    LayerEntries(usize),
    #[error("the image has more than {0} entries in all its layers")]
    ImageEntries(usize),
    #[error("layer entry {name:?}: {what}")]
    Hostile { name: String, what: &'static str },
    #[error("layer entry {name:?}")]
    Entry {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// How many more entries an image may have, counted over all its layers.
#[derive(Clone, Copy, Debug)]
pub struct EntryBudget {
    cap: usize,
    left: usize,
}

impl EntryBudget {
    pub fn new(cap: usize) -> EntryBudget {
        EntryBudget { cap, left: cap }
    }

    fn take(&mut self) -> Result<(), UnpackError> {
        self.left = self.left.checked_sub(1).ok_or(UnpackError::ImageEntries(self.cap))?;
        Ok(())
    }
}

/// Applies one layer read from `layer` (an uncompressed tar) onto `root`, taking
/// each entry from `budget`.
pub fn apply_layer(root: &Path, layer: impl Read, budget: &mut EntryBudget) -> Result<(), UnpackError> {
    let header_budget = Rc::new(Cell::new(u64::MAX));
    let mut archive = tar::Archive::new(HeaderBudget { inner: layer, left: header_budget.clone() });
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    // Paths written by this layer: an opaque whiteout hides everything else.
    let mut written: HashSet<PathBuf> = HashSet::new();
    // Opaque directories, by name: cleared at the end, after later entries of this
    // layer may have replaced them (or a parent) with a symlink.
    let mut opaque: Vec<PathBuf> = Vec::new();
    let mut entries = archive.entries().map_err(UnpackError::Read)?;
    let mut count = 0usize;
    loop {
        // Finding the next entry reads its headers, long names and PAX records into
        // memory; only that step is bounded.
        header_budget.set(MAX_ENTRY_HEADERS);
        let next = entries.next();
        header_budget.set(u64::MAX);
        let Some(entry) = next else { break };
        let mut entry = entry.map_err(UnpackError::Read)?;
        count += 1;
        if count > MAX_LAYER_ENTRIES {
            return Err(UnpackError::LayerEntries(MAX_LAYER_ENTRIES));
        }
        budget.take()?;
        apply_entry(root, &mut entry, &mut written, &mut opaque)?;
        // Whatever data the entry has left is skipped here, not inside next().
        std::io::copy(&mut entry, &mut std::io::sink()).map_err(UnpackError::Read)?;
    }
    for rel in opaque {
        let opaque_err = |source| UnpackError::Entry { name: format!("{}/{OPAQUE_WHITEOUT}", rel.display()), source };
        // Resolve again now: the path seen when the marker was read may since lead
        // through a symlink, which the host would follow out of the root.
        let dir = resolve(root, &rel, false).map_err(opaque_err)?;
        match dir.symlink_metadata() {
            Ok(m) if m.is_dir() => clear_opaque(&dir, &written).map_err(opaque_err)?,
            // Gone, or no longer a directory: nothing below it to hide.
            _ => {}
        }
    }
    Ok(())
}

/// Applies one entry of a layer.
fn apply_entry<R: Read>(
    root: &Path,
    entry: &mut tar::Entry<'_, R>,
    written: &mut HashSet<PathBuf>,
    opaque: &mut Vec<PathBuf>,
) -> Result<(), UnpackError> {
    let raw = entry.path_bytes().into_owned();
    let name = name_for_messages(&raw);
    let entry_err = |source| UnpackError::Entry { name: name.clone(), source };
    check_name_length(&raw, true).map_err(|what| UnpackError::Hostile { name: name.clone(), what })?;
    let kind = entry.header().entry_type();
    if kind.is_symlink() || kind.is_hard_link() {
        let target = entry.link_name_bytes().unwrap_or_default();
        // A symlink's target is resolved only in the guest, where the kernel applies
        // NAME_MAX to it; a hard link's target is a path in the layer like any name.
        check_name_length(&target, kind.is_hard_link()).map_err(|what| UnpackError::Hostile { name: name.clone(), what })?;
    }
    let rel = clean_path(&raw).ok_or_else(|| UnpackError::Hostile { name: name.clone(), what: "path leaves the root" })?;
    let Some(file_name) = rel.file_name().map(OsStr::to_os_string) else {
        return Ok(()); // the root itself ("./")
    };
    let parent_rel = rel.parent().unwrap_or(Path::new(""));
    let parent = resolve(root, parent_rel, true).map_err(entry_err)?;
    let file_str = file_name.to_string_lossy();
    if file_str == OPAQUE_WHITEOUT {
        opaque.push(parent_rel.to_path_buf());
        return Ok(());
    }
    if let Some(hidden) = file_str.strip_prefix(WHITEOUT_PREFIX) {
        if hidden.is_empty() || hidden == "." || hidden == ".." {
            return Err(UnpackError::Hostile { name, what: "whiteout names nothing" });
        }
        return remove_any(&parent.join(hidden)).map_err(entry_err);
    }
    std::fs::create_dir_all(&parent).map_err(entry_err)?;
    let dst = parent.join(&file_name);
    // A layer replaces whatever was there, except that a directory stays a
    // directory (its lower contents survive unless whited out).
    if let Ok(meta) = dst.symlink_metadata() {
        if !(kind.is_dir() && meta.is_dir()) {
            remove_any(&dst).map_err(entry_err)?;
        }
    }
    written.insert(dst.clone());
    if kind.is_hard_link() {
        let target = entry
            .link_name_bytes()
            .and_then(|t| clean_path(&t))
            .ok_or_else(|| UnpackError::Hostile { name: name.clone(), what: "hard link target leaves the root" })?;
        let target_parent = resolve(root, target.parent().unwrap_or(Path::new("")), true).map_err(entry_err)?;
        let source = match target.file_name() {
            Some(f) => target_parent.join(f),
            None => return Err(UnpackError::Hostile { name, what: "hard link to the root" }),
        };
        std::fs::hard_link(&source, &dst).map_err(entry_err)?;
    } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
        make_node(entry, &dst).map_err(entry_err)?;
    } else if kind.is_dir() || kind.is_file() || kind.is_symlink() || kind.is_contiguous() {
        entry.unpack(&dst).map_err(entry_err)?;
    } else if kind.is_gnu_longname() || kind.is_gnu_longlink() || kind.is_pax_local_extensions() {
        // consumed by the tar reader
    } else {
        log::debug!("layer entry {name:?}: skipping entry type {kind:?}");
    }
    Ok(())
}

/// Refuses a name (or link target) the kernel could not take as one path: PATH_MAX
/// bytes or more, or (with `components`) a component longer than NAME_MAX.
fn check_name_length(raw: &[u8], components: bool) -> Result<(), &'static str> {
    if raw.len() >= PATH_MAX {
        return Err("name or link target is longer than PATH_MAX (4095 bytes)");
    }
    if components && raw.split(|b| *b == b'/').any(|c| c.len() > NAME_MAX) {
        return Err("a component of the name is longer than NAME_MAX (255 bytes)");
    }
    Ok(())
}

/// An entry name for an error message: lossy UTF-8, and only its start if it is long.
fn name_for_messages(raw: &[u8]) -> String {
    if raw.len() <= NAME_IN_MESSAGES {
        return String::from_utf8_lossy(raw).into_owned();
    }
    format!("{}... ({} bytes)", String::from_utf8_lossy(&raw[..NAME_IN_MESSAGES]), raw.len())
}

/// Reads through `R` while `left` allows; `left` is lowered by what passes.
struct HeaderBudget<R> {
    inner: R,
    left: Rc<Cell<u64>>,
}

impl<R: Read> Read for HeaderBudget<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.left.get();
        if left == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("an entry's headers, long names and PAX records exceed {MAX_ENTRY_HEADERS} bytes"),
            ));
        }
        let max = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        let n = self.inner.read(&mut buf[..max])?;
        self.left.set(left - n as u64);
        Ok(n)
    }
}

/// An entry name as a relative path of normal components, or None if it climbs out
/// (`..`). Leading `/` and `.` components are dropped, as tar(1) does.
fn clean_path(raw: &[u8]) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in Path::new(OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Resolves `rel` inside `root` as the container would: symlinks are followed with
/// `root` as `/`, `..` never climbs above `root`. With `follow_last` false a final
/// symlink is returned as is. Missing components are appended unresolved.
pub fn resolve(root: &Path, rel: &Path, follow_last: bool) -> std::io::Result<PathBuf> {
    let mut pending: VecDeque<OsString> = components(rel);
    let mut current = root.to_path_buf();
    let mut depth = 0usize; // components of `current` below `root`
    let mut links = 0usize;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            if depth > 0 {
                current.pop();
                depth -= 1;
            }
            continue;
        }
        let candidate = current.join(&part);
        let is_last = pending.is_empty();
        match candidate.symlink_metadata() {
            Ok(meta) if meta.file_type().is_symlink() && (follow_last || !is_last) => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(std::io::Error::from_raw_os_error(nix::libc::ELOOP));
                }
                let target = std::fs::read_link(&candidate)?;
                let mut next = components(&target);
                next.extend(pending);
                pending = next;
                if target.is_absolute() {
                    current = root.to_path_buf();
                    depth = 0;
                }
            }
            _ => {
                current = candidate;
                depth += 1;
            }
        }
    }
    Ok(current)
}

/// The normal and `..` components of a path (`/` and `.` dropped).
fn components(p: &Path) -> VecDeque<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// Removes a file, symlink or whole directory tree without following symlinks; a
/// missing path is fine.
fn remove_any(p: &Path) -> std::io::Result<()> {
    match p.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes everything below `dir` that this layer did not write.
fn clear_opaque(dir: &Path, written: &HashSet<PathBuf>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if written.contains(&path) {
            if path.symlink_metadata()?.is_dir() {
                clear_opaque(&path, written)?;
            }
        } else {
            remove_any(&path)?;
        }
    }
    Ok(())
}

/// Creates a device node or FIFO (which the tar crate would write as a regular file).
fn make_node<R: Read>(entry: &tar::Entry<'_, R>, dst: &Path) -> std::io::Result<()> {
    let h = entry.header();
    let kind = h.entry_type();
    let sflag = if kind.is_character_special() {
        SFlag::S_IFCHR
    } else if kind.is_block_special() {
        SFlag::S_IFBLK
    } else {
        SFlag::S_IFIFO
    };
    let mode = h.mode()? & 0o7777;
    let dev = if sflag == SFlag::S_IFIFO {
        0
    } else {
        makedev(u64::from(h.device_major()?.unwrap_or(0)), u64::from(h.device_minor()?.unwrap_or(0)))
    };
    mknod(dst, sflag, Mode::from_bits_truncate(mode), dev)?;
    let uid = u32::try_from(h.uid()?).map_err(|_| std::io::Error::other("uid out of range"))?;
    let gid = u32::try_from(h.gid()?).map_err(|_| std::io::Error::other("gid out of range"))?;
    fchownat(None, dst, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)?;
    // mknod applied the umask; set the exact mode (chmod is fine: it is not a symlink).
    std::fs::set_permissions(dst, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a tar in memory from (path, kind) pairs, writing raw names so tests can
    /// plant the hostile ones the tar crate's builder would refuse.
    pub(crate) enum E<'a> {
        Dir(&'a str),
        File(&'a str, &'a [u8]),
        Symlink(&'a str, &'a str),
        Hardlink(&'a str, &'a str),
        Fifo(&'a str),
    }

    pub(crate) fn tar_of(entries: &[E<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            let (name, data): (&str, &[u8]) = match e {
                E::Dir(n) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    (n, b"")
                }
                E::File(n, d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    (n, d)
                }
                E::Symlink(n, t) | E::Hardlink(n, t) => {
                    h.set_entry_type(if matches!(e, E::Symlink(..)) {
                        tar::EntryType::Symlink
                    } else {
                        tar::EntryType::Link
                    });
                    h.set_mode(0o777);
                    set_raw(&mut h.as_old_mut().linkname, t);
                    (n, b"")
                }
                E::Fifo(n) => {
                    h.set_entry_type(tar::EntryType::Fifo);
                    h.set_mode(0o600);
                    (n, b"")
                }
            };
            set_raw(&mut h.as_old_mut().name, name);
            h.set_size(data.len() as u64);
            h.set_uid(0);
            h.set_gid(0);
            h.set_cksum();
            b.append(&h, data).expect("append");
        }
        b.into_inner().expect("finish tar")
    }

    fn set_raw(field: &mut [u8], s: &str) {
        field.fill(0);
        field[..s.len()].copy_from_slice(s.as_bytes());
    }

    struct Fixture {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&root).expect("root");
        std::fs::create_dir(&outside).expect("outside");
        std::fs::write(outside.join("victim"), b"precious").expect("victim");
        Fixture { _tmp: tmp, root, outside }
    }

    impl Fixture {
        fn apply(&self, entries: &[E<'_>]) -> Result<(), UnpackError> {
            apply_layer(&self.root, &tar_of(entries)[..], &mut EntryBudget::new(MAX_IMAGE_ENTRIES))
        }
        fn outside_untouched(&self) {
            let names: Vec<_> = std::fs::read_dir(&self.outside).expect("read outside").map(|e| e.expect("e").file_name()).collect();
            assert_eq!(names, vec![OsString::from("victim")], "something was written outside the root");
            assert_eq!(std::fs::read(self.outside.join("victim")).expect("victim"), b"precious");
        }
    }

    #[test]
    fn plain_layer_unpacks() {
        let f = fixture();
        f.apply(&[E::Dir("etc/"), E::File("etc/hostname", b"box\n"), E::Symlink("bin", "usr/bin"), E::Hardlink("etc/h2", "etc/hostname"), E::Fifo("run.fifo")])
            .expect("apply");
        assert_eq!(std::fs::read(f.root.join("etc/h2")).expect("hardlink"), b"box\n");
        assert_eq!(std::fs::read_link(f.root.join("bin")).expect("symlink"), Path::new("usr/bin"));
        assert!(std::os::unix::fs::FileTypeExt::is_fifo(&f.root.join("run.fifo").symlink_metadata().expect("fifo").file_type()));
    }

    #[test]
    fn dotdot_and_absolute_names_stay_inside() {
        let f = fixture();
        let e = f.apply(&[E::File("../outside/victim", b"pwned")]).expect_err("..");
        assert!(e.to_string().contains("leaves the root"), "{e}");
        f.apply(&[E::File("/abs", b"ok")]).expect("absolute names are made relative");
        assert!(f.root.join("abs").exists());
        f.outside_untouched();
    }

    #[test]
    fn file_through_a_planted_symlink_stays_inside() {
        let f = fixture();
        let out = f.outside.to_str().expect("utf-8").to_string();
        // Absolute and relative symlinks to the outside, then files written through them.
        f.apply(&[
            E::Symlink("evil", &out),
            E::File("evil/victim", b"pwned"),
            E::Symlink("rel", "../../../../../../../../outside"),
            E::File("rel/new", b"pwned"),
        ])
        .expect("apply resolves inside the root");
        f.outside_untouched();
        // Through the symlink, the file landed inside the root.
        assert_eq!(std::fs::read(f.root.join(out.trim_start_matches('/')).join("victim")).expect("inside"), b"pwned");
    }

    #[test]
    fn symlink_then_replaced_file_does_not_follow() {
        let f = fixture();
        let victim = f.outside.join("victim");
        f.apply(&[E::Symlink("x", victim.to_str().expect("utf-8")), E::File("x", b"pwned")]).expect("apply");
        f.outside_untouched();
        assert_eq!(std::fs::read(f.root.join("x")).expect("x"), b"pwned");
    }

    #[test]
    fn hardlinks_cannot_reach_out() {
        let f = fixture();
        let victim = f.outside.join("victim");
        let e = f.apply(&[E::Hardlink("h", "../outside/victim")]).expect_err("hardlink ..");
        assert!(e.to_string().contains("leaves the root"), "{e}");
        // An absolute target means the root's path, which does not exist.
        assert!(f.apply(&[E::Hardlink("h", victim.to_str().expect("utf-8"))]).is_err());
        // Through a symlink planted first: resolved inside the root, so it fails.
        assert!(f.apply(&[E::Symlink("l", f.outside.to_str().expect("utf-8")), E::Hardlink("h2", "l/victim")]).is_err());
        f.outside_untouched();
    }

    #[test]
    fn whiteouts_remove_lower_files_only_inside() {
        let f = fixture();
        f.apply(&[E::Dir("a/"), E::File("a/x", b"1"), E::File("a/y", b"2"), E::Dir("d/"), E::File("d/old", b"o"), E::Dir("d/sub/"), E::File("d/sub/z", b"z")])
            .expect("lower");
        f.apply(&[E::File("a/.wh.x", b""), E::Dir("d/"), E::File("d/new", b"n"), E::File("d/.wh..wh..opq", b"")]).expect("upper");
        assert!(!f.root.join("a/x").exists() && f.root.join("a/y").exists());
        assert!(f.root.join("d/new").exists(), "files of the same layer survive an opaque whiteout");
        assert!(!f.root.join("d/old").exists() && !f.root.join("d/sub").exists());
        // A whiteout through a symlink to the outside deletes nothing there.
        f.apply(&[E::Symlink("o", f.outside.to_str().expect("utf-8")), E::File("o/.wh.victim", b"")]).expect("whiteout");
        assert!(f.apply(&[E::File("a/.wh...", b"")]).is_err());
        f.outside_untouched();
    }

    #[test]
    fn opaque_dir_replaced_by_a_symlink_later_in_the_layer_stays_inside() {
        let f = fixture();
        let out = f.outside.to_str().expect("utf-8").to_string();
        // The opaque marker names d/ while it is a plain (missing) directory; a later
        // entry of the same layer turns d into a symlink to the outside.
        f.apply(&[E::File("d/.wh..wh..opq", b""), E::Symlink("d", &out)]).expect("apply");
        assert!(f.outside.join("victim").exists(), "opaque whiteout emptied the outside");
        // Same through a parent component: a/b is opaque, then a becomes a symlink.
        std::fs::create_dir(f.outside.join("b")).expect("outside/b");
        std::fs::write(f.outside.join("b/victim2"), b"precious").expect("victim2");
        f.apply(&[E::Dir("a/"), E::Dir("a/b/"), E::File("a/b/.wh..wh..opq", b""), E::Symlink("a", &out)]).expect("apply");
        assert_eq!(std::fs::read(f.outside.join("b/victim2")).expect("outside/b/victim2 survives"), b"precious");
        std::fs::remove_dir_all(f.outside.join("b")).expect("cleanup");
        f.outside_untouched();
    }

    #[test]
    fn a_huge_long_name_is_refused_before_it_is_read() {
        let f = fixture();
        // A GNU long-name record claiming 256 MiB: zeros compress to almost nothing,
        // and the tar reader would hold them all in memory.
        let mut h = tar::Header::new_gnu();
        set_raw(&mut h.as_old_mut().name, "././@LongLink");
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(256 << 20);
        h.set_cksum();
        let rest = tar_of(&[E::File("x", b"x")]);
        let layer = std::io::Read::chain(&h.as_bytes()[..], std::io::repeat(b'a').take(256 << 20)).chain(&rest[..]);
        let e = apply_layer(&f.root, layer, &mut EntryBudget::new(MAX_IMAGE_ENTRIES)).expect_err("oversized long name");
        assert!(matches!(e, UnpackError::Read(_)), "wrong error: {:.200}", e.to_string());
        // Big file data is not a header: it still goes through.
        let big = vec![7u8; (MAX_ENTRY_HEADERS as usize) * 2];
        f.apply(&[E::File("big", &big)]).expect("a big file");
        assert_eq!(std::fs::metadata(f.root.join("big")).expect("big").len(), big.len() as u64);
        // Data of an entry type that is skipped is skipped outside the budget too.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::new(b'Z'));
        h.set_size(big.len() as u64);
        h.set_cksum();
        b.append_data(&mut h, "odd", &big[..]).expect("append");
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, "after", &b"ok"[..]).expect("append");
        apply_layer(&f.root, &b.into_inner().expect("tar")[..], &mut EntryBudget::new(MAX_IMAGE_ENTRIES)).expect("skipped big entry");
        assert_eq!(std::fs::read(f.root.join("after")).expect("after"), b"ok");
    }

    #[test]
    fn names_beyond_path_max_or_name_max_are_refused() {
        let f = fixture();
        let layer = |path: &str, link: Option<(tar::EntryType, &str)>| {
            let mut b = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match link {
                // The builder writes GNU long-name and long-link records as needed.
                Some((kind, target)) => {
                    h.set_entry_type(kind);
                    b.append_link(&mut h, path, target).expect("append link");
                }
                None => b.append_data(&mut h, path, &b""[..]).expect("append"),
            }
            b.into_inner().expect("tar")
        };
        let apply = |tar: Vec<u8>| apply_layer(&f.root, &tar[..], &mut EntryBudget::new(MAX_IMAGE_ENTRIES));
        let hostile = |r: Result<(), UnpackError>, want: &str| match r {
            Err(UnpackError::Hostile { name, what }) => {
                assert!(what.contains(want), "{what}");
                assert!(name.len() < 300, "the message carries all of a hostile name: {} bytes", name.len());
            }
            other => panic!("want a refusal naming {want}, got {other:?}"),
        };
        let component = "c".repeat(NAME_MAX);
        apply(layer(&component, None)).expect("a 255-byte component");
        hostile(apply(layer(&format!("{component}x"), None)), "NAME_MAX");
        hostile(apply(layer(&format!("d/{component}x/f"), None)), "NAME_MAX");
        // 2,048 two-byte components: 4,095 bytes fit, one more does not.
        let deep = ["d"; 2048].join("/");
        assert_eq!(deep.len(), PATH_MAX - 1);
        hostile(apply(layer(&format!("{deep}x"), None)), "PATH_MAX");
        hostile(apply(layer("s", Some((tar::EntryType::Symlink, &format!("{deep}x"))))), "PATH_MAX");
        hostile(apply(layer("h", Some((tar::EntryType::Link, &format!("{component}x"))))), "NAME_MAX");
        apply(layer("s2", Some((tar::EntryType::Symlink, &"t".repeat(300))))).expect("a symlink's target may have long components");
    }

    #[test]
    fn a_layer_replaces_types() {
        let f = fixture();
        f.apply(&[E::Dir("p/"), E::File("p/f", b"1"), E::File("q", b"q")]).expect("lower");
        f.apply(&[E::File("p", b"now a file"), E::Dir("q/")]).expect("upper");
        assert!(f.root.join("p").is_file() && f.root.join("q").is_dir());
    }

    #[test]
    fn resolve_clamps_at_the_root() {
        let f = fixture();
        std::os::unix::fs::symlink("/", f.root.join("up")).expect("symlink");
        std::os::unix::fs::symlink("loop", f.root.join("loop")).expect("loop");
        assert_eq!(resolve(&f.root, Path::new("up/../../etc"), true).expect("resolve"), f.root.join("etc"));
        assert!(resolve(&f.root, Path::new("loop/x"), true).is_err());
        assert_eq!(resolve(&f.root, Path::new("up"), false).expect("no follow"), f.root.join("up"));
    }
}
