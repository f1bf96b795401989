//! Lossless sampling through the service: the first token a round emits (accepted draft or
//! correction) follows the target distribution p (after the same temperature/top-k transform),
//! whatever the sparse draft distribution q was. Checked with a chi-square test over many
//! seeded sessions; the seeds are fixed, so the test is deterministic.

mod common;

use common::*;
use edgespec_proto::pb;
use edgespec_specdec::{probs_from_logits, SamplingParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TRIALS: u64 = 3000;
const PER_BATCH: u64 = 150;

/// Upper α = 0.001 quantile of χ²(df) (Wilson–Hilferty).
fn chi2_critical(df: usize) -> f64 {
    let k = df as f64;
    let z = 3.09;
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

fn draw(q: &pb::SparseDist, rng: &mut StdRng) -> u32 {
    let u: f32 = rng.random();
    let mut acc = 0.0;
    for (&id, &p) in q.ids.iter().zip(&q.probs) {
        acc += p;
        if u < acc {
            return id;
        }
    }
    *q.ids.last().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_emitted_token_follows_the_target_distribution() {
    let m = tiny_model();
    let vocab = m.spec.vocab_size();
    let mut reference = m.load();
    let p_prompt = prompt(42, 10, vocab);
    let params = SamplingParams {
        temperature: 0.7,
        top_k: 10,
        top_p: 1.0,
        seed: 0,
    };
    let p = probs_from_logits(&next_logits(reference.as_mut(), 1, &p_prompt), &params);
    let mut support: Vec<u32> = (0..vocab as u32).filter(|&t| p[t as usize] > 0.0).collect();
    support.sort_by(|a, b| p[*b as usize].total_cmp(&p[*a as usize]));
    assert_eq!(support.len(), 10);
    // q: three of p's likely tokens with the wrong weights, plus three tokens p never emits.
    let outside: Vec<u32> = (0..vocab as u32)
        .filter(|t| !support.contains(t))
        .take(3)
        .collect();
    let q1 = pb::SparseDist {
        ids: vec![
            support[0], support[1], support[4], outside[0], outside[1], outside[2],
        ],
        probs: vec![0.15, 0.35, 0.1, 0.2, 0.1, 0.1],
    };
    let q2 = pb::SparseDist {
        ids: vec![support[2], outside[0]],
        probs: vec![0.5, 0.5],
    };

    let mut s = settings(&m.path);
    s.sessions.capacity = 1024;
    let node = Node::start(s).await;
    let mut rng = StdRng::seed_from_u64(7);
    let mut counts = vec![0u64; vocab];
    let mut accepted_first = 0;
    for batch in 0..TRIALS / PER_BATCH {
        let ids: Vec<u64> = (0..PER_BATCH).map(|i| batch * PER_BATCH + i).collect();
        let items = ids
            .iter()
            .map(|&id| {
                let d = vec![draw(&q1, &mut rng), draw(&q2, &mut rng)];
                let mut it = item(id, p_prompt.len(), &p_prompt, &d);
                it.sampling = Some(pb::SamplingParams {
                    temperature: params.temperature,
                    top_k: params.top_k,
                    top_p: params.top_p,
                    seed: 1_000_003 * id + 17,
                });
                it.draft_probs = vec![q1.clone(), q2.clone()];
                it
            })
            .collect::<Vec<_>>();
        let drafts: Vec<u32> = items.iter().map(|it| it.draft_tokens[0]).collect();
        let resp = node.verify(items).await;
        for (r, d) in resp.results.iter().zip(drafts) {
            let o = outcome(r);
            let first = if o.accepted >= 1 {
                accepted_first += 1;
                d
            } else {
                o.next_token
            };
            counts[first as usize] += 1;
        }
        node.client
            .clone()
            .release(pb::ReleaseRequest {
                session_ids: ids,
                coordinator_id: "test-coordinator".into(),
            })
            .await
            .unwrap();
    }
    let outside_support: u64 = (0..vocab).filter(|&t| p[t] == 0.0).map(|t| counts[t]).sum();
    assert_eq!(outside_support, 0, "a token with p = 0 was emitted");
    // Bins with expected count >= 5; the rest pooled.
    let n = TRIALS as f64;
    let (mut chi2, mut bins, mut pooled_obs, mut pooled_exp) = (0.0, 0, 0.0, 0.0);
    for &t in &support {
        let expected = n * f64::from(p[t as usize]);
        let observed = counts[t as usize] as f64;
        if expected >= 5.0 {
            chi2 += (observed - expected).powi(2) / expected;
            bins += 1;
        } else {
            pooled_obs += observed;
            pooled_exp += expected;
        }
    }
    if pooled_exp > 0.0 {
        chi2 += (pooled_obs - pooled_exp).powi(2) / pooled_exp.max(1e-9);
        bins += 1;
    }
    let critical = chi2_critical(bins - 1);
    assert!(
        chi2 < critical,
        "chi2 = {chi2:.1} over {bins} bins (critical {critical:.1}); counts {counts:?}"
    );
    // Both branches of the rule were exercised.
    assert!(
        accepted_first > 100 && accepted_first < TRIALS - 100,
        "{accepted_first}"
    );
    node.stop().await.unwrap();
}
