//! Pipelined drafting: while a block is being verified, draft the next one assuming the block is
//! fully accepted and the target's bonus token is the draft's own top choice. The work is kept
//! when the verdict agrees and dropped otherwise (the draft KV then simply gets truncated by the
//! next step), so the output is identical with pipelining on or off.
//!
//! Only `model` sessions pipeline: a lookup block costs microseconds (there is nothing to hide
//! behind the verification), and `hybrid` is kept simple — its blocks mix looked-up and drafted
//! tokens, and guessing ahead would have to run the lookup against a speculative context too.

use std::future::Future;
use std::pin::Pin;

use edgespec_proto::domain::DraftBlock;
use edgespec_specdec::{argmax, DraftMethod};

use super::draft::{BlockDraft, StepPlan};
use super::Driver;
use crate::error::GenError;

/// A speculative draft step running as an owned future.
pub(super) type StepFuture =
    Pin<Box<dyn Future<Output = (StepPlan, Result<Vec<f32>, GenError>)> + Send>>;

/// The block drafted ahead while the previous one is in flight, valid if that block is fully
/// accepted and the target's bonus token equals `guess`.
pub(super) struct Spec {
    /// How many tokens to draft ahead.
    pub want: usize,
    /// The draft's own guess of the bonus token.
    pub guess: Option<u32>,
    /// Drafts after committed + in-flight drafts + guess.
    pub draft: Option<BlockDraft>,
}

impl Driver {
    /// Whether to draft ahead of `block`, and how far.
    pub(super) fn plan_spec(&self, block: &DraftBlock) -> Option<Spec> {
        let gamma = block.block.draft_tokens.len();
        let eos = self.ctx.tokenizer.eos_token_ids();
        if !self.ctx.cfg.pipeline
            || self.method != DraftMethod::Model
            || self.drafter.is_none()
            || gamma == 0
            || block.block.draft_tokens.iter().any(|t| eos.contains(t))
        {
            return None;
        }
        // Budget left if the block is fully accepted (γ drafts + the bonus token).
        let after = self.state.remaining().checked_sub(gamma + 1)?;
        let want = gamma.min(after.saturating_sub(1));
        (want > 0).then_some(Spec {
            want,
            guess: None,
            draft: None,
        })
    }

    /// The next speculative step, if any is left.
    pub(super) fn spec_step(&self, spec: &Spec, block: &DraftBlock) -> Option<StepFuture> {
        let drafter = self.drafter.as_ref()?;
        let committed = self.state.committed();
        let drafts = &block.block.draft_tokens;
        let plan = match (spec.guess, &spec.draft) {
            (None, _) => drafter.plan(&[committed, drafts]),
            (Some(g), Some(d)) if d.len() < spec.want => {
                drafter.plan(&[committed, drafts, &[g], &d.tokens])
            }
            _ => return None,
        };
        let (engine, session) = drafter.engine();
        Some(Box::pin(async move {
            let r = engine.step(session, plan.start, plan.tokens.clone()).await;
            (plan, r)
        }))
    }

    pub(super) fn spec_step_done(
        &mut self,
        spec: &mut Option<Spec>,
        done: (StepPlan, Result<Vec<f32>, GenError>),
    ) {
        let (plan, result) = done;
        let Ok(row) = result else {
            *spec = None;
            return;
        };
        let Some(drafter) = self.drafter.as_mut() else {
            *spec = None;
            return;
        };
        drafter.applied(&plan);
        let Some(s) = spec.as_mut() else { return };
        let sampling = *self.state.sampling();
        match s.guess {
            None => {
                let guess = argmax(&row);
                if self.ctx.tokenizer.eos_token_ids().contains(&guess) {
                    *spec = None;
                    return;
                }
                s.guess = Some(guess);
                // committed + γ drafts + guess
                let base = plan.start + plan.tokens.len() + 1;
                s.draft = Some(BlockDraft::new(base, &sampling));
            }
            Some(_) => {
                if let Some(d) = s.draft.as_mut() {
                    d.choose(&row, &sampling, self.ctx.cfg.top_k);
                }
            }
        }
    }
}
