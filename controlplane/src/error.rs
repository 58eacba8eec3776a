//! API errors: typed where they arise, turned into gRPC statuses in exactly
//! one place ([`From<ApiError> for tonic::Status`]).
//!
//! Each error knows whether the client may safely retry it
//! ([`ApiError::retry_safe`]); the status carries that as the
//! `x-trellis-retry-safe` metadata, and conflicts carry the key's current
//! revision as `x-trellis-current-revision`.

use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};
use trellis_raft_store::{NodeAddr, NodeId};

/// Largest key accepted (bytes).
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest value accepted (bytes).
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; `field` is the protobuf field path.
    #[error("invalid argument: {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("key not found: {key}")]
    NotFound { key: String },
    #[error("member {id} not found")]
    MemberNotFound { id: u64 },
    /// The lease does not exist (never granted, revoked or expired).
    #[error("lease {id} not found (expired or revoked?)")]
    LeaseNotFound { id: u64 },
    /// A resource (`Kind namespace/name`) does not exist.
    #[error("{what} not found")]
    ResourceNotFound { what: String },
    /// Mesh documents failed validation: one line per problem.
    #[error("{}", .0.join("\n"))]
    InvalidDocuments(Vec<String>),
    /// A compare-and-set / compare did not hold.
    #[error("compare failed for key {key}: its current mod_revision is {current}")]
    Conflict { key: String, current: u64 },
    /// A watch asked for history that is gone.
    #[error("revision {requested} is compacted: history starts after revision {compact_revision}")]
    Compacted {
        requested: u64,
        compact_revision: u64,
    },
    /// A revision outside what the store has (future, or compacted).
    #[error("{0}")]
    OutOfRange(String),
    /// The operation does not apply in the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// No leader could be found in time; nothing was proposed.
    #[error("no leader available ({0}); retry later")]
    NoLeader(String),
    /// The proposal was made but not confirmed in time: it may still
    /// commit, so a blind retry of a non-idempotent write is not safe.
    #[error("{what} not confirmed within {after:?} (no quorum?); it may still take effect")]
    Timeout { what: &'static str, after: Duration },
    /// The outcome of a proposal is unknown (leadership changed while it
    /// was in flight): not safe to resend blindly.
    #[error("{0}")]
    Uncertain(String),
    /// Forwarding to the leader failed in transport. If the request was
    /// never `sent` it is safe to resend.
    #[error("cannot reach the leader (node {leader}): {detail}")]
    LeaderUnreachable {
        leader: u64,
        detail: String,
        sent: bool,
    },
    /// A forwarded request failed at the leader: passed through as is.
    #[error("{0}")]
    Remote(Status),
    /// No credentials, or credentials that do not hold (an unknown,
    /// expired or garbage join token; a connection without a certificate).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// A valid identity asking for something outside its scope.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A bug or storage failure, with where it came from.
    #[error("internal error in {origin}: {message}")]
    Internal {
        origin: &'static str,
        message: String,
    },
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ApiError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn internal(origin: &'static str, err: impl std::fmt::Display) -> Self {
        ApiError::Internal {
            origin,
            message: err.to_string(),
        }
    }

    /// May the client send the same request again without risk of applying
    /// it twice?
    pub fn retry_safe(&self) -> bool {
        match self {
            ApiError::NoLeader(_) => true,
            ApiError::LeaderUnreachable { sent, .. } => !sent,
            ApiError::Remote(s) => s
                .metadata()
                .get("x-trellis-retry-safe")
                .is_some_and(|v| v.as_bytes() == b"true"),
            _ => false,
        }
    }

    fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument { .. } => Code::InvalidArgument,
            ApiError::NotFound { .. }
            | ApiError::MemberNotFound { .. }
            | ApiError::LeaseNotFound { .. }
            | ApiError::ResourceNotFound { .. } => Code::NotFound,
            ApiError::InvalidDocuments(_) => Code::InvalidArgument,
            ApiError::Conflict { .. } => Code::FailedPrecondition,
            ApiError::Compacted { .. } | ApiError::OutOfRange(_) => Code::OutOfRange,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::NoLeader(_) | ApiError::LeaderUnreachable { .. } | ApiError::Uncertain(_) => {
                Code::Unavailable
            }
            ApiError::Timeout { .. } => Code::Unavailable,
            ApiError::Remote(s) => s.code(),
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::Internal { .. } => Code::Internal,
        }
    }

    /// The error as sent on a sidecar's QUIC stream (the sidecar protocol's
    /// one conversion point, as [`Status`] is the admin API's).
    pub fn to_sidecar(&self) -> trellis_proto::sidecar::Error {
        use trellis_proto::sidecar::error::Code as S;
        let code = match self.code() {
            Code::InvalidArgument | Code::OutOfRange => S::InvalidArgument,
            Code::NotFound => S::NotFound,
            Code::FailedPrecondition => S::FailedPrecondition,
            Code::Unavailable => S::Unavailable,
            Code::Unauthenticated => S::Unauthenticated,
            Code::PermissionDenied => S::PermissionDenied,
            Code::Internal => S::Internal,
            _ => S::Unknown,
        };
        trellis_proto::sidecar::Error {
            code: code as i32,
            message: self.to_string(),
            retryable: self.retry_safe() || code == S::Unavailable,
        }
    }
}

impl From<RaftError<NodeId, ClientWriteError<NodeId, NodeAddr>>> for ApiError {
    /// A proposal (write or membership change) openraft refused. A
    /// `ForwardToLeader` means nothing was proposed: safe to retry.
    fn from(e: RaftError<NodeId, ClientWriteError<NodeId, NodeAddr>>) -> Self {
        match e {
            // Not retry-safe: openraft also answers this when the entry was
            // appended here and then truncated by a new leader, and another
            // node may still commit it.
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ApiError::Uncertain(format!(
                "leadership moved to {:?} while the request was in progress; it may or may not take effect",
                f.leader_id
            )),
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                ApiError::FailedPrecondition(e.to_string())
            }
            RaftError::Fatal(e) => ApiError::internal("raft", e),
        }
    }
}

impl From<RaftError<NodeId, CheckIsLeaderError<NodeId, NodeAddr>>> for ApiError {
    /// A read-index round that could not confirm leadership.
    fn from(e: RaftError<NodeId, CheckIsLeaderError<NodeId, NodeAddr>>) -> Self {
        match e {
            RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => ApiError::NoLeader(
                format!("leadership moved to {:?} during the read", f.leader_id),
            ),
            RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e)) => {
                ApiError::NoLeader(e.to_string())
            }
            RaftError::Fatal(e) => ApiError::internal("raft", e),
        }
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Status {
        if let ApiError::Remote(status) = err {
            return status;
        }
        let mut status = Status::new(err.code(), err.to_string());
        let md = status.metadata_mut();
        md.insert(
            "x-trellis-retry-safe",
            MetadataValue::from_static(if err.retry_safe() { "true" } else { "false" }),
        );
        if let ApiError::Conflict { current, .. } = &err {
            if let Ok(v) = MetadataValue::try_from(current.to_string()) {
                md.insert("x-trellis-current-revision", v);
            }
        }
        if let ApiError::Internal { .. } = &err {
            tracing::error!(error = %err, "internal error");
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_metadata() {
        let s: Status = ApiError::Conflict {
            key: "/a".into(),
            current: 7,
        }
        .into();
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.message().contains("current mod_revision is 7"));
        assert_eq!(
            s.metadata()
                .get("x-trellis-current-revision")
                .map(|v| v.as_bytes()),
            Some(&b"7"[..])
        );
        let s: Status = ApiError::NoLeader("election in progress".into()).into();
        assert_eq!(s.code(), Code::Unavailable);
        assert!(ApiError::Remote(s).retry_safe());
        let s: Status = ApiError::Timeout {
            what: "put",
            after: Duration::from_secs(5),
        }
        .into();
        assert_eq!(s.code(), Code::Unavailable);
        assert!(!ApiError::Remote(s).retry_safe());
    }
}
