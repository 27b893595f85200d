//! virtio-fs: a host directory shared with the guest, served by a vhost-user backend
//! (virtiofsd) rather than by the VMM.
//!
//! Why vhost-user and an external virtiofsd, not a FUSE server inside the VMM: serving
//! a file system means opening, reading, writing, renaming and deleting host files on
//! the guest's behalf. Done in the VMM, every one of those system calls would have to
//! be allowed by the VMM's seccomp filter, in the one host process the guest can reach
//! directly. Handed to virtiofsd, the VMM keeps its narrow filter (it only passes
//! queues, memory and eventfds over a Unix socket), and the file system code runs in a
//! process that sandboxes itself (its own mount namespace with the shared directory as
//! its root, its own seccomp filter) and can be restarted or replaced independently.
//! The guest's requests go from its rings to virtiofsd without passing through the
//! VMM; only the completion interrupts do.

pub mod device;
pub mod vhost_user;

pub use device::{Fs, FsError};
pub use vhost_user::{Backend, VhostUserError};

/// "a: b: c" from an error and its sources, for the one log line a failure gets.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
