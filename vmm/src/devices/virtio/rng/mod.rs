//! virtio-rng (virtio 1.2, section 5.4): entropy for the guest from its first
//! moment, so nothing in it blocks waiting for the kernel's pool.

mod device;
mod handler;

pub use device::Rng;
pub use handler::{fill_chains, Budget, MAX_BYTES_PER_CHAIN, MAX_BYTES_PER_ROUND, MAX_DESCRIPTORS_PER_ROUND};
