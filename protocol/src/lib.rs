//! moat's host <-> agent protocol: the `Agent` ttrpc service (proto/agent.proto),
//! served by moat-agent on a vsock port and called by the host through the VMM's
//! hybrid vsock socket.
#![forbid(unsafe_code)]

/// The protocol number both sides must agree on; bump it on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;
/// The guest vsock port the agent serves the API on.
pub const AGENT_API_PORT: u32 = 1024;

#[allow(warnings, clippy::all, clippy::unwrap_used, clippy::undocumented_unsafe_blocks)]
// Generated code: its style is protobuf-codegen's, not ours.
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

#[allow(warnings, clippy::all, clippy::unwrap_used, clippy::undocumented_unsafe_blocks)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

pub use agent::{VersionRequest, VersionResponse};
pub use agent_ttrpc::{create_agent, Agent, AgentClient};

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::Message;

    #[test]
    fn version_round_trips_on_the_wire() {
        let v = VersionResponse {
            protocol: PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            kernel_release: "6.1.192".into(),
            ..Default::default()
        };
        let bytes = v.write_to_bytes().expect("encode");
        let back = VersionResponse::parse_from_bytes(&bytes).expect("decode");
        assert_eq!(back, v);
    }

    #[test]
    fn garbage_is_a_decode_error_not_a_panic() {
        assert!(VersionResponse::parse_from_bytes(&[0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
    }
}
