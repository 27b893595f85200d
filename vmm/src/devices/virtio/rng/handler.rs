//! Queue processing for virtio-rng, over plain guest memory (no KVM needed to test).

use std::io::Read;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::devices::virtio::{next_chain, return_indirect, Avail, GuestFaults};

/// Most bytes served per request: a guest asking for a huge buffer gets part of it
/// (the driver asks again) instead of making the VMM read megabytes at once.
pub const MAX_BYTES_PER_CHAIN: u32 = 64 * 1024;
/// Most bytes served per notification round (four whole requests), so that a guest
/// keeping its queue full of large buffers holds the main thread for well under a
/// millisecond of host entropy reads at a time.
pub const MAX_BYTES_PER_ROUND: u32 = 4 * MAX_BYTES_PER_CHAIN;
/// Most descriptors walked per round: a queue whose every entry names a chain looping
/// through the whole descriptor table would otherwise cost queue-size squared reads.
pub const MAX_DESCRIPTORS_PER_ROUND: u32 = 1024;

/// How much one call of [`fill_chains`] may do.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub chains: usize,
    pub descriptors: u32,
    pub bytes: u32,
}

impl Budget {
    /// One round on a queue of `size` entries: at most a queue's worth of requests,
    /// `MAX_DESCRIPTORS_PER_ROUND` descriptors and `MAX_BYTES_PER_ROUND` bytes.
    pub fn round(size: u16) -> Budget {
        Budget { chains: usize::from(size), descriptors: MAX_DESCRIPTORS_PER_ROUND, bytes: MAX_BYTES_PER_ROUND }
    }
}

/// Serves available requests on `queue` with bytes from `source`, within `budget`.
/// Returns (whether the driver must be interrupted, whether requests may remain).
/// When the budget runs out the request in hand is completed with what it got (a
/// short read is fine for entropy) and "requests may remain" is returned: the main
/// loop then signals the queue's eventfd itself, so the rest is served on the next
/// round without the guest kicking again.
///
/// Each descriptor chain may have any shape: one or many device-writable buffers, in
/// any split. Read-only buffers carry nothing for this device and are skipped; a
/// buffer outside guest memory ends that request with what was written so far. A
/// chain with an indirect descriptor is a guest fault, returned unused.
pub fn fill_chains(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    source: &mut impl Read,
    faults: &mut GuestFaults,
    budget: Budget,
) -> (bool, bool) {
    let mut used_any = false;
    let mut buf = vec![0u8; 4096];
    let mut served = 0;
    let (mut descriptors_left, mut bytes_left) = (budget.descriptors, budget.bytes);
    let mut more = false;
    loop {
        if served == budget.chains || descriptors_left == 0 || bytes_left == 0 {
            more = true;
            break;
        }
        served += 1;
        let chain = match next_chain(queue, mem) {
            None => break,
            Some(Avail::Chain(chain)) => chain,
            Some(Avail::Indirect(head)) => {
                if !return_indirect(queue, mem, head, faults) {
                    break;
                }
                used_any = true;
                continue;
            }
        };
        let head = chain.head_index();
        let mut written: u32 = 0;
        'descs: for desc in chain {
            if descriptors_left == 0 {
                break;
            }
            descriptors_left -= 1;
            if !desc.is_write_only() {
                continue;
            }
            let mut remaining = desc.len().min(MAX_BYTES_PER_CHAIN - written).min(bytes_left);
            let mut addr = desc.addr();
            while remaining > 0 {
                let n = (remaining as usize).min(buf.len());
                if source.read_exact(&mut buf[..n]).is_err() {
                    log::warn!("virtio-rng: host entropy source failed");
                    break 'descs;
                }
                if mem.write_slice(&buf[..n], addr).is_err() {
                    log::debug!("virtio-rng: buffer at {addr:?} is outside guest memory");
                    break 'descs;
                }
                written += n as u32;
                bytes_left -= n as u32;
                remaining -= n as u32;
                addr = vm_memory::GuestAddress(addr.0.wrapping_add(n as u64));
            }
            if written >= MAX_BYTES_PER_CHAIN || bytes_left == 0 {
                break;
            }
        }
        if let Err(e) = queue.add_used(mem, head, written) {
            log::debug!("virtio-rng: cannot return request {head}: {e}");
            break;
        }
        used_any = true;
    }
    (used_any && queue.needs_notification(mem).unwrap_or(true), more)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;

    /// A source that yields 0x5a forever.
    struct Fives;
    impl Read for Fives {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            b.fill(0x5a);
            Ok(b.len())
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("mem")
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    fn used_len(m: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>, i: u64) -> u32 {
        m.read_obj::<u32>(GuestAddress(q.used_addr().0 + 4 + i * 8 + 4)).expect("used len")
    }

    #[test]
    fn single_buffer_is_filled() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.add_desc_chains(&[desc(0x10_0000, 64, F_WRITE, 0)], 0).expect("chain");
        let mut q: Queue = vq.create_queue().expect("queue");
        assert!(fill_chains(&mut q, &m, &mut Fives, &mut GuestFaults::new("test"), Budget::round(16)).0);
        let mut out = [0u8; 64];
        m.read_slice(&mut out, GuestAddress(0x10_0000)).expect("read");
        assert_eq!(out, [0x5a; 64]);
        assert_eq!(used_len(&m, &vq, 0), 64);
    }

    #[test]
    fn any_split_is_accepted_and_read_only_parts_skipped() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        // write(3) -> read-only(8) -> write(1): 4 bytes written in total.
        vq.add_desc_chains(
            &[
                desc(0x10_0000, 3, F_WRITE | F_NEXT, 1),
                desc(0x10_1000, 8, F_NEXT, 2),
                desc(0x10_2000, 1, F_WRITE, 0),
            ],
            0,
        )
        .expect("chain");
        let mut q: Queue = vq.create_queue().expect("queue");
        fill_chains(&mut q, &m, &mut Fives, &mut GuestFaults::new("test"), Budget::round(16));
        assert_eq!(used_len(&m, &vq, 0), 4);
        let mut ro = [0u8; 8];
        m.read_slice(&mut ro, GuestAddress(0x10_1000)).expect("read");
        assert_eq!(ro, [0; 8], "read-only buffer untouched");
    }

    #[test]
    fn buffer_outside_memory_ends_the_request_without_panic() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.add_desc_chains(&[desc(0x10_0000, 16, F_WRITE | F_NEXT, 1), desc(0xffff_0000, 16, F_WRITE, 0)], 0)
            .expect("chain");
        let mut q: Queue = vq.create_queue().expect("queue");
        fill_chains(&mut q, &m, &mut Fives, &mut GuestFaults::new("test"), Budget::round(16));
        assert_eq!(used_len(&m, &vq, 0), 16);
    }

    #[test]
    fn a_descriptor_loop_is_bounded() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        // Two descriptors pointing at each other forever.
        vq.add_desc_chains(&[desc(0x10_0000, 2, F_WRITE | F_NEXT, 1), desc(0x10_1000, 2, F_WRITE | F_NEXT, 0)], 0)
            .expect("chain");
        let mut q: Queue = vq.create_queue().expect("queue");
        fill_chains(&mut q, &m, &mut Fives, &mut GuestFaults::new("test"), Budget::round(16));
        // The chain walk stops after queue-size descriptors.
        assert!(used_len(&m, &vq, 0) <= 2 * 16);
    }

    #[test]
    fn huge_requests_are_capped() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.add_desc_chains(&[desc(0x10_0000, 1 << 20, F_WRITE, 0)], 0).expect("chain");
        let mut q: Queue = vq.create_queue().expect("queue");
        fill_chains(&mut q, &m, &mut Fives, &mut GuestFaults::new("test"), Budget::round(16));
        assert_eq!(used_len(&m, &vq, 0), MAX_BYTES_PER_CHAIN);
    }

    #[test]
    fn several_chains_in_one_notification() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.add_desc_chains(&[desc(0x10_0000, 8, F_WRITE, 0), desc(0x10_1000, 32, F_WRITE, 0)], 0).expect("chains");
        let mut q: Queue = vq.create_queue().expect("queue");
        fill_chains(&mut q, &m, &mut Fives, &mut GuestFaults::new("test"), Budget::round(16));
        assert_eq!(used_len(&m, &vq, 0), 8);
        assert_eq!(used_len(&m, &vq, 1), 32);
        assert_eq!(fill_chains(&mut q, &m, &mut Fives, &mut GuestFaults::new("test"), Budget::round(16)), (false, false), "nothing left, no interrupt");
    }

    #[test]
    fn indirect_chains_are_refused() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        // An indirect table holding one device-writable 64-byte buffer, behind the
        // first chain; a plain request after it.
        m.write_obj(desc(0x10_0000, 64, F_WRITE, 0), GuestAddress(0x20_0000)).expect("indirect table");
        vq.add_desc_chains(&[desc(0x20_0000, 16, F_INDIRECT, 0), desc(0x10_1000, 8, F_WRITE, 0)], 0).expect("chains");
        let mut q: Queue = vq.create_queue().expect("queue");
        let mut faults = GuestFaults::new("test");
        assert!(fill_chains(&mut q, &m, &mut Fives, &mut faults, Budget::round(16)).0, "the driver hears about both");
        assert_eq!(used_len(&m, &vq, 0), 0, "returned unused");
        let mut buf = [0u8; 64];
        m.read_slice(&mut buf, GuestAddress(0x10_0000)).expect("read");
        assert_eq!(buf, [0; 64], "the indirect table was not followed");
        assert_eq!(used_len(&m, &vq, 1), 8, "the next request is still served");
        assert_eq!(faults.count(), 1);
    }

    /// Counts the bytes it hands out.
    struct Counting(usize);
    impl Read for Counting {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            b.fill(0x5a);
            Ok(b.len())
        }
    }

    #[test]
    fn bytes_per_round_are_capped_and_the_rest_served_later() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 256);
        // A full queue of 64 KiB requests (all into the same buffer): 16 MiB in all.
        let descs: Vec<_> = (0..256).map(|_| desc(0x10_0000, MAX_BYTES_PER_CHAIN, F_WRITE, 0)).collect();
        vq.add_desc_chains(&descs, 0).expect("chains");
        let mut q: Queue = vq.create_queue().expect("queue");
        let mut faults = GuestFaults::new("test");
        let mut source = Counting(0);
        let (_, more) = fill_chains(&mut q, &m, &mut source, &mut faults, Budget::round(256));
        assert_eq!(source.0, MAX_BYTES_PER_ROUND as usize, "one round reads at most its byte budget");
        assert!(more, "and says more is waiting, so the main loop comes back");
        let mut rounds = 1;
        while fill_chains(&mut q, &m, &mut source, &mut faults, Budget::round(256)).1 {
            rounds += 1;
            assert!(rounds <= 256, "the queue must drain");
        }
        assert_eq!(source.0, 256 * MAX_BYTES_PER_CHAIN as usize, "every request served in the end");
        assert!((0..256).all(|i| used_len(&m, &vq, i) == MAX_BYTES_PER_CHAIN), "each one whole");
    }

    #[test]
    fn descriptors_per_round_are_capped() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 256);
        // One chain looping through the whole table, one writable byte per descriptor,
        // and every avail entry naming it: 65,536 descriptor visits if nothing stops it.
        let descs: Vec<_> = (0..256u16).map(|i| desc(0x10_0000 + u64::from(i), 1, F_WRITE | F_NEXT, (i + 1) % 256)).collect();
        vq.add_desc_chains(&descs, 0).expect("chain");
        for i in 0..256u64 {
            m.write_obj(0u16, GuestAddress(vq.avail_addr().0 + 4 + 2 * i)).expect("avail entry");
        }
        m.write_obj(256u16, GuestAddress(vq.avail_addr().0 + 2)).expect("avail idx");
        let mut q: Queue = vq.create_queue().expect("queue");
        let mut source = Counting(0);
        let (_, more) = fill_chains(&mut q, &m, &mut source, &mut GuestFaults::new("test"), Budget::round(256));
        assert!(more);
        assert_eq!(source.0, MAX_DESCRIPTORS_PER_ROUND as usize, "one byte per descriptor walked");
        let used_idx: u16 = m.read_obj(GuestAddress(vq.used_addr().0 + 2)).expect("used idx");
        assert_eq!(u32::from(used_idx), MAX_DESCRIPTORS_PER_ROUND / 256, "requests completed this round");
    }

    #[test]
    fn work_per_call_is_bounded() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let descs: Vec<_> = (0..3).map(|i| desc(0x10_0000 + i * 0x1000, 8, F_WRITE, 0)).collect();
        vq.add_desc_chains(&descs, 0).expect("chains");
        let mut q: Queue = vq.create_queue().expect("queue");
        assert_eq!(fill_chains(&mut q, &m, &mut Fives, &mut GuestFaults::new("test"), Budget { chains: 2, ..Budget::round(16) }), (true, true), "stops after 2, more left");
        assert!(!fill_chains(&mut q, &m, &mut Fives, &mut GuestFaults::new("test"), Budget { chains: 2, ..Budget::round(16) }).1, "the third is served next time");
    }
}
