//! One sandbox: a state directory, the virtio-fs backends serving its shares, a
//! microVM in its jail, and the agent inside it.
//!
//! `<state_dir>/<id>/` (root only) holds a lock file (flocked while the sandbox
//! lives), the VM's config, logs, the pids of its host processes ([`procs`]), the
//! cgroup and disk it made ([`crate::cgroup`]), and:
//! - `shared/`: the guest's virtio-fs `moatfs` (container roots). Read-only to the
//!   guest, but for what is mounted below it writable;
//! - `volumes/`: the guest's virtio-fs `moatvol` (host directories a user shares:
//!   volumes, bind mounts, a root directory used in place), served by a second
//!   virtiofsd that refuses set-ID modes and device nodes ([`crate::fsguard`]);
//!   read-only to the guest in the same way;
//! - `jail/`: what moat-vmm may touch (its vsock socket, the fs backends' sockets,
//!   the console log), owned by the jail uid;
//! - `root/`: where the VMM's jail builds its root ([`crate::jail`]).
//!
//! A writable image root of `moat run` is not written through virtio-fs at all: the
//! guest stacks an overlay over the read-only image on a sparse ext4 disk image in
//! `disk_dir`, whose size is the container's disk quota.
//!
//! Two lifetimes ([`Lifetime`]):
//! - `moat run` ties the sandbox to itself: `shared/rootfs` and `volumes/N` are
//!   mounted only in the fs backends' private mount namespaces, and the backends and
//!   the VMM die with the process that started them (PR_SET_PDEATHSIG).
//! - The containerd shim detaches it: containers come and go while the VM runs, so
//!   the shim mounts their roots and binds under the shares later, from its own
//!   private mount namespace, and both shares are shared mounts that the backends'
//!   namespaces receive them from. The VMM and the backends are not tied to the shim.
//!
//! A directory whose lock is free belongs to a dead owner: the next start (or
//! `containerd-shim-moat-v2 delete`) stops its recorded processes and removes it.
//! Dropping a [`Sandbox`] stops everything and removes the directory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moat_config::{DiskConfig, FsConfig, MoatConfig, SerialOutput, VmConfig, VsockConfig};
use moat_protocol::{Storage, AGENT_API_PORT, AGENT_LOG_PORT};
use nix::fcntl::{Flock, FlockArg};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::agent::{Agent, AgentError};
use crate::helper::{FsBackend, HostMount, HELPER_ARG};
use crate::jail::{JailFile, VmmJail};
use crate::procs;
use crate::vsock::{dial, DialError};

/// The virtio-fs tag of the sandbox's shared directory.
pub const FS_TAG: &str = "moatfs";
/// Where the agent mounts the shared directory in the guest.
pub const GUEST_SHARED: &str = "/run/moat/shared";
/// The virtio-fs tag of the volume share.
pub const VOL_TAG: &str = "moatvol";
/// Where the agent mounts the volume share in the guest.
pub const GUEST_VOLUMES: &str = "/run/moat/volumes";
/// Where the guest mounts the writable-layer disk, and the overlay root over it.
pub const GUEST_SCRATCH: &str = "/run/moat/scratch";
pub const GUEST_OVERLAY_ROOT: &str = "/run/moat/rootfs";
/// The guest's name for the writable-layer disk (the VM's only virtio-blk device).
const GUEST_DISK: &str = "/dev/vda";
/// The record of the writable-layer disk in a state dir (its host path).
const DISK_FILE: &str = "disk";
/// How long virtiofsd may take to create its socket.
const FS_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the guest gets to power off after Shutdown before the VMM is signalled.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// A state dir without a lock file is only stale once it is this old (a start may be
/// between creating the dir and locking it).
const STALE_UNLOCKED_AGE: Duration = Duration::from_secs(60);
/// Console lines quoted when the VM fails.
const CONSOLE_TAIL_LINES: usize = 15;
/// Agent log lines forwarded to our log, at most (a guest must not flood it).
const MAX_AGENT_LOG_LINES: usize = 10_000;

/// What goes under `shared/`.
#[derive(Clone, Debug)]
pub enum RootSource {
    /// An image unpacked in the cache: an overlay on it (or a read-only bind).
    Image { rootfs: PathBuf, read_only: bool },
    /// A plain directory used in place.
    Dir { path: PathBuf, read_only: bool },
}

/// A host path shared as `shared/vol/<index>`.
#[derive(Clone, Debug)]
pub struct Volume {
    pub host: PathBuf,
    pub read_only: bool,
}

/// Where the guest finds a root of this kind (what [`Sandbox::guest_root`] will say).
pub fn guest_root_for(root: &RootSource) -> String {
    match root {
        RootSource::Image { read_only: false, .. } => GUEST_OVERLAY_ROOT.into(),
        RootSource::Dir { read_only: false, .. } => format!("{GUEST_VOLUMES}/rootfs"),
        RootSource::Image { .. } | RootSource::Dir { .. } => format!("{GUEST_SHARED}/rootfs"),
    }
}

/// Who keeps a sandbox's host processes alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    /// The VMM and the fs backend die with the caller (`moat run`).
    TiedToCaller,
    /// They outlive the caller, which mounts container roots under `shared/` later.
    /// The caller must run in a mount namespace of its own (the shim unshares one
    /// before it starts any thread): `shared/` becomes a shared mount there.
    /// PR_SET_PDEATHSIG is not used: it fires when the *thread* that forked exits,
    /// and a shim's ttrpc worker threads come and go.
    Detached,
}

/// How to build a sandbox.
#[derive(Clone, Debug)]
pub struct SandboxSpec {
    pub id: String,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// Mounted as `shared/rootfs` before the VM starts (None: the caller mounts roots).
    pub root: Option<RootSource>,
    pub volumes: Vec<Volume>,
    pub lifetime: Lifetime,
    /// Size of the writable-layer disk for a writable image root (MiB).
    pub disk_mib: u32,
    /// The host cgroup (below the cgroup v2 root) the VMM and backends join.
    pub cgroup: Option<PathBuf>,
}

/// Why a sandbox could not start.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid sandbox name: {0}")]
    Id(String),
    #[error("a sandbox named {0:?} is already running")]
    Busy(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the virtio-fs backend failed to start: {0}")]
    FsBackend(String),
    #[error("cannot set up the sandbox's cgroup")]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error("cannot make the writable-layer disk {path}: {message}")]
    Disk { path: PathBuf, message: String },
    #[error("the VM exited during boot ({status}); console:\n{console}")]
    VmmExited { status: String, console: String },
    #[error("the guest agent did not come up within {secs} s; console:\n{console}")]
    BootTimeout { secs: u64, console: String },
    #[error("interrupted while the VM was starting")]
    Interrupted,
    #[error("cannot reach the guest agent")]
    Dial(#[from] DialError),
    #[error("the guest agent failed")]
    Agent(#[from] AgentError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Io { what, source }
}

/// A running sandbox. Drop stops it and removes its state.
pub struct Sandbox {
    pub id: String,
    dir: PathBuf,
    vsock: PathBuf,
    console: PathBuf,
    vmm: Option<Child>,
    /// The virtio-fs backends (the rootfs share, then the volume share if any).
    fs: Vec<Child>,
    agent: Option<Agent>,
    vmm_status: Option<ExitStatus>,
    lifetime: Lifetime,
    /// The shares bind-mounted on themselves (Detached): unmount them on stop.
    mounted: Vec<PathBuf>,
    /// The guest's view: a volume share, a writable-layer disk, the root's path.
    layout: GuestView,
    _lock: Flock<File>,
}

/// What the guest gets, for the caller's CreateContainer.
#[derive(Clone, Debug, Default)]
struct GuestView {
    volumes: bool,
    disk: Option<PathBuf>,
    root: String,
}

/// Removes state dirs of runs that died without cleaning up.
pub fn remove_stale(state_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(state_dir) else { return };
    for e in entries.flatten() {
        let dir = e.path();
        if !dir.is_dir() {
            continue;
        }
        let stale = match File::options().write(true).open(dir.join("lock")) {
            Ok(f) => Flock::lock(f, FlockArg::LockExclusiveNonblock).is_ok(),
            Err(_) => dir.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age > STALE_UNLOCKED_AGE),
        };
        if stale {
            log::info!("sandbox {}: removing the state of a run that died", e.file_name().to_string_lossy());
            if let Err(err) = remove_dead(&dir) {
                log::warn!("{err}");
            }
        }
    }
}

/// Cleans up the state dir of a sandbox whose owner died: stops its recorded host
/// processes (the VMM, the fs backend; host mounts of the sandbox live only in their
/// mount namespaces and vanish with them) and removes the dir. The caller holds the
/// dir's lock or knows it is free.
pub fn remove_dead(dir: &Path) -> Result<(), SandboxError> {
    let left = procs::kill_recorded(dir, Duration::from_secs(10));
    if let Some(r) = left.first() {
        return Err(SandboxError::Io {
            what: format!("{}: {} (pid {}) survived SIGKILL", dir.display(), r.name, r.pid),
            source: std::io::Error::from(std::io::ErrorKind::TimedOut),
        });
    }
    crate::cgroup::remove_recorded(dir, Duration::from_secs(2));
    remove_recorded_disk(dir);
    remove_state_dir(dir)
}

/// Removes a state dir without entering any mount left below it (the shares live in
/// their owners' mount namespaces, but an owner killed halfway may leave one).
fn remove_state_dir(dir: &Path) -> Result<(), SandboxError> {
    for share in ["shared", "volumes", "root"] {
        let _ = umount2(&dir.join(share), MntFlags::MNT_DETACH);
    }
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let name = dir.file_name().map(PathBuf::from).unwrap_or_default();
    let left = crate::safefs::Beneath::open(parent)
        .and_then(|b| b.remove(&name))
        .map_err(|e| SandboxError::Io { what: crate::error_chain(&e), source: std::io::Error::other("remove") })?;
    if left > 0 {
        return Err(SandboxError::Io {
            what: format!("{}: {left} mount point(s) left in place", dir.display()),
            source: std::io::Error::from(std::io::ErrorKind::ResourceBusy),
        });
    }
    Ok(())
}

/// Deletes the writable-layer disk recorded in a state dir.
fn remove_recorded_disk(dir: &Path) {
    if let Ok(p) = std::fs::read_to_string(dir.join(DISK_FILE)) {
        let p = PathBuf::from(p.trim_end());
        if let Err(e) = std::fs::remove_file(&p) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("cannot remove the writable-layer disk {}: {e}", p.display());
            }
        }
        let _ = std::fs::remove_file(dir.join(DISK_FILE));
    }
}

/// Deletes writable-layer disks whose sandbox is gone (its state dir vanished, e.g.
/// with the tmpfs it was on at a reboot). A disk of a live sandbox is never touched:
/// its state dir exists while it runs.
pub fn remove_stale_disks(cfg: &MoatConfig) {
    let Ok(entries) = std::fs::read_dir(&cfg.disk_dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".img")) else { continue };
        if moat_protocol::validate_id("sandbox name", id).is_err() || cfg.state_dir.join(id).exists() {
            continue;
        }
        log::info!("removing the writable-layer disk of a sandbox that is gone: {}", e.path().display());
        let _ = std::fs::remove_file(e.path());
    }
}

/// Takes the lock of a sandbox's state dir if its owner is gone; None if it lives
/// (or there is no such dir).
pub fn lock_if_dead(dir: &Path) -> Option<Flock<File>> {
    let f = File::options().write(true).open(dir.join("lock")).ok()?;
    Flock::lock(f, FlockArg::LockExclusiveNonblock).ok()
}

impl Sandbox {
    /// Creates the state dir, starts the fs backend and the VM, and connects to the
    /// agent. `cancel` aborts the boot wait (a signal arrived).
    pub fn start(cfg: &MoatConfig, spec: &SandboxSpec, cancel: &Arc<AtomicBool>) -> Result<Sandbox, SandboxError> {
        moat_protocol::validate_id("sandbox name", &spec.id).map_err(|e| SandboxError::Id(e.to_string()))?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&cfg.state_dir)
            .map_err(io_err(format!("cannot create {}", cfg.state_dir.display())))?;
        remove_stale(&cfg.state_dir);
        let dir = cfg.state_dir.join(&spec.id);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(SandboxError::Busy(spec.id.clone())),
            Err(e) => return Err(io_err(format!("cannot create {}", dir.display()))(e)),
        }
        let lock = match File::options().create(true).truncate(false).write(true).open(dir.join("lock")) {
            Ok(f) => Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|_| SandboxError::Busy(spec.id.clone()))?,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(io_err("cannot create the sandbox lock")(e));
            }
        };
        let jail = dir.join("jail");
        let mut sb = Sandbox {
            id: spec.id.clone(),
            vsock: jail.join("vsock.sock"),
            console: jail.join("console.log"),
            dir,
            vmm: None,
            fs: Vec::new(),
            agent: None,
            vmm_status: None,
            lifetime: spec.lifetime,
            mounted: Vec::new(),
            layout: GuestView::default(),
            _lock: lock,
        };
        // On error, Drop tears down whatever was started.
        sb.make_jail_dir(cfg)?;
        let cgroup = match &spec.cgroup {
            Some(rel) => Some(crate::cgroup::PodCgroup::create(rel, &sb.dir)?.dir),
            None => None,
        };
        sb.start_fs(cfg, spec, cgroup.as_deref())?;
        sb.start_vmm(cfg, spec, cgroup.as_deref())?;
        sb.connect_agent(Duration::from_secs(u64::from(cfg.boot_timeout_secs)), cancel)?;
        Ok(sb)
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The sandbox's shared directory on the host (as the fs backend sees it).
    pub fn shared(&self) -> PathBuf {
        self.dir.join("shared")
    }

    /// The volume share on the host.
    pub fn volumes(&self) -> PathBuf {
        self.dir.join("volumes")
    }

    /// What moat-vmm may touch: its sockets and console.
    fn jail_dir(&self) -> PathBuf {
        self.dir.join("jail")
    }

    /// The pid of the VMM process (while it runs): the jail helper's when jailed,
    /// which lives in the VM's network namespace and mirrors its exit.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.vmm.as_ref().map(Child::id)
    }

    /// The pid the helpers take as the parent to die with; 0: none (Detached).
    fn parent_pid(&self) -> u32 {
        match self.lifetime {
            Lifetime::TiedToCaller => std::process::id(),
            Lifetime::Detached => 0,
        }
    }

    /// The storages the guest mounts before it builds a container: the shares, and
    /// for a writable image root the disk and the overlay over the image.
    pub fn storages(&self) -> Vec<Storage> {
        let mut out = vec![Storage { source: FS_TAG.into(), fstype: "virtiofs".into(), target: GUEST_SHARED.into(), ..Default::default() }];
        if self.layout.volumes {
            out.push(Storage { source: VOL_TAG.into(), fstype: "virtiofs".into(), target: GUEST_VOLUMES.into(), ..Default::default() });
        }
        if self.layout.disk.is_some() {
            out.push(Storage {
                source: GUEST_DISK.into(),
                fstype: "ext4".into(),
                target: GUEST_SCRATCH.into(),
                // The host made the file system with lazy inode tables; do not let the
                // guest zero them in the background (it would fill the sparse image).
                options: vec!["nosuid".into(), "nodev".into(), "noinit_itable".into()],
                ..Default::default()
            });
            out.push(Storage {
                source: "overlay".into(),
                fstype: "overlay".into(),
                target: GUEST_OVERLAY_ROOT.into(),
                options: vec![
                    format!("lowerdir={GUEST_SHARED}/rootfs"),
                    format!("upperdir={GUEST_SCRATCH}/upper"),
                    format!("workdir={GUEST_SCRATCH}/work"),
                ],
                ..Default::default()
            });
        }
        out
    }

    /// The container root's path in the guest (for a sandbox started with a root).
    pub fn guest_root(&self) -> &str {
        &self.layout.root
    }

    /// `jail/`: owned by the jail's uid when jailed (the VMM creates its vsock socket
    /// and console there), root's otherwise.
    fn make_jail_dir(&self, cfg: &MoatConfig) -> Result<(), SandboxError> {
        let jail = self.jail_dir();
        std::fs::DirBuilder::new().mode(0o700).create(&jail).map_err(io_err(format!("cannot create {}", jail.display())))?;
        if cfg.jail {
            nix::unistd::chown(&jail, Some(nix::unistd::Uid::from_raw(cfg.jail_uid)), Some(nix::unistd::Gid::from_raw(cfg.jail_gid)))
                .map_err(|e| SandboxError::Io { what: format!("cannot give {} to the jail's uid", jail.display()), source: e.into() })?;
        }
        std::fs::create_dir(self.dir.join("root")).map_err(io_err("cannot create the jail's root mount point"))
    }

    /// Makes `dir` a mount of its own with shared propagation, so that mounts made
    /// under it later (in the caller's private namespace) propagate into the fs
    /// backend's namespace, whose `/` is a slave of the caller's, and on into
    /// virtiofsd's sandbox (also a slave). Nothing propagates back.
    fn share_dir(&mut self, dir: &Path) -> Result<(), SandboxError> {
        let sys = |what: String| move |e: nix::Error| SandboxError::Io { what, source: e.into() };
        mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(sys(format!("cannot bind {} on itself", dir.display())))?;
        self.mounted.push(dir.to_path_buf());
        mount(None::<&str>, dir, None::<&str>, MsFlags::MS_SHARED, None::<&str>)
            .map_err(sys(format!("cannot make {} a shared mount", dir.display())))
    }

    fn start_fs(&mut self, cfg: &MoatConfig, spec: &SandboxSpec, cgroup: Option<&Path>) -> Result<(), SandboxError> {
        let (shared, volumes) = (self.shared(), self.volumes());
        let mkdir = |p: &Path| std::fs::create_dir_all(p).map_err(io_err(format!("cannot create {}", p.display())));
        let mut root_mounts = Vec::new();
        let mut vol_mounts = Vec::new();
        mkdir(&shared)?;
        match &spec.root {
            None => {}
            Some(RootSource::Image { rootfs: path, read_only }) => {
                // The image itself is never written: a writable root is an overlay the
                // guest stacks on its own disk.
                mkdir(&shared.join("rootfs"))?;
                root_mounts.push(HostMount::Bind { source: path.clone(), target: shared.join("rootfs"), read_only: true });
                if !read_only {
                    self.make_disk(cfg, spec.disk_mib)?;
                }
            }
            Some(RootSource::Dir { path, read_only: true }) => {
                mkdir(&shared.join("rootfs"))?;
                root_mounts.push(HostMount::Bind { source: path.clone(), target: shared.join("rootfs"), read_only: true });
            }
            Some(RootSource::Dir { path, read_only: false }) => {
                // A host directory used in place is written by the guest: it is served
                // like a volume.
                mkdir(&volumes.join("rootfs"))?;
                vol_mounts.push(HostMount::Bind { source: path.clone(), target: volumes.join("rootfs"), read_only: false });
            }
        }
        self.layout.root = spec.root.as_ref().map(guest_root_for).unwrap_or_default();
        for (i, v) in spec.volumes.iter().enumerate() {
            let target = volumes.join(i.to_string());
            let meta = std::fs::metadata(&v.host).map_err(io_err(format!("volume {}", v.host.display())))?;
            mkdir(&volumes)?;
            if meta.is_dir() {
                mkdir(&target)?;
            } else {
                File::create(&target).map_err(io_err(format!("cannot create {}", target.display())))?;
            }
            vol_mounts.push(HostMount::Bind { source: v.host.clone(), target, read_only: v.read_only });
        }
        // The shim's pods get both shares from the start (virtio-mmio has no hotplug);
        // `moat run` a volume share only if it has something to put there.
        let detached = self.lifetime == Lifetime::Detached;
        self.layout.volumes = detached || !vol_mounts.is_empty();
        let jail = self.jail_dir();
        let mut backends = vec![("virtiofsd", shared.clone(), jail.join("fs.sock"), root_mounts, false)];
        if self.layout.volumes {
            mkdir(&volumes)?;
            backends.push(("virtiofsd-vol", volumes.clone(), jail.join("vol.sock"), vol_mounts, true));
        }
        for (name, dir, socket, mounts, hardened) in backends {
            if detached {
                self.share_dir(&dir)?;
            }
            let backend = FsBackend {
                parent_pid: self.parent_pid() as i32,
                virtiofsd: cfg.virtiofsd.clone(),
                socket: socket.clone(),
                shared: dir,
                shared_is_mount: detached,
                mounts,
                hardened,
                cgroup: cgroup.map(Path::to_path_buf),
            };
            self.start_backend(name, &backend)?;
            if cfg.jail {
                let (uid, gid) = (nix::unistd::Uid::from_raw(cfg.jail_uid), nix::unistd::Gid::from_raw(cfg.jail_gid));
                nix::unistd::chown(&socket, Some(uid), Some(gid))
                    .map_err(|e| SandboxError::Io { what: format!("cannot give {} to the jail's uid", socket.display()), source: e.into() })?;
            }
        }
        log::debug!("sandbox {}: virtio-fs backends up", self.id);
        Ok(())
    }

    /// Starts one virtiofsd (through the `fs` helper) and waits for its socket.
    fn start_backend(&mut self, name: &str, backend: &FsBackend) -> Result<(), SandboxError> {
        let json = serde_json::to_string(backend).map_err(|e| SandboxError::FsBackend(e.to_string()))?;
        let log_path = self.dir.join(format!("{name}.log"));
        let log = File::create(&log_path).map_err(io_err(format!("cannot create the {name} log")))?;
        let exe = std::env::current_exe().map_err(io_err("cannot find the running binary"))?;
        let child = Command::new(exe)
            .arg(HELPER_ARG)
            .arg("fs")
            .arg(json)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err(format!("cannot dup the {name} log")))?)
            .stderr(log)
            .spawn()
            .map_err(io_err("cannot start the virtio-fs backend helper"))?;
        let pid = child.id();
        self.fs.push(child);
        procs::record(&self.dir, name, pid).map_err(io_err("cannot record the virtio-fs backend's pid"))?;
        let deadline = Instant::now() + FS_START_TIMEOUT;
        while !backend.socket.exists() {
            if let Some(fs) = self.fs.last_mut() {
                if let Ok(Some(status)) = fs.try_wait() {
                    self.fs.pop();
                    return Err(SandboxError::FsBackend(format!("{name} {status}: {}", tail(&log_path, 5))));
                }
            }
            if Instant::now() > deadline {
                return Err(SandboxError::FsBackend(format!("{name}: no socket after {} s: {}", FS_START_TIMEOUT.as_secs(), tail(&log_path, 5))));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// A sparse ext4 image of `mib` MiB in `disk_dir`, the guest's writable layer: its
    /// size is the container's disk quota. The host only ever formats it; it never
    /// mounts what the guest wrote.
    fn make_disk(&mut self, cfg: &MoatConfig, mib: u32) -> Result<(), SandboxError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&cfg.disk_dir)
            .map_err(io_err(format!("cannot create {}", cfg.disk_dir.display())))?;
        let path = cfg.disk_dir.join(format!("{}.img", self.id));
        let err = |message: String| SandboxError::Disk { path: path.clone(), message };
        std::fs::write(self.dir.join(DISK_FILE), path.as_os_str().as_encoded_bytes()).map_err(io_err("cannot record the disk"))?;
        let f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(|e| err(e.to_string()))?;
        f.set_len(u64::from(mib) << 20).map_err(|e| err(e.to_string()))?;
        drop(f);
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-O", "^has_journal", "-E", "lazy_itable_init=1,nodiscard", "-L", "moat-scratch"])
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| err(format!("cannot run mkfs.ext4 (e2fsprogs): {e}")))?;
        if !out.status.success() {
            return Err(err(format!("mkfs.ext4 {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim())));
        }
        if cfg.jail {
            nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(cfg.jail_uid)), Some(nix::unistd::Gid::from_raw(cfg.jail_gid)))
                .map_err(|e| err(format!("cannot give it to the jail's uid: {e}")))?;
        }
        self.layout.disk = Some(path);
        Ok(())
    }

    fn start_vmm(&mut self, cfg: &MoatConfig, spec: &SandboxSpec, cgroup: Option<&Path>) -> Result<(), SandboxError> {
        let jail = self.jail_dir();
        let mut vm = VmConfig {
            kernel: cfg.kernel.clone(),
            initrd: Some(cfg.initrd.clone()),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            serial: SerialOutput::File(self.console.clone()),
            vsock: Some(VsockConfig { cid: 3, uds_path: self.vsock.clone() }),
            ..VmConfig::default()
        };
        vm.fs.push(FsConfig { tag: FS_TAG.into(), socket: jail.join("fs.sock") });
        if self.layout.volumes {
            vm.fs.push(FsConfig { tag: VOL_TAG.into(), socket: jail.join("vol.sock") });
        }
        if let Some(d) = &self.layout.disk {
            vm.disks.push(DiskConfig { path: d.clone(), read_only: false });
        }
        let vm_json = self.dir.join("vm.json");
        let doc = serde_json::to_string(&vm).map_err(|e| SandboxError::FsBackend(e.to_string()))?;
        std::fs::write(&vm_json, doc).map_err(io_err("cannot write the VM config"))?;
        let _ = std::fs::set_permissions(&vm_json, std::fs::Permissions::from_mode(0o644));
        let log = File::create(self.dir.join("vmm.log")).map_err(io_err("cannot create the VMM log"))?;
        let exe = std::env::current_exe().map_err(io_err("cannot find the running binary"))?;
        let mut cmd = Command::new(exe);
        cmd.arg(HELPER_ARG);
        if cfg.jail {
            let mut files = vec![JailFile { path: cfg.kernel.clone(), writable: false }, JailFile { path: vm_json.clone(), writable: false }];
            files.push(JailFile { path: cfg.initrd.clone(), writable: false });
            files.extend(self.layout.disk.iter().map(|d| JailFile { path: d.clone(), writable: true }));
            let j = VmmJail {
                parent_pid: self.parent_pid() as i32,
                vmm: cfg.vmm.clone(),
                args: vec!["--config".into(), vm_json.clone().into(), "--die-with-parent".into()],
                state_dir: self.dir.clone(),
                root: self.dir.join("root"),
                run_dir: jail,
                files,
                uid: cfg.jail_uid,
                gid: cfg.jail_gid,
                cgroup: cgroup.map(Path::to_path_buf),
            };
            cmd.arg("vmm").arg(serde_json::to_string(&j).map_err(|e| SandboxError::FsBackend(e.to_string()))?);
        } else {
            if let Some(cg) = cgroup {
                log::debug!("sandbox {}: jail off; moat-vmm stays in the caller's cgroup, not {}", self.id, cg.display());
            }
            cmd.arg("exec").arg(self.parent_pid().to_string()).arg(&cfg.vmm).arg("--config").arg(&vm_json);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err("cannot dup the VMM log"))?)
            .stderr(log)
            .spawn()
            .map_err(io_err(format!("cannot start {}", cfg.vmm.display())))?;
        let pid = child.id();
        log::debug!("sandbox {}: moat-vmm{} pid {pid}", self.id, if cfg.jail { " jail" } else { "" });
        self.vmm = Some(child);
        procs::record(&self.dir, if cfg.jail { "moat-vmm-jail" } else { "moat-vmm" }, pid).map_err(io_err("cannot record the VMM's pid"))?;
        Ok(())
    }

    /// Has the VMM exited? (Remembers the status.)
    pub fn vmm_exited(&mut self) -> Option<ExitStatus> {
        if self.vmm_status.is_none() {
            if let Some(c) = self.vmm.as_mut() {
                if let Ok(Some(s)) = c.try_wait() {
                    self.vmm_status = Some(s);
                }
            }
        }
        self.vmm_status
    }

    /// Why the VM is gone, for the user: its status and the console's last lines.
    pub fn death_report(&mut self) -> String {
        let status = self.vmm_exited().map_or("still running".to_string(), |s| s.to_string());
        let mut vmm_log = tail(&self.dir.join("vmm.log"), 5);
        if !vmm_log.is_empty() {
            vmm_log = format!("\nmoat-vmm:\n{vmm_log}");
        }
        let mut console = tail(&self.console, CONSOLE_TAIL_LINES);
        if console.is_empty() {
            console = "  (empty)".into();
        }
        format!("moat-vmm {status}; guest console:\n{console}{vmm_log}")
    }

    fn connect_agent(&mut self, boot_timeout: Duration, cancel: &Arc<AtomicBool>) -> Result<(), SandboxError> {
        let start = Instant::now();
        let stream = loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(SandboxError::Interrupted);
            }
            if let Some(status) = self.vmm_exited() {
                return Err(SandboxError::VmmExited { status: status.to_string(), console: self.diagnosis().report() });
            }
            if start.elapsed() > boot_timeout {
                return Err(SandboxError::BootTimeout { secs: boot_timeout.as_secs(), console: self.diagnosis().report() });
            }
            if self.vsock.exists() {
                // Until the agent listens, the VMM may refuse, close, or leave the
                // handshake unanswered: all mean "not yet".
                match dial(&self.vsock, AGENT_API_PORT, Duration::from_secs(2)) {
                    Ok(s) => break s,
                    Err(DialError::Refused { .. } | DialError::Connect { .. }) => {}
                    Err(DialError::Io { source, .. })
                        if matches!(source.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let agent = Agent::new(stream)?;
        let (agent_version, kernel) = agent.version()?;
        log::info!("sandbox {}: agent {agent_version} on guest kernel {kernel} after {:?}", self.id, start.elapsed());
        self.agent = Some(agent);
        self.forward_agent_log();
        Ok(())
    }

    /// Where to look when the VM goes away unasked: for a caller that outlives its
    /// hold on the sandbox (a process's exit watcher).
    pub fn diagnosis(&self) -> Diagnosis {
        Diagnosis { console: self.console.clone(), vmm_log: self.dir.join("vmm.log") }
    }

    /// Copies the agent's own log into ours (debug level), bounded.
    fn forward_agent_log(&self) {
        let (id, vsock) = (self.id.clone(), self.vsock.clone());
        std::thread::spawn(move || {
            use std::io::BufRead;
            let Ok(stream) = dial(&vsock, AGENT_LOG_PORT, Duration::from_secs(5)) else {
                log::debug!("sandbox {id}: no agent log stream");
                return;
            };
            let reader = std::io::BufReader::new(stream.take(64 << 20));
            for line in reader.split(b'\n').take(MAX_AGENT_LOG_LINES).map_while(Result::ok) {
                log::debug!("sandbox {id}: agent: {}", crate::agent::sanitize(&String::from_utf8_lossy(&line)));
            }
        });
    }

    /// The connected agent.
    pub fn agent(&self) -> Option<&Agent> {
        self.agent.as_ref()
    }

    /// The VMM's vsock socket (for stdio streams).
    pub fn vsock_path(&self) -> &Path {
        &self.vsock
    }

    /// Stops the guest (politely if the agent answers), the VMM and the fs backend,
    /// and removes the state dir. Bounded in time whatever the guest does.
    pub fn stop(&mut self) {
        if let (Some(agent), None) = (self.agent.take(), self.vmm_exited()) {
            if let Err(e) = agent.shutdown(Duration::from_secs(2)) {
                log::debug!("sandbox {}: Shutdown: {e}", self.id);
            }
        }
        if let Some(mut vmm) = self.vmm.take() {
            stop_child(&mut vmm, "moat-vmm", &self.id, SHUTDOWN_GRACE);
        }
        for mut fs in std::mem::take(&mut self.fs) {
            // virtiofsd exits when its VMM disconnects.
            stop_child(&mut fs, "virtiofsd", &self.id, Duration::from_secs(2));
        }
        for dir in std::mem::take(&mut self.mounted) {
            // Detaches whatever the caller left mounted below it, too.
            if let Err(e) = umount2(&dir, MntFlags::MNT_DETACH) {
                log::warn!("sandbox {}: cannot unmount {}: {e}", self.id, dir.display());
            }
        }
        if self.dir.exists() {
            for cg in crate::cgroup::remove_recorded(&self.dir, Duration::from_secs(2)) {
                log::warn!("sandbox {}: cgroup {} is left behind", self.id, cg.display());
            }
            remove_recorded_disk(&self.dir);
            if let Err(e) = remove_state_dir(&self.dir) {
                log::warn!("sandbox {}: {}", self.id, crate::error_chain(&e));
            }
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits up to `grace` for a child, then SIGTERM, then SIGKILL.
fn stop_child(child: &mut Child, what: &str, id: &str, grace: Duration) {
    let wait_for = |child: &mut Child, d: Duration| -> bool {
        let end = Instant::now() + d;
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return true,
                Ok(None) if Instant::now() >= end => return false,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    };
    if wait_for(child, grace) {
        return;
    }
    log::debug!("sandbox {id}: {what} still running; SIGTERM");
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    if wait_for(child, Duration::from_secs(2)) {
        return;
    }
    log::warn!("sandbox {id}: {what} ignored SIGTERM; SIGKILL");
    let _ = child.kill();
    let _ = child.wait();
}

/// The guest console's and moat-vmm's log tails of one sandbox.
#[derive(Clone, Debug)]
pub struct Diagnosis {
    console: PathBuf,
    vmm_log: PathBuf,
}

impl Diagnosis {
    /// The console's last lines, then moat-vmm's own.
    pub fn report(&self) -> String {
        let vmm = tail(&self.vmm_log, 5);
        let mut console = tail(&self.console, CONSOLE_TAIL_LINES);
        if console.is_empty() {
            console = "  (empty)".into();
        }
        if vmm.is_empty() {
            console
        } else {
            format!("{console}\nmoat-vmm:\n{vmm}")
        }
    }
}

/// The last `lines` lines of a log (its last 64 KiB at most), made printable.
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 << 10)));
    let mut buf = Vec::new();
    let _ = f.take(64 << 10).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| format!("  {}", crate::agent::sanitize(l.trim_end_matches('\r'))))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_takes_the_last_lines_printably() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("log");
        std::fs::write(&p, "a\nb\x1b[31m\nc\n").expect("write");
        assert_eq!(tail(&p, 2), "  b [31m\n  c");
        assert_eq!(tail(&d.path().join("missing"), 2), "");
    }

    #[test]
    fn stale_dirs_go_live_ones_stay() {
        let d = tempfile::tempdir().expect("tmp");
        let live = d.path().join("live");
        let dead = d.path().join("dead");
        std::fs::create_dir(&live).expect("live");
        std::fs::create_dir(&dead).expect("dead");
        let f = File::create(live.join("lock")).expect("lock");
        let _held = Flock::lock(f, FlockArg::LockExclusive).expect("flock");
        File::create(dead.join("lock")).expect("lock");
        std::fs::create_dir(d.path().join("young-unlocked")).expect("young");
        remove_stale(d.path());
        assert!(live.exists() && !dead.exists());
        assert!(d.path().join("young-unlocked").exists(), "a dir being created is not stale yet");
    }

    #[test]
    fn bad_names_and_busy_names() {
        let d = tempfile::tempdir().expect("tmp");
        let mut cfg = MoatConfig::defaults(Path::new("/nonexistent/bin"));
        cfg.state_dir = d.path().to_path_buf();
        let spec = |id: &str| SandboxSpec {
            id: id.into(),
            vcpus: 1,
            memory_mib: 128,
            root: Some(RootSource::Dir { path: d.path().into(), read_only: true }),
            volumes: vec![],
            lifetime: Lifetime::TiedToCaller,
            disk_mib: 64,
            cgroup: None,
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let e = Sandbox::start(&cfg, &spec("../x"), &cancel).err().expect("bad id");
        assert!(e.to_string().contains("sandbox name"), "{e}");
        std::fs::create_dir(d.path().join("busy")).expect("busy");
        let f = File::create(d.path().join("busy/lock")).expect("lock");
        let _held = Flock::lock(f, FlockArg::LockExclusive).expect("flock");
        assert!(matches!(Sandbox::start(&cfg, &spec("busy"), &cancel), Err(SandboxError::Busy(_))));
    }
}
