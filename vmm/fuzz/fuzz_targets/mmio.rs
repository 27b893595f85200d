//! The virtio-mmio transport as a hostile guest drives it: register reads and writes
//! of any offset, width and value (feature negotiation, status changes, queue setup,
//! notifications, config space), with guest memory written in between, against a real
//! device behind it (virtio-blk, virtio-vsock or virtio-rng), so that a queue the
//! driver manages to make live is served.
//!
//! Input: `device u8` (modulo 3: blk, vsock, rng), then operations, each an opcode
//! byte (modulo 4):
//! - 0 write: `offset u16` (modulo 0x1100: registers, config space and past the
//!   window), `width u8` (1, 2, 4 or 8 bytes by its value modulo 4), `value u64`;
//! - 1 read: `offset u16`, `width u8`;
//! - 2 guest memory write: `addr u32` (modulo the memory size, rings included), `len
//!   u8`, bytes;
//! - 3 queue notification through the ioeventfd path: `queue u8` (modulo 4).
//!
//! Checked: no panic; the identity registers always read the same; accesses to
//! registers that are not aligned 32-bit read as zero; a reset (Status 0) leaves the
//! status and the queue's readiness at zero.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use moat_vmm::devices::bus::BusDevice;
use moat_vmm::devices::virtio::block::Block;
use moat_vmm::devices::virtio::mmio::MmioTransport;
use moat_vmm::devices::virtio::rng::Rng;
use moat_vmm::devices::virtio::vsock::muxer::{Muxer, MAX_CONNECTIONS};
use moat_vmm::devices::virtio::vsock::Vsock;
use moat_vmm::devices::virtio::{IrqLine, VirtioDevice};
use moat_vmm_fuzz::{memory, scratch, Reader, MEM_SIZE};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MAX_OPS: usize = 256;
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_QUEUE_READY: u64 = 0x044;
const REG_STATUS: u64 = 0x070;
const CONFIG_SPACE: u64 = 0x100;

fn read(t: &mut MmioTransport, offset: u64, width: usize) -> Vec<u8> {
    let mut b = vec![0xa5u8; width];
    t.read(offset, &mut b);
    b
}

fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
    let b = read(t, offset, 4);
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let dir = scratch();
    let device: Box<dyn VirtioDevice> = match r.u8() % 3 {
        0 => {
            let path = dir.path().join("disk");
            std::fs::write(&path, vec![7u8; 8 * 512]).expect("disk file");
            Box::new(Block::new(&path, false, "moat-fuzz-disk").expect("block device"))
        }
        1 => Box::new(Vsock::new(3, Muxer::new(&dir.path().join("v.sock"), 3, MAX_CONNECTIONS).expect("muxer"))),
        _ => Box::new(Rng::new().expect("rng device")),
    };
    let device_type = device.device_type();
    let mem = memory();
    let irq = Arc::new(IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")));
    let mut t = MmioTransport::new(device, mem.clone(), irq);

    for _ in 0..MAX_OPS {
        if r.is_empty() {
            break;
        }
        match r.u8() % 4 {
            0 => {
                let offset = u64::from(r.u16()) % 0x1100;
                let width = 1usize << (r.u8() % 4);
                let value = r.u64().to_le_bytes();
                t.write(offset, &value[..width]);
                if offset == REG_STATUS && width == 4 && value[..4] == [0; 4] {
                    assert_eq!(read32(&mut t, REG_STATUS), 0, "status after a reset");
                    assert_eq!(read32(&mut t, REG_QUEUE_READY), 0, "queue 0 ready after a reset");
                }
            }
            1 => {
                let offset = u64::from(r.u16()) % 0x1100;
                let width = 1usize << (r.u8() % 4);
                let got = read(&mut t, offset, width);
                if offset < CONFIG_SPACE && (width != 4 || offset % 4 != 0) {
                    assert!(got.iter().all(|&b| b == 0), "odd register read at {offset:#x} width {width}: {got:?}");
                }
            }
            2 => {
                let addr = u64::from(r.u32()) % MEM_SIZE;
                let n = usize::from(r.u8());
                let bytes = r.bytes(n);
                let n = (bytes.len() as u64).min(MEM_SIZE - addr) as usize;
                mem.write_slice(&bytes[..n], GuestAddress(addr)).expect("inside guest memory");
            }
            _ => {
                let q = usize::from(r.u8() % 4);
                t.notify(q);
            }
        }
        assert_eq!(read32(&mut t, REG_MAGIC), 0x7472_6976, "magic");
        assert_eq!(read32(&mut t, REG_VERSION), 2, "version");
        assert_eq!(read32(&mut t, REG_DEVICE_ID), device_type, "device id");
        assert_eq!(read32(&mut t, REG_VENDOR_ID), 0x5441_4f4d, "vendor id");
    }
}

fuzz_target!(|data: &[u8]| run(data));
