//! One vsock stream between a guest port and a host Unix socket: credit-based flow
//! control in both directions, with every buffer bounded.
//!
//! Guest to host: the guest may send only as much as we advertised (`buf_alloc`
//! minus what is still unwritten); bytes wait in `tx_buf` while the host socket is
//! full, and a guest that overruns the advertised space is reset. Host to guest: we
//! read from the socket only while the guest has credit for it and nothing of this
//! connection is already waiting for RX buffers.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use nix::sys::socket::MsgFlags;

use super::packet::{VsockHeader, MAX_PAYLOAD, OP_CREDIT_UPDATE, TYPE_STREAM};

/// The host's CID, as the guest addresses it.
pub const HOST_CID: u64 = 2;
/// Receive space we advertise per connection (guest-to-host bytes in flight).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated; REQUEST sent to the guest, waiting for its RESPONSE.
    LocalInit,
    Established,
}

#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("guest sent data after shutting down its sending side")]
    AfterShutdown,
    #[error("guest sent more than its credit allows")]
    NoCredit,
    #[error("host socket failed")]
    Host(#[source] io::Error),
}

pub struct Connection {
    pub stream: UnixStream,
    /// The host side's port number (the guest's peer port).
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    pub guest_cid: u64,
    pub state: ConnState,
    tx_buf: VecDeque<u8>,
    /// Guest bytes written to the host socket, as the guest counts them.
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Bytes delivered to the guest.
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// A chunk of host data is queued for the guest already.
    pub rx_pending: bool,
    /// The guest will send no more (SHUTDOWN with SEND).
    guest_done_sending: bool,
    /// The guest wants no more data (SHUTDOWN with RCV).
    guest_done_receiving: bool,
    /// The host side reached EOF: it will send no more, the guest was told so
    /// (SHUTDOWN with SEND), and the other direction stays open.
    host_done_sending: bool,
    /// A CREDIT_UPDATE is owed to the guest.
    pub credit_update_due: bool,
    /// Host-initiated: when the guest must have answered the REQUEST it was given.
    pub answer_by: Option<Instant>,
    /// The host side hung up while the guest still had its last bytes to take; the
    /// socket is no longer watched for hangup (poll would report it forever).
    pub host_hung_up: bool,
    /// With `host_hung_up`: when the connection is reaped if the guest has taken none
    /// of those bytes since.
    pub drain_by: Option<Instant>,
}

impl Connection {
    pub fn new(stream: UnixStream, local_port: u32, peer_port: u32, guest_cid: u64, state: ConnState) -> Connection {
        Connection {
            stream,
            local_port,
            peer_port,
            guest_cid,
            state,
            tx_buf: VecDeque::new(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_pending: false,
            guest_done_sending: false,
            guest_done_receiving: false,
            host_done_sending: false,
            credit_update_due: false,
            answer_by: None,
            host_hung_up: false,
            drain_by: None,
        }
    }

    /// A header from the host side of this connection.
    pub fn header(&self, op: u16, flags: u32) -> VsockHeader {
        VsockHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Takes the guest's view of its receive buffer from any packet it sent.
    pub fn update_peer_credit(&mut self, hdr: &VsockHeader) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
    }

    /// How many more bytes the guest can take. A guest claiming to have consumed more
    /// than we sent gets no extra credit for it.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        if in_flight > self.peer_buf_alloc {
            return 0;
        }
        self.peer_buf_alloc - in_flight
    }

    /// Whether the host socket should be polled for data to send to the guest.
    pub fn wants_host_data(&self) -> bool {
        self.state == ConnState::Established
            && !self.rx_pending
            && !self.guest_done_receiving
            && !self.host_done_sending
            && self.peer_credit() > 0
    }

    /// Whether the host socket should be polled for room to write.
    pub fn wants_host_room(&self) -> bool {
        !self.tx_buf.is_empty()
    }

    /// Payload from the guest. Fails if the guest sent more than it had credit for,
    /// sent after shutting down its sending side, or the host socket failed.
    pub fn recv_from_guest(&mut self, payload: &[u8]) -> Result<(), RecvError> {
        if self.guest_done_sending {
            return Err(RecvError::AfterShutdown);
        }
        if self.tx_buf.len() + payload.len() > CONN_BUF_ALLOC as usize {
            return Err(RecvError::NoCredit);
        }
        // Nothing queued: write straight from the packet and keep only what the
        // socket did not take, saving a copy through the buffer on the common path.
        let mut rest = payload;
        while self.tx_buf.is_empty() && !rest.is_empty() {
            match self.stream.write(rest) {
                Ok(0) => return Err(RecvError::Host(io::Error::from(io::ErrorKind::WriteZero))),
                Ok(n) => {
                    rest = &rest[n..];
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(RecvError::Host(e)),
            }
        }
        self.tx_buf.extend(rest);
        self.flush_to_host().map_err(RecvError::Host)
    }

    /// Writes buffered guest bytes to the host socket until it would block.
    pub fn flush_to_host(&mut self) -> io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        // Tell the guest about freed space once a good part of its window is back
        // (or all of it, if it may be waiting for exactly that).
        let freed = self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent);
        if freed >= CONN_BUF_ALLOC / 4 || (freed > 0 && self.tx_buf.is_empty()) {
            self.credit_update_due = true;
        }
        if self.tx_buf.is_empty() && self.guest_done_sending {
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }

    /// Builds the owed CREDIT_UPDATE, if any.
    pub fn take_credit_update(&mut self) -> Option<VsockHeader> {
        if !self.credit_update_due {
            return None;
        }
        self.credit_update_due = false;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Some(self.header(OP_CREDIT_UPDATE, 0))
    }

    /// Notes that a header carrying our current `fwd_cnt` went to the guest.
    pub fn sent_fwd_cnt(&mut self) {
        self.last_fwd_cnt_sent = self.fwd_cnt;
    }

    /// Reads what the guest has credit for. Ok(None) means the host side closed.
    pub fn read_from_host(&mut self) -> io::Result<Option<Vec<u8>>> {
        let want = self.peer_credit().min(MAX_PAYLOAD) as usize;
        let mut buf = vec![0u8; want];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) if want > 0 => return Ok(None),
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(Some(buf));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Counts bytes delivered to the guest.
    pub fn delivered(&mut self, n: u32) {
        self.rx_cnt = self.rx_cnt.wrapping_add(n);
    }

    pub fn guest_shutdown(&mut self, send: bool, receive: bool) {
        self.guest_done_sending |= send;
        self.guest_done_receiving |= receive;
        if self.guest_done_sending && self.tx_buf.is_empty() {
            let _ = self.stream.shutdown(Shutdown::Write);
        }
    }

    /// The host side reached EOF (see `host_done_sending`).
    pub fn host_eof(&mut self) {
        self.host_done_sending = true;
    }

    /// Whether the host side's EOF was read already.
    pub fn host_done(&self) -> bool {
        self.host_done_sending
    }

    /// Whether the host left bytes the guest has not taken: Some(true) if so,
    /// Some(false) if only EOF is left, None if the socket failed. Reads nothing.
    pub fn host_data_left(&self) -> Option<bool> {
        let mut byte = [0u8; 1];
        let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
        match nix::sys::socket::recv(self.stream.as_raw_fd(), &mut byte, flags) {
            Ok(n) => Some(n > 0),
            // Nothing to read yet is not the end either.
            Err(nix::errno::Errno::EAGAIN) => Some(true),
            Err(_) => None,
        }
    }

    /// Both directions are finished and nothing is left to write: the guest will send
    /// no more, and either it will receive no more or the host has nothing more to say.
    pub fn finished(&self) -> bool {
        self.guest_done_sending && self.tx_buf.is_empty() && (self.guest_done_receiving || self.host_done_sending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nonblocking");
        (Connection::new(a, 1 << 30, 1024, 3, ConnState::Established), b)
    }

    #[test]
    fn credit_follows_the_guest_window() {
        let (mut c, _peer) = pair();
        assert_eq!(c.peer_credit(), 0, "no credit before the guest says anything");
        c.update_peer_credit(&VsockHeader { buf_alloc: 1000, fwd_cnt: 0, ..Default::default() });
        assert_eq!(c.peer_credit(), 1000);
        c.delivered(600);
        assert_eq!(c.peer_credit(), 400);
        c.update_peer_credit(&VsockHeader { buf_alloc: 1000, fwd_cnt: 600, ..Default::default() });
        assert_eq!(c.peer_credit(), 1000);
        // A lying guest (consumed more than sent) gets nothing extra.
        c.update_peer_credit(&VsockHeader { buf_alloc: 1000, fwd_cnt: 5000, ..Default::default() });
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn counters_wrap() {
        let (mut c, _peer) = pair();
        c.delivered(u32::MAX - 9);
        c.update_peer_credit(&VsockHeader { buf_alloc: 100, fwd_cnt: u32::MAX - 9, ..Default::default() });
        c.delivered(30); // wraps
        assert_eq!(c.peer_credit(), 70);
    }

    #[test]
    fn guest_data_reaches_the_host_and_credit_is_returned() {
        let (mut c, mut peer) = pair();
        c.recv_from_guest(b"hello").expect("within credit");
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"hello");
        let upd = c.take_credit_update().expect("credit update owed");
        assert_eq!({ upd.fwd_cnt }, 5);
        assert!(c.take_credit_update().is_none());
    }

    #[test]
    fn guest_overrunning_its_credit_is_refused() {
        let (mut c, _peer) = pair();
        // Nobody reads the peer: fill the socket, then the buffer.
        let chunk = vec![0u8; 64 * 1024];
        let mut sent = 0usize;
        while c.recv_from_guest(&chunk).is_ok() {
            sent += chunk.len();
            assert!(sent < 64 << 20, "must refuse eventually");
        }
        assert!(c.tx_buf.len() <= CONN_BUF_ALLOC as usize);
        assert!(c.wants_host_room());
    }

    #[test]
    fn host_data_is_limited_by_credit_and_eof_is_seen() {
        let (mut c, mut peer) = pair();
        peer.write_all(&[7u8; 100]).expect("write");
        c.update_peer_credit(&VsockHeader { buf_alloc: 10, fwd_cnt: 0, ..Default::default() });
        assert_eq!(c.read_from_host().expect("read").expect("data").len(), 10);
        drop(peer);
        c.update_peer_credit(&VsockHeader { buf_alloc: 1000, fwd_cnt: 0, ..Default::default() });
        let mut total = 0;
        while let Some(d) = c.read_from_host().expect("read") {
            total += d.len();
        }
        assert_eq!(total, 90);
    }

    #[test]
    fn guest_shutdown_closes_the_host_write_side() {
        let (mut c, mut peer) = pair();
        c.recv_from_guest(b"bye").expect("send");
        c.guest_shutdown(true, false);
        let mut s = String::new();
        peer.read_to_string(&mut s).expect("read to EOF");
        assert_eq!(s, "bye");
        assert!(!c.finished());
        c.guest_shutdown(false, true);
        assert!(c.finished());
        assert!(c.recv_from_guest(b"more").is_err(), "no data after SHUTDOWN(SEND)");
    }

    #[test]
    fn host_eof_is_a_half_close() {
        let (mut c, mut peer) = pair();
        c.update_peer_credit(&VsockHeader { buf_alloc: 1000, fwd_cnt: 0, ..Default::default() });
        assert!(c.wants_host_data());
        c.host_eof();
        assert!(!c.wants_host_data(), "nothing more to read from the host");
        assert!(!c.finished(), "the guest may still send");
        c.recv_from_guest(b"still flowing").expect("guest to host after host EOF");
        let mut got = [0u8; 13];
        peer.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"still flowing");
        c.guest_shutdown(true, false);
        assert!(c.finished(), "both sides are done sending");
    }
}
