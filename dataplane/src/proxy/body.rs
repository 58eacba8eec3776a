//! The one body type of the data path, [`ProxyBody`]: request and response
//! bodies are streamed through unchanged (boxed `hyper::body::Incoming`),
//! synthetic responses are [`full`] bodies.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

/// A streamed or synthetic body.
pub type ProxyBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// A complete in-memory body.
pub fn full(data: impl Into<Bytes>) -> ProxyBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}
