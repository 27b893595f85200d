//! The virtio-vsock device: RX, TX and event queues, the guest CID in config space,
//! and the muxer behind it.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::muxer::Muxer;
use super::packet::{self, OP_RW};
use crate::devices::virtio::{
    next_chain, read_config_bytes, return_indirect, ActivateError, Activation, Avail, GuestFaults, IrqLine, Readiness,
    VirtioDevice, INT_VRING, VIRTIO_F_VERSION_1,
};

const TYPE_VSOCK: u32 = 19;
const QUEUE_SIZES: &[u16] = &[256, 256, 64];
const RX: usize = 0;
const TX: usize = 1;
/// Packets waiting for RX buffers past which TX packets are left on their queue.
/// Every TX packet may call for an answer (an RST to an unknown port, a credit
/// update, a RESPONSE): a guest that keeps sending but never posts RX buffers must
/// fill its own TX ring, not the VMM's heap.
const MAX_RX_BACKLOG: usize = 512;

struct Live {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    irq: Arc<IrqLine>,
}

pub struct Vsock {
    cid: u64,
    muxer: Muxer,
    live: Option<Live>,
    /// TX processing stopped at `MAX_RX_BACKLOG`; it resumes once RX drains.
    tx_stalled: bool,
    faults: GuestFaults,
}

impl Vsock {
    pub fn new(cid: u64, muxer: Muxer) -> Vsock {
        Vsock { cid, muxer, live: None, tx_stalled: false, faults: GuestFaults::new("virtio-vsock") }
    }

    fn rx_backlog_full(&self) -> bool {
        self.muxer.rx_len() >= MAX_RX_BACKLOG
    }

    /// TX was held back and the backlog has drained below the limit since.
    fn tx_resumable(&self) -> bool {
        self.tx_stalled && !self.rx_backlog_full()
    }

    /// Takes up to a queue's worth of packets the guest queued on TX; true if more
    /// are waiting. Stops early (without asking to be called again) while too many
    /// packets wait for RX buffers.
    fn process_tx(&mut self) -> bool {
        self.tx_stalled = false;
        let Some(live) = self.live.as_mut() else { return false };
        let mut used = false;
        let mut budget = live.tx.size();
        let mut more = false;
        loop {
            if budget == 0 {
                more = true;
                break;
            }
            if self.muxer.rx_len() >= MAX_RX_BACKLOG {
                self.tx_stalled = true;
                break;
            }
            budget -= 1;
            let chain = match next_chain(&mut live.tx, &live.mem) {
                None => break,
                Some(Avail::Chain(chain)) => chain,
                Some(Avail::Indirect(head)) => {
                    if !return_indirect(&mut live.tx, &live.mem, head, &mut self.faults) {
                        break;
                    }
                    used = true;
                    continue;
                }
            };
            let head = chain.head_index();
            match packet::read_tx(&live.mem, chain) {
                Ok(pkt) => self.muxer.from_guest(pkt),
                Err(e) => log::debug!("vsock: dropping malformed TX packet: {e}"),
            }
            if live.tx.add_used(&live.mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        if used && live.tx.needs_notification(&live.mem).unwrap_or(true) {
            live.irq.trigger(INT_VRING);
        }
        more
    }

    /// Moves queued packets into the guest's RX buffers, splitting payloads across
    /// buffers as needed; at most a queue's worth of buffers per call. True if
    /// packets and buffers may remain for another round.
    fn deliver_rx(&mut self) -> bool {
        let Some(live) = self.live.as_mut() else { return false };
        let mut used = false;
        let mut budget = live.rx.size();
        while self.muxer.has_rx() {
            if budget == 0 {
                break;
            }
            budget -= 1;
            let chain = match next_chain(&mut live.rx, &live.mem) {
                None => break,
                Some(Avail::Chain(chain)) => chain,
                Some(Avail::Indirect(head)) => {
                    if !return_indirect(&mut live.rx, &live.mem, head, &mut self.faults) {
                        break;
                    }
                    used = true;
                    continue;
                }
            };
            let head = chain.head_index();
            let Some((hdr, rest)) = self.muxer.front_rx() else { break };
            let result = packet::write_rx_partial(&live.mem, chain, hdr, rest).map(|(len, n)| (len, n, n == rest.len()));
            let written = match result {
                Ok((len, n, whole)) => {
                    if hdr.op == OP_RW {
                        let (local, peer) = (hdr.src_port, hdr.dst_port);
                        self.muxer.delivered(local, peer, n as u32, whole);
                    }
                    self.muxer.consume_rx(n);
                    len
                }
                Err(e) => {
                    // A buffer too small for a header: hand it back empty and keep the
                    // packet for the next one.
                    log::debug!("vsock: unusable RX buffer: {e}");
                    0
                }
            };
            if live.rx.add_used(&live.mem, head, written).is_err() {
                break;
            }
            used = true;
        }
        if used && live.rx.needs_notification(&live.mem).unwrap_or(true) {
            live.irq.trigger(INT_VRING);
        }
        budget == 0 && self.muxer.has_rx()
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }
    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }
    fn set_acked_features(&mut self, _acked: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let got = a.queues.len();
        let mut q = a.queues.into_iter();
        let (Some(rx), Some(tx), Some(_event)) = (q.next(), q.next(), q.next()) else {
            return Err(ActivateError::QueueCount { got, want: 3 });
        };
        self.live = Some(Live { mem: a.mem, rx, tx, irq: a.irq });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> bool {
        let more_tx = match index {
            TX => self.process_tx(),
            // New RX buffers may be what TX was held back for.
            RX if self.tx_stalled => self.process_tx(),
            RX => false,
            // The event queue only ever holds buffers for events moat never sends.
            _ => return false,
        };
        let more_rx = self.deliver_rx();
        more_tx || more_rx || self.tx_resumable()
    }

    fn reset(&mut self) {
        self.live = None;
        self.tx_stalled = false;
        self.muxer.reset_all();
    }

    fn backend_fds(&self) -> Vec<(RawFd, bool, bool)> {
        self.muxer.fds()
    }

    fn backend_ready(&mut self, fd: RawFd, ready: Readiness) -> bool {
        self.muxer.ready(fd, ready);
        // "More" brings the device back through its RX queue, which resumes TX.
        self.deliver_rx() || self.tx_resumable()
    }

    fn deadline(&self) -> Option<Instant> {
        self.muxer.deadline()
    }

    fn on_deadline(&mut self, now: Instant) -> bool {
        self.muxer.on_deadline(now);
        // A reaped connection's RST goes to the guest like any other packet.
        self.deliver_rx() || self.tx_resumable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::connection::HOST_CID;
    use crate::devices::virtio::vsock::packet::{VsockHeader, HEADER_LEN, OP_REQUEST, OP_RST, TYPE_STREAM};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    const SIZE: u16 = 16;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;

    /// A guest driver's view of one split queue (descriptors at `at`, the avail ring
    /// 4 KiB above, the used ring 8 KiB above): posts one-descriptor chains and counts
    /// what the device used.
    struct GuestQueue<'a> {
        mem: &'a GuestMemoryMmap,
        at: u64,
        posted: u16,
    }

    impl<'a> GuestQueue<'a> {
        fn new(mem: &'a GuestMemoryMmap, at: u64) -> Self {
            for off in [0x1000, 0x2000] {
                mem.write_obj(0u32, GuestAddress(at + off)).expect("ring flags and idx");
            }
            GuestQueue { mem, at, posted: 0 }
        }
        fn queue(&self) -> Queue {
            let mut q = Queue::new(SIZE).expect("queue");
            q.set_size(SIZE);
            q.set_ready(true);
            let (d, a, u) = (self.at, self.at + 0x1000, self.at + 0x2000);
            q.set_desc_table_address(Some(d as u32), Some((d >> 32) as u32));
            q.set_avail_ring_address(Some(a as u32), Some((a >> 32) as u32));
            q.set_used_ring_address(Some(u as u32), Some((u >> 32) as u32));
            q
        }
        fn used(&self) -> u16 {
            self.mem.read_obj(GuestAddress(self.at + 0x2002)).expect("used idx")
        }
        /// Posts buffers into every free slot.
        fn refill(&mut self, buf: impl Fn(u16) -> (u64, u32, u16)) {
            let free = SIZE - self.posted.wrapping_sub(self.used());
            for _ in 0..free {
                let slot = self.posted % SIZE;
                let (addr, len, flags) = buf(slot);
                let desc = RawDescriptor::from(Descriptor::new(addr, len, flags, 0));
                self.mem.write_obj(desc, GuestAddress(self.at + 16 * u64::from(slot))).expect("desc");
                self.mem.write_obj(slot, GuestAddress(self.at + 0x1004 + 2 * u64::from(slot))).expect("avail entry");
                self.posted = self.posted.wrapping_add(1);
                self.mem.write_obj(self.posted, GuestAddress(self.at + 0x1002)).expect("avail idx");
            }
        }
    }

    fn request_to(port: u32, src_port: u32) -> VsockHeader {
        VsockHeader {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port,
            dst_port: port,
            type_: TYPE_STREAM,
            op: OP_REQUEST,
            ..Default::default()
        }
    }

    #[test]
    fn indirect_chains_are_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("mem");
        let mut rx = GuestQueue::new(&mem, 0);
        let mut tx = GuestQueue::new(&mem, 0x1_0000);
        let event = GuestQueue::new(&mem, 0x2_0000);
        let path = std::env::temp_dir().join(format!("moat-vsock-dev-indirect-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut dev = Vsock::new(3, Muxer::new(&path, 3, crate::devices::virtio::vsock::muxer::MAX_CONNECTIONS).expect("muxer"));
        let queues = vec![rx.queue(), tx.queue(), event.queue()];
        let irq = Arc::new(IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")));
        dev.activate(Activation { mem: mem.clone(), queues, irq }).expect("activate");
        // TX: a REQUEST to a port nobody listens on, behind an indirect table. Followed,
        // each would earn an RST.
        mem.write_obj(request_to(7, 5000), GuestAddress(0x10_0000)).expect("hdr");
        let entry = RawDescriptor::from(Descriptor::new(0x10_0000, HEADER_LEN as u32, 0, 0));
        mem.write_obj(entry, GuestAddress(0x30_0000)).expect("indirect table");
        tx.refill(|_| (0x30_0000, 16, F_INDIRECT));
        dev.process_queue(TX);
        assert_eq!(tx.used(), SIZE, "every chain returned");
        assert_eq!(dev.muxer.rx_len(), 0, "no packet reached the muxer");
        assert_eq!(dev.faults.count(), u64::from(SIZE));
        // RX: a packet waits, but the only buffers are behind indirect tables.
        dev.muxer.from_guest(packet::TxPacket { hdr: request_to(7, 5001), payload: Vec::new() });
        assert_eq!(dev.muxer.rx_len(), 1);
        let entry = RawDescriptor::from(Descriptor::new(0x20_0000, 0x100, F_WRITE, 0));
        mem.write_obj(entry, GuestAddress(0x31_0000)).expect("indirect table");
        rx.refill(|_| (0x31_0000, 16, F_INDIRECT));
        dev.process_queue(RX);
        assert_eq!(rx.used(), SIZE, "every buffer returned");
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x20_0000)).expect("buffer"), 0, "nothing written through them");
        assert_eq!(dev.muxer.rx_len(), 1, "the packet waits for a usable buffer");
        assert_eq!(dev.faults.count(), 2 * u64::from(SIZE));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_connection_the_guest_never_answers_is_reaped_on_the_device_deadline() {
        use std::io::{Read, Write};
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("mem");
        let mut rx = GuestQueue::new(&mem, 0);
        let tx = GuestQueue::new(&mem, 0x1_0000);
        let event = GuestQueue::new(&mem, 0x2_0000);
        let path = std::env::temp_dir().join(format!("moat-vsock-dev-deadline-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut dev = Vsock::new(3, Muxer::new(&path, 3, crate::devices::virtio::vsock::muxer::MAX_CONNECTIONS).expect("muxer"));
        let queues = vec![rx.queue(), tx.queue(), event.queue()];
        let irq = Arc::new(IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")));
        dev.activate(Activation { mem: mem.clone(), queues, irq }).expect("activate");
        let mut host = std::os::unix::net::UnixStream::connect(&path).expect("connect");
        host.write_all(b"CONNECT 1024\n").expect("CONNECT");
        // The main loop: the listener, then the handshake.
        for _ in 0..2 {
            for (fd, r, w) in dev.backend_fds() {
                dev.backend_ready(fd, Readiness { readable: r, writable: w, hangup: false });
            }
        }
        assert_eq!(dev.deadline(), None, "the REQUEST waits for RX buffers");
        rx.refill(|slot: u16| (0x20_0000 + 0x100 * u64::from(slot), 0x100, F_WRITE));
        dev.process_queue(RX);
        let request: VsockHeader = mem.read_obj(GuestAddress(0x20_0000)).expect("rx hdr");
        assert_eq!({ request.op }, OP_REQUEST);
        let due = dev.deadline().expect("a time for the guest to answer");
        dev.on_deadline(due);
        let rst: VsockHeader = mem.read_obj(GuestAddress(0x20_0100)).expect("rx hdr");
        assert_eq!(({ rst.op }, { rst.src_port }), (OP_RST, { request.src_port }), "the guest is told");
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).expect("EOF for the host");
        assert_eq!(rest, crate::devices::virtio::vsock::muxer::ANSWER_TIMEOUT_REPLY, "the host is told why");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_guest_that_never_reads_cannot_grow_the_rx_backlog() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("mem");
        let mut rx = GuestQueue::new(&mem, 0);
        let mut tx = GuestQueue::new(&mem, 0x1_0000);
        let event = GuestQueue::new(&mem, 0x2_0000);
        let path = std::env::temp_dir().join(format!("moat-vsock-dev-backlog-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut dev = Vsock::new(3, Muxer::new(&path, 3, crate::devices::virtio::vsock::muxer::MAX_CONNECTIONS).expect("muxer"));
        let queues = vec![rx.queue(), tx.queue(), event.queue()];
        let irq = Arc::new(IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")));
        dev.activate(Activation { mem: mem.clone(), queues, irq }).expect("activate");
        // Each TX packet asks for a port nobody listens on: each earns an RST.
        for slot in 0..SIZE {
            let hdr = VsockHeader {
                src_cid: 3,
                dst_cid: HOST_CID,
                src_port: 5000 + u32::from(slot),
                dst_port: 7,
                type_: TYPE_STREAM,
                op: OP_REQUEST,
                ..Default::default()
            };
            mem.write_obj(hdr, GuestAddress(0x10_0000 + 0x100 * u64::from(slot))).expect("hdr");
        }
        let tx_buf = |slot: u16| (0x10_0000 + 0x100 * u64::from(slot), HEADER_LEN as u32, 0);
        for _ in 0..(4 * MAX_RX_BACKLOG / usize::from(SIZE)) {
            tx.refill(tx_buf);
            dev.process_queue(TX);
        }
        assert!(dev.muxer.rx_len() <= MAX_RX_BACKLOG, "{} packets queued for a guest that posts no RX buffers", dev.muxer.rx_len());
        // Once the guest reads again, the held-back TX packets are taken.
        let taken = tx.used();
        let rx_buf = |slot: u16| (0x20_0000 + 0x100 * u64::from(slot), 0x100, F_WRITE);
        for _ in 0..8 {
            rx.refill(rx_buf);
            while dev.process_queue(RX) {}
        }
        assert_ne!(tx.used(), taken, "TX stayed stalled after RX drained");
        let first: VsockHeader = mem.read_obj(GuestAddress(0x20_0000)).expect("rx hdr");
        assert_eq!({ first.op }, OP_RST);
        let _ = std::fs::remove_file(&path);
    }
}
