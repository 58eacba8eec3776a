//! Cross-resource checks for a set of resources about to be applied
//! together ([`check_references`]).

use std::collections::BTreeMap;

use crate::document::{DocError, Kind, Resource, Spec};
use crate::policy::DestinationPolicySpec;

/// Checks what no single resource can: for a set about to be applied
/// (each resource with the source it was read from), looking up resources
/// that are not in the set through `lookup` (the store; arguments are
/// kind, namespace, name).
///
/// * Every `subset` a Route destination names (in `route`, `mirror` and
///   `tcp` rules) must be defined by the DestinationPolicy for that
///   destination's service in the Route's namespace. That policy is the one
///   whose `spec.host` is the service: it is searched for in `set` first
///   (any name), then in the store under the naming convention
///   `metadata.name == spec.host` — unless `set` itself holds a resource of
///   that name, which replaces the stored one.
/// * At most one AccessPolicy per namespace may set `defaultAction`. Only
///   checked within `set`: `lookup` cannot list a namespace, so a conflict
///   with a stored policy has to be caught by the caller.
///
/// Errors name the referring resource, its source and the field path, e.g.
/// `spec.http[1].route[0].destination.subset: subset "v4" is not defined in
/// DestinationPolicy default/reviews (defined: v1, v2, v3)`.
pub fn check_references(
    set: &[(String, Resource)],
    lookup: &dyn Fn(Kind, &str, &str) -> Option<Resource>,
) -> Vec<DocError> {
    let mut errors = Vec::new();
    let mut policies: BTreeMap<(String, String), Option<(String, DestinationPolicySpec)>> =
        BTreeMap::new();
    for (source, res) in set {
        let Spec::Route(route) = &res.spec else {
            continue;
        };
        let ns = res.metadata.namespace.as_str();
        for (path, dest) in route.destinations() {
            let Some(subset) = &dest.subset else {
                continue;
            };
            let policy = policies
                .entry((ns.to_string(), dest.service.clone()))
                .or_insert_with(|| find_policy(set, lookup, ns, &dest.service));
            let message = match policy {
                None => Some(format!(
                    "no DestinationPolicy for service {:?} defines subsets",
                    dest.service
                )),
                Some((name, spec)) if spec.subset(subset).is_none() => {
                    let defined = if spec.subsets.is_empty() {
                        "none".to_string()
                    } else {
                        spec.subsets
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    Some(format!(
                        "subset {subset:?} is not defined in DestinationPolicy {ns}/{name} (defined: {defined})"
                    ))
                }
                Some(_) => None,
            };
            if let Some(message) = message {
                errors.push(DocError {
                    source: source.clone(),
                    line: None,
                    column: None,
                    resource: Some(res.display_name()),
                    path: format!("{path}.subset"),
                    message,
                });
            }
        }
    }

    let mut default_setter: BTreeMap<&str, &Resource> = BTreeMap::new();
    for (source, res) in set {
        let Spec::AccessPolicy(ap) = &res.spec else {
            continue;
        };
        if ap.default_action.is_none() {
            continue;
        }
        let ns = res.metadata.namespace.as_str();
        match default_setter.get(ns) {
            Some(first) if first.metadata.name != res.metadata.name => errors.push(DocError {
                source: source.clone(),
                line: None,
                column: None,
                resource: Some(res.display_name()),
                path: "spec.defaultAction".to_string(),
                message: format!(
                    "AccessPolicy {ns}/{} already sets the default action of namespace {ns:?}; \
                     at most one AccessPolicy per namespace may set it",
                    first.metadata.name
                ),
            }),
            Some(_) => {}
            None => {
                default_setter.insert(ns, res);
            }
        }
    }
    errors
}

/// The DestinationPolicy for `service` in `ns`: from `set` by host, else
/// from the store by the naming convention. Returns its name and spec.
fn find_policy(
    set: &[(String, Resource)],
    lookup: &dyn Fn(Kind, &str, &str) -> Option<Resource>,
    ns: &str,
    service: &str,
) -> Option<(String, DestinationPolicySpec)> {
    let in_set = set.iter().find_map(|(_, r)| match &r.spec {
        Spec::DestinationPolicy(p) if r.metadata.namespace == ns && p.host == service => {
            Some((r.metadata.name.clone(), p.clone()))
        }
        _ => None,
    });
    if in_set.is_some() {
        return in_set;
    }
    let replaced_by_set = set.iter().any(|(_, r)| {
        r.kind() == Kind::DestinationPolicy
            && r.metadata.namespace == ns
            && r.metadata.name == service
    });
    if replaced_by_set {
        return None;
    }
    match lookup(Kind::DestinationPolicy, ns, service) {
        Some(Resource {
            metadata,
            spec: Spec::DestinationPolicy(p),
        }) if p.host == service => Some((metadata.name, p)),
        _ => None,
    }
}
