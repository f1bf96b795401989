//! Greedy verification through the service equals target-only greedy decoding, whatever the
//! drafts, the block length (γ = 0 included) or the batching.

mod common;

use common::*;
use edgespec_proto::pb;

const GAMMA: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_verdicts_equal_a_target_only_greedy_walk() {
    let m = tiny_model();
    let vocab = m.spec.vocab_size();
    let mut reference = m.load();
    let node = Node::start(settings(&m.path)).await;
    for (session, plen) in [(1u64, 5usize), (2, 23)] {
        let p = prompt(session, plen, vocab);
        let n = 48;
        let walk = greedy_continuation(reference.as_mut(), 99, &p, n + GAMMA + 1, &[]).unwrap();
        let full: Vec<u32> = p.iter().chain(&walk).copied().collect();
        // Round r drafts the true continuation with position r % (γ + 1) corrupted (no
        // corruption when that is γ), so every acceptance count 0..=γ occurs.
        let (got, rounds) = speculate(&node, session, &p, n, GREEDY, |c, r| {
            let mut d = full[c.len()..c.len() + GAMMA].to_vec();
            if r % (GAMMA + 1) < GAMMA {
                let i = r % (GAMMA + 1);
                d[i] = (d[i] + 1) % vocab as u32;
            }
            d
        })
        .await;
        assert_eq!(got, walk[..n], "session {session}");
        for (r, &(drafted, accepted)) in rounds.iter().enumerate() {
            assert_eq!(drafted, GAMMA);
            assert_eq!(accepted, (r % (GAMMA + 1)).min(GAMMA), "round {r}");
        }
    }
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gamma_zero_is_plain_target_decoding() {
    let m = tiny_model();
    let vocab = m.spec.vocab_size();
    let mut reference = m.load();
    let node = Node::start(settings(&m.path)).await;
    let p = prompt(3, 9, vocab);
    let walk = greedy_continuation(reference.as_mut(), 99, &p, 20, &[]).unwrap();
    let (got, rounds) = speculate(&node, 7, &p, 20, GREEDY, |_, _| vec![]).await;
    assert_eq!(got, walk);
    assert_eq!(rounds.len(), 20, "one token per γ = 0 round");
    assert!(rounds.iter().all(|&r| r == (0, 0)));
    node.stop().await.unwrap();
}

/// Drafts that depend only on the committed tokens (some right, mostly wrong).
fn cheap_drafts(committed: &[u32], vocab: usize, gamma: usize) -> Vec<u32> {
    let last = *committed.last().unwrap() as usize;
    (0..gamma)
        .map(|i| ((last * 31 + committed.len() * 7 + i) % vocab) as u32)
        .collect()
}

fn sampled(seed: u64) -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: 0.9,
        top_k: 40,
        top_p: 0.95,
        seed,
    }
}

/// Draft distributions: the draft token gets 0.6, three neighbours share the rest.
fn cheap_q(drafts: &[u32], vocab: usize) -> Vec<pb::SparseDist> {
    drafts
        .iter()
        .map(|&t| {
            let v = vocab as u32;
            pb::SparseDist {
                ids: vec![t, (t + 1) % v, (t + 2) % v, (t + 3) % v],
                probs: vec![0.6, 0.2, 0.1, 0.1],
            }
        })
        .collect()
}

/// Runs `rounds` rounds of `sessions` sessions; `concurrent` sends every session's rounds from
/// its own task (so the node batches them), otherwise one session at a time. Returns every
/// session's committed tokens and the most sessions seen in one forward.
async fn drive(
    node: &Node,
    sessions: u64,
    rounds: usize,
    concurrent: bool,
) -> (Vec<Vec<u32>>, u32) {
    let vocab = node.vocab_size;
    let run = |session: u64| {
        let client = node.client.clone();
        let fingerprint = node.fingerprint.clone();
        async move {
            let mut committed = prompt(100 + session, 6 + session as usize, vocab);
            let gamma = (session % 4) as usize; // γ = 0..=3
            let greedy_session = session % 2 == 0;
            let mut widest = 0;
            for r in 0..rounds {
                let d = cheap_drafts(&committed, vocab, gamma);
                let mut it = item(
                    session,
                    committed.len(),
                    if r == 0 { &committed } else { &[] },
                    &d,
                );
                if !greedy_session {
                    it.sampling = Some(sampled(session));
                    it.draft_probs = cheap_q(&d, vocab);
                }
                let resp = client
                    .clone()
                    .verify(pb::VerifyBatchRequest {
                        batch_id: r as u64,
                        coordinator_id: "test-coordinator".into(),
                        fingerprint: fingerprint.clone(),
                        items: vec![it],
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let o = outcome(&resp.results[0]);
                widest = widest.max(resp.results[0].timings.unwrap().batch_sessions);
                committed.extend_from_slice(&d[..o.accepted as usize]);
                committed.push(o.next_token);
                assert_eq!(o.committed_len as usize, committed.len());
            }
            (committed, widest)
        }
    };
    if concurrent {
        let tasks: Vec<_> = (0..sessions).map(|s| tokio::spawn(run(s))).collect();
        let (mut out, mut widest) = (Vec::new(), 0);
        for t in tasks {
            let (c, w) = t.await.unwrap();
            out.push(c);
            widest = widest.max(w);
        }
        (out, widest)
    } else {
        let (mut out, mut widest) = (Vec::new(), 0);
        for s in 0..sessions {
            let (c, w) = run(s).await;
            out.push(c);
            widest = widest.max(w);
        }
        (out, widest)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_give_the_same_verdicts_as_one_at_a_time() {
    let m = tiny_model();
    let sequential = Node::start(settings(&m.path)).await;
    let (expected, widest) = drive(&sequential, 12, 8, false).await;
    assert_eq!(widest, 1);
    sequential.stop().await.unwrap();

    let mut s = settings(&m.path);
    s.batching.window = std::time::Duration::from_millis(20);
    let batched = Node::start(s).await;
    let (got, widest) = drive(&batched, 12, 8, true).await;
    assert_eq!(got, expected);
    assert!(widest > 1, "concurrent calls shared a forward");

    // One VerifyBatch with many sessions goes through one forward.
    let vocab = batched.vocab_size;
    let items: Vec<pb::VerifyItem> = (0..6u64)
        .map(|s| {
            let p = prompt(500 + s, 5, vocab);
            item(1000 + s, p.len(), &p, &cheap_drafts(&p, vocab, 2))
        })
        .collect();
    let resp = batched.verify(items).await;
    assert_eq!(resp.results.len(), 6);
    for (i, r) in resp.results.iter().enumerate() {
        assert_eq!(r.session_id, 1000 + i as u64);
        outcome(r);
        let t = r.timings.unwrap();
        assert_eq!(t.batch_sessions, 6);
        assert_eq!(t.batch_tokens, 6 * 7);
        assert!(t.forward_ns > 0 && t.total_ns >= t.forward_ns);
    }
    let load = resp.load.unwrap();
    assert!(load.active_sessions >= 6);
    assert!(load.kv_bytes > 0);
    batched.stop().await.unwrap();
}
