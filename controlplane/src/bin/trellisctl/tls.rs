//! TLS for the admin connections (etcdctl's flags): `--ca-file` turns TLS
//! on (`https://`, the server's certificate verified against that CA, by
//! the endpoint's host name or IP address); `--cert-file` + `--key-file`
//! add the client certificate that a cluster with mutual TLS requires.
//! Without `--ca-file` trellisctl speaks plaintext (clusters started with
//! `trellisd --insecure-dev`).
//!
//! A mismatch (TLS against a plaintext server or the other way round) and a
//! rejected certificate surface from tonic as vague transport errors, so
//! after such a failure [`diagnose`] looks closer: rustls' own words when
//! there are some, else a probe of the address ([`probe`]) that sends the
//! HTTP/2 client preface and looks at the first bytes of the answer (a TLS
//! record, or an HTTP/2 SETTINGS frame).

use std::error::Error as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Uri};
use tonic::Code;

use crate::client::Failure;
use crate::error::{exit, CliError};

/// The PEM contents of the TLS flags, read once at start-up.
#[derive(Clone)]
pub struct TlsFiles {
    /// The cluster CA (`--ca-file`).
    pub ca_pem: String,
    /// The client certificate and key (`--cert-file`, `--key-file`).
    pub identity: Option<(String, String)>,
}

/// The TLS flags as given (paths; nothing read yet).
#[derive(Debug, Default, Clone)]
pub struct TlsFlags {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl TlsFlags {
    /// Usage errors in the combination of flags (no file is read).
    pub fn check(&self) -> Result<(), CliError> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => {
                return Err(CliError::new(
                    exit::USAGE,
                    "--cert-file (TRELLIS_CERT_FILE) needs --key-file (TRELLIS_KEY_FILE): \
                     give both or neither",
                ))
            }
            (None, Some(_)) => {
                return Err(CliError::new(
                    exit::USAGE,
                    "--key-file (TRELLIS_KEY_FILE) needs --cert-file (TRELLIS_CERT_FILE): \
                     give both or neither",
                ))
            }
            _ => {}
        }
        if self.ca_file.is_none() && self.cert_file.is_some() {
            return Err(CliError::new(
                exit::USAGE,
                "--cert-file/--key-file need --ca-file (TRELLIS_CA_FILE), the cluster CA that \
                 the server's certificate is checked against",
            ));
        }
        Ok(())
    }

    /// Reads the files: `None` without `--ca-file` (plaintext).
    pub fn load(&self) -> Result<Option<TlsFiles>, CliError> {
        self.check()?;
        let Some(ca_file) = &self.ca_file else {
            return Ok(None);
        };
        let ca_pem = read_pem("--ca-file", ca_file, "CERTIFICATE")?;
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some((
                read_pem("--cert-file", cert, "CERTIFICATE")?,
                read_pem("--key-file", key, "PRIVATE KEY")?,
            )),
            _ => None,
        };
        Ok(Some(TlsFiles { ca_pem, identity }))
    }
}

/// Reads a PEM file named by `flag`; exit 2 naming the file when it cannot
/// be read or holds no block whose label ends with `label`.
fn read_pem(flag: &str, path: &Path, label: &str) -> Result<String, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        CliError::new(
            exit::USAGE,
            format!("{flag} {}: cannot read: {e}", path.display()),
        )
    })?;
    let has_block = text.lines().any(|line| {
        line.trim()
            .strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|l| l.ends_with(label))
    });
    if !has_block {
        return Err(CliError::new(
            exit::USAGE,
            format!(
                "{flag} {}: no PEM {label} block in the file",
                path.display()
            ),
        ));
    }
    Ok(text)
}

/// The host of a URI as a TLS server name: without the brackets of an IPv6
/// address.
fn server_name(uri: &Uri) -> Option<String> {
    let host = uri.host()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty()).then(|| host.to_string())
}

/// Puts the TLS configuration on an `https://` endpoint: the cluster CA,
/// the client identity, and the endpoint's host as the name the server's
/// certificate must carry (node certificates carry IP and DNS SANs).
pub fn configure(endpoint: Endpoint, files: &TlsFiles) -> Result<Endpoint, Failure> {
    let name = server_name(endpoint.uri()).ok_or_else(|| Failure::Tls {
        code: exit::USAGE,
        message: format!(
            "{}: no host name to check the certificate against",
            endpoint.uri()
        ),
    })?;
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&files.ca_pem))
        .domain_name(name);
    if let Some((cert, key)) = &files.identity {
        config = config.identity(Identity::from_pem(cert, key));
    }
    endpoint.tls_config(config).map_err(|e| {
        let mut message =
            String::from("cannot use the TLS files (--ca-file, --cert-file, --key-file)");
        let mut source: Option<&(dyn std::error::Error + 'static)> = e.source();
        while let Some(err) = source {
            message.push_str(": ");
            message.push_str(&err.to_string());
            source = err.source();
        }
        Failure::Tls {
            code: exit::USAGE,
            message,
        }
    })
}

/// What answered at an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// A TLS record (an alert or a handshake message).
    Tls,
    /// An HTTP/2 frame header (the server's SETTINGS): plaintext gRPC.
    PlainHttp2,
    /// The connection was accepted, then closed without a byte: not a
    /// plaintext HTTP/2 server (which always sends its SETTINGS); probably
    /// TLS that gave up on our preface.
    ClosedSilently,
    /// Nothing conclusive (refused, timed out, something else).
    Unknown,
}

/// The HTTP/2 client connection preface and an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Classifies the first bytes a server sent in answer to the HTTP/2
/// preface.
pub fn classify_answer(bytes: &[u8]) -> Probe {
    match bytes {
        [] => Probe::ClosedSilently,
        // TLS record: content type alert (21) or handshake (22), version 3.x.
        [0x15 | 0x16, 0x03, ..] => Probe::Tls,
        // HTTP/2 frame header: 24-bit length, type 4 (SETTINGS), flags, stream 0.
        [_, _, _, 0x04, _, 0, 0, 0, 0, ..] => Probe::PlainHttp2,
        _ => Probe::Unknown,
    }
}

/// Connects to `host:port` and tells TLS from plaintext HTTP/2 by the
/// answer to the HTTP/2 preface. Bounded by `limit` overall.
pub async fn probe(hostport: &str, limit: Duration) -> Probe {
    let attempt = async {
        let Ok(mut stream) = tokio::net::TcpStream::connect(hostport).await else {
            return Probe::Unknown;
        };
        if stream.write_all(H2_PREFACE).await.is_err() {
            return Probe::Unknown;
        }
        let mut buf = [0u8; 16];
        let mut filled = 0;
        // Read until we have a frame header's worth, or the peer closes.
        while filled < 9 {
            match stream.read(&mut buf[filled..]).await {
                Ok(0) => break,
                Ok(n) => filled += n,
                // A reset after our bytes: the server refused what it got.
                Err(_) if filled == 0 => return Probe::ClosedSilently,
                Err(_) => break,
            }
            if matches!(classify_answer(&buf[..filled]), Probe::Tls) {
                break;
            }
        }
        classify_answer(&buf[..filled])
    };
    tokio::time::timeout(limit, attempt)
        .await
        .unwrap_or(Probe::Unknown)
}

/// Whether a failure came from the connection rather than from a server's
/// answer: a connect error, or a status tonic made locally from a transport
/// error (those carry the error as their source; a server's status does
/// not).
fn transport_trouble(failure: &Failure) -> bool {
    match failure {
        Failure::Connect(m) => !m.contains("cannot connect within"),
        Failure::Status(s) => {
            s.source().is_some()
                && matches!(
                    s.code(),
                    Code::Unknown | Code::Internal | Code::Cancelled | Code::Unavailable
                )
        }
        Failure::Tls { .. } => false,
    }
}

/// rustls' words for certificate trouble, as tonic passes them on.
const CERT_TROUBLE: &[&str] = &[
    "invalid peer certificate",
    "received fatal alert",
    "peer sent no certificates",
    "certificate required",
];

const HINT: &str = "is --ca-file the cluster CA? does the server require a client certificate: \
--cert-file/--key-file (from `trellisctl cert create --admin NAME`)?";

/// A closer look at a failed attempt at `hostport` (`tls`: whether we
/// spoke TLS): turns TLS trouble into [`Failure::Tls`] with a message that
/// says what to change; anything else is returned as it was.
pub async fn diagnose(failure: Failure, hostport: &str, tls: bool, limit: Duration) -> Failure {
    if !transport_trouble(&failure) {
        return failure;
    }
    let message = failure.message();
    let lower = message.to_ascii_lowercase();
    if tls {
        if let Some(i) = CERT_TROUBLE.iter().find_map(|w| lower.find(w)) {
            let detail = message.get(i..).unwrap_or(&message);
            let hint = if detail.contains("not valid for name") {
                "connect by an address or name that the node's certificate lists \
                 (`trellisctl cert create --node ID --san ...`)"
            } else if detail.contains("CertificateRequired") {
                "the server requires a client certificate: pass --cert-file and --key-file"
            } else {
                HINT
            };
            return Failure::Tls {
                code: exit::NOT_AUTHORIZED,
                message: format!("TLS handshake failed: {detail} ({hint})"),
            };
        }
    }
    match (tls, probe(hostport, limit).await) {
        (true, Probe::PlainHttp2) => Failure::Tls {
            code: exit::USAGE,
            message: format!(
                "the server does not speak TLS (a cluster started with `trellisd --insecure-dev`?); \
                 leave out --ca-file, --cert-file and --key-file ({message})"
            ),
        },
        (true, Probe::Tls | Probe::ClosedSilently) => Failure::Tls {
            code: exit::NOT_AUTHORIZED,
            message: format!(
                "the server closed the TLS connection ({message}); it probably rejected our \
                 certificate: {HINT}"
            ),
        },
        (false, Probe::Tls | Probe::ClosedSilently) => Failure::Tls {
            code: exit::USAGE,
            message: format!(
                "the server speaks TLS; pass --ca-file (the cluster CA) and --cert-file/--key-file \
                 (a certificate from `trellisctl cert create --admin NAME`), or the \
                 TRELLIS_CA_FILE/TRELLIS_CERT_FILE/TRELLIS_KEY_FILE variables ({message})"
            ),
        },
        _ => failure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified() {
        assert_eq!(classify_answer(&[]), Probe::ClosedSilently);
        assert_eq!(classify_answer(&[0x15, 0x03, 0x03, 0x00, 0x02]), Probe::Tls);
        assert_eq!(classify_answer(&[0x16, 0x03, 0x01]), Probe::Tls);
        assert_eq!(
            classify_answer(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3]),
            Probe::PlainHttp2
        );
        assert_eq!(classify_answer(b"HTTP/1.1 400"), Probe::Unknown);
        assert_eq!(classify_answer(&[0x15]), Probe::Unknown);
    }

    #[test]
    fn flags_must_pair() {
        let path = |s: &str| Some(PathBuf::from(s));
        let only_cert = TlsFlags {
            ca_file: path("ca.pem"),
            cert_file: path("c.pem"),
            key_file: None,
        };
        assert_eq!(only_cert.check().err().map(|e| e.code), Some(exit::USAGE));
        let only_key = TlsFlags {
            ca_file: path("ca.pem"),
            cert_file: None,
            key_file: path("k.pem"),
        };
        assert_eq!(only_key.check().err().map(|e| e.code), Some(exit::USAGE));
        let no_ca = TlsFlags {
            ca_file: None,
            cert_file: path("c.pem"),
            key_file: path("k.pem"),
        };
        assert_eq!(no_ca.check().err().map(|e| e.code), Some(exit::USAGE));
        assert!(TlsFlags::default().check().is_ok());
        let ca_only = TlsFlags {
            ca_file: path("ca.pem"),
            ..TlsFlags::default()
        };
        assert!(ca_only.check().is_ok());
    }

    #[test]
    fn unreadable_files_name_the_file() {
        let flags = TlsFlags {
            ca_file: Some(PathBuf::from("/nonexistent/trellis/ca.pem")),
            ..TlsFlags::default()
        };
        let e = flags.load().err();
        assert_eq!(e.as_ref().map(|e| e.code), Some(exit::USAGE));
        assert!(e
            .and_then(|e| e.message)
            .unwrap_or_default()
            .contains("/nonexistent/trellis/ca.pem"));
    }

    #[test]
    fn server_names_drop_ipv6_brackets() {
        let uri: Uri = "https://[::1]:7379".parse().unwrap_or_default();
        assert_eq!(server_name(&uri).as_deref(), Some("::1"));
        let uri: Uri = "https://node-1:7379".parse().unwrap_or_default();
        assert_eq!(server_name(&uri).as_deref(), Some("node-1"));
    }
}
