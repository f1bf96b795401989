//! The network-aware candidate-length controller: choose γ, the number of tokens to draft per
//! round, to maximise expected committed tokens per second of wall time for one session.
//!
//! ```text
//! γ* = argmax_{min_γ ≤ γ ≤ max_γ}  E[N(γ)] / T_round(γ)
//! E[N(γ)]   = (1 − α^{γ+1}) / (1 − α)          (= γ + 1 at α = 1; = 1 at γ = 0)
//! C(γ)      = RTT + γ·bytes_per_token / bandwidth + queue + t_verify(γ + 1)
//! T_round   = γ·t_draft + C(γ)                  (serial)
//! ```
//!
//! t_verify covers γ + 1 tokens because the forward also processes the last committed token
//! (which produces the row predicting the first drafted position). γ = 0 is plain target
//! decoding through the same path: E[N] = 1, no drafting cost, `T = C(0)`; it is what the
//! argmax picks whenever drafting cannot pay — drafting as slow as verifying, or α so low that the
//! extra tokens are mostly rejected.
//!
//! **Pipelined drafting.** While block k is in flight the draft node drafts block k + 1, assuming
//! block k is accepted in full. That guess pays off when all γ tokens are accepted *and* the bonus
//! token equals the draft's own next token, probability ≈ α^{γ+1}; then drafting overlaps the
//! round trip and the round costs `max(γ·t_draft, C(γ))`. Otherwise the speculative block is
//! dropped and the next round pays the serial time. In steady state rounds are i.i.d., so
//!
//! ```text
//! h        = α^{γ+1}                       (h = 0 at γ = 0: nothing is drafted)
//! T_pipe   = h·max(γ·t_draft, C(γ)) + (1 − h)·(γ·t_draft + C(γ))
//! ```
//!
//! Since `max(a, b) ≤ a + b`, the pipelined rate is never below the serial one for any γ, hence
//! also at the optimum. Under verify-pool load, pass [`VerifyCost::marginal`] as `verify`: the
//! same objective then shortens γ or switches speculation off.

use crate::cost::VerifyCost;

/// Hard ceiling on γ regardless of configuration, keeping `plan` O(1) and its inputs sane.
pub const MAX_GAMMA: usize = 64;

/// Everything the objective depends on, for one session and round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GammaInputs {
    /// Per-token acceptance probability, in [0, 1].
    pub alpha: f64,
    /// Draft-model seconds per drafted token.
    pub t_draft_s: f64,
    /// Network round-trip time, excluding server work.
    pub rtt_s: f64,
    /// Link bandwidth; ≤ 0 means nothing can be sent, so only γ = 0 has finite cost.
    pub bandwidth_bytes_per_s: f64,
    /// Payload bytes per drafted token (its id plus its sparse q).
    pub bytes_per_token: f64,
    /// Expected wait in the coordinator's batching window and the verify node's queue.
    pub queue_s: f64,
    /// Verify-time model (possibly the pool's marginal cost).
    pub verify: VerifyCost,
    /// Lower bound on γ (0 allows plain decoding).
    pub min_gamma: usize,
    /// Upper bound on γ; raised to `min_gamma` if below it, capped at [`MAX_GAMMA`].
    pub max_gamma: usize,
    /// Whether the draft node drafts the next block while this one is in flight.
    pub pipelined: bool,
}

/// The controller's decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GammaPlan {
    /// Tokens to draft this round.
    pub gamma: usize,
    /// Expected committed tokens per second at that γ.
    pub tokens_per_s_expected: f64,
}

/// E[N(γ)] = (1 − α^{γ+1}) / (1 − α): expected tokens one round commits (accepted + 1).
/// Evaluated as `−expm1((γ+1)·ln α) / (1 − α)`, which stays accurate as α → 1, where it tends to
/// γ + 1.
pub fn expected_tokens(alpha: f64, gamma: usize) -> f64 {
    let alpha = sanitize_alpha(alpha);
    let n = gamma as f64 + 1.0;
    if alpha >= 1.0 {
        return n;
    }
    if alpha <= 0.0 {
        return 1.0;
    }
    let one_minus = 1.0 - alpha;
    if one_minus < 1e-12 {
        return n;
    }
    -(n * (-one_minus).ln_1p()).exp_m1() / one_minus
}

/// Expected wall time of one round at `gamma` (serial or pipelined per `inputs.pipelined`).
pub fn round_time_s(inputs: &GammaInputs, gamma: usize) -> f64 {
    let drafting = gamma as f64 * non_negative(inputs.t_draft_s);
    let transfer = if gamma == 0 || non_negative(inputs.bytes_per_token) == 0.0 {
        0.0
    } else if inputs.bandwidth_bytes_per_s > 0.0 {
        gamma as f64 * inputs.bytes_per_token / inputs.bandwidth_bytes_per_s
    } else {
        f64::INFINITY
    };
    let verify = non_negative(inputs.verify.base_s)
        + non_negative(inputs.verify.per_token_s) * (gamma as f64 + 1.0);
    let critical = non_negative(inputs.rtt_s) + transfer + non_negative(inputs.queue_s) + verify;
    let serial = drafting + critical;
    let t = if inputs.pipelined && gamma > 0 {
        let hidden = sanitize_alpha(inputs.alpha).powi(gamma as i32 + 1);
        hidden * drafting.max(critical) + (1.0 - hidden) * serial
    } else {
        serial
    };
    // A floor keeps the rate finite (and increasing in E[N]) for an all-zero cost model.
    t.max(1e-9)
}

/// Expected committed tokens per second at `gamma`.
pub fn tokens_per_s(inputs: &GammaInputs, gamma: usize) -> f64 {
    expected_tokens(inputs.alpha, gamma) / round_time_s(inputs, gamma)
}

/// Picks γ* within the bounds. Ties (to a relative 1e-12) go to the shorter γ, which wastes less
/// verify work for the same rate.
pub fn plan(inputs: &GammaInputs) -> GammaPlan {
    let lo = inputs.min_gamma.min(MAX_GAMMA);
    let hi = inputs.max_gamma.min(MAX_GAMMA).max(lo);
    let mut best = GammaPlan {
        gamma: lo,
        tokens_per_s_expected: tokens_per_s(inputs, lo),
    };
    for gamma in lo + 1..=hi {
        let rate = tokens_per_s(inputs, gamma);
        if rate > best.tokens_per_s_expected * (1.0 + 1e-12) {
            best = GammaPlan {
                gamma,
                tokens_per_s_expected: rate,
            };
        }
    }
    best
}

/// [`plan`] for a session currently at `current_gamma`: from γ = 0, drafting is switched back on
/// only when the best γ is expected to commit tokens at least `switch_on_gain` times as fast as
/// γ = 0. Switching on has a cost the per-round model leaves out (the draft side's catch-up
/// forward over every token committed while it was not drafting), and near break-even flapping
/// in and out of speculation loses more than it wins.
pub fn plan_from(inputs: &GammaInputs, current_gamma: usize, switch_on_gain: f64) -> GammaPlan {
    let best = plan(inputs);
    let zero = tokens_per_s(inputs, 0);
    let below_gain = best.tokens_per_s_expected < switch_on_gain * zero;
    if best.gamma > 0 && current_gamma == 0 && inputs.min_gamma == 0 && below_gain {
        GammaPlan {
            gamma: 0,
            tokens_per_s_expected: zero,
        }
    } else {
        best
    }
}

fn sanitize_alpha(alpha: f64) -> f64 {
    if alpha.is_nan() {
        0.0
    } else {
        alpha.clamp(0.0, 1.0)
    }
}

fn non_negative(x: f64) -> f64 {
    if x > 0.0 {
        x
    } else {
        0.0
    }
}

#[cfg(test)]
#[path = "gamma_tests.rs"]
mod tests;
