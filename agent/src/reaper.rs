//! The agent's one reaper. As PID 1 the agent inherits every orphan of the guest,
//! container processes included (their setup helper exits right after forking them).
//! One thread waits for SIGCHLD on a signalfd and reaps with waitpid(-1); exit
//! statuses are kept by pid, also for pids nobody registered yet, so a process that
//! exits before its starter registers it is not lost. Nothing else in the agent may
//! wait for children.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128 + n for a signal n.
    pub status: i32,
    /// Nanoseconds since the Unix epoch.
    pub at_ns: i64,
}

/// The exit status of a wait status, or None if the process did not end.
pub fn exit_status(ws: WaitStatus) -> Option<(i32, i32)> {
    match ws {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), code)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw(), 128 + sig as i32)),
        _ => None,
    }
}

/// Where one process's exit is delivered.
#[derive(Default)]
pub struct ExitCell {
    exit: Mutex<Option<Exit>>,
    cond: Condvar,
}

impl ExitCell {
    pub fn set(&self, e: Exit) {
        if let Ok(mut g) = self.exit.lock() {
            if g.is_none() {
                *g = Some(e);
            }
        }
        self.cond.notify_all();
    }

    pub fn get(&self) -> Option<Exit> {
        self.exit.lock().ok().and_then(|g| *g)
    }

    /// Blocks until the process has exited.
    pub fn wait(&self) -> Option<Exit> {
        let mut g = self.exit.lock().ok()?;
        loop {
            if let Some(e) = *g {
                return Some(e);
            }
            g = self.cond.wait_timeout(g, Duration::from_secs(5)).ok()?.0;
        }
    }
}

/// Exits of pids nobody registered, kept for a late registration. Bounded: orphans
/// the agent never started (a daemon's grandchild) must not grow it forever.
const MAX_UNCLAIMED: usize = 4096;

#[derive(Default)]
struct Table {
    watched: HashMap<i32, Arc<ExitCell>>,
    unclaimed: HashMap<i32, Exit>,
    order: VecDeque<i32>,
}

impl Table {
    fn record(&mut self, pid: i32, exit: Exit) {
        if let Some(cell) = self.watched.remove(&pid) {
            cell.set(exit);
            return;
        }
        if self.unclaimed.insert(pid, exit).is_none() {
            self.order.push_back(pid);
        }
        while self.order.len() > MAX_UNCLAIMED {
            if let Some(old) = self.order.pop_front() {
                self.unclaimed.remove(&old);
            }
        }
    }

    fn watch(&mut self, pid: i32) -> Arc<ExitCell> {
        let cell = Arc::new(ExitCell::default());
        self.watch_with(pid, cell.clone());
        cell
    }

    fn watch_with(&mut self, pid: i32, cell: Arc<ExitCell>) {
        if let Some(exit) = self.unclaimed.remove(&pid) {
            self.order.retain(|p| *p != pid);
            cell.set(exit);
        } else {
            self.watched.insert(pid, cell);
        }
    }
}

fn table() -> &'static Mutex<Table> {
    static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
    TABLE.get_or_init(|| Mutex::new(Table::default()))
}

pub fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// Blocks SIGCHLD in the calling thread. Call first thing in main, before any
/// thread starts, so every thread inherits the mask and SIGCHLD reaches only the
/// signalfd. (Processes the agent starts get an empty mask again.)
pub fn block_sigchld() -> nix::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
}

/// Starts the reaper thread.
pub fn start() -> nix::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    let sfd = SignalFd::new(&set)?;
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || loop {
            reap_all();
            if let Err(e) = sfd.read_signal() {
                log::warn!("reaper: reading the signalfd failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .map_err(|_| nix::Error::EAGAIN)?;
    Ok(())
}

/// Reaps every child that has exited. The table stays locked while waitpid runs, so
/// [`with_live`] never sees a pid that was reaped but not yet recorded.
fn reap_all() {
    let Ok(mut t) = table().lock() else { return };
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(ws) => {
                if let Some((pid, status)) = exit_status(ws) {
                    t.record(pid, Exit { status, at_ns: now_ns() });
                }
            }
        }
    }
}

/// Registers interest in `pid`'s exit (which may already have happened).
pub fn watch(pid: i32) -> Arc<ExitCell> {
    match table().lock() {
        Ok(mut t) => t.watch(pid),
        Err(_) => Arc::new(ExitCell::default()),
    }
}

/// Delivers `pid`'s exit (which may already have happened) to `cell`.
pub fn watch_with(pid: i32, cell: Arc<ExitCell>) {
    if let Ok(mut t) = table().lock() {
        t.watch_with(pid, cell);
    }
}

/// Runs `f` while `pid` is known not to have been reaped, so it cannot have been
/// reused; returns None if `cell` says the process is gone.
pub fn with_live<T>(cell: &ExitCell, f: impl FnOnce() -> T) -> Option<T> {
    let _t = table().lock().ok()?;
    if cell.get().is_some() {
        return None;
    }
    Some(f())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_codes_or_128_plus_signal() {
        let p = Pid::from_raw(7);
        assert_eq!(exit_status(WaitStatus::Exited(p, 3)), Some((7, 3)));
        assert_eq!(exit_status(WaitStatus::Signaled(p, Signal::SIGKILL, false)), Some((7, 137)));
        assert_eq!(exit_status(WaitStatus::Signaled(p, Signal::SIGTERM, true)), Some((7, 143)));
        assert_eq!(exit_status(WaitStatus::StillAlive), None);
    }

    #[test]
    fn an_exit_before_registration_is_kept() {
        let mut t = Table::default();
        let e = Exit { status: 3, at_ns: 1 };
        t.record(42, e);
        assert_eq!(t.watch(42).get(), Some(e));
        let cell = t.watch(43);
        assert_eq!(cell.get(), None);
        t.record(43, e);
        assert_eq!(cell.wait(), Some(e));
        assert!(t.watched.is_empty() && t.unclaimed.is_empty());
    }

    #[test]
    fn unclaimed_exits_are_bounded() {
        let mut t = Table::default();
        for pid in 0..(MAX_UNCLAIMED as i32 + 10) {
            t.record(pid, Exit { status: 0, at_ns: 0 });
        }
        assert_eq!(t.unclaimed.len(), MAX_UNCLAIMED);
        assert!(!t.unclaimed.contains_key(&0));
    }
}
