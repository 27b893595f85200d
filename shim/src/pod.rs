//! A pod as a container manager drives it: one sandbox (VM) shared by its containers,
//! each with an init process and execs, every one tracked by the task state machine
//! ([`crate::task`]) and reported through [`TaskEvent`]s in the order a manager
//! expects: Create, Start, Exit (after the process's output is drained), Delete.
//!
//! Nothing here knows containerd: the shim binary's task service translates its
//! requests into these calls and these events into its messages.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use moat_config::MoatConfig;
use moat_protocol::{CreateContainerRequest, ExecProcessRequest, StatsResponse, Stdio as ProtoStdio, StdioSecret};

use crate::agent::{Agent, AgentError, ProcessId};
use crate::fifo::{attached, IoError, ProcessIo};
use crate::stdio::new_secret;
use crate::mounts::{self, MountError, MountSpec};
use crate::oci::{self, GuestLayout, OciError};
use crate::safefs::Beneath;
use crate::sandbox::{Lifetime, Sandbox, SandboxError, SandboxSpec, GUEST_SHARED, GUEST_VOLUMES};
use crate::task::{Exit, IoPaths, Process, Snapshot, StateError, TaskState};

/// Exit status reported for a process whose VM died under it (as if SIGKILLed).
pub const EXIT_VM_DIED: u32 = 137;

/// Why a request failed, by the kind a caller maps to its status codes.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// The VM or its agent is gone or not answering.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Internal(String),
}

impl TaskError {
    fn agent(what: &str, e: AgentError) -> TaskError {
        let m = format!("{what}: {e}");
        match e {
            AgentError::NotFound(_) => TaskError::NotFound(m),
            AgentError::InvalidArgument(_) => TaskError::InvalidArgument(m),
            AgentError::AlreadyExists(_) => TaskError::AlreadyExists(m),
            AgentError::FailedPrecondition(_) | AgentError::PermissionDenied(_) | AgentError::ProtocolMismatch { .. } => {
                TaskError::FailedPrecondition(m)
            }
            AgentError::Timeout { .. } | AgentError::Disconnected(_) => TaskError::Unavailable(m),
            AgentError::Internal(_) | AgentError::BadAnswer { .. } => TaskError::Internal(m),
        }
    }
}

impl From<StateError> for TaskError {
    fn from(e: StateError) -> Self {
        TaskError::FailedPrecondition(e.to_string())
    }
}

impl From<OciError> for TaskError {
    fn from(e: OciError) -> Self {
        TaskError::InvalidArgument(crate::error_chain(&e))
    }
}

impl From<MountError> for TaskError {
    fn from(e: MountError) -> Self {
        TaskError::Internal(crate::error_chain(&e))
    }
}

impl From<IoError> for TaskError {
    fn from(e: IoError) -> Self {
        match e {
            IoError::Unsupported { .. } => TaskError::Unimplemented(e.to_string()),
            IoError::Open { .. } => TaskError::InvalidArgument(crate::error_chain(&e)),
            IoError::Stream(..) => TaskError::Unavailable(crate::error_chain(&e)),
        }
    }
}

impl From<SandboxError> for TaskError {
    fn from(e: SandboxError) -> Self {
        match e {
            SandboxError::Id(_) => TaskError::InvalidArgument(e.to_string()),
            SandboxError::Busy(_) => TaskError::AlreadyExists(e.to_string()),
            _ => TaskError::Internal(format!("cannot start the VM: {}", crate::error_chain(&e))),
        }
    }
}

/// What happened, in the order it happened (the caller publishes them so).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskEvent {
    Create { id: String, bundle: PathBuf, rootfs: Vec<MountSpec>, io: IoPaths, pid: u32 },
    Start { id: String, pid: u32 },
    ExecAdded { id: String, exec: String },
    ExecStarted { id: String, exec: String, pid: u32 },
    /// `exec` is "" for the init process.
    Exit { id: String, exec: String, pid: u32, exit: Exit },
    Delete { id: String, pid: u32, exit: Option<Exit> },
    Paused { id: String },
    Resumed { id: String },
}

/// A new container.
#[derive(Clone, Debug)]
pub struct CreateRequest {
    pub id: String,
    pub bundle: PathBuf,
    /// The snapshotter's mounts; empty: the bundle's own rootfs directory.
    pub rootfs: Vec<MountSpec>,
    pub io: IoPaths,
}

/// A process and the copies of its stdio.
struct Proc {
    p: Process,
    io: ProcessIo,
}

struct Container {
    bundle: PathBuf,
    /// `shared/<id>` and `volumes/<id>` on the host.
    host_dirs: [PathBuf; 2],
    /// The pid containerd sees: the VMM's.
    pid: u32,
    init: Arc<Proc>,
    execs: BTreeMap<String, Arc<Proc>>,
}

#[derive(Default)]
struct Inner {
    pod_id: Option<String>,
    sandbox: Option<Sandbox>,
    containers: BTreeMap<String, Container>,
}

/// One pod and its containers.
pub struct Pod {
    cfg: MoatConfig,
    events: Sender<TaskEvent>,
    inner: Mutex<Inner>,
}

/// What State reports about a process.
#[derive(Clone, Debug)]
pub struct ProcessState {
    pub bundle: PathBuf,
    pub pid: u32,
    pub io: IoPaths,
    pub snapshot: Snapshot,
}

fn not_found(id: &str, exec: &str) -> TaskError {
    if exec.is_empty() {
        TaskError::NotFound(format!("container {id} not found"))
    } else {
        TaskError::NotFound(format!("exec {exec} of container {id} not found"))
    }
}

impl Pod {
    /// A pod with no VM yet; the first container boots it.
    pub fn new(cfg: MoatConfig, events: Sender<TaskEvent>) -> Pod {
        Pod { cfg, events, inner: Mutex::new(Inner::default()) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, e: TaskEvent) {
        if self.events.send(e).is_err() {
            log::warn!("the event publisher is gone");
        }
    }

    /// No containers left (the shim may exit).
    pub fn is_empty(&self) -> bool {
        self.lock().containers.is_empty()
    }

    /// The VMM's pid, if the VM runs.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.lock().sandbox.as_ref().and_then(Sandbox::vmm_pid)
    }

    /// The agent, the process and the pid containerd knows it by.
    fn find(&self, id: &str, exec: &str) -> Result<(Agent, Arc<Proc>, u32), TaskError> {
        let inner = self.lock();
        let c = inner.containers.get(id).ok_or_else(|| not_found(id, ""))?;
        let p = if exec.is_empty() { c.init.clone() } else { c.execs.get(exec).cloned().ok_or_else(|| not_found(id, exec))? };
        let agent = inner.sandbox.as_ref().and_then(|s| s.agent().cloned()).ok_or_else(|| TaskError::Unavailable("the VM is gone".into()))?;
        Ok((agent, p, c.pid))
    }

    fn agent_for(&self, id: &str) -> Result<Agent, TaskError> {
        self.find(id, "").map(|(a, _, _)| a)
    }

    /// Creates a container; boots the VM first if this is the pod's first one.
    /// Returns the pid containerd knows the task by (the VMM's).
    pub fn create(&self, req: CreateRequest) -> Result<u32, TaskError> {
        moat_protocol::validate_id("container id", &req.id).map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        let spec = oci::read_bundle_spec(&req.bundle)?;
        let pod_id = oci::pod_id(&spec, &req.id);
        let size = oci::pod_size(&spec, &self.cfg)?;
        let fallback_root = req.bundle.join(spec.get("root").and_then(|r| r.get("path")).and_then(|p| p.as_str()).unwrap_or("rootfs"));
        // The host cgroup of the pod's VM: the first container's (a CRI pod's sandbox's).
        let cgroup = match spec.get("linux").and_then(|l| l.get("cgroupsPath")).and_then(|p| p.as_str()).filter(|p| !p.is_empty()) {
            Some(p) => Some(crate::cgroup::from_cgroups_path(p).map_err(|e| TaskError::InvalidArgument(format!("spec.linux.cgroupsPath: {e}")))?),
            None => None,
        };
        let mut inner = self.lock();
        if inner.containers.contains_key(&req.id) {
            return Err(TaskError::AlreadyExists(format!("container {} already exists", req.id)));
        }
        match &inner.pod_id {
            Some(p) if *p != pod_id => {
                return Err(TaskError::InvalidArgument(format!("container {} belongs to pod {pod_id}, this shim serves pod {p}", req.id)));
            }
            _ => {}
        }
        if inner.sandbox.is_none() {
            log::info!("pod {pod_id}: booting a VM ({} vCPU, {} MiB) for container {}", size.vcpus, size.memory_mib, req.id);
            let spec = SandboxSpec {
                id: pod_id.clone(),
                vcpus: size.vcpus,
                memory_mib: size.memory_mib,
                root: None,
                volumes: Vec::new(),
                lifetime: Lifetime::Detached,
                disk_mib: self.cfg.disk_mib,
                cgroup,
            };
            inner.sandbox = Some(Sandbox::start(&self.cfg, &spec, &Arc::new(AtomicBool::new(false)))?);
            inner.pod_id = Some(pod_id.clone());
        }
        let result = self.create_in(&mut inner, &req, spec, &fallback_root);
        if result.is_err() && inner.containers.is_empty() {
            // The VM was booted for this container only.
            if let Some(mut sb) = inner.sandbox.take() {
                sb.stop();
            }
            inner.pod_id = None;
        }
        let (pid, init) = result?;
        let host_dirs = inner.sandbox.as_ref().map(|s| [s.shared().join(&req.id), s.volumes().join(&req.id)]).unwrap_or_default();
        inner.containers.insert(
            req.id.clone(),
            Container { bundle: req.bundle.clone(), host_dirs, pid, init, execs: BTreeMap::new() },
        );
        self.send(TaskEvent::Create { id: req.id.clone(), bundle: req.bundle, rootfs: req.rootfs, io: req.io, pid });
        Ok(pid)
    }

    fn create_in(&self, inner: &mut Inner, req: &CreateRequest, spec: serde_json::Value, fallback_root: &Path) -> Result<(u32, Arc<Proc>), TaskError> {
        let sb = inner.sandbox.as_mut().ok_or_else(|| TaskError::Unavailable("the VM is gone".into()))?;
        if let Some(status) = sb.vmm_exited() {
            return Err(TaskError::Unavailable(format!("the VM exited ({status})")));
        }
        let pid = sb.vmm_pid().ok_or_else(|| TaskError::Unavailable("the VM is gone".into()))?;
        let agent = sb.agent().cloned().ok_or_else(|| TaskError::Unavailable("no agent".into()))?;
        let (shared, volumes, staging) = (sb.shared(), sb.volumes(), sb.dir().join("staging"));
        let layout = GuestLayout {
            bundle: req.bundle.clone(),
            guest_dir: format!("{GUEST_SHARED}/{}", req.id),
            guest_vol_dir: format!("{GUEST_VOLUMES}/{}", req.id),
        };
        let (mut guest, binds) = oci::guest_spec(spec, &layout, self.cfg.default_seccomp)?;
        if let Some(p) = guest.get_mut("process").and_then(|p| p.as_object_mut()) {
            p.insert("terminal".into(), req.io.terminal.into());
        }
        let id = Path::new(&req.id);
        let undo_mounts = || remove_container_dirs(&req.id, &[shared.join(id), volumes.join(id)]);
        let mounted = (|| -> Result<(), TaskError> {
            let share = Beneath::open(&shared).map_err(|e| TaskError::Internal(crate::error_chain(&e)))?;
            mounts::mount_rootfs(&share, &id.join("rootfs"), &staging, &req.rootfs, fallback_root)?;
            let vols = Beneath::open(&volumes).map_err(|e| TaskError::Internal(crate::error_chain(&e)))?;
            for b in &binds {
                mounts::bind(&vols, &id.join(&b.target), &staging, &b.source, b.is_dir, b.read_only)?;
            }
            Ok(())
        })();
        if let Err(e) = mounted {
            undo_mounts();
            return Err(e);
        }
        let secret = match new_secret() {
            Ok(s) => s,
            Err(e) => {
                undo_mounts();
                return Err(TaskError::Internal(format!("cannot make the stdio secret: {e}")));
            }
        };
        let (stdin, stdout, stderr) = attached(&req.io);
        let create = CreateContainerRequest {
            container_id: req.id.clone(),
            spec: guest.to_string().into_bytes(),
            storages: sb.storages(),
            stdio: Some(ProtoStdio { stdin, stdout, stderr, secret: secret.as_bytes().to_vec(), ..Default::default() }).into(),
            ..Default::default()
        };
        if let Err(e) = agent.create_container(&create) {
            undo_mounts();
            return Err(TaskError::agent("CreateContainer", e));
        }
        let io = match Self::attach(&agent, sb.vsock_path(), &req.id, "", &secret, &req.io) {
            Ok(io) => io,
            Err(e) => {
                let _ = agent.remove_container(&req.id);
                undo_mounts();
                return Err(e);
            }
        };
        Ok((pid, Arc::new(Proc { p: Process::new(&req.id, "", req.io.clone()), io })))
    }

    fn attach(agent: &Agent, uds: &Path, id: &str, exec: &str, secret: &StdioSecret, io: &IoPaths) -> Result<ProcessIo, TaskError> {
        let (a, p) = (agent.clone(), ProcessId { container: id.to_string(), exec: exec.to_string() });
        let who = format!("{id}/{exec}");
        Ok(ProcessIo::attach(uds, id, exec, secret, io, move || {
            if let Err(e) = a.close_stdin(&p) {
                log::debug!("{who}: CloseStdin: {e}");
            }
        })?)
    }

    /// Starts the init process or an exec; returns the pid containerd knows it by.
    pub fn start(&self, id: &str, exec: &str) -> Result<u32, TaskError> {
        let (agent, proc, pid) = self.find(id, exec)?;
        proc.p.check(TaskState::Running)?;
        let guest_pid = agent
            .start_process(&ProcessId { container: id.into(), exec: exec.into() })
            .map_err(|e| TaskError::agent("StartProcess", e))?;
        proc.p.started(guest_pid)?;
        proc.io.started();
        log::info!("{id}/{exec}: started (guest pid {guest_pid})");
        self.send(if exec.is_empty() {
            TaskEvent::Start { id: id.into(), pid }
        } else {
            TaskEvent::ExecStarted { id: id.into(), exec: exec.into(), pid }
        });
        let (events, id, exec) = (self.events.clone(), id.to_string(), exec.to_string());
        let why = self.lock().sandbox.as_ref().map(|s| s.diagnosis());
        std::thread::spawn(move || watch_exit(agent, proc, events, id, exec, pid, why));
        Ok(pid)
    }

    /// Adds an exec (not started) to a running container. `process` is an OCI
    /// `process` object as JSON.
    pub fn exec(&self, id: &str, exec: &str, process: &[u8], io: IoPaths) -> Result<(), TaskError> {
        moat_protocol::validate_id("exec id", exec).map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        let mut process: serde_json::Value =
            serde_json::from_slice(process).map_err(|e| TaskError::InvalidArgument(format!("exec {exec}: the process spec is not valid JSON: {e}")))?;
        if let Some(p) = process.as_object_mut() {
            p.insert("terminal".into(), io.terminal.into());
        }
        let mut inner = self.lock();
        let uds = inner.sandbox.as_ref().map(|s| s.vsock_path().to_path_buf()).ok_or_else(|| TaskError::Unavailable("the VM is gone".into()))?;
        let agent = inner.sandbox.as_ref().and_then(|s| s.agent().cloned()).ok_or_else(|| TaskError::Unavailable("no agent".into()))?;
        let c = inner.containers.get_mut(id).ok_or_else(|| not_found(id, ""))?;
        if c.execs.contains_key(exec) {
            return Err(TaskError::AlreadyExists(format!("exec {exec} already exists in container {id}")));
        }
        let state = c.init.p.state();
        if state != TaskState::Running {
            return Err(TaskError::FailedPrecondition(format!("container {id} is {state:?}, not Running: cannot exec in it")));
        }
        let secret = new_secret().map_err(|e| TaskError::Internal(format!("cannot make the stdio secret: {e}")))?;
        let (stdin, stdout, stderr) = attached(&io);
        let req = ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec.into(),
            process: process.to_string().into_bytes(),
            stdio: Some(ProtoStdio { stdin, stdout, stderr, secret: secret.as_bytes().to_vec(), ..Default::default() }).into(),
            ..Default::default()
        };
        agent.exec_process(&req).map_err(|e| TaskError::agent("ExecProcess", e))?;
        let pio = Self::attach(&agent, &uds, id, exec, &secret, &io)?;
        c.execs.insert(exec.to_string(), Arc::new(Proc { p: Process::new(id, exec, io), io: pio }));
        drop(inner);
        self.send(TaskEvent::ExecAdded { id: id.into(), exec: exec.into() });
        Ok(())
    }

    /// Sends `signal` to a process (`all`: every process of the container).
    pub fn kill(&self, id: &str, exec: &str, signal: u32, all: bool) -> Result<(), TaskError> {
        let (agent, proc, pid) = self.find(id, exec)?;
        let signal = i32::try_from(signal).map_err(|_| TaskError::InvalidArgument(format!("signal {signal}")))?;
        match proc.p.state() {
            TaskState::Stopped | TaskState::Deleted => Err(TaskError::NotFound(format!("{id}/{exec}: process already finished"))),
            TaskState::Created => {
                // Never started: it ends here, as a runtime's killed init would.
                let exit = Exit { status: 128 + signal.clamp(0, 127) as u32, at: SystemTime::now() };
                proc.p.exited_then(exit, || self.send(TaskEvent::Exit { id: id.into(), exec: exec.into(), pid, exit }))?;
                Ok(())
            }
            TaskState::Running | TaskState::Paused => agent
                .signal_process(&ProcessId { container: id.into(), exec: exec.into() }, signal, all)
                .map_err(|e| TaskError::agent("SignalProcess", e)),
        }
    }

    /// Blocks until the process has exited.
    pub fn wait(&self, id: &str, exec: &str) -> Result<Exit, TaskError> {
        let (_, proc, _) = self.find(id, exec)?;
        proc.p.wait(None).ok_or_else(|| TaskError::Internal("wait ended without an exit".into()))
    }

    pub fn state(&self, id: &str, exec: &str) -> Result<ProcessState, TaskError> {
        let inner = self.lock();
        let c = inner.containers.get(id).ok_or_else(|| not_found(id, ""))?;
        let p = if exec.is_empty() { &c.init } else { c.execs.get(exec).ok_or_else(|| not_found(id, exec))? };
        Ok(ProcessState { bundle: c.bundle.clone(), pid: c.pid, io: p.p.io.clone(), snapshot: p.p.snapshot() })
    }

    /// Guest pids of the container's processes.
    pub fn pids(&self, id: &str) -> Result<Vec<u32>, TaskError> {
        self.agent_for(id)?.list_pids(id).map_err(|e| TaskError::agent("ListPids", e))
    }

    pub fn pause(&self, id: &str) -> Result<(), TaskError> {
        let (agent, proc, _) = self.find(id, "")?;
        proc.p.check(TaskState::Paused)?;
        agent.pause(id).map_err(|e| TaskError::agent("PauseContainer", e))?;
        proc.p.set(TaskState::Paused)?;
        self.send(TaskEvent::Paused { id: id.into() });
        Ok(())
    }

    pub fn resume(&self, id: &str) -> Result<(), TaskError> {
        let (agent, proc, _) = self.find(id, "")?;
        if proc.p.state() != TaskState::Paused {
            return Err(TaskError::FailedPrecondition(format!("container {id} is not paused")));
        }
        agent.resume(id).map_err(|e| TaskError::agent("ResumeContainer", e))?;
        proc.p.set(TaskState::Running)?;
        self.send(TaskEvent::Resumed { id: id.into() });
        Ok(())
    }

    pub fn resize_pty(&self, id: &str, exec: &str, width: u32, height: u32) -> Result<(), TaskError> {
        let (agent, _, _) = self.find(id, exec)?;
        agent
            .resize_pty(&ProcessId { container: id.into(), exec: exec.into() }, width, height)
            .map_err(|e| TaskError::agent("ResizePty", e))
    }

    /// Ends the process's stdin once what was written is delivered.
    pub fn close_stdin(&self, id: &str, exec: &str) -> Result<(), TaskError> {
        let (agent, proc, _) = self.find(id, exec)?;
        if proc.p.io.stdin.is_empty() {
            // Nothing attached: tell the agent directly.
            return agent.close_stdin(&ProcessId { container: id.into(), exec: exec.into() }).map_err(|e| TaskError::agent("CloseStdin", e));
        }
        proc.io.close_stdin();
        Ok(())
    }

    pub fn stats(&self, id: &str) -> Result<StatsResponse, TaskError> {
        self.agent_for(id)?.stats(id).map_err(|e| TaskError::agent("Stats", e))
    }

    /// Applies an OCI `linux.resources` object (JSON).
    pub fn update(&self, id: &str, resources: Vec<u8>) -> Result<(), TaskError> {
        serde_json::from_slice::<serde_json::Value>(&resources)
            .map_err(|e| TaskError::InvalidArgument(format!("the resources are not valid JSON: {e}")))?;
        self.agent_for(id)?.update(id, resources).map_err(|e| TaskError::agent("UpdateContainer", e))
    }

    /// Deletes an exec, or a container with everything it had in the guest and on the
    /// host; the last container takes the VM with it. Returns (pid, exit).
    pub fn delete(&self, id: &str, exec: &str) -> Result<(u32, Option<Exit>), TaskError> {
        let mut inner = self.lock();
        let c = inner.containers.get_mut(id).ok_or_else(|| not_found(id, ""))?;
        let pid = c.pid;
        if !exec.is_empty() {
            let p = c.execs.get(exec).ok_or_else(|| not_found(id, exec))?;
            p.p.set(TaskState::Deleted)?;
            let exit = p.p.snapshot().exit;
            c.execs.remove(exec);
            return Ok((pid, exit));
        }
        c.init.p.set(TaskState::Deleted)?;
        let Some(c) = inner.containers.remove(id) else { return Err(not_found(id, "")) };
        let exit = c.init.p.snapshot().exit;
        if let Some(sb) = inner.sandbox.as_mut() {
            if sb.vmm_exited().is_none() {
                if let Some(agent) = sb.agent() {
                    if let Err(e) = agent.remove_container(id) {
                        log::warn!("{id}: RemoveContainer: {e}");
                    }
                }
            }
        }
        remove_container_dirs(id, &c.host_dirs);
        if inner.containers.is_empty() {
            if let Some(mut sb) = inner.sandbox.take() {
                log::info!("pod {}: last container deleted; stopping the VM", sb.id);
                sb.stop();
            }
            inner.pod_id = None;
        }
        drop(inner);
        self.send(TaskEvent::Delete { id: id.into(), pid, exit });
        Ok((pid, exit))
    }

    /// Stops the VM and everything of the pod (the shim is going away).
    pub fn shutdown(&self) {
        let mut inner = self.lock();
        for c in std::mem::take(&mut inner.containers).into_values() {
            for d in &c.host_dirs {
                mounts::unmount_under(d);
            }
        }
        if let Some(mut sb) = inner.sandbox.take() {
            sb.stop();
        }
    }
}

/// Unmounts everything below a container's dirs in the shares and removes them,
/// never entering a mount that is still there (or that the guest renamed in).
fn remove_container_dirs(id: &str, dirs: &[PathBuf]) {
    for dir in dirs {
        let n = mounts::unmount_under(dir);
        log::debug!("{id}: {n} host mounts removed below {}", dir.display());
        let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else { continue };
        match Beneath::open(parent).and_then(|b| b.remove(Path::new(name))) {
            Ok(0) => {}
            Ok(left) => log::warn!("{id}: {left} mount point(s) left below {}", dir.display()),
            Err(e) => log::warn!("{id}: {}", crate::error_chain(&e)),
        }
    }
}

/// Waits for a started process to exit, then for its output to be written out, and
/// only then reports the exit: the event and the state change happen together
/// ([`crate::task::Process::exited_then`]), so a Delete is always published after the
/// exit, and a client that deletes as soon as it hears of it is never refused.
fn watch_exit(
    agent: Agent,
    proc: Arc<Proc>,
    events: Sender<TaskEvent>,
    id: String,
    exec: String,
    pid: u32,
    why: Option<crate::sandbox::Diagnosis>,
) {
    let status = match agent.wait_process(&ProcessId { container: id.clone(), exec: exec.clone() }) {
        Ok(s) => u32::try_from(s).unwrap_or(EXIT_VM_DIED),
        Err(e) => {
            // The console says whether the guest died (a panic, a reset) or only the agent.
            let report = why.map(|d| format!("; the guest console's tail:\n{}", d.report())).unwrap_or_default();
            log::warn!("{id}/{exec}: lost the process ({e}); reporting it killed{report}");
            EXIT_VM_DIED
        }
    };
    proc.io.drain();
    let exit = Exit { status, at: SystemTime::now() };
    log::info!("{id}/{exec}: exited with status {status}");
    if let Err(e) = proc.p.exited_then(exit, || {
        let _ = events.send(TaskEvent::Exit { id: id.clone(), exec: exec.clone(), pid, exit });
    }) {
        // Killed before it started and reported then: nothing more to say.
        log::debug!("{id}/{exec}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_errors_keep_their_kind() {
        let k = |e| TaskError::agent("X", e);
        assert!(matches!(k(AgentError::NotFound("a".into())), TaskError::NotFound(m) if m == "X: not found: a"));
        assert!(matches!(k(AgentError::InvalidArgument("a".into())), TaskError::InvalidArgument(_)));
        assert!(matches!(k(AgentError::AlreadyExists("a".into())), TaskError::AlreadyExists(_)));
        assert!(matches!(k(AgentError::FailedPrecondition("a".into())), TaskError::FailedPrecondition(_)));
        assert!(matches!(k(AgentError::PermissionDenied("a".into())), TaskError::FailedPrecondition(_)));
        assert!(matches!(k(AgentError::Disconnected("a".into())), TaskError::Unavailable(_)));
        assert!(matches!(k(AgentError::Timeout { call: "x", secs: 1 }), TaskError::Unavailable(_)));
        assert!(matches!(k(AgentError::Internal("a".into())), TaskError::Internal(_)));
        let s: TaskError = StateError { from: TaskState::Stopped, to: TaskState::Running }.into();
        assert!(matches!(s, TaskError::FailedPrecondition(_)));
        let u: TaskError = IoError::Unsupported { what: "stdout", uri: "binary:///x".into(), why: "no" }.into();
        assert!(matches!(u, TaskError::Unimplemented(_)));
    }

    #[test]
    fn unknown_containers_and_bad_ids_without_a_vm() {
        let (tx, _rx) = std::sync::mpsc::channel();
        let pod = Pod::new(MoatConfig::defaults(Path::new("/nonexistent/bin")), tx);
        assert!(matches!(pod.state("c1", ""), Err(TaskError::NotFound(_))));
        assert!(matches!(pod.start("c1", ""), Err(TaskError::NotFound(_))));
        assert!(matches!(pod.kill("c1", "", 9, false), Err(TaskError::NotFound(_))));
        assert!(matches!(pod.delete("c1", ""), Err(TaskError::NotFound(_))));
        let req = CreateRequest { id: "../x".into(), bundle: "/nonexistent".into(), rootfs: vec![], io: IoPaths::default() };
        assert!(matches!(pod.create(req), Err(TaskError::InvalidArgument(_))));
        let req = CreateRequest { id: "c1".into(), bundle: "/nonexistent".into(), rootfs: vec![], io: IoPaths::default() };
        let e = pod.create(req).expect_err("no bundle");
        assert!(matches!(&e, TaskError::InvalidArgument(m) if m.contains("config.json")), "{e:?}");
        assert!(pod.is_empty());
    }

    #[test]
    fn a_pod_above_the_hosts_limit_is_an_invalid_argument() {
        let host = moat_config::HostResources { cpus: 2, memory_mib: 4096 };
        let cfg = MoatConfig::from_toml_on(
            Path::new("/etc/moat/config.toml"),
            "max_vcpus = 1",
            MoatConfig::defaults_on(Path::new("/nonexistent/bin"), host),
            host,
        )
        .expect("config");
        let (tx, _rx) = std::sync::mpsc::channel();
        let pod = Pod::new(cfg, tx);
        let bundle = tempfile::tempdir().expect("bundle");
        let spec = serde_json::json!({"annotations": {oci::VCPUS_ANNOTATION: "2"}, "process": {"args": ["true"]}});
        std::fs::write(bundle.path().join("config.json"), spec.to_string()).expect("config.json");
        let req = CreateRequest { id: "c1".into(), bundle: bundle.path().into(), rootfs: vec![], io: IoPaths::default() };
        let e = pod.create(req).expect_err("above max_vcpus");
        assert!(
            matches!(&e, TaskError::InvalidArgument(m) if m == "io.moat.vcpus=2 is above the host's limit max_vcpus=1 (set in /etc/moat/config.toml)"),
            "{e:?}"
        );
        assert!(pod.is_empty() && pod.vmm_pid().is_none(), "nothing was started");
    }
}
