//! `error.rs`: [`IdentityError`], the one error type of this crate.
//!
//! Every message names the input that was wrong ("CSR", "CA key",
//! "certificate", "join token", ...) and what was wrong with it, because
//! these errors end up in operators' terminals and in RPC statuses returned
//! to sidecars.

/// Everything that can go wrong reading, issuing or using identities.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A PEM input had no block of the expected kind, or a broken one.
    #[error("{what}: not valid PEM (expected a {label} block: {reason})")]
    Pem {
        /// The input: "CSR", "certificate", "CA key", ...
        what: &'static str,
        /// The PEM label that was looked for, e.g. "CERTIFICATE REQUEST".
        label: &'static str,
        /// What the PEM parser said.
        reason: String,
    },

    /// A PEM input held the wrong number of blocks.
    #[error("{what}: expected exactly one {label} block, found {found}")]
    PemCount {
        /// The input.
        what: &'static str,
        /// The PEM label.
        label: &'static str,
        /// How many blocks were found.
        found: usize,
    },

    /// The DER inside a PEM block (or given directly) is not the structure it should be.
    #[error("{what}: not a valid {structure}: {reason}")]
    Der {
        /// The input.
        what: &'static str,
        /// The ASN.1 structure expected, e.g. "X.509 certificate".
        structure: &'static str,
        /// What the parser said.
        reason: String,
    },

    /// A CSR's self-signature does not verify.
    #[error("CSR: self-signature does not verify (the CSR is corrupt or was not signed by the key it carries)")]
    CsrSignature,

    /// A public key whose algorithm the CA cannot put into a certificate.
    #[error("{what}: unsupported public key: {reason}")]
    UnsupportedKey {
        /// The input.
        what: &'static str,
        /// What is unsupported.
        reason: String,
    },

    /// A private key PEM that could not be loaded.
    #[error("{what}: not a usable private key: {reason}")]
    PrivateKey {
        /// The input.
        what: &'static str,
        /// Why.
        reason: String,
    },

    /// The CA private key is not the key of the CA certificate.
    #[error("CA key does not match the CA certificate (public keys differ)")]
    CaKeyMismatch,

    /// The CA certificate cannot serve as the cluster root.
    #[error("CA certificate: {0}")]
    NotACa(String),

    /// The CA certificate is no longer valid, so nothing it signs would be.
    #[error("CA certificate expired (not after {not_after_unix} s since the epoch); create or load a new CA")]
    CaExpired {
        /// The CA's notAfter in seconds since the Unix epoch.
        not_after_unix: i64,
    },

    /// A certificate carries no SPIFFE ID.
    #[error("certificate has no spiffe:// URI SAN")]
    NoSpiffeId,

    /// A certificate carries several SPIFFE IDs (the SPIFFE spec allows exactly one).
    #[error("certificate has {0} spiffe:// URI SANs; exactly one is allowed")]
    MultipleSpiffeIds(usize),

    /// A SPIFFE ID that does not have one of the accepted shapes.
    #[error("invalid SPIFFE ID {uri:?}: {reason}")]
    InvalidSpiffeId {
        /// The offending URI (cut to a readable length).
        uri: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A trust domain, node id, admin name, namespace or service name that is not allowed.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// "trust domain", "admin name", "namespace", "service name", "node id".
        what: &'static str,
        /// The offending value (cut to a readable length).
        value: String,
        /// What is wrong with it.
        reason: String,
    },

    /// An extra subject alternative name that is neither an IP literal nor a DNS name.
    #[error("SAN {0:?} is neither an IP address literal nor a valid DNS name")]
    InvalidSan(String),

    /// A requested validity period that cannot be used.
    #[error("validity: {0}")]
    Validity(String),

    /// A certificate's validity dates cannot be represented in Unix milliseconds.
    #[error("certificate: validity {0} is before 1970 or out of range")]
    CertTime(&'static str),

    /// The system clock is unusable (before 1970).
    #[error("system clock is before 1970")]
    Clock,

    /// A verified peer presented an empty chain (should not happen after a verified handshake).
    #[error("peer presented no certificate")]
    NoPeerCertificate,

    /// A verified peer is not the workload that was expected (e.g. a
    /// sidecar of another service answered at a destination's address).
    #[error("peer identity is {found}, expected {expected}")]
    UnexpectedPeer {
        /// The SPIFFE ID the caller asked for.
        expected: String,
        /// The SPIFFE ID the peer's certificate carries.
        found: String,
    },

    /// rcgen refused to build a key, CSR or certificate.
    #[error("{op}: {source}")]
    Rcgen {
        /// What was being done.
        op: &'static str,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },

    /// rustls refused a configuration item (certificate, key, protocol versions).
    #[error("{op}: {source}")]
    Tls {
        /// What was being done.
        op: &'static str,
        /// rustls's error.
        #[source]
        source: rustls::Error,
    },

    /// The client-certificate verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),

    /// A malformed join token.
    #[error("join token: {0}")]
    JoinToken(&'static str),
}

/// Cut `s` to at most [`MAX_ERROR_ECHO_CHARS`] characters for echoing in an error message.
pub(crate) fn echo(s: &str) -> String {
    if s.chars().count() <= MAX_ERROR_ECHO_CHARS {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(MAX_ERROR_ECHO_CHARS).collect();
        out.push('…');
        out
    }
}

/// How much of an offending input an error message repeats: enough to
/// recognise it, not so much that a hostile multi-kilobyte input floods logs.
pub const MAX_ERROR_ECHO_CHARS: usize = 120;
