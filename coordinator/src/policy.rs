//! The live-adjustable policy: γ bounds, batching window and budget, burst thresholds and the
//! speculation switches. Loaded from `[policy]`, read and patched through the admin API.

use edgespec_specdec::{GammaPolicy, MAX_GAMMA};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// [`MAX_GAMMA`] (the one ceiling on γ, in `specdec`) as the policy's field type.
pub const GAMMA_CEILING: u32 = MAX_GAMMA as u32;

/// The policy in force.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Smallest γ the controller may pick.
    pub gamma_min: u32,
    /// Largest γ the controller may pick.
    pub gamma_max: u32,
    /// γ of a new session.
    pub initial_gamma: u32,
    /// Longest wait of a block for its batch.
    #[serde(with = "humantime_serde")]
    pub batch_window: Duration,
    /// Token budget that sends a batch at once.
    pub max_batch_tokens: usize,
    /// Predicted on-prem queue delay beyond which new sessions burst to the cloud.
    #[serde(with = "humantime_serde")]
    pub burst_queue_delay: Duration,
    /// On-prem utilisation beyond which new sessions burst to the cloud.
    pub burst_utilization: f64,
    /// false forces γ = 0.
    pub speculation_enabled: bool,
    /// Draft nodes pipeline their drafting.
    pub pipelined: bool,
}

/// A partial update of the policy (`PUT /admin/v1/policy`): omitted fields keep their value.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyPatch {
    /// See [`Policy::gamma_min`].
    pub gamma_min: Option<u32>,
    /// See [`Policy::gamma_max`].
    pub gamma_max: Option<u32>,
    /// See [`Policy::initial_gamma`].
    pub initial_gamma: Option<u32>,
    /// See [`Policy::batch_window`].
    #[serde(default, deserialize_with = "optional_duration")]
    pub batch_window: Option<Duration>,
    /// See [`Policy::max_batch_tokens`].
    pub max_batch_tokens: Option<usize>,
    /// See [`Policy::burst_queue_delay`].
    #[serde(default, deserialize_with = "optional_duration")]
    pub burst_queue_delay: Option<Duration>,
    /// See [`Policy::burst_utilization`].
    pub burst_utilization: Option<f64>,
    /// See [`Policy::speculation_enabled`].
    pub speculation_enabled: Option<bool>,
    /// See [`Policy::pipelined`].
    pub pipelined: Option<bool>,
}

/// `humantime_serde` for a patch's durations, except that a duration humantime cannot represent
/// is an error: humantime 2.4 panics in `Duration::new` on `"18446744073709551615s 1000000000ns"`
/// (found by the `admin_policy` fuzz target).
fn optional_duration<'de, D>(d: D) -> Result<Option<Duration>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        humantime_serde::deserialize(d)
    }))
    .unwrap_or_else(|_| Err(serde::de::Error::custom("duration out of range")))
}

/// A policy value outside its allowed range; names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} {reason}")]
pub struct PolicyError {
    /// The offending field.
    pub field: &'static str,
    /// What is allowed.
    pub reason: String,
}

impl Policy {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let bad = |field, reason: String| Err(PolicyError { field, reason });
        if self.gamma_max > GAMMA_CEILING {
            return bad("gamma_max", format!("must be <= {GAMMA_CEILING}"));
        }
        if self.gamma_min > self.gamma_max {
            return bad("gamma_min", "must be <= gamma_max".into());
        }
        if !(self.gamma_min..=self.gamma_max).contains(&self.initial_gamma) {
            return bad(
                "initial_gamma",
                "must be within [gamma_min, gamma_max]".into(),
            );
        }
        if self.batch_window > Duration::from_secs(1) {
            return bad("batch_window", "must be <= 1s".into());
        }
        if self.max_batch_tokens == 0 {
            return bad("max_batch_tokens", "must be >= 1".into());
        }
        if self.burst_queue_delay > Duration::from_secs(3600) {
            return bad("burst_queue_delay", "must be <= 1h".into());
        }
        if !(self.burst_utilization > 0.0 && self.burst_utilization <= 1.0) {
            return bad("burst_utilization", "must be in (0, 1]".into());
        }
        Ok(())
    }

    /// The policy with `patch` applied, validated.
    pub fn patched(&self, patch: &PolicyPatch) -> Result<Policy, PolicyError> {
        let mut p = self.clone();
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = patch.$f { p.$f = v; } )* };
        }
        set!(
            gamma_min,
            gamma_max,
            initial_gamma,
            batch_window,
            max_batch_tokens,
            burst_queue_delay,
            burst_utilization,
            speculation_enabled,
            pipelined
        );
        p.validate()?;
        Ok(p)
    }

    /// The γ controller's share of the policy.
    pub fn gamma_policy(&self) -> GammaPolicy {
        GammaPolicy {
            min_gamma: self.gamma_min as usize,
            max_gamma: self.gamma_max as usize,
            initial_gamma: self.initial_gamma as usize,
            speculation_enabled: self.speculation_enabled,
            assume_pipelined: self.pipelined,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Policy {
        crate::Settings::default().policy
    }

    #[test]
    fn patch_keeps_omitted_fields_and_validates() {
        let p = base();
        let q = p
            .patched(&PolicyPatch {
                speculation_enabled: Some(false),
                ..Default::default()
            })
            .unwrap();
        assert!(!q.speculation_enabled);
        assert_eq!(q.gamma_max, p.gamma_max);
        assert!(!q.gamma_policy().speculation_enabled);
        let err = p
            .patched(&PolicyPatch {
                gamma_max: Some(1),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(err.field, "initial_gamma");
        let err = p
            .patched(&PolicyPatch {
                burst_utilization: Some(1.5),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(err.field, "burst_utilization");
    }

    #[test]
    fn patch_parses_durations_and_rejects_unknown_fields() {
        let patch: PolicyPatch = serde_json::from_str(r#"{"batch_window":"5ms"}"#).unwrap();
        assert_eq!(patch.batch_window, Some(Duration::from_millis(5)));
        assert!(serde_json::from_str::<PolicyPatch>(r#"{"gama":1}"#).is_err());
    }
}
