//! `cert.rs`: reading certificates. [`CertInfo`] (what a certificate says
//! about itself), [`cert_info`] for PEM files, [`peer_cert_info`] for the
//! DER chain of a verified TLS/QUIC peer, and the PEM/DER helpers the other
//! modules share.
//!
//! Nothing here verifies a signature or a chain: that is the TLS layer's
//! job (see `tls.rs`). Use [`peer_cert_info`] only on chains rustls has
//! already verified against the cluster CA.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::error::IdentityError;
use crate::spiffe::{Identity, SPIFFE_SCHEME};

/// What a certificate says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertInfo {
    /// Serial number, lower-case hex, no separators, no leading zero bytes.
    pub serial: String,
    /// The identity from the certificate's SPIFFE URI SAN.
    pub identity: Identity,
    /// The trust domain from the certificate's SPIFFE URI SAN.
    pub trust_domain: String,
    /// The SPIFFE URI SAN itself.
    pub spiffe_id: String,
    /// notBefore, Unix milliseconds (certificates have 1 s resolution).
    pub not_before_unix_ms: u64,
    /// notAfter, Unix milliseconds (certificates have 1 s resolution).
    pub not_after_unix_ms: u64,
}

/// A newly issued certificate.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The certificate, PEM (one `CERTIFICATE` block).
    pub cert_pem: String,
    /// What the certificate says, read back from it.
    pub info: CertInfo,
}

/// Read a PEM certificate's serial, SPIFFE identity and validity.
///
/// If the PEM holds a chain, the first certificate (the leaf) is read.
pub fn cert_info(cert_pem: &str) -> Result<CertInfo, IdentityError> {
    let der = first_cert_der("certificate", cert_pem)?;
    info_from_der(&der)
}

/// Same as [`cert_info`], from DER: what rustls / quinn give for a verified
/// peer (`conn.peer_identity()` downcast to `Vec<CertificateDer<'static>>`,
/// or `ServerConnection::peer_certificates()`). The first certificate (the
/// leaf) is read.
pub fn peer_cert_info(chain: &[CertificateDer<'_>]) -> Result<CertInfo, IdentityError> {
    let leaf = chain.first().ok_or(IdentityError::NoPeerCertificate)?;
    info_from_der(leaf)
}

fn info_from_der(der: &[u8]) -> Result<CertInfo, IdentityError> {
    let x509 = parse_cert("certificate", der)?;
    let spiffe_id = single_spiffe_uri(&x509)?;
    let (trust_domain, identity) = Identity::parse_spiffe(spiffe_id)?;
    let validity = x509.validity();
    let not_before_unix_ms = unix_ms(validity.not_before.timestamp(), "notBefore")?;
    let not_after_unix_ms = unix_ms(validity.not_after.timestamp(), "notAfter")?;
    Ok(CertInfo {
        serial: serial_hex(x509.raw_serial()),
        identity,
        trust_domain,
        spiffe_id: spiffe_id.to_owned(),
        not_before_unix_ms,
        not_after_unix_ms,
    })
}

fn unix_ms(secs: i64, which: &'static str) -> Result<u64, IdentityError> {
    u64::try_from(secs)
        .ok()
        .and_then(|s| s.checked_mul(1000))
        .ok_or(IdentityError::CertTime(which))
}

/// Serial bytes as lower-case hex without leading zero bytes (DER adds one
/// to keep positive integers positive).
pub(crate) fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|&b| b != 0).unwrap_or(raw.len());
    match raw.get(start..) {
        Some(bytes) if !bytes.is_empty() => hex(bytes),
        _ => "00".to_owned(),
    }
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// The URI SANs of a certificate that use the `spiffe` scheme (compared
/// case-insensitively, so a mis-cased ID gets a precise error from
/// [`Identity::parse_spiffe`] instead of "no SPIFFE ID").
pub(crate) fn spiffe_uris<'a>(x509: &X509Certificate<'a>) -> Result<Vec<&'a str>, IdentityError> {
    let san = x509
        .subject_alternative_name()
        .map_err(|e| IdentityError::Der {
            what: "certificate",
            structure: "subjectAltName extension",
            reason: e.to_string(),
        })?;
    let Some(san) = san else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .filter(|uri| {
            uri.get(..SPIFFE_SCHEME.len())
                .is_some_and(|scheme| scheme.eq_ignore_ascii_case(SPIFFE_SCHEME))
        })
        .collect())
}

fn single_spiffe_uri<'a>(x509: &X509Certificate<'a>) -> Result<&'a str, IdentityError> {
    match spiffe_uris(x509)?.as_slice() {
        [] => Err(IdentityError::NoSpiffeId),
        [one] => Ok(one),
        more => Err(IdentityError::MultipleSpiffeIds(more.len())),
    }
}

/// Parse DER as an X.509 certificate; trailing bytes are an error.
pub(crate) fn parse_cert<'a>(
    what: &'static str,
    der: &'a [u8],
) -> Result<X509Certificate<'a>, IdentityError> {
    let (rest, x509) = X509Certificate::from_der(der).map_err(|e| IdentityError::Der {
        what,
        structure: "X.509 certificate",
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(IdentityError::Der {
            what,
            structure: "X.509 certificate",
            reason: format!("{} trailing bytes after the certificate", rest.len()),
        });
    }
    Ok(x509)
}

/// Every `CERTIFICATE` block of a PEM input, in order; at least one.
pub(crate) fn cert_chain_der(
    what: &'static str,
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, "CERTIFICATE", e))?;
    if certs.is_empty() {
        return Err(pem_error(
            what,
            "CERTIFICATE",
            rustls::pki_types::pem::Error::NoItemsFound,
        ));
    }
    Ok(certs)
}

/// The first `CERTIFICATE` block of a PEM input.
pub(crate) fn first_cert_der(
    what: &'static str,
    pem: &str,
) -> Result<CertificateDer<'static>, IdentityError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| pem_error(what, "CERTIFICATE", e))
}

pub(crate) fn pem_error(
    what: &'static str,
    label: &'static str,
    e: rustls::pki_types::pem::Error,
) -> IdentityError {
    let reason = match e {
        rustls::pki_types::pem::Error::NoItemsFound => "none found".to_owned(),
        other => other.to_string(),
    };
    IdentityError::Pem {
        what,
        label,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_hex_strips_sign_byte() {
        assert_eq!(serial_hex(&[0x00, 0x80, 0x01]), "8001");
        assert_eq!(serial_hex(&[0x7f]), "7f");
        assert_eq!(serial_hex(&[0x00]), "00");
        assert_eq!(serial_hex(&[]), "00");
    }

    #[test]
    fn garbage_pem_is_refused_with_a_clear_error() {
        let err = cert_info("not a certificate").unwrap_err();
        assert_eq!(
            err.to_string(),
            "certificate: not valid PEM (expected a CERTIFICATE block: none found)"
        );
        let bad_der = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let err = cert_info(bad_der).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("certificate: not a valid X.509 certificate"),
            "{err}"
        );
        assert!(matches!(
            peer_cert_info(&[]),
            Err(IdentityError::NoPeerCertificate)
        ));
    }
}
