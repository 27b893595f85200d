//! virtio-rng (virtio 1.2, section 5.4): entropy for the guest from its first
//! moment, so nothing in it blocks waiting for the kernel's pool.

mod device;
mod handler;

pub use device::Rng;
pub use handler::{fill_chains, MAX_BYTES_PER_CHAIN};
