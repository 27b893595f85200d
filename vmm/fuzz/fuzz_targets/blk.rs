//! The virtio-blk device as a hostile guest drives it: requests of any type and
//! sector split across descriptors in any way, raw chains of any shape, and guest
//! memory scribbled between kicks, over an 8-sector backing file.
//!
//! Input: `mode u8` (bit 0: a read-only disk; bits 1-3: queue size 2^(1+n), at most
//! 256), then operations, each an opcode byte (modulo 4):
//! - 0 request: `type u32`, `sector u64`, `data_len u16`, the data, then `n u8`
//!   (1-256, as n + 1) descriptors of `flags u8` (bit 0 device-writable, bit 1 the descriptor's
//!   address is raw as in `RawDesc`, taking a `u32`) and `len u32` each: the header
//!   and data are laid out contiguously and the descriptors cover them in order;
//! - 1 raw chain: `n u8` (1-8) `RawDesc`s;
//! - 2 kick;
//! - 3 guest memory write: `off u32`, `len u8`, bytes, into the buffer area.
//!
//! Checked: no panic; the device never uses more requests than offered, names a
//! descriptor outside the queue or reports more bytes than the chain could take; the
//! backing file keeps its size (nothing is written past the disk's capacity) and a
//! read-only disk its contents.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use moat_vmm::devices::virtio::block::Block;
use moat_vmm::devices::virtio::{Activation, IrqLine, VirtioDevice};
use moat_vmm_fuzz::{buffer_addr, memory, scratch, DriverQueue, RawDesc, Reader, DATA_BASE, DATA_LEN, F_WRITE};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const DISK_BYTES: usize = 8 * 512;
const MAX_OPS: usize = 64;

fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let mode = r.u8();
    let read_only = mode & 1 != 0;
    let size = 1u16 << (1 + (mode >> 1) % 8);
    let dir = scratch();
    let path = dir.path().join("disk");
    let image: Vec<u8> = (0..DISK_BYTES).map(|i| (i / 512) as u8 + 1).collect();
    std::fs::write(&path, &image).expect("disk file");
    let mut dev = Block::new(&path, read_only, "moat-fuzz-disk").expect("block device");
    let mem = memory();
    let mut q = DriverQueue::new(&mem, 0, size);
    let irq = Arc::new(IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")));
    dev.activate(Activation { mem: mem.clone(), queues: vec![q.queue()], irq }).expect("activate");
    let mut cursor = 0u64;

    for _ in 0..MAX_OPS {
        if r.is_empty() {
            break;
        }
        match r.u8() % 4 {
            0 => {
                let mut bytes = Vec::with_capacity(16);
                bytes.extend_from_slice(&r.u32().to_le_bytes());
                bytes.extend_from_slice(&0u32.to_le_bytes());
                bytes.extend_from_slice(&r.u64().to_le_bytes());
                let n = usize::from(r.u16());
                bytes.extend_from_slice(r.bytes(n));
                let ndesc = usize::from(r.u8()) + 1;
                // Room for the layout and for the lengths the descriptors claim beyond it.
                if cursor + (1 << 20) > DATA_LEN {
                    cursor = 0;
                }
                let at = DATA_BASE + cursor;
                mem.write_slice(&bytes, GuestAddress(at)).expect("request in memory");
                let mut off = 0u64;
                let mut bufs = Vec::new();
                for _ in 0..ndesc {
                    let flags = r.u8();
                    let addr = if flags & 2 != 0 { buffer_addr(r.u32(), true) } else { at + off };
                    let len = r.u32() % (64 << 10);
                    off += u64::from(len);
                    bufs.push((addr, len, if flags & 1 != 0 { F_WRITE } else { 0 }));
                }
                cursor += off.max(bytes.len() as u64).min(1 << 20);
                q.post(&mem, &bufs);
            }
            1 => {
                let n = usize::from(r.u8() % 8) + 1;
                let descs: Vec<RawDesc> = (0..n).map(|_| RawDesc::read(&mut r)).collect();
                q.post_raw(&mem, &descs);
            }
            2 => {
                dev.process_queue(0);
                q.check_used(&mem, |_, _, _| {});
            }
            _ => {
                let off = u64::from(r.u32()) % DATA_LEN;
                let n = usize::from(r.u8());
                let bytes = r.bytes(n);
                let n = (bytes.len() as u64).min(DATA_LEN - off) as usize;
                mem.write_slice(&bytes[..n], GuestAddress(DATA_BASE + off)).expect("buffer area");
            }
        }
    }
    for _ in 0..1024 {
        if !dev.process_queue(0) {
            break;
        }
    }
    q.check_used(&mem, |_, _, _| {});
    let after = std::fs::read(&path).expect("disk file");
    assert_eq!(after.len(), DISK_BYTES, "the backing file changed size");
    if read_only {
        assert!(after == image, "a read-only disk was written");
    }
}

fuzz_target!(|data: &[u8]| run(data));
