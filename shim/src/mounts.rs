//! Host mounts the shim makes for its containers: the rootfs a snapshotter describes
//! (overlay or bind, as containerd hands it over) and bind mounts of host files, all
//! under the pod's share.
//!
//! The shim makes them in its own mount namespace (see the binary's main), so none is
//! visible on the host and all vanish with the last process in that namespace: a
//! SIGKILLed shim cannot leak them past the cleanup of its VMM and fs backend.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// The largest mount data the kernel takes (one page).
const MAX_MOUNT_DATA: usize = 4095;

/// One mount of a rootfs, as a snapshotter describes it (`mount -t TYPE -o OPTIONS SOURCE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot mount {what} on {target}")]
    Mount {
        what: String,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot create {path}")]
    Mkdir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {kind} mount's options are {len} bytes, more than the kernel takes ({MAX_MOUNT_DATA})")]
    TooLong { kind: String, len: usize },
}

/// Splits mount(8) options into flags and the filesystem's data string.
pub fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        let (set, clear) = match o.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            // Propagation is ours to choose (the share's), not the snapshotter's.
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "defaults" => continue,
            other => {
                data.push(other.to_string());
                continue;
            }
        };
        flags.insert(set);
        flags.remove(clear);
    }
    (flags, data.join(","))
}

fn mkdir_all(p: &Path) -> Result<(), MountError> {
    std::fs::create_dir_all(p).map_err(|source| MountError::Mkdir { path: p.to_path_buf(), source })
}

/// Mounts `m` on `target` (bind mounts are made read-only in a second step, as the
/// kernel ignores MS_RDONLY on the bind itself).
pub fn mount_one(m: &MountSpec, target: &Path) -> Result<(), MountError> {
    let (flags, data) = parse_options(&m.options);
    let err = |source| MountError::Mount { what: format!("{} ({})", m.source, m.kind), target: target.to_path_buf(), source };
    if flags.contains(MsFlags::MS_BIND) || m.kind == "bind" {
        let bind = MsFlags::MS_BIND | (flags & MsFlags::MS_REC);
        mount(Some(m.source.as_str()), target, None::<&str>, bind, None::<&str>).map_err(err)?;
        let extra = flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
        if !extra.is_empty() {
            mount(None::<&str>, target, None::<&str>, MsFlags::MS_REMOUNT | MsFlags::MS_BIND | extra, None::<&str>).map_err(err)?;
        }
        return Ok(());
    }
    if data.len() > MAX_MOUNT_DATA {
        return Err(MountError::TooLong { kind: m.kind.clone(), len: data.len() });
    }
    let data = (!data.is_empty()).then_some(data);
    mount(Some(m.source.as_str()), target, Some(m.kind.as_str()), flags, data.as_deref()).map_err(err)
}

/// Mounts a container's rootfs on `target` (created if missing): the snapshotter's
/// mounts in order, or, if there are none, a bind of `fallback` (the bundle's rootfs).
pub fn mount_rootfs(mounts: &[MountSpec], fallback: &Path, target: &Path) -> Result<(), MountError> {
    mkdir_all(target)?;
    if mounts.is_empty() {
        let m = MountSpec { kind: "bind".into(), source: fallback.to_string_lossy().into_owned(), options: vec!["rbind".into()] };
        return mount_one(&m, target);
    }
    for m in mounts {
        mount_one(m, target)?;
    }
    Ok(())
}

/// Binds a host file or directory on `target`, creating the target (an empty dir or
/// file) first.
pub fn bind(source: &Path, target: &Path, is_dir: bool, read_only: bool) -> Result<(), MountError> {
    if is_dir {
        mkdir_all(target)?;
    } else {
        if let Some(parent) = target.parent() {
            mkdir_all(parent)?;
        }
        std::fs::File::create(target).map_err(|source| MountError::Mkdir { path: target.to_path_buf(), source })?;
    }
    let mut options = vec!["rbind".to_string()];
    if read_only {
        options.push("ro".into());
    }
    mount_one(&MountSpec { kind: "bind".into(), source: source.to_string_lossy().into_owned(), options }, target)
}

/// Detaches every mount at or below `dir` (deepest first), as listed in our
/// mountinfo; returns how many. Errors are logged, not returned: this runs on the
/// way out and must go as far as it can.
pub fn unmount_under(dir: &Path) -> usize {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return 0 };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    let mut n = 0;
    for p in points {
        match umount2(&p, MntFlags::MNT_DETACH) {
            Ok(()) => n += 1,
            // A stacked mount went with the one above it.
            Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(e) => log::warn!("cannot unmount {}: {e}", p.display()),
        }
    }
    n
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(o: &[&str]) -> Vec<String> {
        o.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let (f, d) = parse_options(&opts(&["index=off", "lowerdir=/a:/b", "upperdir=/u", "workdir=/w", "nosuid", "ro"]));
        assert_eq!(f, MsFlags::MS_NOSUID | MsFlags::MS_RDONLY);
        assert_eq!(d, "index=off,lowerdir=/a:/b,upperdir=/u,workdir=/w");
        let (f, d) = parse_options(&opts(&["rbind", "ro", "rw", "rprivate"]));
        assert_eq!(f, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert_eq!(d, "");
    }

    #[test]
    fn mountinfo_paths_unescape() {
        assert_eq!(unescape(r"/a\040b\134c"), "/a b\\c");
        assert_eq!(unescape(r"/plain\"), "/plain\\");
        assert_eq!(unescape(r"/x\04"), "/x\\04");
    }

    #[test]
    fn overlong_data_is_refused_before_the_kernel_sees_it() {
        let m = MountSpec { kind: "overlay".into(), source: "overlay".into(), options: vec![format!("lowerdir={}", "a".repeat(5000))] };
        let e = mount_one(&m, Path::new("/nonexistent")).expect_err("too long");
        assert!(matches!(e, MountError::TooLong { len: 5009, .. }), "{e}");
    }
}
