//! `moat run`: one container in a fresh microVM, attached to the terminal, with the
//! command's exit status as ours.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use moat_config::{AboveLimit, HostConfigError, MoatConfig};
use moat_protocol::{CreateContainerRequest, Stdio as ProtoStdio, StreamKind};
use nix::sys::signal::Signal;

use crate::agent::{AgentError, ProcessId};
use crate::image::{self, ImageError};
use crate::sandbox::{Lifetime, RootSource, Sandbox, SandboxError, SandboxSpec, Volume, GUEST_VOLUMES};
use crate::spec::{self, BindMount, SpecError, SpecOptions};
use crate::stdio::{copy_in, copy_out, new_secret, open_stream};
use crate::vsock::DialError;
use crate::tty;

/// Exit status for moat's own failures (as `docker run`).
pub const EXIT_MOAT_ERROR: i32 = 125;
/// The command exists but cannot be executed.
pub const EXIT_NOT_EXECUTABLE: i32 = 126;
/// The command does not exist.
pub const EXIT_NOT_FOUND: i32 = 127;
/// How long output may keep draining after the process exited before we give up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// After a forced kill (second Ctrl-C), how long to wait for the exit.
const FORCE_TIMEOUT: Duration = Duration::from_secs(10);
/// Signals moat forwards to the workload.
const FORWARDED: &[Signal] = &[Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGQUIT, Signal::SIGUSR1, Signal::SIGUSR2];

/// `moat run`'s options, already parsed.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub image: PathBuf,
    pub args: Vec<String>,
    pub vcpus: Option<u8>,
    pub memory_mib: Option<u32>,
    pub tty: bool,
    pub interactive: bool,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub read_only: bool,
    /// `HOST:CTR[:ro|rw]`
    pub volumes: Vec<String>,
    pub pids_limit: Option<i64>,
    pub name: Option<String>,
    /// The writable layer's size (MiB), the container's disk quota.
    pub disk_mib: Option<u32>,
}

/// Why a run failed before the command's own status was known.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] HostConfigError),
    #[error(transparent)]
    AboveLimit(#[from] AboveLimit),
    #[error("image {image}")]
    Image {
        image: String,
        #[source]
        source: ImageError,
    },
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("cannot create the container")]
    Create(#[source] AgentError),
    #[error("cannot attach the container's {0}")]
    Stdio(&'static str, #[source] DialError),
    #[error("{cmd}: command not found in the container ({msg})")]
    NotFound { cmd: String, msg: String },
    #[error("{cmd}: cannot execute ({msg})")]
    NotExecutable { cmd: String, msg: String },
    #[error("cannot start the command")]
    Start(#[source] AgentError),
    #[error("the VM died while the command ran: {0}")]
    VmDied(String),
    #[error("the guest agent failed while the command ran")]
    Agent(#[source] AgentError),
    #[error("the guest stopped answering after signal {0}; the VM was stopped")]
    Unresponsive(String),
    #[error("interrupted by {0} before the command started")]
    Interrupted(Signal),
}

impl RunError {
    /// The exit status `moat` reports for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::NotFound { .. } => EXIT_NOT_FOUND,
            RunError::NotExecutable { .. } => EXIT_NOT_EXECUTABLE,
            RunError::Interrupted(s) => 128 + *s as i32,
            _ => EXIT_MOAT_ERROR,
        }
    }
}

/// A parsed `-v HOST:CTR[:ro|rw]`.
pub fn parse_volume(v: &str) -> Result<(PathBuf, String, bool), RunError> {
    let bad = |why: &str| RunError::Usage(format!("invalid volume {v:?}: {why}"));
    let parts: Vec<&str> = v.split(':').collect();
    let (host, ctr, ro) = match parts[..] {
        [h, c] => (h, c, false),
        [h, c, "ro"] => (h, c, true),
        [h, c, "rw"] => (h, c, false),
        [_, _, _] => return Err(bad("the mode must be ro or rw")),
        _ => return Err(bad("want HOST:CONTAINER[:ro]")),
    };
    if !host.starts_with('/') {
        return Err(bad("the host path must be absolute"));
    }
    if !ctr.starts_with('/') || ctr.split('/').any(|c| c == "..") {
        return Err(bad("the container path must be absolute, without .."));
    }
    let host = std::fs::canonicalize(host).map_err(|e| bad(&format!("host path: {e}")))?;
    Ok((host, ctr.to_string(), ro))
}

/// The VM's vCPUs and MiB: the flags within the host's limits, else the config's
/// defaults (which the config load checked against the same limits).
pub fn vm_size(cfg: &MoatConfig, opts: &RunOptions) -> Result<(u8, u32), RunError> {
    if let Some(n) = opts.vcpus {
        cfg.max_vcpus.check("--vcpus", u64::from(n))?;
    }
    if let Some(n) = opts.memory_mib {
        cfg.max_memory_mib.check("--memory", u64::from(n))?;
    }
    Ok((opts.vcpus.unwrap_or(cfg.vcpus), opts.memory_mib.unwrap_or(cfg.memory_mib)))
}

/// A fresh random sandbox id (12 hex digits).
fn random_id() -> Result<String, RunError> {
    use std::io::Read;
    let mut b = [0u8; 6];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| RunError::Usage(format!("cannot read /dev/urandom: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

enum Event {
    Exited(Result<i32, AgentError>),
    Signal(i32),
}

/// Runs the container; returns the command's exit status.
pub fn run(cfg: &MoatConfig, opts: &RunOptions) -> Result<i32, RunError> {
    let (vcpus, memory_mib) = vm_size(cfg, opts)?;
    let (tx, rx) = mpsc::channel::<Event>();
    // Set by a signal that arrives before the command started: the run is abandoned.
    let cancel = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicBool::new(false));
    let first_signal = Arc::new(std::sync::atomic::AtomicI32::new(0));
    watch_signals(tx.clone(), cancel.clone(), started.clone(), first_signal.clone())?;
    let interrupted = |e: RunError| -> RunError {
        match Signal::try_from(first_signal.load(Ordering::Relaxed)) {
            Ok(s) if cancel.load(Ordering::SeqCst) => RunError::Interrupted(s),
            _ => e,
        }
    };

    let id = match &opts.name {
        Some(n) => n.clone(),
        None => random_id()?,
    };
    moat_protocol::validate_id("--name", &id).map_err(|e| RunError::Usage(e.to_string()))?;
    let volumes = opts.volumes.iter().map(|v| parse_volume(v)).collect::<Result<Vec<_>, _>>()?;
    // `img` holds the image's lease until the run ends, so no prune removes it.
    let img = image::prepare(&opts.image, &cfg.image_dir).map_err(|source| RunError::Image { image: opts.image.display().to_string(), source })?;
    if img.unpacked {
        image::enforce_cache_cap(&cfg.image_dir, cfg.image_cache_mib);
    }
    let root = if img.is_plain_dir() {
        RootSource::Dir { path: img.rootfs.clone(), read_only: opts.read_only }
    } else {
        RootSource::Image { rootfs: img.rootfs.clone(), read_only: opts.read_only }
    };
    let guest_root = crate::sandbox::guest_root_for(&root);
    let disk_mib = opts.disk_mib.unwrap_or(cfg.disk_mib);
    if disk_mib < moat_config::MIN_DISK_MIB {
        return Err(RunError::Usage(format!("--disk-size {disk_mib} is too small: the least is {} (MiB)", moat_config::MIN_DISK_MIB)));
    }
    if disk_mib > cfg.max_disk_mib {
        return Err(RunError::Usage(format!(
            "--disk-size {disk_mib} is above the host's limit max_disk_mib={} (set in the moat config)",
            cfg.max_disk_mib
        )));
    }
    let spec_opts = SpecOptions {
        args: opts.args.clone(),
        env: opts.env.clone(),
        workdir: opts.workdir.clone(),
        user: opts.user.clone(),
        terminal: opts.tty,
        read_only: opts.read_only,
        mounts: volumes
            .iter()
            .enumerate()
            .map(|(i, (_, ctr, ro))| BindMount { source: format!("{GUEST_VOLUMES}/{i}"), destination: ctr.clone(), read_only: *ro })
            .collect(),
        pids_limit: opts.pids_limit,
        hostname: id.chars().take(12).collect(),
        no_new_privileges: false,
        default_seccomp: cfg.default_seccomp,
    };
    let oci = spec::build(&img.config, &img.rootfs, &guest_root, &spec_opts)?;
    let cmd = oci["process"]["args"][0].as_str().unwrap_or_default().to_string();
    let sandbox_spec = SandboxSpec {
        id: id.clone(),
        vcpus,
        memory_mib,
        root: Some(root),
        volumes: volumes.iter().map(|(h, _, ro)| Volume { host: h.clone(), read_only: *ro }).collect(),
        lifetime: Lifetime::TiedToCaller,
        disk_mib,
        cgroup: Some(cfg.cgroup_parent.join(&id)),
    };
    let mut sandbox = Sandbox::start(cfg, &sandbox_spec, &cancel).map_err(|e| interrupted(e.into()))?;
    let result = run_in(&mut sandbox, &id, &oci, &cmd, opts, tx, &rx, &cancel, &started);
    let result = result.map_err(interrupted);
    let vm_alive = sandbox.vmm_exited().is_none();
    if let Some(agent) = sandbox.agent() {
        if vm_alive {
            if let Err(e) = agent.remove_container(&id) {
                log::debug!("sandbox {id}: RemoveContainer: {e}");
            }
        }
    }
    sandbox.stop();
    drop(img);
    result
}

fn watch_signals(
    tx: mpsc::Sender<Event>,
    cancel: Arc<AtomicBool>,
    started: Arc<AtomicBool>,
    first: Arc<std::sync::atomic::AtomicI32>,
) -> Result<(), RunError> {
    let mut sigs: Vec<i32> = FORWARDED.iter().map(|s| *s as i32).collect();
    sigs.push(Signal::SIGWINCH as i32);
    let mut signals = signal_hook::iterator::Signals::new(&sigs).map_err(|e| RunError::Usage(format!("cannot handle signals: {e}")))?;
    std::thread::spawn(move || {
        for s in signals.forever() {
            if s != Signal::SIGWINCH as i32 && !started.load(Ordering::SeqCst) {
                let _ = first.compare_exchange(0, s, Ordering::Relaxed, Ordering::Relaxed);
                cancel.store(true, Ordering::SeqCst);
            }
            if tx.send(Event::Signal(s)).is_err() {
                break;
            }
        }
    });
    Ok(())
}

fn dup_stdio(fd: std::os::fd::BorrowedFd<'_>) -> Result<File, RunError> {
    fd.try_clone_to_owned().map(File::from).map_err(|e| RunError::Usage(format!("cannot use moat's stdio: {e}")))
}

#[allow(clippy::too_many_arguments)]
fn run_in(
    sandbox: &mut Sandbox,
    id: &str,
    oci: &serde_json::Value,
    cmd: &str,
    opts: &RunOptions,
    tx: mpsc::Sender<Event>,
    rx: &mpsc::Receiver<Event>,
    cancel: &Arc<AtomicBool>,
    started: &Arc<AtomicBool>,
) -> Result<i32, RunError> {
    let agent = sandbox.agent().cloned().ok_or_else(|| RunError::Agent(AgentError::Disconnected("no agent".into())))?;
    let uds = sandbox.vsock_path().to_path_buf();
    let secret = new_secret().map_err(|e| RunError::Usage(format!("cannot make the stdio secret: {e}")))?;
    let stdio = ProtoStdio {
        stdin: opts.interactive,
        stdout: true,
        stderr: !opts.tty,
        secret: secret.as_bytes().to_vec(),
        ..Default::default()
    };
    let req = CreateContainerRequest {
        container_id: id.to_string(),
        spec: oci.to_string().into_bytes(),
        storages: sandbox.storages(),
        stdio: Some(stdio).into(),
        ..Default::default()
    };
    // The agent checks the program while it sets the container up.
    agent.create_container(&req).map_err(|e| match e {
        AgentError::NotFound(msg) => RunError::NotFound { cmd: cmd.to_string(), msg },
        AgentError::PermissionDenied(msg) => RunError::NotExecutable { cmd: cmd.to_string(), msg },
        other => RunError::Create(other),
    })?;
    let proc_id = ProcessId { container: id.to_string(), exec: String::new() };

    let stream = |kind, name| open_stream(&uds, id, "", kind, &secret).map_err(|e| RunError::Stdio(name, e));
    let out_stream = stream(StreamKind::Stdout, "stdout")?;
    let err_stream = if opts.tty { None } else { Some(stream(StreamKind::Stderr, "stderr")?) };
    let in_stream = if opts.interactive { Some(stream(StreamKind::Stdin, "stdin")?) } else { None };

    let stdin_fd = std::io::stdin();
    let host_tty = opts.tty && tty::is_tty(stdin_fd.as_fd());
    let resize = |agent: &crate::agent::Agent| {
        if let Some((w, h)) = tty::window_size(std::io::stdin().as_fd()).or_else(|| tty::window_size(std::io::stdout().as_fd())) {
            if let Err(e) = agent.resize_pty(&proc_id, w, h) {
                log::debug!("sandbox {id}: ResizePty: {e}");
            }
        }
    };
    if opts.tty {
        resize(&agent);
    }
    // From here on signals go to the workload; one that came earlier abandons the run.
    started.store(true, Ordering::SeqCst);
    if cancel.load(Ordering::SeqCst) {
        return Err(RunError::Start(AgentError::Internal("interrupted".into())));
    }
    if let Err(e) = agent.start_process(&proc_id) {
        return Err(match e {
            AgentError::NotFound(msg) => RunError::NotFound { cmd: cmd.to_string(), msg },
            AgentError::PermissionDenied(msg) => RunError::NotExecutable { cmd: cmd.to_string(), msg },
            other => RunError::Start(other),
        });
    }
    log::debug!("sandbox {id}: started {cmd:?}");
    let _raw = if host_tty && opts.interactive { tty::RawMode::enable(stdin_fd.as_fd()) } else { None };
    if opts.tty {
        resize(&agent); // the pty may only exist once the process started
    }

    let mut outputs: Vec<JoinHandle<std::io::Result<u64>>> = vec![copy_out(out_stream, dup_stdio(std::io::stdout().as_fd())?)];
    if let Some(s) = err_stream {
        outputs.push(copy_out(s, dup_stdio(std::io::stderr().as_fd())?));
    }
    if let Some(s) = in_stream {
        let (a, p) = (agent.clone(), proc_id.clone());
        let id = id.to_string();
        // Not joined: a terminal's stdin may never reach EOF.
        drop(copy_in(dup_stdio(stdin_fd.as_fd())?, s, move || {
            if let Err(e) = a.close_stdin(&p) {
                log::debug!("sandbox {id}: CloseStdin: {e}");
            }
        }));
    }
    {
        let (a, p) = (agent.clone(), proc_id.clone());
        std::thread::spawn(move || {
            let _ = tx.send(Event::Exited(a.wait_process(&p)));
        });
    }

    let mut interrupts = 0u32;
    let mut force_deadline: Option<Instant> = None;
    let status = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Event::Exited(Ok(code))) => break code,
            Ok(Event::Exited(Err(e))) => {
                std::thread::sleep(Duration::from_millis(200));
                if sandbox.vmm_exited().is_some() {
                    return Err(RunError::VmDied(sandbox.death_report()));
                }
                return Err(RunError::Agent(e));
            }
            Ok(Event::Signal(s)) if s == Signal::SIGWINCH as i32 => {
                if opts.tty {
                    resize(&agent);
                }
            }
            Ok(Event::Signal(s)) => {
                let name = Signal::try_from(s).map(|s| s.as_str()).unwrap_or("?");
                if s == Signal::SIGINT as i32 {
                    interrupts += 1;
                }
                let (sig, all) = if interrupts >= 2 {
                    log::info!("sandbox {id}: second interrupt: killing the container");
                    force_deadline.get_or_insert(Instant::now() + FORCE_TIMEOUT);
                    (Signal::SIGKILL as i32, true)
                } else {
                    (s, false)
                };
                if let Err(e) = agent.signal_process(&proc_id, sig, all) {
                    if sandbox.vmm_exited().is_some() {
                        return Err(RunError::VmDied(sandbox.death_report()));
                    }
                    match e {
                        AgentError::Timeout { .. } | AgentError::Disconnected(_) => return Err(RunError::Unresponsive(name.to_string())),
                        // The process may have exited meanwhile: its status is on its way.
                        other => log::debug!("sandbox {id}: SignalProcess {name}: {other}"),
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if sandbox.vmm_exited().is_some() {
                    return Err(RunError::VmDied(sandbox.death_report()));
                }
                if force_deadline.is_some_and(|d| Instant::now() > d) {
                    return Err(RunError::Unresponsive("SIGKILL".into()));
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(RunError::Agent(AgentError::Disconnected("wait thread ended".into()))),
        }
    };
    log::debug!("sandbox {id}: exited with {status}");
    // The status is only final once every output byte is out.
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while !outputs.iter().all(JoinHandle::is_finished) {
        if Instant::now() > deadline || sandbox.vmm_exited().is_some() {
            log::warn!("sandbox {id}: output did not finish draining");
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for h in outputs.into_iter().filter(JoinHandle::is_finished) {
        if let Ok(Err(e)) = h.join() {
            log::debug!("sandbox {id}: output copy: {e}");
        }
    }
    Ok(status)
}

/// Where `moat run` finds its config: `$MOAT_CONFIG` or /etc/moat/config.toml.
pub fn load_config() -> Result<MoatConfig, RunError> {
    Ok(MoatConfig::load()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_parse_and_validate() {
        let d = tempfile::tempdir().expect("tmp");
        let host = d.path().to_str().expect("utf-8");
        let (h, c, ro) = parse_volume(&format!("{host}:/data")).expect("rw");
        assert_eq!((h, c.as_str(), ro), (std::fs::canonicalize(host).expect("canon"), "/data", false));
        assert!(parse_volume(&format!("{host}:/data:ro")).expect("ro").2);
        assert!(!parse_volume(&format!("{host}:/data:rw")).expect("rw").2);
        for bad in ["rel:/data".to_string(), format!("{host}:data"), format!("{host}:/a/../b"), format!("{host}:/d:rx"), "/nonexistent-moat:/d".into(), host.to_string()] {
            let e = parse_volume(&bad).expect_err(&bad);
            assert!(e.to_string().starts_with("invalid volume"), "{e}");
        }
    }

    #[test]
    fn exit_codes_follow_docker() {
        let nf = RunError::NotFound { cmd: "x".into(), msg: "m".into() };
        assert_eq!(nf.exit_code(), 127);
        assert_eq!(RunError::NotExecutable { cmd: "x".into(), msg: "m".into() }.exit_code(), 126);
        assert_eq!(RunError::Usage("x".into()).exit_code(), 125);
        assert_eq!(RunError::VmDied("x".into()).exit_code(), 125);
        assert_eq!(RunError::Interrupted(Signal::SIGINT).exit_code(), 130);
    }

    #[test]
    fn flags_above_the_hosts_limits_are_moat_errors() {
        let host = moat_config::HostResources { cpus: 2, memory_mib: 4096 };
        let defaults = MoatConfig::defaults_on(std::path::Path::new("/opt/moat/bin"), host);
        let cfg = MoatConfig::from_toml_on(std::path::Path::new("/etc/moat/config.toml"), "max_memory_mib = 512", defaults, host)
            .expect("config");
        let opts = |vcpus, memory_mib| RunOptions { vcpus, memory_mib, ..RunOptions::default() };
        assert_eq!(vm_size(&cfg, &opts(None, None)).expect("defaults"), (1, 256));
        assert_eq!(vm_size(&cfg, &opts(Some(2), Some(512))).expect("at the limits"), (2, 512));
        let e = vm_size(&cfg, &opts(Some(3), None)).expect_err("above the host's CPUs");
        assert_eq!(e.exit_code(), EXIT_MOAT_ERROR);
        assert!(e.to_string().starts_with("--vcpus=3 is above the host's limit max_vcpus=2 (this host's online CPUs"), "{e}");
        let e = vm_size(&cfg, &opts(None, Some(1024))).expect_err("above max_memory_mib");
        assert_eq!(e.exit_code(), EXIT_MOAT_ERROR);
        assert_eq!(e.to_string(), "--memory=1024 is above the host's limit max_memory_mib=512 (set in /etc/moat/config.toml)");
    }

    #[test]
    fn random_ids_are_valid() {
        let id = random_id().expect("id");
        assert_eq!(id.len(), 12);
        moat_protocol::validate_id("id", &id).expect("valid");
    }
}
