//! virtio-vsock, hybrid as in Firecracker: the guest's vsock device is backed on the
//! host by a Unix socket (see `muxer.rs` for the handshake).

pub mod connection;
mod device;
pub mod muxer;
pub mod packet;

pub use device::Vsock;
