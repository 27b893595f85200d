//! The host side of hybrid vsock: one listening Unix socket for host-initiated
//! connections (`CONNECT <port>\n` -> `OK <host port>\n`), and `<uds>_<port>` sockets
//! for guest-initiated ones, multiplexed onto the guest's vsock device.
//!
//! Everything the guest sends is checked: addresses must be ours, packets for
//! connections that do not exist are answered with RST, and the number of
//! connections and of half-open host handshakes is capped.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::connection::{ConnState, Connection, HOST_CID};
use super::packet::*;

/// Most live connections per VM; more are refused with RST.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host connections still sending their `CONNECT` line.
const MAX_HANDSHAKES: usize = 64;
const MAX_HANDSHAKE_LINE: usize = 32;
/// Host ports for host-initiated connections are taken from here up.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("vsock socket {0} already exists; remove it if no VM uses it")]
    Exists(PathBuf),
    #[error("cannot listen on vsock socket {0}")]
    Listen(PathBuf, #[source] io::Error),
}

/// A packet for the guest: header and (for RW) payload.
pub type RxPacket = (VsockHeader, Vec<u8>);

type Key = (u32, u32); // (local port, peer port)

pub struct Muxer {
    path: PathBuf,
    listener: UnixListener,
    guest_cid: u64,
    conns: HashMap<Key, Connection>,
    handshakes: Vec<(UnixStream, Vec<u8>)>,
    /// Control packets and data waiting for RX buffers, in order.
    rx: VecDeque<RxPacket>,
    /// Payload bytes of the front packet already delivered (a payload larger than
    /// one RX buffer goes out in pieces without being copied again).
    rx_front_offset: usize,
    next_local_port: u32,
}

impl Muxer {
    pub fn new(path: &Path, guest_cid: u64) -> Result<Muxer, MuxerError> {
        if path.symlink_metadata().is_ok() {
            return Err(MuxerError::Exists(path.to_path_buf()));
        }
        let listener = UnixListener::bind(path).map_err(|e| MuxerError::Listen(path.to_path_buf(), e))?;
        listener.set_nonblocking(true).map_err(|e| MuxerError::Listen(path.to_path_buf(), e))?;
        Ok(Muxer {
            path: path.to_path_buf(),
            listener,
            guest_cid,
            conns: HashMap::new(),
            handshakes: Vec::new(),
            rx: VecDeque::new(),
            rx_front_offset: 0,
            next_local_port: FIRST_LOCAL_PORT,
        })
    }

    /// File descriptors to poll: (fd, want read, want write).
    pub fn fds(&self) -> Vec<(RawFd, bool, bool)> {
        let mut v = vec![(self.listener.as_raw_fd(), self.handshakes.len() < MAX_HANDSHAKES, false)];
        v.extend(self.handshakes.iter().map(|(s, _)| (s.as_raw_fd(), true, false)));
        v.extend(self.conns.values().map(|c| (c.stream.as_raw_fd(), c.wants_host_data(), c.wants_host_room())));
        v
    }

    /// Handles readiness of `fd`.
    pub fn ready(&mut self, fd: RawFd, readable: bool, writable: bool) {
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
        if writable {
            let failed = self.conns.get_mut(&key).is_some_and(|c| c.flush_to_host().is_err());
            // The last buffered bytes of a connection both sides have shut down.
            let done = self.conns.get(&key).is_some_and(|c| c.finished());
            if failed || done {
                self.reset(key);
                return;
            }
        }
        if readable {
            self.read_host(key);
        }
        self.collect_credit_updates();
    }

    fn accept(&mut self) {
        while self.handshakes.len() < MAX_HANDSHAKES {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if s.set_nonblocking(true).is_ok() {
                        self.handshakes.push((s, Vec::new()));
                    }
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
        if self.conns.len() >= MAX_CONNECTIONS {
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
                // keep carrying its data to the host until it is done sending too.
                c.host_eof();
                self.rx.push_back((c.header(OP_SHUTDOWN, SHUTDOWN_SEND), Vec::new()));
                if c.finished() {
                    self.reset(key);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => self.reset(key),
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
        if self.conns.len() >= MAX_CONNECTIONS {
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
    /// the queue once all of it has (a packet without payload, at once).
    pub fn consume_rx(&mut self, n: usize) {
        let Some((_, p)) = self.rx.front() else { return };
        self.rx_front_offset += n;
        if self.rx_front_offset >= p.len() {
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
mod tests {
    use super::*;
    use std::io::BufRead;

    const CID: u64 = 3;

    /// A socket path in the temp dir, removed when the test ends (the muxer leaves
    /// its socket behind, as a confined VMM may not unlink).
    struct Sock(PathBuf);

    impl std::ops::Deref for Sock {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl AsRef<Path> for Sock {
        fn as_ref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Sock {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn tmp(tag: &str) -> Sock {
        let path = std::env::temp_dir().join(format!("moat-vsock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Sock(path)
    }

    fn guest_hdr(op: u16, src_port: u32, dst_port: u32) -> VsockHeader {
        VsockHeader {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 64 * 1024,
            ..Default::default()
        }
    }

    fn pump(m: &mut Muxer) {
        for (fd, r, w) in m.fds() {
            if r || w {
                m.ready(fd, r, w);
            }
        }
    }

    #[test]
    fn host_initiated_connection_round_trip() {
        let path = tmp("host");
        let mut m = Muxer::new(&path, CID).expect("muxer");
        let mut host = UnixStream::connect(&path).expect("connect");
        host.write_all(b"CONNECT 1024\n").expect("write");
        pump(&mut m); // accept
        pump(&mut m); // handshake
        let (req, _) = m.pop_rx().expect("REQUEST for the guest");
        assert_eq!((req.op, req.dst_port, req.dst_cid), (OP_REQUEST, 1024, CID));
        let local = req.src_port;
        m.from_guest(TxPacket { hdr: guest_hdr(OP_RESPONSE, 1024, local), payload: vec![] });
        let mut reader = std::io::BufReader::new(host.try_clone().expect("clone"));
        let mut line = String::new();
        reader.read_line(&mut line).expect("OK line");
        assert_eq!(line, format!("OK {local}\n"));
        // Guest to host.
        m.from_guest(TxPacket { hdr: guest_hdr(OP_RW, 1024, local), payload: b"ping".to_vec() });
        let mut got = [0u8; 4];
        reader.read_exact(&mut got).expect("data");
        assert_eq!(&got, b"ping");
        // Host to guest.
        host.write_all(b"pong").expect("write");
        let mut data = None;
        for _ in 0..100 {
            pump(&mut m);
            while let Some((h, p)) = m.pop_rx() {
                if h.op == OP_RW {
                    data = Some(p);
                }
            }
            if data.is_some() {
                break;
            }
        }
        assert_eq!(data.expect("RW packet"), b"pong");
        drop(m);
        // Removing it is for whoever made its directory: a confined VMM may not unlink.
        assert!(path.exists(), "the muxer leaves its socket behind");
    }

    /// A host-initiated connection the guest accepted: (muxer, host stream, local port).
    fn established(tag: &str) -> (Muxer, UnixStream, u32) {
        let path = tmp(tag);
        let mut m = Muxer::new(&path, CID).expect("muxer");
        let mut host = UnixStream::connect(&path).expect("connect");
        host.write_all(b"CONNECT 1024\n").expect("write");
        pump(&mut m);
        pump(&mut m);
        let local = m.pop_rx().expect("REQUEST").0.src_port;
        m.from_guest(TxPacket { hdr: guest_hdr(OP_RESPONSE, 1024, local), payload: vec![] });
        let mut ok = [0u8; 64];
        let n = host.read(&mut ok).expect("OK line");
        assert_eq!(&ok[..n], format!("OK {local}\n").as_bytes());
        (m, host, local)
    }

    #[test]
    fn host_eof_half_closes_and_guest_data_keeps_flowing() {
        let (mut m, mut host, local) = established("halfclose");
        host.write_all(b"stdin data").expect("write");
        host.shutdown(std::net::Shutdown::Write).expect("half-close");
        let mut seen = Vec::new();
        for _ in 0..10 {
            pump(&mut m);
            while let Some((h, p)) = m.pop_rx() {
                if h.op == OP_RW {
                    // As the device does once the guest has the bytes.
                    m.delivered(local, 1024, p.len() as u32, true);
                }
                seen.push((h, p));
            }
        }
        let ops: Vec<(u16, u32)> = seen.iter().map(|(h, _)| (h.op, h.flags)).collect();
        assert_eq!(ops, vec![(OP_RW, 0), (OP_SHUTDOWN, SHUTDOWN_SEND)], "data, then 'host sends no more' once");
        assert_eq!(seen[0].1, b"stdin data");
        // The guest still writes to the host (a container's output after its stdin ended).
        m.from_guest(TxPacket { hdr: guest_hdr(OP_RW, 1024, local), payload: b"output".to_vec() });
        let mut got = [0u8; 6];
        host.read_exact(&mut got).expect("guest data after host EOF");
        assert_eq!(&got, b"output");
        assert_eq!(m.connections(), 1);
        // The guest finishes too: the connection ends with an RST and the host sees EOF.
        m.from_guest(TxPacket {
            hdr: VsockHeader { flags: SHUTDOWN_SEND | SHUTDOWN_RCV, ..guest_hdr(OP_SHUTDOWN, 1024, local) },
            payload: vec![],
        });
        assert!(std::iter::from_fn(|| m.pop_rx()).any(|(h, _)| h.op == OP_RST), "RST ends it");
        assert_eq!(m.connections(), 0);
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).expect("EOF");
        assert!(rest.is_empty());
    }

    #[test]
    fn guest_shutdown_of_sending_after_host_eof_finishes() {
        let (mut m, host, local) = established("halfclose2");
        host.shutdown(std::net::Shutdown::Write).expect("half-close");
        m.from_guest(TxPacket { hdr: guest_hdr(OP_CREDIT_UPDATE, 1024, local), payload: vec![] });
        pump(&mut m);
        assert_eq!({ m.pop_rx().expect("SHUTDOWN").0.flags }, SHUTDOWN_SEND);
        m.from_guest(TxPacket {
            hdr: VsockHeader { flags: SHUTDOWN_SEND, ..guest_hdr(OP_SHUTDOWN, 1024, local) },
            payload: vec![],
        });
        assert_eq!({ m.pop_rx().expect("RST").0.op }, OP_RST);
        assert_eq!(m.connections(), 0);
    }

    #[test]
    fn bad_handshakes_are_refused() {
        let path = tmp("bad");
        let mut m = Muxer::new(&path, CID).expect("muxer");
        let mut host = UnixStream::connect(&path).expect("connect");
        host.write_all(b"HELLO\n").expect("write");
        pump(&mut m);
        pump(&mut m);
        let mut s = String::new();
        host.read_to_string(&mut s).expect("read");
        assert!(s.starts_with("ERR bad request"), "{s}");
        assert!(m.pop_rx().is_none());
        let mut long = UnixStream::connect(&path).expect("connect");
        long.write_all(&[b'A'; 100]).expect("write");
        pump(&mut m);
        pump(&mut m);
        assert_eq!(m.handshakes.len(), 0, "over-long line dropped");
    }

    #[test]
    fn guest_initiated_connection_and_refusal() {
        let path = tmp("guest");
        let mut m = Muxer::new(&path, CID).expect("muxer");
        let target = PathBuf::from(format!("{}_5000", path.display()));
        let _ = std::fs::remove_file(&target);
        let l = UnixListener::bind(&target).expect("bind");
        m.from_guest(TxPacket { hdr: guest_hdr(OP_REQUEST, 2000, 5000), payload: vec![] });
        let (resp, _) = m.pop_rx().expect("response");
        assert_eq!((resp.op, resp.src_port, resp.dst_port), (OP_RESPONSE, 5000, 2000));
        let (mut s, _) = l.accept().expect("accept");
        m.from_guest(TxPacket { hdr: guest_hdr(OP_RW, 2000, 5000), payload: b"log line\n".to_vec() });
        let mut got = [0u8; 9];
        s.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"log line\n");
        // Nobody listens on 5001: RST.
        m.from_guest(TxPacket { hdr: guest_hdr(OP_REQUEST, 2001, 5001), payload: vec![] });
        let rst = std::iter::from_fn(|| m.pop_rx()).map(|(h, _)| h).find(|h| h.op == OP_RST).expect("rst");
        assert_eq!({ rst.dst_port }, 2001);
        let _ = std::fs::remove_file(&target);
    }

    #[test]
    fn spoofed_and_unknown_packets_get_rst_and_no_state() {
        let path = tmp("spoof");
        let mut m = Muxer::new(&path, CID).expect("muxer");
        let mut h = guest_hdr(OP_RW, 1, 2);
        h.src_cid = 99;
        m.from_guest(TxPacket { hdr: h, payload: b"x".to_vec() });
        assert_eq!({ m.pop_rx().expect("rst").0.op }, OP_RST);
        m.from_guest(TxPacket { hdr: guest_hdr(OP_RW, 1, 2), payload: b"x".to_vec() });
        assert_eq!({ m.pop_rx().expect("rst").0.op }, OP_RST);
        // RST for an unknown connection is not answered (no RST ping-pong).
        m.from_guest(TxPacket { hdr: guest_hdr(OP_RST, 1, 2), payload: vec![] });
        assert!(m.pop_rx().is_none());
        assert_eq!(m.connections(), 0);
    }

    #[test]
    fn large_payloads_go_out_in_pieces_without_recopying() {
        let path = tmp("pieces");
        let mut m = Muxer::new(&path, CID).expect("muxer");
        let h = VsockHeader { op: OP_RW, ..Default::default() };
        m.rx.push_back((h, b"0123456789".to_vec()));
        m.rx.push_back((VsockHeader { op: OP_RST, ..Default::default() }, Vec::new()));
        assert_eq!(m.front_rx().expect("front").1, b"0123456789");
        m.consume_rx(4);
        assert_eq!(m.front_rx().expect("front").1, b"456789");
        m.consume_rx(6);
        let (next, rest) = m.front_rx().expect("next packet");
        assert_eq!(({ next.op }, rest.len()), (OP_RST, 0));
        m.consume_rx(0);
        assert!(m.front_rx().is_none());
    }

    #[test]
    fn existing_socket_path_is_an_error() {
        let path = tmp("exists");
        std::fs::write(&path, b"").expect("create");
        assert!(matches!(Muxer::new(&path, CID), Err(MuxerError::Exists(_))));
    }
}
