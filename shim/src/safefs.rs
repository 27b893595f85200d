//! Creating and removing paths inside a directory the guest can also see, without
//! following anything the guest may have planted there.
//!
//! The share's skeleton (`shared/<container>/...`, `volumes/<container>/...`) is
//! read-only to the guest, but a container's own rootfs and writable volumes are not,
//! and the host must never be tricked into writing through a symlink or into a mount
//! it did not mean. So every path below a share is resolved one component at a time
//! from a directory fd with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_XDEV)`: no symlink is followed, no `..` escapes, and no mount point is
//! crossed. Mounts are then made on `/proc/self/fd/N` of the target's fd, so the
//! kernel mounts on exactly the inode that was checked, whatever happens to the name.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// How deep [`remove_beneath`] descends; our trees are a few levels deep, and a
/// deeper one was not made by us.
const MAX_REMOVE_DEPTH: usize = 64;

/// Why a path below a share could not be made or removed.
#[derive(Debug, thiserror::Error)]
pub enum SafeFsError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is a symlink, a mount point or outside its share; refusing to use it")]
    Unsafe { path: PathBuf },
    #[error("{path} exists and is not a {want}")]
    WrongType { path: PathBuf, want: &'static str },
    #[error("{path} must be a relative path without `..`")]
    BadPath { path: PathBuf },
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn resolve() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_XDEV | ResolveFlags::NO_MAGICLINKS
}

/// ELOOP (a symlink), EXDEV (a mount point or escape) and friends: the guest (or
/// someone) put something there that we must not use.
fn is_unsafe(e: Errno) -> bool {
    e == Errno::LOOP || e == Errno::XDEV || e == Errno::AGAIN
}

/// A directory that paths are made in and removed from, held by fd.
pub struct Beneath {
    root: OwnedFd,
    path: PathBuf,
}

impl Beneath {
    /// Opens `root` (itself trusted: a directory the host made, not below a share).
    pub fn open(root: &Path) -> Result<Beneath, SafeFsError> {
        let fd = rustix::fs::open(root, OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| SafeFsError::Open { path: root.to_path_buf(), source: e.into() })?;
        Ok(Beneath { root: fd, path: root.to_path_buf() })
    }

    /// The directory's own path (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `rel`'s components, refused if it could leave the directory.
    fn components(rel: &Path) -> Result<Vec<&std::ffi::OsStr>, SafeFsError> {
        let mut out = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(n) => out.push(n),
                Component::CurDir => {}
                _ => return Err(SafeFsError::BadPath { path: rel.to_path_buf() }),
            }
        }
        Ok(out)
    }

    /// Opens or creates each directory of `rel` (mode 0755), refusing symlinks and
    /// mount points on the way; returns the last one's fd.
    pub fn mkdir_all(&self, rel: &Path) -> Result<OwnedFd, SafeFsError> {
        let mut dir = rustix::io::dup(&self.root).map_err(|e| SafeFsError::Open { path: self.path.clone(), source: e.into() })?;
        let mut at = self.path.clone();
        for name in Self::components(rel)? {
            at.push(name);
            dir = open_or_mkdir(&dir, name, &at)?;
        }
        Ok(dir)
    }

    /// Opens or creates (empty, mode 0644) the regular file `rel`, its directories
    /// too, never following a symlink and never truncating anything.
    pub fn create_file(&self, rel: &Path) -> Result<OwnedFd, SafeFsError> {
        let comps = Self::components(rel)?;
        let Some((name, dirs)) = comps.split_last() else { return Err(SafeFsError::BadPath { path: rel.to_path_buf() }) };
        let parent = self.mkdir_all(&dirs.iter().collect::<PathBuf>())?;
        let path = self.path.join(rel);
        let flags = OFlags::CREATE | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat2(&parent, *name, flags, Mode::from_raw_mode(0o644), resolve()).map_err(|e| {
            if is_unsafe(e) {
                SafeFsError::Unsafe { path: path.clone() }
            } else {
                SafeFsError::Create { path: path.clone(), source: e.into() }
            }
        })?;
        let st = rustix::fs::fstat(&fd).map_err(|e| SafeFsError::Open { path: path.clone(), source: e.into() })?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(SafeFsError::WrongType { path, want: "regular file" });
        }
        Ok(fd)
    }

    /// Opens the directory `rel` (which must exist), as [`Beneath::mkdir_all`] would.
    pub fn open_dir(&self, rel: &Path) -> Result<OwnedFd, SafeFsError> {
        let path = self.path.join(rel);
        let comps = Self::components(rel)?;
        if comps.is_empty() {
            return rustix::io::dup(&self.root).map_err(|e| SafeFsError::Open { path, source: e.into() });
        }
        let rel: PathBuf = comps.iter().collect();
        rustix::fs::openat2(&self.root, &rel, OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty(), resolve())
            .map_err(|e| if is_unsafe(e) { SafeFsError::Unsafe { path: path.clone() } } else { SafeFsError::Open { path, source: e.into() } })
    }

    /// Removes `rel` and everything below it that is on the same mount: a mount point
    /// (or anything on another device) found on the way is neither entered nor
    /// removed. Returns how many such entries were left in place. A missing `rel` is
    /// not an error.
    pub fn remove(&self, rel: &Path) -> Result<usize, SafeFsError> {
        let comps = Self::components(rel)?;
        let Some((name, dirs)) = comps.split_last() else { return Err(SafeFsError::BadPath { path: rel.to_path_buf() }) };
        let parent_rel: PathBuf = dirs.iter().collect();
        let parent = match self.open_dir(&parent_rel) {
            Ok(p) => p,
            Err(SafeFsError::Open { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let dev = rustix::fs::fstat(&parent).map_err(|e| SafeFsError::Open { path: self.path.join(&parent_rel), source: e.into() })?.st_dev;
        remove_entry(&parent, name, &self.path.join(rel), dev, 0)
    }
}

/// `/proc/self/fd/N` for an fd: a path the kernel resolves to exactly that file, for
/// calls that take paths (mount).
pub fn fd_path(fd: &impl AsFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd()))
}

fn open_or_mkdir(dir: &OwnedFd, name: &std::ffi::OsStr, at: &Path) -> Result<OwnedFd, SafeFsError> {
    let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    // Two tries: a concurrent creator may win the mkdir between our open and mkdir.
    for _ in 0..2 {
        match rustix::fs::openat2(dir, name, flags, Mode::empty(), resolve()) {
            Ok(fd) => return Ok(fd),
            Err(Errno::NOENT) => match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(Errno::EXIST) => continue,
                Err(e) => return Err(SafeFsError::Create { path: at.to_path_buf(), source: e.into() }),
            },
            Err(Errno::NOTDIR) => {
                // O_DIRECTORY|O_NOFOLLOW on a symlink says ENOTDIR too.
                let link = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink);
                return Err(if link {
                    SafeFsError::Unsafe { path: at.to_path_buf() }
                } else {
                    SafeFsError::WrongType { path: at.to_path_buf(), want: "directory" }
                });
            }
            Err(e) if is_unsafe(e) => return Err(SafeFsError::Unsafe { path: at.to_path_buf() }),
            Err(e) => return Err(SafeFsError::Open { path: at.to_path_buf(), source: e.into() }),
        }
    }
    Err(SafeFsError::Unsafe { path: at.to_path_buf() })
}

/// Removes `name` in `parent` (a directory on device `dev`); see [`Beneath::remove`].
fn remove_entry(parent: &OwnedFd, name: &std::ffi::OsStr, path: &Path, dev: u64, depth: usize) -> Result<usize, SafeFsError> {
    let st = match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(0),
        Err(e) => return Err(SafeFsError::Remove { path: path.to_path_buf(), source: e.into() }),
    };
    if st.st_dev != dev {
        log::warn!("{} is on another device; leaving it", path.display());
        return Ok(1);
    }
    let rm_err = |e: Errno| SafeFsError::Remove { path: path.to_path_buf(), source: e.into() };
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return match rustix::fs::unlinkat(parent, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(0),
            Err(e) => Err(rm_err(e)),
        };
    }
    if depth >= MAX_REMOVE_DEPTH {
        log::warn!("{} is nested more than {MAX_REMOVE_DEPTH} levels deep; leaving it", path.display());
        return Ok(1);
    }
    let dir = match rustix::fs::openat2(parent, name, OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty(), resolve()) {
        Ok(d) => d,
        Err(Errno::NOENT) => return Ok(0),
        Err(e) if is_unsafe(e) => {
            // A mount point (EXDEV): whatever is mounted there is not ours to delete.
            log::warn!("{} is a mount point; leaving it", path.display());
            return Ok(1);
        }
        Err(e) => return Err(rm_err(e)),
    };
    let mut left = 0;
    let names: Vec<std::ffi::CString> = {
        let entries = Dir::read_from(&dir).map_err(rm_err)?;
        let mut names = Vec::new();
        for e in entries {
            let e = e.map_err(rm_err)?;
            let n = e.file_name();
            if n.to_bytes() != b"." && n.to_bytes() != b".." {
                names.push(n.to_owned());
            }
        }
        names
    };
    for n in names {
        let os = std::ffi::OsStr::from_bytes(n.as_bytes());
        left += remove_entry(&dir, os, &path.join(os), dev, depth + 1)?;
    }
    if left > 0 {
        return Ok(left);
    }
    match rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(0),
        // Still a mount point in some namespace of ours.
        Err(Errno::BUSY) => {
            log::warn!("{} is busy (a mount point); leaving it", path.display());
            Ok(1)
        }
        Err(e) => Err(rm_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    #[test]
    fn planted_symlinks_are_never_followed() {
        let d = tempfile::tempdir().expect("tmp");
        let share = d.path().join("share");
        let victim = d.path().join("victim");
        std::fs::create_dir_all(&share).expect("share");
        std::fs::create_dir_all(&victim).expect("victim");
        std::fs::write(victim.join("shadow"), "secret").expect("victim file");
        let b = Beneath::open(&share).expect("open");
        // A symlinked container dir, a symlinked subdir, a symlinked file target.
        std::os::unix::fs::symlink(&victim, share.join("c1")).expect("symlink");
        assert!(matches!(b.mkdir_all(Path::new("c1/rootfs")), Err(SafeFsError::Unsafe { .. })));
        assert!(matches!(b.create_file(Path::new("c1/hosts")), Err(SafeFsError::Unsafe { .. })));
        std::fs::create_dir_all(share.join("c2")).expect("c2");
        std::os::unix::fs::symlink(&victim, share.join("c2/mounts")).expect("symlink");
        assert!(matches!(b.create_file(Path::new("c2/mounts/0")), Err(SafeFsError::Unsafe { .. })));
        std::fs::create_dir_all(share.join("c3/mounts")).expect("c3");
        std::os::unix::fs::symlink(victim.join("shadow"), share.join("c3/mounts/0")).expect("symlink");
        let e = b.create_file(Path::new("c3/mounts/0")).expect_err("a symlinked file target");
        assert!(matches!(e, SafeFsError::Unsafe { .. }), "{e}");
        std::os::unix::fs::symlink("../../victim", share.join("c3/mounts/1")).expect("relative symlink");
        assert!(matches!(b.mkdir_all(Path::new("c3/mounts/1")), Err(SafeFsError::Unsafe { .. })));
        // Nothing reached the victim: no new entries, the file keeps its content.
        assert_eq!(std::fs::read_to_string(victim.join("shadow")).expect("read"), "secret");
        assert_eq!(std::fs::read_dir(&victim).expect("ls").count(), 1);
        // `..` and absolute paths are refused before any syscall.
        assert!(matches!(b.mkdir_all(Path::new("../x")), Err(SafeFsError::BadPath { .. })));
        assert!(matches!(b.create_file(Path::new("/etc/x")), Err(SafeFsError::BadPath { .. })));
        // The honest case works, and an existing file is reused, not truncated.
        let f = b.create_file(Path::new("c4/mounts/0")).expect("create");
        drop(f);
        std::fs::write(share.join("c4/mounts/0"), "kept").expect("write");
        b.create_file(Path::new("c4/mounts/0")).expect("again");
        assert_eq!(std::fs::read_to_string(share.join("c4/mounts/0")).expect("read"), "kept");
        assert!(matches!(b.mkdir_all(Path::new("c4/mounts/0")), Err(SafeFsError::WrongType { .. })));
    }

    #[test]
    fn remove_does_not_follow_symlinks() {
        let d = tempfile::tempdir().expect("tmp");
        let share = d.path().join("share");
        let victim = d.path().join("victim");
        std::fs::create_dir_all(share.join("c1/a/b")).expect("tree");
        std::fs::create_dir_all(&victim).expect("victim");
        std::fs::write(victim.join("f"), "x").expect("victim file");
        std::fs::write(share.join("c1/a/b/file"), "y").expect("file");
        std::os::unix::fs::symlink(&victim, share.join("c1/a/link")).expect("symlink");
        let b = Beneath::open(&share).expect("open");
        assert_eq!(b.remove(Path::new("c1")).expect("remove"), 0);
        assert!(!share.join("c1").exists());
        assert!(victim.join("f").exists(), "the symlink's target survives");
        assert_eq!(b.remove(Path::new("c1")).expect("again"), 0, "a missing entry is not an error");
    }

    /// A mount inside a tree being removed (as a guest could try to arrange by renaming
    /// a mount point into it) is neither entered nor removed.
    #[test]
    fn remove_never_crosses_a_mount() {
        if !is_root() {
            eprintln!("*** remove_never_crosses_a_mount needs root (to mount a tmpfs); NOT RUN ***");
            return;
        }
        use nix::mount::{mount, umount2, MntFlags, MsFlags};
        let d = tempfile::tempdir().expect("tmp");
        let share = d.path().join("share");
        let victim = d.path().join("victim");
        std::fs::create_dir_all(share.join("c1/rootfs")).expect("tree");
        std::fs::create_dir_all(share.join("c1/mounts/0")).expect("tree");
        std::fs::create_dir_all(&victim).expect("victim");
        std::fs::write(victim.join("precious"), "x").expect("victim file");
        mount(Some("tmpfs"), &share.join("c1/rootfs"), Some("tmpfs"), MsFlags::empty(), Some("size=1m")).expect("tmpfs");
        std::fs::write(share.join("c1/rootfs/in-mount"), "z").expect("write");
        mount(Some(&victim), &share.join("c1/mounts/0"), None::<&str>, MsFlags::MS_BIND, None::<&str>).expect("bind");
        let b = Beneath::open(&share).expect("open");
        let left = b.remove(Path::new("c1"));
        let in_mount = share.join("c1/rootfs/in-mount").exists();
        let _ = umount2(&share.join("c1/rootfs"), MntFlags::MNT_DETACH);
        let _ = umount2(&share.join("c1/mounts/0"), MntFlags::MNT_DETACH);
        assert_eq!(left.expect("remove"), 2, "both mount points are left in place");
        assert!(in_mount, "nothing inside the tmpfs was removed");
        assert!(victim.join("precious").exists(), "nothing behind the bind mount was removed");
        // With the mounts gone, the rest goes.
        assert_eq!(b.remove(Path::new("c1")).expect("remove"), 0);
        assert!(!share.join("c1").exists());
    }
}
