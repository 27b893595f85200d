//! Who may talk to the agent: the host, and nobody else. Every port the agent listens
//! on (the API, stdio, its log, the selftest's echo) checks each connection's peer
//! and closes it at once unless the peer is vsock CID 2 (VMADDR_CID_HOST). A process
//! in the guest, a container's included, is never the host: without the kernel's
//! vsock loopback transport it cannot even connect, and if it could, this check
//! would close its connection anyway.
//!
//! Refusals are logged, at most [`LOG_BURST`] lines per [`LOG_WINDOW`]; the rest are
//! counted and the count is logged once the window has passed, so a guest process
//! that keeps connecting cannot flood the log.

use std::os::fd::RawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use moat_protocol::HOST_CID;
use nix::sys::socket::{getpeername, SockaddrLike, SockaddrStorage};

/// Refusals logged per window, at most.
pub const LOG_BURST: u32 = 10;
/// The window of the refusal log's limit.
pub const LOG_WINDOW: Duration = Duration::from_secs(10);

/// Where a connection comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// A vsock peer: its CID and port.
    Vsock { cid: u32, port: u32 },
    /// Anything else (another address family; a socket without a peer).
    Other,
}

impl Peer {
    /// The peer of the connected socket `fd`.
    pub fn of(fd: RawFd) -> Peer {
        match getpeername::<SockaddrStorage>(fd) {
            Ok(addr) => match addr.as_vsock_addr() {
                Some(v) if addr.family() == Some(nix::sys::socket::AddressFamily::Vsock) => {
                    Peer::Vsock { cid: v.cid(), port: v.port() }
                }
                _ => Peer::Other,
            },
            Err(_) => Peer::Other,
        }
    }

    /// True only for the host.
    pub fn is_host(self) -> bool {
        matches!(self, Peer::Vsock { cid, .. } if cid == HOST_CID)
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Vsock { cid, port } => write!(f, "vsock CID {cid} port {port}"),
            Peer::Other => f.write_str("a peer that is not a vsock address"),
        }
    }
}

/// Counts log lines in fixed windows: `burst` per window pass, the rest are counted.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    window: Duration,
    state: Mutex<(Option<Instant>, u32, u64)>, // (window start, lines in it, suppressed)
}

/// What to do with one line.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` lines were dropped since the last one logged.
    Log { suppressed: u64 },
    Drop,
}

impl RateLimit {
    pub const fn new(burst: u32, window: Duration) -> RateLimit {
        RateLimit { burst, window, state: Mutex::new((None, 0, 0)) }
    }

    pub fn check(&self, now: Instant) -> Verdict {
        let Ok(mut s) = self.state.lock() else { return Verdict::Drop };
        let (start, count, suppressed) = &mut *s;
        if start.is_none_or(|t| now.duration_since(t) >= self.window) {
            *start = Some(now);
            *count = 0;
        }
        if *count < self.burst {
            *count += 1;
            Verdict::Log { suppressed: std::mem::take(suppressed) }
        } else {
            *suppressed += 1;
            Verdict::Drop
        }
    }
}

static REFUSALS: RateLimit = RateLimit::new(LOG_BURST, LOG_WINDOW);

/// Logs a refused connection or stream, rate-limited.
pub fn log_refusal(what: std::fmt::Arguments<'_>) {
    if let Verdict::Log { suppressed } = REFUSALS.check(Instant::now()) {
        if suppressed > 0 {
            log::warn!("{suppressed} more refusals were not logged");
        }
        log::warn!("{what}");
    }
}

/// True if the connection `fd`, accepted on `port`, comes from the host; otherwise
/// logs the refusal (rate-limited) and returns false: the caller closes it at once.
pub fn admit(fd: RawFd, port: u32) -> bool {
    let peer = Peer::of(fd);
    if peer.is_host() {
        return true;
    }
    log_refusal(format_args!("port {port}: connection from {peer} refused: only the host may connect"));
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn only_the_host_cid_is_the_host() {
        assert!(Peer::Vsock { cid: 2, port: 1_073_741_824 }.is_host());
        for cid in [0, 1, 3, 4, u32::MAX] {
            assert!(!Peer::Vsock { cid, port: 5 }.is_host(), "CID {cid}");
        }
        assert!(!Peer::Other.is_host());
    }

    #[test]
    fn a_socket_that_is_not_vsock_is_refused() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        assert_eq!(Peer::of(a.as_raw_fd()), Peer::Other);
        assert!(!admit(a.as_raw_fd(), 1024));
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        assert_eq!(Peer::of(c.as_raw_fd()), Peer::Other);
        assert!(!admit(c.as_raw_fd(), 1025));
        // Not a socket at all.
        let f = std::fs::File::open("/dev/null").expect("null");
        assert!(!admit(f.as_raw_fd(), 1026));
    }

    #[test]
    fn refusal_logs_are_rate_limited() {
        let r = RateLimit::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(r.check(t0), Verdict::Log { suppressed: 0 });
        }
        for i in 0..1000 {
            assert_eq!(r.check(t0 + Duration::from_millis(i)), Verdict::Drop);
        }
        // A new window: the count of what was dropped comes with the next line.
        assert_eq!(r.check(t0 + Duration::from_secs(10)), Verdict::Log { suppressed: 1000 });
        assert_eq!(r.check(t0 + Duration::from_secs(11)), Verdict::Log { suppressed: 0 });
    }
}
