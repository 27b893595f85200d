//! virtio-vsock, hybrid as in Firecracker: the host side is a Unix socket. This is
//! the packet layer; the device and its Unix-socket muxer build on it.

pub mod connection;
pub mod muxer;
pub mod packet;
