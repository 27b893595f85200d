//! The virtio-fs device (type 26): its config space (tag and request-queue count),
//! features, and the hand-over of its two queues (hiprio and one request queue) to
//! the vhost-user backend.
//!
//! The queues are served by the backend, not here: the guest's notifications reach
//! it directly (the KVM ioeventfds of this device are given to the backend as its
//! kick fds) and its completions come back on per-queue "call" eventfds that the main
//! loop polls; each sets the VRING bit of InterruptStatus and raises the IRQ (a
//! virtio-mmio driver ignores an interrupt whose status reads 0, so an irqfd straight
//! to the GSI would not do).
//!
//! Activation and reset arrive on a vCPU thread (MMIO writes), but all socket traffic
//! with the backend happens on the main thread: they are queued as operations and an
//! eventfd wakes the main loop to run them in order. A backend that disconnects, fails
//! a request or reports a queue error is logged once and dropped; the device then
//! reports DEVICE_NEEDS_RESET and fails any later activation. The VM keeps running.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::vhost_user::{Backend, QueueFds, Ring};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Activation, IrqLine, Readiness, VirtioDevice, INT_VRING, VIRTIO_F_VERSION_1,
};

pub const TYPE_FS: u32 = 26;
/// hiprio and one request queue. virtiofsd accepts rings up to 1024 entries.
const QUEUE_SIZES: &[u16] = &[1024, 1024];
const TAG_LEN: usize = 36;
/// tag[36] then num_request_queues (le32).
const CONFIG_LEN: usize = TAG_LEN + 4;

/// Ring features the backend may offer that the driver may then accept: the rings
/// are the backend's business, the VMM only relays the interrupt.
const RING_INDIRECT_DESC: u32 = 28;
const RING_EVENT_IDX: u32 = 29;
const ACCEPTED: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << RING_INDIRECT_DESC) | (1 << RING_EVENT_IDX);

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs tag {0:?} does not fit in {TAG_LEN} bytes")]
    Tag(String),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Backend(#[from] super::vhost_user::VhostUserError),
}

enum Op {
    Start { mem: GuestMemoryMmap, rings: Vec<Ring>, irq: Arc<IrqLine> },
    Stop,
}

/// The backend is serving the rings.
struct Running {
    irq: Arc<IrqLine>,
}

pub struct Fs {
    tag: String,
    config: [u8; CONFIG_LEN],
    /// None once the backend is gone.
    backend: Option<Backend>,
    offered: u64,
    acked: u64,
    /// The queue-notify ioeventfds KVM signals; the backend's kick fds.
    kicks: Vec<EventFd>,
    /// Per queue, what the backend signals on completion and on error. Made once
    /// here, so the confined main thread never needs to create an eventfd.
    calls: Vec<EventFd>,
    errs: Vec<EventFd>,
    /// Wakes the main loop to run `ops`.
    pending: EventFd,
    ops: VecDeque<Op>,
    running: Option<Running>,
    failed: bool,
}

impl Fs {
    /// A device for `tag`, served by the backend connected as `backend`.
    pub fn new(tag: &str, backend: Backend) -> Result<Fs, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsError::Tag(tag.to_string()));
        }
        let mut config = [0u8; CONFIG_LEN];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        let offered = backend.features() & ACCEPTED;
        let eventfds = || {
            (0..QUEUE_SIZES.len()).map(|_| EventFd::new(libc::EFD_NONBLOCK)).collect::<Result<Vec<_>, _>>()
        };
        Ok(Fs {
            calls: eventfds().map_err(FsError::EventFd)?,
            errs: eventfds().map_err(FsError::EventFd)?,
            tag: tag.to_string(),
            config,
            backend: Some(backend),
            offered,
            acked: 0,
            kicks: Vec::new(),
            pending: EventFd::new(libc::EFD_NONBLOCK).map_err(FsError::EventFd)?,
            ops: VecDeque::new(),
            running: None,
            failed: false,
        })
    }

    fn queue_op(&mut self, op: Op) {
        self.ops.push_back(op);
        // A full counter still leaves the eventfd readable.
        let _ = self.pending.write(1);
    }

    /// The backend is unusable: say so once, let it go (closing the socket makes
    /// virtiofsd exit), and leave the device needing a reset.
    fn fail(&mut self, why: &dyn std::fmt::Display) {
        if !self.failed {
            log::warn!("virtio-fs {}: backend failed, device stopped: {why}", self.tag);
        }
        self.failed = true;
        self.backend = None;
        self.running = None;
        self.ops.clear();
    }

    fn run_ops(&mut self) {
        while let Some(op) = self.ops.pop_front() {
            let result = match op {
                Op::Start { mem, rings, irq } => self.start(&mem, &rings, irq),
                Op::Stop => self.stop(),
            };
            if let Err(e) = result {
                self.fail(&super::error_chain(&e));
                return;
            }
        }
    }

    fn start(&mut self, mem: &GuestMemoryMmap, rings: &[Ring], irq: Arc<IrqLine>) -> Result<(), FsError> {
        if self.running.is_some() {
            self.stop()?;
        }
        let Some(backend) = self.backend.as_mut() else { return Ok(()) };
        let fds: Vec<QueueFds<'_>> = (0..rings.len())
            .filter_map(|i| Some(QueueFds { kick: self.kicks.get(i)?, call: self.calls.get(i)?, err: self.errs.get(i)? }))
            .collect();
        if fds.len() != rings.len() {
            return Err(FsError::EventFd(std::io::Error::other("queue notification eventfds are missing")));
        }
        // Counts left from an earlier run mean nothing for this one.
        for e in self.calls.iter().chain(&self.errs) {
            let _ = e.read();
        }
        backend.start(self.acked, mem, rings, &fds)?;
        log::debug!("virtio-fs {}: backend serving {} queues", self.tag, rings.len());
        self.running = Some(Running { irq });
        Ok(())
    }

    fn stop(&mut self) -> Result<(), FsError> {
        if self.running.take().is_none() {
            return Ok(());
        }
        if let Some(backend) = self.backend.as_mut() {
            backend.stop(QUEUE_SIZES.len())?;
        }
        Ok(())
    }
}

/// Where a ring of `len` bytes at `gpa` lives in the VMM's address space, if it lies
/// entirely inside one guest RAM region.
fn host_addr(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Option<u64> {
    let (region, offset) = mem.to_region_addr(GuestAddress(gpa))?;
    if offset.0.checked_add(len)? > region.len() {
        return None;
    }
    region.get_host_address(offset).ok().map(|p| p as u64)
}

/// The rings of `queue` in host addresses (split virtqueue sizes, virtio 1.2 2.7).
fn ring_of(queue: &Queue, mem: &GuestMemoryMmap) -> Option<Ring> {
    let n = u64::from(queue.size());
    Some(Ring {
        max_size: queue.max_size(),
        size: queue.size(),
        next_avail: queue.next_avail(),
        desc: host_addr(mem, queue.desc_table(), 16 * n)?,
        avail: host_addr(mem, queue.avail_ring(), 6 + 2 * n)?,
        used: host_addr(mem, queue.used_ring(), 6 + 8 * n)?,
    })
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }
    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }
    fn features(&self) -> u64 {
        self.offered
    }
    fn set_acked_features(&mut self, acked: u64) {
        self.acked = acked;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        if a.queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount { got: a.queues.len(), want: QUEUE_SIZES.len() });
        }
        if self.backend.is_none() {
            return Err(ActivateError::Backend(std::io::Error::other("the vhost-user backend is gone")));
        }
        let rings = a
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| ring_of(q, &a.mem).ok_or(ActivateError::InvalidQueue(i)))
            .collect::<Result<Vec<_>, _>>()?;
        self.queue_op(Op::Start { mem: a.mem, rings, irq: a.irq });
        Ok(())
    }

    /// The guest's notifications go to the backend through KVM; one that reaches the
    /// VMM (an out-of-range queue index) has nothing to do here.
    fn process_queue(&mut self, _index: usize) -> bool {
        false
    }

    fn reset(&mut self) {
        self.queue_op(Op::Stop);
    }

    fn take_queue_events(&mut self, evts: Vec<EventFd>) -> Vec<EventFd> {
        self.kicks = evts;
        Vec::new()
    }

    fn polled_while_inactive(&self) -> bool {
        true
    }

    fn backend_fds(&self) -> Vec<(RawFd, bool, bool)> {
        let mut fds = vec![(self.pending.as_raw_fd(), true, false)];
        if let Some(b) = &self.backend {
            // Nothing is ever due on the socket between requests: readable means the
            // backend hung up (or broke the protocol).
            fds.push((b.as_raw_fd(), true, false));
        }
        if self.running.is_some() {
            fds.extend(self.calls.iter().chain(&self.errs).map(|e| (e.as_raw_fd(), true, false)));
        }
        fds
    }

    fn backend_ready(&mut self, fd: RawFd, ready: Readiness) -> bool {
        // Every fd here is polled for reading; for the socket, a hangup means the same.
        if !ready.readable && !ready.hangup {
            return false;
        }
        if fd == self.pending.as_raw_fd() {
            let _ = self.pending.read();
            self.run_ops();
        } else if self.backend.as_ref().is_some_and(|b| b.as_raw_fd() == fd) {
            self.fail(&"the backend closed the connection or sent an unexpected message");
        } else if let Some(r) = &self.running {
            if let Some(call) = self.calls.iter().find(|e| e.as_raw_fd() == fd) {
                if call.read().is_ok() {
                    r.irq.trigger(INT_VRING);
                }
            } else if let Some(q) = self.errs.iter().position(|e| e.as_raw_fd() == fd) {
                if self.errs[q].read().is_ok() {
                    self.fail(&format!("the backend reported an error on queue {q}"));
                }
            }
        }
        false
    }

    fn needs_reset(&self) -> bool {
        self.failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// A device on a backend that negotiated and then went away.
    fn device(tag: &str) -> Result<Fs, FsError> {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let t = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut b = b;
            let mut buf = [0u8; 12];
            b.read_exact(&mut buf).expect("SET_OWNER");
            b.read_exact(&mut buf).expect("GET_FEATURES");
            let features: u64 = (1 << 32) | (1 << 29) | (1 << 27);
            let mut m = Vec::new();
            for w in [1u32, 5, 8] {
                m.extend_from_slice(&w.to_le_bytes());
            }
            m.extend_from_slice(&features.to_le_bytes());
            b.write_all(&m).expect("reply");
        });
        let backend = Backend::from_stream(a, 2).expect("negotiate");
        t.join().expect("fake backend");
        Fs::new(tag, backend)
    }

    #[test]
    fn config_space_holds_tag_and_one_request_queue() {
        let d = device("moatfs").expect("device");
        let mut b = [0xffu8; 40];
        d.read_config(0, &mut b);
        assert_eq!(&b[..6], b"moatfs");
        assert!(b[6..36].iter().all(|&x| x == 0));
        assert_eq!(u32::from_le_bytes([b[36], b[37], b[38], b[39]]), 1);
        let mut n = [0u8; 4];
        d.read_config(36, &mut n);
        assert_eq!(u32::from_le_bytes(n), 1);
        assert_eq!(d.device_type(), 26);
        assert_eq!(d.queue_max_sizes().len(), 2);
        // Offered: what the backend has and we accept (bit 27 is not ours to pass on).
        assert_eq!(d.features(), (1 << 32) | (1 << 29));
        let full = device(&"x".repeat(36)).expect("36-byte tag");
        let mut t = [0u8; 36];
        full.read_config(0, &mut t);
        assert_eq!(t, [b'x'; 36]);
        assert!(matches!(device(&"x".repeat(37)), Err(FsError::Tag(_))));
    }

    #[test]
    fn hangup_fails_once_and_asks_for_reset() {
        let mut d = device("t").expect("device");
        assert!(!d.needs_reset());
        let fds = d.backend_fds();
        assert_eq!(fds.len(), 2, "pending eventfd and the socket");
        // The fake backend has gone: the socket polls readable.
        d.backend_ready(fds[1].0, Readiness { readable: true, ..Default::default() });
        assert!(d.needs_reset());
        assert_eq!(d.backend_fds().len(), 1, "the socket is no longer polled");
        // Activation is refused from now on.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let irq = Arc::new(IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")));
        let queues = (0..2).map(|_| Queue::new(16).expect("queue")).collect();
        assert!(matches!(d.activate(Activation { mem, queues, irq }), Err(ActivateError::Backend(_))));
        // A reset with nothing running is harmless.
        d.reset();
        d.backend_ready(d.pending.as_raw_fd(), Readiness { readable: true, ..Default::default() });
    }

    #[test]
    fn rings_outside_memory_are_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let mut q = Queue::new(16).expect("queue");
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x3000), Some(0));
        let r = ring_of(&q, &mem).expect("ring inside memory");
        assert_eq!(r.size, 16);
        assert_eq!(r.used - r.desc, 0x2000);
        // A used ring straddling the end of RAM.
        q.set_used_ring_address(Some((1 << 20) - 8), Some(0));
        assert!(ring_of(&q, &mem).is_none());
        assert!(host_addr(&mem, u64::MAX - 2, 16).is_none());
    }
}
