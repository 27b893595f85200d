//! The host side of hybrid vsock: one listening Unix socket for host-initiated
//! connections (`CONNECT <port>\n` -> `OK <host port>\n`), and `<uds>_<port>` sockets
//! for guest-initiated ones, multiplexed onto the guest's vsock device.
//!
//! Everything the guest sends is checked: addresses must be ours, packets for
//! connections that do not exist are answered with RST, and the number of
//! connections and of half-open host handshakes is capped.
//!
//! Nothing the guest does (or fails to do) keeps host resources forever or makes the
//! main loop spin: every connection's socket is watched for hangup, so one whose host
//! side closed is reaped once nothing more can flow (at once, or when the guest has
//! taken the host's last bytes, or after `DRAIN_TIMEOUT` if it takes none); a
//! host-initiated connection the guest never answers is reaped after
//! `ANSWER_TIMEOUT`; and when `accept` fails for want of file descriptors the
//! listener rests for `ACCEPT_BACKOFF` instead of waking the loop again at once.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::connection::{ConnState, Connection, HOST_CID};
use super::packet::*;
use crate::devices::virtio::Readiness;

/// Most live connections per VM; more are refused with RST. Fewer if the process may
/// not open enough files for them (`raise_fd_limit`).
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host connections still sending their `CONNECT` line.
const MAX_HANDSHAKES: usize = 64;
const MAX_HANDSHAKE_LINE: usize = 32;
/// Host ports for host-initiated connections are taken from here up.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// How long a host-initiated connection waits for the guest to answer its REQUEST,
/// from when the REQUEST reached the guest's RX ring. A live guest kernel answers at
/// once (RESPONSE, or RST when nothing listens), whatever its programs do, but a
/// guest whose vCPUs the host does not run for a while (many pods booting on few
/// cores) answers late. Not shorter than the longest handshake the shim waits for
/// (30 s, stdio streams), so the VMM never gives up on a dial before its caller does.
/// The dialer is told (`ERR ...`) rather than left to take the close for a refusal.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// What a dial the guest did not answer in time reads before its close.
pub const ANSWER_TIMEOUT_REPLY: &[u8] = b"ERR the guest did not answer\n";
/// How long a connection whose host side hung up with bytes the guest has not taken
/// (it gives no credit) is kept for the guest to take them; the clock restarts each
/// time it takes some. A guest kernel takes up to its socket buffer (256 KiB by
/// default) without its program reading, so only a program that leaves its input
/// unread this long after the host finished writing can lose the end of it.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the listener rests after `accept` failed for want of fds or memory.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// File descriptors the VMM needs besides vsock connections and handshakes (KVM, vCPU
/// fds, eventfds, disks, fs backends, the console), with room to spare.
const OTHER_FDS: u64 = 256;
/// The fewest connections allowed however low the fd limit (agent API, log, stdio).
const MIN_CONNECTIONS: usize = 16;
/// A host-side failure log line (accept failing) at most this often.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("vsock socket {0} already exists; remove it if no VM uses it")]
    Exists(PathBuf),
    #[error("cannot listen on vsock socket {0}")]
    Listen(PathBuf, #[source] io::Error),
}

/// Raises the soft RLIMIT_NOFILE to the hard limit, and returns how many connections
/// the muxer may then hold: `MAX_CONNECTIONS`, or fewer when the hard limit leaves no
/// room for them besides the handshakes and the VMM's other fds (said once, here).
pub fn raise_fd_limit() -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let limit = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                log::warn!("vsock: cannot raise the open-file limit from {soft} to {hard}: {e}");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            log::warn!("vsock: cannot read the open-file limit: {e}");
            return MAX_CONNECTIONS;
        }
    };
    let cap = connection_cap(limit);
    if cap < MAX_CONNECTIONS {
        log::warn!(
            "vsock: the open-file limit {limit} leaves room for {cap} connections, not {MAX_CONNECTIONS}; \
             raise RLIMIT_NOFILE to {} for all of them",
            MAX_CONNECTIONS as u64 + MAX_HANDSHAKES as u64 + OTHER_FDS
        );
    }
    cap
}

/// Connections that fit under an open-file limit of `nofile`.
fn connection_cap(nofile: u64) -> usize {
    let room = nofile.saturating_sub(MAX_HANDSHAKES as u64 + OTHER_FDS);
    usize::try_from(room).unwrap_or(usize::MAX).clamp(MIN_CONNECTIONS, MAX_CONNECTIONS)
}

/// A packet for the guest: header and (for RW) payload.
pub type RxPacket = (VsockHeader, Vec<u8>);

type Key = (u32, u32); // (local port, peer port)

pub struct Muxer {
    path: PathBuf,
    listener: UnixListener,
    guest_cid: u64,
    max_connections: usize,
    conns: HashMap<Key, Connection>,
    handshakes: Vec<(UnixStream, Vec<u8>)>,
    /// Control packets and data waiting for RX buffers, in order.
    rx: VecDeque<RxPacket>,
    /// Payload bytes of the front packet already delivered (a payload larger than
    /// one RX buffer goes out in pieces without being copied again).
    rx_front_offset: usize,
    next_local_port: u32,
    /// The listener is not polled until then (`accept` ran out of fds).
    listener_rests_until: Option<Instant>,
    last_accept_log: Option<Instant>,
}

impl Muxer {
    /// Listens on `path` for host connections to the guest `guest_cid`, holding at
    /// most `max_connections` at a time.
    pub fn new(path: &Path, guest_cid: u64, max_connections: usize) -> Result<Muxer, MuxerError> {
        if path.symlink_metadata().is_ok() {
            return Err(MuxerError::Exists(path.to_path_buf()));
        }
        let listener = UnixListener::bind(path).map_err(|e| MuxerError::Listen(path.to_path_buf(), e))?;
        listener.set_nonblocking(true).map_err(|e| MuxerError::Listen(path.to_path_buf(), e))?;
        Ok(Muxer {
            path: path.to_path_buf(),
            listener,
            guest_cid,
            max_connections,
            conns: HashMap::new(),
            handshakes: Vec::new(),
            rx: VecDeque::new(),
            rx_front_offset: 0,
            next_local_port: FIRST_LOCAL_PORT,
            listener_rests_until: None,
            last_accept_log: None,
        })
    }

    /// File descriptors to poll: (fd, want read, want write). Each is also watched for
    /// hangup, which is why a connection that wants neither is listed too, until its
    /// hangup has been handled.
    pub fn fds(&self) -> Vec<(RawFd, bool, bool)> {
        let mut v = Vec::with_capacity(1 + self.handshakes.len() + self.conns.len());
        if self.handshakes.len() < MAX_HANDSHAKES && self.listener_rests_until.is_none() {
            v.push((self.listener.as_raw_fd(), true, false));
        }
        v.extend(self.handshakes.iter().map(|(s, _)| (s.as_raw_fd(), true, false)));
        for c in self.conns.values() {
            let (read, write) = (c.wants_host_data(), c.wants_host_room());
            if read || write || !c.host_hung_up {
                v.push((c.stream.as_raw_fd(), read, write));
            }
        }
        v
    }

    /// Handles readiness of `fd`.
    pub fn ready(&mut self, fd: RawFd, ready: Readiness) {
        if fd == self.listener.as_raw_fd() {
            self.accept();
            return;
        }
        if let Some(i) = self.handshakes.iter().position(|(s, _)| s.as_raw_fd() == fd) {
            self.read_handshake(i);
            return;
        }
        let Some(key) = self.conns.iter().find(|(_, c)| c.stream.as_raw_fd() == fd).map(|(k, _)| *k) else {
            return;
        };
        if ready.writable || ready.hangup {
            let failed = self.conns.get_mut(&key).is_some_and(|c| c.wants_host_room() && c.flush_to_host().is_err());
            // The last buffered bytes of a connection both sides have shut down.
            let done = self.conns.get(&key).is_some_and(|c| c.finished());
            if failed || done {
                self.reset(key);
                return;
            }
        }
        if ready.readable || ready.hangup {
            self.read_host(key);
        }
        if ready.hangup {
            self.host_hung_up(key);
        }
        self.collect_credit_updates();
    }

    /// When `on_deadline` must run next: the listener's rest ends, a guest's time to
    /// answer runs out, or a hung-up connection's time to drain does.
    pub fn deadline(&self) -> Option<Instant> {
        let conns = self.conns.values().filter_map(|c| match c.state {
            ConnState::LocalInit => c.answer_by,
            ConnState::Established => c.drain_by,
        });
        self.listener_rests_until.into_iter().chain(conns).min()
    }

    /// Ends the listener's rest and reaps the connections whose time ran out.
    pub fn on_deadline(&mut self, now: Instant) {
        if self.listener_rests_until.is_some_and(|t| t <= now) {
            self.listener_rests_until = None;
        }
        let due = |t: Option<Instant>| t.is_some_and(|t| t <= now);
        let unanswered: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state == ConnState::LocalInit && due(c.answer_by))
            .map(|(k, _)| *k)
            .collect();
        for key in unanswered {
            if let Some(c) = self.conns.get_mut(&key) {
                // Non-blocking, and a fresh socket's buffer holds it: best effort.
                let _ = c.stream.write_all(ANSWER_TIMEOUT_REPLY);
            }
            self.forget_unanswered(key);
        }
        let undrained: Vec<Key> = self.conns.iter().filter(|(_, c)| due(c.drain_by)).map(|(k, _)| *k).collect();
        for key in undrained {
            self.reset(key);
        }
    }

    fn accept(&mut self) {
        while self.handshakes.len() < MAX_HANDSHAKES {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if s.set_nonblocking(true).is_ok() {
                        self.handshakes.push((s, Vec::new()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) => {
                    // The connection waits in the backlog: poll would report it again
                    // at once, and accept fail again, until an fd is free.
                    let now = Instant::now();
                    self.listener_rests_until = Some(now + ACCEPT_BACKOFF);
                    if self.last_accept_log.is_none_or(|t| now.duration_since(t) >= LOG_INTERVAL) {
                        self.last_accept_log = Some(now);
                        log::warn!("vsock: cannot accept host connections ({e}); retrying every {ACCEPT_BACKOFF:?}");
                    }
                    break;
                }
                Err(_) => break,
            }
        }
    }

    fn read_handshake(&mut self, i: usize) {
        let mut byte = [0u8; 1];
        // Read one byte at a time so nothing after the line is consumed here.
        loop {
            let (stream, line) = &mut self.handshakes[i];
            match stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break,
                Ok(1) if line.len() < MAX_HANDSHAKE_LINE => line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // EOF, error or an over-long line: drop the handshake.
                _ => {
                    self.handshakes.swap_remove(i);
                    return;
                }
            }
        }
        let (mut stream, line) = self.handshakes.swap_remove(i);
        let port = std::str::from_utf8(&line)
            .ok()
            .and_then(|l| l.strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let Some(peer_port) = port else {
            let _ = stream.write_all(b"ERR bad request; expected CONNECT <port>\n");
            return;
        };
        if self.conns.len() >= self.max_connections {
            let _ = stream.write_all(b"ERR too many connections\n");
            return;
        }
        let local_port = self.alloc_local_port(peer_port);
        let conn = Connection::new(stream, local_port, peer_port, self.guest_cid, ConnState::LocalInit);
        self.rx.push_back((conn.header(OP_REQUEST, 0), Vec::new()));
        self.conns.insert((local_port, peer_port), conn);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(p, peer_port)) {
                return p;
            }
        }
    }

    fn read_host(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else { return };
        if !c.wants_host_data() {
            return;
        }
        match c.read_from_host() {
            Ok(Some(data)) if data.is_empty() => {}
            Ok(Some(data)) => {
                c.rx_pending = true;
                c.sent_fwd_cnt();
                self.rx.push_back((c.header(OP_RW, 0), data));
            }
            Ok(None) => {
                // The host will send no more (it closed, or shut down its writing side:
                // how a container's stdin reaches EOF). Tell the guest exactly that and
                // keep carrying its data to the host until it is done sending too,
                // unless the host hung up entirely: then nothing more can flow.
                c.host_eof();
                self.rx.push_back((c.header(OP_SHUTDOWN, SHUTDOWN_SEND), Vec::new()));
                if c.finished() || c.host_hung_up {
                    self.reset(key);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => self.reset(key),
        }
    }

    /// The host side of `key` hung up (it closed, or shut down both directions; or it
    /// half-closed after the guest finished sending). Reaps the connection unless the
    /// guest still has host bytes to take.
    fn host_hung_up(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else { return };
        if c.state == ConnState::LocalInit {
            // A dial that gave up before the guest answered.
            self.forget_unanswered(key);
            return;
        }
        if c.host_done() {
            // Its EOF was read already and it takes nothing more.
            self.reset(key);
            return;
        }
        if c.wants_host_data() {
            // The read path takes what is left, then sees EOF.
            return;
        }
        match c.host_data_left() {
            Some(true) => {
                if !c.host_hung_up {
                    c.host_hung_up = true;
                    c.drain_by = Some(Instant::now() + DRAIN_TIMEOUT);
                }
            }
            Some(false) => {
                // Only its EOF is left: say so, as the read path would, and end it.
                c.host_eof();
                self.rx.push_back((c.header(OP_SHUTDOWN, SHUTDOWN_SEND), Vec::new()));
                self.reset(key);
            }
            None => self.reset(key),
        }
    }

    /// Forgets a host-initiated connection the guest has not answered: takes back its
    /// REQUEST if the guest has not been given it yet, else tells the guest with RST.
    fn forget_unanswered(&mut self, key: Key) {
        let Some(c) = self.conns.remove(&key) else { return };
        let queued = self.rx.iter().position(|(h, _)| h.op == OP_REQUEST && (h.src_port, h.dst_port) == key);
        match queued {
            // A REQUEST carries no payload, so none of it went out in pieces.
            Some(i) if i > 0 || self.rx_front_offset == 0 => {
                self.rx.remove(i);
            }
            _ => self.rx.push_back((c.header(OP_RST, 0), Vec::new())),
        }
    }

    /// Sends RST for `key` and forgets it.
    fn reset(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            self.rx.push_back((c.header(OP_RST, 0), Vec::new()));
        }
    }

    fn collect_credit_updates(&mut self) {
        for c in self.conns.values_mut() {
            if let Some(h) = c.take_credit_update() {
                self.rx.push_back((h, Vec::new()));
            }
        }
    }

    /// An RST from the host to the guest for a packet that has no connection.
    fn rst_reply(&self, hdr: &VsockHeader) -> RxPacket {
        let h = VsockHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Default::default()
        };
        (h, Vec::new())
    }

    /// A packet from the guest.
    pub fn from_guest(&mut self, pkt: TxPacket) {
        let hdr = pkt.hdr;
        let (op, src_cid, dst_cid, type_) = (hdr.op, hdr.src_cid, hdr.dst_cid, hdr.type_);
        if src_cid != self.guest_cid || dst_cid != HOST_CID || type_ != TYPE_STREAM {
            if op != OP_RST {
                let r = self.rst_reply(&hdr);
                self.rx.push_back(r);
            }
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if op == OP_REQUEST && !self.conns.contains_key(&key) {
            self.guest_connect(&hdr);
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            if op != OP_RST {
                let r = self.rst_reply(&hdr);
                self.rx.push_back(r);
            }
            return;
        };
        c.update_peer_credit(&hdr);
        match op {
            OP_RESPONSE if c.state == ConnState::LocalInit => {
                c.state = ConnState::Established;
                let ok = format!("OK {}\n", c.local_port);
                if c.stream.write_all(ok.as_bytes()).is_err() {
                    self.reset(key);
                }
            }
            OP_RW if c.state == ConnState::Established => {
                if c.recv_from_guest(&pkt.payload).is_err() {
                    self.reset(key);
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => c.credit_update_due = true,
            OP_SHUTDOWN => {
                let flags = hdr.flags;
                c.guest_shutdown(flags & SHUTDOWN_SEND != 0, flags & SHUTDOWN_RCV != 0);
                if c.finished() {
                    self.reset(key);
                }
            }
            OP_RST => {
                self.conns.remove(&key);
            }
            // Anything else is out of place for this connection's state.
            _ => self.reset(key),
        }
        self.collect_credit_updates();
    }

    fn guest_connect(&mut self, hdr: &VsockHeader) {
        if self.conns.len() >= self.max_connections {
            let r = self.rst_reply(hdr);
            self.rx.push_back(r);
            return;
        }
        let target = PathBuf::from(format!("{}_{}", self.path.display(), { hdr.dst_port }));
        let stream = UnixStream::connect(&target).and_then(|s| s.set_nonblocking(true).map(|_| s));
        match stream {
            Ok(s) => {
                let mut c = Connection::new(s, hdr.dst_port, hdr.src_port, self.guest_cid, ConnState::Established);
                c.update_peer_credit(hdr);
                self.rx.push_back((c.header(OP_RESPONSE, 0), Vec::new()));
                self.conns.insert((hdr.dst_port, hdr.src_port), c);
            }
            Err(_) => {
                let r = self.rst_reply(hdr);
                self.rx.push_back(r);
            }
        }
    }

    /// The next packet for the guest (whole, even if part of it went out already).
    #[cfg(test)]
    pub fn pop_rx(&mut self) -> Option<RxPacket> {
        self.rx_front_offset = 0;
        self.rx.pop_front()
    }

    /// The next packet for the guest: its header and the part of its payload not yet
    /// delivered.
    pub fn front_rx(&self) -> Option<(VsockHeader, &[u8])> {
        self.rx.front().map(|(h, p)| (*h, &p[self.rx_front_offset.min(p.len())..]))
    }

    /// Marks `n` more payload bytes of the front packet delivered; the packet leaves
    /// the queue once all of it has (a packet without payload, at once). A REQUEST
    /// that reached the guest starts its connection's time to answer.
    pub fn consume_rx(&mut self, n: usize) {
        let Some((h, p)) = self.rx.front() else { return };
        self.rx_front_offset += n;
        if self.rx_front_offset >= p.len() {
            if h.op == OP_REQUEST {
                if let Some(c) = self.conns.get_mut(&(h.src_port, h.dst_port)) {
                    c.answer_by = Some(Instant::now() + ANSWER_TIMEOUT);
                }
            }
            self.rx.pop_front();
            self.rx_front_offset = 0;
        }
    }

    /// Records that `n` payload bytes of a packet for connection (`local`, `peer`)
    /// reached the guest; `whole` when it was the packet's last part.
    pub fn delivered(&mut self, local: u32, peer: u32, n: u32, whole: bool) {
        if let Some(c) = self.conns.get_mut(&(local, peer)) {
            c.delivered(n);
            if whole {
                c.rx_pending = false;
            }
            if c.host_hung_up && n > 0 {
                c.drain_by = Some(Instant::now() + DRAIN_TIMEOUT);
            }
        }
    }

    /// Forgets every connection (the guest driver reset, so the guest forgot them too).
    pub fn reset_all(&mut self) {
        self.conns.clear();
        self.handshakes.clear();
        self.rx.clear();
        self.rx_front_offset = 0;
    }

    pub fn has_rx(&self) -> bool {
        !self.rx.is_empty()
    }

    /// Packets waiting for the guest's RX buffers.
    pub fn rx_len(&self) -> usize {
        self.rx.len()
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }
}

#[cfg(test)]
#[path = "muxer_tests.rs"]
mod tests;
