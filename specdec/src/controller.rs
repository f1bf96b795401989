//! Per-session γ controller in the plan → observe shape: it owns the session's acceptance and
//! link estimators, turns them into [`GammaInputs`] and asks [`plan`](crate::gamma::plan) for γ;
//! each verdict that comes back is fed to `observe`. Pool-wide quantities (draft speed, queue
//! delay, verify cost) are passed in at planning time because they are not the session's own.

use crate::cost::VerifyCost;
use crate::error::SpecError;
use crate::estimate::{AcceptanceEstimator, AcceptancePrior, LinkConfig, LinkEstimator};
use crate::gamma::{plan, GammaInputs, GammaPlan};

/// Static settings of a [`GammaController`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControllerConfig {
    /// Lower bound on γ (0 allows plain decoding).
    pub min_gamma: usize,
    /// Upper bound on γ.
    pub max_gamma: usize,
    /// Whether the draft node pipelines drafting with verification.
    pub pipelined: bool,
    /// Payload bytes per drafted token (id plus sparse q).
    pub bytes_per_token: f64,
    /// α before the session's first rounds.
    pub acceptance: AcceptancePrior,
    /// Link defaults and memory.
    pub link: LinkConfig,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            min_gamma: 0,
            max_gamma: 12,
            pipelined: false,
            // 8 (id, prob) pairs of 4 + 4 bytes, plus the token id and framing.
            bytes_per_token: 72.0,
            acceptance: AcceptancePrior::default(),
            link: LinkConfig::default(),
        }
    }
}

/// What the pool contributes to a plan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanContext {
    /// Draft-model seconds per drafted token, as measured on the draft node.
    pub t_draft_s: f64,
    /// Expected batching-window and queue wait.
    pub queue_s: f64,
    /// Verify cost to plan with (the pool's marginal cost under load).
    pub verify: VerifyCost,
}

/// One finished round as the session saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundObservation {
    /// Tokens drafted in the block.
    pub drafted: usize,
    /// Tokens the verdict accepted.
    pub accepted: usize,
    /// When the block was sent (session's clock, seconds).
    pub sent_s: f64,
    /// When the verdict arrived (same clock).
    pub received_s: f64,
    /// Server-side time (queue + verify) the verdict reports.
    pub server_s: f64,
}

/// Chooses γ for one session from its own history.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GammaController {
    config: ControllerConfig,
    acceptance: AcceptanceEstimator,
    link: LinkEstimator,
}

impl GammaController {
    /// A controller that plans from the priors until rounds are observed.
    pub fn new(config: ControllerConfig) -> Self {
        Self {
            config,
            acceptance: AcceptanceEstimator::new(config.acceptance),
            link: LinkEstimator::new(config.link),
        }
    }

    /// γ for the next round.
    pub fn plan(&self, ctx: PlanContext) -> GammaPlan {
        plan(&self.inputs(ctx))
    }

    /// The objective's inputs as of now (exposed for logging and tests).
    pub fn inputs(&self, ctx: PlanContext) -> GammaInputs {
        GammaInputs {
            alpha: self.acceptance.alpha(),
            t_draft_s: ctx.t_draft_s,
            rtt_s: self.link.rtt_s(),
            bandwidth_bytes_per_s: self.link.bandwidth_bytes_per_s(),
            bytes_per_token: self.config.bytes_per_token,
            queue_s: ctx.queue_s,
            verify: ctx.verify,
            min_gamma: self.config.min_gamma,
            max_gamma: self.config.max_gamma,
            pipelined: self.config.pipelined,
        }
    }

    /// Feeds one round's verdict and timing. An impossible round (more accepted than drafted)
    /// is rejected whole, leaving every estimate untouched.
    pub fn observe(&mut self, round: RoundObservation) -> Result<(), SpecError> {
        self.acceptance
            .observe(round.drafted, round.accepted, round.received_s)?;
        self.link
            .observe_round_trip(round.sent_s, round.received_s, round.server_s);
        Ok(())
    }

    /// Feeds a bandwidth sample (a probe, or a large message's transfer time).
    pub fn observe_transfer(&mut self, bytes: u64, transfer_s: f64, now_s: f64) {
        self.link.observe_transfer(bytes, transfer_s, now_s);
    }

    /// Changes the γ bounds (operator policy) without losing the estimates.
    pub fn set_bounds(&mut self, min_gamma: usize, max_gamma: usize) {
        self.config.min_gamma = min_gamma;
        self.config.max_gamma = max_gamma;
    }

    /// Current acceptance-rate estimate.
    pub fn alpha(&self) -> f64 {
        self.acceptance.alpha()
    }

    /// Current link estimates.
    pub fn link(&self) -> &LinkEstimator {
        &self.link
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: PlanContext = PlanContext {
        t_draft_s: 0.005,
        queue_s: 0.005,
        verify: VerifyCost {
            base_s: 0.02,
            per_token_s: 0.001,
        },
    };

    fn round(t: f64, drafted: usize, accepted: usize, rtt: f64) -> RoundObservation {
        RoundObservation {
            drafted,
            accepted,
            sent_s: t,
            received_s: t + rtt + 0.03,
            server_s: 0.03,
        }
    }

    #[test]
    fn plans_from_priors_then_follows_acceptance() {
        let mut c = GammaController::new(ControllerConfig::default());
        let initial = c.plan(CTX).gamma;
        assert!(initial > 0);
        for i in 0..50 {
            c.observe(round(f64::from(i), 8, 8, 0.04)).unwrap();
        }
        let confident = c.plan(CTX).gamma;
        assert!(confident > initial, "{initial} → {confident}");
        for i in 50..450 {
            c.observe(round(f64::from(i), 4, 0, 0.04)).unwrap();
        }
        assert!(c.alpha() < 0.05);
        assert_eq!(c.plan(CTX).gamma, 0);
    }

    #[test]
    fn longer_links_get_longer_blocks() {
        let mut near = GammaController::new(ControllerConfig::default());
        let mut far = near;
        for i in 0..20 {
            near.observe(round(f64::from(i), 4, 3, 0.001)).unwrap();
            far.observe(round(f64::from(i), 4, 3, 0.1)).unwrap();
        }
        assert!((far.link().rtt_s() - 0.1).abs() < 1e-6);
        assert!(far.plan(CTX).gamma > near.plan(CTX).gamma);
    }

    #[test]
    fn impossible_round_changes_nothing() {
        let mut c = GammaController::new(ControllerConfig::default());
        let before = c;
        assert!(c.observe(round(0.0, 2, 3, 0.5)).is_err());
        assert_eq!(c, before);
    }

    #[test]
    fn bounds_and_transfers_reach_the_inputs() {
        let mut c = GammaController::new(ControllerConfig::default());
        c.set_bounds(2, 3);
        let g = c.plan(CTX).gamma;
        assert!((2..=3).contains(&g));
        c.observe_transfer(1_000_000, 0.5, 1.0);
        assert!((c.inputs(CTX).bandwidth_bytes_per_s - 2e6).abs() < 1.0);
    }
}
