//! `tls.rs`: rustls configurations for mutual TLS between Trellis peers
//! ([`server_config`], [`client_config`]) and the crypto provider they use
//! ([`crypto_provider`]).
//!
//! Every config is built with the *ring* provider passed explicitly and
//! TLS 1.3 only (QUIC requires 1.3; tonic works with it), so nothing
//! depends on a process-wide default provider being installed.
//!
//! Chain verification is rustls/webpki's: a server verifies client
//! certificates against the CA (names are not checked; read the identity
//! with [`crate::peer_cert_info`] afterwards), and a client verifies the
//! server's certificate against the CA *and* the server name it dialled,
//! which must be one of the extra SANs the node certificate was issued with.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::cert::{cert_chain_der, pem_error};
use crate::error::IdentityError;

/// ALPN protocol id of sidecar-to-sidecar connections (QUIC), versioned so
/// an incompatible wire change can be refused during the handshake.
pub const ALPN_SIDECAR: &[u8] = b"trellis/1";

/// The TLS protocol versions every config allows: TLS 1.3 only. QUIC
/// (quinn) requires it, and it encrypts the client certificate.
pub const TLS_VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// Whether a server demands a client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// Clients without a certificate chaining to the CA are refused.
    Required,
    /// Clients may connect without a certificate (e.g. a sidecar joining
    /// with a token); a certificate that *is* presented must still chain to
    /// the CA. Check `peer_certificates()` before trusting the peer.
    Optional,
}

/// The ring crypto provider, as used by every config here. Pass it to
/// anything else that builds rustls configs or verifiers so the process
/// never needs a default provider.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// rustls server config: certificate chain from `cert_pem` (leaf first) +
/// `key_pem` (PKCS#8, SEC1 or PKCS#1 PEM), client certificates verified
/// against `ca_pem` (one or more CA certificates; [`ClientAuth::Optional`]
/// also admits clients without a certificate), TLS 1.3, ring, `alpn` in
/// preference order.
pub fn server_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<ServerConfig, IdentityError> {
    let provider = crypto_provider();
    let roots = Arc::new(root_store(ca_pem)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
    let verifier = match client_auth {
        ClientAuth::Required => verifier,
        ClientAuth::Optional => verifier.allow_unauthenticated(),
    }
    .build()?;
    let chain = cert_chain_der("certificate", cert_pem)?;
    let key = private_key("private key", key_pem)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(TLS_VERSIONS)
        .map_err(tls_err("TLS server config"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(tls_err("TLS server certificate/key"))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// rustls client config trusting only the CA certificate(s) in `ca_pem`,
/// optionally presenting `client_cert = (cert_pem, key_pem)`, TLS 1.3,
/// ring, `alpn` in preference order.
///
/// The server name passed when connecting must match a SAN of the server's
/// certificate: an IP address (`ServerName::IpAddress`, e.g. from
/// `"127.0.0.1"`) matches only an IP SAN, a DNS name only a DNS SAN. The
/// SPIFFE URI is not a server name.
pub fn client_config(
    ca_pem: &str,
    client_cert: Option<(&str, &str)>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, IdentityError> {
    let provider = crypto_provider();
    let roots = root_store(ca_pem)?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(TLS_VERSIONS)
        .map_err(tls_err("TLS client config"))?
        .with_root_certificates(roots);
    let mut config = match client_cert {
        Some((cert_pem, key_pem)) => {
            let chain = cert_chain_der("client certificate", cert_pem)?;
            let key = private_key("client key", key_pem)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(tls_err("TLS client certificate/key"))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Verifies a *workload* server (a peer sidecar) by identity instead of by
/// server name: the chain must lead to the cluster CA (webpki, serverAuth),
/// and the leaf's single SPIFFE URI SAN must equal `expected` when one is
/// given. The server name the client dials is ignored, because workload
/// certificates carry only their SPIFFE URI (no IP or DNS SAN).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    expected: Option<String>,
}

impl SpiffeServerVerifier {
    /// A verifier trusting the CA certificate(s) in `ca_pem`; with
    /// `expected = Some(id)` only a server whose SPIFFE ID is exactly `id`
    /// passes (with `None` the caller must check
    /// [`crate::peer_cert_info`] after the handshake).
    pub fn new(ca_pem: &str, expected: Option<String>) -> Result<Self, IdentityError> {
        Ok(SpiffeServerVerifier {
            roots: Arc::new(root_store(ca_pem)?),
            provider: crypto_provider(),
            expected,
        })
    }
}

impl rustls::client::danger::ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if let Some(expected) = &self.expected {
            let info = crate::peer_cert_info(std::slice::from_ref(end_entity)).map_err(|e| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                    rustls::OtherError(Arc::new(e)),
                ))
            })?;
            if &info.spiffe_id != expected {
                return Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Other(rustls::OtherError(Arc::new(
                        IdentityError::UnexpectedPeer {
                            expected: expected.clone(),
                            found: info.spiffe_id,
                        },
                    ))),
                ));
            }
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// rustls client config for sidecar-to-sidecar mutual TLS: presents
/// `cert_pem`/`key_pem` (the workload certificate), verifies the server
/// with [`SpiffeServerVerifier`] (chain to `ca_pem`, SPIFFE ID `expected`,
/// any server name), TLS 1.3, ring, `alpn` in preference order.
pub fn workload_client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    expected: Option<String>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, IdentityError> {
    let verifier = Arc::new(SpiffeServerVerifier::new(ca_pem, expected)?);
    let chain = cert_chain_der("client certificate", cert_pem)?;
    let key = private_key("client key", key_pem)?;
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(TLS_VERSIONS)
        .map_err(tls_err("TLS client config"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(tls_err("TLS client certificate/key"))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A root store holding every certificate in `ca_pem` (several CA
/// certificates may be concatenated, e.g. during a CA rotation).
pub fn root_store(ca_pem: &str) -> Result<RootCertStore, IdentityError> {
    let mut roots = RootCertStore::empty();
    for cert in cert_chain_der("CA certificate", ca_pem)? {
        roots
            .add(cert)
            .map_err(tls_err("CA certificate: not usable as a trust anchor"))?;
    }
    Ok(roots)
}

fn private_key(what: &'static str, pem: &str) -> Result<PrivateKeyDer<'static>, IdentityError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| pem_error(what, "PRIVATE KEY", e))
}

fn tls_err(op: &'static str) -> impl Fn(rustls::Error) -> IdentityError {
    move |source| IdentityError::Tls { op, source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{peer_cert_info, Ca, Identity, ADMIN_CERT_VALIDITY, NODE_CERT_VALIDITY};
    use rustls::pki_types::ServerName;
    use rustls::{ClientConnection, ServerConnection};
    use std::io::{Read, Write};

    /// Drive a handshake in memory; returns which side failed and why.
    fn handshake(
        client: &mut ClientConnection,
        server: &mut ServerConnection,
    ) -> Result<(), (&'static str, rustls::Error)> {
        for _ in 0..32 {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                server.read_tls(&mut rd).unwrap();
                server.process_new_packets().map_err(|e| ("server", e))?;
            }
            let mut buf = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                client.read_tls(&mut rd).unwrap();
                client.process_new_packets().map_err(|e| ("client", e))?;
            }
            if !client.is_handshaking()
                && !server.is_handshaking()
                && !client.wants_write()
                && !server.wants_write()
            {
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    /// Send "ping" from client to server after the handshake.
    fn ping(
        client: &mut ClientConnection,
        server: &mut ServerConnection,
    ) -> Result<(), (&'static str, rustls::Error)> {
        client.writer().write_all(b"ping").unwrap();
        handshake(client, server)?;
        let mut got = [0u8; 4];
        server.reader().read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        Ok(())
    }

    struct Setup {
        ca: Ca,
        server: Arc<ServerConfig>,
    }

    fn setup(client_auth: ClientAuth) -> Setup {
        let ca = Ca::create(crate::DEFAULT_TRUST_DOMAIN).unwrap();
        let (node, node_key) = ca
            .issue_node(1, &["127.0.0.1".to_owned()], NODE_CERT_VALIDITY)
            .unwrap();
        let server = server_config(
            ca.cert_pem(),
            &node.cert_pem,
            &node_key,
            client_auth,
            &[ALPN_SIDECAR],
        )
        .unwrap();
        Setup {
            ca,
            server: Arc::new(server),
        }
    }

    fn connect(
        server_cfg: &Arc<ServerConfig>,
        client_cfg: ClientConfig,
        name: &str,
    ) -> (ClientConnection, ServerConnection) {
        let name = ServerName::try_from(name.to_owned()).unwrap();
        let client = ClientConnection::new(Arc::new(client_cfg), name).unwrap();
        let server = ServerConnection::new(server_cfg.clone()).unwrap();
        (client, server)
    }

    #[test]
    fn mutual_tls_with_ca_issued_client_cert() {
        let s = setup(ClientAuth::Required);
        let (node2, node2_key) = s.ca.issue_node(2, &[], NODE_CERT_VALIDITY).unwrap();
        let cfg = client_config(
            s.ca.cert_pem(),
            Some((&node2.cert_pem, &node2_key)),
            &[ALPN_SIDECAR],
        )
        .unwrap();
        let (mut c, mut sv) = connect(&s.server, cfg, "127.0.0.1");
        handshake(&mut c, &mut sv).unwrap();
        ping(&mut c, &mut sv).unwrap();
        assert_eq!(sv.alpn_protocol(), Some(ALPN_SIDECAR));
        assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        let peer = peer_cert_info(sv.peer_certificates().unwrap()).unwrap();
        assert_eq!(peer.identity, Identity::Node { id: 2 });
        assert_eq!(peer, node2.info);
        let server_peer = peer_cert_info(c.peer_certificates().unwrap()).unwrap();
        assert_eq!(server_peer.identity, Identity::Node { id: 1 });

        // An admin (clientAuth-only) certificate is accepted as a client too.
        let (admin, admin_key) = s.ca.issue_admin("ops", ADMIN_CERT_VALIDITY).unwrap();
        let cfg = client_config(s.ca.cert_pem(), Some((&admin.cert_pem, &admin_key)), &[]).unwrap();
        let (mut c, mut sv) = connect(&s.server, cfg, "127.0.0.1");
        handshake(&mut c, &mut sv).unwrap();
        ping(&mut c, &mut sv).unwrap();
        let peer = peer_cert_info(sv.peer_certificates().unwrap()).unwrap();
        assert_eq!(peer.identity, Identity::Admin { name: "ops".into() });
    }

    #[test]
    fn workload_cert_from_csr_works_as_client() {
        let s = setup(ClientAuth::Required);
        let (csr, key) = crate::generate_csr().unwrap();
        let identity = Identity::Workload {
            namespace: "default".into(),
            service: "reviews".into(),
        };
        let issued =
            s.ca.sign_csr(&csr, &identity, &[], crate::WORKLOAD_CERT_VALIDITY)
                .unwrap();
        let cfg = client_config(
            s.ca.cert_pem(),
            Some((&issued.cert_pem, &key)),
            &[ALPN_SIDECAR],
        )
        .unwrap();
        let (mut c, mut sv) = connect(&s.server, cfg, "127.0.0.1");
        handshake(&mut c, &mut sv).unwrap();
        ping(&mut c, &mut sv).unwrap();
        let peer = peer_cert_info(sv.peer_certificates().unwrap()).unwrap();
        assert_eq!(peer.identity, identity);
    }

    #[test]
    fn client_cert_from_another_ca_is_refused() {
        let s = setup(ClientAuth::Required);
        let other = Ca::create(crate::DEFAULT_TRUST_DOMAIN).unwrap();
        let (node2, node2_key) = other.issue_node(2, &[], NODE_CERT_VALIDITY).unwrap();
        // The client trusts the right CA but presents a foreign certificate.
        let cfg = client_config(s.ca.cert_pem(), Some((&node2.cert_pem, &node2_key)), &[]).unwrap();
        let (mut c, mut sv) = connect(&s.server, cfg, "127.0.0.1");
        let result = handshake(&mut c, &mut sv).and_then(|()| ping(&mut c, &mut sv));
        let (side, err) = result.unwrap_err();
        assert_eq!(side, "server");
        assert!(
            matches!(err, rustls::Error::InvalidCertificate(_)),
            "{err:?}"
        );

        // Same with Optional: a presented certificate must still chain to the CA.
        let s = setup(ClientAuth::Optional);
        let cfg = client_config(s.ca.cert_pem(), Some((&node2.cert_pem, &node2_key)), &[]).unwrap();
        let (mut c, mut sv) = connect(&s.server, cfg, "127.0.0.1");
        let result = handshake(&mut c, &mut sv).and_then(|()| ping(&mut c, &mut sv));
        let (side, _) = result.unwrap_err();
        assert_eq!(side, "server");
    }

    #[test]
    fn required_refuses_anonymous_client_optional_accepts() {
        let s = setup(ClientAuth::Required);
        let cfg = client_config(s.ca.cert_pem(), None, &[]).unwrap();
        let (mut c, mut sv) = connect(&s.server, cfg, "127.0.0.1");
        let result = handshake(&mut c, &mut sv).and_then(|()| ping(&mut c, &mut sv));
        let (side, err) = result.unwrap_err();
        assert_eq!(side, "server");
        assert!(
            matches!(err, rustls::Error::NoCertificatesPresented),
            "{err:?}"
        );

        let s = setup(ClientAuth::Optional);
        let cfg = client_config(s.ca.cert_pem(), None, &[]).unwrap();
        let (mut c, mut sv) = connect(&s.server, cfg, "127.0.0.1");
        handshake(&mut c, &mut sv).unwrap();
        ping(&mut c, &mut sv).unwrap();
        assert!(sv.peer_certificates().is_none());
    }

    #[test]
    fn client_refuses_wrong_server_name_and_foreign_server() {
        let s = setup(ClientAuth::Optional);
        // The node certificate has IP SAN 127.0.0.1 only.
        for name in ["127.0.0.2", "localhost"] {
            let cfg = client_config(s.ca.cert_pem(), None, &[]).unwrap();
            let (mut c, mut sv) = connect(&s.server, cfg, name);
            let (side, err) = handshake(&mut c, &mut sv).unwrap_err();
            assert_eq!(side, "client", "{name}");
            assert!(
                matches!(err, rustls::Error::InvalidCertificate(_)),
                "{name}: {err:?}"
            );
        }
        // A client trusting another CA refuses the server.
        let other = Ca::create(crate::DEFAULT_TRUST_DOMAIN).unwrap();
        let cfg = client_config(other.cert_pem(), None, &[]).unwrap();
        let (mut c, mut sv) = connect(&s.server, cfg, "127.0.0.1");
        let (side, _) = handshake(&mut c, &mut sv).unwrap_err();
        assert_eq!(side, "client");
    }

    fn workload(ca: &Ca, service: &str) -> (String, String) {
        let (csr, key) = crate::generate_csr().unwrap();
        let identity = Identity::Workload {
            namespace: "default".into(),
            service: service.into(),
        };
        let issued = ca
            .sign_csr(&csr, &identity, &[], crate::WORKLOAD_CERT_VALIDITY)
            .unwrap();
        (issued.cert_pem, key)
    }

    #[test]
    fn workload_server_is_verified_by_spiffe_id_not_name() {
        let ca = Ca::create(crate::DEFAULT_TRUST_DOMAIN).unwrap();
        let (srv_cert, srv_key) = workload(&ca, "reviews");
        let (cli_cert, cli_key) = workload(&ca, "productpage");
        let server = Arc::new(
            server_config(
                ca.cert_pem(),
                &srv_cert,
                &srv_key,
                ClientAuth::Required,
                &[b"h2"],
            )
            .unwrap(),
        );
        let want = |svc: &str| Some(format!("spiffe://trellis.local/ns/default/svc/{svc}"));
        // Any server name: the certificate has no IP/DNS SAN.
        for name in ["127.0.0.1", "reviews"] {
            let cfg = workload_client_config(
                ca.cert_pem(),
                &cli_cert,
                &cli_key,
                want("reviews"),
                &[b"h2"],
            )
            .unwrap();
            let (mut c, mut sv) = connect(&server, cfg, name);
            handshake(&mut c, &mut sv).unwrap();
            ping(&mut c, &mut sv).unwrap();
            let peer = peer_cert_info(sv.peer_certificates().unwrap()).unwrap();
            assert_eq!(Some(peer.spiffe_id), want("productpage"));
        }
        // Another service's sidecar answering is refused by the client.
        let cfg = workload_client_config(ca.cert_pem(), &cli_cert, &cli_key, want("ratings"), &[])
            .unwrap();
        let (mut c, mut sv) = connect(&server, cfg, "127.0.0.1");
        let (side, err) = handshake(&mut c, &mut sv).unwrap_err();
        assert_eq!(side, "client");
        assert!(err.to_string().contains("svc/ratings"), "{err}");
        // A server from another CA is refused.
        let other = Ca::create(crate::DEFAULT_TRUST_DOMAIN).unwrap();
        let (o_cert, o_key) = workload(&other, "reviews");
        let foreign = Arc::new(
            server_config(other.cert_pem(), &o_cert, &o_key, ClientAuth::Optional, &[]).unwrap(),
        );
        let cfg = workload_client_config(ca.cert_pem(), &cli_cert, &cli_key, want("reviews"), &[])
            .unwrap();
        let (mut c, mut sv) = connect(&foreign, cfg, "127.0.0.1");
        let (side, _) = handshake(&mut c, &mut sv).unwrap_err();
        assert_eq!(side, "client");
    }

    #[test]
    fn config_builders_report_bad_pem() {
        let ca = Ca::create(crate::DEFAULT_TRUST_DOMAIN).unwrap();
        let (node, key) = ca.issue_node(1, &[], NODE_CERT_VALIDITY).unwrap();
        let err =
            server_config("nope", &node.cert_pem, &key, ClientAuth::Required, &[]).unwrap_err();
        assert!(
            err.to_string().starts_with("CA certificate: not valid PEM"),
            "{err}"
        );
        let err = server_config(
            ca.cert_pem(),
            &node.cert_pem,
            "nope",
            ClientAuth::Required,
            &[],
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("private key: not valid PEM"),
            "{err}"
        );
        // Key of another certificate.
        let (_, other_key) = ca.issue_node(2, &[], NODE_CERT_VALIDITY).unwrap();
        assert!(server_config(
            ca.cert_pem(),
            &node.cert_pem,
            &other_key,
            ClientAuth::Required,
            &[]
        )
        .is_err());
        let err = client_config(ca.cert_pem(), Some(("nope", &key)), &[]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("client certificate: not valid PEM"),
            "{err}"
        );
    }
}
