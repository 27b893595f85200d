//! A process's stdio between the guest's vsock streams and the paths a container
//! manager gives: FIFOs (what ctr and Docker use), `file://` log files or plain
//! files. Output is copied until the guest's stream ends, and [`ProcessIo::drain`]
//! waits for that, so whoever reports the exit can report it after the last byte.
//!
//! Output FIFOs are opened read-write: the open never blocks waiting for the other
//! side, a reader that goes away and comes back (a re-attaching client) loses
//! nothing, and a full FIFO backpressures the guest instead of growing a buffer here.
//!
//! The stdin FIFO is opened read-only, in its copy thread (the open waits for the
//! client's writer): the guest's stdin ends when the client closes its end (what
//! `ctr` does at the end of its input) or when [`ProcessIo::close_stdin`] is called
//! (containerd's CloseIO, what Docker does), whichever comes first; what was written
//! before is still delivered. The copy waits until the process has started
//! ([`ProcessIo::started`]): a client may write all its input and close before
//! Start, and that EOF must not reach the guest before the process exists.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use moat_protocol::{StdioSecret, StreamKind};
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::stdio::{copy_out, open_stream, COPY_BUFFER};
use crate::task::IoPaths;
use crate::vsock::DialError;

/// How often the stdin copy looks at its stop flag.
const STDIN_POLL_MS: u16 = 100;

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("cannot open {what} {path}")]
    Open {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {uri}: {why}")]
    Unsupported { what: &'static str, uri: String, why: &'static str },
    #[error("cannot attach the guest's {0} stream")]
    Stream(&'static str, #[source] DialError),
}

/// Which streams the guest should attach, from the paths given: (stdin, stdout, stderr).
/// With a terminal the pty is stdout and stderr at once.
pub fn attached(p: &IoPaths) -> (bool, bool, bool) {
    (!p.stdin.is_empty(), !p.stdout.is_empty(), !p.terminal && !p.stderr.is_empty())
}

/// Opens an output path: a FIFO read-write, a `file://` or plain file for appending.
fn open_output(what: &'static str, uri: &str) -> Result<File, IoError> {
    if uri.starts_with("binary://") {
        return Err(IoError::Unsupported { what, uri: uri.into(), why: "logging binaries are not supported yet" });
    }
    let path = uri.strip_prefix("file://").or_else(|| uri.strip_prefix("fifo://")).unwrap_or(uri);
    let err = |source| IoError::Open { what, path: path.to_string(), source };
    let is_fifo = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo());
    if is_fifo {
        File::options().read(true).write(true).open(path).map_err(err)
    } else {
        if let Some(dir) = Path::new(path).parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        File::options().create(true).append(true).open(path).map_err(err)
    }
}

/// The stdin path, checked (it must exist now: the client made it before Create).
fn input_path(uri: &str) -> Result<PathBuf, IoError> {
    let path = uri.strip_prefix("fifo://").unwrap_or(uri);
    std::fs::metadata(path).map_err(|source| IoError::Open { what: "stdin", path: path.to_string(), source })?;
    Ok(PathBuf::from(path))
}

/// Opens the stdin FIFO for reading, waiting for a writer (a FIFO's read-only open
/// blocks until one comes; [`ProcessIo::close_stdin`] releases it), then makes it
/// non-blocking for the copy's poll loop.
fn open_input(path: &Path) -> std::io::Result<File> {
    let f = File::options().read(true).open(path)?;
    nix::fcntl::fcntl(std::os::fd::AsRawFd::as_raw_fd(&f), nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(std::io::Error::from)?;
    Ok(f)
}

/// Copies the stdin FIFO at `path` into `to` until the client's writer closes it
/// (EOF), `stop` is set (then what is buffered is still copied) or the guest closes
/// its side; then half-closes `to` and calls `on_eof`.
fn copy_stdin(
    path: PathBuf,
    mut to: UnixStream,
    stop: Arc<AtomicBool>,
    go: Receiver<()>,
    on_eof: impl FnOnce() + Send + 'static,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        // Open first (the client may write all and close before Start: its bytes
        // wait in the FIFO), forward only once the process runs.
        let opened = open_input(&path);
        if go.recv().is_err() {
            // The process never started (deleted before Start).
            let _ = to.shutdown(Shutdown::Write);
            return;
        }
        let mut buf = vec![0u8; COPY_BUFFER];
        let mut from = match opened {
            Ok(f) => Some(f),
            Err(e) => {
                log::warn!("stdin {}: {e}", path.display());
                None
            }
        };
        while let Some(from) = from.as_mut() {
            let stopping = stop.load(Ordering::SeqCst);
            let ready = {
                let mut fds = [PollFd::new(from.as_fd(), PollFlags::POLLIN)];
                poll(&mut fds, PollTimeout::from(if stopping { 0 } else { STDIN_POLL_MS })).unwrap_or(0) > 0
            };
            if !ready {
                if stopping {
                    break;
                }
                continue;
            }
            let n = match from.read(&mut buf) {
                // Every writer closed: the client's input ended.
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => {
                    if stopping {
                        break;
                    }
                    continue;
                }
                Err(e) => {
                    log::debug!("stdin: {e}");
                    break;
                }
            };
            if to.write_all(&buf[..n]).is_err() {
                // The process closed its stdin or is gone.
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        on_eof();
    })
}

/// The copies of one process's stdio.
pub struct ProcessIo {
    outputs: Mutex<Vec<JoinHandle<std::io::Result<u64>>>>,
    stdin: Option<(PathBuf, Arc<AtomicBool>)>,
    /// Releases the stdin copy once the process has started.
    go: Mutex<Option<Sender<()>>>,
}

impl ProcessIo {
    /// Opens the paths, connects the guest's streams of (`container`, `exec`) through
    /// the vsock socket `uds` with the process's `secret`, and starts copying. Call it
    /// after the agent knows the process and before it starts. `on_stdin_eof` runs
    /// when stdin has ended.
    pub fn attach(
        uds: &Path,
        container: &str,
        exec: &str,
        secret: &StdioSecret,
        paths: &IoPaths,
        on_stdin_eof: impl FnOnce() + Send + 'static,
    ) -> Result<ProcessIo, IoError> {
        let (want_in, want_out, want_err) = attached(paths);
        // The host side first: a bad path is the caller's error, reported before
        // anything in the guest is touched.
        let out = want_out.then(|| open_output("stdout", &paths.stdout)).transpose()?;
        let err = want_err.then(|| open_output("stderr", &paths.stderr)).transpose()?;
        let input = want_in.then(|| input_path(&paths.stdin)).transpose()?;
        let stream = |kind, name| open_stream(uds, container, exec, kind, secret).map_err(|e| IoError::Stream(name, e));
        let mut outputs = Vec::new();
        if let Some(f) = out {
            outputs.push(copy_out(stream(StreamKind::Stdout, "stdout")?, f));
        }
        if let Some(f) = err {
            outputs.push(copy_out(stream(StreamKind::Stderr, "stderr")?, f));
        }
        let mut stdin = None;
        let mut go = None;
        if let Some(path) = input {
            let stop = Arc::new(AtomicBool::new(false));
            let (tx, rx) = channel();
            drop(copy_stdin(path.clone(), stream(StreamKind::Stdin, "stdin")?, stop.clone(), rx, on_stdin_eof));
            stdin = Some((path, stop));
            go = Some(tx);
        }
        Ok(ProcessIo { outputs: Mutex::new(outputs), stdin, go: Mutex::new(go) })
    }

    /// The process runs: start feeding its stdin.
    pub fn started(&self) {
        if let Some(tx) = self.go.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(());
        }
    }

    /// Ends stdin: what the client wrote is still delivered, then the guest sees EOF.
    pub fn close_stdin(&self) {
        if let Some((path, stop)) = &self.stdin {
            if !stop.swap(true, Ordering::SeqCst) {
                // If the copy still waits in open() for a writer, be that writer for
                // a moment: the open returns and the copy sees EOF. (ENXIO: nobody
                // waits, the copy is past its open.)
                let _ = File::options().write(true).custom_flags(OFlag::O_NONBLOCK.bits()).open(path);
            }
        }
    }

    /// Waits until every output stream has reached EOF and been written out.
    pub fn drain(&self) {
        let handles = std::mem::take(&mut *self.outputs.lock().unwrap_or_else(|p| p.into_inner()));
        for h in handles {
            match h.join() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => log::debug!("output copy ended: {e}"),
                Err(_) => log::warn!("an output copy thread panicked"),
            }
        }
    }
}

impl Drop for ProcessIo {
    fn drop(&mut self) {
        self.close_stdin();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A start signal already given.
    fn gone() -> Receiver<()> {
        let (tx, rx) = channel();
        tx.send(()).expect("send");
        rx
    }

    #[test]
    fn stdin_waits_for_the_start_and_input_closed_before_it_is_kept() {
        let d = tempfile::tempdir().expect("tmp");
        let fifo = d.path().join("in");
        mkfifo(&fifo);
        let (a, mut b) = UnixStream::pair().expect("pair");
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = channel();
        let h = copy_stdin(fifo.clone(), a, stop.clone(), rx, || {});
        // The client writes everything and closes before Start.
        File::options().write(true).open(&fifo).and_then(|mut w| w.write_all(b"early")).expect("write");
        b.set_read_timeout(Some(std::time::Duration::from_millis(100))).expect("timeout");
        assert!(b.read(&mut [0u8; 8]).is_err(), "nothing may flow before the start");
        tx.send(()).expect("start");
        b.set_read_timeout(None).expect("timeout");
        let mut got = Vec::new();
        b.read_to_end(&mut got).expect("EOF");
        assert_eq!(got, b"early");
        h.join().expect("thread");
    }

    fn mkfifo(p: &Path) {
        nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    }

    #[test]
    fn which_streams_attach() {
        let p = |i: &str, o: &str, e: &str, terminal| IoPaths { stdin: i.into(), stdout: o.into(), stderr: e.into(), terminal };
        assert_eq!(attached(&p("", "", "", false)), (false, false, false));
        assert_eq!(attached(&p("/i", "/o", "/e", false)), (true, true, true));
        assert_eq!(attached(&p("/i", "/o", "/e", true)), (true, true, false));
    }

    #[test]
    fn outputs_open_without_a_reader_and_files_append() {
        let d = tempfile::tempdir().expect("tmp");
        let fifo = d.path().join("out");
        mkfifo(&fifo);
        let mut w = open_output("stdout", fifo.to_str().expect("utf8")).expect("fifo opens at once");
        w.write_all(b"kept").expect("write without reader");
        let mut r = File::open(&fifo).expect("reader");
        let mut buf = [0u8; 4];
        r.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"kept");
        let log = d.path().join("sub/log");
        let uri = format!("file://{}", log.display());
        open_output("stdout", &uri).and_then(|mut f| f.write_all(b"a").map_err(|e| IoError::Open { what: "x", path: "".into(), source: e })).expect("a");
        open_output("stdout", &uri).and_then(|mut f| f.write_all(b"b").map_err(|e| IoError::Open { what: "x", path: "".into(), source: e })).expect("b");
        assert_eq!(std::fs::read(&log).expect("log"), b"ab");
        let e = open_output("stdout", "binary:///usr/bin/logger?x=1").expect_err("binary");
        assert!(e.to_string().contains("not supported"), "{e}");
    }

    #[test]
    fn stdin_copies_until_the_client_closes_its_end() {
        let d = tempfile::tempdir().expect("tmp");
        let fifo = d.path().join("in");
        mkfifo(&fifo);
        let (a, mut b) = UnixStream::pair().expect("pair");
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let h = copy_stdin(fifo.clone(), a, stop.clone(), gone(), move || tx.send(()).expect("eof"));
        // The client's writer closing is the end of stdin.
        let mut w = File::options().write(true).open(&fifo).expect("writer");
        w.write_all(b"hello ").expect("w1");
        w.write_all(b"world").expect("w2");
        drop(w);
        let mut got = Vec::new();
        b.read_to_end(&mut got).expect("read to EOF");
        assert_eq!(got, b"hello world");
        rx.recv().expect("on_eof ran");
        h.join().expect("thread");
    }

    #[test]
    fn close_stdin_ends_a_copy_whose_client_never_came_or_never_closed() {
        let d = tempfile::tempdir().expect("tmp");
        let paths = |name: &str| {
            let p = d.path().join(name);
            mkfifo(&p);
            p
        };
        // Nobody ever opens the FIFO for writing: the copy waits in open().
        let fifo = paths("never");
        let (a, mut b) = UnixStream::pair().expect("pair");
        let stop = Arc::new(AtomicBool::new(false));
        let h = copy_stdin(fifo.clone(), a, stop.clone(), gone(), || {});
        std::thread::sleep(std::time::Duration::from_millis(50));
        let io = ProcessIo { outputs: Default::default(), stdin: Some((fifo, stop)), go: Default::default() };
        io.close_stdin();
        let mut got = Vec::new();
        b.read_to_end(&mut got).expect("EOF");
        assert!(got.is_empty());
        h.join().expect("thread");
        // A writer that stays open: CloseIO still ends stdin, after its bytes.
        let fifo = paths("open");
        let (a, mut b) = UnixStream::pair().expect("pair");
        let stop = Arc::new(AtomicBool::new(false));
        let h = copy_stdin(fifo.clone(), a, stop.clone(), gone(), || {});
        let mut w = File::options().write(true).open(&fifo).expect("writer");
        w.write_all(b"kept").expect("write");
        std::thread::sleep(std::time::Duration::from_millis(50));
        let io = ProcessIo { outputs: Default::default(), stdin: Some((fifo, stop)), go: Default::default() };
        io.close_stdin();
        let mut got = Vec::new();
        b.read_to_end(&mut got).expect("EOF");
        assert_eq!(got, b"kept");
        h.join().expect("thread");
        drop(w);
    }
}
