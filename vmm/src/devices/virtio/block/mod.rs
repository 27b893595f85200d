//! virtio-blk (virtio 1.2, section 5.2): a backing file as a guest disk.

mod device;
mod handler;

pub use device::{Block, BlockError};
