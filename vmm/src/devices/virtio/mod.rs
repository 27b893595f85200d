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
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// The next available request on a queue, as a device may serve it.
pub enum Avail<'a> {
    /// A chain to serve.
    Chain(virtio_queue::DescriptorChain<&'a GuestMemoryMmap>),
    /// The head index of a chain that uses an indirect descriptor table. moat never
    /// offers VIRTIO_RING_F_INDIRECT_DESC, so this is a guest fault: the device does
    /// not follow it and returns it unused (used length 0), as it does any chain too
    /// malformed to answer.
    Indirect(u16),
}

/// The next available request of `queue`, or None when the ring is empty or its
/// index cannot be read (the guest broke it; the device then serves nothing).
pub fn next_chain<'a>(queue: &mut Queue, mem: &'a GuestMemoryMmap) -> Option<Avail<'a>> {
    use virtio_queue::QueueOwnedT;
    let chain = match queue.iter(mem) {
        Ok(mut it) => it.next()?,
        Err(e) => {
            log::debug!("virtio: avail ring unreadable: {e}");
            return None;
        }
    };
    let head = chain.head_index();
    Some(if uses_indirect(queue, mem, head) { Avail::Indirect(head) } else { Avail::Chain(chain) })
}

/// Returns a chain refused as `Avail::Indirect` to the driver unused, and counts the
/// fault. False if the used ring cannot be written (the queue is then broken).
pub fn return_indirect(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, faults: &mut GuestFaults) -> bool {
    faults.record(&"a request uses an indirect descriptor table, which was never offered");
    match queue.add_used(mem, head, 0) {
        Ok(()) => true,
        Err(e) => {
            log::debug!("virtio: cannot return request {head}: {e}");
            false
        }
    }
}

const DESC_F_NEXT: u16 = 1;
const DESC_F_INDIRECT: u16 = 4;

/// Whether the chain starting at `head` reaches a descriptor marked INDIRECT. Walks
/// the descriptor table as virtio-queue's chain iterator does (at most queue-size
/// descriptors, stopping at an index past the table or a descriptor it cannot read),
/// which switches to an indirect table silently: this is the only place to refuse one.
fn uses_indirect(queue: &Queue, mem: &GuestMemoryMmap, head: u16) -> bool {
    use vm_memory::{Bytes, GuestAddress};
    let table = GuestAddress(queue.desc_table());
    let size = queue.size();
    let mut index = head;
    for _ in 0..size {
        if index >= size {
            return false;
        }
        let Some(addr) = table.0.checked_add(u64::from(index) * 16) else { return false };
        let Ok(desc) = mem.read_obj::<virtio_queue::desc::split::Descriptor>(GuestAddress(addr)) else { return false };
        if desc.flags() & DESC_F_INDIRECT != 0 {
            return true;
        }
        if desc.flags() & DESC_F_NEXT == 0 {
            return false;
        }
        index = desc.next();
    }
    false
}

/// How often a device logs the guest faults it counts: a guest can fault at will, and
/// must not fill the host's logs doing so.
const FAULT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A device's count of guest faults: requests it refused because the driver broke the
/// rules (an indirect chain, more segments than offered). Each is counted; at most
/// one line per `FAULT_LOG_INTERVAL` is logged, with the count so far.
pub struct GuestFaults {
    device: &'static str,
    count: u64,
    last_log: Option<Instant>,
}

impl GuestFaults {
    pub fn new(device: &'static str) -> GuestFaults {
        GuestFaults { device, count: 0, last_log: None }
    }

    pub fn record(&mut self, what: &dyn std::fmt::Display) {
        self.count += 1;
        let now = Instant::now();
        if self.last_log.is_none_or(|t| now.duration_since(t) >= FAULT_LOG_INTERVAL) {
            self.last_log = Some(now);
            log::warn!("{}: guest fault: {what} ({} so far; logged at most every {FAULT_LOG_INTERVAL:?})", self.device, self.count);
        }
    }

    /// Faults counted since the device was created.
    pub fn count(&self) -> u64 {
        self.count
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

/// What poll reported for one of a device's backend fds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    /// Data (or end of file) to read.
    pub readable: bool,
    /// Room to write.
    pub writable: bool,
    /// The peer hung up (POLLHUP) or the fd has an error pending (POLLERR); reported
    /// whatever the device asked for.
    pub hangup: bool,
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
    /// Every fd listed is watched for hangup and errors, even one that wants neither.
    fn backend_fds(&self) -> Vec<(std::os::fd::RawFd, bool, bool)> {
        Vec::new()
    }
    /// One of `backend_fds` is ready. Returns true if queue work is left over (as for
    /// `process_queue`).
    fn backend_ready(&mut self, _fd: std::os::fd::RawFd, _ready: Readiness) -> bool {
        false
    }
    /// When the device must be called back even if nothing is ready (a timeout of its
    /// own), if ever.
    fn deadline(&self) -> Option<Instant> {
        None
    }
    /// The `deadline` has come. Returns true if queue work is left over (as for
    /// `process_queue`).
    fn on_deadline(&mut self, _now: Instant) -> bool {
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
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// What `next_chain` makes of the one chain `descs` describe.
    fn classify(descs: &[RawDescriptor]) -> Option<u16> {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let vq = MockSplitQueue::new(&m, 16);
        vq.add_desc_chains(descs, 0).expect("chain");
        let mut q: Queue = vq.create_queue().expect("queue");
        match next_chain(&mut q, &m).expect("a request") {
            Avail::Chain(_) => None,
            Avail::Indirect(head) => Some(head),
        }
    }

    #[test]
    fn indirect_descriptors_are_found_anywhere_in_a_chain() {
        assert_eq!(classify(&[desc(0x8000, 16, DESC_F_INDIRECT, 0)]), Some(0));
        // Behind two plain descriptors.
        let tail = [desc(0x8000, 8, DESC_F_NEXT, 1), desc(0x9000, 8, DESC_F_NEXT, 2), desc(0xa000, 16, DESC_F_INDIRECT, 0)];
        assert_eq!(classify(&tail), Some(0));
        // Plain chains, a loop and a next index past the table included, are not.
        assert_eq!(classify(&[desc(0x8000, 8, DESC_F_NEXT, 1), desc(0x9000, 8, 0, 0)]), None);
        assert_eq!(classify(&[desc(0x8000, 8, DESC_F_NEXT, 1), desc(0x9000, 8, DESC_F_NEXT, 0)]), None);
        assert_eq!(classify(&[desc(0x8000, 8, DESC_F_NEXT, 200)]), None);
    }

    #[test]
    fn faults_are_counted() {
        let mut f = GuestFaults::new("test");
        for _ in 0..1000 {
            f.record(&"a fault");
        }
        assert_eq!(f.count(), 1000);
    }

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
