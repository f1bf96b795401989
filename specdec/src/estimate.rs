//! Estimators that feed the γ controller, all driven by caller-supplied timestamps (seconds on any
//! monotonic clock) rather than reading a clock, so tests replay exact timelines.
//!
//! - [`Ewma`]: a time-decayed weighted average. Every sample's weight halves every `half_life_s`
//!   seconds, so the estimate covers roughly the last half-life regardless of how often samples
//!   arrive, and samples with the same timestamp average equally (unlike the classic
//!   `v ← w·v + (1−w)·x` form, which would ignore a second sample at the same instant).
//! - [`AcceptanceEstimator`]: per-session α, the per-token acceptance probability.
//! - [`LinkEstimator`]: per-link RTT and bandwidth.

use crate::error::SpecError;

/// Time-decayed weighted average: `Σ wᵢ·2^(−(now−tᵢ)/h)·xᵢ / Σ wᵢ·2^(−(now−tᵢ)/h)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ewma {
    half_life_s: f64,
    weighted_sum: f64,
    weight: f64,
    last_s: Option<f64>,
}

impl Ewma {
    /// An empty average; `get` is `None` until the first sample.
    pub fn new(half_life_s: f64) -> Self {
        Self {
            half_life_s,
            weighted_sum: 0.0,
            weight: 0.0,
            last_s: None,
        }
    }

    /// An average seeded with `value` worth `weight` samples. The prior starts decaying at the
    /// first real sample's timestamp, so it fades like any other old sample.
    pub fn with_prior(half_life_s: f64, value: f64, weight: f64) -> Self {
        let mut e = Self::new(half_life_s);
        if value.is_finite() && weight.is_finite() && weight > 0.0 {
            e.weighted_sum = value * weight;
            e.weight = weight;
        }
        e
    }

    /// Adds a sample of weight 1 taken at `now_s`.
    pub fn observe(&mut self, value: f64, now_s: f64) {
        self.observe_weighted(value, 1.0, now_s);
    }

    /// Adds a sample worth `weight` samples. Non-finite values, weights or times and
    /// non-positive weights are ignored; a timestamp earlier than the last one counts as "now"
    /// (no decay) rather than inflating old weights.
    pub fn observe_weighted(&mut self, value: f64, weight: f64, now_s: f64) {
        if !(value.is_finite() && weight.is_finite() && weight > 0.0 && now_s.is_finite()) {
            return;
        }
        if let Some(last) = self.last_s {
            let decay = self.decay(now_s - last);
            self.weighted_sum *= decay;
            self.weight *= decay;
        }
        self.last_s = Some(self.last_s.map_or(now_s, |last| last.max(now_s)));
        self.weighted_sum += value * weight;
        self.weight += weight;
    }

    /// The current average, `None` before any sample (or prior).
    pub fn get(&self) -> Option<f64> {
        (self.weight > 0.0).then(|| self.weighted_sum / self.weight)
    }

    /// Total decayed weight as of the last sample: how many "fresh" samples the estimate is worth.
    pub fn weight(&self) -> f64 {
        self.weight
    }

    fn decay(&self, dt: f64) -> f64 {
        if dt <= 0.0 {
            1.0
        } else if self.half_life_s > 0.0 {
            (-dt / self.half_life_s).exp2()
        } else {
            0.0
        }
    }
}

/// Prior and memory of an [`AcceptanceEstimator`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AcceptancePrior {
    /// α assumed before any round (e.g. the draft node's historical average).
    pub alpha: f64,
    /// How many acceptance trials (drafted positions actually tested) the prior is worth.
    pub weight: f64,
    /// Half-life of old rounds' influence, in seconds.
    pub half_life_s: f64,
}

impl Default for AcceptancePrior {
    fn default() -> Self {
        Self {
            alpha: 0.6,
            weight: 8.0,
            half_life_s: 30.0,
        }
    }
}

/// Per-session estimate of α, the probability that a drafted token is accepted.
///
/// A round with γ drafted and `a` accepted tested `a + 1` positions if it stopped at a rejection
/// (a < γ) and γ positions otherwise: positions after the first rejection were never tested.
/// α is accepted / tested over the decayed history — the maximum-likelihood estimate under the
/// i.i.d. model behind E[N] — whereas accepted / drafted would be biased low for long blocks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AcceptanceEstimator {
    rate: Ewma,
}

impl AcceptanceEstimator {
    /// An estimator seeded with `prior`.
    pub fn new(prior: AcceptancePrior) -> Self {
        Self {
            rate: Ewma::with_prior(prior.half_life_s, prior.alpha.clamp(0.0, 1.0), prior.weight),
        }
    }

    /// Records one round. `drafted == 0` (plain decoding) carries no information and is skipped.
    pub fn observe(
        &mut self,
        drafted: usize,
        accepted: usize,
        now_s: f64,
    ) -> Result<(), SpecError> {
        if accepted > drafted {
            return Err(SpecError::InvalidObservation {
                reason: format!("accepted {accepted} of {drafted} drafted tokens"),
            });
        }
        let tested = if accepted < drafted {
            accepted + 1
        } else {
            drafted
        };
        self.observe_tested(tested, accepted, now_s);
        Ok(())
    }

    /// Records `tested` positions of which `accepted` were accepted (positions picked out of
    /// rounds by the caller, e.g. one drafting source's tokens). Nothing tested: no change.
    pub fn observe_tested(&mut self, tested: usize, accepted: usize, now_s: f64) {
        if tested > 0 {
            let accepted = accepted.min(tested);
            self.rate
                .observe_weighted(accepted as f64 / tested as f64, tested as f64, now_s);
        }
    }

    /// Current α in [0, 1].
    pub fn alpha(&self) -> f64 {
        self.rate.get().unwrap_or(0.0).clamp(0.0, 1.0)
    }
}

/// Defaults and memory of a [`LinkEstimator`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkConfig {
    /// Half-life of old samples' influence, in seconds.
    pub half_life_s: f64,
    /// RTT assumed before the first sample: a modest WAN link, so an unmeasured link neither
    /// disables speculation nor over-lengthens blocks.
    pub default_rtt_s: f64,
    /// Bandwidth assumed before the first sample.
    pub default_bandwidth_bytes_per_s: f64,
    /// Transfers smaller than this are RTT-dominated and say nothing about bandwidth.
    pub min_bandwidth_sample_bytes: u64,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            half_life_s: 10.0,
            default_rtt_s: 0.03,
            default_bandwidth_bytes_per_s: 1.25e6,
            min_bandwidth_sample_bytes: 16 * 1024,
        }
    }
}

/// Per-link RTT and bandwidth from the stream's own timestamps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkEstimator {
    config: LinkConfig,
    rtt_s: Ewma,
    /// Seconds per byte, weighted by bytes, so the estimate is Σ bytes / Σ seconds (decayed)
    /// rather than a mean of rates that a single tiny transfer could skew.
    secs_per_byte: Ewma,
}

impl LinkEstimator {
    /// An estimator that reports `config`'s defaults until it has samples.
    pub fn new(config: LinkConfig) -> Self {
        Self {
            config,
            rtt_s: Ewma::new(config.half_life_s),
            secs_per_byte: Ewma::new(config.half_life_s),
        }
    }

    /// Records one request/response exchange: sent at `sent_s`, answer received at
    /// `received_s` (both on the caller's clock), `server_s` of which the server reports it
    /// spent working (queue + verify). The network share is clamped at 0 since the server's
    /// timing comes from another clock. Non-finite inputs or `received_s < sent_s` are ignored.
    pub fn observe_round_trip(&mut self, sent_s: f64, received_s: f64, server_s: f64) {
        let elapsed = received_s - sent_s;
        if !(elapsed.is_finite() && server_s.is_finite()) || elapsed < 0.0 {
            return;
        }
        self.rtt_s
            .observe((elapsed - server_s.max(0.0)).max(0.0), received_s);
    }

    /// Records `bytes` moved in `transfer_s` seconds of transfer time (a probe, or a large
    /// message's time beyond the RTT). Small or instantaneous transfers are ignored.
    pub fn observe_transfer(&mut self, bytes: u64, transfer_s: f64, now_s: f64) {
        if bytes < self.config.min_bandwidth_sample_bytes.max(1)
            || !(transfer_s.is_finite() && transfer_s > 0.0)
        {
            return;
        }
        let b = bytes as f64;
        self.secs_per_byte
            .observe_weighted(transfer_s / b, b, now_s);
    }

    /// Current RTT estimate in seconds (the default before any sample).
    pub fn rtt_s(&self) -> f64 {
        self.rtt_s.get().unwrap_or(self.config.default_rtt_s)
    }

    /// Current bandwidth estimate in bytes per second (the default before any sample).
    pub fn bandwidth_bytes_per_s(&self) -> f64 {
        match self.secs_per_byte.get() {
            Some(s) if s > 0.0 => 1.0 / s,
            _ => self.config.default_bandwidth_bytes_per_s,
        }
    }
}

#[cfg(test)]
#[path = "estimate_tests.rs"]
mod tests;
