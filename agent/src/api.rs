//! The agent's ttrpc API on vsock port [`AGENT_API_PORT`]: the `Agent` service of
//! protocol/proto/agent.proto. Each call validates its ids and maps its error to a
//! ttrpc code (error.rs); the work is in container.rs.

use std::sync::Arc;

use moat_protocol::{agent_ttrpc, AGENT_API_PORT, PROTOCOL_VERSION};
use moat_protocol::{
    ContainerRef, CreateContainerRequest, Empty, ExecProcessRequest, ListPidsResponse, ProcessRef, ResizePtyRequest,
    SignalProcessRequest, StartProcessResponse, StatsResponse, UpdateContainerRequest, VersionRequest,
    VersionResponse, WaitProcessResponse,
};
use ttrpc::TtrpcContext;

use crate::container;
use crate::error::AgentError;
use crate::logger::who;

struct AgentService;

/// Logs a failed call (with its ids) and converts the error for ttrpc.
fn reply<T>(what: &str, id: &str, r: Result<T, AgentError>) -> ttrpc::Result<T> {
    r.map_err(|e| {
        match &e {
            AgentError::Internal(_) => log::error!("{what} {id}: {e}"),
            _ => log::warn!("{what} {id}: {e}"),
        }
        e.into()
    })
}

impl agent_ttrpc::Agent for AgentService {
    fn version(&self, _ctx: &TtrpcContext, req: VersionRequest) -> ttrpc::Result<VersionResponse> {
        if req.host_protocol != PROTOCOL_VERSION {
            log::warn!("host speaks protocol {}, this agent {}", req.host_protocol, PROTOCOL_VERSION);
        }
        Ok(VersionResponse {
            protocol: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel_release: kernel_release(),
            ..Default::default()
        })
    }

    fn create_container(&self, _ctx: &TtrpcContext, req: CreateContainerRequest) -> ttrpc::Result<Empty> {
        reply("CreateContainer", &req.container_id, container::create(&req)).map(|_| Empty::new())
    }

    fn exec_process(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        let r = container::get(&req.container_id).and_then(|c| c.exec(&req));
        reply("ExecProcess", &who(&req.container_id, &req.exec_id), r).map(|_| Empty::new())
    }

    fn start_process(&self, _ctx: &TtrpcContext, req: ProcessRef) -> ttrpc::Result<StartProcessResponse> {
        let r = container::get(&req.container_id).and_then(|c| c.start(&req.exec_id));
        reply("StartProcess", &who(&req.container_id, &req.exec_id), r)
            .map(|pid| StartProcessResponse { pid, ..Default::default() })
    }

    fn signal_process(&self, _ctx: &TtrpcContext, req: SignalProcessRequest) -> ttrpc::Result<Empty> {
        let r = container::get(&req.container_id).and_then(|c| c.signal(&req.exec_id, req.signal, req.all));
        reply("SignalProcess", &who(&req.container_id, &req.exec_id), r).map(|_| Empty::new())
    }

    fn wait_process(&self, _ctx: &TtrpcContext, req: ProcessRef) -> ttrpc::Result<WaitProcessResponse> {
        let r = container::get(&req.container_id).and_then(|c| c.wait(&req.exec_id));
        reply("WaitProcess", &who(&req.container_id, &req.exec_id), r).map(|e| WaitProcessResponse {
            exit_status: e.status,
            exited_at_ns: e.at_ns,
            ..Default::default()
        })
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        let r = container::get(&req.container_id).and_then(|c| c.resize(&req.exec_id, req.width, req.height));
        reply("ResizePty", &who(&req.container_id, &req.exec_id), r).map(|_| Empty::new())
    }

    fn close_stdin(&self, _ctx: &TtrpcContext, req: ProcessRef) -> ttrpc::Result<Empty> {
        let r = container::get(&req.container_id).and_then(|c| c.close_stdin(&req.exec_id));
        reply("CloseStdin", &who(&req.container_id, &req.exec_id), r).map(|_| Empty::new())
    }

    fn stats(&self, _ctx: &TtrpcContext, req: ContainerRef) -> ttrpc::Result<StatsResponse> {
        let r = container::get(&req.container_id).and_then(|c| c.cgroup().stats());
        reply("Stats", &req.container_id, r)
    }

    fn list_pids(&self, _ctx: &TtrpcContext, req: ContainerRef) -> ttrpc::Result<ListPidsResponse> {
        let r = container::get(&req.container_id).and_then(|c| c.cgroup().procs());
        reply("ListPids", &req.container_id, r).map(|pids| ListPidsResponse { pids, ..Default::default() })
    }

    fn pause_container(&self, _ctx: &TtrpcContext, req: ContainerRef) -> ttrpc::Result<Empty> {
        let r = container::get(&req.container_id).and_then(|c| c.pause(true));
        reply("PauseContainer", &req.container_id, r).map(|_| Empty::new())
    }

    fn resume_container(&self, _ctx: &TtrpcContext, req: ContainerRef) -> ttrpc::Result<Empty> {
        let r = container::get(&req.container_id).and_then(|c| c.pause(false));
        reply("ResumeContainer", &req.container_id, r).map(|_| Empty::new())
    }

    fn update_container(&self, _ctx: &TtrpcContext, req: UpdateContainerRequest) -> ttrpc::Result<Empty> {
        let r = container::get(&req.container_id).and_then(|c| c.update(&req.resources));
        reply("UpdateContainer", &req.container_id, r).map(|_| Empty::new())
    }

    fn remove_container(&self, _ctx: &TtrpcContext, req: ContainerRef) -> ttrpc::Result<Empty> {
        reply("RemoveContainer", &req.container_id, container::remove(&req.container_id)).map(|_| Empty::new())
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<Empty> {
        log::info!("shutdown requested by the host");
        // Answer first: the reply must leave before the VM stops.
        std::thread::spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(200));
            crate::init::power_off(0);
        });
        Ok(Empty::new())
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Starts serving; the returned server must be kept alive. Enough worker threads
/// for many concurrent blocking calls (WaitProcess): ttrpc adds workers whenever
/// fewer than `min` are idle, and lets idle ones above `max` go.
pub fn serve() -> ttrpc::Result<ttrpc::Server> {
    let service = agent_ttrpc::create_agent(Arc::new(AgentService));
    let mut server = ttrpc::Server::new()
        .bind(&format!("vsock://-1:{AGENT_API_PORT}"))?
        .register_service(service)
        .set_thread_count_min(4)
        .set_thread_count_default(8)
        .set_thread_count_max(128);
    server.start()?;
    Ok(server)
}
