//! `kind: AccessPolicy` — allow or deny requests by who is calling (SPIFFE
//! identity, service, namespace, labels), which service is called, the
//! method and the path.
//!
//! **Evaluation** for a request to a service in namespace `N`, over every
//! AccessPolicy in `N`:
//!
//! 1. If any `deny` rule matches, the request is denied. **Deny wins**: no
//!    allow rule, in any policy, can override a matching deny.
//! 2. Otherwise, if any `allow` rule matches, it is allowed.
//! 3. Otherwise the namespace default applies: the `defaultAction` of the
//!    (at most one) AccessPolicy in `N` that sets it, else
//!    [`DEFAULT_NAMESPACE_ACTION`].
//!
//! A rule matches when every one of its non-empty lists matches: any of its
//! `sources`, any of its `destinations`, any of its `methods`, any of its
//! `paths` (an empty list matches anything).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::matching::StringMatch;
use crate::validate::{self, Errors};

/// What happens in a namespace where no AccessPolicy sets `defaultAction`
/// and no rule matches: allow. Adopting the mesh must not cut existing
/// traffic; a namespace opts into default-deny by setting
/// `defaultAction: deny`.
pub const DEFAULT_NAMESPACE_ACTION: Action = Action::Allow;

/// Identities are SPIFFE IDs.
pub const SPIFFE_SCHEME: &str = "spiffe://";

/// Allow or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let the request through.
    Allow,
    /// Answer 403 (gRPC PERMISSION_DENIED).
    Deny,
}

/// The `spec` of an AccessPolicy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessPolicySpec {
    /// The namespace's default action when no rule matches; at most one
    /// AccessPolicy per namespace may set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_action: Option<Action>,
    /// The rules; order does not matter (deny wins).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<AccessRule>,
}

/// One allow or deny rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessRule {
    /// Optional name (DNS-1123 label, unique in the policy), shown in
    /// telemetry and denial logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What to do when the rule matches.
    pub action: Action,
    /// Callers, any of; empty means any caller.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<Source>,
    /// Called services (names in this namespace), any of; empty means any
    /// service in the namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<String>,
    /// Methods (upper case), any of; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Request paths, any of; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<StringMatch>,
}

/// A caller. At least one field is set; all set fields must match (e.g.
/// `service: reviews` with `labels: {version: v3}` is reviews' v3 instances).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// The caller's SPIFFE ID from its mTLS certificate,
    /// `spiffe://<trust-domain>/ns/<namespace>/svc/<service>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The calling service's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The calling service's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels the calling instance carries (all of them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Longest identity accepted (SPIFFE caps IDs at 2048 bytes).
const MAX_IDENTITY_LEN: usize = 2048;

/// Why `id` is not a SPIFFE ID: `spiffe://` + trust domain (lower-case
/// letters, digits, `.`, `-`, `_`) + a non-empty path of segments made of
/// letters, digits, `.`, `-`, `_`, none of them `.` or `..`.
fn spiffe_problem(id: &str) -> Option<&'static str> {
    if id.len() > MAX_IDENTITY_LEN {
        return Some("longer than 2048 bytes");
    }
    let Some(rest) = id.strip_prefix(SPIFFE_SCHEME) else {
        return Some("must start with spiffe://");
    };
    let (domain, path) = match rest.split_once('/') {
        Some((d, p)) => (d, p),
        None => (rest, ""),
    };
    if domain.is_empty()
        || !domain.bytes().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'_')
        })
    {
        return Some("the trust domain must be lower-case letters, digits, '.', '-' or '_'");
    }
    if path.is_empty() {
        return Some("a workload path is required after the trust domain");
    }
    let segment_ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'))
    };
    if !path.split('/').all(segment_ok) {
        return Some(
            "path segments must be non-empty letters, digits, '.', '-' or '_' (no '.' or '..')",
        );
    }
    None
}

impl AccessPolicySpec {
    pub(crate) fn validate(&self, errs: &mut Errors) {
        if self.default_action.is_none() && self.rules.is_empty() {
            errs.add("spec", "at least one rule or a defaultAction is required");
        }
        for (i, r) in self.rules.iter().enumerate() {
            let p = format!("spec.rules[{i}]");
            if let Some(n) = &r.name {
                validate::dns_label(errs, &format!("{p}.name"), "rule name", n);
                if let Some(first) = self.rules[..i]
                    .iter()
                    .position(|o| o.name.as_ref() == Some(n))
                {
                    errs.add(
                        format!("{p}.name"),
                        format!("rule name {n:?} is already used by spec.rules[{first}]"),
                    );
                }
            }
            for (j, s) in r.sources.iter().enumerate() {
                s.validate(errs, &format!("{p}.sources[{j}]"));
            }
            for (j, d) in r.destinations.iter().enumerate() {
                validate::dns_label(errs, &format!("{p}.destinations[{j}]"), "service", d);
            }
            validate::methods(errs, &format!("{p}.methods"), &r.methods);
            for (j, m) in r.paths.iter().enumerate() {
                m.validate(errs, &format!("{p}.paths[{j}]"));
            }
        }
    }
}

impl Source {
    fn validate(&self, errs: &mut Errors, path: &str) {
        if *self == Source::default() {
            errs.add(
                path,
                "at least one of `identity`, `service`, `namespace` or `labels` is required",
            );
        }
        if let Some(id) = &self.identity {
            if let Some(problem) = spiffe_problem(id) {
                errs.add(
                    format!("{path}.identity"),
                    format!("invalid SPIFFE ID {id:?}: {problem}"),
                );
            }
        }
        if let Some(s) = &self.service {
            validate::dns_label(errs, &format!("{path}.service"), "service", s);
        }
        if let Some(n) = &self.namespace {
            validate::dns_label(errs, &format!("{path}.namespace"), "namespace", n);
        }
        validate::labels(errs, &format!("{path}.labels"), &self.labels);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids() {
        assert_eq!(
            spiffe_problem("spiffe://cluster.local/ns/default/svc/reviews"),
            None
        );
        assert!(spiffe_problem("https://x/y").is_some());
        assert!(spiffe_problem("spiffe://").is_some());
        assert!(spiffe_problem("spiffe://Example/x").is_some());
        assert!(spiffe_problem("spiffe://td").is_some());
        assert!(spiffe_problem("spiffe://td/").is_some());
        assert!(spiffe_problem("spiffe://td/a//b").is_some());
        assert!(spiffe_problem("spiffe://td/a/../b").is_some());
    }
}
