//! `kind: Quota` — a rate limit like Mixer's memquota: at most `maxAmount`
//! requests per `validDuration` window, with overrides for particular
//! callers and callees.
//!
//! A request is counted against the first override (in list order) whose
//! every set dimension equals the request's; if none matches, against the
//! default. List more specific overrides first: an override that an earlier
//! one always shadows is rejected.

use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::validate::{self, Errors};

/// The `spec` of a Quota.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QuotaSpec {
    /// Requests allowed per window when no override matches, ≥ 1.
    pub max_amount: u64,
    /// The window, > 0.
    pub valid_duration: Duration,
    /// Per-dimension limits, tried in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<QuotaOverride>,
}

/// A limit for requests with particular dimensions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QuotaOverride {
    /// Which requests; at least one dimension set.
    pub dimensions: QuotaDimensions,
    /// Requests allowed per window, ≥ 1.
    pub max_amount: u64,
    /// The window, > 0; absent means the Quota's `validDuration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_duration: Option<Duration>,
}

impl QuotaOverride {
    /// The window, falling back to the Quota's.
    pub fn effective_valid_duration(&self, quota: &QuotaSpec) -> Duration {
        self.valid_duration.unwrap_or(quota.valid_duration)
    }
}

/// Request attributes an override is keyed on; a request matches when every
/// set dimension equals its value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QuotaDimensions {
    /// Calling service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Calling instance's `version` label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_version: Option<String>,
    /// Calling service's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
    /// Called service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// Called instance's `version` label (the subset's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_version: Option<String>,
}

impl QuotaDimensions {
    fn fields(&self) -> [(&'static str, &Option<String>); 5] {
        [
            ("source", &self.source),
            ("sourceVersion", &self.source_version),
            ("sourceNamespace", &self.source_namespace),
            ("destination", &self.destination),
            ("destinationVersion", &self.destination_version),
        ]
    }

    /// True if no dimension is set.
    pub fn is_empty(&self) -> bool {
        self.fields().iter().all(|(_, v)| v.is_none())
    }

    /// True if every dimension set here is set to the same value in `other`
    /// (so every request `other` matches, `self` matches too).
    pub fn is_subset_of(&self, other: &QuotaDimensions) -> bool {
        self.fields()
            .iter()
            .zip(other.fields().iter())
            .all(|((_, mine), (_, theirs))| mine.is_none() || mine == theirs)
    }
}

impl QuotaSpec {
    pub(crate) fn validate(&self, errs: &mut Errors) {
        if self.max_amount == 0 {
            errs.add("spec.maxAmount", "must be at least 1");
        }
        validate::positive_duration(errs, "spec.validDuration", self.valid_duration);
        for (i, o) in self.overrides.iter().enumerate() {
            let p = format!("spec.overrides[{i}]");
            let d = &o.dimensions;
            if d.is_empty() {
                errs.add(
                    format!("{p}.dimensions"),
                    "at least one dimension is required",
                );
            }
            for (name, value) in d.fields() {
                let Some(v) = value else { continue };
                let fp = format!("{p}.dimensions.{name}");
                if name.ends_with("Version") {
                    if v.is_empty() || !validate::is_label_value(v) {
                        errs.add(
                            fp,
                            format!("invalid version {v:?}: expected a label value such as v1"),
                        );
                    }
                } else {
                    validate::dns_label(errs, &fp, name, v);
                }
            }
            if o.max_amount == 0 {
                errs.add(format!("{p}.maxAmount"), "must be at least 1");
            }
            if let Some(vd) = o.valid_duration {
                validate::positive_duration(errs, &format!("{p}.validDuration"), vd);
            }
            if d.is_empty() {
                continue;
            }
            let earlier = &self.overrides[..i];
            if let Some(first) = earlier.iter().position(|e| e.dimensions == *d) {
                errs.add(
                    format!("{p}.dimensions"),
                    format!("same dimensions as spec.overrides[{first}]"),
                );
            } else if let Some(first) = earlier
                .iter()
                .position(|e| !e.dimensions.is_empty() && e.dimensions.is_subset_of(d))
            {
                errs.add(
                    format!("{p}.dimensions"),
                    format!(
                        "never applies: spec.overrides[{first}] matches every request this one does \
                         and comes first (list more specific overrides first)"
                    ),
                );
            }
        }
    }
}
