//! Logits → distribution → token: the transform (temperature → top-k → top-p) that both the
//! draft and the target side apply, so that p and q are comparable, plus argmax and sampling.
//!
//! Conventions that both sides rely on (they must produce bit-identical results for the same
//! logits, so every tie is broken deterministically):
//! - ties go to the lowest token id (argmax, top-k boundary, top-p order);
//! - NaN logits are treated as −∞ (probability 0); NaN or negative probabilities as 0;
//! - a row with no usable logit at all (all NaN/−∞) gives a one-hot at `argmax` (the first −∞
//!   entry, or id 0 when all are NaN), so the output is always a distribution over the row's ids.

use std::cmp::Ordering;

use rand::Rng;

use crate::types::SamplingParams;

/// Index of the largest logit; ties go to the lowest index, NaNs are ignored. Returns 0 for an
/// empty or all-NaN row (callers that care validate the row first).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        // Strict `>` keeps the first of equal values.
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}

/// Dense distribution after temperature → top-k → top-p, renormalised after each filter.
///
/// Greedy parameters (temperature ≤ 0) give a one-hot at [`argmax`]. Top-k with `top_k == 0` or
/// `top_k >= len` is off; top-p with `top_p >= 1` (or NaN) is off and `top_p <= 0` keeps only the
/// most likely token. Top-p keeps the smallest prefix of tokens in descending-probability order
/// whose mass reaches `top_p` (always at least one token).
pub fn probs_from_logits(logits: &[f32], params: &SamplingParams) -> Vec<f32> {
    if params.is_greedy() {
        return one_hot(logits.len(), argmax(logits));
    }
    let mut probs = softmax(logits, params.temperature);
    let top_k = params.top_k as usize;
    if top_k > 0 && top_k < probs.len() {
        let keep = top_indices(&probs, top_k);
        retain_only(&mut probs, &keep);
    }
    let top_p = params.top_p;
    if top_p.is_nan() || top_p >= 1.0 {
        return probs;
    }
    let order = top_indices(&probs, usize::MAX);
    let mut mass = 0.0f64;
    let mut keep = Vec::new();
    for i in order {
        keep.push(i);
        mass += f64::from(probs[i]);
        if mass >= f64::from(top_p) {
            break;
        }
    }
    retain_only(&mut probs, &keep);
    probs
}

/// Draws a token id from `probs` (which need not be normalised). Non-finite and negative
/// entries count as 0; a token with probability 0 is never returned unless the whole row has no
/// positive mass, in which case the result is [`argmax`] (0 for an all-zero row).
pub fn sample<R: Rng + ?Sized>(probs: &[f32], rng: &mut R) -> u32 {
    try_sample(probs, rng).unwrap_or_else(|| argmax(probs))
}

/// Like [`sample`] but `None` when the row has no positive, finite mass.
pub(crate) fn try_sample<R: Rng + ?Sized>(probs: &[f32], rng: &mut R) -> Option<u32> {
    let total: f64 = probs.iter().map(|&p| weight(p)).sum();
    if !(total > 0.0 && total.is_finite()) {
        return None;
    }
    let target = rng.random::<f64>() * total;
    let mut cumulative = 0.0f64;
    let mut last_positive = None;
    for (i, &p) in probs.iter().enumerate() {
        let w = weight(p);
        if w <= 0.0 {
            continue;
        }
        cumulative += w;
        last_positive = Some(i as u32);
        if target < cumulative {
            return last_positive;
        }
    }
    // Only reachable when rounding leaves `cumulative` a hair below `target`.
    last_positive
}

/// A probability as a sampling weight: NaN, negative and infinite entries contribute nothing.
fn weight(p: f32) -> f64 {
    if p.is_finite() && p > 0.0 {
        f64::from(p)
    } else {
        0.0
    }
}

fn one_hot(len: usize, at: u32) -> Vec<f32> {
    let mut v = vec![0.0; len];
    if let Some(x) = v.get_mut(at as usize) {
        *x = 1.0;
    }
    v
}

/// Numerically stable softmax of `logits / temperature` (max subtracted before `exp`). +∞ logits
/// share all the mass; a row with nothing above −∞ falls back to a one-hot at `argmax`.
fn softmax(logits: &[f32], temperature: f32) -> Vec<f32> {
    let scaled: Vec<f64> = logits
        .iter()
        .map(|&x| {
            if x.is_nan() {
                f64::NEG_INFINITY
            } else {
                f64::from(x) / f64::from(temperature)
            }
        })
        .collect();
    let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return one_hot(logits.len(), argmax(logits));
    }
    let exps: Vec<f64> = if max == f64::INFINITY {
        scaled
            .iter()
            .map(|&z| f64::from(u8::from(z == max)))
            .collect()
    } else {
        scaled.iter().map(|&z| (z - max).exp()).collect()
    };
    // The max term contributes exp(0) = 1, so the sum is ≥ 1 and the division is safe.
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|&e| (e / sum) as f32).collect()
}

/// Indices of the (at most) `k` largest positive entries, in descending order, ties by index.
fn top_indices(probs: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..probs.len()).filter(|&i| probs[i] > 0.0).collect();
    let by_prob_desc =
        |&a: &usize, &b: &usize| -> Ordering { probs[b].total_cmp(&probs[a]).then(a.cmp(&b)) };
    if k < idx.len() {
        // Partial selection keeps top-k O(V) on large vocabularies.
        idx.select_nth_unstable_by(k - 1, by_prob_desc);
        idx.truncate(k);
    }
    idx.sort_unstable_by(by_prob_desc);
    idx
}

/// Zeroes every entry not in `keep` and renormalises the kept ones.
fn retain_only(probs: &mut [f32], keep: &[usize]) {
    let mass: f64 = keep.iter().map(|&i| f64::from(probs[i])).sum();
    let mut kept = vec![0.0f32; probs.len()];
    for &i in keep {
        kept[i] = (f64::from(probs[i]) / mass) as f32;
    }
    probs.copy_from_slice(&kept);
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn params(temperature: f32, top_k: u32, top_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: 0,
        }
    }

    fn assert_close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn argmax_prefers_lowest_index_on_ties_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, f32::NAN, 0.7]), 3);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[-1.0, f32::INFINITY, 5.0]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn greedy_is_one_hot_at_argmax() {
        let p = probs_from_logits(&[0.1, 2.0, 2.0, f32::NAN], &SamplingParams::GREEDY);
        assert_eq!(p, vec![0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn softmax_matches_closed_form_and_is_stable_for_huge_logits() {
        let p = probs_from_logits(&[0.0, 2f32.ln()], &params(1.0, 0, 1.0));
        assert_close(&p, &[1.0 / 3.0, 2.0 / 3.0]);
        // exp(800) overflows even f64 unless the max is subtracted first.
        let p = probs_from_logits(&[800.0, 801.0], &params(1.0, 0, 1.0));
        let e = std::f32::consts::E;
        assert_close(&p, &[1.0 / (1.0 + e), e / (1.0 + e)]);
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let logits = [0.0, 2f32.ln()];
        // T = 0.5 squares the odds: 1:4.
        assert_close(
            &probs_from_logits(&logits, &params(0.5, 0, 1.0)),
            &[0.2, 0.8],
        );
        // T = 2 takes the square root of the odds: 1:√2.
        let s = 2f32.sqrt();
        let expected = [1.0 / (1.0 + s), s / (1.0 + s)];
        assert_close(&probs_from_logits(&logits, &params(2.0, 0, 1.0)), &expected);
    }

    #[test]
    fn top_k_keeps_k_most_likely_and_breaks_ties_by_index() {
        let logits = [1.0f32.ln(), 3f32.ln(), 3f32.ln(), 2f32.ln()];
        let p = probs_from_logits(&logits, &params(1.0, 2, 1.0));
        assert_close(&p, &[0.0, 0.5, 0.5, 0.0]);
        let p = probs_from_logits(&logits, &params(1.0, 3, 1.0));
        assert_close(&p, &[0.0, 0.375, 0.375, 0.25]);
        // k ≥ vocab is a no-op.
        let p = probs_from_logits(&logits, &params(1.0, 9, 1.0));
        assert_close(&p, &[1.0 / 9.0, 3.0 / 9.0, 3.0 / 9.0, 2.0 / 9.0]);
    }

    #[test]
    fn top_p_keeps_smallest_prefix_reaching_the_mass() {
        let logits = [0.1f32.ln(), 0.5f32.ln(), 0.15f32.ln(), 0.25f32.ln()];
        // 0.5 + 0.25 = 0.75 ≥ 0.7.
        let p = probs_from_logits(&logits, &params(1.0, 0, 0.7));
        assert_close(&p, &[0.0, 2.0 / 3.0, 0.0, 1.0 / 3.0]);
        // 0.5 alone reaches 0.5.
        let p = probs_from_logits(&logits, &params(1.0, 0, 0.5));
        assert_close(&p, &[0.0, 1.0, 0.0, 0.0]);
        // top_p ≤ 0 keeps the mode only.
        let p = probs_from_logits(&logits, &params(1.0, 0, 0.0));
        assert_close(&p, &[0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn top_p_applies_to_the_top_k_renormalised_distribution() {
        // After top-k=3: 0.5/0.9, 0.25/0.9, 0.15/0.9 ≈ 0.556, 0.278, 0.167. top-p 0.8 then
        // needs the first two (0.833), whereas on the raw distribution 0.75 < 0.8 would need three.
        let logits = [0.1f32.ln(), 0.5f32.ln(), 0.15f32.ln(), 0.25f32.ln()];
        let p = probs_from_logits(&logits, &params(1.0, 3, 0.8));
        assert_close(&p, &[0.0, 2.0 / 3.0, 0.0, 1.0 / 3.0]);
    }

    #[test]
    fn degenerate_rows_still_give_a_distribution() {
        let p = probs_from_logits(&[f32::NAN, f32::NEG_INFINITY], &params(1.0, 0, 1.0));
        assert_eq!(p, vec![0.0, 1.0]);
        let p = probs_from_logits(&[f32::NAN, f32::NAN], &params(1.0, 0, 1.0));
        assert_eq!(p, vec![1.0, 0.0]);
        let p = probs_from_logits(&[f32::INFINITY, 0.0, f32::INFINITY], &params(1.0, 0, 1.0));
        assert_close(&p, &[0.5, 0.0, 0.5]);
        assert!(probs_from_logits(&[], &params(1.0, 0, 1.0)).is_empty());
    }

    #[test]
    fn sample_never_returns_zero_probability_tokens() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let probs = [0.0, 0.3, f32::NAN, 0.7, -1.0, 0.0];
        for _ in 0..2000 {
            let t = sample(&probs, &mut rng);
            assert!(t == 1 || t == 3, "{t}");
        }
        assert_eq!(sample(&[0.0, 0.0, 0.0], &mut rng), 0);
        assert_eq!(try_sample(&[0.0, f32::NAN], &mut rng), None);
    }

    #[test]
    fn sample_follows_the_weights() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut counts = [0u32; 3];
        let n = 30_000;
        for _ in 0..n {
            counts[sample(&[1.0, 2.0, 1.0], &mut rng) as usize] += 1;
        }
        let freq: Vec<f64> = counts
            .iter()
            .map(|&c| f64::from(c) / f64::from(n))
            .collect();
        assert!((freq[1] - 0.5).abs() < 0.015, "{freq:?}");
        assert!((freq[0] - 0.25).abs() < 0.015, "{freq:?}");
    }
}
