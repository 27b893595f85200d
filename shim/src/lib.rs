//! moat's host-side runtime: everything between a user (the `moat` tool, later
//! containerd) and one sandbox — a microVM with moat-agent inside.
//!
//! [`image`] turns an image into a root directory, [`spec`] builds the OCI runtime
//! spec the agent reads, [`sandbox`] starts the fs backend and the VMM and dials the
//! agent, [`agent`] and [`stdio`] talk to it, and [`run`] ties them into `moat run`.
//! Nothing here knows containerd.
#![forbid(unsafe_code)]

pub mod image;
pub mod spec;
pub mod user;
pub mod agent;
pub mod helper;
pub mod run;
pub mod sandbox;
pub mod stdio;
pub mod tty;
pub mod vsock;
