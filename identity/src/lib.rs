//! Identity for every Trellis hop: the cluster CA, SPIFFE identities,
//! certificates, join tokens, and the rustls configurations that enforce
//! mutual TLS.
//!
//! # Identities
//!
//! Every certificate the cluster CA issues carries exactly one SPIFFE URI
//! SAN, which is the peer's [`Identity`]:
//!
//! | identity | URI | used by |
//! |---|---|---|
//! | [`Identity::Node`] | `spiffe://<td>/node/<id>` | `trellisd` (server + client: Raft peers, forwarding) |
//! | [`Identity::Admin`] | `spiffe://<td>/admin/<name>` | `trellisctl` and operators' tools |
//! | [`Identity::Workload`] | `spiffe://<td>/ns/<namespace>/svc/<service>` | sidecars, issued on join |
//!
//! The root CA certificate carries `spiffe://<td>` (the trust domain) as its
//! own URI SAN, so the trust domain travels with the CA file.
//!
//! # Where data enters and leaves
//!
//! * [`Ca::create`] makes a root (`trellisctl ca create`);
//!   [`Ca::issue_node`] / [`Ca::issue_admin`] make certificates and keys
//!   for nodes and operators (`trellisctl cert create`); [`Ca::from_pem`]
//!   loads a root from its files.
//! * A sidecar calls [`generate_csr`] and sends the CSR with a [`JoinToken`];
//!   a control node answers with [`Ca::sign_csr`], which takes *only the
//!   public key* from the CSR: the identity comes from the token's scope.
//! * [`server_config`] / [`client_config`] build rustls configs from PEM;
//!   [`peer_cert_info`] reads the identity of a verified peer chain and
//!   [`cert_info`] that of a PEM certificate.
//! * [`write_file_atomic`] stores certificates, keys and tokens.
//!
//! Nothing here panics on input: PEM, CSRs, certificates and tokens all come
//! from files or the network and fail with an [`IdentityError`] that says
//! what was wrong.
//!
//! # Crypto provider
//!
//! Only *ring* is used, and it is passed explicitly to every rustls builder
//! ([`crypto_provider`]); no process-default provider is needed or
//! installed. All configs are TLS 1.3 only ([`TLS_VERSIONS`]).
//!
//! # Files
//!
//! | file | contents |
//! |---|---|
//! | `lib.rs` | this overview and the re-exports |
//! | `error.rs` | [`IdentityError`] |
//! | `spiffe.rs` | [`Identity`], SPIFFE ID formatting and strict parsing, name rules |
//! | `ca.rs` | [`Ca`], certificate issuance, [`generate_csr`], validity constants |
//! | `cert.rs` | [`CertInfo`], [`Issued`], [`cert_info`], [`peer_cert_info`] |
//! | `tls.rs` | [`server_config`], [`client_config`], [`workload_client_config`] + [`SpiffeServerVerifier`] (sidecar↔sidecar: verify by SPIFFE ID, not server name), [`ClientAuth`], [`ALPN_SIDECAR`] |
//! | `token.rs` | [`JoinToken`] |
//! | `fs.rs` | [`write_file_atomic`] |

#![warn(missing_docs)]

mod ca;
mod cert;
mod error;
mod fs;
mod spiffe;
mod tls;
mod token;

pub use ca::{
    generate_csr, Ca, ADMIN_CERT_VALIDITY, CA_COMMON_NAME, CA_PATH_LEN, CA_VALIDITY,
    CLOCK_SKEW_BACKDATE, NODE_CERT_VALIDITY, SERIAL_LEN, WORKLOAD_CERT_VALIDITY,
};
pub use cert::{cert_info, peer_cert_info, CertInfo, Issued};
pub use error::{IdentityError, MAX_ERROR_ECHO_CHARS};
pub use fs::{write_file_atomic, PRIVATE_FILE_MODE, PUBLIC_FILE_MODE};
pub use spiffe::{
    check_trust_domain, Identity, DEFAULT_TRUST_DOMAIN, MAX_NAME_LEN, MAX_SPIFFE_ID_LEN,
    SPIFFE_SCHEME,
};
pub use tls::{
    client_config, crypto_provider, root_store, server_config, workload_client_config, ClientAuth,
    SpiffeServerVerifier, ALPN_SIDECAR, TLS_VERSIONS,
};
pub use token::{JoinToken, JOIN_TOKEN_ID_HEX_LEN, JOIN_TOKEN_PREFIX, JOIN_TOKEN_SECRET_HEX_LEN};
