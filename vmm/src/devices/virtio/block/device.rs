//! The virtio-blk device: one request queue over a backing file, read-only or
//! read-write, with flush.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::handler::{process_requests, Disk, ID_BYTES, SECTOR_SIZE, SEG_MAX};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Activation, GuestFaults, IrqLine, VirtioDevice, INT_VRING, VIRTIO_F_VERSION_1,
};

const TYPE_BLOCK: u32 = 2;
const QUEUE_SIZES: &[u16] = &[256];
const F_SEG_MAX: u32 = 2;
const F_RO: u32 = 5;
const F_FLUSH: u32 = 9;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk {0}")]
    Open(String, #[source] std::io::Error),
    #[error("disk {0} is smaller than one 512-byte sector")]
    TooSmall(String),
}

pub struct Block {
    disk: Disk,
    config: [u8; 24],
    live: Option<(GuestMemoryMmap, Queue, Arc<IrqLine>)>,
    faults: GuestFaults,
}

impl Block {
    /// Opens `path`; `id` is what the guest reads as the disk's serial (e.g.
    /// /sys/block/vda/serial), cut to 20 bytes.
    pub fn new(path: &Path, read_only: bool, id: &str) -> Result<Block, BlockError> {
        let name = path.display().to_string();
        let file: File = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| BlockError::Open(name.clone(), e))?;
        let len = file.metadata().map_err(|e| BlockError::Open(name.clone(), e))?.len();
        let capacity_sectors = len / SECTOR_SIZE;
        if capacity_sectors == 0 {
            return Err(BlockError::TooSmall(name));
        }
        let mut ident = [0u8; ID_BYTES];
        for (d, s) in ident.iter_mut().zip(id.bytes()) {
            *d = s;
        }
        let mut config = [0u8; 24];
        config[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        Ok(Block {
            disk: Disk { file, capacity_sectors, read_only, id: ident },
            config,
            live: None,
            faults: GuestFaults::new("virtio-blk"),
        })
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }
    fn features(&self) -> u64 {
        let ro = if self.disk.read_only { 1u64 << F_RO } else { 0 };
        (1 << VIRTIO_F_VERSION_1) | (1 << F_FLUSH) | (1 << F_SEG_MAX) | ro
    }
    fn set_acked_features(&mut self, _acked: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.live = Some(a.single_queue()?);
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> bool {
        let (0, Some((mem, queue, irq))) = (index, self.live.as_mut()) else { return false };
        let (interrupt, more) = process_requests(queue, mem, &self.disk, &mut self.faults, usize::from(queue.size()));
        if interrupt {
            irq.trigger(INT_VRING);
        }
        more
    }

    fn reset(&mut self) {
        self.live = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seg_max_is_advertised() {
        let path = std::env::temp_dir().join(format!("moat-blk-dev-{}", std::process::id()));
        std::fs::write(&path, [0u8; 4096]).expect("disk file");
        let b = Block::new(&path, false, "moat-disk0").expect("device");
        let _ = std::fs::remove_file(&path);
        assert_ne!(b.features() & (1 << F_SEG_MAX), 0, "VIRTIO_BLK_F_SEG_MAX offered");
        let mut seg_max = [0u8; 4];
        b.read_config(12, &mut seg_max);
        assert_eq!(u32::from_le_bytes(seg_max), SEG_MAX, "the limit the handler enforces");
    }
}
