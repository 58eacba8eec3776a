//! [`Duration`]: a span of time written as a string such as `250ms`, `15s`,
//! `1m` or `2h`.
//!
//! The grammar is deliberately small: a whole, non-negative decimal number
//! directly followed by one unit (`ms`, `s`, `m`, `h`). No sign, no fraction,
//! no spaces, no compound forms (`1m30s`: write `90s`). Precision is one
//! millisecond. Output is canonical: the largest unit that represents the
//! value exactly (`90000ms` is written back as `90s`, `0ms` as `0s`).

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const MS_PER_SECOND: u64 = 1_000;
const MS_PER_MINUTE: u64 = 60 * MS_PER_SECOND;
const MS_PER_HOUR: u64 = 60 * MS_PER_MINUTE;

/// The longest duration any field accepts: 366 days (`8784h`).
///
/// Nothing in the mesh legitimately waits longer than that (the longest are
/// quota windows and ejection times), so a bigger value is a typo; and
/// consumers add these durations to `Instant`s, which panics on overflow,
/// so the bound also keeps every stored value safely addable.
pub const MAX_DURATION: Duration = Duration::from_hours(366 * 24);

/// A non-negative span of time with millisecond precision, serialized as a
/// string like `15s` (see the module docs for the grammar).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Duration {
    millis: u64,
}

impl Duration {
    /// Zero: valid where a field allows it (most do not; the validators say so).
    pub const ZERO: Duration = Duration { millis: 0 };

    /// A duration of `millis` milliseconds.
    pub const fn from_millis(millis: u64) -> Duration {
        Duration { millis }
    }

    /// A duration of `secs` seconds (saturating).
    pub const fn from_secs(secs: u64) -> Duration {
        Duration {
            millis: secs.saturating_mul(MS_PER_SECOND),
        }
    }

    /// A duration of `mins` minutes (saturating).
    pub const fn from_mins(mins: u64) -> Duration {
        Duration {
            millis: mins.saturating_mul(MS_PER_MINUTE),
        }
    }

    /// A duration of `hours` hours (saturating).
    pub const fn from_hours(hours: u64) -> Duration {
        Duration {
            millis: hours.saturating_mul(MS_PER_HOUR),
        }
    }

    /// Whole milliseconds.
    pub const fn as_millis(&self) -> u64 {
        self.millis
    }

    /// True for `0s`.
    pub const fn is_zero(&self) -> bool {
        self.millis == 0
    }

    /// The same span as a [`std::time::Duration`].
    pub const fn as_std(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.millis)
    }
}

impl From<Duration> for std::time::Duration {
    fn from(d: Duration) -> std::time::Duration {
        d.as_std()
    }
}

/// Why a duration string was rejected; the message quotes the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DurationError(String);

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DurationError {}

const GRAMMAR: &str = "expected a whole number followed by a unit (ms, s, m, h), e.g. 250ms or 15s";

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Duration, DurationError> {
        let bad = |why: &str| DurationError(format!("invalid duration {s:?}: {why}"));
        let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(digits_end);
        if s.starts_with('-') {
            return Err(bad("durations cannot be negative"));
        }
        if digits.is_empty() {
            return Err(bad(GRAMMAR));
        }
        if unit.starts_with('.') {
            return Err(bad(
                "fractions are not supported; use a smaller unit (e.g. 1500ms instead of 1.5s)",
            ));
        }
        let per_unit = match unit {
            "ms" => 1,
            "s" => MS_PER_SECOND,
            "m" => MS_PER_MINUTE,
            "h" => MS_PER_HOUR,
            "" => return Err(bad("missing unit (ms, s, m, h)")),
            _ => return Err(bad(GRAMMAR)),
        };
        let millis = digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(per_unit))
            .filter(|&ms| ms <= MAX_DURATION.millis)
            .ok_or_else(|| bad(&format!("longer than the maximum of {MAX_DURATION}")))?;
        Ok(Duration { millis })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.millis;
        if ms == 0 {
            f.write_str("0s")
        } else if ms % MS_PER_HOUR == 0 {
            write!(f, "{}h", ms / MS_PER_HOUR)
        } else if ms % MS_PER_MINUTE == 0 {
            write!(f, "{}m", ms / MS_PER_MINUTE)
        } else if ms % MS_PER_SECOND == 0 {
            write!(f, "{}s", ms / MS_PER_SECOND)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration string like \"250ms\", \"15s\", \"1m\" or \"2h\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        v.parse().map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        deserializer.deserialize_str(DurationVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!("250ms".parse::<Duration>().unwrap().as_millis(), 250);
        assert_eq!("15s".parse::<Duration>().unwrap().as_millis(), 15_000);
        assert_eq!("1m".parse::<Duration>().unwrap().as_millis(), 60_000);
        assert_eq!("2h".parse::<Duration>().unwrap().as_millis(), 7_200_000);
        assert_eq!("0s".parse::<Duration>().unwrap(), Duration::ZERO);
        assert_eq!(
            "8784h".parse::<Duration>().unwrap().as_std(),
            std::time::Duration::from_secs(366 * 24 * 3600)
        );
    }

    #[test]
    fn displays_canonically() {
        for (input, out) in [
            ("90000ms", "90s"),
            ("120s", "2m"),
            ("60m", "1h"),
            ("1500ms", "1500ms"),
            ("0ms", "0s"),
            ("7s", "7s"),
        ] {
            assert_eq!(input.parse::<Duration>().unwrap().to_string(), out);
        }
    }

    #[test]
    fn rejects_garbage() {
        let err = |s: &str| s.parse::<Duration>().unwrap_err().to_string();
        assert_eq!(
            err("15"),
            "invalid duration \"15\": missing unit (ms, s, m, h)"
        );
        assert_eq!(
            err("-1s"),
            "invalid duration \"-1s\": durations cannot be negative"
        );
        assert_eq!(
            err("1.5s"),
            "invalid duration \"1.5s\": fractions are not supported; use a smaller unit (e.g. 1500ms instead of 1.5s)"
        );
        for s in [
            "", "s", "1 s", "1sec", "1d", "+1s", " 1s", "1S", "1m30s", "٣s",
        ] {
            assert_eq!(
                err(s),
                format!("invalid duration {s:?}: {GRAMMAR}"),
                "{s:?}"
            );
        }
        assert_eq!(
            err("8785h"),
            "invalid duration \"8785h\": longer than the maximum of 8784h"
        );
        assert!(err("99999999999999999999999h").contains("longer than the maximum"));
    }
}
