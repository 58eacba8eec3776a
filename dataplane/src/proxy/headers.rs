//! Header rewriting between hops: hop-by-hop headers removed (HTTP/2 forbids
//! them and they describe only one connection), and a Route rule's
//! `headers` edits (`remove` first, then `add`).

use hyper::header::{HeaderName, HeaderValue};
use hyper::HeaderMap;
use trellis_resources::route::HeaderOps;

/// Connection-specific headers (RFC 9110 §7.6.1, RFC 9113 §8.2.2).
/// Parsed once, not per request: removing by `HeaderName` skips parsing
/// the name on every lookup.
static HOP_BY_HOP: [HeaderName; 7] = [
    hyper::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    hyper::header::TRANSFER_ENCODING,
    hyper::header::UPGRADE,
    hyper::header::TE,
    hyper::header::TRAILER,
];

/// Removes hop-by-hop headers and any header the `Connection` header names,
/// except `te: trailers`: HTTP/2 allows exactly that value, and gRPC
/// servers may insist on it.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let te_trailers = h.get_all(hyper::header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    // Empty (no allocation) without a `Connection` header.
    let named: Vec<String> = h
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for n in named {
        h.remove(n.as_str());
    }
    for n in HOP_BY_HOP.iter() {
        h.remove(n);
    }
    if te_trailers {
        h.insert(hyper::header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Applies one direction's edits; names or values that are not valid
/// header text are skipped (validation keeps them out of the config).
pub fn apply(ops: &HeaderOps, h: &mut HeaderMap) {
    for name in &ops.remove {
        h.remove(name.as_str());
    }
    for (name, value) in &ops.add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            h.append(n, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-foo"));
        h.insert("x-foo", HeaderValue::from_static("1"));
        h.insert("x-bar", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-bar"));
        // te: trailers (gRPC) survives; other te values do not.
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h["te"], "trailers");
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }
}
