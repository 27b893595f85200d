//! virtio devices on the virtio-mmio transport (virtio 1.x, "modern" only).
//!
//! A device implements [`VirtioDevice`]: its identity, features, config space, and what
//! to do with its queues once the driver has set them up. The transport
//! ([`mmio::MmioTransport`]) owns the register file and the feature/status handshake,
//! and validates everything the driver writes before a device sees it.

pub mod block;
pub mod fs;
pub mod mmio;
pub mod rng;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// The next available descriptor chain of `queue`, or None when the ring is empty or
/// its index cannot be read (the guest broke it; the device then serves nothing).
pub fn next_chain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Option<virtio_queue::DescriptorChain<&'a GuestMemoryMmap>> {
    use virtio_queue::QueueOwnedT;
    match queue.iter(mem) {
        Ok(mut it) => it.next(),
        Err(e) => {
            log::debug!("virtio: avail ring unreadable: {e}");
            None
        }
    }
}

/// Feature bit every moat device offers and requires: virtio 1.x semantics.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// InterruptStatus bits.
pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// The interrupt line of one device: an irqfd plus the InterruptStatus register the
/// driver reads to learn why it was interrupted.
pub struct IrqLine {
    evt: EventFd,
    status: AtomicU32,
}

impl IrqLine {
    pub fn new(evt: EventFd) -> IrqLine {
        IrqLine { evt, status: AtomicU32::new(0) }
    }

    /// Sets `why` in InterruptStatus and raises the interrupt.
    pub fn trigger(&self, why: u32) {
        self.status.fetch_or(why, Ordering::SeqCst);
        // An eventfd write only fails when the counter would overflow, in which case
        // the interrupt is already pending.
        let _ = self.evt.write(1);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not valid (size, alignment or addresses outside guest memory)")]
    InvalidQueue(usize),
    #[error("the driver enabled {got} queues; the device needs {want}")]
    QueueCount { got: usize, want: usize },
    #[error("device backend failed to start")]
    Backend(#[source] std::io::Error),
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub irq: Arc<IrqLine>,
}

impl Activation {
    /// For a device with exactly one queue: the memory, that queue and the interrupt.
    pub fn single_queue(self) -> Result<(GuestMemoryMmap, Queue, Arc<IrqLine>), ActivateError> {
        let got = self.queues.len();
        let queue = self.queues.into_iter().next().ok_or(ActivateError::QueueCount { got, want: 1 })?;
        Ok((self.mem, queue, self.irq))
    }
}

/// Serves a read of a device's config space from `config`; bytes past its end (or an
/// offset no slice could hold) read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset).ok().and_then(|o| config.get(o.checked_add(i)?)).copied().unwrap_or(0);
    }
}

pub trait VirtioDevice: Send {
    /// virtio device type (4 = entropy, 19 = vsock, ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Offered feature bits (including `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of `features`, checked by the
    /// transport).
    fn set_acked_features(&mut self, acked: u64);
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts serving the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Handles a notification on queue `index` (only called while active). Serves a
    /// bounded amount of work (at most a queue's worth of chains) and returns true
    /// if more is waiting, so a guest that keeps refilling a queue cannot hold the
    /// VMM's main thread: the caller comes back after its other events.
    fn process_queue(&mut self, index: usize) -> bool;
    /// Stops serving and drops the queues (driver wrote 0 to Status).
    fn reset(&mut self);
    /// Host-side file descriptors to poll while active: (fd, want read, want write).
    fn backend_fds(&self) -> Vec<(std::os::fd::RawFd, bool, bool)> {
        Vec::new()
    }
    /// One of `backend_fds` is ready. Returns true if queue work is left over (as for
    /// `process_queue`).
    fn backend_ready(&mut self, _fd: std::os::fd::RawFd, _readable: bool, _writable: bool) -> bool {
        false
    }
    /// Offered the eventfds KVM signals when the driver notifies each queue; returns
    /// those the main loop should poll on the device's behalf (all, by default). A
    /// device whose queues an external backend serves (vhost-user) keeps them to hand
    /// them over, and the main loop then leaves them alone.
    fn take_queue_events(&mut self, evts: Vec<EventFd>) -> Vec<EventFd> {
        evts
    }
    /// Whether `backend_fds` must be polled even while the driver has the device
    /// stopped (a vhost-user device finishing a reset, or watching its backend).
    fn polled_while_inactive(&self) -> bool {
        false
    }
    /// The device broke in a way only a reset can clear (a vhost-user backend went
    /// away): the transport then sets DEVICE_NEEDS_RESET and tells the driver.
    fn needs_reset(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let cfg = [1u8, 2, 3, 4];
        let mut b = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut b);
        assert_eq!(b, [3, 4, 0, 0]);
        read_config_bytes(&cfg, u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
    }
}
