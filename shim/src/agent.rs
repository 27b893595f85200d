//! The host's client of moat-agent's ttrpc API.
//!
//! Everything the agent answers is hostile input: sizes, numbers and messages are
//! checked or bounded before anyone uses them. Every call but WaitProcess has a
//! deadline, so a guest that stops answering cannot hang the host.

use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use moat_protocol as proto;
use moat_protocol::PROTOCOL_VERSION;
use ttrpc::Code;

/// Deadline of an ordinary call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of calls that build or tear down a container (mounts, cgroups).
pub const SLOW_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline of SignalProcess: a guest that does not take a signal soon is hung.
pub const SIGNAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest agent error message shown to a user.
const MAX_MESSAGE: usize = 512;
/// Longest version string accepted.
const MAX_VERSION_STRING: usize = 128;
/// Most pids a ListPids answer may hold (the guest's pid_max is far above any sane
/// container; this bounds what a hostile agent can make us allocate and forward).
pub const MAX_PIDS: usize = 1 << 16;

/// Why an agent call failed, by the agent's status code.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("wrong state: {0}")]
    FailedPrecondition(String),
    #[error("agent error: {0}")]
    Internal(String),
    #[error("the agent did not answer {call} within {secs} s")]
    Timeout { call: &'static str, secs: u64 },
    #[error("lost the connection to the agent ({0})")]
    Disconnected(String),
    #[error("the agent speaks protocol {agent}, this host {host}: install matching moat and guest image versions")]
    ProtocolMismatch { agent: u32, host: u32 },
    #[error("the agent sent an invalid answer to {call}: {what}")]
    BadAnswer { call: &'static str, what: String },
}

/// Makes a guest-chosen message safe to print on one line.
pub fn sanitize(msg: &str) -> String {
    let mut out: String = msg.chars().map(|c| if c.is_control() { ' ' } else { c }).take(MAX_MESSAGE).collect();
    if msg.chars().count() > MAX_MESSAGE {
        out.push_str("...");
    }
    out
}

fn map_err(call: &'static str, timeout: Option<Duration>, e: ttrpc::Error) -> AgentError {
    match e {
        ttrpc::Error::RpcStatus(s) => {
            let msg = sanitize(s.message());
            match s.code() {
                Code::NOT_FOUND => AgentError::NotFound(msg),
                Code::PERMISSION_DENIED => AgentError::PermissionDenied(msg),
                Code::INVALID_ARGUMENT => AgentError::InvalidArgument(msg),
                Code::ALREADY_EXISTS => AgentError::AlreadyExists(msg),
                Code::FAILED_PRECONDITION => AgentError::FailedPrecondition(msg),
                Code::DEADLINE_EXCEEDED => AgentError::Timeout { call, secs: timeout.map_or(0, |t| t.as_secs()) },
                Code::UNAVAILABLE => AgentError::Disconnected(msg),
                _ => AgentError::Internal(msg),
            }
        }
        ttrpc::Error::Others(m) if m.contains("timeout") => AgentError::Timeout { call, secs: timeout.map_or(0, |t| t.as_secs()) },
        other => AgentError::Disconnected(sanitize(&other.to_string())),
    }
}

fn ctx(t: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_duration(t)
}

/// A process in the guest: its container and exec id ("" for the init process).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessId {
    pub container: String,
    pub exec: String,
}

impl ProcessId {
    fn to_ref(&self) -> proto::ProcessRef {
        proto::ProcessRef { container_id: self.container.clone(), exec_id: self.exec.clone(), ..Default::default() }
    }
}

/// A connected agent.
#[derive(Clone)]
pub struct Agent {
    client: proto::AgentClient,
}

impl Agent {
    /// Wraps a stream already connected to the agent's API port.
    pub fn new(stream: UnixStream) -> Result<Agent, AgentError> {
        let client = ttrpc::Client::new(stream.into_raw_fd()).map_err(|e| AgentError::Disconnected(e.to_string()))?;
        Ok(Agent { client: proto::AgentClient::new(client) })
    }

    /// Checks the protocol number; returns (agent version, guest kernel release).
    pub fn version(&self) -> Result<(String, String), AgentError> {
        let req = proto::VersionRequest { host_protocol: PROTOCOL_VERSION, ..Default::default() };
        let v = self.client.version(ctx(CALL_TIMEOUT), &req).map_err(|e| map_err("Version", Some(CALL_TIMEOUT), e))?;
        check_version(&v)
    }

    pub fn create_container(&self, req: &proto::CreateContainerRequest) -> Result<(), AgentError> {
        self.client
            .create_container(ctx(SLOW_CALL_TIMEOUT), req)
            .map(drop)
            .map_err(|e| map_err("CreateContainer", Some(SLOW_CALL_TIMEOUT), e))
    }

    /// Starts a process; returns its guest pid.
    pub fn start_process(&self, p: &ProcessId) -> Result<u32, AgentError> {
        let r = self.client.start_process(ctx(SLOW_CALL_TIMEOUT), &p.to_ref()).map_err(|e| map_err("StartProcess", Some(SLOW_CALL_TIMEOUT), e))?;
        check_pid(r.pid)
    }

    /// Blocks until the process exits; returns its status (code, or 128 + signal).
    pub fn wait_process(&self, p: &ProcessId) -> Result<i32, AgentError> {
        let r = self.client.wait_process(ttrpc::context::with_timeout(0), &p.to_ref()).map_err(|e| map_err("WaitProcess", None, e))?;
        check_exit_status(r.exit_status)
    }

    pub fn signal_process(&self, p: &ProcessId, signal: i32, all: bool) -> Result<(), AgentError> {
        let signal = u32::try_from(signal).map_err(|_| AgentError::InvalidArgument(format!("signal {signal}")))?;
        let req = proto::SignalProcessRequest {
            container_id: p.container.clone(),
            exec_id: p.exec.clone(),
            signal,
            all,
            ..Default::default()
        };
        self.client.signal_process(ctx(SIGNAL_TIMEOUT), &req).map(drop).map_err(|e| map_err("SignalProcess", Some(SIGNAL_TIMEOUT), e))
    }

    pub fn resize_pty(&self, p: &ProcessId, width: u32, height: u32) -> Result<(), AgentError> {
        let req = proto::ResizePtyRequest {
            container_id: p.container.clone(),
            exec_id: p.exec.clone(),
            width,
            height,
            ..Default::default()
        };
        self.client.resize_pty(ctx(CALL_TIMEOUT), &req).map(drop).map_err(|e| map_err("ResizePty", Some(CALL_TIMEOUT), e))
    }

    pub fn close_stdin(&self, p: &ProcessId) -> Result<(), AgentError> {
        self.client.close_stdin(ctx(CALL_TIMEOUT), &p.to_ref()).map(drop).map_err(|e| map_err("CloseStdin", Some(CALL_TIMEOUT), e))
    }

    pub fn exec_process(&self, req: &proto::ExecProcessRequest) -> Result<(), AgentError> {
        self.client.exec_process(ctx(SLOW_CALL_TIMEOUT), req).map(drop).map_err(|e| map_err("ExecProcess", Some(SLOW_CALL_TIMEOUT), e))
    }

    pub fn stats(&self, container: &str) -> Result<proto::StatsResponse, AgentError> {
        let req = proto::ContainerRef { container_id: container.to_string(), ..Default::default() };
        self.client.stats(ctx(CALL_TIMEOUT), &req).map_err(|e| map_err("Stats", Some(CALL_TIMEOUT), e))
    }

    /// Guest pids of the container's processes (at most [`MAX_PIDS`]).
    pub fn list_pids(&self, container: &str) -> Result<Vec<u32>, AgentError> {
        let req = proto::ContainerRef { container_id: container.to_string(), ..Default::default() };
        let r = self.client.list_pids(ctx(CALL_TIMEOUT), &req).map_err(|e| map_err("ListPids", Some(CALL_TIMEOUT), e))?;
        if r.pids.len() > MAX_PIDS {
            return Err(AgentError::BadAnswer { call: "ListPids", what: format!("{} pids", r.pids.len()) });
        }
        r.pids.iter().map(|&p| check_pid(p).map_err(|_| AgentError::BadAnswer { call: "ListPids", what: format!("pid {p}") })).collect()
    }

    pub fn pause(&self, container: &str) -> Result<(), AgentError> {
        let req = proto::ContainerRef { container_id: container.to_string(), ..Default::default() };
        self.client.pause_container(ctx(CALL_TIMEOUT), &req).map(drop).map_err(|e| map_err("PauseContainer", Some(CALL_TIMEOUT), e))
    }

    pub fn resume(&self, container: &str) -> Result<(), AgentError> {
        let req = proto::ContainerRef { container_id: container.to_string(), ..Default::default() };
        self.client.resume_container(ctx(CALL_TIMEOUT), &req).map(drop).map_err(|e| map_err("ResumeContainer", Some(CALL_TIMEOUT), e))
    }

    /// Applies an OCI `linux.resources` object (JSON).
    pub fn update(&self, container: &str, resources: Vec<u8>) -> Result<(), AgentError> {
        let req = proto::UpdateContainerRequest { container_id: container.to_string(), resources, ..Default::default() };
        self.client.update_container(ctx(CALL_TIMEOUT), &req).map(drop).map_err(|e| map_err("UpdateContainer", Some(CALL_TIMEOUT), e))
    }

    pub fn remove_container(&self, container: &str) -> Result<(), AgentError> {
        let req = proto::ContainerRef { container_id: container.to_string(), ..Default::default() };
        self.client
            .remove_container(ctx(SLOW_CALL_TIMEOUT), &req)
            .map(drop)
            .map_err(|e| map_err("RemoveContainer", Some(SLOW_CALL_TIMEOUT), e))
    }

    /// Asks the guest to power off, waiting at most `timeout` for the answer.
    pub fn shutdown(&self, timeout: Duration) -> Result<(), AgentError> {
        self.client.shutdown(ctx(timeout), &proto::Empty::default()).map(drop).map_err(|e| map_err("Shutdown", Some(timeout), e))
    }
}

fn check_version(v: &proto::VersionResponse) -> Result<(String, String), AgentError> {
    if v.protocol != PROTOCOL_VERSION {
        return Err(AgentError::ProtocolMismatch { agent: v.protocol, host: PROTOCOL_VERSION });
    }
    for (what, s) in [("agent_version", &v.agent_version), ("kernel_release", &v.kernel_release)] {
        if s.len() > MAX_VERSION_STRING || s.chars().any(char::is_control) {
            return Err(AgentError::BadAnswer { call: "Version", what: format!("{what} is not a short printable string") });
        }
    }
    Ok((v.agent_version.clone(), v.kernel_release.clone()))
}

fn check_pid(pid: u32) -> Result<u32, AgentError> {
    // Linux pids are 1..=2^22.
    if pid == 0 || pid > (1 << 22) {
        return Err(AgentError::BadAnswer { call: "StartProcess", what: format!("pid {pid}") });
    }
    Ok(pid)
}

fn check_exit_status(status: i32) -> Result<i32, AgentError> {
    if !(0..=255).contains(&status) {
        return Err(AgentError::BadAnswer { call: "WaitProcess", what: format!("exit status {status}") });
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: Code, msg: &str) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.to_string()))
    }

    #[test]
    fn status_codes_map_to_errors() {
        let m = |e| map_err("StartProcess", Some(CALL_TIMEOUT), e);
        assert_eq!(m(status(Code::NOT_FOUND, "no-such-command: not found")), AgentError::NotFound("no-such-command: not found".into()));
        assert_eq!(m(status(Code::PERMISSION_DENIED, "x")), AgentError::PermissionDenied("x".into()));
        assert_eq!(m(status(Code::INVALID_ARGUMENT, "x")), AgentError::InvalidArgument("x".into()));
        assert_eq!(m(status(Code::ALREADY_EXISTS, "x")), AgentError::AlreadyExists("x".into()));
        assert_eq!(m(status(Code::FAILED_PRECONDITION, "x")), AgentError::FailedPrecondition("x".into()));
        assert_eq!(m(status(Code::INTERNAL, "x")), AgentError::Internal("x".into()));
        assert_eq!(m(status(Code::UNKNOWN, "x")), AgentError::Internal("x".into()));
        assert!(matches!(m(ttrpc::Error::Socket("reset".into())), AgentError::Disconnected(_)));
        assert!(matches!(
            m(ttrpc::Error::Others("Receive packet from Receiver timeout: x".into())),
            AgentError::Timeout { call: "StartProcess", secs: 30 }
        ));
    }

    #[test]
    fn hostile_messages_are_bounded_and_printable() {
        let e = map_err("x", None, status(Code::INTERNAL, &format!("a\nb\x1b[2J{}", "z".repeat(10_000))));
        let AgentError::Internal(msg) = e else { panic!("wrong variant") };
        assert!(msg.len() <= MAX_MESSAGE + 3 && !msg.contains('\n') && !msg.contains('\x1b'), "{msg:?}");
    }

    /// A fake agent on the other end of a socket pair: it reads one request frame and
    /// answers with `reply` (raw bytes: a ttrpc frame header and payload, or garbage).
    fn fake_agent(reply: Vec<u8>) -> Agent {
        use std::io::{Read, Write};
        let (ours, mut theirs) = UnixStream::pair().expect("socket pair");
        std::thread::spawn(move || {
            let mut header = [0u8; 10];
            if theirs.read_exact(&mut header).is_err() {
                return;
            }
            let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
            let mut body = vec![0u8; len];
            let _ = theirs.read_exact(&mut body);
            // Answer on the request's stream id, then hang up.
            let mut out = reply;
            if out.len() >= 10 {
                out[4..8].copy_from_slice(&header[4..8]);
            }
            let _ = theirs.write_all(&out);
        });
        Agent::new(ours).expect("client")
    }

    fn frame(len: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = len.to_be_bytes().to_vec();
        f.extend_from_slice(&[0, 0, 0, 0, 2, 0]); // stream id (filled in), response, no flags
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn a_hostile_agent_gets_an_error_not_a_hang_or_a_panic() {
        let started = std::time::Instant::now();
        // A frame that claims to be 256 MiB long.
        let e = fake_agent(frame(256 << 20, b"xx")).version().expect_err("oversized frame");
        eprintln!("{e}");
        // A well-framed response whose payload is not protobuf.
        let garbage = [0xffu8; 16];
        let e = fake_agent(frame(garbage.len() as u32, &garbage)).version().expect_err("garbage payload");
        eprintln!("{e}");
        // Not even a whole header, then EOF.
        let e = fake_agent(vec![0, 0, 1]).version().expect_err("short read");
        eprintln!("{e}");
        eprintln!("three hostile agents refused in {:?}", started.elapsed());
    }

    #[test]
    fn answers_are_validated() {
        let v = |protocol, agent: &str| proto::VersionResponse { protocol, agent_version: agent.into(), kernel_release: "6.1".into(), ..Default::default() };
        assert_eq!(check_version(&v(PROTOCOL_VERSION, "0.1")).expect("ok"), ("0.1".to_string(), "6.1".to_string()));
        let e = check_version(&v(1, "0.1")).expect_err("mismatch");
        assert!(e.to_string().contains("protocol 1"), "{e}");
        assert!(check_version(&v(PROTOCOL_VERSION, &"x".repeat(1000))).is_err());
        assert!(check_version(&v(PROTOCOL_VERSION, "a\nb")).is_err());
        assert!(check_pid(0).is_err() && check_pid(u32::MAX).is_err() && check_pid(1).is_ok());
        assert!(check_exit_status(-1).is_err() && check_exit_status(256).is_err());
        assert_eq!(check_exit_status(137).expect("signal"), 137);
    }
}
