//! Unit and property tests of the acceptance rules (the distributional proof lives in
//! `tests/lossless.rs`).

use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::proposal::propose;

fn dist(ids: &[u32], probs: &[f32]) -> SparseDist {
    SparseDist {
        ids: ids.to_vec(),
        probs: probs.to_vec(),
    }
}

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

#[test]
fn greedy_accepts_matching_prefix_and_corrects_first_mismatch() {
    let rows: [&[f32]; 4] = [
        &[0.0, 9.0, 1.0],
        &[5.0, 1.0, 1.0],
        &[0.0, 1.0, 2.0],
        &[3.0, 0.0, 0.0],
    ];
    // argmax walk: 1, 0, 2, bonus 0.
    let v = verify_greedy(&[1, 0, 2], &rows).unwrap();
    assert_eq!(
        v,
        Verdict {
            accepted: 3,
            next_token: 0
        }
    );
    assert_eq!(v.emitted(), 4);
    let v = verify_greedy(&[1, 2, 2], &rows).unwrap();
    assert_eq!(
        v,
        Verdict {
            accepted: 1,
            next_token: 0
        }
    );
    let v = verify_greedy(&[0, 0, 2], &rows).unwrap();
    assert_eq!(
        v,
        Verdict {
            accepted: 0,
            next_token: 1
        }
    );
}

#[test]
fn gamma_zero_is_plain_target_decoding() {
    let row: &[f32] = &[0.0, 1.0, 3.0];
    assert_eq!(
        verify_greedy(&[], &[row]).unwrap(),
        Verdict {
            accepted: 0,
            next_token: 2
        }
    );
    let p: &[f32] = &[0.0, 0.0, 1.0];
    assert_eq!(
        verify_sampled(&[], &[], &[p], &mut rng(0)).unwrap(),
        Verdict {
            accepted: 0,
            next_token: 2
        }
    );
    let p: &[f32] = &[0.5, 0.0, 0.5];
    for seed in 0..200 {
        let v = verify_sampled(&[], &[], &[p], &mut rng(seed)).unwrap();
        assert_eq!(v.accepted, 0);
        assert_ne!(v.next_token, 1);
    }
}

#[test]
fn shape_errors_are_reported() {
    let row: &[f32] = &[0.5, 0.5];
    assert_eq!(
        verify_greedy(&[0, 1], &[row, row]),
        Err(SpecError::TargetRowCount { drafted: 2, got: 2 })
    );
    assert_eq!(
        verify_greedy(&[0], &[row, &[1.0]]),
        Err(SpecError::TargetRowWidth {
            row: 1,
            expected: 2,
            got: 1
        })
    );
    assert_eq!(
        verify_greedy(&[], &[&[]]),
        Err(SpecError::TargetRowWidth {
            row: 0,
            expected: 0,
            got: 0
        })
    );
    assert_eq!(
        verify_greedy(&[2], &[row, row]),
        Err(SpecError::DraftOutOfVocab {
            position: 0,
            token: 2,
            vocab_size: 2
        })
    );
    let q = dist(&[0], &[1.0]);
    assert_eq!(
        verify_sampled(&[0], &[], &[row, row], &mut rng(0)),
        Err(SpecError::ProposalCount { drafted: 1, got: 0 })
    );
    assert_eq!(
        verify_sampled(&[0], &[q], &[row], &mut rng(0)),
        Err(SpecError::TargetRowCount { drafted: 1, got: 1 })
    );
}

#[test]
fn drafted_token_outside_its_q_is_an_error() {
    let row: &[f32] = &[0.5, 0.5];
    let q = dist(&[0], &[1.0]);
    assert_eq!(
        verify_sampled(&[1], &[q], &[row, row], &mut rng(0)),
        Err(SpecError::DraftNotInProposal {
            position: 0,
            token: 1
        })
    );
}

#[test]
fn malformed_q_is_an_error() {
    let row: &[f32] = &[0.5, 0.5];
    let q = dist(&[0, 0], &[0.5, 0.5]);
    assert!(matches!(
        verify_sampled(&[0], &[q], &[row, row], &mut rng(0)),
        Err(SpecError::InvalidProposal { .. })
    ));
}

#[test]
fn p_equal_q_always_accepts() {
    let p: &[f32] = &[0.1, 0.2, 0.3, 0.4];
    let q = dist(&[3, 2, 1, 0], &[0.4, 0.3, 0.2, 0.1]);
    for seed in 0..500 {
        for token in 0..4 {
            let draft = [token, token];
            let v = verify_sampled(&draft, &[q.clone(), q.clone()], &[p, p, p], &mut rng(seed));
            assert_eq!(v.unwrap().accepted, 2);
        }
    }
}

#[test]
fn token_with_zero_target_mass_is_always_rejected_and_corrected_from_the_residual() {
    // p(1) = 0 < q(1): reject; residual = max(0, p − q) = [0.5, 0, 0] → always token 0.
    let p: &[f32] = &[1.0, 0.0, 0.0];
    let q = dist(&[1, 0], &[0.5, 0.5]);
    for seed in 0..300 {
        let v = verify_sampled(&[1], std::slice::from_ref(&q), &[p, p], &mut rng(seed)).unwrap();
        assert_eq!(
            v,
            Verdict {
                accepted: 0,
                next_token: 0
            }
        );
    }
}

#[test]
fn rejection_stops_at_the_first_rejected_position() {
    let sure: &[f32] = &[0.0, 1.0];
    let never: &[f32] = &[1.0, 0.0];
    let q = dist(&[1], &[1.0]);
    let v = verify_sampled(
        &[1, 1, 1],
        &[q.clone(), q.clone(), q],
        &[sure, never, sure, sure],
        &mut rng(3),
    );
    assert_eq!(
        v.unwrap(),
        Verdict {
            accepted: 1,
            next_token: 0
        }
    );
}

#[test]
fn residual_is_the_normalised_positive_part_of_p_minus_q() {
    // residual = [0, 0.1, 0.2] → [0, 1/3, 2/3].
    let p = [0.5, 0.3, 0.2];
    let q = dist(&[0, 1], &[0.8, 0.2]);
    let mut r = rng(11);
    let mut counts = [0u32; 3];
    let n = 30_000;
    for _ in 0..n {
        counts[sample_residual(&p, &q, &mut r).unwrap() as usize] += 1;
    }
    assert_eq!(counts[0], 0);
    let share = f64::from(counts[2]) / f64::from(n);
    assert!((share - 2.0 / 3.0).abs() < 0.015, "{counts:?}");
}

#[test]
fn zero_residual_falls_back_to_p() {
    // q over-covers p within validate's tolerance, so max(0, p − q) is 0 everywhere while a
    // rejection still has probability ≈ 0.0008: the rounding-only path.
    let p: &[f32] = &[0.5, 0.5];
    let q = dist(&[0, 1], &[0.5004, 0.5004]);
    let mut r = rng(5);
    let mut counts = [0u32; 2];
    for _ in 0..10_000 {
        counts[sample_residual(p, &q, &mut r).unwrap() as usize] += 1;
    }
    assert!(counts[0] > 4_000 && counts[1] > 4_000, "{counts:?}");
    let mut rejected = 0;
    let mut r = rng(6);
    for _ in 0..20_000 {
        let v = verify_sampled(&[0], std::slice::from_ref(&q), &[p, p], &mut r).unwrap();
        if v.accepted == 0 {
            rejected += 1;
            assert!(v.next_token < 2);
        }
    }
    assert!(rejected > 0, "the rounding path was never exercised");
    // And when p has no mass at all, there is nothing to sample.
    assert_eq!(sample_residual(&[0.0, 0.0], &q, &mut r), None);
}

#[test]
fn degenerate_target_row_is_an_error() {
    let zero: &[f32] = &[0.0, 0.0];
    assert_eq!(
        verify_sampled(&[], &[], &[zero], &mut rng(0)),
        Err(SpecError::DegenerateTarget { row: 0 })
    );
    let q = dist(&[0], &[1.0]);
    assert_eq!(
        verify_sampled(&[0], &[q], &[zero, zero], &mut rng(0)),
        Err(SpecError::DegenerateTarget { row: 0 })
    );
}

#[test]
fn verify_dispatches_on_params_and_applies_the_transform() {
    let logits: &[f32] = &[0.0, 2.0, 1.0];
    let rows = [logits, logits];
    // Greedy ignores q entirely.
    let v = verify(&SamplingParams::GREEDY, &[1], &[], &rows, &mut rng(0)).unwrap();
    assert_eq!(
        v,
        Verdict {
            accepted: 1,
            next_token: 1
        }
    );
    // top_k = 1 makes p one-hot at token 1: drafting 2 is always rejected and corrected to 1.
    let params = SamplingParams {
        temperature: 1.0,
        top_k: 1,
        top_p: 1.0,
        seed: 0,
    };
    let q = dist(&[2, 1], &[0.5, 0.5]);
    for seed in 0..100 {
        let v = verify(
            &params,
            &[2],
            std::slice::from_ref(&q),
            &rows,
            &mut rng(seed),
        )
        .unwrap();
        assert_eq!(
            v,
            Verdict {
                accepted: 0,
                next_token: 1
            }
        );
    }
    assert_eq!(
        verify(&params, &[2], &[q], &[logits], &mut rng(0)),
        Err(SpecError::TargetRowCount { drafted: 1, got: 1 })
    );
}

/// γ, vocab, and for every position a target row plus a draft distribution.
fn block() -> impl Strategy<Value = (Vec<Vec<f32>>, Vec<Vec<f32>>, u64)> {
    (2usize..8, 0usize..5).prop_flat_map(|(vocab, gamma)| {
        let row = prop::collection::vec(prop_oneof![Just(0.0f32), 0.01f32..1.0], vocab).prop_map(
            |mut r| {
                if r.iter().all(|&x| x == 0.0) {
                    r[0] = 1.0;
                }
                let s: f32 = r.iter().sum();
                r.iter().map(|x| x / s).collect::<Vec<f32>>()
            },
        );
        (
            prop::collection::vec(row.clone(), gamma + 1),
            prop::collection::vec(row, gamma),
            any::<u64>(),
        )
    })
}

proptest! {
    #[test]
    fn sampled_verdict_is_in_range_and_emits_a_possible_token(
        (p_rows, draft_rows, seed) in block(),
        top_k in 1usize..4,
    ) {
        let mut r = rng(seed);
        let (draft, q): (Vec<u32>, Vec<SparseDist>) =
            draft_rows.iter().map(|d| propose(d, top_k, &mut r)).unzip();
        let rows: Vec<&[f32]> = p_rows.iter().map(Vec::as_slice).collect();
        let v = verify_sampled(&draft, &q, &rows, &mut r).unwrap();
        prop_assert!(v.accepted <= draft.len());
        prop_assert!(rows[v.accepted][v.next_token as usize] > 0.0);
        // Every accepted token had positive target probability.
        for i in 0..v.accepted {
            prop_assert!(rows[i][draft[i] as usize] > 0.0);
        }
    }

    #[test]
    fn greedy_verdict_equals_the_argmax_walk(
        rows in (2usize..6, 1usize..6).prop_flat_map(|(vocab, n)| {
            prop::collection::vec(prop::collection::vec(-3i8..3, vocab), n)
        }),
        follow in prop::collection::vec(any::<bool>(), 6),
        noise in prop::collection::vec(0u32..6, 6),
    ) {
        let logits: Vec<Vec<f32>> =
            rows.iter().map(|r| r.iter().map(|&x| f32::from(x)).collect()).collect();
        let vocab = logits[0].len() as u32;
        let gamma = logits.len() - 1;
        // Draft tokens that mostly follow the argmax, so long accepted prefixes occur.
        let draft: Vec<u32> = (0..gamma)
            .map(|i| if follow[i] { argmax(&logits[i]) } else { noise[i] % vocab })
            .collect();
        let refs: Vec<&[f32]> = logits.iter().map(Vec::as_slice).collect();
        let v = verify_greedy(&draft, &refs).unwrap();
        let accepted = draft.iter().zip(&logits).take_while(|(t, r)| **t == argmax(r)).count();
        prop_assert_eq!(v.accepted, accepted);
        prop_assert_eq!(v.next_token, argmax(&logits[accepted]));
    }
}
