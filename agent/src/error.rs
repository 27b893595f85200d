//! The agent's RPC error: every failure an API call can report, with the ttrpc code
//! the host sees. Messages name what was wrong; the code tells the host what to do.

use ttrpc::Code;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AgentError {
    /// A bad id, spec, signal or request field.
    #[error("{0}")]
    InvalidArgument(String),
    /// An unknown container or process, or an executable that does not exist.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// A call in the wrong state (start twice, exec in a stopped container).
    #[error("{0}")]
    FailedPrecondition(String),
    /// An executable that exists but cannot be executed.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, AgentError>;

impl AgentError {
    pub fn code(&self) -> Code {
        match self {
            AgentError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            AgentError::NotFound(_) => Code::NOT_FOUND,
            AgentError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            AgentError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            AgentError::PermissionDenied(_) => Code::PERMISSION_DENIED,
            AgentError::Internal(_) => Code::INTERNAL,
        }
    }

    /// An internal error from `what` failing with `err` (its whole source chain).
    pub fn internal(what: impl std::fmt::Display, err: impl std::error::Error) -> AgentError {
        let mut msg = format!("{what}: {err}");
        let mut src = err.source();
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        AgentError::Internal(msg)
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

impl From<moat_protocol::InvalidHeader> for AgentError {
    fn from(e: moat_protocol::InvalidHeader) -> AgentError {
        AgentError::InvalidArgument(e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_their_ttrpc_codes() {
        let cases = [
            (AgentError::InvalidArgument("bad".into()), Code::INVALID_ARGUMENT),
            (AgentError::NotFound("nf".into()), Code::NOT_FOUND),
            (AgentError::AlreadyExists("ae".into()), Code::ALREADY_EXISTS),
            (AgentError::FailedPrecondition("fp".into()), Code::FAILED_PRECONDITION),
            (AgentError::PermissionDenied("pd".into()), Code::PERMISSION_DENIED),
            (AgentError::Internal("in".into()), Code::INTERNAL),
        ];
        for (err, code) in cases {
            let msg = err.to_string();
            match ttrpc::Error::from(err) {
                ttrpc::Error::RpcStatus(s) => {
                    assert_eq!(s.code(), code);
                    assert_eq!(s.message(), msg);
                }
                other => panic!("not a status: {other:?}"),
            }
        }
    }

    #[test]
    fn internal_errors_carry_the_source_chain() {
        let io = std::io::Error::other("disk on fire");
        let e = AgentError::internal("cannot write /x", io);
        assert_eq!(e, AgentError::Internal("cannot write /x: disk on fire".into()));
    }

    #[test]
    fn bad_ids_are_invalid_arguments() {
        let e: AgentError = moat_protocol::validate_id("container id", "../x").expect_err("bad id").into();
        assert_eq!(e.code(), Code::INVALID_ARGUMENT);
    }
}
