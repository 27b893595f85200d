//! Containers and their processes: the state machine (Created -> Running -> Stopped)
//! and the operations the API exposes. Each container has its own lock, each process
//! too; the table of containers is locked only to look one up, so a slow operation on
//! one container never blocks another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use moat_protocol::validate_id;

use crate::cgroup::Cgroup;
use crate::error::{AgentError, Result};
use crate::io::ProcessIo;
use crate::logger::who;
use crate::process::{Launch, Namespaces, Pending};
use crate::reaper::{Exit, ExitCell};
use crate::seccomp::Filter;
use crate::spec::{Process, Spec};

/// A process's lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Stopped,
}

impl Status {
    /// Created -> Running; anything else is a caller error.
    pub fn start(self, who: &str) -> Result<Status> {
        match self {
            Status::Created => Ok(Status::Running),
            Status::Running => Err(AgentError::FailedPrecondition(format!("{who} is already running"))),
            Status::Stopped => Err(AgentError::FailedPrecondition(format!("{who} has already exited"))),
        }
    }

    /// Running -> Stopped (a process that never ran stops too, when removed).
    pub fn stop(self) -> Status {
        Status::Stopped
    }
}

struct ProcInner {
    status: Status,
    pid: i32,
    /// The init process between Create and Start: set up, waiting for the start byte.
    pending: Option<Pending>,
    /// An exec's launch, until StartProcess.
    launch: Option<Launch>,
}

pub struct Proc {
    who: String,
    io: Arc<ProcessIo>,
    exit: Arc<ExitCell>,
    inner: Mutex<ProcInner>,
}

impl Proc {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, ProcInner>> {
        self.inner.lock().map_err(|_| AgentError::Internal(format!("{}: state lock poisoned", self.who)))
    }

    /// The current status, counting a reaped exit as Stopped.
    pub fn status(&self) -> Result<Status> {
        let s = self.lock()?.status;
        Ok(if self.exit.get().is_some() { s.stop() } else { s })
    }

    pub fn pid(&self) -> Result<i32> {
        Ok(self.lock()?.pid)
    }
}

pub struct Container {
    id: String,
    cgroup: Cgroup,
    storages: Vec<String>,
    seccomp: Option<Filter>,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
}

#[derive(Default)]
struct Table {
    containers: HashMap<String, Arc<Container>>,
    /// Ids being created: reserved so two creates of one id cannot race.
    creating: Vec<String>,
}

fn table() -> &'static Mutex<Table> {
    static T: OnceLock<Mutex<Table>> = OnceLock::new();
    T.get_or_init(Default::default)
}

fn poisoned() -> AgentError {
    AgentError::Internal("container table poisoned".into())
}

pub fn get(id: &str) -> Result<Arc<Container>> {
    validate_id("container id", id)?;
    table()
        .lock()
        .map_err(|_| poisoned())?
        .containers
        .get(id)
        .cloned()
        .ok_or_else(|| AgentError::NotFound(format!("container {id} not found")))
}

/// Storages acquired so far, released again if creation fails halfway.
struct Acquired(Vec<String>);

impl Drop for Acquired {
    fn drop(&mut self) {
        for t in self.0.drain(..) {
            crate::storage::release(&t);
        }
    }
}

pub fn create(req: &moat_protocol::CreateContainerRequest) -> Result<()> {
    let id = req.container_id.as_str();
    validate_id("container id", id)?;
    let spec = crate::spec::parse_spec(&req.spec)?;
    for s in &req.storages {
        crate::storage::validate(s)?;
    }
    {
        let mut t = table().lock().map_err(|_| poisoned())?;
        if t.containers.contains_key(id) || t.creating.iter().any(|c| c == id) {
            return Err(AgentError::AlreadyExists(format!("container {id} already exists")));
        }
        t.creating.push(id.to_string());
    }
    let result = build(id, &spec, req);
    let mut t = table().lock().map_err(|_| poisoned())?;
    t.creating.retain(|c| c != id);
    let c = result?;
    t.containers.insert(id.to_string(), c);
    log::info!("container {id} created");
    Ok(())
}

fn build(id: &str, spec: &Spec, req: &moat_protocol::CreateContainerRequest) -> Result<Arc<Container>> {
    let mut acquired = Acquired(Vec::new());
    for s in &req.storages {
        crate::storage::acquire(s)?;
        acquired.0.push(s.target.clone());
    }
    let linux = spec.linux();
    let process = spec.process.clone().expect("validated: spec.process");
    let cgroup = Cgroup::for_container(id);
    cgroup.create()?;
    let cleanup_cgroup = |e: AgentError| {
        let _ = cgroup.kill();
        let _ = cgroup.remove(Duration::from_secs(5));
        e
    };
    if let Some(r) = &linux.resources {
        cgroup.apply(r).map_err(cleanup_cgroup)?;
    }
    let seccomp = linux.seccomp.as_ref().map(crate::seccomp::compile).transpose().map_err(cleanup_cgroup)?;
    let stdio = req.stdio.clone().unwrap_or_default();
    let size = process.console_size.map(|c| (c.height, c.width));
    let io = Arc::new(ProcessIo::new(id, "", &stdio, process.terminal, size).map_err(cleanup_cgroup)?);
    let root = spec.root.as_ref().expect("validated: spec.root");
    let launch = Launch {
        who: who(id, ""),
        process,
        cgroup: cgroup.path.display().to_string(),
        namespaces: Namespaces::Init {
            join: linux.namespaces.iter().filter_map(|n| Some((n.kind.clone(), n.path.clone()?))).collect(),
            new: linux.namespaces.iter().filter(|n| n.path.is_none()).map(|n| n.kind.clone()).collect(),
        },
        rootfs: Some(crate::mounts::RootfsPlan {
            root: root.path.clone(),
            readonly: root.readonly,
            mounts: spec.mounts.clone(),
            masked_paths: linux.masked_paths.clone(),
            readonly_paths: linux.readonly_paths.clone(),
            sysctl: linux.sysctl.clone(),
            devices: linux.devices.clone(),
            hostname: spec.hostname.clone(),
            domainname: spec.domainname.clone(),
            propagation: linux.rootfs_propagation.clone(),
        }),
        seccomp: seccomp.clone(),
    };
    crate::io::registry().insert(id, "", io.clone());
    let fds = io.take_child_fds().ok_or_else(|| AgentError::Internal("stdio already taken".into()))?;
    let pending = match crate::process::prepare(&launch, fds).and_then(|mut p| wire_console(&io, &mut p).map(|_| p)) {
        Ok(p) => p,
        Err(e) => {
            crate::io::registry().remove_container(id);
            return Err(cleanup_cgroup(e));
        }
    };
    let exit = Arc::new(ExitCell::default());
    crate::reaper::watch_with(pending.pid, exit.clone());
    let init = Arc::new(Proc {
        who: who(id, ""),
        io,
        exit,
        inner: Mutex::new(ProcInner { status: Status::Created, pid: pending.pid, pending: Some(pending), launch: None }),
    });
    Ok(Arc::new(Container {
        id: id.to_string(),
        cgroup,
        storages: std::mem::take(&mut acquired.0),
        seccomp,
        init,
        execs: Mutex::new(HashMap::new()),
    }))
}

impl Container {
    pub fn process(&self, exec_id: &str) -> Result<Arc<Proc>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        validate_id("exec id", exec_id)?;
        self.execs
            .lock()
            .map_err(|_| poisoned())?
            .get(exec_id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("{} not found", who(&self.id, exec_id))))
    }

    fn require_running(&self) -> Result<()> {
        match self.init.status()? {
            Status::Running => Ok(()),
            Status::Created => Err(AgentError::FailedPrecondition(format!("container {} is not started", self.id))),
            Status::Stopped => Err(AgentError::FailedPrecondition(format!("container {} has stopped", self.id))),
        }
    }

    pub fn exec(&self, req: &moat_protocol::ExecProcessRequest) -> Result<()> {
        let eid = req.exec_id.as_str();
        validate_id("exec id", eid)?;
        let process: Process = crate::spec::parse_process(&req.process)?;
        self.require_running()?;
        let mut execs = self.execs.lock().map_err(|_| poisoned())?;
        if execs.contains_key(eid) {
            return Err(AgentError::AlreadyExists(format!("{} already exists", who(&self.id, eid))));
        }
        let stdio = req.stdio.clone().unwrap_or_default();
        let size = process.console_size.map(|c| (c.height, c.width));
        let io = Arc::new(ProcessIo::new(&self.id, eid, &stdio, process.terminal, size)?);
        let launch = Launch {
            who: who(&self.id, eid),
            process,
            cgroup: self.cgroup.path.display().to_string(),
            namespaces: Namespaces::Exec { init_pid: self.init.pid()? },
            rootfs: None,
            seccomp: self.seccomp.clone(),
        };
        crate::io::registry().insert(&self.id, eid, io.clone());
        execs.insert(
            eid.to_string(),
            Arc::new(Proc {
                who: who(&self.id, eid),
                io,
                exit: Arc::new(ExitCell::default()),
                inner: Mutex::new(ProcInner { status: Status::Created, pid: 0, pending: None, launch: Some(launch) }),
            }),
        );
        log::info!("{} registered", who(&self.id, eid));
        Ok(())
    }

    pub fn start(&self, exec_id: &str) -> Result<u32> {
        let p = self.process(exec_id)?;
        if !exec_id.is_empty() {
            self.require_running()?;
        }
        let mut inner = p.lock()?;
        let current = if p.exit.get().is_some() { Status::Stopped } else { inner.status };
        inner.status = current.start(&p.who)?;
        let pending = match inner.pending.take() {
            Some(pending) => pending,
            None => {
                let launch = inner.launch.take().ok_or_else(|| AgentError::Internal(format!("{}: nothing to start", p.who)))?;
                let fds = p.io.take_child_fds().ok_or_else(|| AgentError::Internal(format!("{}: stdio already taken", p.who)))?;
                let pending = crate::process::prepare(&launch, fds)
                    .and_then(|mut pending| wire_console(&p.io, &mut pending).map(|_| pending))
                    .inspect_err(|_| {
                        p.exit.set(Exit { status: 255, at_ns: crate::reaper::now_ns() });
                    })?;
                inner.pid = pending.pid;
                crate::reaper::watch_with(pending.pid, p.exit.clone());
                pending
            }
        };
        let pid = inner.pid;
        match pending.start() {
            Ok(()) => {
                log::info!("{} started, pid {pid}", p.who);
                Ok(pid as u32)
            }
            // The API logs the error with the process's ids.
            Err(e) => Err(e),
        }
    }

    pub fn signal(&self, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let sig = i32::try_from(signal).ok().filter(|s| (1..=64).contains(s)).ok_or_else(|| {
            AgentError::InvalidArgument(format!("signal {signal} is not a signal number (1 to 64)"))
        })?;
        if all {
            if sig == libc::SIGKILL && self.cgroup.kill().is_ok() {
                return Ok(());
            }
            for pid in self.cgroup.procs()? {
                let _ = crate::sys::kill(pid as i32, sig);
            }
            return Ok(());
        }
        let p = self.process(exec_id)?;
        let pid = p.pid()?;
        if pid == 0 {
            return Err(AgentError::FailedPrecondition(format!("{} is not started", p.who)));
        }
        match crate::reaper::with_live(&p.exit, || crate::sys::kill(pid, sig)) {
            None => Err(AgentError::NotFound(format!("{} has already exited", p.who))),
            Some(Err(nix::Error::ESRCH)) => Err(AgentError::NotFound(format!("{} has already exited", p.who))),
            Some(Err(e)) => Err(AgentError::internal(format!("cannot signal {}", p.who), e)),
            Some(Ok(())) => {
                log::debug!("{}: sent signal {sig}", p.who);
                Ok(())
            }
        }
    }

    pub fn wait(&self, exec_id: &str) -> Result<Exit> {
        let p = self.process(exec_id)?;
        p.exit.wait().ok_or_else(|| AgentError::Internal(format!("{}: wait failed", p.who)))
    }

    pub fn close_stdin(&self, exec_id: &str) -> Result<()> {
        self.process(exec_id)?.io.close_stdin();
        Ok(())
    }

    pub fn resize(&self, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let p = self.process(exec_id)?;
        let (Ok(cols), Ok(rows)) = (u16::try_from(width), u16::try_from(height)) else {
            return Err(AgentError::InvalidArgument(format!("terminal size {width}x{height} is too large")));
        };
        p.io.resize(rows, cols)
    }

    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    pub fn pause(&self, frozen: bool) -> Result<()> {
        self.require_running()?;
        self.cgroup.freeze(frozen)?;
        log::info!("container {} {}", self.id, if frozen { "paused" } else { "resumed" });
        Ok(())
    }

    pub fn update(&self, resources: &[u8]) -> Result<()> {
        let r: crate::spec::Resources = crate::spec::parse_json("resources", resources)?;
        r.validate("resources")?;
        self.cgroup.apply(&r)
    }
}

/// Hands a terminal process's pty master (made by its helper) to its stdio; a
/// failure gives up on the process.
fn wire_console(io: &ProcessIo, pending: &mut crate::process::Pending) -> Result<()> {
    let Some(master) = pending.console.take() else { return Ok(()) };
    io.set_pty_master(master).inspect_err(|_| pending.kill())
}

/// Kills what is left of container `id`, frees its cgroup, stdio and storages.
pub fn remove(id: &str) -> Result<()> {
    let c = get(id)?;
    let _ = c.cgroup.freeze(false);
    if let Err(e) = c.cgroup.kill() {
        log::warn!("container {id}: cgroup.kill failed ({e}); signalling each process");
        for pid in c.cgroup.procs().unwrap_or_default() {
            let _ = crate::sys::kill(pid as i32, libc::SIGKILL);
        }
    }
    if let Ok(mut inner) = c.init.lock() {
        if let Some(p) = inner.pending.take() {
            p.abandon();
        }
    }
    c.cgroup.remove(Duration::from_secs(10))?;
    // The init was in the cgroup, so it is dead; give the reaper a moment to see it.
    for _ in 0..200 {
        if c.init.exit.get().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let never_ran = Exit { status: 255, at_ns: crate::reaper::now_ns() };
    if let Ok(execs) = c.execs.lock() {
        for p in execs.values() {
            if p.pid().unwrap_or(0) == 0 {
                p.exit.set(never_ran);
            }
        }
    }
    crate::io::registry().remove_container(id);
    table().lock().map_err(|_| poisoned())?.containers.remove(id);
    for t in &c.storages {
        crate::storage::release(t);
    }
    log::info!("container {id} removed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_machine() {
        assert_eq!(Status::Created.start("p"), Ok(Status::Running));
        assert!(matches!(Status::Running.start("p"), Err(AgentError::FailedPrecondition(m)) if m.contains("already running")));
        assert!(matches!(Status::Stopped.start("p"), Err(AgentError::FailedPrecondition(m)) if m.contains("exited")));
        assert_eq!(Status::Running.stop(), Status::Stopped);
        assert_eq!(Status::Created.stop(), Status::Stopped);
    }

    #[test]
    fn unknown_containers_are_not_found() {
        assert!(matches!(get("nope"), Err(AgentError::NotFound(m)) if m.contains("nope")));
        assert!(matches!(get("../x"), Err(AgentError::InvalidArgument(_))));
        assert!(matches!(remove("nope"), Err(AgentError::NotFound(_))));
    }
}
