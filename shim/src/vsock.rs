//! Hybrid vsock: a Unix socket served by moat-vmm; `CONNECT <port>\n` asks for a
//! connection to a guest port, and `OK <n>\n` says it is open.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Longest handshake reply we read ("OK 4294967295\n" is 14 bytes).
const MAX_REPLY: usize = 32;

/// Why a connection to a guest port could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot connect to the VMM's vsock socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("guest port {port} refused the connection")]
    Refused { port: u32 },
    /// The VMM's own refusal: too many connections, or the guest did not answer.
    #[error("guest port {port}: the VMM says: {reason}")]
    Vmm { port: u32, reason: String },
    #[error("guest port {port}: unexpected handshake reply {reply:?}")]
    BadReply { port: u32, reply: String },
    #[error("guest port {port}: handshake failed")]
    Io {
        port: u32,
        #[source]
        source: std::io::Error,
    },
}

/// Opens a stream to guest port `port`; the whole handshake gets `timeout`, the
/// stream itself has none.
pub fn dial(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, DialError> {
    let deadline = Instant::now() + timeout;
    let mut s = UnixStream::connect(uds).map_err(|source| DialError::Connect { path: uds.display().to_string(), source })?;
    let io = |source| DialError::Io { port, source };
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(io)?;
    // Byte by byte: whatever follows the newline belongs to the stream.
    let mut reply = Vec::with_capacity(MAX_REPLY);
    let mut b = [0u8; 1];
    loop {
        // One deadline for the whole reply: a peer dribbling a byte at a time must
        // not stretch the handshake to MAX_REPLY timeouts.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io(std::io::Error::from(std::io::ErrorKind::TimedOut)));
        }
        s.set_read_timeout(Some(left)).map_err(io)?;
        match s.read(&mut b) {
            Ok(0) => return Err(DialError::Refused { port }),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Err(DialError::Refused { port }),
            Err(e) => return Err(io(e)),
        }
        if b[0] == b'\n' {
            break;
        }
        reply.push(b[0]);
        if reply.len() >= MAX_REPLY {
            return Err(DialError::BadReply { port, reply: String::from_utf8_lossy(&reply).into_owned() });
        }
    }
    let text = String::from_utf8_lossy(&reply).into_owned();
    if let Some(reason) = text.strip_prefix("ERR ") {
        // Escaped: an error message carries no control characters.
        return Err(DialError::Vmm { port, reason: reason.escape_debug().to_string() });
    }
    let ok = text.strip_prefix("OK ").is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()));
    if !ok {
        return Err(DialError::BadReply { port, reply: text });
    }
    s.set_read_timeout(None).map_err(io)?;
    s.set_write_timeout(None).map_err(io)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    fn serve(reply: &'static [u8]) -> (tempfile::TempDir, std::path::PathBuf, std::thread::JoinHandle<String>) {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("v.sock");
        let l = UnixListener::bind(&path).expect("bind");
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().expect("accept");
            let mut r = std::io::BufReader::new(s.try_clone().expect("clone"));
            let mut line = String::new();
            r.read_line(&mut line).expect("read");
            (&s).write_all(reply).expect("reply");
            line
        });
        (dir, path, h)
    }

    #[test]
    fn handshake_ok_keeps_the_following_bytes() {
        let (_d, path, h) = serve(b"OK 1073741824\npayload");
        let mut s = dial(&path, 1024, Duration::from_secs(5)).expect("dial");
        assert_eq!(h.join().expect("server"), "CONNECT 1024\n");
        let mut rest = String::new();
        s.read_to_string(&mut rest).expect("rest");
        assert_eq!(rest, "payload");
    }

    #[test]
    fn a_dribbled_reply_gets_one_deadline() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("v.sock");
        let l = UnixListener::bind(&path).expect("bind");
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            // Each byte well inside the per-read timeout, the whole line well past it.
            for b in b"OK 1073741824\n" {
                std::thread::sleep(Duration::from_millis(60));
                if s.write_all(&[*b]).is_err() {
                    break;
                }
            }
        });
        let r = dial(&path, 5, Duration::from_millis(300));
        assert!(matches!(&r, Err(DialError::Io { source, .. }) if source.kind() == std::io::ErrorKind::TimedOut || source.kind() == std::io::ErrorKind::WouldBlock), "{r:?}");
        h.join().expect("server");
    }

    #[test]
    fn refusals_and_garbage() {
        let (_d, path, h) = serve(b"");
        assert!(matches!(dial(&path, 5, Duration::from_secs(5)), Err(DialError::Refused { port: 5 })));
        let (_d, path, _h) = serve(b"ERR the guest did not answer\n");
        let e = dial(&path, 5, Duration::from_secs(5)).expect_err("ERR");
        assert_eq!(e.to_string(), "guest port 5: the VMM says: the guest did not answer");
        h.join().expect("server");
        let (_d, path, h) = serve(b"NO\n");
        assert!(matches!(dial(&path, 5, Duration::from_secs(5)), Err(DialError::BadReply { .. })));
        h.join().expect("server");
        let (_d, path, h) = serve(&[b'O'; 100]);
        assert!(matches!(dial(&path, 5, Duration::from_secs(5)), Err(DialError::BadReply { .. })));
        h.join().expect("server");
        assert!(matches!(dial(Path::new("/nonexistent/v.sock"), 5, Duration::from_secs(1)), Err(DialError::Connect { .. })));
    }
}
