//! The virtio-vsock device as a hostile guest drives it: packets and chains of any
//! shape on TX (parsed by `packet::read_tx`, then handled by the muxer), RX buffers of
//! any shape, and a host side that dials in and listens.
//!
//! Input: a sequence of operations, each an opcode byte (taken modulo 8):
//! - 0 TX packet: 44 header bytes, `payload_len u16`, the payload, `nsplit u8` (at
//!   most 8) and that many `u16` piece lengths: the packet is laid out contiguously and
//!   posted on TX as a chain cut at those lengths (the rest in a last piece);
//! - 1 TX raw chain: `n u8` (1-8) descriptors as `RawDesc` (any flags, next, address);
//! - 2 RX buffers: `count u8` (0-16), `len u16`: single writable buffers;
//! - 3 RX raw chain, as 1;
//! - 4 kick: `queue u8` (0 RX, 1 TX, 2 event);
//! - 5 host dial: `len u8` and that many bytes written to the VMM's socket (e.g.
//!   `CONNECT 1024\n`), then a round of host readiness;
//! - 6 host round: `flags u8`: every host fd reported ready as it asked (bit 0 adds a
//!   hangup), and with bit 1 the device's deadline is declared come;
//! - 7 guest memory write: `off u32`, `len u8`, bytes, into the buffer area.
//!
//! TX packets go in the lower half of the buffer area; each RX queue slot has its own
//! 68 KiB buffer in the upper half, so no two buffers the device may fill overlap.
//!
//! Checked: no panic; the device never uses more requests than offered nor names a
//! descriptor outside the queue; TX chains come back with length 0; every RX buffer
//! used holds a header from the host to the guest whose `len` is exactly the payload
//! written, within the buffer.
#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use moat_vmm::devices::virtio::vsock::connection::HOST_CID;
use moat_vmm::devices::virtio::vsock::muxer::{Muxer, MAX_CONNECTIONS};
use moat_vmm::devices::virtio::vsock::packet::{VsockHeader, HEADER_LEN, MAX_PAYLOAD, TYPE_STREAM};
use moat_vmm::devices::virtio::vsock::Vsock;
use moat_vmm::devices::virtio::{Activation, IrqLine, Readiness, VirtioDevice};
use moat_vmm_fuzz::{memory, scratch, DriverQueue, RawDesc, Reader, DATA_BASE, DATA_LEN, F_WRITE};

/// Where TX packets are laid out, and where RX slot `s` has its buffer.
const TX_AREA: u64 = DATA_LEN / 2;
const RX_AREA: u64 = DATA_BASE + DATA_LEN / 2;
const RX_SLOT: u64 = 0x1_1000;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const GUEST_CID: u64 = 3;
const QUEUE_SIZE: u16 = 16;
/// The guest port a host listener waits on (`<socket>_1024`), so guest REQUESTs to it
/// become live connections.
const LISTENED_PORT: u32 = 1024;
const MAX_OPS: usize = 64;

struct Rig {
    mem: GuestMemoryMmap,
    dev: Vsock,
    rx: DriverQueue,
    tx: DriverQueue,
    /// Next free byte of the TX area (wraps).
    cursor: u64,
    /// The guest posted raw RX chains, which may point anywhere: RX contents are then
    /// no longer checked.
    rx_raw: bool,
    socket: std::path::PathBuf,
    dials: Vec<UnixStream>,
}

impl Rig {
    /// Room for `len` bytes in the TX area.
    fn alloc(&mut self, len: u64) -> u64 {
        if self.cursor + len > TX_AREA {
            self.cursor = 0;
        }
        let at = DATA_BASE + self.cursor;
        self.cursor += len;
        at
    }

    fn host_round(&mut self, flags: u8) {
        for (fd, read, write) in self.dev.backend_fds() {
            self.dev.backend_ready(fd, Readiness { readable: read, writable: write, hangup: flags & 1 != 0 });
        }
        if flags & 2 != 0 {
            if let Some(due) = self.dev.deadline() {
                self.dev.on_deadline(due.max(Instant::now()) + Duration::from_secs(3600));
            }
        }
    }

    fn check(&mut self) {
        self.tx.check_used(&self.mem, |_, len, _| assert_eq!(len, 0, "a TX chain came back with a length"));
        let mem = &self.mem;
        let mut used = Vec::new();
        self.rx.check_used(mem, |head, len, shape| used.push((head, len, shape)));
        let rx_base = &self.rx;
        for (head, len, shape) in used {
            if len == 0 || shape.is_none() || self.rx_raw {
                continue;
            }
            // Structured RX buffers are single descriptors: the packet is contiguous.
            let desc_at = rx_base.desc_table() + 16 * u64::from(head);
            let addr: u64 = mem.read_obj(GuestAddress(desc_at)).expect("descriptor");
            let hdr: VsockHeader = mem.read_obj(GuestAddress(addr)).expect("RX header");
            let (src, dst, plen, kind) = (hdr.src_cid, hdr.dst_cid, hdr.len, hdr.type_);
            assert_eq!((src, dst, kind), (HOST_CID, GUEST_CID, TYPE_STREAM), "RX packet not from the host to this guest");
            assert!(plen <= MAX_PAYLOAD, "RX payload of {plen} bytes");
            assert_eq!(len as usize, HEADER_LEN + plen as usize, "used length does not match the header's len");
        }
    }
}

fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let dir = scratch();
    let socket = dir.path().join("v.sock");
    let mut sock_name = socket.clone().into_os_string();
    sock_name.push(format!("_{LISTENED_PORT}"));
    let _listener = UnixListener::bind(&sock_name).expect("listener for guest connections");
    let muxer = Muxer::new(&socket, GUEST_CID, MAX_CONNECTIONS).expect("muxer");
    let mem = memory();
    let rx = DriverQueue::new(&mem, 0, QUEUE_SIZE);
    let tx = DriverQueue::new(&mem, 1, QUEUE_SIZE);
    let event = DriverQueue::new(&mem, 2, QUEUE_SIZE);
    let mut dev = Vsock::new(GUEST_CID, muxer);
    let irq = Arc::new(IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")));
    let queues = vec![rx.queue(), tx.queue(), event.queue()];
    dev.activate(Activation { mem: mem.clone(), queues, irq }).expect("activate");
    let mut rig = Rig { mem, dev, rx, tx, cursor: 0, rx_raw: false, socket, dials: Vec::new() };

    for _ in 0..MAX_OPS {
        if r.is_empty() {
            break;
        }
        let op = r.u8() % 8;
        match op {
            0 => {
                let hdr = r.bytes(HEADER_LEN).to_vec();
                let plen = usize::from(r.u16());
                let payload = r.bytes(plen).to_vec();
                let mut packet = hdr;
                packet.extend_from_slice(&payload);
                let at = rig.alloc(packet.len() as u64);
                rig.mem.write_slice(&packet, GuestAddress(at)).expect("packet in memory");
                let nsplit = r.u8() % 9;
                let mut bufs = Vec::new();
                let mut off = 0u64;
                for _ in 0..nsplit {
                    let piece = u64::from(r.u16()).min(packet.len() as u64 - off);
                    bufs.push((at + off, piece as u32, 0));
                    off += piece;
                }
                bufs.push((at + off, (packet.len() as u64 - off) as u32, 0));
                rig.tx.post(&rig.mem, &bufs);
            }
            1 | 3 => {
                let n = usize::from(r.u8() % 8) + 1;
                let descs: Vec<RawDesc> = (0..n).map(|_| RawDesc::read(&mut r)).collect();
                rig.rx_raw |= op == 3;
                let q = if op == 1 { &mut rig.tx } else { &mut rig.rx };
                q.post_raw(&rig.mem, &descs);
            }
            2 => {
                let count = r.u8() % 17;
                let len = u32::from(r.u16()).min(RX_SLOT as u32);
                for _ in 0..count {
                    let at = RX_AREA + RX_SLOT * u64::from(rig.rx.next_slot());
                    rig.rx.post(&rig.mem, &[(at, len, F_WRITE)]);
                }
            }
            4 => {
                let q = usize::from(r.u8() % 3);
                rig.dev.process_queue(q);
                rig.check();
            }
            5 => {
                let n = usize::from(r.u8());
                let line = r.bytes(n).to_vec();
                if let Ok(mut s) = UnixStream::connect(&rig.socket) {
                    let _ = s.write_all(&line);
                    rig.dials.push(s);
                }
                rig.host_round(0);
                rig.check();
            }
            6 => {
                let flags = r.u8();
                rig.host_round(flags);
                rig.check();
            }
            _ => {
                let off = u64::from(r.u32()) % DATA_LEN;
                let n = usize::from(r.u8());
                let bytes = r.bytes(n);
                let n = (bytes.len() as u64).min(DATA_LEN - off) as usize;
                rig.mem.write_slice(&bytes[..n], GuestAddress(DATA_BASE + off)).expect("buffer area");
            }
        }
    }
    // Whatever was left: the guest kicks both queues once more.
    rig.dev.process_queue(1);
    rig.dev.process_queue(0);
    rig.check();
}

fuzz_target!(|data: &[u8]| run(data));
