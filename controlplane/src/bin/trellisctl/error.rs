//! trellisctl's error type and the exit codes of `docs/CONTRACTS.md`,
//! including the mapping from gRPC status codes to exit codes.

use std::fmt;

use tonic::Code;

/// Process exit codes (the table in `docs/CONTRACTS.md`).
pub mod exit {
    /// Other error (INTERNAL, UNKNOWN, ...).
    pub const OTHER: u8 = 1;
    /// Usage error or invalid argument (clap, INVALID_ARGUMENT, OUT_OF_RANGE).
    pub const USAGE: u8 = 2;
    /// Key or member not found (NOT_FOUND).
    pub const NOT_FOUND: u8 = 3;
    /// Compare-and-set conflict (FAILED_PRECONDITION, ALREADY_EXISTS, ABORTED).
    pub const CONFLICT: u8 = 4;
    /// No endpoint answered, no leader/quorum, deadline, transport errors.
    pub const UNAVAILABLE: u8 = 5;
    /// `cluster status` or `proxy-status` reached some but not all members.
    pub const DEGRADED: u8 = 6;
    /// Not authorized: UNAUTHENTICATED, PERMISSION_DENIED, or a TLS
    /// handshake that failed on a certificate (ours or the server's).
    pub const NOT_AUTHORIZED: u8 = 7;
}

/// The exit code for a gRPC status code (`Code::Ok` gives 0).
pub fn exit_code(code: Code) -> u8 {
    match code {
        Code::Ok => 0,
        Code::InvalidArgument | Code::OutOfRange => exit::USAGE,
        Code::NotFound => exit::NOT_FOUND,
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => exit::CONFLICT,
        Code::Unavailable | Code::DeadlineExceeded => exit::UNAVAILABLE,
        Code::Unauthenticated | Code::PermissionDenied => exit::NOT_AUTHORIZED,
        _ => exit::OTHER,
    }
}

/// A failed command: the exit code and the line printed to stderr (after
/// `trellisctl: `), or no line at all (e.g. stdout was closed by a pipe).
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: Option<String>,
}

impl CliError {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: Some(message.into()),
        }
    }

    /// Exit with `code` without printing anything.
    pub fn silent(code: u8) -> Self {
        Self {
            code,
            message: None,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.message {
            Some(m) => write!(f, "{m} (exit {})", self.code),
            None => write!(f, "exit {}", self.code),
        }
    }
}

impl std::error::Error for CliError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_map_to_contract_exit_codes() {
        let cases = [
            (Code::Ok, 0),
            (Code::Internal, 1),
            (Code::Unknown, 1),
            (Code::Cancelled, 1),
            (Code::Unimplemented, 1),
            (Code::InvalidArgument, 2),
            (Code::OutOfRange, 2),
            (Code::NotFound, 3),
            (Code::FailedPrecondition, 4),
            (Code::AlreadyExists, 4),
            (Code::Aborted, 4),
            (Code::Unavailable, 5),
            (Code::DeadlineExceeded, 5),
            (Code::Unauthenticated, 7),
            (Code::PermissionDenied, 7),
        ];
        for (code, want) in cases {
            assert_eq!(exit_code(code), want, "{code:?}");
        }
    }
}
