//! Shared validation helpers: the error collector and the rules for names,
//! labels, header names, HTTP methods, ports and percentages that several
//! kinds use. Each kind's module holds its own rules and calls these.

use std::collections::BTreeMap;
use std::fmt;

use crate::duration::Duration;

/// One problem with one field of a resource, found by `Resource::validate`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Where in the document, like `spec.http[0].route` (dotted keys,
    /// `[i]` for list items, map keys as written).
    pub path: String,
    /// What is wrong, in words an operator can act on.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for FieldError {}

/// Collects every problem instead of stopping at the first.
#[derive(Debug, Default)]
pub(crate) struct Errors(pub(crate) Vec<FieldError>);

impl Errors {
    pub(crate) fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// Longest DNS-1123 label (RFC 1123 section 2.1).
const MAX_DNS_LABEL: usize = 63;

/// True if `s` is a DNS-1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at
/// most 63 characters.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_DNS_LABEL
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && b.first() != Some(&b'-')
        && b.last() != Some(&b'-')
}

/// Checks a name that must be a DNS-1123 label; `what` names it in the
/// message ("name", "service", "subset", ...).
pub(crate) fn dns_label(errs: &mut Errors, path: &str, what: &str, value: &str) {
    if value.is_empty() {
        errs.add(path, format!("{what} must not be empty"));
    } else if !is_dns_label(value) {
        errs.add(
            path,
            format!(
                "invalid {what} {value:?}: must be a DNS-1123 label (lowercase letters, digits and '-', \
                 starting and ending with a letter or digit, at most 63 characters)"
            ),
        );
    }
}

/// Kubernetes' "qualified name" segment: `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, ≤ 63.
fn is_label_segment(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_DNS_LABEL
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// DNS-1123 subdomain (label key prefix): dot-separated labels, ≤ 253.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A label key as in Kubernetes: `[prefix/]name`, the prefix a DNS
/// subdomain, the name a qualified-name segment.
pub(crate) fn is_label_key(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_segment(name),
        None => is_label_segment(s),
    }
}

/// A label value as in Kubernetes: empty or a qualified-name segment.
pub(crate) fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_label_segment(s)
}

/// Checks every key and value of a label map.
pub(crate) fn labels(errs: &mut Errors, path: &str, map: &BTreeMap<String, String>) {
    for (k, v) in map {
        if !is_label_key(k) {
            errs.add(
                path,
                format!(
                    "invalid label key {k:?}: expected [prefix/]name, the name up to 63 letters, digits, \
                     '-', '_' or '.', starting and ending with a letter or digit"
                ),
            );
        } else if !is_label_value(v) {
            errs.add(
                format!("{path}.{k}"),
                format!(
                    "invalid label value {v:?}: expected up to 63 letters, digits, '-', '_' or '.', \
                     starting and ending with a letter or digit"
                ),
            );
        }
    }
}

/// Same as [`labels`] but the map must not be empty.
pub(crate) fn non_empty_labels(errs: &mut Errors, path: &str, map: &BTreeMap<String, String>) {
    if map.is_empty() {
        errs.add(path, "at least one label is required");
    }
    labels(errs, path, map);
}

/// An HTTP header name as Trellis stores it: an RFC 9110 token in lower case
/// (HTTP/2 and HTTP/3 require lower-case names on the wire).
pub fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.bytes().all(|c| {
            c.is_ascii_lowercase()
                || c.is_ascii_digit()
                || matches!(
                    c,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

pub(crate) fn header_name(errs: &mut Errors, path: &str, name: &str) {
    if !is_header_name(name) {
        errs.add(
            path,
            format!("invalid header name {name:?}: expected a lower-case HTTP token (e.g. x-request-id)"),
        );
    }
}

/// Header values may not carry control characters (CR/LF would split the
/// header; NUL is rejected by every HTTP stack). Tab is allowed.
pub(crate) fn header_value(errs: &mut Errors, path: &str, value: &str) {
    if value.chars().any(|c| c.is_control() && c != '\t') {
        errs.add(path, "header values must not contain control characters");
    }
}

/// Longest HTTP method token accepted.
const MAX_METHOD_LEN: usize = 32;

/// An HTTP method as written in matches: an upper-case token (`GET`,
/// `POST`, or an extension method like `PROPFIND`).
pub fn is_http_method(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_METHOD_LEN
        && s.bytes()
            .all(|c| c.is_ascii_uppercase() || c == b'-' || c == b'_')
}

/// Checks a list of methods: each an upper-case token, no repeats.
pub(crate) fn methods(errs: &mut Errors, path: &str, list: &[String]) {
    for (i, m) in list.iter().enumerate() {
        let p = format!("{path}[{i}]");
        if !is_http_method(m) {
            errs.add(
                p,
                format!(
                    "invalid method {m:?}: expected an upper-case HTTP method such as GET or POST"
                ),
            );
        } else if list[..i].contains(m) {
            errs.add(p, format!("method {m} is listed twice"));
        }
    }
}

/// Ports are `u16`; zero is the only invalid value left.
pub(crate) fn port(errs: &mut Errors, path: &str, port: u16) {
    if port == 0 {
        errs.add(path, "port must be in 1..=65535, got 0");
    }
}

/// A percentage: finite and within 0..=100.
pub(crate) fn percent(errs: &mut Errors, path: &str, value: f64) {
    if !(0.0..=100.0).contains(&value) {
        errs.add(path, format!("must be in 0..=100, got {value}"));
    }
}

/// A duration that must be greater than zero.
pub(crate) fn positive_duration(errs: &mut Errors, path: &str, value: Duration) {
    if value.is_zero() {
        errs.add(path, "must be greater than 0s");
    }
}

/// Reports every item of `items` whose key repeats an earlier one.
pub(crate) fn unique<T, K: PartialEq>(
    errs: &mut Errors,
    items: &[T],
    key: impl Fn(&T) -> K,
    path_of: impl Fn(usize) -> String,
    message: impl Fn(&T, usize) -> String,
) {
    for (i, item) in items.iter().enumerate() {
        let k = key(item);
        if let Some(first) = items[..i].iter().position(|other| key(other) == k) {
            errs.add(path_of(i), message(item, first));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for ok in ["a", "ratings", "v1", "a-b", "0", &"a".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "é", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }

    #[test]
    fn label_keys_and_values() {
        assert!(is_label_key("version"));
        assert!(is_label_key("app.kubernetes.io/name"));
        assert!(is_label_key("Zone_1"));
        assert!(!is_label_key("/name"));
        assert!(!is_label_key("a/b/c"));
        assert!(!is_label_key("-x"));
        assert!(is_label_value(""));
        assert!(is_label_value("us-east-1a"));
        assert!(!is_label_value("has space"));
    }

    #[test]
    fn header_names_and_methods() {
        assert!(is_header_name("end-user"));
        assert!(is_header_name("x-b3-traceid"));
        assert!(!is_header_name("End-User"));
        assert!(!is_header_name("a b"));
        assert!(!is_header_name(":authority"));
        assert!(!is_header_name(""));
        assert!(is_http_method("GET"));
        assert!(is_http_method("PROPFIND"));
        assert!(!is_http_method("get"));
        assert!(!is_http_method(""));
    }
}
