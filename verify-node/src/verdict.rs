//! From a block and its target logit rows to a verdict: greedy or lossless sampled verification
//! (specdec), with per-round randomness that depends only on the session's seed and committed
//! length, so the output does not depend on which node served a round, on failover, eviction
//! or batching.

use edgespec_model::SeqLogits;
use edgespec_proto::domain::Block;
use edgespec_specdec::{round_rng, verify, RngSide, SpecError, Verdict};

/// Applies the acceptance rule of `block.sampling` to the γ+1 rows in `logits`.
pub fn decide(block: &Block, logits: &SeqLogits) -> Result<Verdict, SpecError> {
    let rows: Vec<&[f32]> = (0..logits.rows).map(|i| logits.row(i)).collect();
    let mut rng = round_rng(block.sampling.seed, block.committed_len, RngSide::Verify);
    verify(
        &block.sampling,
        &block.draft_tokens,
        &block.draft_probs,
        &rows,
        &mut rng,
    )
}
