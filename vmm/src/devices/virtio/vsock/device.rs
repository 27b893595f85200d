//! The virtio-vsock device: RX, TX and event queues, the guest CID in config space,
//! and the muxer behind it.

use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::muxer::Muxer;
use super::packet::{self, OP_RW};
use crate::devices::virtio::{next_chain, read_config_bytes, ActivateError, Activation, IrqLine, VirtioDevice, INT_VRING, VIRTIO_F_VERSION_1};

const TYPE_VSOCK: u32 = 19;
const QUEUE_SIZES: &[u16] = &[256, 256, 64];
const RX: usize = 0;
const TX: usize = 1;

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
}

impl Vsock {
    pub fn new(cid: u64, muxer: Muxer) -> Vsock {
        Vsock { cid, muxer, live: None }
    }

    /// Takes up to a queue's worth of packets the guest queued on TX; true if more
    /// are waiting.
    fn process_tx(&mut self) -> bool {
        let Some(live) = self.live.as_mut() else { return false };
        let mut used = false;
        let mut budget = live.tx.size();
        let mut more = false;
        loop {
            if budget == 0 {
                more = true;
                break;
            }
            budget -= 1;
            let Some(chain) = next_chain(&mut live.tx, &live.mem) else { break };
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
            let Some(chain) = next_chain(&mut live.rx, &live.mem) else { break };
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
            RX => false,
            // The event queue only ever holds buffers for events moat never sends.
            _ => return false,
        };
        let more_rx = self.deliver_rx();
        more_tx || more_rx
    }

    fn reset(&mut self) {
        self.live = None;
        self.muxer.reset_all();
    }

    fn backend_fds(&self) -> Vec<(RawFd, bool, bool)> {
        self.muxer.fds()
    }

    fn backend_ready(&mut self, fd: RawFd, readable: bool, writable: bool) -> bool {
        self.muxer.ready(fd, readable, writable);
        self.deliver_rx()
    }
}
