//! The Task API (containerd runtime v2, `containerd.task.v2.Task`) on a [`Pod`]:
//! requests become pod calls, [`TaskEvent`]s become containerd events published in
//! order by one thread, errors become ttrpc status codes.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use containerd_shim::api::{self, Status};
use containerd_shim::protos::cgroups_v2::metrics::{CPUStat, IOEntry, IOStat, MemoryStat, Metrics, PidsStat};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskPaused, TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageDyn};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::mount::Mount;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};
use moat_config::MoatConfig;
use moat_protocol::StatsResponse;
use moat_shim::mounts::MountSpec;
use moat_shim::pod::{CreateRequest, Pod, TaskError, TaskEvent};
use moat_shim::task::{Exit, IoPaths, TaskState};

/// The type URL containerd's `ctr task metrics` (and the CRI plugin) decode.
pub const METRICS_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";
/// Tries per event before it is given up (containerd restarting).
const PUBLISH_TRIES: u32 = 5;

/// The ttrpc status of a pod error.
pub fn to_ttrpc(e: TaskError) -> ttrpc::Error {
    let code = match &e {
        TaskError::NotFound(_) => Code::NOT_FOUND,
        TaskError::AlreadyExists(_) => Code::ALREADY_EXISTS,
        TaskError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
        TaskError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
        TaskError::Unavailable(_) => Code::UNAVAILABLE,
        TaskError::Unimplemented(_) => Code::UNIMPLEMENTED,
        TaskError::Internal(_) => Code::INTERNAL,
    };
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
}

fn result<T>(what: &str, id: &str, r: Result<T, TaskError>) -> TtrpcResult<T> {
    r.map_err(|e| {
        // containerd kills processes that already ended and deletes tasks that are
        // gone as a matter of course (the CRI plugin on every StopPodSandbox, on
        // every failed create), and takes NotFound as "done": not an error to log.
        if matches!(e, TaskError::NotFound(_)) {
            log::debug!("{id}: {what}: {e}");
        } else {
            log::error!("{id}: {what}: {e}");
        }
        to_ttrpc(e)
    })
}

fn timestamp(t: SystemTime) -> Timestamp {
    t.into()
}

fn status(s: TaskState) -> Status {
    match s {
        TaskState::Created => Status::CREATED,
        TaskState::Running => Status::RUNNING,
        TaskState::Paused => Status::PAUSED,
        TaskState::Stopped | TaskState::Deleted => Status::STOPPED,
    }
}

fn io_paths(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> IoPaths {
    IoPaths { stdin: stdin.into(), stdout: stdout.into(), stderr: stderr.into(), terminal }
}

/// containerd's cgroup v2 metrics from the guest's cgroup figures.
pub fn metrics(s: &StatsResponse) -> Metrics {
    let cpu = |k: &str| s.cpu_stat.get(k).copied().unwrap_or(0);
    let mem = |k: &str| s.memory_stat.get(k).copied().unwrap_or(0);
    let cpu = CPUStat {
        usage_usec: cpu("usage_usec"),
        user_usec: cpu("user_usec"),
        system_usec: cpu("system_usec"),
        nr_periods: cpu("nr_periods"),
        nr_throttled: cpu("nr_throttled"),
        throttled_usec: cpu("throttled_usec"),
        nr_bursts: cpu("nr_bursts"),
        burst_usec: cpu("burst_usec"),
        ..Default::default()
    };
    let memory = MemoryStat {
        anon: mem("anon"),
        file: mem("file"),
        kernel_stack: mem("kernel_stack"),
        slab: mem("slab"),
        sock: mem("sock"),
        shmem: mem("shmem"),
        file_mapped: mem("file_mapped"),
        file_dirty: mem("file_dirty"),
        file_writeback: mem("file_writeback"),
        anon_thp: mem("anon_thp"),
        inactive_anon: mem("inactive_anon"),
        active_anon: mem("active_anon"),
        inactive_file: mem("inactive_file"),
        active_file: mem("active_file"),
        unevictable: mem("unevictable"),
        slab_reclaimable: mem("slab_reclaimable"),
        slab_unreclaimable: mem("slab_unreclaimable"),
        pgfault: mem("pgfault"),
        pgmajfault: mem("pgmajfault"),
        workingset_refault: mem("workingset_refault_anon") + mem("workingset_refault_file") + mem("workingset_refault"),
        workingset_activate: mem("workingset_activate_anon") + mem("workingset_activate_file") + mem("workingset_activate"),
        workingset_nodereclaim: mem("workingset_nodereclaim"),
        pgrefill: mem("pgrefill"),
        pgscan: mem("pgscan"),
        pgsteal: mem("pgsteal"),
        pgactivate: mem("pgactivate"),
        pgdeactivate: mem("pgdeactivate"),
        pglazyfree: mem("pglazyfree"),
        pglazyfreed: mem("pglazyfreed"),
        thp_fault_alloc: mem("thp_fault_alloc"),
        thp_collapse_alloc: mem("thp_collapse_alloc"),
        usage: s.memory_current,
        // cgroup v2 "max" is reported as the largest number, as containerd does.
        usage_limit: if s.memory_max == 0 { u64::MAX } else { s.memory_max },
        swap_usage: s.swap_current,
        max_usage: s.memory_peak,
        ..Default::default()
    };
    let pids = PidsStat { current: s.pids_current, limit: s.pids_max, ..Default::default() };
    let io = IOStat {
        usage: s
            .io
            .iter()
            .map(|e| IOEntry {
                major: u64::from(e.major),
                minor: u64::from(e.minor),
                rbytes: e.rbytes,
                wbytes: e.wbytes,
                rios: e.rios,
                wios: e.wios,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    Metrics { cpu: Some(cpu).into(), memory: Some(memory).into(), pids: Some(pids).into(), io: Some(io).into(), ..Default::default() }
}

/// A containerd event for a pod event: (topic, message).
fn event(e: TaskEvent) -> (&'static str, Box<dyn MessageDyn>) {
    let exit_fields = |exit: Option<Exit>| match exit {
        Some(x) => (x.status, Some(timestamp(x.at)).into()),
        None => (0, Some(timestamp(SystemTime::now())).into()),
    };
    match e {
        TaskEvent::Create { id, bundle, rootfs, io, pid } => (
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: id,
                bundle: bundle.to_string_lossy().into_owned(),
                rootfs: rootfs
                    .into_iter()
                    .map(|m| Mount { type_: m.kind, source: m.source, options: m.options, ..Default::default() })
                    .collect(),
                io: Some(TaskIO { stdin: io.stdin, stdout: io.stdout, stderr: io.stderr, terminal: io.terminal, ..Default::default() }).into(),
                pid,
                ..Default::default()
            }),
        ),
        TaskEvent::Start { id, pid } => (topics::TASK_START_EVENT_TOPIC, Box::new(TaskStart { container_id: id, pid, ..Default::default() })),
        TaskEvent::ExecAdded { id, exec } => {
            (topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(TaskExecAdded { container_id: id, exec_id: exec, ..Default::default() }))
        }
        TaskEvent::ExecStarted { id, exec, pid } => (
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Box::new(TaskExecStarted { container_id: id, exec_id: exec, pid, ..Default::default() }),
        ),
        TaskEvent::Exit { id, exec, pid, exit } => {
            let (exit_status, exited_at) = exit_fields(Some(exit));
            // containerd tells the init process's exit by `id == container_id`.
            let id_field = if exec.is_empty() { id.clone() } else { exec };
            (topics::TASK_EXIT_EVENT_TOPIC, Box::new(TaskExit { container_id: id, id: id_field, pid, exit_status, exited_at, ..Default::default() }))
        }
        TaskEvent::Delete { id, pid, exit } => {
            let (exit_status, exited_at) = exit_fields(exit);
            (topics::TASK_DELETE_EVENT_TOPIC, Box::new(TaskDelete { container_id: id.clone(), id, pid, exit_status, exited_at, ..Default::default() }))
        }
        TaskEvent::Paused { id } => (topics::TASK_PAUSED_EVENT_TOPIC, Box::new(TaskPaused { container_id: id, ..Default::default() })),
        TaskEvent::Resumed { id } => (topics::TASK_RESUMED_EVENT_TOPIC, Box::new(TaskResumed { container_id: id, ..Default::default() })),
    }
}

/// Publishes events one at a time, in the order the pod emitted them.
fn publish_loop(rx: Receiver<TaskEvent>, publisher: RemotePublisher, namespace: String) {
    for e in rx {
        let (topic, _) = event(e.clone());
        let mut tries = 0;
        loop {
            let (_, msg) = event(e.clone());
            match publisher.publish(Default::default(), topic, &namespace, msg) {
                Ok(()) => break,
                Err(err) if tries + 1 < PUBLISH_TRIES => {
                    tries += 1;
                    log::debug!("publishing {topic}: {err}; retrying");
                    std::thread::sleep(Duration::from_millis(100 << tries));
                }
                Err(err) => {
                    log::warn!("dropping event {topic}: {err}");
                    break;
                }
            }
        }
    }
}

/// The Task service of one shim (one pod).
pub struct Service {
    pod: Arc<Pod>,
    exit: Arc<ExitSignal>,
    /// Set if the host config could not be loaded: every Create fails with it.
    config_error: Option<String>,
}

impl Service {
    pub fn new(exit: Arc<ExitSignal>, publisher: RemotePublisher, namespace: &str) -> Service {
        let (config, config_error) = match MoatConfig::load() {
            Ok(c) => (c, None),
            Err(e) => {
                let bin = std::env::current_exe().ok().and_then(|p| p.parent().map(PathBuf::from)).unwrap_or_default();
                (MoatConfig::defaults(&bin), Some(e.to_string()))
            }
        };
        let (tx, rx) = channel();
        let namespace = namespace.to_string();
        std::thread::spawn(move || publish_loop(rx, publisher, namespace));
        Service { pod: Arc::new(Pod::new(config, tx)), exit, config_error }
    }
}

impl containerd_shim::Task for Service {
    fn create(&self, _ctx: &TtrpcContext, req: api::CreateTaskRequest) -> TtrpcResult<api::CreateTaskResponse> {
        if let Some(e) = &self.config_error {
            return Err(to_ttrpc(TaskError::FailedPrecondition(e.clone())));
        }
        if !req.checkpoint.is_empty() {
            return Err(to_ttrpc(TaskError::Unimplemented("restoring from a checkpoint is not supported".into())));
        }
        let create = CreateRequest {
            id: req.id.clone(),
            bundle: PathBuf::from(&req.bundle),
            rootfs: req.rootfs.iter().map(|m| MountSpec { kind: m.type_.clone(), source: m.source.clone(), options: m.options.clone() }).collect(),
            io: io_paths(&req.stdin, &req.stdout, &req.stderr, req.terminal),
        };
        let pid = result("create", &req.id, self.pod.create(create))?;
        Ok(api::CreateTaskResponse { pid, ..Default::default() })
    }

    fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let pid = result("start", &req.id, self.pod.start(&req.id, &req.exec_id))?;
        Ok(api::StartResponse { pid, ..Default::default() })
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let spec = req.spec.as_ref().map(|a| a.value.clone()).unwrap_or_default();
        let io = io_paths(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        result("exec", &req.id, self.pod.exec(&req.id, &req.exec_id, &spec, io))?;
        Ok(api::Empty::default())
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        result("kill", &req.id, self.pod.kill(&req.id, &req.exec_id, req.signal, req.all))?;
        Ok(api::Empty::default())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let exit = result("wait", &req.id, self.pod.wait(&req.id, &req.exec_id))?;
        Ok(api::WaitResponse { exit_status: exit.status, exited_at: Some(timestamp(exit.at)).into(), ..Default::default() })
    }

    fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        let s = result("state", &req.id, self.pod.state(&req.id, &req.exec_id))?;
        let (exit_status, exited_at) = match s.snapshot.exit {
            Some(x) => (x.status, Some(timestamp(x.at)).into()),
            None => (0, None.into()),
        };
        Ok(api::StateResponse {
            id: req.id,
            exec_id: req.exec_id,
            bundle: s.bundle.to_string_lossy().into_owned(),
            pid: s.pid,
            status: status(s.snapshot.state).into(),
            stdin: s.io.stdin,
            stdout: s.io.stdout,
            stderr: s.io.stderr,
            terminal: s.io.terminal,
            exit_status,
            exited_at,
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let pids = result("pids", &req.id, self.pod.pids(&req.id))?;
        Ok(api::PidsResponse { processes: pids.into_iter().map(|pid| ProcessInfo { pid, ..Default::default() }).collect(), ..Default::default() })
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        result("pause", &req.id, self.pod.pause(&req.id))?;
        Ok(api::Empty::default())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        result("resume", &req.id, self.pod.resume(&req.id))?;
        Ok(api::Empty::default())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        result("resize pty", &req.id, self.pod.resize_pty(&req.id, &req.exec_id, req.width, req.height))?;
        Ok(api::Empty::default())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        if req.stdin {
            result("close io", &req.id, self.pod.close_stdin(&req.id, &req.exec_id))?;
        }
        Ok(api::Empty::default())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let resources = req.resources.as_ref().map(|a| a.value.clone()).unwrap_or_default();
        result("update", &req.id, self.pod.update(&req.id, resources))?;
        Ok(api::Empty::default())
    }

    fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        let s = result("stats", &req.id, self.pod.stats(&req.id))?;
        let value = metrics(&s).write_to_bytes().map_err(|e| to_ttrpc(TaskError::Internal(format!("encoding metrics: {e}"))))?;
        let any = Any { type_url: METRICS_TYPE_URL.into(), value, ..Default::default() };
        Ok(api::StatsResponse { stats: Some(any).into(), ..Default::default() })
    }

    fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        let (pid, exit) = result("delete", &req.id, self.pod.delete(&req.id, &req.exec_id))?;
        let exit = exit.unwrap_or(Exit { status: 0, at: SystemTime::now() });
        Ok(api::DeleteResponse { pid, exit_status: exit.status, exited_at: Some(timestamp(exit.at)).into(), ..Default::default() })
    }

    fn checkpoint(&self, _ctx: &TtrpcContext, req: api::CheckpointTaskRequest) -> TtrpcResult<api::Empty> {
        Err(to_ttrpc(TaskError::Unimplemented(format!("{}: checkpoint is not supported by moat", req.id))))
    }

    fn connect(&self, _ctx: &TtrpcContext, _req: api::ConnectRequest) -> TtrpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.pod.vmm_pid().unwrap_or(0),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if req.now {
            self.pod.shutdown();
        } else if !self.pod.is_empty() {
            // Other containers of the pod still use this shim.
            return Ok(api::Empty::default());
        }
        log::info!("shutting down");
        self.exit.signal();
        Ok(api::Empty::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::MessageFull;

    #[test]
    fn pod_errors_map_to_ttrpc_codes() {
        let code = |e| match to_ttrpc(e) {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
            other => panic!("not a status: {other:?}"),
        };
        assert_eq!(code(TaskError::NotFound("c1 not found".into())), (Code::NOT_FOUND, "c1 not found".into()));
        assert_eq!(code(TaskError::AlreadyExists("x".into())).0, Code::ALREADY_EXISTS);
        assert_eq!(code(TaskError::InvalidArgument("x".into())).0, Code::INVALID_ARGUMENT);
        assert_eq!(code(TaskError::FailedPrecondition("x".into())).0, Code::FAILED_PRECONDITION);
        assert_eq!(code(TaskError::Unavailable("x".into())).0, Code::UNAVAILABLE);
        assert_eq!(code(TaskError::Unimplemented("x".into())).0, Code::UNIMPLEMENTED);
        assert_eq!(code(TaskError::Internal("x".into())).0, Code::INTERNAL);
    }

    #[test]
    fn metrics_carry_the_guest_figures_under_containerds_type_url() {
        assert_eq!(Metrics::descriptor().full_name(), METRICS_TYPE_URL);
        let mut s = StatsResponse { memory_current: 5 << 20, memory_max: 0, memory_peak: 6 << 20, pids_current: 3, pids_max: 64, ..Default::default() };
        s.cpu_stat.insert("usage_usec".into(), 1234);
        s.memory_stat.insert("anon".into(), 4096);
        s.io.push(moat_protocol::IoStat { major: 254, minor: 0, rbytes: 10, ..Default::default() });
        let m = metrics(&s);
        assert_eq!(m.cpu.usage_usec, 1234);
        assert_eq!(m.memory.anon, 4096);
        assert_eq!((m.memory.usage, m.memory.usage_limit, m.memory.max_usage), (5 << 20, u64::MAX, 6 << 20));
        assert_eq!((m.pids.current, m.pids.limit), (3, 64));
        assert_eq!(m.io.usage[0].major, 254);
        let back = Metrics::parse_from_bytes(&m.write_to_bytes().expect("encode")).expect("decode");
        assert_eq!(back, m);
    }

    #[test]
    fn init_exit_is_told_by_id_equal_to_container_id() {
        let exit = Exit { status: 3, at: SystemTime::now() };
        let (topic, msg) = event(TaskEvent::Exit { id: "c1".into(), exec: String::new(), pid: 9, exit });
        assert_eq!(topic, "/tasks/exit");
        let e = TaskExit::parse_from_bytes(&msg.write_to_bytes_dyn().expect("encode")).expect("decode");
        assert_eq!((e.container_id.as_str(), e.id.as_str(), e.pid, e.exit_status), ("c1", "c1", 9, 3));
        let (_, msg) = event(TaskEvent::Exit { id: "c1".into(), exec: "e1".into(), pid: 9, exit });
        let e = TaskExit::parse_from_bytes(&msg.write_to_bytes_dyn().expect("encode")).expect("decode");
        assert_eq!(e.id, "e1");
    }
}
