//! The γ controller's state, split by owner: [`DraftSide`] per draft stream (link, per-method
//! costs and calibration, cap) and [`SessionGamma`] per session (method, acceptance, rounds). The
//! rules that read and update them are in [`super::GammaController`].

use crate::calibration::RoundCalibration;
use crate::estimate::{AcceptanceEstimator, AcceptancePrior, Ewma, LinkConfig, LinkEstimator};
use crate::gamma::MAX_GAMMA;
use crate::types::DraftMethod;

use super::{
    CALIBRATION_HALF_LIFE_S, DEFAULT_DRAFT_S_PER_TOKEN, DEFAULT_LOOKUP_S_PER_TOKEN, TOKEN_BYTES,
};

/// What a draft node says about itself when its stream opens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DraftCaps {
    /// Measured draft seconds per token of its default `method` (≤ 0 or non-finite: unknown).
    pub draft_s_per_token: f64,
    /// It drafts the next block while the current one is verified.
    pub pipelined: bool,
    /// Largest γ it accepts (0: it does not draft; its blocks are plain target decoding).
    pub max_gamma: usize,
    /// Its default drafting method (a request may choose another; its blocks say which).
    pub method: DraftMethod,
}

/// What one drafting method costs on one draft stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct MethodCost {
    /// The node's latest report (0 before one).
    pub(super) draft_s_per_token: f64,
    /// Draft-side overheads learnt from this method's rounds.
    pub(super) calibration: RoundCalibration,
}

/// One draft stream's link, per-method costs and cap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DraftSide {
    pub(super) link: LinkEstimator,
    /// Indexed by [`DraftMethod::index`]: a lookup round says nothing about what a model round
    /// costs, nor the other way round.
    pub(super) methods: [MethodCost; 3],
    pub(super) pipelined: bool,
    pub(super) max_gamma: usize,
    pub(super) method: DraftMethod,
}

impl DraftSide {
    /// A stream that has just said hello.
    pub fn new(link: LinkConfig, caps: DraftCaps) -> Self {
        let cost = MethodCost {
            draft_s_per_token: 0.0,
            calibration: RoundCalibration::new(CALIBRATION_HALF_LIFE_S),
        };
        let mut d = Self {
            link: LinkEstimator::new(link),
            methods: [cost; 3],
            pipelined: caps.pipelined,
            max_gamma: caps.max_gamma.min(MAX_GAMMA),
            method: caps.method,
        };
        d.report_draft_cost(caps.method, caps.draft_s_per_token);
        d
    }

    /// The node's latest measurement of `method`'s draft cost (ignored unless positive and
    /// finite).
    pub fn report_draft_cost(&mut self, method: DraftMethod, s_per_token: f64) {
        if s_per_token.is_finite() && s_per_token > 0.0 {
            self.methods[method.index()].draft_s_per_token = s_per_token;
        }
    }

    /// A link probe came back after `elapsed_s` (no server work).
    pub fn observe_probe(&mut self, elapsed_s: f64, now_s: f64) {
        self.link.observe_round_trip(now_s - elapsed_s, now_s, 0.0);
    }

    /// A padded probe of `bytes` came back after `elapsed_s`: the time beyond one RTT moved
    /// the padding.
    pub fn observe_padded_probe(&mut self, bytes: u64, elapsed_s: f64, now_s: f64) {
        let transfer = elapsed_s - self.link.rtt_s();
        self.link.observe_transfer(bytes, transfer, now_s);
    }

    /// Draft seconds per token to plan `method` with: the node's report, or before one a
    /// default: [`DEFAULT_DRAFT_S_PER_TOKEN`] for the model, [`DEFAULT_LOOKUP_S_PER_TOKEN`] for
    /// lookup, and for hybrid what the model costs on this node (its worst case: no match).
    pub fn t_draft_s(&self, method: DraftMethod) -> f64 {
        let reported = self.methods[method.index()].draft_s_per_token;
        if reported > 0.0 {
            return reported;
        }
        match method {
            DraftMethod::Model => DEFAULT_DRAFT_S_PER_TOKEN,
            DraftMethod::Lookup => DEFAULT_LOOKUP_S_PER_TOKEN,
            DraftMethod::Hybrid => self.t_draft_s(DraftMethod::Model),
        }
    }

    /// The node's reported cost of `method` (0 before a report).
    pub fn reported_draft_s_per_token(&self, method: DraftMethod) -> f64 {
        self.methods[method.index()].draft_s_per_token
    }

    /// The node's default drafting method (from its hello).
    pub fn method(&self) -> DraftMethod {
        self.method
    }

    /// Whether the node drafts ahead.
    pub fn pipelined(&self) -> bool {
        self.pipelined
    }

    /// Largest γ the node accepts.
    pub fn max_gamma(&self) -> usize {
        self.max_gamma
    }

    /// Link estimates.
    pub fn link(&self) -> &LinkEstimator {
        &self.link
    }

    /// Learnt draft-side overheads of `method`'s rounds.
    pub fn calibration(&self, method: DraftMethod) -> &RoundCalibration {
        &self.methods[method.index()].calibration
    }
}

/// One session's γ state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SessionGamma {
    pub(super) method: DraftMethod,
    pub(super) prior: AcceptancePrior,
    pub(super) acceptance: AcceptanceEstimator,
    /// Hybrid sessions: acceptance of the model-drafted tokens alone...
    pub(super) model_acceptance: AcceptanceEstimator,
    /// ... and of the looked-up ones.
    pub(super) lookup_acceptance: AcceptanceEstimator,
    /// Hybrid sessions: the share of the granted γ lookup filled in blocks it drafted alone.
    pub(super) lookup_yield: Ewma,
    /// Hybrid sessions: how the next block is drafted (the last verdict's `next_method`; lookup
    /// before the first), and how the last block that arrived was.
    pub(super) next_source: DraftMethod,
    pub(super) block_source: DraftMethod,
    pub(super) rounds: u64,
    pub(super) last_block_gamma: usize,
    pub(super) last_block_at_s: Option<f64>,
    pub(super) bytes_per_token: f64,
}

impl SessionGamma {
    /// A new session drafting with `method`, planning from `prior` until rounds are observed.
    ///
    /// The prior is the same for every method, by choice: lookup's acceptance is bimodal by
    /// prompt (near 1 where the output copies its context — code edits, extraction, quoting —
    /// and near 0 on free prose), so no single lookup prior is better than the operator's
    /// `acceptance.prior_alpha`; it is worth a few trials and the session's own rounds replace
    /// it within two or three blocks. What differs by method, the draft cost, is what decides
    /// whether a lookup session drafts at all.
    pub fn new(prior: AcceptancePrior, method: DraftMethod) -> Self {
        Self {
            method,
            prior,
            acceptance: AcceptanceEstimator::new(prior),
            model_acceptance: AcceptanceEstimator::new(prior),
            lookup_acceptance: AcceptanceEstimator::new(prior),
            // Optimistic until measured: a hybrid session's first blocks are lookup's.
            lookup_yield: Ewma::with_prior(prior.half_life_s, 1.0, 2.0),
            next_source: DraftMethod::Lookup,
            block_source: DraftMethod::Lookup,
            rounds: 0,
            last_block_gamma: 0,
            last_block_at_s: None,
            bytes_per_token: TOKEN_BYTES,
        }
    }

    /// How the session drafts.
    pub fn method(&self) -> DraftMethod {
        self.method
    }

    /// Current acceptance estimate.
    pub fn alpha(&self) -> f64 {
        self.acceptance.alpha()
    }

    /// Acceptance of the draft model's own tokens: for a hybrid session, estimated from its
    /// model-drafted tokens only (the prior until it has some); for the other methods, the
    /// session's α.
    pub fn model_alpha(&self) -> f64 {
        self.alpha_for(DraftMethod::Model)
    }

    /// How the session's next block is drafted: for a hybrid session the source last given by
    /// [`Self::set_next_source`] (lookup before any), else its method.
    pub fn source(&self) -> DraftMethod {
        match self.method {
            DraftMethod::Hybrid => self.next_source,
            m => m,
        }
    }

    /// Records how a hybrid session was told to draft its next block (the verdict's
    /// `next_method`, from [`super::GammaController::plan_next`]).
    pub fn set_next_source(&mut self, source: DraftMethod) {
        self.next_source = source;
    }

    /// The share of the granted γ that lookup filled in a hybrid session's lookup-only blocks
    /// (1 before any).
    pub fn lookup_yield(&self) -> f64 {
        self.lookup_yield.get().unwrap_or(1.0).clamp(0.0, 1.0)
    }

    /// Acceptance of looked-up tokens, as [`Self::model_alpha`] for the model's.
    pub fn lookup_alpha(&self) -> f64 {
        self.alpha_for(DraftMethod::Lookup)
    }

    /// The acceptance to plan a block drafted by `source` with: a hybrid session's estimate for
    /// that source (model or lookup tokens alone; a mixed block: the session's α), any other
    /// session's α.
    pub fn alpha_for(&self, source: DraftMethod) -> f64 {
        match (self.method, source) {
            (DraftMethod::Hybrid, DraftMethod::Model) => self.model_acceptance.alpha(),
            (DraftMethod::Hybrid, DraftMethod::Lookup) => self.lookup_acceptance.alpha(),
            _ => self.alpha(),
        }
    }

    /// Verified rounds so far.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// Wire bytes per drafted token of the last block with drafts.
    pub fn bytes_per_token(&self) -> f64 {
        self.bytes_per_token
    }
}
