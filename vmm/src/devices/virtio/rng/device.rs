//! The virtio-rng device: one queue, no config space, no features beyond VERSION_1.

use std::fs::File;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::handler::{fill_chains, Budget};
use crate::devices::virtio::{ActivateError, Activation, GuestFaults, IrqLine, VirtioDevice, INT_VRING, VIRTIO_F_VERSION_1};

const TYPE_RNG: u32 = 4;
const QUEUE_SIZES: &[u16] = &[256];

pub struct Rng {
    source: File,
    active: Option<(GuestMemoryMmap, Queue, Arc<IrqLine>)>,
    faults: GuestFaults,
}

impl Rng {
    /// Serves bytes from the host's `/dev/urandom`, opened now (before any sandboxing).
    pub fn new() -> std::io::Result<Rng> {
        Ok(Rng { source: File::open("/dev/urandom")?, active: None, faults: GuestFaults::new("virtio-rng") })
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }
    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }
    fn set_acked_features(&mut self, _acked: u64) {}
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.active = Some(a.single_queue()?);
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> bool {
        let (0, Some((mem, queue, irq))) = (index, self.active.as_mut()) else { return false };
        let (interrupt, more) = fill_chains(queue, mem, &mut self.source, &mut self.faults, Budget::round(queue.size()));
        if interrupt {
            irq.trigger(INT_VRING);
        }
        more
    }

    fn reset(&mut self) {
        self.active = None;
    }
}
