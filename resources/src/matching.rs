//! Value matchers shared by routes and access policies: [`StringMatch`]
//! (paths) and [`HeaderMatch`] (headers), plus their compiled forms for the
//! data path.
//!
//! A regex must match the *whole* value (it is anchored as `^(?:re)$`), the
//! way RE2 full matches work in Istio; write `.*foo.*` to match anywhere.

use std::fmt;

use std::marker::PhantomData;

use regex::{Regex, RegexBuilder};
use serde::de::value::MapAccessDeserializer;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::validate::Errors;

/// Largest compiled program a user regex may produce. Generous for any
/// real path or header pattern; it stops a pathological pattern (e.g.
/// nested counted repetitions) from costing megabytes per sidecar.
pub const MAX_REGEX_SIZE: usize = 1 << 20;

/// Compiles a user regex anchored to the whole value, under
/// [`MAX_REGEX_SIZE`]. Never panics; the error text is the regex crate's.
pub fn compile_regex(pattern: &str) -> Result<Regex, regex::Error> {
    // Compile the pattern on its own first: a pattern such as `a)|(b` would
    // otherwise close the anchoring group early and match unanchored.
    RegexBuilder::new(pattern)
        .size_limit(MAX_REGEX_SIZE)
        .build()?;
    RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(MAX_REGEX_SIZE)
        .build()
}

/// Reports a regex that does not compile, with the regex crate's reason
/// reduced to its last line (the one that says what is wrong).
pub(crate) fn check_regex(errs: &mut Errors, path: &str, pattern: &str) {
    if let Err(e) = compile_regex(pattern) {
        let text = e.to_string();
        let reason = text
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("invalid regex")
            .trim_start_matches("error: ");
        errs.add(path, format!("invalid regex {pattern:?}: {reason}"));
    }
}

/// How to match a string value: written as exactly one of
/// `{exact: ...}`, `{prefix: ...}` or `{regex: ...}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "StringMatchRepr")]
pub enum StringMatch {
    /// The value equals this string.
    Exact(String),
    /// The value starts with this string.
    Prefix(String),
    /// The whole value matches this regex (RE2 syntax of the `regex` crate).
    Regex(String),
}

/// The written form of [`StringMatch`].
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StringMatchRepr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
}

/// A "set exactly one of these keys" violation, produced while parsing.
#[derive(Debug)]
pub struct OneOfError(String);

impl fmt::Display for OneOfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn one_of_error(allowed: &str, found: &[&str]) -> OneOfError {
    if found.is_empty() {
        OneOfError(format!("exactly one of {allowed} must be set, found none"))
    } else {
        OneOfError(format!(
            "exactly one of {allowed} must be set, found {}",
            found.join(" and ")
        ))
    }
}

/// Deserializes a one-of type through its written form `R`, raising the
/// one-of error while the value's own deserializer is still active, so the
/// error carries the value's field path and position (serde's `try_from`
/// would report it at the enclosing mapping instead).
struct OneOfVisitor<R, T> {
    expecting: &'static str,
    marker: PhantomData<fn(R) -> T>,
}

impl<'de, R, T> Visitor<'de> for OneOfVisitor<R, T>
where
    R: Deserialize<'de>,
    T: TryFrom<R, Error = OneOfError>,
{
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        let repr = R::deserialize(MapAccessDeserializer::new(map))?;
        T::try_from(repr).map_err(de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for StringMatch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<StringMatch, D::Error> {
        deserializer.deserialize_map(OneOfVisitor::<StringMatchRepr, StringMatch> {
            expecting: "a string match: {exact: ...}, {prefix: ...} or {regex: ...}",
            marker: PhantomData,
        })
    }
}

impl<'de> Deserialize<'de> for HeaderMatch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<HeaderMatch, D::Error> {
        deserializer.deserialize_map(OneOfVisitor::<HeaderMatchRepr, HeaderMatch> {
            expecting:
                "a header match: {exact: ...}, {prefix: ...}, {regex: ...} or {present: true}",
            marker: PhantomData,
        })
    }
}

impl TryFrom<StringMatchRepr> for StringMatch {
    type Error = OneOfError;

    fn try_from(r: StringMatchRepr) -> Result<StringMatch, OneOfError> {
        match (r.exact, r.prefix, r.regex) {
            (Some(v), None, None) => Ok(StringMatch::Exact(v)),
            (None, Some(v), None) => Ok(StringMatch::Prefix(v)),
            (None, None, Some(v)) => Ok(StringMatch::Regex(v)),
            (e, p, x) => {
                let found: Vec<&str> = [
                    ("`exact`", e.is_some()),
                    ("`prefix`", p.is_some()),
                    ("`regex`", x.is_some()),
                ]
                .into_iter()
                .filter_map(|(n, set)| set.then_some(n))
                .collect();
                Err(one_of_error("`exact`, `prefix` or `regex`", &found))
            }
        }
    }
}

impl From<StringMatch> for StringMatchRepr {
    fn from(m: StringMatch) -> StringMatchRepr {
        match m {
            StringMatch::Exact(v) => StringMatchRepr {
                exact: Some(v),
                ..Default::default()
            },
            StringMatch::Prefix(v) => StringMatchRepr {
                prefix: Some(v),
                ..Default::default()
            },
            StringMatch::Regex(v) => StringMatchRepr {
                regex: Some(v),
                ..Default::default()
            },
        }
    }
}

impl StringMatch {
    /// Checks what parsing cannot: the regex compiles.
    pub(crate) fn validate(&self, errs: &mut Errors, path: &str) {
        if let StringMatch::Regex(re) = self {
            check_regex(errs, &format!("{path}.regex"), re);
        }
    }

    /// The matcher for the data path. Fails only for a regex that does not
    /// compile, which a validated resource never has.
    pub fn compile(&self) -> Result<CompiledMatch, regex::Error> {
        Ok(match self {
            StringMatch::Exact(v) => CompiledMatch::Exact(v.clone()),
            StringMatch::Prefix(v) => CompiledMatch::Prefix(v.clone()),
            StringMatch::Regex(v) => CompiledMatch::Regex(compile_regex(v)?),
        })
    }
}

/// A [`StringMatch`] ready to test values (the regex compiled once).
#[derive(Clone, Debug)]
pub enum CompiledMatch {
    /// Equality.
    Exact(String),
    /// `starts_with`.
    Prefix(String),
    /// Anchored regex.
    Regex(Regex),
}

impl CompiledMatch {
    /// Does `value` match?
    pub fn matches(&self, value: &str) -> bool {
        match self {
            CompiledMatch::Exact(v) => value == v,
            CompiledMatch::Prefix(v) => value.starts_with(v.as_str()),
            CompiledMatch::Regex(re) => re.is_match(value),
        }
    }
}

/// How to match one request header: written as exactly one of
/// `{exact: ...}`, `{prefix: ...}`, `{regex: ...}` or `{present: true}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "HeaderMatchRepr")]
pub enum HeaderMatch {
    /// The header is present and its value matches.
    Value(StringMatch),
    /// The header is present, with any value.
    Present,
}

/// The written form of [`HeaderMatch`].
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderMatchRepr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    present: Option<bool>,
}

impl TryFrom<HeaderMatchRepr> for HeaderMatch {
    type Error = OneOfError;

    fn try_from(r: HeaderMatchRepr) -> Result<HeaderMatch, OneOfError> {
        match r.present {
            Some(false) => Err(OneOfError(
                "`present` can only be true (to ignore a header, leave it out of the match)"
                    .to_string(),
            )),
            Some(true) if r.exact.is_none() && r.prefix.is_none() && r.regex.is_none() => {
                Ok(HeaderMatch::Present)
            }
            present => {
                let value = StringMatchRepr {
                    exact: r.exact,
                    prefix: r.prefix,
                    regex: r.regex,
                };
                if present.is_none() {
                    if let Ok(m) = StringMatch::try_from(value.clone()) {
                        return Ok(HeaderMatch::Value(m));
                    }
                }
                let found: Vec<&str> = [
                    ("`exact`", value.exact.is_some()),
                    ("`prefix`", value.prefix.is_some()),
                    ("`regex`", value.regex.is_some()),
                    ("`present`", present.is_some()),
                ]
                .into_iter()
                .filter_map(|(n, set)| set.then_some(n))
                .collect();
                Err(one_of_error(
                    "`exact`, `prefix`, `regex` or `present`",
                    &found,
                ))
            }
        }
    }
}

impl From<HeaderMatch> for HeaderMatchRepr {
    fn from(m: HeaderMatch) -> HeaderMatchRepr {
        match m {
            HeaderMatch::Present => HeaderMatchRepr {
                present: Some(true),
                ..Default::default()
            },
            HeaderMatch::Value(v) => {
                let StringMatchRepr {
                    exact,
                    prefix,
                    regex,
                } = v.into();
                HeaderMatchRepr {
                    exact,
                    prefix,
                    regex,
                    present: None,
                }
            }
        }
    }
}

impl HeaderMatch {
    pub(crate) fn validate(&self, errs: &mut Errors, path: &str) {
        if let HeaderMatch::Value(m) = self {
            m.validate(errs, path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_is_anchored() {
        let m = StringMatch::Regex("/api/v[0-9]+".into()).compile().unwrap();
        assert!(m.matches("/api/v2"));
        assert!(!m.matches("/api/v2/x"));
        assert!(!m.matches("x/api/v2"));
        let p = StringMatch::Prefix("/api".into()).compile().unwrap();
        assert!(p.matches("/api/v2"));
        assert!(!p.matches("/ap"));
    }

    #[test]
    fn regex_errors_are_reported_not_panicked() {
        let mut errs = Errors::default();
        check_regex(&mut errs, "p", "(unclosed");
        assert_eq!(errs.0.len(), 1);
        assert_eq!(
            errs.0[0].message,
            "invalid regex \"(unclosed\": unclosed group"
        );
        let mut errs = Errors::default();
        check_regex(&mut errs, "p", "(a{1000}){1000}");
        assert_eq!(errs.0.len(), 1, "size limit applies");
        let mut errs = Errors::default();
        check_regex(&mut errs, "p", "a)|(b");
        assert_eq!(errs.0.len(), 1, "cannot escape the anchoring group");
    }

    #[test]
    fn one_of_rules() {
        let both = StringMatchRepr {
            exact: Some("a".into()),
            prefix: Some("b".into()),
            regex: None,
        };
        assert_eq!(
            StringMatch::try_from(both).unwrap_err().to_string(),
            "exactly one of `exact`, `prefix` or `regex` must be set, found `exact` and `prefix`"
        );
        let none = HeaderMatchRepr::default();
        assert_eq!(
            HeaderMatch::try_from(none).unwrap_err().to_string(),
            "exactly one of `exact`, `prefix`, `regex` or `present` must be set, found none"
        );
        let present = HeaderMatchRepr {
            present: Some(true),
            ..Default::default()
        };
        assert_eq!(
            HeaderMatch::try_from(present).unwrap(),
            HeaderMatch::Present
        );
    }
}
