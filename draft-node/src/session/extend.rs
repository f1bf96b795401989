//! Drafting a block by the session's method, and what each method's drafting costs.
//!
//! - `model`: one draft-model step per token (batched with other sessions by the engine).
//! - `lookup`: the continuation prompt lookup finds (`crate::lookup`), possibly shorter than γ
//!   or empty (an empty block is a plain target step).
//! - `hybrid`: per position, the lookup continuation when there is one, else one model step,
//!   until γ. The draft KV catches up on the looked-up tokens with the next model step
//!   (`Drafter` keeps the longest common prefix and feeds the rest). The coordinator may tell a
//!   hybrid session to draft its next block by one source alone (`Verdict::next_method`): lookup
//!   where the model's steps do not pay, the model where lookup's proposals are accepted less
//!   often than the model's (they would only cut the model's runs short).
//!
//! A looked-up continuation stops after an end-of-text token: nothing after it can be committed.

use std::time::Instant;

use edgespec_specdec::DraftMethod;

use super::draft::BlockDraft;
use super::{Driver, Halt};

impl Driver {
    /// Drafts until `draft` holds `gamma` tokens (fewer when lookup runs out of matches).
    pub(super) async fn extend(
        &mut self,
        draft: &mut BlockDraft,
        gamma: usize,
    ) -> Result<(), Halt> {
        match self.method {
            DraftMethod::Model => self.extend_model(draft, gamma).await,
            DraftMethod::Lookup => {
                self.extend_lookup(draft, gamma);
                Ok(())
            }
            DraftMethod::Hybrid => match self.hybrid_source {
                DraftMethod::Lookup => {
                    self.extend_lookup(draft, gamma);
                    Ok(())
                }
                DraftMethod::Model if self.drafter.is_some() => {
                    self.extend_model(draft, gamma).await
                }
                _ => self.extend_hybrid(draft, gamma).await,
            },
        }
    }

    async fn extend_model(&mut self, draft: &mut BlockDraft, gamma: usize) -> Result<(), Halt> {
        let Some(drafter) = self.drafter.as_mut() else {
            return Ok(());
        };
        while draft.len() < gamma {
            if self.out.is_closed() {
                return Err(Halt::ClientGone);
            }
            let started = Instant::now();
            let (row, fed) = drafter
                .logits(&[self.state.committed(), &draft.tokens])
                .await?;
            // t_draft is the cost of one decode step: a catch-up step (prompt prefill, or the
            // tokens committed during γ = 0 rounds) would inflate it and talk the controller
            // out of drafting. One or two fed tokens (the bonus after a full acceptance) are
            // a decode step.
            if fed <= 2 {
                self.ctx
                    .estimates
                    .observe_cost(DraftMethod::Model, started.elapsed(), 1);
            }
            let sampling = *self.state.sampling();
            draft.choose(&row, &sampling, self.ctx.cfg.top_k);
        }
        Ok(())
    }

    /// Lookup costs microseconds per block: its cost sample is the whole lookup, per token
    /// proposed (per attempt when it found nothing).
    fn extend_lookup(&mut self, draft: &mut BlockDraft, gamma: usize) {
        if draft.len() >= gamma {
            return;
        }
        let started = Instant::now();
        let before = draft.len();
        self.take_lookup(draft, gamma);
        let n = (draft.len() - before).max(1);
        self.ctx
            .estimates
            .observe_cost(DraftMethod::Lookup, started.elapsed(), n);
    }

    /// Hybrid's cost sample is the mean per-token time of the whole block (lookups, model steps
    /// and the model's catch-up over looked-up tokens), except a block whose model step was a
    /// prefill or a long catch-up (more tokens than a block holds), as for `model`.
    async fn extend_hybrid(&mut self, draft: &mut BlockDraft, gamma: usize) -> Result<(), Halt> {
        let started = Instant::now();
        let before = draft.len();
        let mut catch_up = false;
        while draft.len() < gamma {
            if self.out.is_closed() {
                return Err(Halt::ClientGone);
            }
            match self.take_lookup(draft, gamma) {
                Taken::Some => continue,
                Taken::Eos => break,
                Taken::None => {}
            }
            let Some(drafter) = self.drafter.as_mut() else {
                break;
            };
            let step = Instant::now();
            let (row, fed) = drafter
                .logits(&[self.state.committed(), &draft.tokens])
                .await?;
            let long = fed > self.ctx.cfg.max_gamma + 2;
            catch_up |= long;
            if !long {
                // The model's own cost (what prices the fallback), from steps without a long
                // catch-up.
                self.ctx
                    .estimates
                    .observe_cost(DraftMethod::Model, step.elapsed(), 1);
            }
            let sampling = *self.state.sampling();
            draft.choose(&row, &sampling, self.ctx.cfg.top_k);
        }
        if !catch_up {
            self.ctx.estimates.observe_cost(
                DraftMethod::Hybrid,
                started.elapsed(),
                draft.len() - before,
            );
        }
        Ok(())
    }

    /// Appends the lookup continuation of the context (up to `gamma` tokens in the block), cut
    /// after an end-of-text token.
    fn take_lookup(&self, draft: &mut BlockDraft, gamma: usize) -> Taken {
        let Some(ix) = self.lookup.as_ref() else {
            return Taken::None;
        };
        let want = gamma.saturating_sub(draft.len());
        let mut found = ix.propose(&draft.tokens, want);
        if found.is_empty() {
            if let Some(cache) = &self.ctx.suffix_cache {
                found = cache.propose(&self.context_tail(draft), want);
            }
        }
        if found.is_empty() {
            return Taken::None;
        }
        let sampling = *self.state.sampling();
        let eos = self.ctx.tokenizer.eos_token_ids();
        for t in found {
            draft.push_certain(t, &sampling);
            if eos.contains(&t) {
                return Taken::Eos;
            }
        }
        Taken::Some
    }
}

impl Driver {
    /// The last `max_ngram` tokens of the context (committed tokens, then the drafts).
    fn context_tail(&self, draft: &BlockDraft) -> Vec<u32> {
        let n = self.ctx.cfg.lookup_ngrams.1;
        let committed = self.state.committed();
        let from_drafts = draft.tokens.len().min(n);
        let from_committed = (n - from_drafts).min(committed.len());
        let mut tail = committed[committed.len() - from_committed..].to_vec();
        tail.extend_from_slice(&draft.tokens[draft.tokens.len() - from_drafts..]);
        tail
    }
}

/// What one lookup added to a block.
enum Taken {
    /// Nothing: no earlier occurrence of any suffix.
    None,
    /// Tokens.
    Some,
    /// Tokens ending with an end-of-text token: the block is complete.
    Eos,
}
