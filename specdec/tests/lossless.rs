//! Seeded statistical proof that sampled verification is lossless: whatever q the draft proposes
//! from, the tokens the verifier emits (accepted drafts, then the correction or bonus) follow the
//! target distribution p. Each case runs ≥ 100k verifications and applies Pearson's chi-square
//! test at significance 0.001; bins with p = 0 are left out of the statistic and must never occur.

use edgespec_specdec::{sample, verify_sampled, SparseDist};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const TRIALS: usize = 100_000;

/// Upper 0.001 quantiles of the chi-square distribution (computed from the regularised incomplete
/// gamma function; they match published tables).
fn chi2_critical_0001(df: usize) -> f64 {
    const SMALL: [f64; 15] = [
        10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124, 27.877, 29.588, 31.264,
        32.909, 34.528, 36.123, 37.697,
    ];
    match df {
        1..=15 => SMALL[df - 1],
        48 => 84.037,
        _ => panic!("no critical value tabulated for {df} degrees of freedom"),
    }
}

/// Pearson's statistic over the bins with positive expected mass, and its degrees of freedom.
/// Panics if a bin with zero expected mass was ever observed.
fn chi_square(counts: &[u64], expected_probs: &[f64]) -> (f64, usize) {
    let n: u64 = counts.iter().sum();
    let mut stat = 0.0;
    let mut bins = 0;
    for (bin, (&observed, &prob)) in counts.iter().zip(expected_probs).enumerate() {
        if prob == 0.0 {
            assert_eq!(
                observed, 0,
                "bin {bin} has probability 0 but occurred {observed} times"
            );
            continue;
        }
        let expected = prob * n as f64;
        assert!(
            expected >= 5.0,
            "bin {bin} expects only {expected}: too few trials for chi-square"
        );
        stat += (observed as f64 - expected).powi(2) / expected;
        bins += 1;
    }
    (stat, bins - 1)
}

fn assert_follows(counts: &[u64], p: &[f64], label: &str) {
    let (stat, df) = chi_square(counts, p);
    let critical = chi2_critical_0001(df);
    assert!(
        stat < critical,
        "{label}: chi-square {stat:.2} ≥ {critical} (df {df}); counts {counts:?}, p {p:?}"
    );
}

fn normalise(weights: &[f64]) -> Vec<f64> {
    let s: f64 = weights.iter().sum();
    weights.iter().map(|w| w / s).collect()
}

fn sparse(weights: &[f64]) -> SparseDist {
    let total: f64 = weights.iter().sum();
    let (ids, probs) = weights
        .iter()
        .enumerate()
        .filter(|(_, &w)| w > 0.0)
        .map(|(i, &w)| (i as u32, (w / total) as f32))
        .unzip();
    SparseDist { ids, probs }
}

/// Draws a token from the exact q the verifier will see.
fn draw(q: &SparseDist, rng: &mut ChaCha8Rng) -> u32 {
    q.ids[sample(&q.probs, rng) as usize]
}

/// Target distribution shared by the single-position cases: a clear mode (token 2), a long
/// tail, and two impossible tokens (5 and 9) that must never be emitted.
const P: [f64; 12] = [
    0.08, 0.12, 0.30, 0.10, 0.05, 0.0, 0.07, 0.04, 0.06, 0.0, 0.03, 0.15,
];

/// γ = 1: draft x ~ q, verify against p, and record the first emitted token.
fn first_token_counts(q_weights: &[f64], seed: u64) -> Vec<u64> {
    let p: Vec<f32> = P.iter().map(|&x| x as f32).collect();
    let q = sparse(q_weights);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut counts = vec![0u64; P.len()];
    for _ in 0..TRIALS {
        let x = draw(&q, &mut rng);
        let v = verify_sampled(&[x], std::slice::from_ref(&q), &[&p, &p], &mut rng).unwrap();
        let first = if v.accepted == 1 { x } else { v.next_token };
        counts[first as usize] += 1;
    }
    counts
}

#[test]
fn emitted_token_follows_p_when_q_equals_p() {
    let counts = first_token_counts(&P, 1);
    assert_follows(&counts, &normalise(&P), "q = p");
}

#[test]
fn emitted_token_follows_p_when_supports_are_disjoint() {
    // p's support is everything but {5, 9}, so a disjoint q lives on {5, 9}: every draft is
    // rejected and the residual max(0, p − q) is p itself.
    let mut q = [0.0; 12];
    q[5] = 0.7;
    q[9] = 0.3;
    let counts = first_token_counts(&q, 2);
    assert_follows(&counts, &normalise(&P), "disjoint supports");
}

#[test]
fn emitted_token_follows_p_when_q_misses_the_mode() {
    // Same shape as p but zero mass on p's mode (token 2).
    let mut q = P;
    q[2] = 0.0;
    let counts = first_token_counts(&q, 3);
    assert_follows(&counts, &normalise(&P), "q without p's mode");
}

#[test]
fn emitted_token_follows_p_under_a_deliberately_bad_q() {
    // Inverted preferences: most mass on p's rarest tokens and on an impossible one.
    let q = [
        0.01, 0.01, 0.01, 0.01, 0.15, 0.20, 0.02, 0.20, 0.01, 0.0, 0.37, 0.01,
    ];
    let counts = first_token_counts(&q, 4);
    assert_follows(&counts, &normalise(&P), "bad q");
}

#[test]
fn emitted_token_follows_p_under_a_top_k_truncated_q() {
    // What a draft node really sends: a near-miss of p, truncated to its top 4.
    let draft = [
        0.10, 0.05, 0.35, 0.02, 0.08, 0.01, 0.09, 0.04, 0.06, 0.01, 0.04, 0.15,
    ];
    let draft: Vec<f32> = draft.iter().map(|&x| x as f32).collect();
    let q = edgespec_specdec::truncate(&draft, 4);
    let weights: Vec<f64> = (0..12).map(|i| f64::from(q.prob(i))).collect();
    let counts = first_token_counts(&weights, 5);
    assert_follows(&counts, &normalise(&P), "top-4 q");
}

/// γ = 3 with a context-free p (every position's target row is the same p) and a different q at
/// each position: generate until two tokens are emitted, then check each position's marginal and
/// the pair's joint distribution (p ⊗ p) — a rule that leaked the draft into later positions
/// would show up as dependence even with correct marginals.
#[test]
fn first_two_emitted_tokens_are_iid_p_with_gamma_three() {
    let p_w = [0.20, 0.0, 0.15, 0.25, 0.10, 0.05, 0.15, 0.10];
    let p: Vec<f32> = p_w.iter().map(|&x| x as f32).collect();
    let qs = [
        sparse(&[0.05, 0.10, 0.05, 0.50, 0.05, 0.05, 0.10, 0.10]),
        sparse(&[0.0, 0.0, 0.0, 0.0, 0.0, 0.6, 0.0, 0.4]),
        sparse(&p_w),
    ];
    let rows: [&[f32]; 4] = [&p, &p, &p, &p];
    let vocab = p_w.len();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let (mut first, mut second) = (vec![0u64; vocab], vec![0u64; vocab]);
    let mut joint = vec![0u64; vocab * vocab];
    let mut rounds = 0usize;
    for _ in 0..TRIALS {
        let mut emitted = Vec::new();
        while emitted.len() < 2 {
            let draft: Vec<u32> = qs.iter().map(|q| draw(q, &mut rng)).collect();
            let v = verify_sampled(&draft, &qs, &rows, &mut rng).unwrap();
            emitted.extend_from_slice(&draft[..v.accepted]);
            emitted.push(v.next_token);
            rounds += 1;
        }
        let (a, b) = (emitted[0] as usize, emitted[1] as usize);
        first[a] += 1;
        second[b] += 1;
        joint[a * vocab + b] += 1;
    }
    // Both one-round and two-round paths must have been exercised.
    assert!(rounds > TRIALS && rounds < 2 * TRIALS, "{rounds} rounds");
    let p_n = normalise(&p_w);
    assert_follows(&first, &p_n, "position 1");
    assert_follows(&second, &p_n, "position 2");
    let pp: Vec<f64> = p_n
        .iter()
        .flat_map(|a| p_n.iter().map(move |b| a * b))
        .collect();
    assert_follows(&joint, &pp, "positions 1 and 2 jointly");
}

/// The test harness itself must be able to fail: sampling the emitted token straight from q
/// (i.e. no acceptance rule at all) is caught.
#[test]
fn chi_square_detects_a_wrong_distribution() {
    let q = sparse(&[
        0.10, 0.10, 0.25, 0.10, 0.05, 0.0, 0.07, 0.04, 0.06, 0.0, 0.08, 0.15,
    ]);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut counts = vec![0u64; P.len()];
    for _ in 0..TRIALS {
        counts[draw(&q, &mut rng) as usize] += 1;
    }
    let (stat, df) = chi_square(&counts, &normalise(&P));
    assert!(
        stat > chi2_critical_0001(df),
        "chi-square {stat} missed a wrong distribution"
    );
}
