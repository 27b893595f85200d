//! The unpacked-image cache: `<dir>/<hex>/rootfs`, one per image config digest,
//! built once and shared by every run of the image, and removed again by
//! `moat image prune` or, least recently used first, when it outgrows
//! `image_cache_mib`.
//!
//! What `<dir>` holds for an image `<hex>`:
//! - `<hex>/rootfs`, the image; `<hex>/size`, its disk usage in bytes, written when it
//!   was unpacked; `<hex>/last-used`, rewritten by every run of the image: its mtime
//!   is the last use, its text the image's path then.
//! - `<hex>.lock`: every run holds it shared from before it looks for the image
//!   until it ends; a removal holds it exclusively, and only takes it if nobody
//!   holds it, so an image a run is unpacking or using is never removed.
//! - `<hex>.unpack.lock`: held exclusively while unpacking, so that concurrent runs
//!   of a new image unpack it once.
//! - `tmp-<hex>`: an unpack under way, renamed to `<hex>` once complete, so that a
//!   reader never sees half an image; `del-<hex>`: an image being removed, renamed
//!   away first so that a removal that dies never leaves half an image behind its
//!   name. Either, if left by a process that died, goes with the next prune.
//!
//! `<hex>` is mode 0700: an image's setuid binaries and device nodes are unpacked
//! as the image says, and no other host user may reach them.

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};

use super::{digest_hex, ImageError};

const PRIVATE: u32 = 0o700;
const SIZE_FILE: &str = "size";
const LAST_USED_FILE: &str = "last-used";
const TMP_PREFIX: &str = "tmp-";
const DEL_PREFIX: &str = "del-";
const USE_LOCK: &str = ".lock";
const UNPACK_LOCK: &str = ".unpack.lock";
/// How often a lock is taken again because its file was removed meanwhile, before
/// giving up (each retry follows a removal that has completed).
const MAX_LOCK_RETRIES: usize = 100;
/// Longest image path recorded in `last-used` that `moat image ls` reads back.
const MAX_SOURCE_LEN: u64 = 4096;

/// A run's hold on a cached image: while it lives, no prune or eviction removes the
/// image.
#[derive(Debug)]
pub struct Lease {
    _lock: Flock<File>,
}

/// An image in the cache, as `moat image ls` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedImage {
    /// `sha256:<hex>` of the image config.
    pub digest: String,
    /// Disk usage of the unpacked image.
    pub bytes: u64,
    pub last_used: SystemTime,
    /// The image's path as the last run named it.
    pub source: Option<String>,
    /// A run holds it.
    pub in_use: bool,
}

/// What a prune removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prune {
    /// Every image no run is using.
    All,
    /// Images no run is using, least recently used first, until the cache holds at
    /// most this many bytes.
    ToCap(u64),
}

/// What a prune did.
#[derive(Debug, Default)]
pub struct PruneReport {
    pub removed: Vec<CachedImage>,
    /// The images left, least recently used first.
    pub kept: Vec<CachedImage>,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> ImageError {
    move |source| ImageError::Io { what, source }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum LockMode {
    /// Shared, waiting for a removal under way to end.
    Use,
    /// Exclusive, only if nobody holds it now.
    Remove,
}

/// Locks `<hex>.lock` (created if missing); `None` if [`LockMode::Remove`] finds it
/// held. Whoever removes an image also removes its lock file, so a lock taken on a
/// file that is no longer the one at the path protects nothing: then start over.
fn lock_image(dir: &Path, hex: &str, mode: LockMode) -> Result<Option<Flock<File>>, ImageError> {
    let path = dir.join(format!("{hex}{USE_LOCK}"));
    for _ in 0..MAX_LOCK_RETRIES {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(format!("cannot open {}", path.display())))?;
        let arg = match mode {
            LockMode::Use => FlockArg::LockShared,
            LockMode::Remove => FlockArg::LockExclusiveNonblock,
        };
        let lock = match Flock::lock(file, arg) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if mode == LockMode::Remove => return Ok(None),
            Err((_, e)) => return Err(ImageError::Io { what: format!("cannot lock {}", path.display()), source: e.into() }),
        };
        let held = lock.metadata().map_err(io(format!("cannot stat {}", path.display())))?;
        match std::fs::metadata(&path) {
            Ok(now) if (now.dev(), now.ino()) == (held.dev(), held.ino()) => return Ok(Some(lock)),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ImageError::Io { what: format!("cannot stat {}", path.display()), source: e }),
        }
    }
    Err(ImageError::Invalid(format!("{} keeps being removed; is a prune running in a loop?", path.display())))
}

/// Returns the image `digest` from the cache `dir`, unpacking it with `fill` (into
/// an empty root directory) if it is not there yet, and a lease that keeps it there.
/// `label` names the image in `last-used`. The flag is true if this call unpacked it.
pub(super) fn unpack_cached(
    dir: &Path,
    digest: &str,
    label: &str,
    fill: impl FnOnce(&Path) -> Result<(), ImageError>,
) -> Result<(PathBuf, Lease, bool), ImageError> {
    let hex = digest_hex(digest)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE)
        .create(dir)
        .map_err(io(format!("cannot create image cache {}", dir.display())))?;
    let lease = match lock_image(dir, hex, LockMode::Use)? {
        Some(lock) => Lease { _lock: lock },
        None => return Err(ImageError::Invalid(format!("cannot lock image {digest} in {}", dir.display()))),
    };
    let done = dir.join(hex);
    let rootfs = done.join("rootfs");
    let mut unpacked = false;
    if rootfs.is_dir() {
        log::debug!("image {digest}: using the cached unpack in {}", done.display());
        // An unpack made before the cache was private, or before sizes were kept.
        std::fs::set_permissions(&done, std::fs::Permissions::from_mode(PRIVATE)).map_err(io(format!("cannot chmod {}", done.display())))?;
        if !done.join(SIZE_FILE).exists() {
            write_size(&done);
        }
    } else {
        let unpack_path = dir.join(format!("{hex}{UNPACK_LOCK}"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&unpack_path)
            .map_err(io(format!("cannot open {}", unpack_path.display())))?;
        let _unpacking = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| ImageError::Io { what: format!("cannot lock {}", unpack_path.display()), source: e.into() })?;
        // Another run may have unpacked it while we waited.
        if !rootfs.is_dir() {
            unpack(dir, hex, digest, fill)?;
            unpacked = true;
        }
    }
    touch_last_used(&done, label);
    Ok((rootfs, lease, unpacked))
}

/// Unpacks into `tmp-<hex>` and renames it to `<hex>`; the caller holds both locks.
fn unpack(dir: &Path, hex: &str, digest: &str, fill: impl FnOnce(&Path) -> Result<(), ImageError>) -> Result<(), ImageError> {
    let done = dir.join(hex);
    let tmp = dir.join(format!("{TMP_PREFIX}{hex}"));
    // Left by an unpack that died; we hold the locks, so nobody is using it.
    remove_tree(&tmp)?;
    remove_tree(&dir.join(format!("{DEL_PREFIX}{hex}")))?;
    let tmp_root = tmp.join("rootfs");
    std::fs::DirBuilder::new().mode(PRIVATE).create(&tmp).map_err(io(format!("cannot create {}", tmp.display())))?;
    // The mode given to mkdir is masked by the umask; the result must be exact.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(PRIVATE)).map_err(io(format!("cannot chmod {}", tmp.display())))?;
    std::fs::create_dir(&tmp_root).map_err(io(format!("cannot create {}", tmp_root.display())))?;
    std::fs::set_permissions(&tmp_root, std::fs::Permissions::from_mode(0o755)).map_err(io(format!("cannot chmod {}", tmp_root.display())))?;
    log::info!("image {digest}: unpacking into {}", done.display());
    if let Err(e) = fill(&tmp_root) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    write_size(&tmp);
    std::fs::rename(&tmp, &done).map_err(io(format!("cannot move the unpacked image to {}", done.display())))?;
    Ok(())
}

/// Records the disk usage of `image/rootfs` in `image/size`. A failure only costs
/// `moat image ls` and eviction a walk of the tree later.
fn write_size(image: &Path) {
    let bytes = disk_usage(&image.join("rootfs"));
    if let Err(e) = std::fs::write(image.join(SIZE_FILE), bytes.to_string()) {
        log::warn!("cannot record the size of {}: {e}", image.display());
    }
}

/// Marks the image used now, by `label`. Written aside and renamed, so that
/// concurrent runs never leave a torn file.
fn touch_last_used(image: &Path, label: &str) {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = image.join(format!("{LAST_USED_FILE}.{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
    let result = std::fs::write(&tmp, label).and_then(|()| std::fs::rename(&tmp, image.join(LAST_USED_FILE)));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        log::warn!("cannot record the use of {}: {e}", image.display());
    }
}

/// Bytes on disk under `root` (a hard-linked file counted once), without following
/// symlinks. Unreadable parts are skipped: this is an estimate for the cache cap.
pub fn disk_usage(root: &Path) -> u64 {
    let mut seen = HashSet::new();
    let mut total = root.symlink_metadata().map(|m| m.blocks().saturating_mul(512)).unwrap_or(0);
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if !m.is_dir() && m.nlink() > 1 && !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            total = total.saturating_add(m.blocks().saturating_mul(512));
            if m.is_dir() {
                dirs.push(e.path());
            }
        }
    }
    total
}

fn is_hex(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The images in the cache `dir`, most recently used first. A missing `dir` is an
/// empty cache.
pub fn list(dir: &Path) -> Result<Vec<CachedImage>, ImageError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ImageError::Io { what: format!("cannot read image cache {}", dir.display()), source: e }),
    };
    let mut images = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io(format!("cannot read image cache {}", dir.display())))?;
        let name = entry.file_name();
        let Some(hex) = name.to_str().filter(|n| is_hex(n)) else { continue };
        if entry.path().join("rootfs").is_dir() {
            images.push(describe(dir, hex));
        }
    }
    images.sort_by(|a, b| b.last_used.cmp(&a.last_used).then_with(|| a.digest.cmp(&b.digest)));
    Ok(images)
}

fn describe(dir: &Path, hex: &str) -> CachedImage {
    use std::io::Read;
    let image = dir.join(hex);
    let bytes = std::fs::read_to_string(image.join(SIZE_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| disk_usage(&image.join("rootfs")));
    let last_used = std::fs::metadata(image.join(LAST_USED_FILE))
        .or_else(|_| std::fs::metadata(&image))
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut source = String::new();
    let _ = File::open(image.join(LAST_USED_FILE)).map(|f| f.take(MAX_SOURCE_LEN).read_to_string(&mut source));
    let source = Some(source.trim().to_string()).filter(|s| !s.is_empty());
    CachedImage { digest: format!("sha256:{hex}"), bytes, last_used, source, in_use: in_use(dir, hex) }
}

/// True if a run holds the image (its lock is held). Only a report: a run may start
/// or end right after.
fn in_use(dir: &Path, hex: &str) -> bool {
    match File::open(dir.join(format!("{hex}{USE_LOCK}"))) {
        Ok(f) => Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err(),
        Err(_) => false,
    }
}

/// Removes images nobody uses from the cache `dir`, as `mode` says, and whatever
/// unpacks or removals that died left behind.
pub fn prune(dir: &Path, mode: Prune) -> Result<PruneReport, ImageError> {
    let mut images = list(dir)?;
    images.reverse(); // least recently used first
    let mut total = images.iter().fold(0u64, |t, i| t.saturating_add(i.bytes));
    let mut report = PruneReport::default();
    for mut image in images {
        let wanted = match mode {
            Prune::All => true,
            Prune::ToCap(cap) => total > cap,
        };
        let hex = image.digest.trim_start_matches("sha256:").to_string();
        if !wanted {
            report.kept.push(image);
            continue;
        }
        let Some(lock) = lock_image(dir, &hex, LockMode::Remove)? else {
            image.in_use = true;
            report.kept.push(image);
            continue;
        };
        let present = dir.join(&hex).join("rootfs").is_dir(); // or another prune was faster
        remove_locked(dir, &hex)?;
        drop(lock);
        if present {
            log::info!("image cache {}: removed {}", dir.display(), image.digest);
            total = total.saturating_sub(image.bytes);
            report.removed.push(image);
        }
    }
    clear_leftovers(dir)?;
    Ok(report)
}

/// Removes image `hex` and everything of it; the caller holds its lock exclusively.
fn remove_locked(dir: &Path, hex: &str) -> Result<(), ImageError> {
    let image = dir.join(hex);
    let del = dir.join(format!("{DEL_PREFIX}{hex}"));
    remove_tree(&del)?;
    if image.symlink_metadata().is_ok() {
        std::fs::rename(&image, &del).map_err(io(format!("cannot move {} aside to remove it", image.display())))?;
        remove_tree(&del)?;
    }
    remove_tree(&dir.join(format!("{TMP_PREFIX}{hex}")))?;
    for lock in [UNPACK_LOCK, USE_LOCK] {
        let p = dir.join(format!("{hex}{lock}"));
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(ImageError::Io { what: format!("cannot remove {}", p.display()), source: e })
            }
            _ => {}
        }
    }
    Ok(())
}

/// Removes what unpacks and removals that died left: `tmp-<hex>` and `del-<hex>`
/// trees, and the lock files of images that do not exist. Each under the image's
/// lock, so an unpack under way (which holds it) is left alone.
fn clear_leftovers(dir: &Path) -> Result<(), ImageError> {
    let mut hexes = BTreeSet::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ImageError::Io { what: format!("cannot read image cache {}", dir.display()), source: e }),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let hex = [TMP_PREFIX, DEL_PREFIX]
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .or_else(|| [UNPACK_LOCK, USE_LOCK].iter().find_map(|s| name.strip_suffix(s)));
        if let Some(hex) = hex.filter(|h| is_hex(h)) {
            hexes.insert(hex.to_string());
        }
    }
    for hex in hexes {
        let complete = dir.join(&hex).join("rootfs").is_dir();
        let tmp = dir.join(format!("{TMP_PREFIX}{hex}"));
        let del = dir.join(format!("{DEL_PREFIX}{hex}"));
        if complete && tmp.symlink_metadata().is_err() && del.symlink_metadata().is_err() {
            continue; // an image and its locks: nothing left over
        }
        let Some(lock) = lock_image(dir, &hex, LockMode::Remove)? else { continue };
        if dir.join(&hex).join("rootfs").is_dir() {
            remove_tree(&tmp)?;
            remove_tree(&del)?;
        } else {
            remove_locked(dir, &hex)?;
        }
        drop(lock);
    }
    Ok(())
}

/// Removes a directory tree (without following symlinks); a missing one is fine.
fn remove_tree(p: &Path) -> Result<(), ImageError> {
    match std::fs::remove_dir_all(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ImageError::Io { what: format!("cannot remove {}", p.display()), source: e }),
        _ => Ok(()),
    }
}

/// `moat image ls`'s table.
pub fn format_list(images: &[CachedImage], now: SystemTime) -> String {
    let mut out = format!("{:<12}  {:>10}  {:<16}  {:<6}  {}\n", "IMAGE ID", "SIZE", "LAST USED", "IN USE", "SOURCE");
    for i in images {
        let id: String = i.digest.trim_start_matches("sha256:").chars().take(12).collect();
        out.push_str(&format!(
            "{id:<12}  {:>10}  {:<16}  {:<6}  {}\n",
            human_size(i.bytes),
            ago(now, i.last_used),
            if i.in_use { "yes" } else { "no" },
            i.source.as_deref().unwrap_or("-")
        ));
    }
    out
}

/// Bytes in binary units, one decimal from KiB up.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// How long ago `then` was, in the largest whole unit.
fn ago(now: SystemTime, then: SystemTime) -> String {
    let secs = now.duration_since(then).unwrap_or(Duration::ZERO).as_secs();
    let (n, unit) = match secs {
        0..60 => return "just now".into(),
        60..3600 => (secs / 60, "minute"),
        3600..86400 => (secs / 3600, "hour"),
        _ => (secs / 86400, "day"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    fn hex(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    /// Unpacks a fake image of `kib` KiB as image `n`; returns the run's lease.
    fn add(dir: &Path, n: u8, kib: usize) -> Lease {
        let fill = |root: &Path| std::fs::write(root.join("data"), vec![n; kib << 10]).map_err(io("write data".into()));
        let (rootfs, lease, unpacked) = unpack_cached(dir, &digest(n), &format!("/images/{n}"), fill).expect("unpack");
        assert!(unpacked && rootfs.join("data").is_file());
        lease
    }

    /// Pretends image `n` was last used `secs` seconds ago.
    fn used_ago(dir: &Path, n: u8, secs: u64) {
        let f = File::options().write(true).open(dir.join(hex(n)).join(LAST_USED_FILE)).expect("last-used");
        f.set_modified(SystemTime::now() - Duration::from_secs(secs)).expect("set mtime");
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir).expect("read cache").map(|e| e.expect("entry").file_name().to_string_lossy().into()).collect();
        v.sort();
        v
    }

    fn digests(images: &[CachedImage]) -> Vec<String> {
        images.iter().map(|i| i.digest.clone()).collect()
    }

    #[test]
    fn prune_removes_unused_images_and_keeps_those_in_use() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("images");
        let running = add(&dir, 1, 4);
        drop(add(&dir, 2, 4));
        let listed = list(&dir).expect("list");
        assert_eq!(listed.len(), 2);
        for i in &listed {
            assert_eq!(i.in_use, i.digest == digest(1), "{i:?}");
            assert!(i.bytes >= 4096, "{i:?}");
        }
        let r = prune(&dir, Prune::All).expect("prune");
        assert_eq!((digests(&r.removed), digests(&r.kept)), (vec![digest(2)], vec![digest(1)]));
        assert!(r.kept[0].in_use);
        assert!(dir.join(hex(1)).join("rootfs/data").is_file(), "the image in use was removed");
        assert!(!dir.join(hex(2)).exists());
        drop(running);
        let r = prune(&dir, Prune::All).expect("prune again");
        assert_eq!(digests(&r.removed), vec![digest(1)]);
        assert_eq!(names(&dir), Vec::<String>::new(), "locks and leftovers go with their images");
    }

    #[test]
    fn a_prune_during_an_unpack_leaves_it_alone() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("images");
        // Halfway through the unpack, prune everything: the half-unpacked image (a
        // tmp- dir) belongs to a run and must survive.
        let fill = |root: &Path| {
            std::fs::write(root.join("first"), b"1").map_err(io("first".into()))?;
            let r = prune(&dir, Prune::All)?;
            assert!(r.removed.is_empty());
            std::fs::write(root.join("second"), b"2").map_err(io("second".into()))
        };
        let (rootfs, lease, _) = unpack_cached(&dir, &digest(3), "x", fill).expect("unpack with a prune inside");
        assert!(rootfs.join("first").is_file() && rootfs.join("second").is_file());
        drop(lease);
    }

    #[test]
    fn prune_clears_what_dead_unpacks_and_removals_left() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("images");
        let _running = add(&dir, 1, 4);
        for leftover in [format!("{TMP_PREFIX}{}", hex(5)), format!("{DEL_PREFIX}{}", hex(6)), format!("{DEL_PREFIX}{}", hex(1))] {
            std::fs::create_dir_all(dir.join(&leftover).join("rootfs/x")).expect("leftover");
        }
        for lock in [format!("{}{USE_LOCK}", hex(7)), format!("{}{UNPACK_LOCK}", hex(7))] {
            std::fs::write(dir.join(lock), b"").expect("lock");
        }
        std::fs::create_dir(dir.join("not-ours")).expect("foreign dir");
        prune(&dir, Prune::ToCap(u64::MAX)).expect("prune");
        let mut want = vec![hex(1), format!("{}{USE_LOCK}", hex(1)), format!("{}{UNPACK_LOCK}", hex(1)), "not-ours".to_string()];
        // The del- dir of an image in use waits until it is free.
        want.push(format!("{DEL_PREFIX}{}", hex(1)));
        want.sort();
        assert_eq!(names(&dir), want);
    }

    #[test]
    fn the_cap_evicts_least_recently_used_unused_images_first() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("images");
        for n in 1..=4 {
            drop(add(&dir, n, 64));
        }
        // Image 3 is the oldest but a run is using it.
        let (_, running, unpacked) = unpack_cached(&dir, &digest(3), "again", |_| Ok(())).expect("cached");
        assert!(!unpacked);
        for (n, secs) in [(3, 400), (1, 300), (4, 200), (2, 100)] {
            used_ago(&dir, n, secs);
        }
        let listed = list(&dir).expect("list");
        assert_eq!(digests(&listed), vec![digest(2), digest(4), digest(1), digest(3)], "most recently used first");
        let size = listed[0].bytes;
        assert!(listed.iter().all(|i| i.bytes == size), "{listed:?}");
        let r = prune(&dir, Prune::ToCap(2 * size)).expect("evict");
        assert_eq!(digests(&r.removed), vec![digest(1), digest(4)]);
        assert_eq!(digests(&r.kept), vec![digest(3), digest(2)]);
        // Within the cap: nothing more goes.
        assert!(prune(&dir, Prune::ToCap(2 * size)).expect("again").removed.is_empty());
        drop(running);
        // moat run's entry point: 0 is no limit; otherwise MiB.
        super::super::enforce_cache_cap(&dir, 0);
        assert_eq!(list(&dir).expect("list").len(), 2);
        super::super::enforce_cache_cap(&dir, 1);
        assert_eq!(digests(&list(&dir).expect("list")), vec![digest(2), digest(3)], "both fit in 1 MiB");
        std::fs::write(dir.join(hex(2)).join(SIZE_FILE), (1u64 << 20).to_string()).expect("pretend 2 is 1 MiB");
        super::super::enforce_cache_cap(&dir, 1);
        assert_eq!(digests(&list(&dir).expect("list")), vec![digest(2)], "the least recently used went");
    }

    #[test]
    fn the_listing_reads_like_docker_images() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let images = [
            CachedImage { digest: digest(0xab), bytes: 5 << 20, last_used: now - Duration::from_secs(7200), source: Some("/img/a.tar".into()), in_use: true },
            CachedImage { digest: digest(1), bytes: 1000, last_used: now - Duration::from_secs(86400 * 3), source: None, in_use: false },
        ];
        let want = "IMAGE ID            SIZE  LAST USED         IN USE  SOURCE\n\
                    abababababab     5.0 MiB  2 hours ago       yes     /img/a.tar\n\
                    010101010101      1000 B  3 days ago        no      -\n";
        assert_eq!(format_list(&images, now), want);
        assert_eq!(ago(now, now - Duration::from_secs(59)), "just now");
        assert_eq!(ago(now, now - Duration::from_secs(60)), "1 minute ago");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(3 << 30), "3.0 GiB");
    }
}
