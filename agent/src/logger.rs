//! The agent's log: a `log` implementation that prints to the console (info and
//! above, as `moat-agent: ...`) and serves every line (debug and above) to the host on
//! vsock port [`AGENT_LOG_PORT`]. Lines wait in a bounded buffer (about 256 KiB) until
//! a host reads them; when it is full the oldest lines go and a count of the dropped
//! lines is sent in their place, so a slow or absent reader never blocks the agent.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use moat_protocol::AGENT_LOG_PORT;
use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};

/// The most bytes of lines kept for the host.
pub const MAX_BUFFERED: usize = 256 << 10;

#[derive(Default)]
struct Ring {
    lines: VecDeque<String>,
    bytes: usize,
    dropped: u64,
}

impl Ring {
    fn push(&mut self, line: String) {
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.bytes > MAX_BUFFERED {
            let Some(old) = self.lines.pop_front() else { break };
            self.bytes -= old.len();
            self.dropped += 1;
        }
    }

    /// Everything buffered, preceded by a note of what was dropped.
    fn take(&mut self) -> Vec<String> {
        let mut out = Vec::with_capacity(self.lines.len() + 1);
        if self.dropped > 0 {
            out.push(format!("moat-agent: warn: {} log lines dropped (reader too slow or absent)\n", self.dropped));
            self.dropped = 0;
        }
        out.extend(self.lines.drain(..));
        self.bytes = 0;
        out
    }
}

struct Shared {
    ring: Mutex<Ring>,
    ready: Condvar,
    /// Bumped for every new reader: an older reader's writer thread stops.
    generation: AtomicU64,
}

struct AgentLogger {
    shared: Arc<Shared>,
}

impl log::Log for AgentLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Debug && !m.target().starts_with("ttrpc")
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = record.level().as_str().to_ascii_lowercase();
        let line = match record.level() {
            log::Level::Info => format!("moat-agent: {}\n", record.args()),
            _ => format!("moat-agent: {level}: {}\n", record.args()),
        };
        if record.level() <= log::Level::Info {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(line.as_bytes());
            let _ = out.flush();
        }
        if let Ok(mut ring) = self.shared.ring.lock() {
            ring.push(line);
        }
        self.shared.ready.notify_all();
    }

    fn flush(&self) {}
}

/// Installs the logger and starts serving the log port. Call once, early.
pub fn init() {
    let shared =
        Arc::new(Shared { ring: Mutex::new(Ring::default()), ready: Condvar::new(), generation: AtomicU64::new(0) });
    let logger: &'static AgentLogger = Box::leak(Box::new(AgentLogger { shared: shared.clone() }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(log::LevelFilter::Debug);
    }
    std::thread::spawn(move || {
        if let Err(e) = serve(&shared) {
            log::warn!("cannot serve the agent log on vsock port {AGENT_LOG_PORT}: {e}");
        }
    });
}

fn serve(shared: &Arc<Shared>) -> nix::Result<()> {
    let listener = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(listener.as_raw_fd(), &VsockAddr::new(u32::MAX, AGENT_LOG_PORT))?;
    listen(&listener, Backlog::new(4)?)?;
    loop {
        let conn = match crate::sys::accept_owned(&listener) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("agent log: accept failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        if !crate::peer::admit(conn.as_raw_fd(), AGENT_LOG_PORT) {
            continue;
        }
        let generation = shared.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let shared = shared.clone();
        std::thread::spawn(move || write_lines(&shared, conn, generation));
    }
}

/// Sends lines to one reader until it goes away or a newer reader replaces it.
fn write_lines(shared: &Shared, conn: OwnedFd, generation: u64) {
    let mut out = std::fs::File::from(conn);
    loop {
        let batch = {
            let Ok(mut ring) = shared.ring.lock() else { return };
            while ring.lines.is_empty() && ring.dropped == 0 {
                if shared.generation.load(Ordering::SeqCst) != generation {
                    return;
                }
                ring = match shared.ready.wait_timeout(ring, std::time::Duration::from_secs(1)) {
                    Ok((r, _)) => r,
                    Err(_) => return,
                };
            }
            if shared.generation.load(Ordering::SeqCst) != generation {
                return;
            }
            ring.take()
        };
        for line in batch {
            if out.write_all(line.as_bytes()).is_err() {
                return;
            }
        }
    }
}

/// How a log line names a process: `container c1` or `container c1 exec e1`.
pub fn who(container_id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        format!("container {container_id}")
    } else {
        format!("container {container_id} exec {exec_id}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_is_bounded_and_counts_what_it_drops() {
        let mut r = Ring::default();
        let line = "x".repeat(1023) + "\n";
        for _ in 0..300 {
            r.push(line.clone());
        }
        assert!(r.bytes <= MAX_BUFFERED);
        assert_eq!(r.lines.len(), 256);
        let out = r.take();
        assert!(out[0].contains("44 log lines dropped"), "{}", out[0]);
        assert_eq!(out.len(), 257);
        assert!(r.take().is_empty());
    }

    #[test]
    fn process_names() {
        assert_eq!(who("c1", ""), "container c1");
        assert_eq!(who("c1", "e1"), "container c1 exec e1");
    }
}
