//! Memory bounds against a draft peer: oversized blocks are refused before any work, and draft
//! streams that stop reading cannot make the coordinator buffer for them without bound.

use crate::support;
use edgespec_proto::domain::{CoordinatorMessage, DraftBlock, DraftMessage, ErrorCode};
use edgespec_proto::pb;
use edgespec_proto::pb::coordinator_client::CoordinatorClient;
use edgespec_specdec::{SamplingParams, SparseDist};
use edgespec_testkit::scripted::{greedy_block, target_next, DraftClient, FINGERPRINT};
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;

/// A well-formed block of a new session `sid` on `d` gets a verdict.
async fn assert_serves(d: &DraftClient, sid: u64) {
    let mut rx = d.subscribe(sid);
    let block = greedy_block(sid, 1, &[7], true, vec![target_next(7)]);
    d.send(DraftMessage::Block(block)).await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an answer arrives")
        .expect("stream open");
    assert!(matches!(m, CoordinatorMessage::Verdict(_)), "{m:?}");
}

async fn refusal(d: &DraftClient, sid: u64, block: DraftBlock) -> (ErrorCode, String) {
    let mut rx = d.subscribe(sid);
    d.send(DraftMessage::Block(block)).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an answer arrives")
        .expect("stream open")
    {
        CoordinatorMessage::Error(e) => (e.code, e.message),
        m => panic!("expected a refusal, got {m:?}"),
    }
}

#[tokio::test]
async fn huge_q_payloads_and_gamma_above_the_policy_are_invalid_arguments() {
    let mut s = support::settings();
    s.policy.gamma_max = 4;
    s.policy.initial_gamma = 4;
    let coord = support::start(s).await;
    let _v = support::verifier(&coord, "onprem-1", "onprem").await;
    let d = DraftClient::connect(&coord.url(), "edge-a").await.unwrap();

    // One draft token whose q carries 10^6 entries (about 5 MB on the wire).
    let prompt = vec![3u32];
    let t = target_next(3);
    let mut huge = greedy_block(1, 1, &prompt, true, vec![t]);
    huge.block.sampling = SamplingParams {
        temperature: 1.0,
        ..SamplingParams::GREEDY
    };
    let n = 1_000_000usize;
    huge.block.draft_probs = vec![SparseDist {
        ids: (0..n as u32).collect(),
        probs: vec![1.0 / n as f32; n],
    }];
    let (code, msg) = refusal(&d, 1, huge).await;
    assert_eq!(code, ErrorCode::InvalidArgument, "{msg}");
    assert!(msg.contains("at most 256"), "{msg}");

    // γ = 10 where the policy allows 4.
    let mut drafts = vec![target_next(5)];
    while drafts.len() < 10 {
        drafts.push(target_next(*drafts.last().unwrap()));
    }
    let (code, msg) = refusal(&d, 2, greedy_block(2, 1, &[5], true, drafts)).await;
    assert_eq!(code, ErrorCode::InvalidArgument, "{msg}");
    assert!(msg.contains("at most 4"), "{msg}");

    // Beyond the protocol's ceiling the block is malformed whatever the policy.
    let (code, msg) = refusal(&d, 3, greedy_block(3, 1, &[5], true, vec![1; 65])).await;
    assert_eq!(code, ErrorCode::InvalidArgument, "{msg}");

    // The stream still works for a well-formed block.
    assert_serves(&d, 4).await;
    coord.stop().await;
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_draft_streams_that_never_read_leave_memory_bounded() {
    let mut s = support::settings();
    // Probe often, every probe padded: a coordinator that kept queueing probes for peers that
    // do not read would hold 1000 × 50 × 32 KiB ≈ 1.6 GB after one second.
    s.link.probe_interval = Duration::from_millis(20);
    s.link.padded_probe_every = 1;
    s.link.probe_padding_bytes = 32 * 1024;
    let coord = support::start(s).await;
    let _v = support::verifier(&coord, "onprem-1", "onprem").await;
    let before = rss_bytes();
    let mut held = Vec::new();
    for c in 0..10 {
        let channel = tonic::transport::Endpoint::from_shared(coord.url())
            .unwrap()
            .connect()
            .await
            .expect("connect");
        for i in 0..100 {
            let mut client = CoordinatorClient::new(channel.clone());
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let hello = pb::DraftHello {
                node_id: format!("stalled-{c}-{i}"),
                model_name: "m".into(),
                fingerprint: FINGERPRINT.into(),
                vocab_size: 64,
                draft_s_per_token: 0.001,
                pipelined: false,
                max_gamma: 0,
                method: 0,
            };
            tx.send(pb::DraftMessage {
                kind: Some(pb::draft_message::Kind::Hello(hello)),
            })
            .await
            .unwrap();
            // Never read: keep the response stream and the request sender alive.
            let inbound = client
                .drafts(ReceiverStream::new(rx))
                .await
                .expect("stream opens")
                .into_inner();
            held.push((tx, inbound));
        }
    }
    // Fifty probe intervals with every peer silent.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let grown = rss_bytes().saturating_sub(before);
    assert!(
        grown < 512 << 20,
        "the coordinator's memory grew by {} MiB for 1000 silent streams",
        grown >> 20
    );
    // It still serves a stream that reads.
    let d = DraftClient::connect(&coord.url(), "edge-ok").await.unwrap();
    assert_serves(&d, 1).await;
    drop(held);
    coord.stop().await;
}
