//! Binary encoding of everything stored on disk or sent between peers.
//!
//! postcard (compact, serde-based) for internal records. The format is
//! internal to one Trellis version; the admin API uses protobuf instead.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A record could not be encoded or decoded; `what` names the record.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {what}: {source}")]
pub struct CodecError {
    pub op: &'static str,
    pub what: &'static str,
    #[source]
    pub source: postcard::Error,
}

/// Encode `value`, naming it `what` in errors.
pub fn encode<T: Serialize + ?Sized>(what: &'static str, value: &T) -> Result<Vec<u8>, CodecError> {
    postcard::to_stdvec(value).map_err(|source| CodecError {
        op: "encode",
        what,
        source,
    })
}

/// Decode a `T` from `bytes` (it may borrow from them), naming it `what`
/// in errors.
pub fn decode<'a, T: Deserialize<'a>>(
    what: &'static str,
    bytes: &'a [u8],
) -> Result<T, CodecError> {
    postcard::from_bytes(bytes).map_err(|source| CodecError {
        op: "decode",
        what,
        source,
    })
}

/// Decode a `T` from the start of `bytes`, ignoring what follows (reads
/// the leading fields of a larger record without decoding the rest).
pub fn decode_prefix<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, CodecError> {
    postcard::take_from_bytes(bytes)
        .map(|(value, _rest)| value)
        .map_err(|source| CodecError {
            op: "decode",
            what,
            source,
        })
}
