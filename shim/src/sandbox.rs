//! One sandbox: a state directory, the virtio-fs backend serving its shared
//! directory, a microVM, and the agent inside it.
//!
//! `<state_dir>/<id>/` holds a lock file (flocked while the sandbox lives), the VM's
//! config, vsock and fs sockets, logs, the pids of its host processes ([`procs`]),
//! and `shared/`, which the guest mounts as one virtio-fs.
//!
//! Two lifetimes ([`Lifetime`]):
//! - `moat run` ties the sandbox to itself: `shared/` holds `rootfs` and `vol/N`,
//!   mounted only in the fs backend's private mount namespace, and the backend and
//!   the VMM die with the process that started them (PR_SET_PDEATHSIG).
//! - The containerd shim detaches it: containers come and go while the VM runs, so
//!   the shim mounts their roots under `shared/` later, from its own private mount
//!   namespace, and `shared/` is made a shared mount that the fs backend's namespace
//!   receives them from. The VMM and the backend are not tied to the shim.
//!
//! A directory whose lock is free belongs to a dead owner: the next start (or
//! `containerd-shim-moat-v2 delete`) stops its recorded processes and removes it.
//! Dropping a [`Sandbox`] stops everything and removes the directory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moat_config::{MoatConfig, SerialOutput, VmConfig, VsockConfig};
use moat_protocol::{AGENT_API_PORT, AGENT_LOG_PORT};
use nix::fcntl::{Flock, FlockArg};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::agent::{Agent, AgentError};
use crate::helper::{FsBackend, HostMount, HELPER_ARG};
use crate::procs;
use crate::vsock::{dial, DialError};

/// The virtio-fs tag of the sandbox's shared directory.
pub const FS_TAG: &str = "moatfs";
/// Where the agent mounts the shared directory in the guest.
pub const GUEST_SHARED: &str = "/run/moat/shared";
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
    fs: Option<Child>,
    agent: Option<Agent>,
    vmm_status: Option<ExitStatus>,
    lifetime: Lifetime,
    /// `shared/` is bind-mounted on itself (Detached): unmount it on stop.
    shared_mounted: bool,
    _lock: Flock<File>,
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
    // Where the owner mounted shared/ in the host's namespace by mistake, do not
    // descend into a mount: detach it first.
    let shared = dir.join("shared");
    let _ = umount2(&shared, MntFlags::MNT_DETACH);
    std::fs::remove_dir_all(dir).map_err(io_err(format!("cannot remove {}", dir.display())))
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
        let mut sb = Sandbox {
            id: spec.id.clone(),
            vsock: dir.join("vsock.sock"),
            console: dir.join("console.log"),
            dir,
            vmm: None,
            fs: None,
            agent: None,
            vmm_status: None,
            lifetime: spec.lifetime,
            shared_mounted: false,
            _lock: lock,
        };
        // On error, Drop tears down whatever was started.
        sb.start_fs(cfg, spec)?;
        sb.start_vmm(cfg, spec)?;
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

    /// The pid of the VMM process (while it runs).
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

    /// Makes `shared/` a mount of its own with shared propagation, so that mounts made
    /// under it later (in the caller's private namespace) propagate into the fs
    /// backend's namespace, whose `/` is a slave of the caller's, and on into
    /// virtiofsd's sandbox (also a slave). Nothing propagates back.
    fn share_shared(&mut self) -> Result<(), SandboxError> {
        let shared = self.shared();
        let sys = |what: String| move |e: nix::Error| SandboxError::Io { what, source: e.into() };
        mount(Some(&shared), &shared, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(sys(format!("cannot bind {} on itself", shared.display())))?;
        self.shared_mounted = true;
        mount(None::<&str>, &shared, None::<&str>, MsFlags::MS_SHARED, None::<&str>)
            .map_err(sys(format!("cannot make {} a shared mount", shared.display())))
    }

    fn start_fs(&mut self, cfg: &MoatConfig, spec: &SandboxSpec) -> Result<(), SandboxError> {
        let shared = self.shared();
        let mkdir = |p: &Path| std::fs::create_dir_all(p).map_err(io_err(format!("cannot create {}", p.display())));
        mkdir(&shared)?;
        if self.lifetime == Lifetime::Detached {
            self.share_shared()?;
        }
        let mut mounts = Vec::new();
        let rootfs = shared.join("rootfs");
        if spec.root.is_some() {
            mkdir(&rootfs)?;
        }
        match &spec.root {
            None => {}
            Some(RootSource::Image { rootfs: lower, read_only: false }) => {
                let (upper, work) = (self.dir.join("upper"), self.dir.join("work"));
                mkdir(&upper)?;
                mkdir(&work)?;
                // The upper dir's root carries the rootfs's own mode (the image's `/`).
                if let Ok(m) = lower.metadata() {
                    let _ = std::fs::set_permissions(&upper, std::fs::Permissions::from_mode(m.permissions().mode()));
                }
                mounts.push(HostMount::Overlay { lower: lower.clone(), upper, work, target: rootfs.clone() });
            }
            Some(RootSource::Image { rootfs: path, read_only }) | Some(RootSource::Dir { path, read_only }) => {
                mounts.push(HostMount::Bind { source: path.clone(), target: rootfs.clone(), read_only: *read_only });
            }
        }
        for (i, v) in spec.volumes.iter().enumerate() {
            let target = shared.join("vol").join(i.to_string());
            let meta = std::fs::metadata(&v.host).map_err(io_err(format!("volume {}", v.host.display())))?;
            if meta.is_dir() {
                mkdir(&target)?;
            } else {
                mkdir(target.parent().unwrap_or(&shared))?;
                File::create(&target).map_err(io_err(format!("cannot create {}", target.display())))?;
            }
            mounts.push(HostMount::Bind { source: v.host.clone(), target, read_only: v.read_only });
        }
        let socket = self.dir.join("fs.sock");
        let backend = FsBackend {
            parent_pid: self.parent_pid() as i32,
            virtiofsd: cfg.virtiofsd.clone(),
            socket: socket.clone(),
            shared,
            mounts,
        };
        let json = serde_json::to_string(&backend).map_err(|e| SandboxError::FsBackend(e.to_string()))?;
        let log_path = self.dir.join("virtiofsd.log");
        let log = File::create(&log_path).map_err(io_err("cannot create the virtiofsd log"))?;
        let exe = std::env::current_exe().map_err(io_err("cannot find the running binary"))?;
        let child = Command::new(exe)
            .arg(HELPER_ARG)
            .arg("fs")
            .arg(json)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err("cannot dup the virtiofsd log"))?)
            .stderr(log)
            .spawn()
            .map_err(io_err("cannot start the virtio-fs backend helper"))?;
        let pid = child.id();
        self.fs = Some(child);
        procs::record(&self.dir, "virtiofsd", pid).map_err(io_err("cannot record the virtio-fs backend's pid"))?;
        let deadline = Instant::now() + FS_START_TIMEOUT;
        while !socket.exists() {
            if let Some(fs) = self.fs.as_mut() {
                if let Ok(Some(status)) = fs.try_wait() {
                    self.fs = None;
                    return Err(SandboxError::FsBackend(format!("{status}: {}", tail(&log_path, 5))));
                }
            }
            if Instant::now() > deadline {
                return Err(SandboxError::FsBackend(format!("no socket after {} s: {}", FS_START_TIMEOUT.as_secs(), tail(&log_path, 5))));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        log::debug!("sandbox {}: virtio-fs backend up", self.id);
        Ok(())
    }

    fn start_vmm(&mut self, cfg: &MoatConfig, spec: &SandboxSpec) -> Result<(), SandboxError> {
        let vm = VmConfig {
            kernel: cfg.kernel.clone(),
            initrd: Some(cfg.initrd.clone()),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            serial: SerialOutput::File(self.console.clone()),
            vsock: Some(VsockConfig { cid: 3, uds_path: self.vsock.clone() }),
            ..VmConfig::default()
        };
        let mut doc = serde_json::to_value(&vm).map_err(|e| SandboxError::FsBackend(e.to_string()))?;
        doc["fs"] = serde_json::json!([{"tag": FS_TAG, "socket": self.dir.join("fs.sock")}]);
        let vm_json = self.dir.join("vm.json");
        std::fs::write(&vm_json, doc.to_string()).map_err(io_err("cannot write the VM config"))?;
        let log = File::create(self.dir.join("vmm.log")).map_err(io_err("cannot create the VMM log"))?;
        let exe = std::env::current_exe().map_err(io_err("cannot find the running binary"))?;
        let child = Command::new(exe)
            .arg(HELPER_ARG)
            .arg("exec")
            .arg(self.parent_pid().to_string())
            .arg(&cfg.vmm)
            .arg("--config")
            .arg(&vm_json)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err("cannot dup the VMM log"))?)
            .stderr(log)
            .spawn()
            .map_err(io_err(format!("cannot start {}", cfg.vmm.display())))?;
        let pid = child.id();
        log::debug!("sandbox {}: moat-vmm pid {pid}", self.id);
        self.vmm = Some(child);
        procs::record(&self.dir, "moat-vmm", pid).map_err(io_err("cannot record the VMM's pid"))?;
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
                return Err(SandboxError::VmmExited { status: status.to_string(), console: self.console_and_vmm_log() });
            }
            if start.elapsed() > boot_timeout {
                return Err(SandboxError::BootTimeout { secs: boot_timeout.as_secs(), console: self.console_and_vmm_log() });
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

    fn console_and_vmm_log(&self) -> String {
        let vmm = tail(&self.dir.join("vmm.log"), 5);
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
        if let Some(mut fs) = self.fs.take() {
            // virtiofsd exits when its VMM disconnects.
            stop_child(&mut fs, "virtiofsd", &self.id, Duration::from_secs(2));
        }
        if std::mem::take(&mut self.shared_mounted) {
            // Detaches whatever the caller left mounted below it, too.
            if let Err(e) = umount2(&self.shared(), MntFlags::MNT_DETACH) {
                log::warn!("sandbox {}: cannot unmount {}: {e}", self.id, self.shared().display());
            }
        }
        if self.dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                log::warn!("sandbox {}: cannot remove {}: {e}", self.id, self.dir.display());
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
