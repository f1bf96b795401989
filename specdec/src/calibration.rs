//! Calibration of the round-time model against rounds as they really run.
//!
//! [`round_time_s`](crate::gamma::round_time_s) adds up the parts it is told about: γ·t_draft,
//! the RTT, the transfer, the queue and the verify forward. A real round also pays what none of
//! them covers: the draft node applying the verdict and streaming text, the catch-up step that
//! feeds the tokens committed while γ was 0, and — when draft and target share a CPU — the
//! draft forward slowing the target down and vice versa. On the development machine the model
//! put a γ = 0 round at 130 ms where it took 210 ms, and a fixed γ = 2 that the model said would
//! win lost 8 %.
//!
//! The coordinator sees every round's draft-side time exactly: a block arrives `cycle` after
//! the previous one, and the draft node reports the round trip `rt` of the previous block (send
//! → verdict received), so `draft_side = cycle − rt` is the time from receiving a verdict to
//! sending the next block of γ tokens. The model predicts γ·t_draft for it. The residual
//!
//! ```text
//! r(γ) = draft_side − γ·t_draft ≈ fixed + γ·per_token
//! ```
//!
//! is learnt as two decaying averages — `fixed` from γ = 0 rounds, `per_token` from the others
//! as `(r − fixed) / γ` — and added to the model: `fixed` to the per-round cost (with the RTT)
//! and `per_token` to t_draft. Both are per draft stream (one draft node), so they carry over
//! from one request to the next. A block the draft node drafted while the previous one was being
//! verified (pipelining; it says so in `DraftBlock.drafted_ahead`) gives no sample. The first
//! γ > 0 block after γ = 0 rounds gives none either: its draft side includes the catch-up forward
//! over the tokens committed meanwhile (a cost of switching drafting on, not of drafting).

use crate::estimate::Ewma;
use crate::gamma::GammaInputs;

/// Observed draft-side residuals of one draft stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundCalibration {
    fixed: Ewma,
    per_token: Ewma,
}

/// Draft-side times beyond this are not rounds (a stalled client, a retry after an error).
pub const MAX_DRAFT_SIDE_S: f64 = 5.0;

impl RoundCalibration {
    /// No correction until rounds are observed; samples fade with `half_life_s`.
    pub fn new(half_life_s: f64) -> Self {
        Self {
            fixed: Ewma::new(half_life_s),
            per_token: Ewma::new(half_life_s),
        }
    }

    /// One round: the draft node took `draft_side_s` from a verdict to the next block of
    /// `gamma` tokens, with t_draft modelled at `t_draft_s`.
    pub fn observe(&mut self, gamma: usize, draft_side_s: f64, t_draft_s: f64, now_s: f64) {
        if !(draft_side_s.is_finite() && (0.0..=MAX_DRAFT_SIDE_S).contains(&draft_side_s)) {
            return;
        }
        let residual = draft_side_s - gamma as f64 * t_draft_s.max(0.0);
        if gamma == 0 {
            self.fixed.observe(residual, now_s);
        } else {
            let per = (residual - self.fixed_s()) / gamma as f64;
            // Weighted by γ: a long block measures the per-token cost better than a short one.
            self.per_token.observe_weighted(per, gamma as f64, now_s);
        }
    }

    /// Extra per-round time (≥ 0).
    pub fn fixed_s(&self) -> f64 {
        self.fixed.get().unwrap_or(0.0).max(0.0)
    }

    /// Extra time per drafted token (may be negative when t_draft overstates the cost).
    pub fn per_token_s(&self) -> f64 {
        self.per_token.get().unwrap_or(0.0)
    }

    /// Whether any γ > 0 round has been seen (until then `per_token` is unknown, not zero).
    pub fn knows_drafting(&self) -> bool {
        self.per_token.get().is_some()
    }

    /// The model's inputs with the learnt residuals added: `fixed` joins the per-round cost,
    /// `per_token` the draft cost (never below zero in total).
    pub fn apply(&self, inputs: &mut GammaInputs) {
        inputs.rtt_s = inputs.rtt_s.max(0.0) + self.fixed_s();
        inputs.t_draft_s = (inputs.t_draft_s.max(0.0) + self.per_token_s()).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::VerifyCost;
    use crate::gamma::{plan, round_time_s};

    fn inputs(t_draft: f64) -> GammaInputs {
        GammaInputs {
            alpha: 0.7,
            t_draft_s: t_draft,
            rtt_s: 0.05,
            bandwidth_bytes_per_s: 2.5e6,
            bytes_per_token: 72.0,
            queue_s: 0.001,
            verify: VerifyCost {
                base_s: 0.08,
                per_token_s: 0.004,
            },
            min_gamma: 0,
            max_gamma: 8,
            pipelined: false,
        }
    }

    #[test]
    fn learns_fixed_and_per_token_overheads_and_the_model_then_predicts_real_rounds() {
        // Reality: 80 ms per round beyond the model, and drafting costs 45 ms a token where the
        // node reports 30.
        let (fixed, real_draft, reported) = (0.08, 0.045, 0.03);
        let mut c = RoundCalibration::new(30.0);
        let mut t = 0.0;
        for round in 0..200 {
            let gamma = [0, 2, 0, 4, 0, 8][round % 6];
            let draft_side = fixed + gamma as f64 * real_draft;
            c.observe(gamma, draft_side, reported, t);
            t += 0.2;
        }
        assert!((c.fixed_s() - fixed).abs() < 1e-9, "{}", c.fixed_s());
        assert!(
            (c.per_token_s() - 0.015).abs() < 1e-9,
            "{}",
            c.per_token_s()
        );
        let mut model = inputs(reported);
        c.apply(&mut model);
        let truth = inputs(real_draft);
        for gamma in 0..=8 {
            let predicted = round_time_s(&model, gamma);
            let real = round_time_s(&truth, gamma) + fixed;
            assert!(
                (predicted - real).abs() < 1e-9,
                "γ={gamma}: {predicted} vs {real}"
            );
        }
    }

    #[test]
    fn expensive_real_drafting_switches_speculation_off() {
        // The node reports cheap drafting, but every drafted token really costs as much as a
        // verify step (draft and target fighting over one CPU): the calibrated plan is γ = 0.
        let reported = 0.01;
        let mut model = inputs(reported);
        assert!(plan(&model).gamma > 0, "uncalibrated, drafting looks cheap");
        let mut c = RoundCalibration::new(30.0);
        for i in 0..50 {
            let gamma = if i % 2 == 0 { 0 } else { 3 };
            c.observe(gamma, 0.02 + gamma as f64 * 0.12, reported, f64::from(i));
        }
        c.apply(&mut model);
        assert_eq!(plan(&model).gamma, 0);
    }

    #[test]
    fn stalls_and_garbage_are_ignored() {
        let mut c = RoundCalibration::new(30.0);
        c.observe(0, 60.0, 0.03, 1.0);
        c.observe(0, f64::NAN, 0.03, 1.0);
        c.observe(2, -1.0, 0.03, 1.0);
        assert_eq!(c.fixed_s(), 0.0);
        assert!(!c.knows_drafting());
        let mut i = inputs(0.03);
        let before = i;
        c.apply(&mut i);
        assert_eq!(i, before);
    }

    #[test]
    fn the_draft_cost_never_goes_negative() {
        let mut c = RoundCalibration::new(30.0);
        c.observe(4, 0.0, 0.05, 1.0);
        let mut i = inputs(0.05);
        c.apply(&mut i);
        assert!(i.t_draft_s >= 0.0);
    }
}
