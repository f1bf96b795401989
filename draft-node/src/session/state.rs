//! One session's round bookkeeping as a plain struct: the committed tokens (the source of truth
//! for resyncs), the round counter, the γ the coordinator asked for, the block to send and the
//! application of a verdict, with the statistics reported to the client.

use edgespec_proto::domain::{Block, DraftBlock};
use edgespec_specdec::{DraftMethod, SamplingParams};
use serde::Serialize;

use super::draft::BlockDraft;
use crate::connection::Verdict;
use crate::error::GenError;

/// Speculation statistics of one generation (the `edgespec` object of a response).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct GenStats {
    /// Draft tokens sent for verification.
    pub drafted: u64,
    /// Draft tokens the target accepted.
    pub accepted: u64,
    /// Verdicts applied; each cost one (batched) target forward.
    pub rounds: u64,
    /// Blocks resent with full history.
    pub resyncs: u64,
    /// Pipelined blocks kept.
    pub pipelined_kept: u64,
}

impl GenStats {
    /// accepted / drafted (0 when nothing was drafted).
    pub fn acceptance_rate(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }

    /// Mean γ per round.
    pub fn gamma_mean(&self) -> f64 {
        if self.rounds == 0 {
            0.0
        } else {
            self.drafted as f64 / self.rounds as f64
        }
    }
}

/// Telemetry attached to each block.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Telemetry {
    /// Wall clock at send, unix ns.
    pub send_unix_ns: u64,
    /// Draft seconds per token.
    pub draft_s_per_token: f32,
    /// Previous round trip, ns.
    pub last_round_trip_ns: u64,
    /// This block was drafted ahead (pipelining) and kept.
    pub drafted_ahead: bool,
    /// The draft model's own seconds per token (0 without a model).
    pub model_s_per_token: f32,
}

/// One session's rounds.
#[derive(Debug)]
pub(crate) struct SessionState {
    id: u64,
    committed: Vec<u32>,
    prompt_len: usize,
    max_new: usize,
    sampling: SamplingParams,
    round: u64,
    gamma: usize,
    max_gamma: usize,
    method: DraftMethod,
    stats: GenStats,
}

/// Parameters of a new session.
#[derive(Debug, Clone)]
pub(crate) struct SessionSpec {
    /// Session id.
    pub id: u64,
    /// Prompt tokens (at least one).
    pub prompt: Vec<u32>,
    /// Token budget.
    pub max_new: usize,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// γ of the first round.
    pub initial_gamma: u32,
    /// This node's cap on γ (`drafting.max_gamma`, announced in its hello; the coordinator
    /// plans within it, so this only guards against a coordinator that does not).
    pub max_gamma: usize,
    /// How this session drafts (sent with every block: the coordinator plans γ per method).
    pub method: DraftMethod,
}

impl SessionState {
    /// A session before its first round.
    pub fn new(spec: SessionSpec) -> Self {
        SessionState {
            id: spec.id,
            prompt_len: spec.prompt.len(),
            committed: spec.prompt,
            max_new: spec.max_new,
            sampling: spec.sampling,
            round: 0,
            gamma: (spec.initial_gamma as usize).min(spec.max_gamma),
            max_gamma: spec.max_gamma,
            method: spec.method,
            stats: GenStats::default(),
        }
    }

    /// Committed tokens (prompt + output).
    pub fn committed(&self) -> &[u32] {
        &self.committed
    }

    /// Sampling parameters.
    pub fn sampling(&self) -> &SamplingParams {
        &self.sampling
    }

    /// Tokens still allowed.
    pub fn remaining(&self) -> usize {
        self.max_new
            .saturating_sub(self.committed.len() - self.prompt_len)
    }

    /// γ for the next block: the coordinator's choice, leaving room for the verdict's own token.
    pub fn planned_gamma(&self) -> usize {
        self.gamma.min(self.remaining().saturating_sub(1))
    }

    /// Statistics so far.
    pub fn stats(&self) -> GenStats {
        self.stats
    }

    /// Counts a resend with history.
    pub fn note_resync(&mut self) {
        self.stats.resyncs += 1;
    }

    /// Counts a kept pipelined block.
    pub fn note_pipelined(&mut self) {
        self.stats.pipelined_kept += 1;
    }

    /// The next round's block from `draft` (which must extend the committed tokens).
    pub fn block(&mut self, draft: &BlockDraft, with_history: bool, t: Telemetry) -> DraftBlock {
        debug_assert_eq!(draft.base_len, self.committed.len());
        self.round += 1;
        DraftBlock {
            block: Block {
                session_id: self.id,
                round: self.round,
                committed_len: self.committed.len(),
                history: with_history.then(|| self.committed.clone()),
                draft_tokens: draft.tokens.clone(),
                draft_probs: draft.q.clone(),
                sampling: self.sampling,
            },
            max_new_tokens: self.remaining() as u32,
            client_send_unix_ns: t.send_unix_ns,
            draft_s_per_token: t.draft_s_per_token,
            last_round_trip_ns: t.last_round_trip_ns,
            drafted_ahead: t.drafted_ahead,
            method: self.method,
            model_s_per_token: t.model_s_per_token,
            // Only hybrid blocks mix sources; for the others the method says it all.
            model_token_mask: if self.method == DraftMethod::Hybrid {
                draft.model_mask
            } else {
                0
            },
        }
    }

    /// The full history, for resending `block` after the verify side lost the session.
    pub fn with_history(&self, block: &DraftBlock) -> DraftBlock {
        let mut b = block.clone();
        b.block.history = Some(self.committed.clone());
        b
    }

    /// Applies the verdict for `block`: appends the accepted drafts and the target's token,
    /// adopts the next γ, and returns the newly committed tokens.
    pub fn apply(&mut self, block: &DraftBlock, v: &Verdict) -> Result<Vec<u32>, GenError> {
        let b = &block.block;
        let gamma = b.draft_tokens.len();
        if v.round != b.round
            || b.committed_len != self.committed.len()
            || v.outcome().check_against(b).is_err()
        {
            return Err(GenError::Internal(
                "the coordinator sent a verdict inconsistent with its block".into(),
            ));
        }
        let mut new = b.draft_tokens[..v.accepted].to_vec();
        new.push(v.next_token);
        self.committed.extend_from_slice(&new);
        self.gamma = (v.next_gamma as usize).min(self.max_gamma);
        self.stats.drafted += gamma as u64;
        self.stats.accepted += v.accepted as u64;
        self.stats.rounds += 1;
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(max_new: usize) -> SessionState {
        SessionState::new(SessionSpec {
            id: 4,
            prompt: vec![10, 11, 12],
            max_new,
            sampling: SamplingParams::GREEDY,
            initial_gamma: 50,
            max_gamma: 6,
            method: DraftMethod::Hybrid,
        })
    }

    fn draft(s: &SessionState, tokens: &[u32]) -> BlockDraft {
        let mut d = BlockDraft::new(s.committed().len(), s.sampling());
        d.tokens = tokens.to_vec();
        d
    }

    fn verdict(b: &DraftBlock, accepted: usize, next_token: u32, next_gamma: u32) -> Verdict {
        Verdict {
            session_id: b.block.session_id,
            round: b.block.round,
            accepted,
            next_token,
            committed_len: b.block.committed_len + accepted + 1,
            next_gamma,
            client_send_unix_ns: 0,
            coordinator_ns: 0,
            verify: Default::default(),
            verifier_id: String::new(),
            next_method: None,
        }
    }

    #[test]
    fn first_block_carries_history_and_gamma_is_the_coordinators_within_the_cap() {
        let mut s = state(100);
        assert_eq!(
            s.planned_gamma(),
            6,
            "initial γ capped by the node's max_gamma"
        );
        let d = draft(&s, &[1, 2, 3]);
        let b = s.block(&d, true, Telemetry::default());
        assert_eq!(b.block.round, 1);
        assert_eq!(b.block.history.as_deref(), Some(&[10, 11, 12][..]));
        assert_eq!(b.max_new_tokens, 100);
        assert_eq!(
            b.method,
            DraftMethod::Hybrid,
            "every block names the session's method"
        );
        let new = s.apply(&b, &verdict(&b, 2, 9, 0)).unwrap();
        assert_eq!(new, vec![1, 2, 9]);
        assert_eq!(s.committed(), &[10, 11, 12, 1, 2, 9]);
        assert_eq!(s.planned_gamma(), 0, "the coordinator's γ is obeyed");
        let stats = s.stats();
        assert_eq!((stats.drafted, stats.accepted, stats.rounds), (3, 2, 1));
        let b2 = s.block(&draft(&s, &[5]), false, Telemetry::default());
        assert_eq!(b2.block.round, 2);
        assert!(b2.block.history.is_none());
        assert_eq!(s.with_history(&b2).block.history.unwrap().len(), 6);
    }

    #[test]
    fn gamma_leaves_room_for_the_verdict_token_and_bad_verdicts_are_rejected() {
        let mut s = state(3);
        assert_eq!(s.planned_gamma(), 2);
        let b = s.block(&draft(&s, &[1, 2]), true, Telemetry::default());
        let mut v = verdict(&b, 2, 3, 4);
        v.committed_len += 1;
        assert!(s.apply(&b, &v).is_err());
        let mut v = verdict(&b, 2, 3, 4);
        v.accepted = 3;
        assert!(s.apply(&b, &v).is_err());
        s.apply(&b, &verdict(&b, 2, 3, 4)).unwrap();
        assert_eq!(s.remaining(), 0);
        assert_eq!(s.planned_gamma(), 0);
    }
}
