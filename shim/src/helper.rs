//! Hidden helper modes of any binary built on this library (`<exe> __moat-helper ...`).
//!
//! They exist so that a child can be prepared between fork and exec without unsafe
//! code: the binary re-executes itself, the helper does the preparation with safe
//! calls, then execs (or starts) the real program.
//!
//! - `exec PARENT PROG ARGS...`: dies with PARENT (PR_SET_PDEATHSIG), then execs PROG.
//!   Used for moat-vmm when the jail is off. PARENT 0: no tie.
//! - `vmm JSON`: moat-vmm in its jail ([`crate::jail`]).
//! - `fs JSON`: unshares a mount namespace of its own, makes the sandbox's host mounts
//!   inside it, makes the share's own directories read-only, then execs virtiofsd
//!   there. The mounts exist only in that namespace and vanish with virtiofsd,
//!   whatever kills it. The namespace's `/` is a slave of the caller's: mounts the
//!   caller makes later under a shared mount (the shim's container roots) still reach
//!   virtiofsd, with their own flags, below the read-only share.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

/// argv[1] that selects a helper mode.
pub const HELPER_ARG: &str = "__moat-helper";

/// One mount the fs backend's namespace gets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum HostMount {
    /// A writable layer over a read-only image.
    Overlay { lower: PathBuf, upper: PathBuf, work: PathBuf, target: PathBuf },
    /// A bind mount, made read-only on the host side if asked.
    Bind { source: PathBuf, target: PathBuf, read_only: bool },
}

/// Everything the `fs` helper needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FsBackend {
    pub parent_pid: i32,
    pub virtiofsd: PathBuf,
    pub socket: PathBuf,
    /// The directory served; read-only to the guest, except what is mounted below it
    /// writable.
    pub shared: PathBuf,
    /// `shared` is a mount of its own already (the shim's, with shared propagation);
    /// otherwise the helper binds it on itself first.
    pub shared_is_mount: bool,
    pub mounts: Vec<HostMount>,
    /// Host directories a user shares: refuse set-ID modes and device nodes
    /// ([`crate::fsguard`]).
    pub hardened: bool,
    /// The host cgroup directory to join (None: stay in the caller's).
    pub cgroup: Option<PathBuf>,
}

/// Why a helper failed (printed on its stderr, which goes to a log in the state dir).
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("usage: {HELPER_ARG} exec PARENT PROG [ARGS...] | {HELPER_ARG} fs JSON | {HELPER_ARG} vmm JSON")]
    Usage,
    #[error("the parent exited before the helper started")]
    Orphaned,
    #[error("{what}")]
    Sys {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error("cannot read /proc/self/mountinfo")]
    MountInfo(#[source] std::io::Error),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Jail(String),
    #[error(transparent)]
    Guard(#[from] crate::fsguard::FsGuardError),
    #[error("bad fs backend description")]
    Json(#[from] serde_json::Error),
    #[error("path {0:?} contains a NUL byte, or a comma or colon that overlayfs options cannot hold")]
    BadPath(PathBuf),
}

/// Runs a helper mode if argv asks for one (never returns then); otherwise returns.
/// Call it first thing in `main` of every binary built on this library.
pub fn run_if_helper() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).map(|a| a.as_bytes()) != Some(HELPER_ARG.as_bytes()) {
        return;
    }
    let err = match run(&args[2..]) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    let mut msg = format!("moat helper: {err}");
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    eprintln!("{msg}");
    std::process::exit(125);
}

pub(crate) fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> HelperError {
    let what = what.into();
    move |source| HelperError::Sys { what, source }
}

fn run(args: &[std::ffi::OsString]) -> Result<std::convert::Infallible, HelperError> {
    let mode = args.first().and_then(|a| a.to_str()).ok_or(HelperError::Usage)?;
    match mode {
        "exec" => {
            let parent: i32 = args.get(1).and_then(|a| a.to_str()).and_then(|a| a.parse().ok()).ok_or(HelperError::Usage)?;
            if parent != 0 {
                die_with_parent(parent)?;
            }
            let prog = args.get(2).ok_or(HelperError::Usage)?;
            exec(Path::new(prog), &args[2..])
        }
        "fs" => {
            let json = args.get(1).and_then(|a| a.to_str()).ok_or(HelperError::Usage)?;
            let cfg: FsBackend = serde_json::from_str(json)?;
            if cfg.parent_pid != 0 {
                die_with_parent(cfg.parent_pid)?;
            }
            if let Some(cg) = &cfg.cgroup {
                crate::jail::join_cgroup(cg)?;
            }
            make_mounts(&cfg)?;
            let argv = virtiofsd_args(&cfg);
            if cfg.hardened {
                crate::fsguard::install()?;
            }
            exec(&cfg.virtiofsd, &argv)
        }
        "vmm" => {
            let json = args.get(1).and_then(|a| a.to_str()).ok_or(HelperError::Usage)?;
            let j: crate::jail::VmmJail = serde_json::from_str(json)?;
            if j.parent_pid != 0 {
                die_with_parent(j.parent_pid)?;
            }
            crate::jail::run(&j)
        }
        _ => Err(HelperError::Usage),
    }
}

/// virtiofsd's command line (the Rust virtiofsd): its namespace sandbox (pivot_root
/// into the share, own pid and network namespaces), seccomp that kills on a call it
/// does not expect, no CAP_MKNOD (no device nodes) and no CAP_SETFCAP (no file
/// capabilities). Submounts are not announced to the guest (virtiofsd announces
/// them by default): Linux 6.1's virtio-fs
/// frees a submount's inodes under a pending FUSE_RELEASE when a container that used
/// one goes (a use-after-free in fuse_release_end seen in the guest here).
pub fn virtiofsd_args(cfg: &FsBackend) -> Vec<std::ffi::OsString> {
    let mut shared = std::ffi::OsString::from("--shared-dir=");
    shared.push(&cfg.shared);
    let mut socket = std::ffi::OsString::from("--socket-path=");
    socket.push(&cfg.socket);
    [
        cfg.virtiofsd.as_os_str().to_os_string(),
        socket,
        shared,
        "--sandbox=namespace".into(),
        "--seccomp=kill".into(),
        "--modcaps=-mknod:-setfcap".into(),
        "--no-announce-submounts".into(),
        "--cache=auto".into(),
        "--log-level=warn".into(),
    ]
    .into()
}

fn die_with_parent(parent: i32) -> Result<(), HelperError> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(sys("cannot set the parent-death signal"))?;
    // The parent may have died between fork and prctl: then we were reparented.
    if nix::unistd::getppid().as_raw() != parent {
        return Err(HelperError::Orphaned);
    }
    Ok(())
}

fn cstring(p: &std::ffi::OsStr) -> Result<CString, HelperError> {
    CString::new(p.as_bytes()).map_err(|_| HelperError::BadPath(PathBuf::from(p)))
}

fn exec(prog: &Path, argv: &[std::ffi::OsString]) -> Result<std::convert::Infallible, HelperError> {
    let path = cstring(prog.as_os_str())?;
    let argv = argv.iter().map(|a| cstring(a)).collect::<Result<Vec<_>, _>>()?;
    nix::unistd::execv(&path, &argv).map_err(sys(format!("cannot execute {}", prog.display())))
}

/// Overlay option values cannot hold `,` or `:` (they separate options and layers).
fn overlay_path(p: &Path) -> Result<String, HelperError> {
    match p.to_str() {
        Some(s) if !s.contains([',', ':', '\0']) => Ok(s.to_string()),
        _ => Err(HelperError::BadPath(p.to_path_buf())),
    }
}

/// The data string of an overlay mount.
pub fn overlay_options(lower: &Path, upper: &Path, work: &Path) -> Result<String, HelperError> {
    Ok(format!("lowerdir={},upperdir={},workdir={}", overlay_path(lower)?, overlay_path(upper)?, overlay_path(work)?))
}

/// Host-side flags of every mount the guest reaches: virtiofsd opens no device node
/// and runs nothing, so neither may work through the share.
pub const SHARE_FLAGS: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);

fn make_mounts(cfg: &FsBackend) -> Result<(), HelperError> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(sys("cannot create a mount namespace (moat run needs root)"))?;
    // Nothing we mount may propagate back to the caller's namespace (slave: one way),
    // while what the caller mounts later under a shared mount still reaches us.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
        .map_err(sys("cannot make / a slave mount in the helper's mount namespace"))?;
    // The share's own directories (the skeleton the host makes mount points in) are
    // read-only to the guest: it can neither plant a symlink where the host will
    // mount later nor fill the state dir's tmpfs. What is mounted below keeps its own
    // flags (a writable rootfs or volume stays writable).
    let shared = &cfg.shared;
    if !cfg.shared_is_mount {
        mount(Some(shared), shared, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(sys(format!("cannot bind {} on itself", shared.display())))?;
    }
    mount(None::<&str>, shared, None::<&str>, MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | SHARE_FLAGS, None::<&str>)
        .map_err(sys(format!("cannot make {} read-only", shared.display())))?;
    for m in &cfg.mounts {
        match m {
            HostMount::Overlay { lower, upper, work, target } => {
                let data = overlay_options(lower, upper, work)?;
                mount(Some("overlay"), target, Some("overlay"), SHARE_FLAGS, Some(data.as_str()))
                    .map_err(sys(format!("cannot mount the overlay rootfs on {}", target.display())))?;
            }
            HostMount::Bind { source, target, read_only } => {
                mount(Some(source), target, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
                    .map_err(sys(format!("cannot bind {} on {}", source.display(), target.display())))?;
                let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(HelperError::MountInfo)?;
                restrict_tree(&info, target, *read_only)?;
            }
        }
    }
    Ok(())
}

/// Remounts `top` and every mount below it (what a recursive bind brought along)
/// with [`SHARE_FLAGS`], and read-only if asked: a bind remount changes one mount
/// only, so a submount of a `:ro` volume would otherwise stay writable.
pub fn restrict_tree(mountinfo: &str, top: &Path, read_only: bool) -> Result<(), HelperError> {
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | SHARE_FLAGS;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    for point in mounts_at_or_below(mountinfo, top) {
        mount(None::<&str>, &point, None::<&str>, flags, None::<&str>)
            .map_err(sys(format!("cannot restrict {}", point.display())))?;
    }
    Ok(())
}

/// Mount points in `mountinfo` (the text of /proc/self/mountinfo) that are `top` or
/// below it, in the order they were mounted (parents first).
pub fn mounts_at_or_below(mountinfo: &str, top: &Path) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(top))
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
pub fn unescape_mountinfo(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = u32::from(b[i + 1] - b'0') * 64 + u32::from(b[i + 2] - b'0') * 8 + u32::from(b[i + 3] - b'0');
            out.push((v & 0xff) as u8);
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

    #[test]
    fn submounts_of_a_read_only_volume_are_found() {
        let info = "22 1 0:21 / / rw - ext4 /dev/vda rw\n\
                    30 22 0:30 / /run/moat/x/shared/vol/0 rw - ext4 /dev/vdb rw\n\
                    31 30 0:31 / /run/moat/x/shared/vol/0/sub\\040dir rw - tmpfs tmpfs rw\n\
                    32 22 0:32 / /run/moat/x/shared/vol/01 rw - tmpfs tmpfs rw\n";
        let got = mounts_at_or_below(info, Path::new("/run/moat/x/shared/vol/0"));
        assert_eq!(got, vec![PathBuf::from("/run/moat/x/shared/vol/0"), PathBuf::from("/run/moat/x/shared/vol/0/sub dir")]);
    }

    #[test]
    fn overlay_options_refuse_separators() {
        let o = overlay_options(Path::new("/l"), Path::new("/u"), Path::new("/w")).expect("plain paths");
        assert_eq!(o, "lowerdir=/l,upperdir=/u,workdir=/w");
        assert!(overlay_options(Path::new("/a,b"), Path::new("/u"), Path::new("/w")).is_err());
        assert!(overlay_options(Path::new("/l"), Path::new("/a:b"), Path::new("/w")).is_err());
    }

    #[test]
    fn fs_backend_round_trips_and_builds_virtiofsd_args() {
        let cfg = FsBackend {
            parent_pid: 1,
            virtiofsd: "/usr/local/libexec/moat/virtiofsd".into(),
            socket: "/run/moat/x/fs.sock".into(),
            shared: "/run/moat/x/shared".into(),
            shared_is_mount: false,
            hardened: true,
            cgroup: None,
            mounts: vec![
                HostMount::Overlay { lower: "/l".into(), upper: "/u".into(), work: "/w".into(), target: "/t".into() },
                HostMount::Bind { source: "/s".into(), target: "/t2".into(), read_only: true },
            ],
        };
        let back: FsBackend = serde_json::from_str(&serde_json::to_string(&cfg).expect("json")).expect("parse");
        assert_eq!(back.mounts, cfg.mounts);
        let args: Vec<String> = virtiofsd_args(&cfg).iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(args[1], "--socket-path=/run/moat/x/fs.sock");
        assert!(args.iter().any(|a| a == "--shared-dir=/run/moat/x/shared"));
        assert!(args.iter().any(|a| a == "--sandbox=namespace"));
        assert!(args.iter().any(|a| a == "--seccomp=kill"));
        assert!(args.iter().any(|a| a == "--modcaps=-mknod:-setfcap"));
        assert!(args.iter().any(|a| a == "--no-announce-submounts"));
        assert!(back.hardened && !back.shared_is_mount);
    }
}
