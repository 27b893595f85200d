//! The life of one process of a container (its init or an exec), as a runtime
//! reports it: `Created -> Running (<-> Paused) -> Stopped -> Deleted`. Every change
//! goes through [`TaskState::to`]; a transition the table does not allow is an error
//! naming both states, never a silent overwrite.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// Where a process is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskState {
    Created,
    Running,
    Paused,
    Stopped,
    Deleted,
}

/// A transition the state machine does not allow.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot go from {from:?} to {to:?}")]
pub struct StateError {
    pub from: TaskState,
    pub to: TaskState,
}

impl TaskState {
    /// The state after moving to `to`, if that move is allowed.
    pub fn to(self, to: TaskState) -> Result<TaskState, StateError> {
        use TaskState::*;
        let ok = matches!(
            (self, to),
            (Created, Running)
                | (Running, Paused)
                | (Paused, Running)
                // A process may die in any live state (killed while paused, killed
                // before it started).
                | (Created | Running | Paused, Stopped)
                | (Created | Stopped, Deleted)
        );
        if ok {
            Ok(to)
        } else {
            Err(StateError { from: self, to })
        }
    }
}

/// The host paths containerd gave for a process's stdio ("" = not attached).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IoPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128 + n for a signal n.
    pub status: u32,
    pub at: SystemTime,
}

/// What a process looks like right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub state: TaskState,
    /// The pid in the guest, once started.
    pub guest_pid: Option<u32>,
    pub exit: Option<Exit>,
}

#[derive(Debug)]
struct Inner {
    state: TaskState,
    guest_pid: Option<u32>,
    exit: Option<Exit>,
}

/// One process: its bookkeeping, shared between the RPC handlers and its exit watcher.
#[derive(Debug)]
pub struct Process {
    pub container: String,
    /// "" for the container's init process.
    pub exec: String,
    pub io: IoPaths,
    inner: Mutex<Inner>,
    exited: Condvar,
}

impl Process {
    pub fn new(container: &str, exec: &str, io: IoPaths) -> Process {
        Process {
            container: container.to_string(),
            exec: exec.to_string(),
            io,
            inner: Mutex::new(Inner { state: TaskState::Created, guest_pid: None, exit: None }),
            exited: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves plain data behind: go on.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> Snapshot {
        let i = self.lock();
        Snapshot { state: i.state, guest_pid: i.guest_pid, exit: i.exit }
    }

    pub fn state(&self) -> TaskState {
        self.lock().state
    }

    /// Checks that the process could move to `to` now, without moving it.
    pub fn check(&self, to: TaskState) -> Result<(), StateError> {
        self.lock().state.to(to).map(drop)
    }

    /// Moves to `to` (Running on start needs [`Process::started`], Stopped needs
    /// [`Process::exited`]).
    pub fn set(&self, to: TaskState) -> Result<(), StateError> {
        let mut i = self.lock();
        i.state = i.state.to(to)?;
        Ok(())
    }

    /// Created -> Running with the guest's pid.
    pub fn started(&self, guest_pid: u32) -> Result<(), StateError> {
        let mut i = self.lock();
        i.state = i.state.to(TaskState::Running)?;
        i.guest_pid = Some(guest_pid);
        Ok(())
    }

    /// -> Stopped with its exit; wakes every waiter. A second exit is refused.
    pub fn exited(&self, exit: Exit) -> Result<(), StateError> {
        self.exited_then(exit, || {})
    }

    /// [`Process::exited`], running `report` (publishing the exit event) under the
    /// process's lock between the check and the change: nobody sees the process
    /// Stopped before its exit was reported (a Delete published after it), nor
    /// Running once it was (a client that got the event and deletes at once is not
    /// refused). `report` runs only if the transition is legal.
    pub fn exited_then(&self, exit: Exit, report: impl FnOnce()) -> Result<(), StateError> {
        let mut i = self.lock();
        let to = i.state.to(TaskState::Stopped)?;
        report();
        i.state = to;
        i.exit = Some(exit);
        self.exited.notify_all();
        Ok(())
    }

    /// Blocks until the process has exited (up to `timeout` if given).
    pub fn wait(&self, timeout: Option<Duration>) -> Option<Exit> {
        let mut i = self.lock();
        let end = timeout.map(|t| std::time::Instant::now() + t);
        while i.exit.is_none() {
            i = match end {
                None => self.exited.wait(i).unwrap_or_else(|p| p.into_inner()),
                Some(end) => {
                    let left = end.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.exited.wait_timeout(i, left).unwrap_or_else(|p| p.into_inner()).0
                }
            };
        }
        i.exit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that deletes the moment it hears of the exit must find the process
    /// Stopped (Docker's `run --rm` does exactly that).
    #[test]
    fn the_exit_is_visible_once_it_is_reported() {
        let p = std::sync::Arc::new(Process::new("c", "", IoPaths::default()));
        p.started(1).expect("start");
        let (tx, rx) = std::sync::mpsc::channel();
        let p2 = p.clone();
        let deleter = std::thread::spawn(move || {
            rx.recv().expect("event");
            p2.set(TaskState::Deleted)
        });
        let exit = Exit { status: 0, at: std::time::SystemTime::now() };
        p.exited_then(exit, || {
            tx.send(()).expect("send");
            // Give the deleter every chance to act on the event before the state changes.
            std::thread::sleep(Duration::from_millis(50));
        })
        .expect("exit");
        assert!(deleter.join().expect("deleter").is_ok(), "Delete right after the exit event was refused");
        assert!(p.exited_then(exit, || panic!("a refused exit must not report")).is_err());
    }
    use TaskState::*;

    #[test]
    fn legal_transitions() {
        assert_eq!(Created.to(Running), Ok(Running));
        assert_eq!(Running.to(Paused), Ok(Paused));
        assert_eq!(Paused.to(Running), Ok(Running));
        for s in [Created, Running, Paused] {
            assert_eq!(s.to(Stopped), Ok(Stopped));
        }
        assert_eq!(Stopped.to(Deleted), Ok(Deleted));
        assert_eq!(Created.to(Deleted), Ok(Deleted));
    }

    #[test]
    fn illegal_transitions_name_both_states() {
        for (from, to) in [
            (Running, Running),
            (Stopped, Running),
            (Created, Paused),
            (Stopped, Paused),
            (Paused, Created),
            (Running, Deleted),
            (Paused, Deleted),
            (Stopped, Stopped),
            (Deleted, Running),
            (Deleted, Deleted),
            (Deleted, Stopped),
        ] {
            let e = from.to(to).expect_err("illegal");
            assert_eq!(e, StateError { from, to });
            assert!(e.to_string().contains(&format!("{from:?}")) && e.to_string().contains(&format!("{to:?}")));
        }
    }

    #[test]
    fn process_records_start_and_exit_and_wakes_waiters() {
        let p = std::sync::Arc::new(Process::new("c", "", IoPaths::default()));
        assert_eq!(p.wait(Some(Duration::from_millis(10))), None);
        p.started(7).expect("start");
        assert!(p.started(8).is_err(), "started twice");
        let w = {
            let p = p.clone();
            std::thread::spawn(move || p.wait(None))
        };
        let exit = Exit { status: 137, at: SystemTime::now() };
        p.exited(exit).expect("exit");
        assert_eq!(w.join().expect("waiter"), Some(exit));
        assert!(p.exited(exit).is_err(), "exited twice");
        assert_eq!(p.snapshot(), Snapshot { state: Stopped, guest_pid: Some(7), exit: Some(exit) });
        p.set(Deleted).expect("delete");
        assert!(p.check(Running).is_err());
    }
}
