//! Session lifecycle through the service: eviction (capacity and KV budget) followed by a resync
//! continues identically; release; bad input is refused with a clear per-item or call-level
//! error and changes nothing; graceful shutdown finishes the batch in flight.

mod common;

use std::time::{Duration, Instant};

use common::*;
use edgespec_proto::pb;
use tonic::Code;

const RESYNC: i32 = pb::ErrorCode::ResyncNeeded as i32;
const INVALID: i32 = pb::ErrorCode::InvalidArgument as i32;
const OVERFLOW: i32 = pb::ErrorCode::ContextOverflow as i32;

/// Opens `session` with `prompt` and runs `rounds` greedy rounds with perfect drafts taken from
/// `full` (prompt ++ reference walk); returns the committed tokens.
async fn run_rounds(
    node: &Node,
    session: u64,
    full: &[u32],
    start: &[u32],
    rounds: usize,
) -> Vec<u32> {
    let mut committed = start.to_vec();
    for r in 0..rounds {
        let d = &full[committed.len()..committed.len() + 2];
        let history: &[u32] = if r == 0 { &committed } else { &[] };
        let resp = node
            .verify(vec![item(session, committed.len(), history, d)])
            .await;
        let o = outcome(&resp.results[0]);
        assert_eq!(o.accepted, 2);
        committed.extend_from_slice(d);
        committed.push(o.next_token);
    }
    committed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_eviction_then_resync_continues_identically() {
    let m = tiny_model();
    let vocab = m.spec.vocab_size();
    let mut reference = m.load();
    let mut s = settings(&m.path);
    s.sessions.capacity = 2;
    // Every session between rounds counts as idle here: eviction, not refusal, is under test.
    s.sessions.evict_idle_after = Duration::ZERO;
    let node = Node::start(s).await;
    let pa = prompt(1, 12, vocab);
    let walk = greedy_continuation(reference.as_mut(), 99, &pa, 40, &[]).unwrap();
    let full: Vec<u32> = pa.iter().chain(&walk).copied().collect();

    let committed = run_rounds(&node, 1, &full, &pa, 3).await;
    // Two more sessions: the least recently used one (session 1) is evicted.
    for id in [2u64, 3] {
        let p = prompt(id, 8, vocab);
        outcome(&node.verify(vec![item(id, p.len(), &p, &[])]).await.results[0]);
    }
    let d = &full[committed.len()..committed.len() + 2];
    let resp = node.verify(vec![item(1, committed.len(), &[], d)]).await;
    let e = error(&resp.results[0]);
    assert_eq!(e.code, RESYNC);
    assert_eq!((e.session_id, e.round), (1, committed.len() as u64));
    assert_eq!(resp.load.unwrap().active_sessions, 2);
    // The same block with the full history resyncs and continues exactly.
    let committed = {
        let mut c = committed.clone();
        let resp = node.verify(vec![item(1, c.len(), &c.clone(), d)]).await;
        let o = outcome(&resp.results[0]);
        assert_eq!(o.accepted, 2);
        c.extend_from_slice(d);
        c.push(o.next_token);
        run_rounds_from(&node, 1, &full, c, 4).await
    };
    assert_eq!(committed[..], full[..committed.len()]);
    node.stop().await.unwrap();
}

/// Like [`run_rounds`] for a session that is already open.
async fn run_rounds_from(
    node: &Node,
    session: u64,
    full: &[u32],
    mut committed: Vec<u32>,
    rounds: usize,
) -> Vec<u32> {
    for _ in 0..rounds {
        let d = &full[committed.len()..committed.len() + 2];
        let resp = node
            .verify(vec![item(session, committed.len(), &[], d)])
            .await;
        let o = outcome(&resp.results[0]);
        committed.extend_from_slice(&d[..o.accepted as usize]);
        committed.push(o.next_token);
    }
    committed
}

/// KV bytes a node holds after opening one session with `prompt` (on a node of its own).
async fn one_session_kv_bytes(m: &TinyModel, prompt: &[u32]) -> u64 {
    let probe = Node::start(settings(&m.path)).await;
    let bytes = probe
        .verify(vec![item(1, prompt.len(), prompt, &[])])
        .await
        .load
        .unwrap()
        .kv_bytes;
    probe.stop().await.unwrap();
    assert!(bytes > 0);
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_budget_evicts_the_least_recently_used_idle_session() {
    let m = tiny_model();
    let vocab = m.spec.vocab_size();
    // Measure what one 40-token session costs, then allow about two and a half of them.
    let one = one_session_kv_bytes(&m, &prompt(5, 40, vocab)).await;
    let mut s = settings(&m.path);
    s.sessions.kv_budget_bytes = one * 5 / 2;
    s.sessions.evict_idle_after = Duration::ZERO;
    let node = Node::start(s).await;
    let prompts: Vec<Vec<u32>> = (1..=3).map(|i| prompt(i, 40, vocab)).collect();
    let mut next = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let resp = node.verify(vec![item(i as u64 + 1, 40, p, &[])]).await;
        next.push(outcome(&resp.results[0]).next_token);
        let load = resp.load.unwrap();
        assert!(load.kv_bytes <= load.kv_budget_bytes, "{load:?}");
    }
    let resp = node
        .verify(vec![
            item(1, 41, &[], &[]),
            item(2, 41, &[], &[]),
            item(3, 41, &[], &[]),
        ])
        .await;
    assert_eq!(
        error(&resp.results[0]).code,
        RESYNC,
        "session 1 was evicted"
    );
    outcome(&resp.results[1]);
    outcome(&resp.results[2]);
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kv_budget_holds_from_the_very_first_batch() {
    let m = tiny_model();
    let p = prompt(5, 40, m.spec.vocab_size());
    let one = one_session_kv_bytes(&m, &p).await;
    // A fresh node whose budget cannot hold one such session refuses it before any cache was
    // measured (the model's own bytes per token price it), instead of admitting it and warning.
    let mut s = settings(&m.path);
    s.sessions.kv_budget_bytes = one / 2;
    let node = Node::start(s).await;
    let resp = node.verify(vec![item(1, 40, &p, &[])]).await;
    let e = error(&resp.results[0]);
    assert_eq!(e.code, pb::ErrorCode::Overloaded as i32, "{e:?}");
    let load = resp.load.unwrap();
    assert!(load.kv_bytes <= load.kv_budget_bytes, "{load:?}");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_drops_sessions() {
    let m = tiny_model();
    let vocab = m.spec.vocab_size();
    let node = Node::start(settings(&m.path)).await;
    let p = prompt(9, 6, vocab);
    outcome(&node.verify(vec![item(5, 6, &p, &[])]).await.results[0]);
    let mut client = node.client.clone();
    let r = client
        .release(pb::ReleaseRequest {
            session_ids: vec![5, 77],
            coordinator_id: "test-coordinator".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.released, 1);
    let resp = node.verify(vec![item(5, 7, &[], &[])]).await;
    assert_eq!(error(&resp.results[0]).code, RESYNC);
    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.load.unwrap().active_sessions, 0);
    node.stop().await.unwrap();
}

fn sampled_item(
    session: u64,
    history: &[u32],
    drafts: &[u32],
    q: pb::SparseDist,
) -> pb::VerifyItem {
    let mut it = item(session, history.len(), history, drafts);
    it.sampling = Some(pb::SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        seed: 3,
    });
    it.draft_probs = vec![q; drafts.len()];
    it
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let m = tiny_model();
    let vocab = m.spec.vocab_size();
    let v = vocab as u32;
    let mut reference = m.load();
    let mut s = settings(&m.path);
    s.model.max_context = 64;
    s.sessions.max_block_tokens = 4;
    let node = Node::start(s).await;
    let pg = prompt(21, 8, vocab);
    let walk = greedy_continuation(reference.as_mut(), 99, &pg, 30, &[]).unwrap();
    let full: Vec<u32> = pg.iter().chain(&walk).copied().collect();
    let ph = prompt(22, 8, vocab);
    let walk_h = greedy_continuation(reference.as_mut(), 99, &ph, 30, &[]).unwrap();
    let full_h: Vec<u32> = ph.iter().chain(&walk_h).copied().collect();

    // Open G and H.
    let g = run_rounds(&node, 1, &full, &pg, 1).await;
    let h = run_rounds(&node, 2, &full_h, &ph, 1).await;

    let ok_q = pb::SparseDist {
        ids: vec![1, 2],
        probs: vec![0.5, 0.5],
    };
    let long: Vec<u32> = prompt(5, 62, vocab);
    let items = vec![
        item(1, g.len(), &[], &full[g.len()..g.len() + 2]), // good
        item(10, 3, &[1, v, 2], &[]),                       // history id out of vocab
        item(11, 3, &[1, 2, 3], &[4, v + 5]),               // draft id out of vocab
        item(12, 3, &[1, 2, 3], &[1, 2, 3, 4, 5]),          // block too long
        sampled_item(
            13,
            &[1, 2, 3],
            &[1],
            pb::SparseDist {
                ids: vec![1, v],
                probs: vec![0.5, 0.5],
            },
        ), // q id out of vocab
        sampled_item(
            14,
            &[1, 2, 3],
            &[1],
            pb::SparseDist {
                ids: vec![1, 2],
                probs: vec![0.25, 0.25],
            },
        ), // q not a distribution
        item(15, 62, &long, &[1, 2, 3]),                    // context overflow
        item(16, 9, &[], &[1]),                             // unknown session
        item(2, h.len() + 1, &[], &[1]),                    // wrong committed_len
        sampled_item(17, &[1, 2, 3], &[1], ok_q),           // good, sampled
    ];
    let resp = node.verify(items).await;
    let codes: Vec<Option<i32>> = resp
        .results
        .iter()
        .map(|r| match r.result.as_ref().unwrap() {
            pb::verify_result::Result::Error(e) => Some(e.code),
            pb::verify_result::Result::Outcome(_) => None,
        })
        .collect();
    assert_eq!(
        codes,
        vec![
            None,
            Some(INVALID),
            Some(INVALID),
            Some(INVALID),
            Some(INVALID),
            Some(INVALID),
            Some(OVERFLOW),
            Some(RESYNC),
            Some(INVALID),
            None
        ]
    );
    for r in &resp.results[1..9] {
        assert!(!error(r).message.is_empty());
        assert_eq!(
            r.timings.unwrap().forward_ns,
            0,
            "a bad item never reaches the forward"
        );
    }
    assert_eq!(resp.results[0].timings.unwrap().batch_sessions, 2);
    let o = outcome(&resp.results[0]);
    let mut g = g;
    g.extend_from_slice(&full[g.len()..g.len() + o.accepted as usize]);
    g.push(o.next_token);
    assert_eq!(g[..], full[..g.len()]);

    // Call-level refusals.
    let mut client = node.client.clone();
    let good = item(1, g.len(), &[], &full[g.len()..g.len() + 1]);
    let status = client
        .verify(pb::VerifyBatchRequest {
            batch_id: 9,
            coordinator_id: "test-coordinator".into(),
            fingerprint: "0000".into(),
            items: vec![good.clone()],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let status = node.try_verify(vec![]).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = node
        .try_verify(vec![good.clone(), good.clone()])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Nothing changed: the bad sessions do not exist, G and H continue where they were.
    let resp = node
        .verify(vec![item(11, 3, &[], &[]), item(15, 62, &[], &[])])
        .await;
    assert!(resp.results.iter().all(|r| error(r).code == RESYNC));
    let g = run_rounds_from(&node, 1, &full, g, 3).await;
    assert_eq!(g[..], full[..g.len()]);
    let h = run_rounds_from(&node, 2, &full_h, h, 3).await;
    assert_eq!(h[..], full_h[..h.len()]);
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_batch_in_flight() {
    let m = tiny_model();
    let vocab = m.spec.vocab_size();
    let mut s = settings(&m.path);
    // A long window keeps the request queued while shutdown starts.
    s.batching.window = Duration::from_millis(500);
    let node = Node::start(s).await;
    let p = prompt(3, 6, vocab);
    let pending = {
        let (client, fp) = (node.client.clone(), node.fingerprint.clone());
        let it = item(1, p.len(), &p, &[1, 2]);
        tokio::spawn(async move {
            client
                .clone()
                .verify(pb::VerifyBatchRequest {
                    batch_id: 1,
                    coordinator_id: "test-coordinator".into(),
                    fingerprint: fp,
                    items: vec![it],
                })
                .await
        })
    };
    let mut client = node.client.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
        if info.load.unwrap().queued_tokens > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the request never queued");
        tokio::task::yield_now().await;
    }
    node.stop().await.unwrap();
    let resp = pending.await.unwrap().unwrap().into_inner();
    outcome(&resp.results[0]);
}
