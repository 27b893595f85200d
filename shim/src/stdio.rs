//! A process's stdio over vsock: one connection per stream to the agent's
//! STDIO_PORT, a header line naming the process and stream and carrying the
//! process's secret ([`new_secret`], made here and sent to the agent with the
//! process's CreateContainer or ExecProcess), then raw bytes.
//!
//! Copies use plain blocking reads and writes with large buffers on one thread per
//! stream: bytes of a stream arrive in order on one connection, so nothing is
//! reordered, and a slow consumer backpressures the guest instead of growing a
//! buffer here.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use moat_protocol::{StdioHeader, StdioSecret, StreamKind, STDIO_PORT, STDIO_SECRET_LEN};

use crate::vsock::{dial, DialError};

/// Copy buffer size: large enough that per-call overhead is noise at GB/s.
pub const COPY_BUFFER: usize = 1 << 20;

/// How long opening a stream may take. A live guest answers at once; one whose vCPUs
/// the host has not run for a while (many pods booting on few cores) answers late,
/// and the VMM gives up on it only after its own, not shorter, limit (`ANSWER_TIMEOUT`).
pub const STDIO_DIAL_TIMEOUT: Duration = Duration::from_secs(30);

/// A fresh secret for one process's stdio, from the kernel's random source.
pub fn new_secret() -> std::io::Result<StdioSecret> {
    let mut b = [0u8; STDIO_SECRET_LEN];
    getrandom::fill(&mut b).map_err(|e| std::io::Error::other(format!("cannot get random bytes: {e}")))?;
    StdioSecret::from_bytes(&b).map_err(std::io::Error::other)
}

/// Opens the stream `kind` of process (`container`, `exec`), presenting the
/// process's `secret`.
pub fn open_stream(
    uds: &Path,
    container: &str,
    exec: &str,
    kind: StreamKind,
    secret: &StdioSecret,
) -> Result<UnixStream, DialError> {
    let mut s = dial(uds, STDIO_PORT, STDIO_DIAL_TIMEOUT)?;
    let header = StdioHeader {
        container_id: container.to_string(),
        exec_id: exec.to_string(),
        stream: kind,
        secret: secret.clone(),
    };
    s.write_all(header.to_line().as_bytes()).map_err(|source| DialError::Io { port: STDIO_PORT, source })?;
    Ok(s)
}

/// Copies `from` to `to` until EOF; returns the byte count. A write error (the
/// reader of our stdout went away) ends the copy and closes `from`, which the guest
/// sees as a broken pipe.
pub fn copy_out(mut from: UnixStream, mut to: impl Write + Send + 'static) -> JoinHandle<std::io::Result<u64>> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; COPY_BUFFER];
        let mut total = 0u64;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if let Err(e) = to.write_all(&buf[..n]).and_then(|()| to.flush()) {
                let _ = from.shutdown(Shutdown::Both);
                return Err(e);
            }
            total += n as u64;
        }
        Ok(total)
    })
}

/// Copies `from` (the host's stdin) into `to` until EOF, then half-closes `to`: the
/// agent closes the process's stdin once it has delivered every byte before that EOF.
/// Only when the half-close fails is `on_eof` called (it asks the agent to close stdin
/// by RPC): calling it after a good half-close could overtake bytes still in flight.
pub fn copy_in(
    mut from: impl Read + Send + 'static,
    mut to: UnixStream,
    on_eof: impl FnOnce() + Send + 'static,
) -> JoinHandle<std::io::Result<u64>> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; COPY_BUFFER];
        let mut total = 0u64;
        let result = loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            };
            if let Err(e) = to.write_all(&buf[..n]) {
                // The process closed its stdin or is gone: stop quietly.
                break if e.kind() == std::io::ErrorKind::BrokenPipe { Ok(total) } else { Err(e) };
            }
            total += n as u64;
        };
        if to.shutdown(Shutdown::Write).is_err() {
            on_eof();
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn secrets_are_fresh_and_full_length() {
        let a = new_secret().expect("secret");
        let b = new_secret().expect("secret");
        assert_eq!(a.as_bytes().len(), STDIO_SECRET_LEN);
        assert_ne!(a, b);
        assert!(a.as_bytes().iter().any(|&x| x != 0));
    }

    /// A stream presents its process's secret first thing: the agent reads exactly
    /// this header line before it attaches anything.
    #[test]
    fn open_stream_presents_the_secret() {
        use std::io::BufRead;
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("v.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().expect("accept");
            let mut r = std::io::BufReader::new(s.try_clone().expect("clone"));
            let mut connect = String::new();
            r.read_line(&mut connect).expect("CONNECT");
            (&s).write_all(b"OK 1073741825\n").expect("reply");
            let mut header = String::new();
            r.read_line(&mut header).expect("header");
            (connect, header)
        });
        let secret = new_secret().expect("secret");
        let _s = open_stream(&path, "c1", "e1", StreamKind::Stderr, &secret).expect("open");
        let (connect, header) = h.join().expect("server");
        assert_eq!(connect, format!("CONNECT {STDIO_PORT}\n"));
        let parsed = StdioHeader::parse(&header).expect("a header the agent takes");
        assert_eq!((parsed.container_id.as_str(), parsed.exec_id.as_str(), parsed.stream), ("c1", "e1", StreamKind::Stderr));
        assert!(parsed.secret == secret, "the header carries the process's secret");
    }

    #[test]
    fn copy_out_moves_every_byte_in_order() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        let data: Vec<u8> = (0..(3 * COPY_BUFFER + 17)).map(|i| (i % 251) as u8).collect();
        let expect = data.clone();
        let writer = std::thread::spawn(move || {
            b.write_all(&data).expect("write");
        });
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        struct Chan(mpsc::Sender<Vec<u8>>);
        impl Write for Chan {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.send(b.to_vec()).map_err(|_| std::io::Error::other("closed"))?;
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let h = copy_out(a, Chan(tx));
        writer.join().expect("writer");
        assert_eq!(h.join().expect("copy").expect("ok"), expect.len() as u64);
        let got: Vec<u8> = rx.iter().flatten().collect();
        assert!(got == expect, "bytes lost or reordered");
    }

    #[test]
    fn copy_in_half_closes_without_the_close_rpc() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        let (tx, rx) = mpsc::channel();
        let h = copy_in(&b"hello"[..], a, move || tx.send(()).expect("eof"));
        let mut got = Vec::new();
        b.read_to_end(&mut got).expect("read to EOF: the write side was half-closed");
        assert_eq!(got, b"hello");
        assert_eq!(h.join().expect("copy").expect("ok"), 5);
        assert!(rx.try_recv().is_err(), "CloseStdin must not race the half-closed stream");
    }
}
