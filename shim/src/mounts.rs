//! Host mounts the shim makes for its containers: the rootfs a snapshotter describes
//! (overlay or bind, as containerd hands it over) below the pod's rootfs share, and
//! bind mounts of host files and directories below its volume share.
//!
//! The shim makes them in its own mount namespace (see the binary's main), so none is
//! visible on the host and all vanish with the last process in that namespace: a
//! SIGKILLed shim cannot leak them past the cleanup of its VMM and fs backend.
//!
//! Mount targets are made and opened with [`crate::safefs`] (no symlink followed, no
//! mount crossed) and mounted on by fd. A bind is assembled in a private staging
//! directory first (recursive, then every mount in it made nosuid, nodev and, if
//! asked, read-only) and only then moved below the share, so the guest never sees a
//! `:ro` volume, or a submount of one, writable even for a moment.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::helper::SHARE_FLAGS;
use crate::safefs::{fd_path, Beneath, SafeFsError};

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
    #[error("unsafe mount target")]
    Target(#[from] SafeFsError),
    #[error("cannot restrict the mounts below {path}")]
    Restrict {
        path: PathBuf,
        #[source]
        source: crate::helper::HelperError,
    },
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

/// Mounts `m` on `target` (bind mounts are made read-only in a second step, as the
/// kernel ignores MS_RDONLY on the bind itself). Other mounts get nosuid and nodev.
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
    mount(Some(m.source.as_str()), target, Some(m.kind.as_str()), flags | SHARE_FLAGS, data.as_deref()).map_err(err)
}

/// Mounts a container's rootfs on `rel` below `share` (created if missing): the
/// snapshotter's mounts in order, or, if there are none, a bind of `fallback` (the
/// bundle's rootfs).
pub fn mount_rootfs(share: &Beneath, rel: &Path, staging: &Path, mounts: &[MountSpec], fallback: &Path) -> Result<(), MountError> {
    if mounts.is_empty() {
        return bind(share, rel, staging, fallback, true, false);
    }
    let target = share.mkdir_all(rel)?;
    let at = fd_path(&target);
    for m in mounts {
        let (flags, _) = parse_options(&m.options);
        if flags.contains(MsFlags::MS_BIND) || m.kind == "bind" {
            let src = PathBuf::from(&m.source);
            let ro = flags.contains(MsFlags::MS_RDONLY);
            drop(target);
            return bind(share, rel, staging, &src, true, ro);
        }
        mount_one(m, &at).map_err(|e| match e {
            MountError::Mount { what, source, .. } => MountError::Mount { what, target: share.path().join(rel), source },
            other => other,
        })?;
    }
    Ok(())
}

/// Binds the host file or directory `source` (recursively) on `rel` below `share`,
/// creating the target (an empty dir or file) first; nosuid and nodev throughout,
/// read-only throughout if asked. `staging` is a private directory of the caller's
/// (not below any share) where the bind is put together before it is moved in place.
pub fn bind(share: &Beneath, rel: &Path, staging: &Path, source: &Path, is_dir: bool, read_only: bool) -> Result<(), MountError> {
    let target = if is_dir { share.mkdir_all(rel)? } else { share.create_file(rel)? };
    std::fs::create_dir_all(staging).map_err(|source| MountError::Mkdir { path: staging.to_path_buf(), source })?;
    let slot = staging.join(format!("{}-{}", std::process::id(), STAGE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    let made = if is_dir { std::fs::create_dir(&slot) } else { std::fs::File::create(&slot).map(drop) };
    made.map_err(|source| MountError::Mkdir { path: slot.clone(), source })?;
    let result = (|| {
        let err = |what: &str| {
            let what = what.to_string();
            move |source| MountError::Mount { what, target: share.path().join(rel), source }
        };
        mount(Some(source), &slot, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>).map_err(err(&source.display().to_string()))?;
        let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| MountError::Mkdir { path: "/proc/self/mountinfo".into(), source })?;
        crate::helper::restrict_tree(&info, &slot, read_only).map_err(|source| MountError::Restrict { path: share.path().join(rel), source })?;
        mount(Some(&slot), &fd_path(&target), None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(err(&format!("{} (move)", source.display())))
    })();
    if result.is_err() {
        let _ = umount2(&slot, MntFlags::MNT_DETACH);
    }
    let _ = if is_dir { std::fs::remove_dir(&slot) } else { std::fs::remove_file(&slot) };
    result
}

/// Distinguishes concurrent staging slots of one process.
static STAGE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

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

    /// A `:ro` bind of a directory that has a writable mount inside stays read-only
    /// all the way down (Kata CVE-2020-28914), and the guest-facing targets never go
    /// through a planted symlink.
    #[test]
    fn read_only_binds_are_read_only_below_too() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("*** read_only_binds_are_read_only_below_too needs root (mounts); NOT RUN ***");
            return;
        }
        let d = tempfile::tempdir().expect("tmp");
        let (share, staging, vol) = (d.path().join("share"), d.path().join("staging"), d.path().join("vol"));
        std::fs::create_dir_all(vol.join("sub")).expect("vol");
        std::fs::create_dir_all(&share).expect("share");
        mount(Some("tmpfs"), &vol.join("sub"), Some("tmpfs"), MsFlags::empty(), Some("size=1m")).expect("submount");
        let b = Beneath::open(&share).expect("open");
        let result = bind(&b, Path::new("c1/0"), &staging, &vol, true, true);
        let top = std::fs::write(share.join("c1/0/top"), "x");
        let sub = std::fs::write(share.join("c1/0/sub/below"), "x");
        let rw_bind = bind(&b, Path::new("c1/1"), &staging, &vol, true, false);
        let rw_sub = std::fs::write(share.join("c1/1/sub/below"), "x");
        std::os::unix::fs::symlink(d.path(), share.join("c1/2")).expect("symlink");
        let planted = bind(&b, Path::new("c1/2"), &staging, &vol, true, false);
        unmount_under(&share);
        let _ = umount2(&vol.join("sub"), MntFlags::MNT_DETACH);
        result.expect("ro bind");
        assert_eq!(top.expect_err("top is read-only").raw_os_error(), Some(libc::EROFS));
        assert_eq!(sub.expect_err("the submount is read-only too").raw_os_error(), Some(libc::EROFS));
        rw_bind.expect("rw bind");
        rw_sub.expect("a writable bind stays writable below");
        assert!(matches!(planted, Err(MountError::Target(SafeFsError::Unsafe { .. }))), "{planted:?}");
        assert_eq!(std::fs::read_dir(&staging).expect("staging").count(), 0, "no staging slot is left");
    }

    #[test]
    fn overlong_data_is_refused_before_the_kernel_sees_it() {
        let m = MountSpec { kind: "overlay".into(), source: "overlay".into(), options: vec![format!("lowerdir={}", "a".repeat(5000))] };
        let e = mount_one(&m, Path::new("/nonexistent")).expect_err("too long");
        assert!(matches!(e, MountError::TooLong { len: 5009, .. }), "{e}");
    }
}
