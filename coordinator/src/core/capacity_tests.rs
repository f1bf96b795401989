//! The state machine against full and stuck verify nodes (issue 15 items 4, 5): a node's
//! refusal moves the session to another node once, then reaches the draft node; a node with a
//! batch in flight and no progress is quarantined and the batch's sessions resync elsewhere,
//! its late answer ignored.

use super::*;
use edgespec_proto::domain::{BatchReply, CoordinatorMessage, DraftBlock, DraftMessage, NodeInfo};
use edgespec_proto::pb;
use edgespec_specdec::SamplingParams;

fn core() -> (Core, Instant) {
    let now = Instant::now();
    let mut s = Settings::for_tests();
    s.policy.batch_window = Duration::ZERO;
    (Core::new("c".into(), s, Metrics::new(), now), now)
}

fn info(id: &str, pool: &str) -> NodeInfo {
    super::tests::node_info(id, pool, 2)
}

fn open(sid: u64) -> DraftMessage {
    DraftMessage::Block(DraftBlock {
        block: Block {
            session_id: sid,
            round: 1,
            committed_len: 3,
            history: Some(vec![1, 2, 3]),
            draft_tokens: vec![],
            draft_probs: vec![],
            sampling: SamplingParams::GREEDY,
        },
        max_new_tokens: 10,
        client_send_unix_ns: 0,
        draft_s_per_token: 0.0,
        last_round_trip_ns: 0,
        drafted_ahead: false,
        method: edgespec_proto::domain::DraftMethod::Model,
        model_s_per_token: 0.0,
        model_token_mask: 0,
    })
}

/// The node's answer to every item of `launch`: a verdict, or `refusal` (OVERLOADED); its load
/// says it is full.
fn answer(launch: &Launch, refusal: Option<&str>) -> BatchReply {
    let results = launch
        .request
        .blocks()
        .map(|b| pb::VerifyResult {
            session_id: b.session_id,
            round: b.round,
            result: Some(match refusal {
                Some(m) => pb::verify_result::Result::Error(pb::SessionError {
                    session_id: b.session_id,
                    round: b.round,
                    code: pb::ErrorCode::Overloaded as i32,
                    message: m.into(),
                }),
                None => pb::verify_result::Result::Outcome(pb::VerifyOutcome {
                    accepted: 0,
                    next_token: 1,
                    committed_len: b.committed_len as u32 + 1,
                }),
            }),
            timings: None,
        })
        .collect();
    BatchReply::from(pb::VerifyBatchResponse {
        batch_id: launch.batch_id,
        results,
        load: Some(pb::VerifierLoad {
            active_sessions: 2,
            recent_sessions: 2,
            ..Default::default()
        }),
    })
}

fn only_message(out: &Out) -> &CoordinatorMessage {
    assert_eq!(out.messages.len(), 1, "{:?}", out.messages);
    &out.messages[0].1
}

#[test]
fn a_refusal_moves_the_session_once_then_reaches_the_draft_node() {
    let (mut c, t0) = core();
    c.register(&info("a", "onprem"), t0).unwrap();
    c.register(&info("b", "cloud"), t0).unwrap();
    let (s, _) = c.hello(&super::tests::hello("x"), t0).unwrap();
    let mut out = Out::default();
    c.draft_message(s, open(1), t0, &mut out);
    let first = out.launches.pop().expect("a batch");
    assert_eq!(first.node_id, "a");
    // "a" is full (another coordinator's sessions): the open goes to "b", the draft sees nothing.
    let mut out = Out::default();
    c.batch_done(
        first.batch_id,
        Ok(answer(&first, Some("full"))),
        t0,
        &mut out,
    );
    assert!(out.messages.is_empty(), "{:?}", out.messages);
    let second = out.launches.pop().expect("placed again");
    assert_eq!(second.node_id, "b");
    let mut out = Out::default();
    c.batch_done(second.batch_id, Ok(answer(&second, None)), t0, &mut out);
    assert!(matches!(only_message(&out), CoordinatorMessage::Verdict(v) if v.verifier_id == "b"));

    // A second session: "a" and "b" both report full; "a" is tried (it may be stale), refuses,
    // and with no node left the draft node gets OVERLOADED with the node's reason.
    let mut out = Out::default();
    c.draft_message(s, open(2), t0, &mut out);
    let third = out.launches.pop().expect("tried on a node");
    let mut out = Out::default();
    c.batch_done(
        third.batch_id,
        Ok(answer(&third, Some("node is full"))),
        t0,
        &mut out,
    );
    assert!(out.launches.is_empty());
    match only_message(&out) {
        CoordinatorMessage::Error(e) => {
            assert_eq!(e.code, ErrorCode::Overloaded);
            assert!(e.message.contains("node is full"), "{}", e.message);
        }
        m => panic!("expected OVERLOADED, got {m:?}"),
    }
    assert_eq!(c.session_count(), 1, "the refused session is gone");
}

#[test]
fn a_stalled_node_is_quarantined_and_its_in_flight_sessions_resync_elsewhere() {
    let (mut c, t0) = core();
    let stall = c.settings.registry.stall_timeout;
    c.register(&info("a", "onprem"), t0).unwrap();
    c.register(&info("b", "onprem"), t0).unwrap();
    let (s, _) = c.hello(&super::tests::hello("x"), t0).unwrap();
    let mut out = Out::default();
    c.draft_message(s, open(1), t0, &mut out);
    let stuck = out.launches.pop().expect("a batch");
    assert_eq!(stuck.node_id, "a");
    // "a" keeps heartbeating (its model is stuck, not its process).
    let beat = c.settings.registry.heartbeat_interval;
    let mut t = t0;
    let mut out = Out::default();
    while t <= t0 + stall + beat {
        t += beat;
        c.heartbeat("a", None, false, t);
        c.heartbeat("b", None, false, t);
        c.tick(t, &mut out);
    }
    assert_eq!(
        c.registry.get("a").unwrap().health,
        crate::registry::Health::Quarantined
    );
    let errors: Vec<ErrorCode> = out
        .messages
        .iter()
        .filter_map(|(_, m)| match m {
            CoordinatorMessage::Error(e) => Some(e.code),
            _ => None,
        })
        .collect();
    assert_eq!(errors, vec![ErrorCode::ResyncNeeded]);
    // A late answer from "a" is dropped: no verdict for a round that was given up.
    let mut out = Out::default();
    c.batch_done(stuck.batch_id, Ok(answer(&stuck, None)), t, &mut out);
    assert!(!out
        .messages
        .iter()
        .any(|(_, m)| matches!(m, CoordinatorMessage::Verdict(_))));
    // The resync goes to "b".
    let mut out = Out::default();
    c.draft_message(s, open(1), t, &mut out);
    assert_eq!(out.launches.pop().expect("a batch").node_id, "b");
}

#[test]
fn a_call_that_times_out_on_a_node_that_still_heartbeats_quarantines_it() {
    let (mut c, t0) = core();
    c.register(&info("a", "onprem"), t0).unwrap();
    c.register(&info("b", "onprem"), t0).unwrap();
    let (s, _) = c.hello(&super::tests::hello("x"), t0).unwrap();
    let mut out = Out::default();
    c.draft_message(s, open(1), t0, &mut out);
    let stuck = out.launches.pop().expect("a batch");
    let t1 = t0 + Duration::from_secs(1);
    c.heartbeat("a", None, false, t1);
    let mut out = Out::default();
    c.batch_done(stuck.batch_id, Err("timed out".into()), t1, &mut out);
    let a = c.registry.get("a").unwrap();
    assert_eq!(a.health, crate::registry::Health::Quarantined);
    // Known (no re-registration loop), and no new work.
    assert!(c.heartbeat("a", None, false, t1).known);
    let mut out = Out::default();
    c.draft_message(s, open(1), t1, &mut out);
    assert_eq!(out.launches.pop().expect("a batch").node_id, "b");
}
