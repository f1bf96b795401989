//! Cross-site batching, verdict routing, admission control.

use crate::support::{self, eventually};
use edgespec_proto::domain::{CoordinatorMessage, DraftBlock, DraftMessage, ErrorCode};
use edgespec_testkit::scripted::{
    greedy_block, reference, target_next, DraftClient, SessionScript, FINGERPRINT, VOCAB,
};
use std::time::Duration;

fn first_block(session_id: u64, prompt: Vec<u32>, drafts: Vec<u32>) -> DraftMessage {
    DraftMessage::Block(DraftBlock {
        max_new_tokens: 100,
        ..greedy_block(session_id, 1, &prompt, true, drafts)
    })
}

#[tokio::test]
async fn one_verify_call_merges_sessions_from_several_draft_nodes() {
    let mut s = support::settings();
    // A long window makes the merge deterministic: every first block arrives within it.
    s.policy.batch_window = Duration::from_millis(500);
    let coord = support::start(s).await;
    let v = support::verifier(&coord, "onprem-1", "onprem").await;
    let a = DraftClient::connect(&coord.url(), "edge-a").await.unwrap();
    let b = DraftClient::connect(&coord.url(), "edge-b").await.unwrap();
    let mut rxs = Vec::new();
    for (client, base) in [(&a, 10u32), (&b, 20u32)] {
        for sid in 1..=3u64 {
            let prompt = vec![base + sid as u32];
            let good = target_next(prompt[0]);
            rxs.push((base, sid, prompt[0], client.subscribe(sid)));
            client
                .send(first_block(
                    sid,
                    prompt,
                    vec![good, (target_next(good) + 1) % VOCAB],
                ))
                .await
                .unwrap();
        }
    }
    for (base, sid, p0, mut rx) in rxs {
        let m = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("verdict arrives")
            .expect("stream open");
        let CoordinatorMessage::Verdict(v) = m else {
            panic!("expected a verdict for {base}/{sid}, got {m:?}");
        };
        // Routed to the right stream and session: session id is the draft's own.
        assert_eq!(v.session_id, sid);
        assert_eq!(v.accepted, 1, "first draft right, second wrong");
        assert_eq!(v.next_token, target_next(target_next(p0)));
        assert_eq!(v.committed_len, 3);
        assert_eq!(v.verifier_id, "onprem-1");
        assert_ne!(
            v.verify,
            Default::default(),
            "the verify node's timings are passed on"
        );
    }
    let batches = v.batches();
    assert_eq!(batches.len(), 1, "{batches:?}");
    assert_eq!(batches[0].session_ids.len(), 6);
    assert_eq!(batches[0].with_history, 6);
    let sessions = support::get_json(&coord.admin("/admin/v1/sessions")).await;
    let nodes: std::collections::BTreeSet<String> = sessions["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["draft_node"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(nodes.len(), 2, "sessions from both draft nodes: {sessions}");
    coord.stop().await;
}

#[tokio::test]
async fn sessions_produce_the_target_sequence_and_get_resync_when_unknown() {
    let coord = support::start(support::settings()).await;
    let _v = support::verifier(&coord, "onprem-1", "onprem").await;
    let d = DraftClient::connect(&coord.url(), "edge").await.unwrap();
    assert_eq!(d.welcome().fleet_fingerprint, FINGERPRINT);
    // A block without history for a session the coordinator never saw.
    let mut rx = d.subscribe(77);
    let DraftMessage::Block(mut blk) = first_block(77, vec![1, 2], vec![]) else {
        unreachable!()
    };
    blk.block.history = None;
    d.send(DraftMessage::Block(blk)).await.unwrap();
    match rx.recv().await.unwrap() {
        CoordinatorMessage::Error(e) => assert_eq!(e.code, ErrorCode::ResyncNeeded),
        m => panic!("expected RESYNC_NEEDED, got {m:?}"),
    }
    let script = SessionScript::new(5, 40);
    let report = d.run_session(script.clone()).await.unwrap();
    assert_eq!(report.tokens, reference(&script.prompt, 40));
    assert!(
        report.rounds < 40,
        "speculation commits several tokens per round"
    );
    assert!(report.coordinator_ns.iter().all(|ns| *ns > 0));
    coord.stop().await;
}

#[tokio::test]
async fn blocks_get_unavailable_before_any_verifier_and_overloaded_beyond_limits() {
    let mut s = support::settings();
    s.admission.max_sessions_total = 2;
    s.policy.batch_window = Duration::from_millis(300);
    let coord = support::start(s).await;
    let d = DraftClient::connect(&coord.url(), "edge").await.unwrap();
    assert_eq!(d.welcome().fleet_fingerprint, "", "no verifier yet");
    let mut rx = d.subscribe(1);
    d.send(first_block(1, vec![3], vec![])).await.unwrap();
    match rx.recv().await.unwrap() {
        CoordinatorMessage::Error(e) => assert_eq!(e.code, ErrorCode::Unavailable),
        m => panic!("expected UNAVAILABLE, got {m:?}"),
    }
    let v = support::verifier(&coord, "onprem-1", "onprem").await;
    let mut rxs: Vec<_> = (1..=3).map(|sid| d.subscribe(sid)).collect();
    for sid in 1..=3 {
        d.send(first_block(sid, vec![sid as u32], vec![]))
            .await
            .unwrap();
    }
    let mut codes = Vec::new();
    for rx in &mut rxs {
        codes.push(match rx.recv().await.unwrap() {
            CoordinatorMessage::Verdict(_) => None,
            CoordinatorMessage::Error(e) => Some(e.code),
            m => panic!("unexpected {m:?}"),
        });
    }
    assert_eq!(codes, vec![None, None, Some(ErrorCode::Overloaded)]);
    eventually("two sessions verified", || async { v.batches().len() == 1 }).await;
    coord.stop().await;
}

#[tokio::test]
async fn queued_token_limit_overloads_a_node() {
    let mut s = support::settings();
    s.admission.max_queued_tokens_per_node = 12;
    s.policy.batch_window = Duration::from_millis(300);
    let coord = support::start(s).await;
    let _v = support::verifier(&coord, "onprem-1", "onprem").await;
    let d = DraftClient::connect(&coord.url(), "edge").await.unwrap();
    let mut rxs: Vec<_> = (1..=3).map(|sid| d.subscribe(sid)).collect();
    // 5 history + 0 drafts + 1 = 6 tokens each: two fit under 12, the third does not.
    for sid in 1..=3u32 {
        d.send(first_block(u64::from(sid), vec![sid; 5], vec![]))
            .await
            .unwrap();
    }
    let mut overloaded = 0;
    for rx in &mut rxs {
        if let CoordinatorMessage::Error(e) = rx.recv().await.unwrap() {
            assert_eq!(e.code, ErrorCode::Overloaded);
            assert!(e.message.contains("queued-token limit"));
            overloaded += 1;
        }
    }
    assert_eq!(overloaded, 1);
    let metrics = support::http()
        .get(coord.admin("/metrics"))
        .send()
        .await
        .unwrap();
    let text = metrics.text().await.unwrap();
    assert!(
        text.contains("edgespec_coordinator_session_errors_total{code=\"overloaded\"} 1"),
        "{text}"
    );
    coord.stop().await;
}
