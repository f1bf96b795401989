//! Draft side of lossless sampling with a sparse q: the draft node samples from its own
//! distribution truncated to its top-K tokens and renormalised, and sends exactly those K
//! (id, prob) pairs. Acceptance is exact for ANY q the verifier knows precisely, so truncation
//! costs some acceptance rate but never correctness — and a few KB a round instead of a dense
//! `[γ, vocab]` tensor.

use std::collections::HashSet;

use rand::Rng;

use crate::error::SpecError;
use crate::sampling::{argmax, try_sample};
use crate::types::SparseDist;

/// Tolerance on `Σ q = 1` accepted by [`SparseDist::validate`]; f32 renormalisation of a few
/// thousand entries stays far inside it.
pub const PROPOSAL_SUM_TOLERANCE: f32 = 1e-3;

/// Truncates `probs` to its `top_k` most likely tokens with nonzero probability (ties to the
/// lowest id; `top_k == 0` keeps every nonzero token), renormalises, and samples from the result.
///
/// Returns the sampled token and the exact q it was drawn from, ids in descending probability.
/// The token is sampled from `q.probs` themselves, so the verifier's q is the true proposal.
/// A row without positive mass yields a one-hot q at `argmax(probs)`.
pub fn propose<R: Rng + ?Sized>(probs: &[f32], top_k: usize, rng: &mut R) -> (u32, SparseDist) {
    let q = truncate(probs, top_k);
    // `truncate` returns a non-empty q with positive mass, so sampling cannot fail; the fallback
    // keeps this panic-free regardless.
    let token = try_sample(&q.probs, rng).map_or(q.ids[0], |i| q.ids[i as usize]);
    (token, q)
}

/// The top-`top_k`, renormalised sparse version of `probs` (see [`propose`]).
pub fn truncate(probs: &[f32], top_k: usize) -> SparseDist {
    let mut ids: Vec<u32> = (0..probs.len() as u32)
        .filter(|&i| {
            let p = probs[i as usize];
            p.is_finite() && p > 0.0
        })
        .collect();
    if ids.is_empty() {
        return SparseDist {
            ids: vec![argmax(probs)],
            probs: vec![1.0],
        };
    }
    let by_prob_desc = |a: &u32, b: &u32| {
        probs[*b as usize]
            .total_cmp(&probs[*a as usize])
            .then(a.cmp(b))
    };
    // Partial selection first: sorting a 152k-entry vocabulary per drafted token would cost
    // more than the draft forward itself; only the kept top-k need ordering.
    if top_k > 0 && top_k < ids.len() {
        ids.select_nth_unstable_by(top_k - 1, by_prob_desc);
        ids.truncate(top_k);
    }
    ids.sort_unstable_by(by_prob_desc);
    let mass: f64 = ids.iter().map(|&i| f64::from(probs[i as usize])).sum();
    let q: Vec<f32> = ids
        .iter()
        // Clamp to the smallest positive f32 so an entry too small to survive the division still
        // keeps the "probs in (0, 1]" invariant rather than silently leaving the support.
        .map(|&i| ((f64::from(probs[i as usize]) / mass) as f32).max(f32::MIN_POSITIVE))
        .collect();
    SparseDist { ids, probs: q }
}

impl SparseDist {
    /// Checks the invariants the verifier relies on: non-empty, `ids` and `probs` of equal
    /// length, ids distinct and `< vocab_size`, every prob finite and in (0, 1], and the probs
    /// summing to 1 within [`PROPOSAL_SUM_TOLERANCE`].
    pub fn validate(&self, vocab_size: usize) -> Result<(), SpecError> {
        let fail = |reason: String| Err(SpecError::InvalidProposal { reason });
        if self.ids.len() != self.probs.len() {
            return fail(format!(
                "{} ids but {} probabilities",
                self.ids.len(),
                self.probs.len()
            ));
        }
        if self.ids.is_empty() {
            return fail("empty support".into());
        }
        let mut seen = HashSet::with_capacity(self.ids.len());
        // Entries are named by index, never by token id (errors may be logged; ids are content).
        for (i, (&id, &p)) in self.ids.iter().zip(&self.probs).enumerate() {
            if id as usize >= vocab_size {
                return fail(format!(
                    "entry {i}: token id outside the vocabulary of {vocab_size}"
                ));
            }
            if !seen.insert(id) {
                return fail(format!("entry {i}: duplicate token id"));
            }
            if !(p > 0.0 && p <= 1.0) {
                return fail(format!("entry {i}: probability {p} is not in (0, 1]"));
            }
        }
        let sum: f64 = self.probs.iter().map(|&p| f64::from(p)).sum();
        if (sum - 1.0).abs() > f64::from(PROPOSAL_SUM_TOLERANCE) {
            return fail(format!("probabilities sum to {sum}, not 1"));
        }
        Ok(())
    }

    /// True when `token` is in the support (has positive probability).
    pub fn contains(&self, token: u32) -> bool {
        self.ids.contains(&token)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn dist(ids: &[u32], probs: &[f32]) -> SparseDist {
        SparseDist {
            ids: ids.to_vec(),
            probs: probs.to_vec(),
        }
    }

    #[test]
    fn truncate_keeps_top_k_nonzero_and_renormalises() {
        let q = truncate(&[0.1, 0.0, 0.4, 0.2, 0.3], 3);
        assert_eq!(q.ids, vec![2, 4, 3]);
        for (got, want) in q.probs.iter().zip([4.0 / 9.0, 3.0 / 9.0, 2.0 / 9.0]) {
            assert!((got - want).abs() < 1e-6, "{q:?}");
        }
        // Fewer nonzero tokens than k: zeros are never proposed.
        assert_eq!(truncate(&[0.0, 1.0, 0.0], 5).ids, vec![1]);
        // k = 0: every nonzero token.
        assert_eq!(truncate(&[0.5, 0.0, 0.5], 0).ids, vec![0, 2]);
        // Ties at the boundary go to the lowest id.
        assert_eq!(truncate(&[0.25; 4], 2).ids, vec![0, 1]);
    }

    #[test]
    fn truncate_of_a_massless_row_is_one_hot_at_argmax() {
        assert_eq!(truncate(&[0.0, 0.0], 4), dist(&[0], &[1.0]));
        assert_eq!(truncate(&[f32::NAN, -1.0, 0.0], 4), dist(&[2], &[1.0]));
    }

    #[test]
    fn propose_samples_from_the_truncated_q() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let probs = [0.05, 0.5, 0.05, 0.4];
        let mut counts = [0u32; 4];
        for _ in 0..20_000 {
            let (t, q) = propose(&probs, 2, &mut rng);
            assert_eq!(q.ids, vec![1, 3]);
            counts[t as usize] += 1;
        }
        assert_eq!(counts[0] + counts[2], 0);
        let share = f64::from(counts[1]) / 20_000.0;
        assert!((share - 5.0 / 9.0).abs() < 0.015, "{counts:?}");
    }

    #[test]
    fn validate_accepts_a_good_q_and_names_each_fault() {
        assert_eq!(dist(&[3, 1], &[0.75, 0.25]).validate(4), Ok(()));
        let reason = |q: SparseDist| match q.validate(4) {
            Err(SpecError::InvalidProposal { reason }) => reason,
            other => panic!("expected InvalidProposal, got {other:?}"),
        };
        assert!(reason(dist(&[], &[])).contains("empty"));
        assert!(reason(dist(&[1], &[0.5, 0.5])).contains("1 ids but 2"));
        assert!(reason(dist(&[4], &[1.0])).contains("outside the vocabulary"));
        assert!(reason(dist(&[1, 1], &[0.5, 0.5])).contains("duplicate"));
        assert!(reason(dist(&[1, 2], &[0.0, 1.0])).contains("not in (0, 1]"));
        assert!(reason(dist(&[1, 2], &[-0.5, 1.5])).contains("not in (0, 1]"));
        assert!(reason(dist(&[1], &[f32::NAN])).contains("not in (0, 1]"));
        assert!(reason(dist(&[1, 2], &[0.5, 0.49])).contains("sum"));
        // Within tolerance is fine.
        assert_eq!(dist(&[1, 2], &[0.5, 0.4995]).validate(4), Ok(()));
    }

    proptest! {
        #[test]
        fn propose_returns_a_valid_q_containing_the_token(
            probs in prop::collection::vec(prop_oneof![Just(0.0f32), 0.0f32..1.0], 1..40),
            top_k in 0usize..10,
            seed in any::<u64>(),
        ) {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let (token, q) = propose(&probs, top_k, &mut rng);
            prop_assert_eq!(q.validate(probs.len()), Ok(()));
            prop_assert!(q.contains(token));
            if top_k > 0 {
                prop_assert!(q.ids.len() <= top_k);
            }
            if probs.iter().any(|&p| p > 0.0) {
                prop_assert!(probs[token as usize] > 0.0);
                // Every kept token is at least as likely as every dropped one.
                let min_kept = q.ids.iter().map(|&i| probs[i as usize]).fold(f32::MAX, f32::min);
                for (i, &p) in probs.iter().enumerate() {
                    if !q.contains(i as u32) {
                        prop_assert!(p <= min_kept);
                    }
                }
            }
        }
    }
}
