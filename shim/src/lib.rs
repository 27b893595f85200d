//! moat's host-side runtime: everything between a user (the `moat` tool, later
//! containerd) and one sandbox — a microVM with moat-agent inside.
//!
//! [`image`] turns an image into a root directory, [`spec`] builds the OCI runtime
//! spec the agent reads, [`sandbox`] starts the fs backend and the VMM and dials the
//! agent, [`agent`] and [`stdio`] talk to it, and [`run`] ties them into `moat run`.
//! Both give a container without a seccomp profile moat's default one ([`seccomp`]).
//! For a container manager, [`pod`] runs containers from OCI bundles ([`oci`],
//! [`mounts`]) in one shared sandbox, tracks each process with the [`task`] state
//! machine and copies its stdio to the manager's FIFOs ([`fifo`]); [`procs`] records
//! the host processes so a dead owner's sandbox can be cleaned up.
//! Nothing here knows containerd: only the `containerd-shim-moat-v2` binary does.
#![forbid(unsafe_code)]

pub mod image;
pub mod spec;
pub mod user;
pub mod agent;
pub mod containerd_config;
pub mod doctor;
pub mod fifo;
pub mod fsguard;
pub mod helper;
pub mod jail;
pub mod mounts;
pub mod oci;
pub mod pod;
pub mod procs;
pub mod cgroup;
pub mod run;
pub mod safefs;
pub mod sandbox;
pub mod seccomp;
pub mod stdio;
pub mod task;
pub mod tty;
pub mod vsock;

/// An error and its sources on one line (a source already in the message is not
/// repeated), for messages that must say everything in one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}
