//! Drafting one block: the round RNG, the token choice (argmax, or a sparse top-K proposal when
//! sampling), and the session's view of its draft KV cache.
//!
//! The draft KV follows the node-wide convention (committed tokens except the last, then the
//! drafts), but the drafter does not track it by rule: it keeps a mirror of the tokens the cache
//! holds and asks for each step "keep the longest prefix the mirror shares with the sequence I
//! want, append the rest". Prefill, a round's first step, steps after a rejection, a resync and
//! pipelined blocks are then all the same operation, and a dropped speculative block costs
//! nothing but the truncation.

use edgespec_specdec::{
    argmax, probs_from_logits, propose, round_rng, RngSide, SamplingParams, SparseDist,
};
use rand_chacha::ChaCha8Rng;

use crate::engine::Engine;
use crate::error::GenError;

/// The draft tokens of one block in the making.
#[derive(Debug, Clone)]
pub(crate) struct BlockDraft {
    /// Committed length the block extends.
    pub base_len: usize,
    /// Draft tokens so far.
    pub tokens: Vec<u32>,
    /// One q per token when sampling.
    pub q: Vec<SparseDist>,
    /// Bit i set when token i came from the draft model ([`Self::choose`]), clear for a
    /// lookup token ([`Self::push_certain`]); a block holds at most `MAX_GAMMA` = 64 tokens.
    pub model_mask: u64,
    rng: ChaCha8Rng,
}

impl BlockDraft {
    /// An empty block after `base_len` committed tokens.
    pub fn new(base_len: usize, sampling: &SamplingParams) -> Self {
        BlockDraft {
            base_len,
            tokens: Vec::new(),
            q: Vec::new(),
            model_mask: 0,
            // A pure function of (seed, committed length), so a seeded request drafts the same
            // tokens whatever happened before (resyncs, pipelining on or off).
            rng: round_rng(sampling.seed, base_len, RngSide::Draft),
        }
    }

    /// Picks the next draft token from the logits after the current last token.
    pub fn choose(&mut self, logits: &[f32], sampling: &SamplingParams, top_k: usize) -> u32 {
        if let Some(bit) = 1u64.checked_shl(self.tokens.len() as u32) {
            self.model_mask |= bit;
        }
        if sampling.is_greedy() {
            let t = argmax(logits);
            self.tokens.push(t);
            return t;
        }
        let probs = probs_from_logits(logits, sampling);
        let (t, q) = propose(&probs, top_k, &mut self.rng);
        self.tokens.push(t);
        self.q.push(q);
        t
    }

    /// Appends a token proposed with certainty (prompt lookup): when sampling its q is the point
    /// mass on it, which the acceptance rule handles exactly like any other q (accepted with
    /// probability p(t), else resampled from p without t).
    pub fn push_certain(&mut self, t: u32, sampling: &SamplingParams) {
        self.tokens.push(t);
        if !sampling.is_greedy() {
            self.q.push(SparseDist {
                ids: vec![t],
                probs: vec![1.0],
            });
        }
    }

    /// Keeps the first `n` tokens (the RNG is not rewound: a shortened block is sent as is and
    /// the next round draws from a fresh round RNG).
    pub fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
        self.q.truncate(n);
        if let Some(keep) = 1u64.checked_shl(n as u32) {
            self.model_mask &= keep - 1;
        }
    }

    /// Number of draft tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
}

/// A planned forward step: keep `start` cached tokens, append `tokens`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StepPlan {
    /// Cached tokens kept.
    pub start: usize,
    /// Tokens appended.
    pub tokens: Vec<u32>,
}

/// The step that turns a cache holding `mirror` into one holding `parts` (concatenated): keep
/// the longest common prefix, but always re-feed at least the last token (its logits are needed).
pub(crate) fn plan_step(mirror: &[u32], parts: &[&[u32]]) -> StepPlan {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let common = mirror
        .iter()
        .zip(parts.iter().flat_map(|p| p.iter()))
        .take_while(|(a, b)| a == b)
        .count();
    let start = common.min(len.saturating_sub(1));
    let tokens = parts
        .iter()
        .flat_map(|p| p.iter())
        .skip(start)
        .copied()
        .collect();
    StepPlan { start, tokens }
}

/// One session's draft KV, seen through a mirror of its tokens.
#[derive(Debug)]
pub(crate) struct Drafter {
    session: u64,
    engine: Engine,
    mirror: Vec<u32>,
}

impl Drafter {
    /// A drafter for `session` (its KV starts empty).
    pub fn new(session: u64, engine: Engine) -> Self {
        Drafter {
            session,
            engine,
            mirror: Vec::new(),
        }
    }

    /// The step that leaves the cache holding `parts` (concatenated) and yields the logits after
    /// their last token. `parts` must not be empty overall.
    pub fn plan(&self, parts: &[&[u32]]) -> StepPlan {
        plan_step(&self.mirror, parts)
    }

    /// Records a completed step.
    pub fn applied(&mut self, plan: &StepPlan) {
        self.mirror.truncate(plan.start);
        self.mirror.extend_from_slice(&plan.tokens);
    }

    /// Runs a step now; the logits after the last token of `parts`, and how many tokens the
    /// step fed (1 or 2 for a decode step, more for a prefill or catch-up).
    pub async fn logits(&mut self, parts: &[&[u32]]) -> Result<(Vec<f32>, usize), GenError> {
        let plan = self.plan(parts);
        let row = self
            .engine
            .step(self.session, plan.start, plan.tokens.clone())
            .await?;
        self.applied(&plan);
        Ok((row, plan.tokens.len()))
    }

    /// The engine and session, for steps run as owned futures.
    pub fn engine(&self) -> (Engine, u64) {
        (self.engine.clone(), self.session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn steps_keep_the_shared_prefix_and_refeed_at_least_one_token() {
        // prefill
        assert_eq!(
            plan_step(&[], &[&[1, 2, 3]]),
            StepPlan {
                start: 0,
                tokens: vec![1, 2, 3]
            }
        );
        // next draft step: only the new token
        assert_eq!(
            plan_step(&[1, 2, 3], &[&[1, 2, 3], &[9]]),
            StepPlan {
                start: 3,
                tokens: vec![9]
            }
        );
        // after a rejection: truncate to the committed prefix, feed the correction
        assert_eq!(
            plan_step(&[1, 2, 3, 9, 8], &[&[1, 2, 3, 9, 5]]),
            StepPlan {
                start: 4,
                tokens: vec![5]
            }
        );
        // the cache already holds everything: re-feed the last token for its logits
        assert_eq!(
            plan_step(&[1, 2, 3, 4], &[&[1, 2], &[3]]),
            StepPlan {
                start: 2,
                tokens: vec![3]
            }
        );
    }

    #[test]
    fn drafts_use_the_draft_side_round_rng() {
        let sp = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 7,
        };
        let a: u64 = BlockDraft::new(12, &sp).rng.random();
        assert_eq!(a, round_rng(7, 12, RngSide::Draft).random::<u64>());
        assert_ne!(a, round_rng(7, 12, RngSide::Verify).random::<u64>());
    }

    #[test]
    fn greedy_choice_is_argmax_without_q_and_sampling_sends_a_q_holding_the_token() {
        let logits = [0.1f32, 2.0, 1.9, -1.0];
        let mut g = BlockDraft::new(5, &SamplingParams::GREEDY);
        assert_eq!(g.choose(&logits, &SamplingParams::GREEDY, 2), 1);
        assert!(g.q.is_empty());
        let sp = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 3,
        };
        let mut s = BlockDraft::new(5, &sp);
        let t = s.choose(&logits, &sp, 2);
        assert_eq!(s.q.len(), 1);
        assert_eq!(s.q[0].ids.len(), 2);
        assert!(s.q[0].prob(t) > 0.0);
        // Same seed and length: same tokens.
        let mut again = BlockDraft::new(5, &sp);
        assert_eq!(again.choose(&logits, &sp, 2), t);
    }

    #[test]
    fn the_model_mask_marks_model_tokens_and_follows_truncation() {
        let g = SamplingParams::GREEDY;
        let mut d = BlockDraft::new(5, &g);
        d.push_certain(7, &g);
        d.choose(&[0.0, 1.0], &g, 1);
        d.push_certain(8, &g);
        d.choose(&[1.0, 0.0], &g, 1);
        assert_eq!(
            (d.tokens.as_slice(), d.model_mask),
            (&[7, 1, 8, 0][..], 0b1010)
        );
        d.truncate(3);
        assert_eq!(d.model_mask, 0b0010);
        d.truncate(0);
        assert_eq!(d.model_mask, 0);
    }

    #[test]
    fn a_certain_token_has_a_point_mass_q_when_sampling() {
        let mut g = BlockDraft::new(5, &SamplingParams::GREEDY);
        g.push_certain(7, &SamplingParams::GREEDY);
        assert_eq!((g.tokens.as_slice(), g.q.len()), (&[7][..], 0));
        let sp = SamplingParams {
            temperature: 0.8,
            top_k: 0,
            top_p: 1.0,
            seed: 1,
        };
        let mut s = BlockDraft::new(5, &sp);
        s.push_certain(7, &sp);
        assert_eq!(
            s.q,
            vec![SparseDist {
                ids: vec![7],
                probs: vec![1.0]
            }]
        );
    }
}
