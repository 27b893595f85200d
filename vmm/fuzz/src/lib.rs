//! Helpers shared by the VMM's fuzz targets: a reader over the fuzz input, and a
//! hostile guest driver's view of split virtqueues in a small guest memory.
//!
//! Inputs are a plain byte format (each target documents its own) rather than
//! `arbitrary`-derived structures, so that `seeds/make_seeds.py` can write valid,
//! meaningful seeds with `struct.pack`: a virtio request the fuzzer starts from is worth
//! far more than one it has to discover.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory of every target: 4 MiB at address 0.
pub const MEM_SIZE: u64 = 4 << 20;
/// Queue `i` has its descriptor table at `QUEUE_BASE + i * QUEUE_STRIDE`, its avail
/// ring 4 KiB above and its used ring 8 KiB above (room for 256 entries each).
pub const QUEUE_BASE: u64 = 0;
pub const QUEUE_STRIDE: u64 = 0x4000;
/// Buffers live from here to the end of memory.
pub const DATA_BASE: u64 = 0x1_0000;
pub const DATA_LEN: u64 = MEM_SIZE - DATA_BASE;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

/// Reads little-endian numbers and byte strings off the fuzz input; past its end
/// everything reads as zero or empty, so any input decodes.
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Reader<'a> {
        Reader { data }
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// Some descriptor of this iteration points into the rings: the device may then
/// write over them, and what the driver reads back says nothing reliable.
static RINGS_TOUCHED: AtomicBool = AtomicBool::new(false);

fn note_buffer(addr: u64, len: u32) {
    if addr < DATA_BASE || addr.checked_add(u64::from(len)).is_none() {
        RINGS_TOUCHED.store(true, Ordering::Relaxed);
    }
}

/// A fresh guest memory (and a fresh iteration).
pub fn memory() -> GuestMemoryMmap {
    RINGS_TOUCHED.store(false, Ordering::Relaxed);
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("guest memory")
}

/// A guest address for a buffer: `raw` taken modulo the data area, unless `raw_addr`
/// asks for the address as given (possibly outside guest memory, or over the rings).
pub fn buffer_addr(raw: u32, raw_addr: bool) -> u64 {
    if raw_addr {
        u64::from(raw)
    } else {
        DATA_BASE + u64::from(raw) % DATA_LEN
    }
}

/// One descriptor as the fuzz input describes it: 11 bytes, `flags_sel u8` (bit 0:
/// the address is raw, see [`buffer_addr`]), `addr u32`, `len u32`, `flags u16`; plus
/// `next u16` for raw chains.
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl RawDesc {
    pub fn read(r: &mut Reader<'_>) -> RawDesc {
        let sel = r.u8();
        let addr = buffer_addr(r.u32(), sel & 1 != 0);
        RawDesc { addr, len: r.u32(), flags: r.u16(), next: r.u16() }
    }
}

/// What the driver knows of one chain it posted: the bytes the device may write.
#[derive(Clone, Copy)]
pub struct Posted {
    pub writable: u64,
}

/// A (hostile) driver's side of one split queue at a fixed place in guest memory.
pub struct DriverQueue {
    pub base: u64,
    pub size: u16,
    next_slot: u16,
    avail_idx: u16,
    used_seen: u16,
    /// Chains posted and not yet used, by head: their descriptor count, and their shape
    /// when it is known.
    posted: HashMap<u16, (u16, Option<Posted>)>,
    /// Descriptors of chains posted and not yet used.
    in_use: u16,
    /// The driver overran the ring or pointed buffers at the rings: what it reads
    /// back no longer says what the device saw, so the used-ring checks stop.
    pub tainted: bool,
}

impl DriverQueue {
    /// Queue number `index` of size `size` (a power of two, at most 256); zeroes its rings.
    pub fn new(mem: &GuestMemoryMmap, index: u64, size: u16) -> DriverQueue {
        let base = QUEUE_BASE + index * QUEUE_STRIDE;
        mem.write_slice(&[0u8; QUEUE_STRIDE as usize], GuestAddress(base)).expect("rings inside guest memory");
        DriverQueue { base, size, next_slot: 0, avail_idx: 0, used_seen: 0, posted: HashMap::new(), in_use: 0, tainted: false }
    }

    /// The slot the next chain's head goes in.
    pub fn next_slot(&self) -> u16 {
        self.next_slot
    }

    pub fn desc_table(&self) -> u64 {
        self.base
    }
    pub fn avail_ring(&self) -> u64 {
        self.base + 0x1000
    }
    pub fn used_ring(&self) -> u64 {
        self.base + 0x2000
    }

    /// The device's view, as the transport would hand it over after DRIVER_OK.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(256).expect("queue");
        q.set_size(self.size);
        q.set_ready(true);
        let (d, a, u) = (self.desc_table(), self.avail_ring(), self.used_ring());
        q.set_desc_table_address(Some(d as u32), Some((d >> 32) as u32));
        q.set_avail_ring_address(Some(a as u32), Some((a >> 32) as u32));
        q.set_used_ring_address(Some(u as u32), Some((u >> 32) as u32));
        q
    }

    fn write_desc(&self, mem: &GuestMemoryMmap, slot: u16, d: &RawDesc) {
        note_buffer(d.addr, d.len);
        let raw = RawDescriptor::from(Descriptor::new(d.addr, d.len, d.flags, d.next));
        mem.write_obj(raw, GuestAddress(self.desc_table() + 16 * u64::from(slot))).expect("descriptor table in memory");
    }

    fn publish(&mut self, mem: &GuestMemoryMmap, head: u16, n: u16, shape: Option<Posted>) {
        // A driver that overwrites descriptors of requests the device has not used yet
        // changes them under the device: what was posted no longer says what it saw.
        if self.in_use + n > self.size {
            self.tainted = true;
        }
        self.in_use = (self.in_use + n).min(self.size);
        let entry = self.avail_ring() + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(entry)).expect("avail ring in memory");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail_ring() + 2)).expect("avail idx");
        self.posted.insert(head, (n, shape));
    }

    /// Posts a well-formed chain of (addr, len, flags) buffers; NEXT links are added.
    pub fn post(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, u16)]) {
        if bufs.is_empty() {
            return;
        }
        let head = self.next_slot;
        let n = bufs.len().min(usize::from(self.size)) as u16;
        let mut writable = 0u64;
        for (i, &(addr, len, flags)) in bufs.iter().take(usize::from(n)).enumerate() {
            let slot = (head + i as u16) % self.size;
            let last = i + 1 == usize::from(n);
            let next = (slot + 1) % self.size;
            let flags = if last { flags & !F_NEXT } else { flags | F_NEXT };
            if flags & F_WRITE != 0 {
                writable += u64::from(len);
            }
            self.write_desc(mem, slot, &RawDesc { addr, len, flags, next });
        }
        self.next_slot = (head + n) % self.size;
        self.publish(mem, head, n, Some(Posted { writable }));
    }

    /// Posts descriptors exactly as given (any flags and next indices: loops, indirect
    /// tables, chains that run off the table) in consecutive slots; the first is the head.
    pub fn post_raw(&mut self, mem: &GuestMemoryMmap, descs: &[RawDesc]) {
        if descs.is_empty() {
            return;
        }
        let head = self.next_slot;
        for (i, d) in descs.iter().take(usize::from(self.size)).enumerate() {
            self.write_desc(mem, (head + i as u16) % self.size, d);
        }
        let n = descs.len().min(usize::from(self.size)) as u16;
        self.next_slot = (head + n) % self.size;
        self.publish(mem, head, n, None);
    }

    /// Checks what the device put on the used ring since the last call, and hands each
    /// new (head, length, what was posted there) to `each`.
    pub fn check_used(&mut self, mem: &GuestMemoryMmap, mut each: impl FnMut(u16, u32, Option<Posted>)) {
        let used_idx: u16 = mem.read_obj(GuestAddress(self.used_ring() + 2)).expect("used idx");
        if RINGS_TOUCHED.load(Ordering::Relaxed) {
            self.tainted = true;
        }
        let new = used_idx.wrapping_sub(self.used_seen);
        if !self.tainted {
            let outstanding = self.avail_idx.wrapping_sub(self.used_seen);
            assert!(new <= outstanding, "the device used {new} requests but only {outstanding} were offered");
        }
        for _ in 0..new {
            let at = self.used_ring() + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = mem.read_obj(GuestAddress(at)).expect("used elem id");
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).expect("used elem len");
            if self.tainted {
                self.used_seen = self.used_seen.wrapping_add(1);
                continue;
            }
            assert!(id < u32::from(self.size), "used ring names descriptor {id} of a {}-entry queue", self.size);
            let (n, shape) = self.posted.remove(&(id as u16)).unwrap_or((0, None));
            self.in_use = self.in_use.saturating_sub(n);
            if let Some(p) = shape {
                assert!(u64::from(len) <= p.writable, "used length {len} but the chain has only {} writable bytes", p.writable);
            }
            each(id as u16, len, shape);
            self.used_seen = self.used_seen.wrapping_add(1);
        }
    }
}

/// A temporary directory for one fuzz iteration, removed when dropped.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("moat-fuzz-").tempdir().expect("a temporary directory")
}
