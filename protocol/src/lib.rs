//! moat's host <-> agent protocol: the `Agent` ttrpc service (proto/agent.proto),
//! served by moat-agent on a vsock port and called by the host through the VMM's
//! hybrid vsock socket.
#![forbid(unsafe_code)]

use std::fmt;

/// The protocol number both sides must agree on; bump it on any incompatible change.
/// 3: every process has a stdio secret (`Stdio.secret`), which each of its stdio
/// streams presents in its header line.
pub const PROTOCOL_VERSION: u32 = 3;
/// The guest vsock port the agent serves the API on.
pub const AGENT_API_PORT: u32 = 1024;
/// The guest vsock port stdio streams connect to. The host opens one connection per
/// stream and first sends one header line,
/// `<container_id> <exec_id|-> <stream> <secret as hex>\n` ([`StdioHeader`]); after
/// it the connection carries only the stream's bytes. The agent closes a connection
/// whose header is malformed, names no such stream, or carries another secret than
/// the one the process was created with.
pub const STDIO_PORT: u32 = 1025;
/// The guest vsock port the agent's own log is served on: the host connects and reads
/// lines; lines logged before anyone connected are kept up to a bounded amount.
pub const AGENT_LOG_PORT: u32 = 1026;
/// The longest stdio header line the agent reads, newline included.
pub const MAX_STDIO_HEADER: usize = 512;
/// The longest container or exec id.
pub const MAX_ID_LEN: usize = 128;
/// The length of a process's stdio secret, in bytes.
pub const STDIO_SECRET_LEN: usize = 32;
/// The only peer the agent serves on any port: the host (VMADDR_CID_HOST).
pub const HOST_CID: u32 = 2;

/// A process's stdio secret: random bytes the host makes for each process and sends
/// in its CreateContainer or ExecProcess request (`Stdio.secret`), and which each of
/// the process's stdio streams presents in its header. Only the agent and the host
/// know it: the agent never passes it into the container. Comparisons take constant
/// time, and Debug does not print it.
#[derive(Clone)]
pub struct StdioSecret([u8; STDIO_SECRET_LEN]);

impl StdioSecret {
    /// A secret from exactly [`STDIO_SECRET_LEN`] bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<StdioSecret, InvalidHeader> {
        let b: [u8; STDIO_SECRET_LEN] = bytes.try_into().map_err(|_| {
            InvalidHeader(format!("a stdio secret must be {STDIO_SECRET_LEN} bytes, not {}", bytes.len()))
        })?;
        Ok(StdioSecret(b))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    fn from_hex(text: &str) -> Result<StdioSecret, InvalidHeader> {
        let mut b = [0u8; STDIO_SECRET_LEN];
        hex::decode_to_slice(text, &mut b)
            .map_err(|_| InvalidHeader(format!("stdio header: the secret must be {} hex digits", 2 * STDIO_SECRET_LEN)))?;
        Ok(StdioSecret(b))
    }
}

impl PartialEq for StdioSecret {
    /// Constant time: how long a comparison takes says nothing of where it differs.
    fn eq(&self, other: &StdioSecret) -> bool {
        use subtle::ConstantTimeEq;
        bool::from(self.0.ct_eq(&other.0))
    }
}

impl Eq for StdioSecret {}

impl fmt::Debug for StdioSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StdioSecret(..)")
    }
}

/// One of a process's stdio streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    Stdin,
    Stdout,
    Stderr,
}

impl StreamKind {
    fn as_str(self) -> &'static str {
        match self {
            StreamKind::Stdin => "stdin",
            StreamKind::Stdout => "stdout",
            StreamKind::Stderr => "stderr",
        }
    }
}

/// The first line of a stdio connection: which process and which stream it carries,
/// and the process's secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StdioHeader {
    pub container_id: String,
    /// "" for the container's init process (written `-` on the wire).
    pub exec_id: String,
    pub stream: StreamKind,
    pub secret: StdioSecret,
}

/// Why an id or a stdio header was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct InvalidHeader(pub String);

impl fmt::Display for InvalidHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidHeader {}

/// Checks a container or exec id: 1..=128 of `[A-Za-z0-9_.-]`, starting alphanumeric.
/// Ids become paths (cgroups, state dirs), so nothing else is allowed.
pub fn validate_id(what: &str, id: &str) -> Result<(), InvalidHeader> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(InvalidHeader(format!(
            "invalid {what} {id:?}: want 1 to {MAX_ID_LEN} of [A-Za-z0-9_.-], starting with a letter or digit"
        )))
    }
}

impl StdioHeader {
    /// The header line, newline included.
    pub fn to_line(&self) -> String {
        let exec = if self.exec_id.is_empty() { "-" } else { &self.exec_id };
        format!("{} {} {} {}\n", self.container_id, exec, self.stream.as_str(), self.secret.to_hex())
    }

    /// Parses a header line (with or without its newline).
    pub fn parse(line: &str) -> Result<StdioHeader, InvalidHeader> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        let fields: Vec<&str> = line.split(' ').collect();
        let [container_id, exec_id, stream, secret] = fields[..] else {
            // The line may hold a secret: name the fields, never echo it.
            return Err(InvalidHeader(format!(
                "stdio header has {} fields: want `<container> <exec|-> <stream> <secret>`",
                fields.len()
            )));
        };
        validate_id("container id", container_id)?;
        let exec_id = if exec_id == "-" {
            ""
        } else {
            validate_id("exec id", exec_id)?;
            exec_id
        };
        let stream = match stream {
            "stdin" => StreamKind::Stdin,
            "stdout" => StreamKind::Stdout,
            "stderr" => StreamKind::Stderr,
            other => return Err(InvalidHeader(format!("stdio header names unknown stream {other:?}"))),
        };
        let secret = StdioSecret::from_hex(secret)?;
        Ok(StdioHeader { container_id: container_id.to_string(), exec_id: exec_id.to_string(), stream, secret })
    }
}

#[allow(warnings, clippy::all, clippy::unwrap_used, clippy::undocumented_unsafe_blocks)]
// Generated code: its style is protobuf-codegen's, not ours.
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

#[allow(warnings, clippy::all, clippy::unwrap_used, clippy::undocumented_unsafe_blocks)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

pub use agent::*;
pub use agent_ttrpc::{create_agent, Agent, AgentClient};

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::Message;

    #[test]
    fn version_round_trips_on_the_wire() {
        let v = VersionResponse {
            protocol: PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            kernel_release: "6.1.192".into(),
            ..Default::default()
        };
        let bytes = v.write_to_bytes().expect("encode");
        let back = VersionResponse::parse_from_bytes(&bytes).expect("decode");
        assert_eq!(back, v);
    }

    fn secret(b: u8) -> StdioSecret {
        StdioSecret::from_bytes(&[b; STDIO_SECRET_LEN]).expect("32 bytes")
    }

    #[test]
    fn stdio_headers_round_trip() {
        for (exec, stream) in [("", StreamKind::Stdin), ("e1", StreamKind::Stdout), ("x.y-z_2", StreamKind::Stderr)] {
            let h = StdioHeader { container_id: "c0".into(), exec_id: exec.into(), stream, secret: secret(0xa5) };
            assert!(h.to_line().ends_with(&format!(" {}\n", "a5".repeat(STDIO_SECRET_LEN))), "{:?}", h.to_line());
            assert_eq!(StdioHeader::parse(&h.to_line()), Ok(h));
        }
        let line = format!("c0 - stdout {}", "00".repeat(STDIO_SECRET_LEN));
        assert_eq!(StdioHeader::parse(&line).map(|h| h.exec_id), Ok(String::new()));
    }

    #[test]
    fn bad_stdio_headers_and_ids_are_refused() {
        let s = "00".repeat(STDIO_SECRET_LEN);
        let bad = [
            String::new(),
            "c0".into(),
            // Protocol 2's header, without a secret.
            "c0 - stdout".into(),
            format!("c0 - stdout {s} extra"),
            format!("c0 - tty {s}"),
            format!("../x - stdin {s}"),
            format!("c0 ../e stdin {s}"),
            format!("-c - stdin {s}"),
            format!("c0  stdin {s}"),
            // A secret of the wrong length or not hex.
            format!("c0 - stdin {}", "00".repeat(STDIO_SECRET_LEN - 1)),
            format!("c0 - stdin {s}00"),
            format!("c0 - stdin {}", "zz".repeat(STDIO_SECRET_LEN)),
        ];
        for bad in &bad {
            assert!(StdioHeader::parse(bad).is_err(), "{bad:?} accepted");
        }
        let e = StdioHeader::parse(&format!("c0 - stdin {}", "ab".repeat(STDIO_SECRET_LEN - 1))).expect_err("short");
        assert!(!e.0.contains("abab"), "an error must not echo the secret: {e}");
        assert!(validate_id("id", &"a".repeat(MAX_ID_LEN)).is_ok());
        assert!(validate_id("id", &"a".repeat(MAX_ID_LEN + 1)).is_err());
        assert!(validate_id("id", "a/b").is_err());
        let e = validate_id("container id", "a b").expect_err("space");
        assert!(e.0.contains("container id"), "{e}");
    }

    #[test]
    fn secrets_compare_by_value_and_stay_out_of_debug() {
        assert_eq!(secret(1), secret(1));
        assert_ne!(secret(1), secret(2));
        let mut b = [7u8; STDIO_SECRET_LEN];
        b[STDIO_SECRET_LEN - 1] = 8;
        assert_ne!(secret(7), StdioSecret::from_bytes(&b).expect("32 bytes"));
        assert!(StdioSecret::from_bytes(&[0; 31]).is_err());
        assert!(StdioSecret::from_bytes(&[]).is_err());
        assert_eq!(format!("{:?}", secret(0xab)), "StdioSecret(..)");
    }

    #[test]
    fn garbage_is_a_decode_error_not_a_panic() {
        assert!(VersionResponse::parse_from_bytes(&[0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
    }
}
