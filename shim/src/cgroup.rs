//! The host cgroup a pod's VMM and fs backends run in, so the host's limits and its
//! accounting (Kubernetes' pod limits, eviction, `systemd-cgtop`) see the VM.
//!
//! The containerd shim uses the `linux.cgroupsPath` of the pod's first container (for
//! a CRI pod, its sandbox), in either of the forms runc takes: a cgroupfs path
//! (`/kubepods/besteffort/pod<uid>/<id>`) or a systemd one
//! (`kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>`, which names the scope
//! `cri-containerd-<id>.scope` below the slice `kubepods.slice/kubepods-besteffort.slice/...`).
//! `moat run` uses `<cgroup_parent>/<id>` from the host config. Only cgroup v2 is
//! supported. The directories moat creates are recorded in the state dir and removed
//! when the pod goes (by `containerd-shim-moat-v2 delete` too, after a crash).

use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

/// The record in a state dir: the cgroup directories moat created, innermost last.
pub const CGROUP_FILE: &str = "cgroup";
/// Marks a parent cgroup that moat created for pods (not the admin's or systemd's),
/// so the last pod below it removes it, whichever pod created it.
pub const CREATED_XATTR: &str = "trusted.moat.created";
/// Tries at creating a pod's cgroup while other pods remove the parents they share.
const CREATE_ATTEMPTS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy is mounted (moat needs cgroup v2)")]
    NoCgroup2,
    #[error("invalid cgroup path {0:?}")]
    BadPath(String),
    #[error("cannot create cgroup {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot record the cgroup in {path}")]
    Record {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where cgroup v2 is mounted (the first cgroup2 mount in our mountinfo).
pub fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let point = pre.split(' ').nth(4)?;
        (post.split(' ').next() == Some("cgroup2")).then(|| PathBuf::from(crate::helper::unescape_mountinfo(point)))
    })
}

/// A `linux.cgroupsPath` as a path below the cgroup v2 root.
pub fn from_cgroups_path(value: &str) -> Result<PathBuf, CgroupError> {
    let bad = || CgroupError::BadPath(value.to_string());
    let parts: Vec<&str> = value.split(':').collect();
    let path = match parts[..] {
        // systemd: "slice:prefix:name" -> <slice path>/<prefix>-<name>.scope
        [slice, prefix, name] if !value.starts_with('/') => {
            if name.is_empty() || slice.contains('/') || prefix.contains('/') || name.contains('/') {
                return Err(bad());
            }
            let slice = if slice.is_empty() { "system.slice" } else { slice };
            let scope = if prefix.is_empty() { format!("{name}.scope") } else { format!("{prefix}-{name}.scope") };
            expand_slice(slice).ok_or_else(bad)?.join(scope)
        }
        [p] => Path::new("/").join(p),
        _ => return Err(bad()),
    };
    check_relative(&path).map_err(|_| bad())?;
    Ok(path)
}

/// `a-b-c.slice` lives in `a.slice/a-b.slice/a-b-c.slice` (systemd's naming).
fn expand_slice(slice: &str) -> Option<PathBuf> {
    let stem = slice.strip_suffix(".slice")?;
    if stem.is_empty() || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
        return None;
    }
    let mut out = PathBuf::from("/");
    let mut prefix = String::new();
    for part in stem.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        out.push(format!("{prefix}.slice"));
    }
    Some(out)
}

fn check_relative(p: &Path) -> Result<(), ()> {
    let mut normal = 0;
    for c in p.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(_) => normal += 1,
            _ => return Err(()),
        }
    }
    if normal == 0 {
        return Err(());
    }
    Ok(())
}

/// A cgroup moat made (or found) for a pod.
#[derive(Debug)]
pub struct PodCgroup {
    /// The directory (below the cgroup v2 mount).
    pub dir: PathBuf,
}

impl PodCgroup {
    /// Creates `rel` below the cgroup v2 root (parents too) and records in
    /// `state_dir` what it created, so it can be removed later even by another process.
    /// The parents it creates are marked ([`CREATED_XATTR`]): pods share them (ctr's
    /// `/<namespace>/<id>`, `moat run`'s `/moat/<id>`), and whichever pod goes last
    /// removes them ([`remove_recorded`]).
    pub fn create(rel: &Path, state_dir: &Path) -> Result<PodCgroup, CgroupError> {
        check_relative(rel).map_err(|_| CgroupError::BadPath(rel.display().to_string()))?;
        let root = cgroup2_root().ok_or(CgroupError::NoCgroup2)?;
        let (dir, created) = create_chain(&root, rel)?;
        if !dir.join("cgroup.procs").exists() {
            remove_dirs(&created);
            return Err(CgroupError::Create { path: dir, source: std::io::Error::other("not a cgroup v2 directory") });
        }
        let text: String = created.iter().map(|d| format!("{}\n", d.display())).collect();
        let record = state_dir.join(CGROUP_FILE);
        if let Err(source) = std::fs::write(&record, text) {
            remove_dirs(&created);
            return Err(CgroupError::Record { path: record, source });
        }
        Ok(PodCgroup { dir })
    }
}

/// Creates each directory of `rel` below `root` that is missing; returns the leaf and
/// those it created, outermost first. A parent another pod removes between our
/// finding it and creating its child (ENOENT) is created again, a few times at most.
fn create_chain(root: &Path, rel: &Path) -> Result<(PathBuf, Vec<PathBuf>), CgroupError> {
    let parts: Vec<_> = rel.components().filter(|c| matches!(c, Component::Normal(_))).collect();
    let mut attempt = 0;
    'again: loop {
        attempt += 1;
        let mut created = Vec::new();
        let mut dir = root.to_path_buf();
        for (i, c) in parts.iter().enumerate() {
            dir.push(c);
            match std::fs::create_dir(&dir) {
                Ok(()) => {
                    if i + 1 < parts.len() {
                        // Best effort: unmarked, it is still removed by its creator.
                        let _ = rustix::fs::setxattr(&dir, CREATED_XATTR, b"1", rustix::fs::XattrFlags::empty());
                    }
                    created.push(dir.clone());
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempt < CREATE_ATTEMPTS => {
                    remove_dirs(&created);
                    continue 'again;
                }
                Err(source) => {
                    remove_dirs(&created);
                    return Err(CgroupError::Create { path: dir, source });
                }
            }
        }
        return Ok((dir, created));
    }
}

fn is_marked(dir: &Path) -> bool {
    let mut v = [0u8; 8];
    rustix::fs::getxattr(dir, CREATED_XATTR, &mut v).is_ok()
}

/// Removes the pod cgroup recorded in `state_dir`, waiting up to `timeout` for its
/// last processes to go, then each parent above it that moat created (recorded, or
/// marked by another pod's moat) and that no other pod still uses. Returns the pod
/// cgroup if it could not be removed.
pub fn remove_recorded(state_dir: &Path, timeout: Duration) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string(state_dir.join(CGROUP_FILE)) else { return Vec::new() };
    let root = cgroup2_root();
    let dirs: Vec<PathBuf> = text
        .lines()
        .map(PathBuf::from)
        // Only ever below the cgroup v2 root: the record is ours, but be strict.
        .filter(|d| root.as_ref().is_some_and(|r| d.starts_with(r) && d != r) && check_relative(d).is_ok())
        .collect();
    let Some(leaf) = dirs.last() else {
        let _ = std::fs::remove_file(state_dir.join(CGROUP_FILE));
        return Vec::new();
    };
    let end = Instant::now() + timeout;
    loop {
        match std::fs::remove_dir(leaf) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            // EBUSY: a process is still exiting; ENOTEMPTY: a child cgroup.
            Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                // The record stays, for a later `delete` to try again.
                log::warn!("cannot remove cgroup {}: {e}", leaf.display());
                return vec![leaf.clone()];
            }
        }
    }
    // The parents: one try each, innermost first. One that is busy (another pod's
    // cgroup below it) is that pod's to remove when it goes.
    if let Some(root) = root {
        for parent in leaf.ancestors().skip(1).take_while(|p| p.starts_with(&root) && *p != root) {
            if !(dirs.iter().any(|d| d == parent) || is_marked(parent)) {
                break;
            }
            match std::fs::remove_dir(parent) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(_) => break,
            }
        }
    }
    let _ = std::fs::remove_file(state_dir.join(CGROUP_FILE));
    Vec::new()
}

fn remove_dirs(dirs: &[PathBuf]) {
    for d in dirs.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroups_paths_in_both_drivers_forms() {
        let p = |s: &str| from_cgroups_path(s).map(|p| p.display().to_string()).map_err(|e| e.to_string());
        assert_eq!(p("/default/c1").as_deref(), Ok("/default/c1"));
        assert_eq!(p("kubepods/besteffort/pod1/abc").as_deref(), Ok("/kubepods/besteffort/pod1/abc"));
        assert_eq!(p("system.slice:docker:abc").as_deref(), Ok("/system.slice/docker-abc.scope"));
        assert_eq!(
            p("kubepods-besteffort-pod12.slice:cri-containerd:abc").as_deref(),
            Ok("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/cri-containerd-abc.scope")
        );
        assert_eq!(p(":moat:x").as_deref(), Ok("/system.slice/moat-x.scope"));
        for bad in ["/a/../b", "/", "", "x.slice:a/b:c", "bad:docker:abc", "-a.slice:p:n", "a:b:c:d"] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn created_cgroups_are_recorded_and_removed() {
        if !rustix::process::geteuid().is_root() || cgroup2_root().is_none() {
            eprintln!("*** created_cgroups_are_recorded_and_removed needs root and cgroup v2; NOT RUN ***");
            return;
        }
        let state = tempfile::tempdir().expect("tmp");
        let rel = PathBuf::from(format!("/moat-unit-{}/a/b", std::process::id()));
        let cg = PodCgroup::create(&rel, state.path()).expect("create");
        assert!(cg.dir.join("cgroup.procs").exists());
        let recorded = std::fs::read_to_string(state.path().join(CGROUP_FILE)).expect("record");
        assert_eq!(recorded.lines().count(), 3, "{recorded}");
        assert!(remove_recorded(state.path(), Duration::from_secs(1)).is_empty());
        let top = cgroup2_root().expect("root").join(format!("moat-unit-{}", std::process::id()));
        assert!(!top.exists(), "every directory moat created is gone");
        assert!(PodCgroup::create(Path::new("/a/../b"), state.path()).is_err());
    }

    /// Pods share the parents moat creates (ctr's `/<namespace>/<id>`): whichever goes
    /// last removes them, not only the one that created them; a parent moat did not
    /// create stays.
    #[test]
    fn shared_parents_go_with_the_last_pod() {
        if !rustix::process::geteuid().is_root() || cgroup2_root().is_none() {
            eprintln!("*** shared_parents_go_with_the_last_pod needs root and cgroup v2; NOT RUN ***");
            return;
        }
        let root = cgroup2_root().expect("root");
        let top = format!("moat-unit-shared-{}", std::process::id());
        let (a, b) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
        PodCgroup::create(&PathBuf::from(format!("/{top}/ns/a")), a.path()).expect("create a");
        PodCgroup::create(&PathBuf::from(format!("/{top}/ns/b")), b.path()).expect("create b");
        let recorded = std::fs::read_to_string(b.path().join(CGROUP_FILE)).expect("record");
        assert_eq!(recorded.lines().count(), 1, "b created only its own: {recorded}");
        // The creator goes first: its pod's cgroup goes, the shared parents stay.
        assert!(remove_recorded(a.path(), Duration::from_secs(1)).is_empty());
        assert!(!root.join(&top).join("ns/a").exists());
        assert!(root.join(&top).join("ns/b").exists(), "the other pod's cgroup stays");
        // The last one removes the parents, though it did not create them.
        assert!(remove_recorded(b.path(), Duration::from_secs(1)).is_empty());
        assert!(!root.join(&top).exists(), "the parents moat created are gone");

        // A parent that was there before (the admin's) stays.
        std::fs::create_dir(root.join(&top)).expect("admin's parent");
        PodCgroup::create(&PathBuf::from(format!("/{top}/ns/c")), a.path()).expect("create c");
        assert!(remove_recorded(a.path(), Duration::from_secs(1)).is_empty());
        assert!(!root.join(&top).join("ns").exists(), "moat's parent is gone");
        assert!(root.join(&top).exists(), "the admin's parent stays");
        std::fs::remove_dir(root.join(&top)).expect("cleanup");
    }
}
