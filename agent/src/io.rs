//! stdio of container processes. Each process gets pipes (or a pty when its spec
//! asks for a terminal); the host attaches each stream as its own vsock connection to
//! [`STDIO_PORT`], whose first line names the process and stream and carries the
//! process's secret ([`StdioHeader`]). Only the host may connect (`peer.rs`), and a
//! stream whose secret is not the one the process was created with is closed: the
//! secret stays in the agent's memory and never reaches the container. One copy
//! thread per attached stream (so at most three per process) moves the bytes with
//! blocking I/O: a slow reader backpressures the process through its pipe, nothing is
//! buffered beyond the pipe, and an output stream attached after the process exited
//! still gets everything the pipe holds.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use moat_protocol::{StdioHeader, StdioSecret, StreamKind, MAX_STDIO_HEADER, STDIO_PORT};
use nix::fcntl::OFlag;
use nix::sys::socket::{bind, listen, setsockopt, shutdown, socket, sockopt, AddressFamily, Backlog, Shutdown};
use nix::sys::socket::{SockFlag, SockType, VsockAddr};
use nix::sys::time::TimeVal;

use crate::error::{AgentError, Result};
use crate::logger::who;

/// How long a new stdio connection may take to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections whose header is still being read, at most.
const MAX_PENDING_HEADERS: usize = 64;
/// How often a stdin copy thread looks at a CloseStdin request while idle.
const STDIN_POLL_MS: u16 = 50;

/// An output stream's state.
enum Out {
    /// Not attached yet: the agent holds the read end (the pipe buffers, then blocks).
    Waiting(File),
    /// A terminal process's output before its pty exists (the helper makes it).
    PtyPending,
    /// Attached while the pty did not exist yet: copied from once it does.
    Early(File),
    Attached,
    NotRequested,
}

struct Stdin {
    /// The write end, while no stream is attached and stdin is open.
    writer: Option<File>,
    /// A stream attached before a terminal process's pty existed.
    early: Option<File>,
    requested: bool,
    attached: bool,
    closed: bool,
    /// Set by CloseStdin while a stream is attached: the copy thread closes stdin
    /// once the stream has nothing more to read.
    close_requested: Arc<AtomicBool>,
}

/// The agent's side of one process's stdio.
pub struct ProcessIo {
    who: String,
    /// What each of the process's streams must present.
    secret: StdioSecret,
    stdin: Mutex<Stdin>,
    stdout: Mutex<Out>,
    stderr: Mutex<Out>,
    /// A terminal process's pty master, once the helper has made the pty.
    pty_master: OnceLock<Arc<OwnedFd>>,
    terminal: bool,
    size: Option<(u16, u16)>,
    /// The process's ends, until the helper that starts it has received them.
    child_fds: Mutex<Option<[OwnedFd; 3]>>,
}

fn internal(what: &str, e: impl std::error::Error) -> AgentError {
    AgentError::internal(what, e)
}

fn pipe() -> Result<(File, File)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| internal("cannot create a pipe", e))?;
    Ok((File::from(r), File::from(w)))
}

fn dev_null() -> Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| internal("cannot open /dev/null", e))?;
    Ok(OwnedFd::from(f))
}

fn dup(fd: &impl AsFd) -> Result<OwnedFd> {
    fd.as_fd().try_clone_to_owned().map_err(|e| internal("cannot duplicate a descriptor", e))
}

impl ProcessIo {
    /// Makes the pipes or the pty for a process; `stdio` says which streams the host
    /// will attach. With a terminal the pty is stdin, stdout and stderr.
    pub fn new(
        container_id: &str,
        exec_id: &str,
        stdio: &moat_protocol::Stdio,
        terminal: bool,
        size: Option<(u16, u16)>,
    ) -> Result<ProcessIo> {
        let who = who(container_id, exec_id);
        let secret = StdioSecret::from_bytes(&stdio.secret)
            .map_err(|e| AgentError::InvalidArgument(format!("{who}: stdio.secret: {e}")))?;
        let close_requested = Arc::new(AtomicBool::new(false));
        if terminal {
            if stdio.stderr {
                return Err(AgentError::InvalidArgument(format!(
                    "{who}: a terminal process has no separate stderr stream (stdio.stderr must be false)"
                )));
            }
            // The pty is made by the process's helper inside the container (see
            // `set_pty_master`); the helper gets placeholders here.
            return Ok(ProcessIo {
                who,
                secret,
                stdin: Mutex::new(Stdin {
                    writer: None,
                    early: None,
                    requested: stdio.stdin,
                    attached: false,
                    closed: false,
                    close_requested,
                }),
                stdout: Mutex::new(if stdio.stdout { Out::PtyPending } else { Out::NotRequested }),
                stderr: Mutex::new(Out::NotRequested),
                pty_master: OnceLock::new(),
                terminal: true,
                size,
                child_fds: Mutex::new(Some([dev_null()?, dev_null()?, dev_null()?])),
            });
        }
        let (stdin_child, stdin_writer) = if stdio.stdin {
            let (r, w) = pipe()?;
            (OwnedFd::from(r), Some(w))
        } else {
            (dev_null()?, None)
        };
        let out = |requested: bool| -> Result<(OwnedFd, Out)> {
            if requested {
                let (r, w) = pipe()?;
                Ok((OwnedFd::from(w), Out::Waiting(r)))
            } else {
                Ok((dev_null()?, Out::NotRequested))
            }
        };
        let (stdout_child, stdout) = out(stdio.stdout)?;
        let (stderr_child, stderr) = out(stdio.stderr)?;
        Ok(ProcessIo {
            who,
            secret,
            stdin: Mutex::new(Stdin {
                writer: stdin_writer,
                early: None,
                requested: stdio.stdin,
                attached: false,
                closed: false,
                close_requested,
            }),
            stdout: Mutex::new(stdout),
            stderr: Mutex::new(stderr),
            pty_master: OnceLock::new(),
            terminal: false,
            size: None,
            child_fds: Mutex::new(Some([stdin_child, stdout_child, stderr_child])),
        })
    }

    /// The process's stdin, stdout and stderr, for the helper that starts it (once).
    pub fn take_child_fds(&self) -> Option<[OwnedFd; 3]> {
        self.child_fds.lock().ok()?.take()
    }

    /// Wires a terminal process's pty (its master, from the helper that made it in
    /// the container) to the streams: those attached already start copying.
    pub fn set_pty_master(&self, master: OwnedFd) -> Result<()> {
        if !self.terminal {
            return Err(AgentError::Internal(format!("{}: a pty for a process without a terminal", self.who)));
        }
        if let Some((rows, cols)) = self.size {
            crate::sys::set_winsize(master.as_fd(), rows, cols).map_err(|e| internal("cannot size the pty", e))?;
        }
        let master = Arc::new(master);
        if self.pty_master.set(master.clone()).is_err() {
            return Err(AgentError::Internal(format!("{}: the pty was set twice", self.who)));
        }
        {
            let mut s = self.stdin.lock().map_err(|_| AgentError::Internal("stdin lock poisoned".into()))?;
            if s.requested && !s.closed {
                let writer = File::from(dup(&*master)?);
                match s.early.take() {
                    Some(conn) => {
                        let close = s.close_requested.clone();
                        let who = self.who.clone();
                        spawn(move || copy_in(&who, conn, writer, &close));
                    }
                    None => s.writer = Some(writer),
                }
            }
        }
        let mut o = self.stdout.lock().map_err(|_| AgentError::Internal("stdout lock poisoned".into()))?;
        match std::mem::replace(&mut *o, Out::Attached) {
            Out::PtyPending => *o = Out::Waiting(File::from(dup(&*master)?)),
            Out::Early(conn) => {
                let src = File::from(dup(&*master)?);
                let who = format!("{} Stdout", self.who);
                spawn(move || copy_out(&who, src, conn));
            }
            other => *o = other,
        }
        Ok(())
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        let Some(m) = self.pty_master.get() else {
            return Err(AgentError::FailedPrecondition(format!("{}: the process has no terminal (yet)", self.who)));
        };
        crate::sys::set_winsize(m.as_fd(), rows, cols).map_err(|e| internal("cannot resize the pty", e))
    }

    /// Closes the process's stdin (at once if no stream is attached; after the
    /// attached stream's pending bytes otherwise).
    pub fn close_stdin(&self) {
        let Ok(mut s) = self.stdin.lock() else { return };
        s.closed = true;
        s.writer = None;
        s.early = None;
        s.close_requested.store(true, Ordering::SeqCst);
    }

    /// Drops everything the agent holds for the process (RemoveContainer).
    pub fn close_all(&self) {
        self.close_stdin();
        for out in [&self.stdout, &self.stderr] {
            if let Ok(mut o) = out.lock() {
                if matches!(*o, Out::Waiting(_) | Out::PtyPending | Out::Early(_)) {
                    *o = Out::NotRequested;
                }
            }
        }
        if let Ok(mut f) = self.child_fds.lock() {
            *f = None;
        }
    }

    /// Connects a stream; on refusal the connection is closed with a log line.
    fn attach(&self, kind: StreamKind, conn: File) {
        match kind {
            StreamKind::Stdin => {
                let Ok(mut s) = self.stdin.lock() else { return };
                if !s.requested || s.attached || s.closed || s.early.is_some() {
                    log::warn!("{}: stdin stream refused (not requested, already attached or closed)", self.who);
                    return;
                }
                let Some(writer) = s.writer.take() else {
                    // A terminal process whose pty is not wired yet (or is being
                    // wired: `set_pty_master` takes `early` under this lock).
                    if self.terminal {
                        s.early = Some(conn);
                    }
                    return;
                };
                s.attached = true;
                let close = s.close_requested.clone();
                let who = self.who.clone();
                spawn(move || copy_in(&who, conn, writer, &close));
            }
            StreamKind::Stdout | StreamKind::Stderr => {
                let slot = if kind == StreamKind::Stdout { &self.stdout } else { &self.stderr };
                let Ok(mut o) = slot.lock() else { return };
                match std::mem::replace(&mut *o, Out::Attached) {
                    Out::Waiting(src) => {
                        let who = format!("{} {kind:?}", self.who);
                        spawn(move || copy_out(&who, src, conn));
                    }
                    Out::PtyPending => *o = Out::Early(conn),
                    other => {
                        *o = other;
                        log::warn!("{}: {kind:?} stream refused (not requested or already attached)", self.who);
                    }
                }
            }
        }
    }
}

fn spawn(f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name("stdio".into()).spawn(f) {
        log::error!("cannot start a stdio copy thread: {e}");
    }
}

/// Copies the host's stream into the process's stdin until the stream ends, the
/// process closes its stdin, or CloseStdin asked for it and the stream is idle.
fn copy_in(who: &str, mut src: File, mut dst: File, close: &AtomicBool) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut buf = vec![0u8; 32 << 10];
    loop {
        let ready = {
            let mut fds = [PollFd::new(src.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(STDIN_POLL_MS)) {
                Ok(n) => n > 0,
                Err(nix::Error::EINTR) => false,
                Err(_) => break,
            }
        };
        if !ready {
            if close.load(Ordering::SeqCst) {
                break;
            }
            continue;
        }
        match src.read(&mut buf) {
            // EOF: the host closed or half-closed the stream (a peer shutdown of
            // either direction ends our reading too).
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if dst.write_all(&buf[..n]).is_err() {
                    break; // the process closed its stdin
                }
            }
        }
    }
    log::debug!("{who}: stdin closed");
}

/// Copies process output to the host's stream until the pipe's writers are all
/// gone, then shuts the stream's write side. If the host stops reading, the rest is
/// read and discarded, so the process is never blocked by a stream nobody reads.
fn copy_out(who: &str, mut src: File, mut dst: File) {
    let mut buf = vec![0u8; 64 << 10];
    let mut host_gone = false;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // A pty master reads EIO once the last slave is closed.
            Err(_) => break,
        };
        if !host_gone && dst.write_all(&buf[..n]).is_err() {
            log::debug!("{who}: the host stopped reading; discarding the rest");
            host_gone = true;
        }
    }
    let _ = shutdown(dst.as_raw_fd(), Shutdown::Write);
    log::debug!("{who}: output drained");
}

/// Every process's stdio by (container id, exec id).
#[derive(Default)]
pub struct Registry {
    map: Mutex<HashMap<(String, String), Arc<ProcessIo>>>,
}

pub fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Registry::default)
}

impl Registry {
    pub fn insert(&self, container_id: &str, exec_id: &str, io: Arc<ProcessIo>) {
        if let Ok(mut m) = self.map.lock() {
            m.insert((container_id.to_string(), exec_id.to_string()), io);
        }
    }

    pub fn remove_container(&self, container_id: &str) {
        if let Ok(mut m) = self.map.lock() {
            m.retain(|(c, _), io| {
                let keep = c != container_id;
                if !keep {
                    io.close_all();
                }
                keep
            });
        }
    }

    fn get(&self, h: &StdioHeader) -> Option<Arc<ProcessIo>> {
        self.map.lock().ok()?.get(&(h.container_id.clone(), h.exec_id.clone())).cloned()
    }
}

/// Reads the header line byte by byte (so none of the stream after it is taken),
/// at most [`MAX_STDIO_HEADER`] bytes.
pub fn read_header(conn: &mut impl Read) -> std::result::Result<StdioHeader, String> {
    let mut line = Vec::with_capacity(64);
    let mut b = [0u8; 1];
    loop {
        match conn.read(&mut b) {
            Ok(0) => return Err("stream closed before its header ended".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("reading the header: {e}")),
        }
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
        if line.len() >= MAX_STDIO_HEADER {
            return Err(format!("header longer than {MAX_STDIO_HEADER} bytes"));
        }
    }
    let text = std::str::from_utf8(&line).map_err(|_| "header is not UTF-8".to_string())?;
    StdioHeader::parse(text).map_err(|e| e.0)
}

/// Starts listening for stdio streams.
pub fn serve() -> Result<()> {
    let listener = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| internal("cannot create the stdio socket", e))?;
    bind(listener.as_raw_fd(), &VsockAddr::new(u32::MAX, STDIO_PORT))
        .map_err(|e| internal("cannot bind the stdio port", e))?;
    listen(&listener, Backlog::new(64).map_err(|e| internal("backlog", e))?)
        .map_err(|e| internal("cannot listen on the stdio port", e))?;
    std::thread::Builder::new()
        .name("stdio-accept".into())
        .spawn(move || accept_loop(listener))
        .map_err(|e| internal("cannot start the stdio listener", e))?;
    Ok(())
}

fn accept_loop(listener: OwnedFd) {
    let pending = Arc::new(AtomicUsize::new(0));
    loop {
        let conn = match crate::sys::accept_owned(&listener) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("stdio: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if !crate::peer::admit(conn.as_raw_fd(), STDIO_PORT) {
            continue;
        }
        if pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING_HEADERS {
            pending.fetch_sub(1, Ordering::SeqCst);
            log::warn!("stdio: too many connections without a header; closing one");
            continue;
        }
        let pending = pending.clone();
        spawn(move || {
            handle(registry(), conn);
            pending.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// Reads a new stream's header and attaches the stream to its process if the header
/// carries the process's secret; otherwise the stream is closed (dropped).
fn handle(reg: &Registry, conn: OwnedFd) {
    let timeout = TimeVal::new(HEADER_TIMEOUT.as_secs() as _, 0);
    if let Err(e) = setsockopt(&conn, sockopt::ReceiveTimeout, &timeout) {
        log::warn!("stdio: cannot set a header timeout: {e}");
        return;
    }
    let mut file = File::from(conn);
    let header = match read_header(&mut file) {
        Ok(h) => h,
        Err(e) => {
            crate::peer::log_refusal(format_args!("stdio: stream refused: {e}"));
            return;
        }
    };
    let name = who(&header.container_id, &header.exec_id);
    let Some(io) = reg.get(&header) else {
        crate::peer::log_refusal(format_args!("stdio: {name} has no process: {:?} stream closed", header.stream));
        return;
    };
    if io.secret != header.secret {
        crate::peer::log_refusal(format_args!("stdio: {name}: {:?} stream with a wrong secret closed", header.stream));
        return;
    }
    let _ = setsockopt(&file, sockopt::ReceiveTimeout, &TimeVal::new(0, 0));
    log::debug!("{name}: {:?} stream attached", header.stream);
    io.attach(header.stream, file);
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: [u8; moat_protocol::STDIO_SECRET_LEN] = [0x5a; moat_protocol::STDIO_SECRET_LEN];

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn headers_are_read_exactly_to_the_newline() {
        let line = format!("c1 - stdout {}\nPAYLOAD", hex(&SECRET));
        let mut input = line.as_bytes();
        let h = read_header(&mut input).expect("header");
        assert_eq!(h.container_id, "c1");
        assert_eq!(h.exec_id, "");
        assert_eq!(h.stream, StreamKind::Stdout);
        assert_eq!(h.secret, StdioSecret::from_bytes(&SECRET).expect("secret"));
        assert_eq!(input, b"PAYLOAD", "the payload is left in the stream");
        let line = format!("c1 e2 stdin {}\n", hex(&SECRET));
        assert_eq!(read_header(&mut line.as_bytes()).map(|h| h.exec_id), Ok("e2".into()));
    }

    #[test]
    fn bad_headers_are_refused() {
        let long = vec![b'a'; MAX_STDIO_HEADER + 10];
        assert!(read_header(&mut long.as_slice()).expect_err("long").contains("longer than"));
        assert!(read_header(&mut &b"c1 - stdout"[..]).is_err(), "no newline before EOF");
        assert!(read_header(&mut &b"c1 - stdout\n"[..]).is_err(), "no secret");
        assert!(read_header(&mut &b"c1 - video\n"[..]).is_err());
        assert!(read_header(&mut &b"\xff - stdin\n"[..]).is_err());
    }

    fn stdio(i: bool, o: bool, e: bool) -> moat_protocol::Stdio {
        moat_protocol::Stdio { stdin: i, stdout: o, stderr: e, secret: SECRET.to_vec(), ..Default::default() }
    }

    /// Opens a stream to `reg` as the host would: the header line, then the stream.
    fn open(reg: &'static Registry, line: &str) -> std::os::unix::net::UnixStream {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
        (&ours).write_all(line.as_bytes()).expect("header");
        let t = std::thread::spawn(move || handle(reg, OwnedFd::from(theirs)));
        t.join().expect("handle");
        ours.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        ours
    }

    /// A stream is attached only with its process's secret: a missing or wrong one
    /// (or another process's) gets the stream closed at once, with nothing sent, and
    /// leaves the stream free for the right one.
    #[test]
    fn streams_without_the_process_secret_are_closed() {
        let reg: &'static Registry = Box::leak(Box::default());
        let io = Arc::new(ProcessIo::new("c", "e", &stdio(false, true, false), false, None).expect("io"));
        reg.insert("c", "e", io.clone());
        let mut other = stdio(false, true, false);
        other.secret = vec![0x11; moat_protocol::STDIO_SECRET_LEN];
        reg.insert("d", "", Arc::new(ProcessIo::new("d", "", &other, false, None).expect("io")));
        let [_stdin, stdout, _stderr] = io.take_child_fds().expect("fds");
        let mut w = File::from(stdout);
        w.write_all(b"for the host only\n").expect("write");
        drop(w);
        let mut wrong = SECRET;
        wrong[31] ^= 1;
        let refused = [
            "c e stdout\n".to_string(),
            format!("c e stdout {}\n", hex(&wrong)),
            format!("c e stdout {}\n", hex(&[0x11; 32])),
            format!("c e stdout {}\n", hex(&[0; 32])),
        ];
        for line in &refused {
            let mut s = open(reg, line);
            let mut got = Vec::new();
            s.read_to_end(&mut got).expect("closed at once");
            assert!(got.is_empty(), "{line:?} got {got:?}");
        }
        let mut s = open(reg, &format!("c e stdout {}\n", hex(&SECRET)));
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("read");
        assert_eq!(got, b"for the host only\n");
        // A secret is good for its own process only.
        let mut s = open(reg, &format!("d - stdout {}\n", hex(&SECRET)));
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("closed");
        assert!(got.is_empty());
    }

    #[test]
    fn a_process_without_a_proper_secret_is_refused() {
        for len in [0, 16, 31, 33] {
            let mut s = stdio(false, true, false);
            s.secret = vec![1; len];
            let e = ProcessIo::new("c", "", &s, false, None).err().expect("refused");
            assert!(matches!(&e, AgentError::InvalidArgument(m) if m.contains("secret")), "{e:?}");
        }
    }

    #[test]
    fn output_attached_late_gets_everything_and_eof() {
        let io = ProcessIo::new("c", "", &stdio(false, true, false), false, None).expect("io");
        let [_stdin, stdout, stderr] = io.take_child_fds().expect("fds");
        let mut w = File::from(stdout);
        w.write_all(b"hello\n").expect("write");
        drop(w);
        drop(stderr);
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        io.attach(StreamKind::Stdout, File::from(OwnedFd::from(a)));
        let mut got = Vec::new();
        let mut b = b;
        b.read_to_end(&mut got).expect("read");
        assert_eq!(got, b"hello\n");
    }

    /// A terminal exec's streams attach before its helper made the pty: they are
    /// held, then wired when the master arrives, in both directions.
    #[test]
    fn terminal_streams_attached_before_the_pty_are_wired_when_it_comes() {
        let io = ProcessIo::new("c", "e", &stdio(true, true, false), true, Some((30, 100))).expect("io");
        let fds = io.take_child_fds().expect("placeholders");
        drop(fds);
        assert!(io.resize(10, 10).is_err(), "no pty yet");
        let (out_a, mut out_b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let (in_a, mut in_b) = std::os::unix::net::UnixStream::pair().expect("pair");
        io.attach(StreamKind::Stdout, File::from(OwnedFd::from(out_a)));
        io.attach(StreamKind::Stdin, File::from(OwnedFd::from(in_a)));
        let pty = nix::pty::openpty(None, None).expect("openpty");
        io.set_pty_master(pty.master).expect("wire");
        assert!(io.set_pty_master(nix::pty::openpty(None, None).expect("pty").master).is_err(), "only once");
        io.resize(40, 120).expect("resize now works");
        // Raw mode on the slave, so bytes pass unchanged both ways.
        let mut t = nix::sys::termios::tcgetattr(&pty.slave).expect("tcgetattr");
        nix::sys::termios::cfmakeraw(&mut t);
        nix::sys::termios::tcsetattr(&pty.slave, nix::sys::termios::SetArg::TCSANOW, &t).expect("tcsetattr");
        in_b.write_all(b"ping").expect("write stdin");
        let mut slave = File::from(pty.slave);
        let mut got = [0u8; 4];
        slave.read_exact(&mut got).expect("read from the slave");
        assert_eq!(&got, b"ping");
        slave.write_all(b"pong").expect("write to the slave");
        drop(slave);
        let mut out = Vec::new();
        out_b.read_to_end(&mut out).expect("stdout ends when the slave closes");
        assert_eq!(out, b"pong");
    }

    #[test]
    fn a_pty_for_a_process_without_a_terminal_is_refused() {
        let io = ProcessIo::new("c", "", &stdio(false, true, false), false, None).expect("io");
        assert!(io.set_pty_master(nix::pty::openpty(None, None).expect("pty").master).is_err());
    }

    #[test]
    fn stdin_stream_eof_closes_the_pipe() {
        let io = ProcessIo::new("c", "", &stdio(true, false, false), false, None).expect("io");
        let [stdin, _o, _e] = io.take_child_fds().expect("fds");
        let (a, mut b) = std::os::unix::net::UnixStream::pair().expect("pair");
        io.attach(StreamKind::Stdin, File::from(OwnedFd::from(a)));
        b.write_all(b"abc").expect("write");
        b.shutdown(std::net::Shutdown::Write).expect("half-close");
        let mut got = Vec::new();
        File::from(stdin).read_to_end(&mut got).expect("read");
        assert_eq!(got, b"abc");
    }

    #[test]
    fn close_stdin_with_an_idle_stream_attached() {
        let io = ProcessIo::new("c", "", &stdio(true, false, false), false, None).expect("io");
        let [stdin, _o, _e] = io.take_child_fds().expect("fds");
        let (a, mut b) = std::os::unix::net::UnixStream::pair().expect("pair");
        io.attach(StreamKind::Stdin, File::from(OwnedFd::from(a)));
        b.write_all(b"xyz").expect("write");
        std::thread::sleep(Duration::from_millis(200));
        io.close_stdin();
        let mut got = Vec::new();
        File::from(stdin).read_to_end(&mut got).expect("read");
        assert_eq!(got, b"xyz");
    }

    #[test]
    fn close_stdin_without_a_stream_is_immediate() {
        let io = ProcessIo::new("c", "", &stdio(true, true, false), false, None).expect("io");
        let [stdin, _o, _e] = io.take_child_fds().expect("fds");
        io.close_stdin();
        let mut got = Vec::new();
        File::from(stdin).read_to_end(&mut got).expect("EOF at once");
        assert!(got.is_empty());
    }

    #[test]
    fn terminal_with_stderr_is_refused() {
        assert!(matches!(
            ProcessIo::new("c", "", &stdio(false, true, true), true, None),
            Err(AgentError::InvalidArgument(_))
        ));
    }
}
