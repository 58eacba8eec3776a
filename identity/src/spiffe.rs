//! `spiffe.rs`: [`Identity`] and its SPIFFE ID form, plus the name rules
//! shared by every issuer (trust domains, node ids, admin names, namespaces,
//! services).
//!
//! Parsing is strict so that `parse_spiffe(to_spiffe(x)) == x` exactly and
//! two spellings can never name the same peer (no upper case, no leading
//! zeros, no empty or extra path segments, no query or fragment).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{echo, IdentityError};

/// The trust domain used when an operator does not choose one: `.local` is
/// reserved for private use, so it can never collide with a public domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "trellis.local";

/// The URI scheme of every SPIFFE ID.
pub const SPIFFE_SCHEME: &str = "spiffe://";

/// Longest SPIFFE ID accepted, in bytes: the limit the SPIFFE ID
/// specification asks every implementation to support.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Longest trust domain, admin name, namespace or service name accepted:
/// the maximum length of a DNS name, which every such name may become.
pub const MAX_NAME_LEN: usize = 253;

/// Who a certificate belongs to.
///
/// The order (`Ord`) is: nodes, then admins, then workloads; within a kind,
/// by the fields in order. It exists so identities can key sorted maps.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Identity {
    /// A `trellisd` node (Raft member / control plane / data plane host).
    Node {
        /// The node id, > 0.
        id: u64,
    },
    /// An operator or tool (`trellisctl`).
    Admin {
        /// The admin's name: `[a-z0-9_]([-a-z0-9._]*[a-z0-9_])?`.
        name: String,
    },
    /// A service's sidecar.
    Workload {
        /// The namespace: `[a-z0-9]([-a-z0-9.]*[a-z0-9])?`.
        namespace: String,
        /// The service: `[a-z0-9]([-a-z0-9.]*[a-z0-9])?`.
        service: String,
    },
}

impl Identity {
    /// `spiffe://<td>/node/<id>`, `spiffe://<td>/admin/<name>`,
    /// `spiffe://<td>/ns/<ns>/svc/<svc>`.
    ///
    /// This only formats; use [`Identity::validate`] (or
    /// [`Identity::parse_spiffe`] on the result) to check the names.
    pub fn to_spiffe(&self, trust_domain: &str) -> String {
        format!("{SPIFFE_SCHEME}{trust_domain}/{self}")
    }

    /// Inverse of [`Identity::to_spiffe`]; returns `(trust_domain, identity)`.
    ///
    /// Strict: exactly the three path shapes above; trust domain, namespace
    /// and service match `[a-z0-9]([-a-z0-9.]*[a-z0-9])?` (admin names may
    /// also contain `_`), at most [`MAX_NAME_LEN`] bytes; the node id is a
    /// decimal `u64` > 0 without leading zeros; the whole ID is at most
    /// [`MAX_SPIFFE_ID_LEN`] bytes.
    pub fn parse_spiffe(uri: &str) -> Result<(String, Identity), IdentityError> {
        let bad = |reason: &str| IdentityError::InvalidSpiffeId {
            uri: echo(uri),
            reason: reason.to_owned(),
        };
        if uri.len() > MAX_SPIFFE_ID_LEN {
            return Err(bad("longer than 2048 bytes"));
        }
        let rest = uri
            .strip_prefix(SPIFFE_SCHEME)
            .ok_or_else(|| bad("must start with spiffe://"))?;
        let (trust_domain, path) = rest.split_once('/').ok_or_else(|| {
            bad("has no path (spiffe://<trust domain> alone names a trust domain, not a peer)")
        })?;
        check_trust_domain(trust_domain).map_err(|e| bad(&e.to_string()))?;
        let segments: Vec<&str> = path.split('/').collect();
        let identity =
            match segments.as_slice() {
                ["node", id] => Identity::Node {
                    id: parse_node_id(id).map_err(|e| bad(&e.to_string()))?,
                },
                ["admin", name] => {
                    check_name("admin name", name, true).map_err(|e| bad(&e.to_string()))?;
                    Identity::Admin {
                        name: (*name).to_owned(),
                    }
                }
                ["ns", namespace, "svc", service] => {
                    check_name("namespace", namespace, false).map_err(|e| bad(&e.to_string()))?;
                    check_name("service name", service, false).map_err(|e| bad(&e.to_string()))?;
                    Identity::Workload {
                        namespace: (*namespace).to_owned(),
                        service: (*service).to_owned(),
                    }
                }
                _ => return Err(bad(
                    "path must be exactly node/<id>, admin/<name> or ns/<namespace>/svc/<service>",
                )),
            };
        Ok((trust_domain.to_owned(), identity))
    }

    /// Check the names in this identity against the rules of
    /// [`Identity::parse_spiffe`] (node id > 0, lower-case DNS-label-ish
    /// names). Every issuing function calls this first.
    pub fn validate(&self) -> Result<(), IdentityError> {
        match self {
            Identity::Node { id } => {
                if *id == 0 {
                    return Err(IdentityError::InvalidName {
                        what: "node id",
                        value: "0".to_owned(),
                        reason: "node ids start at 1".to_owned(),
                    });
                }
                Ok(())
            }
            Identity::Admin { name } => check_name("admin name", name, true),
            Identity::Workload { namespace, service } => {
                check_name("namespace", namespace, false)?;
                check_name("service name", service, false)
            }
        }
    }
}

/// `node/1`, `admin/ops`, `ns/default/svc/reviews`: the SPIFFE path without
/// the leading `/`.
impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Node { id } => write!(f, "node/{id}"),
            Identity::Admin { name } => write!(f, "admin/{name}"),
            Identity::Workload { namespace, service } => write!(f, "ns/{namespace}/svc/{service}"),
        }
    }
}

/// Check a trust domain: `[a-z0-9]([-a-z0-9.]*[a-z0-9])?`, at most
/// [`MAX_NAME_LEN`] bytes.
pub fn check_trust_domain(trust_domain: &str) -> Result<(), IdentityError> {
    check_name("trust domain", trust_domain, false)
}

/// Read the trust domain out of a CA's `spiffe://<td>` URI (no path).
pub(crate) fn parse_trust_domain_uri(uri: &str) -> Result<String, IdentityError> {
    let bad = |reason: &str| IdentityError::InvalidSpiffeId {
        uri: echo(uri),
        reason: reason.to_owned(),
    };
    let td = uri
        .strip_prefix(SPIFFE_SCHEME)
        .ok_or_else(|| bad("must start with spiffe://"))?;
    if td.contains('/') {
        return Err(bad(
            "a CA's SPIFFE ID names its trust domain only: spiffe://<trust domain>, no path",
        ));
    }
    check_trust_domain(td).map_err(|e| bad(&e.to_string()))?;
    Ok(td.to_owned())
}

fn parse_node_id(s: &str) -> Result<u64, IdentityError> {
    let bad = |reason: &str| IdentityError::InvalidName {
        what: "node id",
        value: echo(s),
        reason: reason.to_owned(),
    };
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("must be decimal digits only"));
    }
    if s.starts_with('0') {
        return Err(bad("must be > 0 and have no leading zeros"));
    }
    s.parse::<u64>().map_err(|_| bad("does not fit in 64 bits"))
}

/// `[a-z0-9]([-a-z0-9.]*[a-z0-9])?`; with `underscore`, `_` is also allowed
/// anywhere.
fn check_name(what: &'static str, s: &str, underscore: bool) -> Result<(), IdentityError> {
    let bad = |reason: &str| IdentityError::InvalidName {
        what,
        value: echo(s),
        reason: reason.to_owned(),
    };
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if s.len() > MAX_NAME_LEN {
        return Err(bad("longer than 253 bytes"));
    }
    let edge_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || (underscore && b == b'_');
    let inner_ok = |b: u8| edge_ok(b) || b == b'-' || b == b'.';
    let rule = if underscore {
        "must match [a-z0-9_]([-a-z0-9._]*[a-z0-9_])? (lower case)"
    } else {
        "must match [a-z0-9]([-a-z0-9.]*[a-z0-9])? (lower case)"
    };
    let bytes = s.as_bytes();
    let first_last_ok = match (bytes.first(), bytes.last()) {
        (Some(&first), Some(&last)) => edge_ok(first) && edge_ok(last),
        _ => false,
    };
    if !first_last_ok || !bytes.iter().all(|&b| inner_ok(b)) {
        return Err(bad(rule));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_round_trips() {
        let cases = [
            Identity::Node { id: 1 },
            Identity::Node { id: u64::MAX },
            Identity::Admin { name: "ops".into() },
            Identity::Admin {
                name: "_svc_ci.bot-1".into(),
            },
            Identity::Workload {
                namespace: "default".into(),
                service: "reviews".into(),
            },
            Identity::Workload {
                namespace: "a".into(),
                service: "x.y-z9".into(),
            },
        ];
        for id in cases {
            id.validate().unwrap();
            let uri = id.to_spiffe(DEFAULT_TRUST_DOMAIN);
            let (td, back) = Identity::parse_spiffe(&uri).unwrap();
            assert_eq!(td, DEFAULT_TRUST_DOMAIN);
            assert_eq!(back, id, "{uri}");
        }
        assert_eq!(
            Identity::Workload {
                namespace: "default".into(),
                service: "reviews".into()
            }
            .to_spiffe("example.org"),
            "spiffe://example.org/ns/default/svc/reviews"
        );
    }

    #[test]
    fn display_is_the_path() {
        assert_eq!(Identity::Node { id: 1 }.to_string(), "node/1");
        assert_eq!(
            Identity::Admin { name: "ops".into() }.to_string(),
            "admin/ops"
        );
        assert_eq!(
            Identity::Workload {
                namespace: "default".into(),
                service: "reviews".into()
            }
            .to_string(),
            "ns/default/svc/reviews"
        );
    }

    #[test]
    fn parse_spiffe_rejects_bad_shapes() {
        let long_name = "a".repeat(MAX_NAME_LEN + 1);
        let too_long_uri = format!("spiffe://td/admin/{long_name}");
        let bad = [
            "",
            "spiffe://",
            "spiffe://trellis.local",
            "spiffe://trellis.local/",
            "https://trellis.local/node/1",
            "SPIFFE://trellis.local/node/1",
            "spiffe:/trellis.local/node/1",
            "spiffe://Trellis.local/node/1",
            "spiffe://trellis.local/Node/1",
            "spiffe://trellis.local/node/0",
            "spiffe://trellis.local/node/01",
            "spiffe://trellis.local/node/+1",
            "spiffe://trellis.local/node/-1",
            "spiffe://trellis.local/node/18446744073709551616",
            "spiffe://trellis.local/node/",
            "spiffe://trellis.local/node/1/",
            "spiffe://trellis.local/node/1/extra",
            "spiffe://trellis.local//node/1",
            "spiffe://trellis.local/admin/",
            "spiffe://trellis.local/admin/Ops",
            "spiffe://trellis.local/admin/-ops",
            "spiffe://trellis.local/admin/ops?x=1",
            "spiffe://trellis.local/admin/ops#frag",
            "spiffe://trellis.local/ns/default/svc/",
            "spiffe://trellis.local/ns//svc/reviews",
            "spiffe://trellis.local/ns/default/svc/reviews/extra",
            "spiffe://trellis.local/ns/default/service/reviews",
            "spiffe://trellis.local/ns/Default/svc/reviews",
            "spiffe://trellis.local/ns/default/svc/re_views",
            "spiffe://trellis.local/ns/default-/svc/reviews",
            "spiffe://trellis.local/ns/default/svc/.reviews",
            "spiffe://trel lis/node/1",
            "spiffe://user@trellis.local/node/1",
            "spiffe://trellis.local:443/node/1",
            &too_long_uri,
        ];
        for uri in bad {
            let err = Identity::parse_spiffe(uri).unwrap_err();
            assert!(
                matches!(err, IdentityError::InvalidSpiffeId { .. }),
                "{uri}: {err}"
            );
        }
        let huge = format!("spiffe://td/admin/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        let msg = Identity::parse_spiffe(&huge).unwrap_err().to_string();
        assert!(msg.contains("2048"), "{msg}");
        assert!(msg.len() < 400, "error echoes a bounded prefix: {msg}");
    }

    #[test]
    fn validate_rejects_bad_names() {
        assert!(Identity::Node { id: 0 }.validate().is_err());
        assert!(Identity::Admin { name: "OPS".into() }.validate().is_err());
        assert!(Identity::Workload {
            namespace: "default".into(),
            service: "a/b".into()
        }
        .validate()
        .is_err());
        assert!(check_trust_domain("").is_err());
        assert!(check_trust_domain("trellis.local").is_ok());
    }

    #[test]
    fn trust_domain_uri() {
        assert_eq!(
            parse_trust_domain_uri("spiffe://trellis.local").unwrap(),
            "trellis.local"
        );
        assert!(parse_trust_domain_uri("spiffe://trellis.local/").is_err());
        assert!(parse_trust_domain_uri("spiffe://trellis.local/node/1").is_err());
        assert!(parse_trust_domain_uri("spiffe://").is_err());
    }
}
