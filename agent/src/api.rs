//! The agent's ttrpc API on vsock port [`AGENT_API_PORT`]: the `Agent` service of
//! protocol/proto/agent.proto. Each call validates its ids and maps its error to a
//! ttrpc code (error.rs); the work is in container.rs.
//!
//! Only the host may call: ttrpc accepts connections itself, so every call first
//! checks its connection's peer ([`HostOnly`]), and a call from anyone else shuts
//! the connection down before anything is done.

use std::collections::HashMap;
use std::sync::Arc;

use moat_protocol::{agent_ttrpc, AGENT_API_PORT, PROTOCOL_VERSION};
use moat_protocol::{
    ContainerRef, CreateContainerRequest, Empty, ExecProcessRequest, ListPidsResponse, ProcessRef, ResizePtyRequest,
    SignalProcessRequest, StartProcessResponse, StatsResponse, UpdateContainerRequest, VersionRequest,
    VersionResponse, WaitProcessResponse,
};
use ttrpc::{MethodHandler, TtrpcContext};

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

/// A method that runs only for the host: any other peer's connection is shut down.
struct HostOnly(Box<dyn MethodHandler + Send + Sync>);

impl MethodHandler for HostOnly {
    fn handler(&self, ctx: TtrpcContext, req: ttrpc::Request) -> ttrpc::Result<()> {
        if !crate::peer::admit(ctx.fd, AGENT_API_PORT) {
            let _ = nix::sys::socket::shutdown(ctx.fd, nix::sys::socket::Shutdown::Both);
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::PERMISSION_DENIED,
                "only the host may call the agent",
            )));
        }
        self.0.handler(ctx, req)
    }
}

/// Every method of `methods`, for the host only.
fn host_only(
    methods: HashMap<String, Box<dyn MethodHandler + Send + Sync>>,
) -> HashMap<String, Box<dyn MethodHandler + Send + Sync>> {
    methods
        .into_iter()
        .map(|(name, m)| (name, Box::new(HostOnly(m)) as Box<dyn MethodHandler + Send + Sync>))
        .collect()
}

/// Starts serving; the returned server must be kept alive. Enough worker threads
/// for many concurrent blocking calls (WaitProcess): ttrpc adds workers whenever
/// fewer than `min` are idle, and lets idle ones above `max` go.
pub fn serve() -> ttrpc::Result<ttrpc::Server> {
    let service = host_only(agent_ttrpc::create_agent(Arc::new(AgentService)));
    let mut server = ttrpc::Server::new()
        .bind(&format!("vsock://-1:{AGENT_API_PORT}"))?
        .register_service(service)
        .set_thread_count_min(4)
        .set_thread_count_default(8)
        .set_thread_count_max(128);
    server.start()?;
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Flag(Arc<AtomicBool>);

    impl MethodHandler for Flag {
        fn handler(&self, _ctx: TtrpcContext, _req: ttrpc::Request) -> ttrpc::Result<()> {
            self.0.store(true, Ordering::SeqCst);
            Ok(())
        }
    }

    /// A call on a connection whose peer is not the host never reaches the method,
    /// fails with PermissionDenied, and its connection is shut down.
    #[test]
    fn calls_from_anyone_but_the_host_are_refused_and_their_connection_shut() {
        let ran = Arc::new(AtomicBool::new(false));
        let mut m: HashMap<String, Box<dyn MethodHandler + Send + Sync>> = HashMap::new();
        m.insert("/moat.agent.v1.Agent/Version".into(), Box::new(Flag(ran.clone())));
        let methods = host_only(m);
        let (server_side, mut client_side) = std::os::unix::net::UnixStream::pair().expect("pair");
        let (res_tx, _res_rx) = std::sync::mpsc::channel();
        let cancel_rx = crossbeam::channel::never();
        let ctx = TtrpcContext {
            fd: server_side.as_raw_fd(),
            cancel_rx,
            mh: Default::default(),
            res_tx,
            metadata: HashMap::new(),
            timeout_nano: 0,
        };
        let r = methods["/moat.agent.v1.Agent/Version"].handler(ctx, ttrpc::Request::default());
        assert!(!ran.load(Ordering::SeqCst), "the method ran for a peer that is not the host");
        match r {
            Err(ttrpc::Error::RpcStatus(s)) => assert_eq!(s.code(), ttrpc::Code::PERMISSION_DENIED),
            other => panic!("{other:?}"),
        }
        use std::io::Read;
        let mut buf = [0u8; 1];
        assert_eq!(client_side.read(&mut buf).expect("EOF, not an error"), 0, "the connection is shut down");
    }
}
