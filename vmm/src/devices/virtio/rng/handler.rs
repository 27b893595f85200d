//! Queue processing for virtio-rng, over plain guest memory (no KVM needed to test).

use std::io::Read;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::devices::virtio::{next_chain, return_indirect, Avail, GuestFaults};

/// Most bytes served per request: a guest asking for a huge buffer gets part of it
/// (the driver asks again) instead of making the VMM read megabytes at once.
pub const MAX_BYTES_PER_CHAIN: u32 = 64 * 1024;

/// Serves up to `max_chains` available requests on `queue` with bytes from `source`.
/// Returns (whether the driver must be interrupted, whether requests remain).
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
    max_chains: usize,
) -> (bool, bool) {
    let mut used_any = false;
    let mut buf = vec![0u8; 4096];
    let mut served = 0;
    let mut more = false;
    loop {
        if served == max_chains {
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
            if !desc.is_write_only() {
                continue;
            }
            let mut remaining = desc.len().min(MAX_BYTES_PER_CHAIN - written);
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
                remaining -= n as u32;
                addr = vm_memory::GuestAddress(addr.0.wrapping_add(n as u64));
            }
            if written >= MAX_BYTES_PER_CHAIN {
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
        assert!(fill_chains(&mut q, &m, &mut Fives, &mut GuestFaults::new("test"), 16).0);
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
        fill_chains(&mut q, &m, &mut Fives, &mut GuestFaults::new("test"), 16);
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
        fill_chains(&mut q, &m, &mut Fives, &mut GuestFaults::new("test"), 16);
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
        fill_chains(&mut q, &m, &mut Fives, &mut GuestFaults::new("test"), 16);
        // The chain walk stops after queue-size descriptors.
        assert!(used_len(&m, &vq, 0) <= 2 * 16);
    }

    #[test]
    fn huge_requests_are_capped() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.add_desc_chains(&[desc(0x10_0000, 1 << 20, F_WRITE, 0)], 0).expect("chain");
        let mut q: Queue = vq.create_queue().expect("queue");
        fill_chains(&mut q, &m, &mut Fives, &mut GuestFaults::new("test"), 16);
        assert_eq!(used_len(&m, &vq, 0), MAX_BYTES_PER_CHAIN);
    }

    #[test]
    fn several_chains_in_one_notification() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.add_desc_chains(&[desc(0x10_0000, 8, F_WRITE, 0), desc(0x10_1000, 32, F_WRITE, 0)], 0).expect("chains");
        let mut q: Queue = vq.create_queue().expect("queue");
        fill_chains(&mut q, &m, &mut Fives, &mut GuestFaults::new("test"), 16);
        assert_eq!(used_len(&m, &vq, 0), 8);
        assert_eq!(used_len(&m, &vq, 1), 32);
        assert_eq!(fill_chains(&mut q, &m, &mut Fives, &mut GuestFaults::new("test"), 16), (false, false), "nothing left, no interrupt");
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
        assert!(fill_chains(&mut q, &m, &mut Fives, &mut faults, 16).0, "the driver hears about both");
        assert_eq!(used_len(&m, &vq, 0), 0, "returned unused");
        let mut buf = [0u8; 64];
        m.read_slice(&mut buf, GuestAddress(0x10_0000)).expect("read");
        assert_eq!(buf, [0; 64], "the indirect table was not followed");
        assert_eq!(used_len(&m, &vq, 1), 8, "the next request is still served");
        assert_eq!(faults.count(), 1);
    }

    #[test]
    fn work_per_call_is_bounded() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let descs: Vec<_> = (0..3).map(|i| desc(0x10_0000 + i * 0x1000, 8, F_WRITE, 0)).collect();
        vq.add_desc_chains(&descs, 0).expect("chains");
        let mut q: Queue = vq.create_queue().expect("queue");
        assert_eq!(fill_chains(&mut q, &m, &mut Fives, &mut GuestFaults::new("test"), 2), (true, true), "stops after 2, more left");
        assert!(!fill_chains(&mut q, &m, &mut Fives, &mut GuestFaults::new("test"), 2).1, "the third is served next time");
    }
}
