//! From a block and its target logit rows to a verdict: greedy or lossless sampled verification
//! (specdec), with per-round randomness that depends only on the session's seed and committed
//! length, so the output does not depend on which node served a round, on failover, eviction
//! or batching.

use edgespec_model::SeqLogits;
use edgespec_proto::domain::Block;
use edgespec_specdec::{verify, SpecError, Verdict};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// RNG stream the verify side uses (the draft side uses stream 0).
pub const VERIFY_STREAM: u64 = 1;

/// The RNG of the round that extends `committed_len` committed tokens of a session seeded with
/// `seed`.
pub fn round_rng(seed: u64, committed_len: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(
        seed ^ (committed_len as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    rng.set_stream(VERIFY_STREAM);
    rng
}

/// Applies the acceptance rule of `block.sampling` to the γ+1 rows in `logits`.
pub fn decide(block: &Block, logits: &SeqLogits) -> Result<Verdict, SpecError> {
    let rows: Vec<&[f32]> = (0..logits.rows).map(|i| logits.row(i)).collect();
    let mut rng = round_rng(block.sampling.seed, block.committed_len);
    verify(
        &block.sampling,
        &block.draft_tokens,
        &block.draft_probs,
        &rows,
        &mut rng,
    )
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;

    #[test]
    fn round_rng_depends_only_on_seed_and_length() {
        let a: u64 = round_rng(7, 12).random();
        let b: u64 = round_rng(7, 12).random();
        let c: u64 = round_rng(7, 13).random();
        let d: u64 = round_rng(8, 12).random();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }
}
