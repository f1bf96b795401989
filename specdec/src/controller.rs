//! The γ controller: the one place that decides how many tokens a session drafts next.
//!
//! It is pure (time is a parameter, no I/O) and split by who the state belongs to:
//!
//! - [`DraftSide`]: one draft node's stream: its link estimates (RTT, bandwidth), and per
//!   drafting method ([`DraftMethod`]) its reported draft speed and what its rounds really cost
//!   ([`RoundCalibration`]); whether it drafts ahead (pipelining), the largest γ it accepts (its
//!   cap) and its default method, from the hello. Lives as long as the stream, so what is learnt
//!   carries over from one request to the next.
//! - [`SessionGamma`]: one session's drafting method, acceptance estimate, round count, the γ of
//!   its last block and its wire bytes per drafted token.
//! - [`GammaController`]: the operator's bounds and switches ([`GammaPolicy`]) plus the rules:
//!   the objective ([`plan_from`]), probing sessions that sit at γ = 0, the switch-on hysteresis,
//!   gating calibration samples to steady rounds, the request's budget and the bounds.
//!
//! The coordinator calls [`GammaController::on_block`] when a block arrives,
//! [`GammaController::on_verdict`] when its verdict is known, and [`GammaController::plan`] for
//! the γ it sends with the verdict. Draft nodes obey the γ they are given; their own setting is
//! only the cap they announce.
//!
//! **Methods.** A session is planned with its own method's draft cost and calibration: a prompt
//! lookup costs microseconds per token where a draft model costs milliseconds, so on a node
//! where model drafting does not pay, lookup still may. Only [`DraftMethod::Model`] sessions are
//! planned as pipelined (lookup and hybrid do not draft ahead). Lookup has no draft model and
//! so no catch-up forward: its first γ > 0 block after γ = 0 rounds is a steady calibration
//! sample, and switching it back on needs no [`SWITCH_ON_GAIN`] margin. Acceptance stays per
//! session, from the same prior for every method (see [`SessionGamma::new`]).

use crate::cost::VerifyCost;
use crate::gamma::{plan, plan_from, tokens_per_s, GammaInputs, MAX_GAMMA};
use crate::types::DraftMethod;

/// At γ = 0 a session's α is never observed again, so a pessimistic early estimate would keep
/// speculation off for good: such a session gets a short probe block at round `PROBE_FIRST` and
/// then at every power of two (exponential backoff: where speculation really does not pay, as on
/// one shared CPU, the probes' cost fades; where it does, one probe brings γ back).
pub const PROBE_FIRST: u64 = 16;
/// γ of such a probe block.
pub const PROBE_GAMMA: usize = 2;
/// A probe is skipped when, with the stream's measured drafting cost, even this acceptance
/// would not make γ > 0 pay: then α is not what keeps speculation off, and measuring it again
/// would only cost time.
pub const PROBE_OPTIMISTIC_ALPHA: f64 = 0.9;
/// A session at γ = 0 switches drafting back on only when the model expects it to commit tokens
/// at least this much faster: the switch itself costs a catch-up forward on the draft side over
/// every token committed meanwhile, which the per-round model does not price, and where drafting
/// is about break-even (one shared CPU) flapping in and out of speculation lost 6 %.
pub const SWITCH_ON_GAIN: f64 = 1.10;
/// A hybrid session lets its model draft only where the model alone is expected to commit
/// tokens at least this much faster than plain decoding, all the time (not only when switching
/// on): its alternative, lookup, costs nothing, while a model step in a hybrid block also feeds
/// the looked-up tokens before it (a catch-up the per-round model does not price) and, on one
/// CPU shared with the target, slows the target down. On the development machine (one shared
/// CPU) the model was predicted 1.12× plain decoding on grounded prompts, and letting it fill the
/// gaps made hybrid 1.21–1.23× target-only where lookup alone made 1.38–1.45×.
pub const HYBRID_MODEL_GAIN: f64 = 1.25;
/// Draft cost of the draft model assumed for a draft node that has not reported one.
pub const DEFAULT_DRAFT_S_PER_TOKEN: f64 = 0.005;
/// Draft cost of prompt lookup assumed before a node reports one: a suffix match over the
/// context, no forward (tens of microseconds for a block, not milliseconds per token).
pub const DEFAULT_LOOKUP_S_PER_TOKEN: f64 = 20e-6;
/// Half-life of a draft stream's round calibration: long enough to carry over between
/// requests, short enough to follow a change of load.
pub const CALIBRATION_HALF_LIFE_S: f64 = 60.0;
/// Wire bytes of one draft token id; a sparse q entry adds an id and a probability.
pub const TOKEN_BYTES: f64 = 5.0;
/// Wire bytes of one sparse q entry.
pub const Q_ENTRY_BYTES: f64 = 10.0;

/// The operator's bounds and switches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GammaPolicy {
    /// Smallest γ the controller may pick (0 allows plain decoding).
    pub min_gamma: usize,
    /// Largest γ the controller may pick (capped at [`MAX_GAMMA`]).
    pub max_gamma: usize,
    /// γ of a session's first block.
    pub initial_gamma: usize,
    /// false forces γ = 0.
    pub speculation_enabled: bool,
    /// Plan every draft node as pipelined, whatever its hello says.
    pub assume_pipelined: bool,
}

impl Default for GammaPolicy {
    fn default() -> Self {
        Self {
            min_gamma: 0,
            max_gamma: 8,
            initial_gamma: 4,
            speculation_enabled: true,
            assume_pipelined: false,
        }
    }
}

/// A block as it arrives, with the timing the draft node reports about the previous round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockArrival {
    /// Arrival time (the controller's clock, seconds).
    pub now_s: f64,
    /// How the block was drafted (the session's method).
    pub method: DraftMethod,
    /// Tokens drafted in the block (lookup may propose fewer than γ, or none).
    pub gamma: usize,
    /// Sparse q entries in the block (0 when greedy).
    pub q_entries: usize,
    /// The block was drafted while the previous one was verified, and kept.
    pub drafted_ahead: bool,
    /// The draft node's send → verdict time of the previous block (seconds; 0: none).
    pub last_round_trip_s: f64,
    /// The coordinator's own time for that previous round, receipt → verdict (seconds; 0:
    /// unknown).
    pub last_server_s: f64,
}

/// What the verify pool contributes to a plan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolContext {
    /// Expected batching-window and queue wait.
    pub queue_s: f64,
    /// Verify cost to plan with (the node's marginal cost under its load).
    pub verify: VerifyCost,
}

/// The rules; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GammaController {
    policy: GammaPolicy,
}

impl GammaController {
    /// A controller with `policy` in force.
    pub fn new(policy: GammaPolicy) -> Self {
        Self { policy }
    }

    /// The bounds and switches in force.
    pub fn policy(&self) -> &GammaPolicy {
        &self.policy
    }

    /// Replaces the bounds and switches; sessions keep their estimates.
    pub fn set_policy(&mut self, policy: GammaPolicy) {
        self.policy = policy;
    }

    /// Largest γ a stream may be given: the policy's bound within the node's cap.
    pub fn max_gamma(&self, draft: &DraftSide) -> usize {
        self.policy.max_gamma.min(draft.max_gamma).min(MAX_GAMMA)
    }

    /// γ of a session's first block on `draft` (what the Welcome says).
    pub fn start_gamma(&self, draft: &DraftSide) -> usize {
        if self.policy.speculation_enabled {
            self.policy.initial_gamma.min(self.max_gamma(draft))
        } else {
            0
        }
    }

    /// A block arrived: learns the link's RTT from the draft's last round trip and, on a steady
    /// round, what the session's method really costs on the draft side (see
    /// [`crate::calibration`]).
    ///
    /// A block that names another method than the session's switches the session to it (the
    /// latest method wins): its acceptance restarts from the prior, since what one method's
    /// drafts achieved says nothing about another's, and the block gives no calibration sample
    /// (its cycle began under the old method).
    pub fn on_block(&self, draft: &mut DraftSide, s: &mut SessionGamma, b: BlockArrival) {
        let switched = b.method != s.method;
        if switched {
            // Every per-method estimate restarts; the round count and last block stay.
            *s = SessionGamma {
                rounds: s.rounds,
                last_block_gamma: s.last_block_gamma,
                last_block_at_s: s.last_block_at_s,
                bytes_per_token: s.bytes_per_token,
                block_source: s.block_source,
                ..SessionGamma::new(s.prior, b.method)
            };
        }
        let previous_at = s.last_block_at_s.replace(b.now_s);
        let previous_gamma = std::mem::replace(&mut s.last_block_gamma, b.gamma);
        if b.gamma > 0 {
            s.bytes_per_token = TOKEN_BYTES + Q_ENTRY_BYTES * b.q_entries as f64 / b.gamma as f64;
        }
        if !(b.last_round_trip_s > 0.0 && b.last_server_s > 0.0) {
            return;
        }
        let rt = b.last_round_trip_s;
        // The draft's last round trip minus our own time for that round is the link's RTT.
        draft
            .link
            .observe_round_trip(b.now_s - rt, b.now_s, b.last_server_s);
        // The rest of the cycle since the previous block is the draft side: verdict received →
        // this block sent. A block drafted during the previous round (pipelining, kept) says
        // nothing about drafting. Nor does the first γ > 0 block after γ = 0 rounds of a method
        // with a model: its draft side includes the catch-up forward over every token committed
        // meanwhile, a one-off cost of switching drafting on, not a per-token cost of drafting.
        //
        // A hybrid session's block calibrates the source it was drafted with (what the previous
        // verdict told the node), and its first block with the model after lookup-only ones
        // includes the model's catch-up like a switch-on.
        let source = s.source();
        let source_switched = std::mem::replace(&mut s.block_source, source) != source;
        let caught_up = (previous_gamma > 0 && !source_switched) || !source.uses_model();
        let steady = !switched && (b.gamma == 0 || (caught_up && !b.drafted_ahead));
        if let (Some(prev), true) = (previous_at, steady) {
            let cycle = (b.now_s - prev).max(0.0);
            let t_draft = draft.t_draft_s(source);
            draft.methods[source.index()].calibration.observe(
                b.gamma,
                cycle - rt,
                t_draft,
                b.now_s,
            );
        }
    }

    /// A verdict for a block of `drafted` tokens (of the `granted` γ; 0: unknown) accepted
    /// `accepted` of them. An impossible verdict (more accepted than drafted) changes no estimate
    /// but still counts the round.
    ///
    /// `model_mask` marks a hybrid block's model-drafted tokens (bit i: token i; ignored for
    /// other methods). For a hybrid session, the positions the target tested (the accepted ones
    /// and the first rejection) also feed one acceptance estimate per source: the model's marked
    /// tokens and lookup's unmarked ones. Those decide how its next block is drafted
    /// ([`Self::plan_next`]): a block's α mixes the two, and lookup's accepted tokens kept it high
    /// while the model's own proposals failed (or the other way round).
    pub fn on_verdict(
        &self,
        s: &mut SessionGamma,
        granted: usize,
        drafted: usize,
        accepted: usize,
        model_mask: u64,
        now_s: f64,
    ) {
        let valid = s.acceptance.observe(drafted, accepted, now_s).is_ok();
        if valid && s.method == DraftMethod::Hybrid {
            let tested = if accepted < drafted {
                accepted + 1
            } else {
                drafted
            };
            let below = |n: usize| 1u64.checked_shl(n as u32).map_or(u64::MAX, |b| b - 1);
            let model_tested = (model_mask & below(tested)).count_ones() as usize;
            let model_accepted = (model_mask & below(accepted)).count_ones() as usize;
            s.model_acceptance
                .observe_tested(model_tested, model_accepted, now_s);
            s.lookup_acceptance.observe_tested(
                tested - model_tested,
                accepted - model_accepted,
                now_s,
            );
            // How much of the γ granted lookup filled, in blocks lookup drafted alone.
            if s.block_source == DraftMethod::Lookup && granted > 0 {
                let filled = (drafted as f64 / granted as f64).min(1.0);
                s.lookup_yield.observe(filled, now_s);
            }
        }
        s.rounds += 1;
    }

    /// γ for the session's next block; `remaining` is the request's token budget after this
    /// verdict (0: no budget given).
    pub fn plan(
        &self,
        draft: &DraftSide,
        s: &SessionGamma,
        pool: PoolContext,
        remaining: u32,
    ) -> usize {
        self.plan_next(draft, s, pool, remaining).0
    }

    /// γ and drafting method for the session's next block. Every method but hybrid drafts with
    /// itself. A hybrid session's next block is drafted by the source expected to commit tokens
    /// fastest, judged on each source's own acceptance and cost, each planned alone and not
    /// pipelined:
    ///
    /// - `Lookup` unless the model alone is expected to beat plain decoding by
    ///   [`HYBRID_MODEL_GAIN`] and to beat lookup alone (lookup's plan scaled by the share of the
    ///   γ its blocks have filled, [`SessionGamma::lookup_yield`]): lookup's proposals cost
    ///   nothing, so the session then does at least as well as lookup, where letting model steps
    ///   fill the gaps between matches cost more than they gained (one CPU shared with the
    ///   target; or a draft host whose model steps the target waits for, as hybrid does not
    ///   draft ahead);
    /// - else `Hybrid` (lookup where it matches, the model elsewhere) when lookup's proposals
    ///   are accepted at least as often as the model's, and `Model` when they are not: looked-up
    ///   tokens that fail more often would only cut the model's runs short.
    ///
    /// While the model drafts, lookup's α is re-measured by a mixed block at round
    /// [`PROBE_FIRST`] and every power of two after it. Once the model is off it stays off for
    /// the session (the request): a probe would first feed the draft model everything committed
    /// since its last step, and on one shared CPU those catch-up forwards cost hybrid more than
    /// lookup alone gained (1.28× against 1.46× on grounded prompts); the next request starts
    /// again from the prior.
    pub fn plan_next(
        &self,
        draft: &DraftSide,
        s: &SessionGamma,
        pool: PoolContext,
        remaining: u32,
    ) -> (usize, DraftMethod) {
        let method = match s.method {
            DraftMethod::Hybrid => self.hybrid_source(draft, s, pool),
            m => m,
        };
        (self.plan_as(draft, s, method, pool, remaining), method)
    }

    /// How a hybrid session drafts its next block (see [`Self::plan_next`]).
    fn hybrid_source(&self, draft: &DraftSide, s: &SessionGamma, pool: PoolContext) -> DraftMethod {
        // One source alone, at acceptance `alpha`: its best plan and the plain-decoding rate.
        let alone = |method: DraftMethod, alpha: f64| {
            let mut inputs = self.inputs_as(draft, s, method, pool);
            inputs.alpha = alpha;
            // A hybrid session does not draft ahead, whatever the node does for model sessions.
            inputs.pipelined = false;
            draft.calibration(method).apply(&mut inputs);
            (plan(&inputs), tokens_per_s(&inputs, 0))
        };
        let model_pays = |alpha: f64| {
            let (best, zero) = alone(DraftMethod::Model, alpha);
            best.gamma > 0 && best.tokens_per_s_expected >= HYBRID_MODEL_GAIN * zero
        };
        let (alpha_model, alpha_lookup) = (s.model_alpha(), s.lookup_alpha());
        if !model_pays(alpha_model) {
            return DraftMethod::Lookup;
        }
        // Lookup alone, planned as if it filled every γ, scaled to the share of the γ it has
        // filled (the rest of its blocks are plain decoding).
        let (model, zero) = alone(DraftMethod::Model, alpha_model);
        let lookup = alone(DraftMethod::Lookup, alpha_lookup).0;
        let y = s.lookup_yield();
        let lookup_rate = y * lookup.tokens_per_s_expected + (1.0 - y) * zero;
        if model.tokens_per_s_expected <= lookup_rate {
            return DraftMethod::Lookup;
        }
        let probe = s.rounds >= PROBE_FIRST && s.rounds.is_power_of_two();
        if alpha_lookup >= alpha_model || probe {
            DraftMethod::Hybrid
        } else {
            DraftMethod::Model
        }
    }

    /// [`Self::plan`] as if the session drafted with `method`.
    fn plan_as(
        &self,
        draft: &DraftSide,
        s: &SessionGamma,
        method: DraftMethod,
        pool: PoolContext,
        remaining: u32,
    ) -> usize {
        let max_gamma = self.max_gamma(draft);
        if !self.policy.speculation_enabled || max_gamma == 0 {
            return 0;
        }
        let min_gamma = self.policy.min_gamma.min(max_gamma);
        let mut inputs = self.inputs_as(draft, s, method, pool);
        let calibration = draft.calibration(method);
        let drafting_measured = calibration.knows_drafting();
        calibration.apply(&mut inputs);
        // The switch-on margin prices the catch-up forward of a draft model; lookup has none.
        let gain = if method.uses_model() {
            SWITCH_ON_GAIN
        } else {
            1.0
        };
        let mut gamma = plan_from(&inputs, s.last_block_gamma, gain).gamma;
        let could_pay = !drafting_measured || {
            let optimistic = GammaInputs {
                alpha: inputs.alpha.max(PROBE_OPTIMISTIC_ALPHA),
                ..inputs
            };
            plan(&optimistic).gamma > 0
        };
        let probe = s.rounds >= PROBE_FIRST && s.rounds.is_power_of_two() && could_pay;
        if gamma == 0 && probe {
            gamma = PROBE_GAMMA.min(max_gamma);
        }
        // Never ask for more draft tokens than the request can still use.
        if remaining > 0 {
            gamma.min((remaining as usize).saturating_sub(1).max(min_gamma))
        } else {
            gamma
        }
    }

    /// The objective's inputs for a session as of now, with its method's draft cost, before
    /// calibration (for logs and tests). Only model sessions are planned as pipelined: a draft
    /// node drafts ahead only with its model (lookup and hybrid draft after the verdict; lookup
    /// costs too little to gain from overlapping).
    pub fn inputs(&self, draft: &DraftSide, s: &SessionGamma, pool: PoolContext) -> GammaInputs {
        self.inputs_as(draft, s, s.method, pool)
    }

    /// [`Self::inputs`] as if the session drafted with `method`.
    fn inputs_as(
        &self,
        draft: &DraftSide,
        s: &SessionGamma,
        method: DraftMethod,
        pool: PoolContext,
    ) -> GammaInputs {
        let max_gamma = self.max_gamma(draft);
        let pipelined = self.policy.assume_pipelined || draft.pipelined;
        GammaInputs {
            alpha: s.alpha_for(method),
            t_draft_s: draft.t_draft_s(method),
            rtt_s: draft.link.rtt_s(),
            bandwidth_bytes_per_s: draft.link.bandwidth_bytes_per_s(),
            bytes_per_token: s.bytes_per_token,
            queue_s: pool.queue_s,
            verify: pool.verify,
            min_gamma: self.policy.min_gamma.min(max_gamma),
            max_gamma,
            pipelined: pipelined && method == DraftMethod::Model,
        }
    }
}

#[path = "controller_state.rs"]
mod state;
pub use state::{DraftCaps, DraftSide, SessionGamma};

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;
