//! Starting a container process without forking the multi-threaded agent: the agent
//! re-executes its own binary as `moat-agent __init` (std's spawn is fork-safe), hands
//! it the process's stdio descriptors (SCM_RIGHTS) and a JSON [`Launch`] on a Unix
//! socket, and the single-threaded helper (`child.rs`) does the rest. The helper
//! reports on the same socket, one JSON [`Report`] per line: the pid, `ready` when the
//! process is set up and waits for the start byte, an error, or execve's errno. The
//! socket is close-on-exec in the process, so EOF after the start byte means execve
//! succeeded.

use std::io::{BufRead, BufReader, IoSlice, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::error::{AgentError, Result};
use crate::mounts::RootfsPlan;
use crate::seccomp::Filter;
use crate::spec::Process;

/// The hidden first argument that makes the agent binary the helper.
pub const HELPER_ARG: &str = "__init";

/// How long a helper may take to set a process up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

/// Which namespaces the process gets.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Namespaces {
    /// A container's init: join these (kind, path), then unshare these kinds.
    Init { join: Vec<(String, String)>, new: Vec<String> },
    /// An exec: every namespace of the container's init process.
    Exec { init_pid: i32 },
}

/// What the helper is asked to do.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Launch {
    pub who: String,
    pub process: Process,
    /// The cgroup directory the process joins.
    pub cgroup: String,
    pub namespaces: Namespaces,
    /// The rootfs to build (init only).
    pub rootfs: Option<RootfsPlan>,
    pub seccomp: Option<Filter>,
}

/// One line from the helper.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Report {
    Pid(i32),
    Ready,
    Error(String),
    Exec { errno: i32, program: String },
}

/// The agent's handle on a helper that set a process up and waits to exec it.
pub struct Pending {
    pub pid: i32,
    /// A terminal process's pty master (the pty lives in the container's devpts).
    pub console: Option<OwnedFd>,
    sock: UnixStream,
    reader: BufReader<UnixStream>,
}

fn internal(what: &str, e: impl std::error::Error) -> AgentError {
    AgentError::internal(what, e)
}

/// The error StartProcess returns for execve's errno.
pub fn exec_error(errno: i32, program: &str) -> AgentError {
    match errno {
        libc::ENOENT => AgentError::NotFound(format!("executable file not found: {program}")),
        libc::EACCES | libc::ENOEXEC | libc::EPERM | libc::EISDIR | libc::ETXTBSY | libc::ENOTDIR => {
            AgentError::PermissionDenied(format!(
                "cannot execute {program}: {}",
                nix::errno::Errno::from_raw(errno).desc()
            ))
        }
        e => AgentError::Internal(format!("cannot execute {program}: {}", nix::errno::Errno::from_raw(e).desc())),
    }
}

/// Receives the pty master a terminal process's helper sends on `console`.
fn receive_console(console: &UnixStream) -> Result<OwnedFd> {
    console.set_read_timeout(Some(SETUP_TIMEOUT)).map_err(|e| internal("socket timeout", e))?;
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(console.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(|e| internal("cannot receive the pty from the process helper", e))?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for c in msg.cmsgs().map_err(|e| internal("cannot receive the pty from the process helper", e))? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            fds.extend(raw.into_iter().map(crate::sys::owned_fd));
        }
    }
    match <[OwnedFd; 1]>::try_from(fds) {
        Ok([master]) => Ok(master),
        Err(v) => Err(AgentError::Internal(format!("the process helper sent {} descriptors for the pty, not 1", v.len()))),
    }
}

/// Starts a helper for `launch` and waits until the process is set up (or failed).
/// A terminal process's pty is made by the helper inside the container and its
/// master comes back in [`Pending::console`].
pub fn prepare(launch: &Launch, fds: [OwnedFd; 3]) -> Result<Pending> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| internal("cannot create the helper socket", e))?;
    let console = if launch.process.terminal {
        Some(UnixStream::pair().map_err(|e| internal("cannot create the console socket", e))?)
    } else {
        None
    };
    let child = std::process::Command::new("/proc/self/exe")
        .arg0("moat-agent")
        .arg(HELPER_ARG)
        .env_clear()
        .stdin(std::process::Stdio::from(OwnedFd::from(theirs)))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .map_err(|e| internal("cannot start the process helper", e))?;
    // The reaper collects the helper; nobody waits for it here.
    drop(crate::reaper::watch(child.id() as i32));
    drop(child);
    let mut raw = vec![fds[0].as_raw_fd(), fds[1].as_raw_fd(), fds[2].as_raw_fd()];
    if let Some((_, theirs)) = &console {
        raw.push(theirs.as_raw_fd());
    }
    sendmsg::<()>(ours.as_raw_fd(), &[IoSlice::new(b"F")], &[ControlMessage::ScmRights(&raw)], MsgFlags::empty(), None)
        .map_err(|e| internal("cannot pass stdio to the helper", e))?;
    drop(fds);
    let console = console.map(|(ours, _theirs)| ours);
    let json = serde_json::to_vec(launch).map_err(|e| internal("cannot encode the launch", e))?;
    let mut w = &ours;
    w.write_all(&(json.len() as u32).to_le_bytes())
        .and_then(|_| w.write_all(&json))
        .map_err(|e| internal("cannot send the launch to the helper", e))?;
    ours.set_read_timeout(Some(SETUP_TIMEOUT)).map_err(|e| internal("socket timeout", e))?;
    let reader = BufReader::new(ours.try_clone().map_err(|e| internal("cannot clone the helper socket", e))?);
    let mut p = Pending { pid: 0, console: None, sock: ours, reader };
    let mut ready = false;
    while p.pid == 0 || !ready {
        match p.next()? {
            Some(Report::Pid(pid)) => p.pid = pid,
            Some(Report::Ready) => ready = true,
            Some(Report::Error(msg)) => {
                p.kill();
                return Err(AgentError::Internal(format!("{}: {msg}", launch.who)));
            }
            Some(Report::Exec { errno, program }) => return Err(exec_error(errno, &program)),
            None => {
                p.kill();
                return Err(AgentError::Internal(format!("{}: the process helper died during setup", launch.who)));
            }
        }
    }
    if let Some(c) = &console {
        // Sent before Ready, so it is waiting in the socket.
        match receive_console(c) {
            Ok(master) => p.console = Some(master),
            Err(e) => {
                p.kill();
                return Err(e);
            }
        }
    }
    Ok(p)
}

impl Pending {
    fn next(&mut self) -> Result<Option<Report>> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => serde_json::from_str(&line)
                .map(Some)
                .map_err(|e| AgentError::Internal(format!("bad report from the helper {line:?}: {e}"))),
            Err(e) => Err(internal("reading from the process helper", e)),
        }
    }

    /// Kills the helper (the process never runs).
    pub fn kill(&self) {
        if self.pid > 0 {
            let _ = crate::sys::kill(self.pid, libc::SIGKILL);
        }
    }

    /// Lets the process exec; returns once execve succeeded.
    pub fn start(mut self) -> Result<()> {
        (&self.sock).write_all(b"S").map_err(|e| internal("cannot start the process", e))?;
        match self.next()? {
            None => Ok(()),
            Some(Report::Exec { errno, program }) => Err(exec_error(errno, &program)),
            Some(Report::Error(msg)) => Err(AgentError::Internal(msg)),
            Some(other) => Err(AgentError::Internal(format!("unexpected report from the helper: {other:?}"))),
        }
    }

    /// Gives up on the process: the helper sees EOF instead of the start byte and
    /// exits without executing anything.
    pub fn abandon(self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_errors_map_to_codes() {
        assert_eq!(exec_error(libc::ENOENT, "nope"), AgentError::NotFound("executable file not found: nope".into()));
        assert!(matches!(exec_error(libc::EACCES, "/etc"), AgentError::PermissionDenied(m) if m.contains("/etc")));
        assert!(matches!(exec_error(libc::ENOEXEC, "x"), AgentError::PermissionDenied(_)));
        assert!(matches!(exec_error(libc::E2BIG, "x"), AgentError::Internal(_)));
    }

    #[test]
    fn reports_round_trip_as_json_lines() {
        for r in [Report::Pid(7), Report::Ready, Report::Error("x".into()), Report::Exec { errno: 2, program: "p".into() }] {
            let line = serde_json::to_string(&r).expect("encode");
            assert!(!line.contains('\n'));
            assert_eq!(serde_json::from_str::<Report>(&line).expect("decode"), r);
        }
    }
}
