//! `token.rs`: [`JoinToken`], the bearer secret a sidecar presents (with a
//! CSR) to obtain its first workload certificate.
//!
//! A token is `trellis-<id>.<secret>`. The id is public and names the token
//! in the store; only the SHA-256 of the secret is stored
//! ([`JoinToken::secret_hash`]), and a presented token is checked with a
//! constant-time comparison ([`JoinToken::matches_hash`]).

use std::fmt;

use crate::cert::hex;
use crate::error::IdentityError;

/// Prefix of every join token, so a leaked token is recognisable by secret
/// scanners and cannot be confused with other credentials.
pub const JOIN_TOKEN_PREFIX: &str = "trellis-";

/// Hex length of a token id: 8 random bytes, enough to never collide among
/// the tokens of one cluster.
pub const JOIN_TOKEN_ID_HEX_LEN: usize = 16;

/// Hex length of a token secret: 16 random bytes (128 bits), beyond
/// guessing even without rate limits.
pub const JOIN_TOKEN_SECRET_HEX_LEN: usize = 32;

/// The message for every malformed token (the token itself is never echoed:
/// it may be a real secret with a typo).
const TOKEN_SHAPE: &str = "expected trellis-<16 hex>.<32 hex>";

/// A join token: `trellis-<id>.<secret>`; `id` is 16 lower-case hex chars
/// (public, names the token in the store), `secret` 32 lower-case hex
/// chars (only its SHA-256 is stored).
///
/// `Debug` does not print the secret; `Display` prints the whole token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Public token id, 16 lower-case hex chars.
    pub id: String,
    /// The secret, 32 lower-case hex chars.
    pub secret: String,
}

impl JoinToken {
    /// A new random token (from the thread-local CSPRNG, seeded by the OS).
    pub fn generate() -> JoinToken {
        let id: [u8; JOIN_TOKEN_ID_HEX_LEN / 2] = rand::random();
        let secret: [u8; JOIN_TOKEN_SECRET_HEX_LEN / 2] = rand::random();
        JoinToken {
            id: hex(&id),
            secret: hex(&secret),
        }
    }

    /// Parse `trellis-<16 hex>.<32 hex>` (lower-case hex), ignoring
    /// surrounding whitespace (tokens are pasted and read from files).
    pub fn parse(s: &str) -> Result<JoinToken, IdentityError> {
        let bad = IdentityError::JoinToken(TOKEN_SHAPE);
        let rest = s.trim().strip_prefix(JOIN_TOKEN_PREFIX).ok_or(bad)?;
        let (id, secret) = rest
            .split_once('.')
            .ok_or(IdentityError::JoinToken(TOKEN_SHAPE))?;
        if !is_lower_hex(id, JOIN_TOKEN_ID_HEX_LEN)
            || !is_lower_hex(secret, JOIN_TOKEN_SECRET_HEX_LEN)
        {
            return Err(IdentityError::JoinToken(TOKEN_SHAPE));
        }
        Ok(JoinToken {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// Lower-case hex SHA-256 of the secret (of its 32 ASCII hex characters,
    /// as written in the token). This is what the store keeps.
    pub fn secret_hash(&self) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, self.secret.as_bytes()).as_ref())
    }

    /// Whether [`JoinToken::secret_hash`] equals `stored_hash_hex` (64 hex
    /// digits, either case), compared in constant time. A malformed stored
    /// hash never matches.
    pub fn matches_hash(&self, stored_hash_hex: &str) -> bool {
        let Some(stored) = decode_hex(stored_hash_hex.trim()) else {
            return false;
        };
        let ours = ring::digest::digest(&ring::digest::SHA256, self.secret.as_bytes());
        constant_time_eq(ours.as_ref(), &stored)
    }
}

/// The full token string, `trellis-<id>.<secret>`.
impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{JOIN_TOKEN_PREFIX}{}.{}", self.id, self.secret)
    }
}

/// Prints the id only: tokens end up in logs via `{:?}`.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let pairs = s.as_bytes().chunks_exact(2);
    if !pairs.remainder().is_empty() {
        return None;
    }
    let nibble = |b: u8| {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    pairs
        .map(|pair| match pair {
            [hi, lo] => Some((nibble(*hi)? << 4) | nibble(*lo)?),
            _ => None,
        })
        .collect()
}

/// Equality whose running time depends only on the lengths (which are
/// public: a SHA-256 is always 32 bytes).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_parse_display_round_trip() {
        let t = JoinToken::generate();
        assert_eq!(t.id.len(), 16);
        assert_eq!(t.secret.len(), 32);
        let s = t.to_string();
        assert!(s.starts_with("trellis-"));
        assert_eq!(s.len(), 8 + 16 + 1 + 32);
        assert_eq!(JoinToken::parse(&s).unwrap(), t);
        assert_eq!(JoinToken::parse(&format!("  {s}\n")).unwrap(), t);
        assert_ne!(JoinToken::generate(), t);
    }

    #[test]
    fn parse_rejects_malformed() {
        let id = "0123456789abcdef";
        let secret = "0123456789abcdef0123456789abcdef";
        assert!(JoinToken::parse(&format!("trellis-{id}.{secret}")).is_ok());
        let bad = [
            String::new(),
            "trellis-".to_owned(),
            format!("{id}.{secret}"),
            format!("Trellis-{id}.{secret}"),
            format!("trellis_{id}.{secret}"),
            format!("trellis-{id}{secret}"),
            format!("trellis-{id}.{secret}0"),
            format!("trellis-{id}0.{secret}"),
            format!("trellis-{}.{secret}", &id[1..]),
            format!("trellis-{id}.{}", &secret[1..]),
            format!("trellis-{}.{secret}", id.to_uppercase()),
            format!("trellis-{id}.{}", secret.replace('a', "g")),
            format!("trellis-{id}.{secret}.x"),
            format!("trellis-{id} .{secret}"),
            format!("trellis-{id}.{}é", &secret[2..]),
        ];
        for s in &bad {
            let err = JoinToken::parse(s).unwrap_err();
            assert_eq!(
                err.to_string(),
                "join token: expected trellis-<16 hex>.<32 hex>",
                "{s}"
            );
        }
    }

    #[test]
    fn hash_matches_only_the_right_secret() {
        let t = JoinToken::generate();
        let h = t.secret_hash();
        assert_eq!(h.len(), 64);
        assert!(h
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert!(t.matches_hash(&h));
        assert!(t.matches_hash(&h.to_uppercase()));
        let other = JoinToken::generate();
        assert!(!other.matches_hash(&h));
        assert!(!t.matches_hash(""));
        assert!(!t.matches_hash(&h[..62]));
        assert!(!t.matches_hash(&format!("{h}00")));
        assert!(!t.matches_hash(&h.replace(|c: char| c.is_ascii_digit(), "z")));
        // Known answer: SHA-256("0123456789abcdef0123456789abcdef").
        let known =
            JoinToken::parse("trellis-0000000000000000.0123456789abcdef0123456789abcdef").unwrap();
        assert_eq!(
            known.secret_hash(),
            "3eb1bd439947eb762998e566ccc2e099c791118b2f40579cc4f7da2b5061b7f9"
        );
    }

    #[test]
    fn debug_hides_the_secret() {
        let t = JoinToken::generate();
        let dbg = format!("{t:?}");
        assert!(!dbg.contains(&t.secret), "{dbg}");
        assert!(dbg.contains(&t.id), "{dbg}");
        let dbg = format!("{t:#?}");
        assert!(!dbg.contains(&t.secret), "{dbg}");
    }

    #[test]
    fn constant_time_eq_works() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert_eq!(decode_hex("0aFf"), Some(vec![0x0a, 0xff]));
        assert_eq!(decode_hex("0"), None);
        assert_eq!(decode_hex("zz"), None);
    }
}
