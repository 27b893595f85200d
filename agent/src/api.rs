//! The agent's ttrpc API on vsock port [`AGENT_API_PORT`]: for now `Version`, which the
//! host calls first to check it speaks the same protocol.

use std::sync::Arc;

use moat_protocol::{agent_ttrpc, VersionRequest, VersionResponse, AGENT_API_PORT, PROTOCOL_VERSION};

struct AgentService;

impl agent_ttrpc::Agent for AgentService {
    fn version(&self, _ctx: &ttrpc::TtrpcContext, req: VersionRequest) -> ttrpc::Result<VersionResponse> {
        if req.host_protocol != PROTOCOL_VERSION {
            println!(
                "moat-agent: host speaks protocol {}, this agent {}",
                req.host_protocol, PROTOCOL_VERSION
            );
        }
        Ok(VersionResponse {
            protocol: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel_release: kernel_release(),
            ..Default::default()
        })
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Starts serving; the returned server must be kept alive.
pub fn serve() -> ttrpc::Result<ttrpc::Server> {
    let service = agent_ttrpc::create_agent(Arc::new(AgentService));
    let mut server = ttrpc::Server::new().bind(&format!("vsock://-1:{AGENT_API_PORT}"))?.register_service(service);
    server.start()?;
    Ok(server)
}
