//! W3C Trace Context (`traceparent`) propagation: every hop through a
//! sidecar is one span. The sidecar continues the caller's trace (same
//! trace id, the caller's span as parent) or starts one when the request
//! carries no valid `traceparent`, and sends its own span id on as the
//! parent of the next hop. `tracestate` passes through untouched.
//!
//! Format (version 00): `00-<32 hex trace id>-<16 hex parent id>-<2 hex
//! flags>`; all-zero ids are invalid, as are upper-case hex digits.

use hyper::header::{HeaderName, HeaderValue};
use hyper::HeaderMap;

/// The header name (a static: no parsing of the name per request).
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The sampled flag of a trace this sidecar starts: sampled, so the
/// application's tracer records it unless it decides otherwise.
pub const NEW_TRACE_FLAGS: u8 = 0x01;

/// This hop's span: its trace, its own id and its parent's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub trace_id: u128,
    pub span_id: u64,
    /// The caller's span (`None`: this hop started the trace).
    pub parent_id: Option<u64>,
    pub flags: u8,
}

fn nonzero_u64() -> u64 {
    loop {
        let v: u64 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

/// Writes the low `out.len()` hex digits of `v` (lower case) into `out`.
fn hex_into(out: &mut [u8], mut v: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for c in out.iter_mut().rev() {
        *c = DIGITS[(v & 0xf) as usize];
        v >>= 4;
    }
}

/// Parses a `traceparent` value; `None` if it is not valid version-00
/// (or a later version's first 55 characters, as the spec asks).
pub fn parse(v: &str) -> Option<(u128, u64, u8)> {
    let b = v.as_bytes();
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let lower_hex = |s: &str| s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let (version, trace, parent, flags) = (&v[0..2], &v[3..35], &v[36..52], &v[53..55]);
    if !lower_hex(version) || version == "ff" || !lower_hex(trace) || !lower_hex(parent) {
        return None;
    }
    // Version 00 is exactly 55 characters; later versions may append "-...".
    if (version == "00" && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
        return None;
    }
    let trace_id = u128::from_str_radix(trace, 16).ok()?;
    let parent_id = u64::from_str_radix(parent, 16).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    if trace_id == 0 || parent_id == 0 || !lower_hex(&v[53..55]) {
        return None;
    }
    Some((trace_id, parent_id, flags))
}

impl Span {
    /// This hop's span for a request with `headers`: a child of the
    /// caller's span, or the root of a new trace.
    pub fn from_headers(headers: &HeaderMap) -> Span {
        let parent = headers
            .get(&TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse);
        match parent {
            Some((trace_id, parent_id, flags)) => Span {
                trace_id,
                span_id: nonzero_u64(),
                parent_id: Some(parent_id),
                flags,
            },
            None => Span {
                trace_id: loop {
                    let v: u128 = rand::random();
                    if v != 0 {
                        break v;
                    }
                },
                span_id: nonzero_u64(),
                parent_id: None,
                flags: NEW_TRACE_FLAGS,
            },
        }
    }

    /// The `traceparent` the next hop gets: this span as its parent.
    pub fn header_value(&self) -> HeaderValue {
        // Written by hand: this runs on every request, and the formatting
        // machinery costs more than the rest of the header.
        let mut b = [b'-'; 55];
        b[0] = b'0';
        b[1] = b'0';
        hex_into(&mut b[3..35], self.trace_id);
        hex_into(&mut b[36..52], u128::from(self.span_id));
        hex_into(&mut b[53..55], u128::from(self.flags));
        // Only hex digits and dashes.
        HeaderValue::from_bytes(&b).unwrap_or(HeaderValue::from_static(""))
    }

    /// Replaces the request's `traceparent` with this span's.
    pub fn propagate(&self, headers: &mut HeaderMap) {
        headers.insert(&TRACEPARENT, self.header_value());
    }

    /// The trace id as 32 hex digits.
    pub fn trace_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The span id as 16 hex digits.
    pub fn span_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }

    /// The parent's id as 16 hex digits, if any.
    pub fn parent_hex(&self) -> Option<String> {
        self.parent_id.map(|p| format!("{p:016x}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn continues_a_valid_trace() {
        let mut h = HeaderMap::new();
        h.insert(&TRACEPARENT, HeaderValue::from_static(EXAMPLE));
        let s = Span::from_headers(&h);
        assert_eq!(s.trace_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s.parent_hex().as_deref(), Some("00f067aa0ba902b7"));
        assert_ne!(s.span_id, 0x00f0_67aa_0ba9_02b7);
        s.propagate(&mut h);
        let out = h[&TRACEPARENT].to_str().unwrap().to_string();
        assert_eq!(
            out,
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", s.span_hex())
        );
        assert_eq!(parse(&out), Some((s.trace_id, s.span_id, 1)));
    }

    #[test]
    fn invalid_values_start_a_new_trace() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        // A later version may append fields.
        assert!(parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x").is_some());
        let s = Span::from_headers(&HeaderMap::new());
        assert_eq!(s.parent_id, None);
        assert_eq!(s.flags, NEW_TRACE_FLAGS);
        assert!(parse(s.header_value().to_str().unwrap()).is_some());
    }
}
