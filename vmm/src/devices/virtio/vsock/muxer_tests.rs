//! Tests of the vsock muxer over real Unix sockets: handshakes, both directions of
//! data, half-closes, and that nothing a guest or a host does leaks a connection or
//! makes the main loop spin.

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

/// Serves every fd as if poll had found it ready for what it asked.
fn pump(m: &mut Muxer) {
    for (fd, r, w) in m.fds() {
        if r || w {
            m.ready(fd, Readiness { readable: r, writable: w, hangup: false });
        }
    }
}

#[test]
fn host_initiated_connection_round_trip() {
    let path = tmp("host");
    let mut m = Muxer::new(&path, CID, MAX_CONNECTIONS).expect("muxer");
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
    established_with(tag, 64 * 1024)
}

/// The same, the guest answering with a receive window of `buf_alloc` bytes.
fn established_with(tag: &str, buf_alloc: u32) -> (Muxer, UnixStream, u32) {
    let path = tmp(tag);
    let mut m = Muxer::new(&path, CID, MAX_CONNECTIONS).expect("muxer");
    let mut host = UnixStream::connect(&path).expect("connect");
    host.write_all(b"CONNECT 1024\n").expect("write");
    pump(&mut m);
    pump(&mut m);
    let local = m.pop_rx().expect("REQUEST").0.src_port;
    let answer = VsockHeader { buf_alloc, ..guest_hdr(OP_RESPONSE, 1024, local) };
    m.from_guest(TxPacket { hdr: answer, payload: vec![] });
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
    let mut m = Muxer::new(&path, CID, MAX_CONNECTIONS).expect("muxer");
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
    let mut m = Muxer::new(&path, CID, MAX_CONNECTIONS).expect("muxer");
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
    let mut m = Muxer::new(&path, CID, MAX_CONNECTIONS).expect("muxer");
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
    let mut m = Muxer::new(&path, CID, MAX_CONNECTIONS).expect("muxer");
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
    assert!(matches!(Muxer::new(&path, CID, MAX_CONNECTIONS), Err(MuxerError::Exists(_))));
}

// --- nothing leaks, nothing spins ---

/// One round of the main loop over this muxer alone: polls its fds (each also
/// watched for hangup) until one is ready, its deadline comes or `wait` passes, and
/// serves what is ready. Returns how many fds were ready.
fn serve_once(m: &mut Muxer, wait: Duration) -> usize {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::BorrowedFd;
    let list = m.fds();
    let mut wait = wait;
    if let Some(d) = m.deadline() {
        wait = wait.min(d.saturating_duration_since(Instant::now()));
    }
    let mut fds: Vec<PollFd> = list
        .iter()
        .map(|&(fd, r, w)| {
            let mut flags = PollFlags::empty();
            flags.set(PollFlags::POLLIN, r);
            flags.set(PollFlags::POLLOUT, w);
            // SAFETY: the muxer owns these fds and is not touched until poll returns.
            PollFd::new(unsafe { BorrowedFd::borrow_raw(fd) }, flags)
        })
        .collect();
    let ms = wait.as_nanos().div_ceil(1_000_000);
    poll(&mut fds, PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)).expect("poll");
    let revents: Vec<PollFlags> = fds.iter().map(|f| f.revents().unwrap_or(PollFlags::empty())).collect();
    drop(fds);
    let mut ready = 0;
    for (&(fd, _, _), ev) in list.iter().zip(revents) {
        if ev.is_empty() {
            continue;
        }
        ready += 1;
        let r = Readiness {
            readable: ev.contains(PollFlags::POLLIN),
            writable: ev.contains(PollFlags::POLLOUT),
            hangup: ev.intersects(PollFlags::POLLHUP | PollFlags::POLLERR),
        };
        m.ready(fd, r);
    }
    let now = Instant::now();
    if m.deadline().is_some_and(|d| d <= now) {
        m.on_deadline(now);
    }
    ready
}

/// Serves `m` until `done` holds, for at most two seconds.
fn serve_until(m: &mut Muxer, mut done: impl FnMut(&mut Muxer) -> bool) {
    let start = Instant::now();
    while !done(m) {
        assert!(start.elapsed() < Duration::from_secs(2), "not reached in 2 s");
        serve_once(m, Duration::from_millis(20));
    }
}

/// Hands every packet queued for the guest to it, as the device does; returns them.
fn deliver_all(m: &mut Muxer) -> Vec<RxPacket> {
    let mut out = Vec::new();
    while let Some((h, p)) = m.front_rx() {
        out.push((h, p.to_vec()));
        m.consume_rx(p.len());
    }
    out
}

fn dial(path: &Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(path).expect("connect");
    s.write_all(format!("CONNECT {port}\n").as_bytes()).expect("CONNECT");
    s
}

#[test]
fn dials_the_guest_never_answers_are_reaped_when_their_host_side_gives_up() {
    let path = tmp("unanswered");
    let cap = 32;
    let mut m = Muxer::new(&path, CID, cap).expect("muxer");
    let mut dials: Vec<UnixStream> = (0..cap).map(|_| dial(&path, 1024)).collect();
    serve_until(&mut m, |m| m.connections() == cap);
    let requests = deliver_all(&mut m);
    assert_eq!(requests.len(), cap, "a REQUEST for each reached the guest, which never answers");
    // The table is full: one more dial is refused.
    let mut extra = dial(&path, 1024);
    extra.set_nonblocking(true).expect("nonblocking");
    let mut reply = Vec::new();
    serve_until(&mut m, |_| {
        let mut b = [0u8; 64];
        match extra.read(&mut b) {
            Ok(0) => true,
            Ok(n) => {
                reply.extend_from_slice(&b[..n]);
                false
            }
            Err(_) => false,
        }
    });
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("ERR too many connections"), "{reply:?}");
    // The dials time out and close their end: every one is reaped, and the guest told.
    dials.clear();
    serve_until(&mut m, |m| m.connections() == 0);
    let rsts = deliver_all(&mut m).iter().filter(|(h, _)| h.op == OP_RST).count();
    assert_eq!(rsts, cap);
    // New dials get through again.
    let _again = dial(&path, 1024);
    serve_until(&mut m, |m| m.connections() == 1);
    assert_eq!({ deliver_all(&mut m)[0].0.op }, OP_REQUEST);
}

#[test]
fn a_request_not_yet_given_to_the_guest_is_withdrawn() {
    let path = tmp("withdrawn");
    let mut m = Muxer::new(&path, CID, MAX_CONNECTIONS).expect("muxer");
    let d = dial(&path, 1024);
    serve_until(&mut m, |m| m.connections() == 1);
    assert_eq!(m.rx_len(), 1, "the REQUEST waits for the guest's RX buffers");
    drop(d);
    serve_until(&mut m, |m| m.connections() == 0);
    assert_eq!(m.rx_len(), 0, "taken back: nothing for the guest to answer");
}

#[test]
fn an_unanswered_request_times_out() {
    let path = tmp("answer-timeout");
    let mut m = Muxer::new(&path, CID, MAX_CONNECTIONS).expect("muxer");
    assert_eq!(m.deadline(), None);
    let mut d = dial(&path, 1024);
    serve_until(&mut m, |m| m.connections() == 1);
    assert_eq!(m.deadline(), None, "the guest has not been given the REQUEST yet");
    let given = Instant::now();
    deliver_all(&mut m);
    let due = m.deadline().expect("a time to answer");
    assert!(due >= given + ANSWER_TIMEOUT && due <= Instant::now() + ANSWER_TIMEOUT, "{:?}", due - given);
    m.on_deadline(due - Duration::from_millis(1));
    assert_eq!(m.connections(), 1, "not before its time");
    m.on_deadline(due);
    assert_eq!(m.connections(), 0);
    assert_eq!({ deliver_all(&mut m)[0].0.op }, OP_RST, "the guest is told");
    let mut rest = Vec::new();
    d.read_to_end(&mut rest).expect("EOF for the dial");
    assert_eq!(rest, ANSWER_TIMEOUT_REPLY, "the dialer is told why");
}

#[test]
fn a_host_hanging_up_on_a_guest_that_gives_no_credit_is_reaped() {
    let (mut m, host, _) = established_with("nocredit", 0);
    drop(host);
    serve_until(&mut m, |m| m.connections() == 0);
    let ops: Vec<u16> = deliver_all(&mut m).iter().map(|(h, _)| h.op).collect();
    assert_eq!(ops.last(), Some(&OP_RST));
}

#[test]
fn host_bytes_the_guest_never_takes_are_dropped_after_the_drain_timeout() {
    let (mut m, mut host, _) = established_with("nodrain", 0);
    host.write_all(b"unread").expect("write");
    drop(host);
    // The hangup is seen once; then the connection is left alone (no spinning).
    serve_once(&mut m, Duration::from_millis(100));
    let start = Instant::now();
    let mut wakeups = 0;
    while start.elapsed() < Duration::from_millis(200) {
        wakeups += serve_once(&mut m, Duration::from_millis(200));
    }
    assert_eq!(wakeups, 0, "a hangup already handled must not wake the loop again");
    assert_eq!(m.connections(), 1, "the guest may still take the bytes");
    let due = m.deadline().expect("a time to drain");
    assert!(due > Instant::now() + DRAIN_TIMEOUT - Duration::from_secs(1));
    m.on_deadline(due);
    assert_eq!(m.connections(), 0);
    assert_eq!({ deliver_all(&mut m).last().expect("RST").0.op }, OP_RST);
}

#[test]
fn a_host_that_writes_and_closes_loses_nothing_to_a_slow_guest() {
    // What the shim does with a container's stdin: write it all, half-close, close.
    let (mut m, mut host, local) = established_with("slowguest", 0);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let expect = data.clone();
    let writer = std::thread::spawn(move || {
        host.write_all(&data).expect("write");
        host.shutdown(std::net::Shutdown::Write).expect("half-close");
    });
    let mut got = Vec::new();
    let mut ops = Vec::new();
    let start = Instant::now();
    while m.connections() > 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "got {} bytes, then stuck", got.len());
        // A guest that reads a 16 KiB window at a time.
        let window = VsockHeader { buf_alloc: 16 * 1024, fwd_cnt: got.len() as u32, ..guest_hdr(OP_CREDIT_UPDATE, 1024, local) };
        m.from_guest(TxPacket { hdr: window, payload: vec![] });
        serve_once(&mut m, Duration::from_millis(20));
        for (h, p) in deliver_all(&mut m) {
            if h.op == OP_RW {
                m.delivered(local, 1024, p.len() as u32, true);
                got.extend_from_slice(&p);
            }
            ops.push(h.op);
        }
    }
    writer.join().expect("writer");
    assert_eq!(got.len(), expect.len());
    assert!(got == expect, "every byte, in order");
    assert_eq!(&ops[ops.len() - 2..], &[OP_SHUTDOWN, OP_RST], "then EOF, and the connection ends");
}

/// For tests that change what the whole process may do (its open-file limit): in
/// the test binary's own run, runs `test` alone in a child process, checks that it
/// passed and returns false; in that child, returns true.
fn in_child(test: &str) -> bool {
    const CHILD: &str = "MOAT_MUXER_TEST_CHILD";
    if std::env::var_os(CHILD).is_some() {
        return true;
    }
    let module = module_path!().split_once("::").map_or(module_path!(), |(_, m)| m);
    let name = format!("{module}::{test}");
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([name.as_str(), "--exact", "--nocapture", "--test-threads", "1"])
        .env(CHILD, "1")
        .output()
        .expect("run the child");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("1 passed"), "{name} in a child process:\n{text}");
    false
}

fn nofile() -> (u64, u64) {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).expect("getrlimit")
}

fn set_nofile(soft: u64, hard: u64) {
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard).expect("setrlimit");
}

#[test]
fn accept_out_of_fds_rests_instead_of_spinning() {
    if !in_child("accept_out_of_fds_rests_instead_of_spinning") {
        return;
    }
    let path = tmp("emfile");
    let mut m = Muxer::new(&path, CID, MAX_CONNECTIONS).expect("muxer");
    let _waiting: Vec<UnixStream> = (0..3).map(|_| UnixStream::connect(&path).expect("connect")).collect();
    // No fd left: the limit at the lowest free fd number.
    let (_, hard) = nofile();
    let free = (0..).find(|&fd| nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD) == Err(nix::errno::Errno::EBADF));
    set_nofile(free.expect("a free fd number") as u64, hard);
    let start = Instant::now();
    let mut rounds = 0;
    while start.elapsed() < Duration::from_millis(500) {
        serve_once(&mut m, Duration::from_millis(500));
        rounds += 1;
    }
    set_nofile(hard, hard);
    // One failed accept and one rest per ACCEPT_BACKOFF: about ten rounds.
    assert!(rounds < 40, "{rounds} rounds of the loop in 500 ms");
    assert!(m.handshakes.is_empty());
    // With fds again, the listener comes back after its rest and takes them all.
    serve_until(&mut m, |m| m.handshakes.len() == 3);
}

#[test]
fn the_fd_limit_is_raised_for_the_connections() {
    if !in_child("the_fd_limit_is_raised_for_the_connections") {
        return;
    }
    let (_, hard) = nofile();
    set_nofile(hard.min(64), hard);
    let cap = raise_fd_limit();
    assert_eq!(nofile(), (hard, hard), "soft limit raised to the hard one");
    assert_eq!(cap, connection_cap(hard));
}

#[test]
fn a_low_fd_limit_lowers_the_connection_cap() {
    let needed = MAX_CONNECTIONS as u64 + MAX_HANDSHAKES as u64 + OTHER_FDS;
    assert_eq!(connection_cap(1 << 20), MAX_CONNECTIONS);
    assert_eq!(connection_cap(needed), MAX_CONNECTIONS);
    assert_eq!(connection_cap(needed - 1), MAX_CONNECTIONS - 1);
    assert_eq!(connection_cap(1024), 1024 - MAX_HANDSHAKES - OTHER_FDS as usize);
    assert_eq!(connection_cap(100), MIN_CONNECTIONS);
}
