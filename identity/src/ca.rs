//! `ca.rs`: the cluster root CA ([`Ca`]) and the certificates it issues
//! (node, admin, and workload certificates signed from a CSR), plus
//! [`generate_csr`] for the requesting side.
//!
//! Every certificate carries exactly one SPIFFE URI SAN built from an
//! [`Identity`] the *caller* chose; nothing a CSR asks for (subject, SANs,
//! extensions, CA flag) is copied, only its public key.

use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateSigningRequestDer, DnsName, PrivatePkcs8KeyDer};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::error::X509Error;
use x509_parser::prelude::FromDer;
use x509_parser::time::ASN1Time;

use crate::cert::{cert_chain_der, cert_info, parse_cert, pem_error, spiffe_uris, Issued};
use crate::error::{echo, IdentityError};
use crate::spiffe::{check_trust_domain, parse_trust_domain_uri, Identity, SPIFFE_SCHEME};

const DAY_SECS: u64 = 24 * 60 * 60;

/// Lifetime of a new root CA: 10 years (3650 days). Rotating a root means
/// re-issuing every node and admin certificate, so it should be rare; the
/// key never leaves the control plane's disk.
pub const CA_VALIDITY: Duration = Duration::from_secs(3650 * DAY_SECS);

/// Default lifetime of a node certificate: 1 year (365 days). Nodes get
/// their certificates from an operator (`trellisctl cert create`), so they
/// cannot renew themselves often.
pub const NODE_CERT_VALIDITY: Duration = Duration::from_secs(365 * DAY_SECS);

/// Default lifetime of an admin (operator / tool) certificate: 1 year
/// (365 days), issued by hand like node certificates.
pub const ADMIN_CERT_VALIDITY: Duration = Duration::from_secs(365 * DAY_SECS);

/// Default lifetime of a workload (sidecar) certificate: 1 hour. Short-lived
/// because there is no revocation: a removed or compromised sidecar loses
/// access within the hour. Sidecars renew well before expiry.
pub const WORKLOAD_CERT_VALIDITY: Duration = Duration::from_secs(60 * 60);

/// How far every certificate's notBefore is set before "now", so a peer
/// whose clock is slightly behind the CA's accepts a fresh certificate.
pub const CLOCK_SKEW_BACKDATE: Duration = Duration::from_secs(60);

/// Length of random certificate serial numbers. 16 bytes with the top two
/// bits fixed (`01`) give 126 random bits (RFC 5280 / CA/B forum want at
/// least 64), a positive DER INTEGER, and always exactly 32 hex digits.
pub const SERIAL_LEN: usize = 16;

/// Subject common name of the root CA certificate.
pub const CA_COMMON_NAME: &str = "Trellis Root CA";

/// basicConstraints pathLenConstraint of the root: 0, because the root
/// signs only leaf certificates; an intermediate CA it signed by mistake
/// would not be accepted by verifiers.
pub const CA_PATH_LEN: u8 = 0;

/// The cluster's root CA (certificate + private key).
///
/// `Ca` is `Send + Sync`: share one behind an `Arc`.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    trust_domain: String,
    not_after_unix: i64,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("not_after_unix", &self.not_after_unix)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// New self-signed root: CN [`CA_COMMON_NAME`], URI SAN
    /// `spiffe://<td>`, basicConstraints CA:true (pathLen
    /// [`CA_PATH_LEN`]), keyCertSign + cRLSign, validity [`CA_VALIDITY`],
    /// ECDSA P-256.
    pub fn create(trust_domain: &str) -> Result<Ca, IdentityError> {
        check_trust_domain(trust_domain)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(rcgen_err("CA: generating the key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, CA_COMMON_NAME);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![spiffe_san(&format!("{SPIFFE_SCHEME}{trust_domain}"))?];
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(CA_PATH_LEN));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        let (not_before, not_after) = validity_window(CA_VALIDITY, None)?;
        params.not_before = asn1_time(not_before)?.to_datetime();
        params.not_after = asn1_time(not_after)?.to_datetime();
        let cert = params
            .self_signed(&key)
            .map_err(rcgen_err("CA: self-signing"))?;
        Ca::from_pem(&cert.pem(), &key.serialize_pem())
    }

    /// Load a CA. Checks that the certificate is a self-signed CA
    /// (basicConstraints CA:true, keyCertSign if keyUsage is present), that
    /// it carries exactly one `spiffe://<td>` URI SAN (the trust domain),
    /// and that the key (PKCS#8 `PRIVATE KEY` PEM) matches it.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, IdentityError> {
        let certs = cert_chain_der("CA certificate", cert_pem)?;
        let der = match certs.as_slice() {
            [one] => one.clone(),
            more => {
                return Err(IdentityError::PemCount {
                    what: "CA certificate",
                    label: "CERTIFICATE",
                    found: more.len(),
                })
            }
        };
        let x509 = parse_cert("CA certificate", &der)?;

        let bc = x509
            .basic_constraints()
            .map_err(|e| IdentityError::NotACa(format!("bad basicConstraints: {e}")))?;
        if !bc.is_some_and(|bc| bc.value.ca) {
            return Err(IdentityError::NotACa(
                "basicConstraints CA:true is missing".to_owned(),
            ));
        }
        let ku = x509
            .key_usage()
            .map_err(|e| IdentityError::NotACa(format!("bad keyUsage: {e}")))?;
        if ku.is_some_and(|ku| !ku.value.key_cert_sign()) {
            return Err(IdentityError::NotACa(
                "keyUsage does not allow keyCertSign".to_owned(),
            ));
        }
        if x509.verify_signature(None).is_err() {
            return Err(IdentityError::NotACa(
                "not a self-signed root (its signature does not verify with its own key)"
                    .to_owned(),
            ));
        }
        let trust_domain = match spiffe_uris(&x509)?.as_slice() {
            [] => return Err(IdentityError::NoSpiffeId),
            [one] => parse_trust_domain_uri(one)?,
            more => return Err(IdentityError::MultipleSpiffeIds(more.len())),
        };
        let not_after_unix = x509.validity().not_after.timestamp();

        let pkcs8 = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| pem_error("CA key", "PRIVATE KEY (PKCS#8)", e))?;
        let key = KeyPair::try_from(&pkcs8).map_err(|e| IdentityError::PrivateKey {
            what: "CA key",
            reason: format!("{e} (ECDSA P-256/P-384, Ed25519 or RSA in PKCS#8 expected)"),
        })?;
        if key.der_bytes() != x509.public_key().subject_public_key.data.as_ref() {
            return Err(IdentityError::CaKeyMismatch);
        }
        let issuer =
            Issuer::from_ca_cert_der(&der, key).map_err(rcgen_err("CA certificate: loading"))?;
        Ok(Ca {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            trust_domain,
            not_after_unix,
            issuer,
        })
    }

    /// The CA certificate, PEM (as created or loaded): the trust anchor to
    /// hand to every node, admin and sidecar.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PKCS#8 PEM. Store with
    /// [`crate::write_file_atomic`]`(.., private = true)`.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The trust domain, from the CA certificate's `spiffe://<td>` URI SAN.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Node certificate + new private key (PKCS#8 PEM): SPIFFE node identity
    /// URI SAN plus `sans` (each an IP literal -> IP SAN, else DNS SAN), EKU
    /// serverAuth + clientAuth.
    ///
    /// Clients connect with one of `sans` as the TLS server name.
    pub fn issue_node(
        &self,
        node_id: u64,
        sans: &[String],
        validity: Duration,
    ) -> Result<(Issued, String), IdentityError> {
        let key = new_key("node certificate")?;
        let issued = self.issue(
            &key,
            &Identity::Node { id: node_id },
            sans,
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            validity,
        )?;
        Ok((issued, key.serialize_pem()))
    }

    /// Admin client certificate + new private key (PKCS#8 PEM): EKU
    /// clientAuth only.
    pub fn issue_admin(
        &self,
        name: &str,
        validity: Duration,
    ) -> Result<(Issued, String), IdentityError> {
        let key = new_key("admin certificate")?;
        let issued = self.issue(
            &key,
            &Identity::Admin {
                name: name.to_owned(),
            },
            &[],
            &[ExtendedKeyUsagePurpose::ClientAuth],
            validity,
        )?;
        Ok((issued, key.serialize_pem()))
    }

    /// Sign a PKCS#10 CSR (PEM) for `identity`.
    ///
    /// Verifies the CSR's self-signature (proof the requester holds the
    /// key), then takes ONLY its public key: subject and SANs come from
    /// `identity` (+ `sans` as for [`Ca::issue_node`]); EKU serverAuth +
    /// clientAuth; validity `validity` from now (notBefore backdated by
    /// [`CLOCK_SKEW_BACKDATE`]); random [`SERIAL_LEN`]-byte serial.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        sans: &[String],
        validity: Duration,
    ) -> Result<Issued, IdentityError> {
        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .map_err(|e| pem_error("CSR", "CERTIFICATE REQUEST", e))?;
        let (rest, csr) =
            X509CertificationRequest::from_der(&der).map_err(|e| IdentityError::Der {
                what: "CSR",
                structure: "PKCS#10 certification request",
                reason: e.to_string(),
            })?;
        if !rest.is_empty() {
            return Err(IdentityError::Der {
                what: "CSR",
                structure: "PKCS#10 certification request",
                reason: format!("{} trailing bytes after the request", rest.len()),
            });
        }
        csr.verify_signature().map_err(|e| match e {
            X509Error::SignatureUnsupportedAlgorithm => IdentityError::UnsupportedKey {
                what: "CSR",
                reason: "signature algorithm not supported".to_owned(),
            },
            _ => IdentityError::CsrSignature,
        })?;
        let public_key =
            SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
                .map_err(|e| IdentityError::UnsupportedKey {
                    what: "CSR",
                    reason: e.to_string(),
                })?;
        self.issue(
            &public_key,
            identity,
            sans,
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            validity,
        )
    }

    fn issue(
        &self,
        public_key: &impl PublicKeyData,
        identity: &Identity,
        sans: &[String],
        ekus: &[ExtendedKeyUsagePurpose],
        validity: Duration,
    ) -> Result<Issued, IdentityError> {
        identity.validate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.to_string());
        params.distinguished_name = dn;
        let mut subject_alt_names = vec![spiffe_san(&identity.to_spiffe(&self.trust_domain))?];
        for san in sans {
            subject_alt_names.push(extra_san(san)?);
        }
        params.subject_alt_names = subject_alt_names;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = ekus.to_vec();
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let (not_before, not_after) = validity_window(validity, Some(self.not_after_unix))?;
        params.not_before = asn1_time(not_before)?.to_datetime();
        params.not_after = asn1_time(not_after)?.to_datetime();
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(rcgen_err("signing the certificate"))?;
        let cert_pem = cert.pem();
        let info = cert_info(&cert_pem)?;
        Ok(Issued { cert_pem, info })
    }
}

/// A fresh ECDSA P-256 key and a CSR for it: `(csr_pem, key_pem)` (key in
/// PKCS#8 PEM). The CSR has an empty subject and no extensions: the CA
/// decides the identity, so there is nothing to ask for.
pub fn generate_csr() -> Result<(String, String), IdentityError> {
    let key = new_key("CSR")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(rcgen_err("CSR: building"))?;
    let csr_pem = csr.pem().map_err(rcgen_err("CSR: encoding"))?;
    Ok((csr_pem, key.serialize_pem()))
}

fn new_key(what: &'static str) -> Result<KeyPair, IdentityError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|source| IdentityError::Rcgen { op: what, source })
}

fn rcgen_err(op: &'static str) -> impl Fn(rcgen::Error) -> IdentityError {
    move |source| IdentityError::Rcgen { op, source }
}

fn spiffe_san(uri: &str) -> Result<SanType, IdentityError> {
    Ia5String::try_from(uri)
        .map(SanType::URI)
        .map_err(|_| IdentityError::InvalidSpiffeId {
            uri: echo(uri),
            reason: "not ASCII".to_owned(),
        })
}

/// An IP literal becomes an IP SAN; anything else must be a DNS name.
fn extra_san(san: &str) -> Result<SanType, IdentityError> {
    if let Ok(ip) = IpAddr::from_str(san) {
        return Ok(SanType::IpAddress(ip));
    }
    if DnsName::try_from(san).is_err() {
        return Err(IdentityError::InvalidSan(echo(san)));
    }
    Ia5String::try_from(san)
        .map(SanType::DnsName)
        .map_err(|_| IdentityError::InvalidSan(echo(san)))
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; SERIAL_LEN] = rand::random();
    bytes[0] = (bytes[0] & 0x3f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn asn1_time(unix_secs: i64) -> Result<ASN1Time, IdentityError> {
    ASN1Time::from_timestamp(unix_secs)
        .map_err(|_| IdentityError::Validity(format!("{unix_secs} s since 1970 is out of range")))
}

/// `(not_before, not_after)` in Unix seconds: now - [`CLOCK_SKEW_BACKDATE`]
/// to now + `validity`, cut at `cap` (the CA's own notAfter: a leaf cannot
/// outlive its issuer).
fn validity_window(validity: Duration, cap: Option<i64>) -> Result<(i64, i64), IdentityError> {
    if validity.as_secs() == 0 {
        return Err(IdentityError::Validity(
            "must be at least 1 second".to_owned(),
        ));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| IdentityError::Clock)?
        .as_secs();
    let now = i64::try_from(now).map_err(|_| IdentityError::Clock)?;
    let lifetime = i64::try_from(validity.as_secs())
        .ok()
        .and_then(|v| now.checked_add(v))
        .ok_or_else(|| IdentityError::Validity(format!("{validity:?} is too long")))?;
    let backdate = i64::try_from(CLOCK_SKEW_BACKDATE.as_secs()).unwrap_or(0);
    let not_before = now.saturating_sub(backdate);
    let not_after = match cap {
        Some(cap) if cap <= now => {
            return Err(IdentityError::CaExpired {
                not_after_unix: cap,
            })
        }
        Some(cap) => lifetime.min(cap),
        None => lifetime,
    };
    Ok((not_before, not_after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;

    fn now_ms() -> u64 {
        u64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap()
    }

    fn san_strings(cert_pem: &str) -> Vec<String> {
        let der = crate::cert::first_cert_der("t", cert_pem).unwrap();
        let x509 = parse_cert("t", &der).unwrap();
        let san = x509.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::URI(u) => format!("URI:{u}"),
                GeneralName::DNSName(d) => format!("DNS:{d}"),
                GeneralName::IPAddress(ip) => match ip.len() {
                    4 => format!("IP:{}", IpAddr::from(<[u8; 4]>::try_from(*ip).unwrap())),
                    _ => format!("IP:{}", IpAddr::from(<[u8; 16]>::try_from(*ip).unwrap())),
                },
                other => format!("{other:?}"),
            })
            .collect()
    }

    fn subject_cn(cert_pem: &str) -> String {
        let der = crate::cert::first_cert_der("t", cert_pem).unwrap();
        let x509 = parse_cert("t", &der).unwrap();
        let cn = x509
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned();
        cn
    }

    fn assert_window(info: &crate::CertInfo, validity: Duration, before_ms: u64, after_ms: u64) {
        let skew = u64::try_from(CLOCK_SKEW_BACKDATE.as_millis()).unwrap();
        let v = u64::try_from(validity.as_millis()).unwrap();
        // Certificates have 1 s resolution: allow 1 s of truncation.
        assert!(
            info.not_before_unix_ms + skew + 1000 >= before_ms,
            "{info:?}"
        );
        assert!(info.not_before_unix_ms + skew <= after_ms, "{info:?}");
        assert!(info.not_after_unix_ms + 1000 >= before_ms + v, "{info:?}");
        assert!(info.not_after_unix_ms <= after_ms + v, "{info:?}");
    }

    #[test]
    fn ca_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Ca>();
    }

    #[test]
    fn ca_create_from_pem_round_trip() {
        let ca = Ca::create("example.org").unwrap();
        assert_eq!(ca.trust_domain(), "example.org");
        let loaded = Ca::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        assert_eq!(loaded.trust_domain(), "example.org");
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        assert_eq!(subject_cn(ca.cert_pem()), CA_COMMON_NAME);
        assert_eq!(san_strings(ca.cert_pem()), vec!["URI:spiffe://example.org"]);

        // The loaded CA issues certificates that chain to the same root.
        let (issued, _) = loaded.issue_admin("ops", ADMIN_CERT_VALIDITY).unwrap();
        assert_eq!(issued.info.trust_domain, "example.org");

        // CA validity is ten years, backdated for skew.
        let der = crate::cert::first_cert_der("t", ca.cert_pem()).unwrap();
        let x509 = parse_cert("t", &der).unwrap();
        let span = x509.validity().not_after.timestamp() - x509.validity().not_before.timestamp();
        let expected = i64::try_from((CA_VALIDITY + CLOCK_SKEW_BACKDATE).as_secs()).unwrap();
        assert!((span - expected).abs() <= 1, "{span} vs {expected}");
        let bc = x509.basic_constraints().unwrap().unwrap();
        assert!(bc.value.ca);
        let ku = x509.key_usage().unwrap().unwrap();
        assert!(ku.value.key_cert_sign() && ku.value.crl_sign());
        assert!(!ku.value.digital_signature());
    }

    #[test]
    fn ca_create_rejects_bad_trust_domain() {
        assert!(Ca::create("Upper.Case").is_err());
        assert!(Ca::create("").is_err());
        assert!(Ca::create("a/b").is_err());
    }

    #[test]
    fn from_pem_refuses_key_of_another_ca() {
        let a = Ca::create(crate::DEFAULT_TRUST_DOMAIN).unwrap();
        let b = Ca::create(crate::DEFAULT_TRUST_DOMAIN).unwrap();
        let err = Ca::from_pem(a.cert_pem(), b.key_pem()).unwrap_err();
        assert!(matches!(err, IdentityError::CaKeyMismatch), "{err}");
        assert_eq!(
            err.to_string(),
            "CA key does not match the CA certificate (public keys differ)"
        );
    }

    #[test]
    fn from_pem_refuses_garbage_and_non_ca() {
        let ca = Ca::create(crate::DEFAULT_TRUST_DOMAIN).unwrap();
        let err = Ca::from_pem("garbage", ca.key_pem()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "CA certificate: not valid PEM (expected a CERTIFICATE block: none found)"
        );
        let err = Ca::from_pem(ca.cert_pem(), "garbage").unwrap_err();
        assert_eq!(
            err.to_string(),
            "CA key: not valid PEM (expected a PRIVATE KEY (PKCS#8) block: none found)"
        );
        // Key and certificate swapped.
        let err = Ca::from_pem(ca.key_pem(), ca.cert_pem()).unwrap_err();
        assert!(
            err.to_string().starts_with("CA certificate: not valid PEM"),
            "{err}"
        );
        // Two certificates.
        let two = format!("{}{}", ca.cert_pem(), ca.cert_pem());
        let err = Ca::from_pem(&two, ca.key_pem()).unwrap_err();
        assert!(
            matches!(err, IdentityError::PemCount { found: 2, .. }),
            "{err}"
        );
        // A leaf certificate with its own key is not a CA.
        let (node, node_key) = ca.issue_node(1, &[], NODE_CERT_VALIDITY).unwrap();
        let err = Ca::from_pem(&node.cert_pem, &node_key).unwrap_err();
        assert!(matches!(err, IdentityError::NotACa(_)), "{err}");
        assert!(err.to_string().contains("CA:true"), "{err}");
        // A corrupted base64 body.
        let broken = ca.cert_pem().replacen('M', "!", 1);
        assert!(Ca::from_pem(&broken, ca.key_pem()).is_err());
    }

    #[test]
    fn issue_node_has_identity_sans_and_validity() {
        let ca = Ca::create(crate::DEFAULT_TRUST_DOMAIN).unwrap();
        let before = now_ms();
        let sans = vec![
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
            "node-7.trellis".to_owned(),
        ];
        let (issued, key_pem) = ca.issue_node(7, &sans, NODE_CERT_VALIDITY).unwrap();
        let after = now_ms();
        assert!(key_pem.contains("BEGIN PRIVATE KEY"));
        let info = &issued.info;
        assert_eq!(info.identity, Identity::Node { id: 7 });
        assert_eq!(info.trust_domain, "trellis.local");
        assert_eq!(info.spiffe_id, "spiffe://trellis.local/node/7");
        assert_eq!(info.serial.len(), SERIAL_LEN * 2, "{}", info.serial);
        // Top two bits are 01: positive, never a leading zero byte.
        assert!(
            matches!(info.serial.as_bytes()[0], b'4'..=b'7'),
            "{}",
            info.serial
        );
        assert!(info
            .serial
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_window(info, NODE_CERT_VALIDITY, before, after);
        assert_eq!(&cert_info(&issued.cert_pem).unwrap(), info);
        assert_eq!(subject_cn(&issued.cert_pem), "node/7");
        assert_eq!(
            san_strings(&issued.cert_pem),
            vec![
                "URI:spiffe://trellis.local/node/7".to_owned(),
                "IP:127.0.0.1".to_owned(),
                "IP:::1".to_owned(),
                "DNS:node-7.trellis".to_owned(),
            ]
        );
        // EKU server + client.
        let der = crate::cert::first_cert_der("t", &issued.cert_pem).unwrap();
        let x509 = parse_cert("t", &der).unwrap();
        let eku = x509.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth && eku.value.client_auth);
        assert!(!x509.basic_constraints().unwrap().unwrap().value.ca);

        // Serials differ between certificates.
        let (other, _) = ca.issue_node(7, &sans, NODE_CERT_VALIDITY).unwrap();
        assert_ne!(other.info.serial, info.serial);
    }

    #[test]
    fn issue_rejects_bad_input() {
        let ca = Ca::create(crate::DEFAULT_TRUST_DOMAIN).unwrap();
        assert!(ca.issue_node(0, &[], NODE_CERT_VALIDITY).is_err());
        let err = ca
            .issue_node(1, &["not a name!".to_owned()], NODE_CERT_VALIDITY)
            .unwrap_err();
        assert!(matches!(err, IdentityError::InvalidSan(_)), "{err}");
        assert!(ca
            .issue_node(1, &["[::1]".to_owned()], NODE_CERT_VALIDITY)
            .is_err());
        assert!(ca.issue_admin("Ops", ADMIN_CERT_VALIDITY).is_err());
        assert!(ca.issue_admin("ops/x", ADMIN_CERT_VALIDITY).is_err());
        assert!(matches!(
            ca.issue_admin("ops", Duration::ZERO),
            Err(IdentityError::Validity(_))
        ));
        assert!(matches!(
            ca.issue_admin("ops", Duration::from_secs(u64::MAX)),
            Err(IdentityError::Validity(_))
        ));
    }

    #[test]
    fn leaf_validity_is_capped_at_the_ca() {
        let ca = Ca::create(crate::DEFAULT_TRUST_DOMAIN).unwrap();
        let (issued, _) = ca
            .issue_admin("ops", CA_VALIDITY + Duration::from_secs(1000 * DAY_SECS))
            .unwrap();
        assert_eq!(
            issued.info.not_after_unix_ms,
            u64::try_from(ca.not_after_unix).unwrap() * 1000
        );
    }

    #[test]
    fn issue_admin_has_identity_and_client_eku_only() {
        let ca = Ca::create(crate::DEFAULT_TRUST_DOMAIN).unwrap();
        let before = now_ms();
        let (issued, _key) = ca.issue_admin("ops_team", ADMIN_CERT_VALIDITY).unwrap();
        let after = now_ms();
        let info = &issued.info;
        assert_eq!(
            info.identity,
            Identity::Admin {
                name: "ops_team".into()
            }
        );
        assert_eq!(info.spiffe_id, "spiffe://trellis.local/admin/ops_team");
        assert_eq!(info.serial.len(), SERIAL_LEN * 2);
        assert_window(info, ADMIN_CERT_VALIDITY, before, after);
        let der = crate::cert::first_cert_der("t", &issued.cert_pem).unwrap();
        let x509 = parse_cert("t", &der).unwrap();
        let eku = x509.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.client_auth && !eku.value.server_auth);
        assert_eq!(san_strings(&issued.cert_pem).len(), 1);
    }

    #[test]
    fn sign_csr_uses_only_the_public_key() {
        let ca = Ca::create(crate::DEFAULT_TRUST_DOMAIN).unwrap();
        // A CSR asking for a CA certificate, another SPIFFE ID, a DNS name and a CN.
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
        params.subject_alt_names.push(SanType::URI(
            Ia5String::try_from("spiffe://trellis.local/node/1").unwrap(),
        ));
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "node/1");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr_pem = params.serialize_request(&key).unwrap().pem().unwrap();

        let identity = Identity::Workload {
            namespace: "default".into(),
            service: "reviews".into(),
        };
        let before = now_ms();
        let issued = ca
            .sign_csr(
                &csr_pem,
                &identity,
                &["10.0.0.5".to_owned()],
                WORKLOAD_CERT_VALIDITY,
            )
            .unwrap();
        let after = now_ms();
        assert_eq!(issued.info.identity, identity);
        assert_eq!(
            issued.info.spiffe_id,
            "spiffe://trellis.local/ns/default/svc/reviews"
        );
        assert_window(&issued.info, WORKLOAD_CERT_VALIDITY, before, after);
        assert_eq!(
            san_strings(&issued.cert_pem),
            vec![
                "URI:spiffe://trellis.local/ns/default/svc/reviews".to_owned(),
                "IP:10.0.0.5".to_owned()
            ]
        );
        assert_eq!(subject_cn(&issued.cert_pem), "ns/default/svc/reviews");
        let der = crate::cert::first_cert_der("t", &issued.cert_pem).unwrap();
        let x509 = parse_cert("t", &der).unwrap();
        assert!(!x509.basic_constraints().unwrap().unwrap().value.ca);
        // The certificate carries the CSR's key.
        assert_eq!(
            x509.public_key().subject_public_key.data.as_ref(),
            key.der_bytes()
        );
        let eku = x509.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth && eku.value.client_auth);
    }

    #[test]
    fn sign_csr_from_generate_csr() {
        let ca = Ca::create(crate::DEFAULT_TRUST_DOMAIN).unwrap();
        let (csr_pem, key_pem) = generate_csr().unwrap();
        assert!(csr_pem.contains("BEGIN CERTIFICATE REQUEST"));
        let identity = Identity::Workload {
            namespace: "shop".into(),
            service: "cart".into(),
        };
        let issued = ca
            .sign_csr(&csr_pem, &identity, &[], WORKLOAD_CERT_VALIDITY)
            .unwrap();
        assert_eq!(issued.info.identity, identity);
        let key = KeyPair::from_pem(&key_pem).unwrap();
        let der = crate::cert::first_cert_der("t", &issued.cert_pem).unwrap();
        let x509 = parse_cert("t", &der).unwrap();
        assert_eq!(
            x509.public_key().subject_public_key.data.as_ref(),
            key.der_bytes()
        );
        // Invalid identities are refused even with a good CSR.
        let bad = Identity::Workload {
            namespace: "Shop".into(),
            service: "cart".into(),
        };
        assert!(ca
            .sign_csr(&csr_pem, &bad, &[], WORKLOAD_CERT_VALIDITY)
            .is_err());
    }

    #[test]
    fn sign_csr_refuses_broken_signature_and_garbage() {
        let ca = Ca::create(crate::DEFAULT_TRUST_DOMAIN).unwrap();
        let identity = Identity::Workload {
            namespace: "default".into(),
            service: "reviews".into(),
        };
        let err = ca
            .sign_csr("garbage", &identity, &[], WORKLOAD_CERT_VALIDITY)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "CSR: not valid PEM (expected a CERTIFICATE REQUEST block: none found)"
        );
        // A certificate is not a CSR.
        let err = ca
            .sign_csr(ca.cert_pem(), &identity, &[], WORKLOAD_CERT_VALIDITY)
            .unwrap_err();
        assert!(err.to_string().starts_with("CSR: not valid PEM"), "{err}");
        // Valid PEM, not a CSR inside.
        let junk =
            "-----BEGIN CERTIFICATE REQUEST-----\nAAECAw==\n-----END CERTIFICATE REQUEST-----\n";
        let err = ca
            .sign_csr(junk, &identity, &[], WORKLOAD_CERT_VALIDITY)
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("CSR: not a valid PKCS#10 certification request"),
            "{err}"
        );

        // Flip one bit of the signature (the last byte of the DER).
        let (csr_pem, _) = generate_csr().unwrap();
        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).unwrap();
        let mut bytes = der.as_ref().to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        let tampered = pem_encode("CERTIFICATE REQUEST", &bytes);
        let err = ca
            .sign_csr(&tampered, &identity, &[], WORKLOAD_CERT_VALIDITY)
            .unwrap_err();
        assert!(matches!(err, IdentityError::CsrSignature), "{err}");

        // Replace the public key with another key's: the signature no longer matches.
        let (other_pem, _) = generate_csr().unwrap();
        let other = CertificateSigningRequestDer::from_pem_slice(other_pem.as_bytes()).unwrap();
        let (_, a) = X509CertificationRequest::from_der(&der).unwrap();
        let (_, b) = X509CertificationRequest::from_der(&other).unwrap();
        let a_key = a.certification_request_info.subject_pki.raw.to_vec();
        let b_key = b.certification_request_info.subject_pki.raw.to_vec();
        assert_eq!(a_key.len(), b_key.len());
        let mut swapped = der.as_ref().to_vec();
        let pos = swapped
            .windows(a_key.len())
            .position(|w| w == a_key.as_slice())
            .unwrap();
        swapped[pos..pos + b_key.len()].copy_from_slice(&b_key);
        let err = ca
            .sign_csr(
                &pem_encode("CERTIFICATE REQUEST", &swapped),
                &identity,
                &[],
                WORKLOAD_CERT_VALIDITY,
            )
            .unwrap_err();
        assert!(matches!(err, IdentityError::CsrSignature), "{err}");
    }

    fn pem_encode(label: &str, der: &[u8]) -> String {
        // Minimal base64 for tests.
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut b64 = String::new();
        for chunk in der.chunks(3) {
            let n = match chunk.len() {
                3 => (u32::from(chunk[0]) << 16) | (u32::from(chunk[1]) << 8) | u32::from(chunk[2]),
                2 => (u32::from(chunk[0]) << 16) | (u32::from(chunk[1]) << 8),
                _ => u32::from(chunk[0]) << 16,
            };
            let idx = |shift: u32| char::from(T[((n >> shift) & 63) as usize]);
            b64.push(idx(18));
            b64.push(idx(12));
            b64.push(if chunk.len() > 1 { idx(6) } else { '=' });
            b64.push(if chunk.len() > 2 { idx(0) } else { '=' });
        }
        let mut out = format!("-----BEGIN {label}-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap());
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
        out
    }
}
