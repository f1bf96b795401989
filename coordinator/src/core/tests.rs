//! Direct tests of the state machine: no sockets, no tasks, explicit time.

use super::*;
use crate::registry::NodeAction;
use edgespec_proto::domain::{
    BatchReply, CoordinatorMessage, DraftBlock, DraftMessage, Hello, Load, NodeInfo,
};
use edgespec_proto::pb;
use edgespec_specdec::SamplingParams;

pub(super) fn core() -> (Core, Instant) {
    let now = Instant::now();
    let mut s = Settings::for_tests();
    s.policy.batch_window = Duration::from_millis(2);
    (Core::new("c".into(), s, Metrics::new(), now), now)
}

pub(super) fn info(id: &str, pool: &str) -> NodeInfo {
    node_info(id, pool, 8)
}

/// A verify node `id` of `pool` holding `capacity` sessions, fingerprint "fp".
pub(super) fn node_info(id: &str, pool: &str, capacity: u32) -> NodeInfo {
    NodeInfo::try_from(pb::NodeInfo {
        node_id: id.into(),
        advertise_addr: format!("http://{id}:1"),
        pool: pool.into(),
        fingerprint: "fp".into(),
        capacity_sessions: capacity,
        ..Default::default()
    })
    .unwrap()
}

/// A draft node's hello with fingerprint "fp".
pub(super) fn hello(node: &str) -> Hello {
    Hello::try_from(pb::DraftHello {
        node_id: node.into(),
        fingerprint: "fp".into(),
        ..Default::default()
    })
    .unwrap()
}

pub(super) fn block(
    sid: u64,
    round: u64,
    history: Option<Vec<u32>>,
    len: usize,
    drafts: Vec<u32>,
) -> DraftMessage {
    DraftMessage::Block(DraftBlock {
        block: Block {
            session_id: sid,
            round,
            committed_len: len,
            history,
            draft_tokens: drafts,
            draft_probs: vec![],
            sampling: SamplingParams::GREEDY,
        },
        max_new_tokens: 0,
        client_send_unix_ns: 0,
        draft_s_per_token: 0.0,
        last_round_trip_ns: 0,
        drafted_ahead: false,
        method: edgespec_proto::domain::DraftMethod::Model,
        model_s_per_token: 0.0,
        model_token_mask: 0,
    })
}

fn errors(out: &Out) -> Vec<(StreamId, ErrorCode)> {
    out.messages
        .iter()
        .filter_map(|(s, m)| match m {
            CoordinatorMessage::Error(e) => Some((*s, e.code)),
            _ => None,
        })
        .collect()
}

pub(super) fn answer_all(launch: &Launch, accepted: u32) -> BatchReply {
    BatchReply::from(answer_all_pb(launch, accepted))
}

fn answer_all_pb(launch: &Launch, accepted: u32) -> pb::VerifyBatchResponse {
    pb::VerifyBatchResponse {
        batch_id: launch.batch_id,
        results: launch
            .request
            .blocks()
            .map(|i| pb::VerifyResult {
                session_id: i.session_id,
                round: i.round,
                result: Some(pb::verify_result::Result::Outcome(pb::VerifyOutcome {
                    accepted,
                    next_token: 1,
                    committed_len: i.committed_len as u32 + accepted + 1,
                })),
                timings: Some(pb::VerifyTimings {
                    forward_ns: 1_000_000,
                    total_ns: 1_200_000,
                    batch_tokens: 10,
                    batch_sessions: 2,
                    queue_ns: 0,
                }),
            })
            .collect(),
        load: None,
    }
}

#[test]
fn blocks_from_two_streams_share_one_batch_and_verdicts_route_back() {
    let (mut c, t0) = core();
    c.register(&info("a", "onprem"), t0).unwrap();
    let (s1, w) = c.hello(&hello("x"), t0).unwrap();
    assert_eq!(w.fleet_fingerprint, "fp");
    let (s2, _) = c.hello(&hello("y"), t0).unwrap();
    let mut out = Out::default();
    c.draft_message(
        s1,
        block(7, 1, Some(vec![1, 2]), 2, vec![3, 4]),
        t0,
        &mut out,
    );
    c.draft_message(s2, block(7, 1, Some(vec![5]), 1, vec![6]), t0, &mut out);
    assert!(out.launches.is_empty(), "window not over");
    assert_eq!(c.next_deadline(), Some(t0 + Duration::from_millis(2)));
    c.flush(t0 + Duration::from_millis(2), &mut out);
    assert_eq!(out.launches.len(), 1);
    let launch = out.launches[0].clone();
    assert_eq!(launch.request.items.len(), 2);
    let ids: Vec<u64> = launch.request.blocks().map(|i| i.session_id).collect();
    assert_ne!(
        ids[0], ids[1],
        "coordinator ids are global, not the draft's"
    );
    let mut out = Out::default();
    c.batch_done(
        launch.batch_id,
        Ok(answer_all(&launch, 1)),
        t0 + Duration::from_millis(5),
        &mut out,
    );
    let verdicts: Vec<(StreamId, u64, u32)> = out
        .messages
        .iter()
        .filter_map(|(s, m)| match m {
            CoordinatorMessage::Verdict(v) => Some((*s, v.session_id, v.accepted as u32)),
            _ => None,
        })
        .collect();
    assert_eq!(verdicts, vec![(s1, 7, 1), (s2, 7, 1)]);
    assert_eq!(c.sessions_view().iter().map(|s| s.rounds).sum::<u64>(), 2);
}

#[test]
fn unknown_sessions_without_history_must_resync_and_busy_sessions_are_refused() {
    let (mut c, t0) = core();
    c.register(&info("a", "onprem"), t0).unwrap();
    let (s, _) = c.hello(&hello("x"), t0).unwrap();
    let mut out = Out::default();
    c.draft_message(s, block(1, 1, None, 2, vec![]), t0, &mut out);
    assert_eq!(errors(&out), vec![(s, ErrorCode::ResyncNeeded)]);
    let mut out = Out::default();
    c.draft_message(s, block(1, 1, Some(vec![1, 2]), 2, vec![]), t0, &mut out);
    c.draft_message(s, block(1, 2, None, 3, vec![]), t0, &mut out);
    assert_eq!(errors(&out), vec![(s, ErrorCode::InvalidArgument)]);
}

#[test]
fn a_failed_verify_call_marks_the_node_down_and_resyncs_elsewhere() {
    let (mut c, t0) = core();
    c.register(&info("a", "onprem"), t0).unwrap();
    let (s, _) = c.hello(&hello("x"), t0).unwrap();
    let mut out = Out::default();
    c.draft_message(s, block(1, 1, Some(vec![1]), 1, vec![2]), t0, &mut out);
    c.flush(t0 + Duration::from_millis(2), &mut out);
    let launch = out.launches[0].clone();
    c.register(&info("b", "onprem"), t0).unwrap();
    let mut out = Out::default();
    c.batch_done(launch.batch_id, Err("timed out".into()), t0, &mut out);
    assert_eq!(errors(&out), vec![(s, ErrorCode::ResyncNeeded)]);
    assert_eq!(c.verifiers_up(), 1);
    let mut out = Out::default();
    c.draft_message(s, block(1, 1, Some(vec![1]), 1, vec![2]), t0, &mut out);
    c.flush(t0 + Duration::from_millis(2), &mut out);
    assert_eq!(out.launches[0].node_id, "b");
}

#[test]
fn missed_heartbeats_answer_queued_blocks_with_resync() {
    let (mut c, t0) = core();
    c.register(&info("a", "onprem"), t0).unwrap();
    let (s, _) = c.hello(&hello("x"), t0).unwrap();
    let mut out = Out::default();
    c.draft_message(s, block(1, 1, Some(vec![1]), 1, vec![]), t0, &mut out);
    let mut out = Out::default();
    c.tick(t0 + Duration::from_secs(60), &mut out);
    assert_eq!(errors(&out), vec![(s, ErrorCode::ResyncNeeded)]);
    assert_eq!(c.verifiers_up(), 0);
    assert!(
        !c.heartbeat("a", None, false, t0).known,
        "down nodes re-register"
    );
}

#[test]
fn speculation_off_forces_gamma_zero_and_load_shortens_gamma() {
    let (mut c, t0) = core();
    c.register(&info("a", "onprem"), t0).unwrap();
    let (s, _) = c.hello(&hello("x"), t0).unwrap();
    let run_round = |c: &mut Core, round: u64, history: Option<Vec<u32>>, len: u32| {
        let mut out = Out::default();
        c.draft_message(
            s,
            block(1, round, history, len as usize, vec![9, 9, 9]),
            t0,
            &mut out,
        );
        c.flush(t0 + Duration::from_secs(round), &mut out);
        let launch = out.launches.pop().expect("a batch");
        // A CPU-like verify cost: 20 ms a forward plus 6 ms a token (4 tokens a block).
        let mut pbr = answer_all_pb(&launch, 3);
        for r in &mut pbr.results {
            r.timings = Some(pb::VerifyTimings {
                forward_ns: 44_000_000,
                total_ns: 45_000_000,
                batch_tokens: 4,
                batch_sessions: 1,
                queue_ns: 0,
            });
        }
        let mut resp = BatchReply::from(pbr);
        resp.load = Some(Load {
            // Busy with other sessions too (a session's own load does not price its γ).
            busy_fraction: if round > 3 { 0.98 } else { 0.0 },
            active_sessions: 8,
            ..Default::default()
        });
        let mut out = Out::default();
        c.batch_done(
            launch.batch_id,
            Ok(resp),
            t0 + Duration::from_secs(round),
            &mut out,
        );
        match &out.messages[0].1 {
            CoordinatorMessage::Verdict(v) => v.next_gamma,
            k => panic!("{k:?}"),
        }
    };
    let idle = run_round(&mut c, 1, Some(vec![1]), 1);
    assert!(idle > 0);
    run_round(&mut c, 2, None, 5);
    run_round(&mut c, 3, None, 9);
    let loaded = run_round(&mut c, 4, None, 13);
    assert!(loaded <= idle, "a busy pool shortens γ: {loaded} vs {idle}");
    let mut p = c.policy().clone();
    p.speculation_enabled = false;
    c.set_policy(p);
    assert_eq!(run_round(&mut c, 5, None, 17), 0);
}

#[test]
fn drain_moves_a_session_at_its_next_block_and_releases_it() {
    let (mut c, t0) = core();
    c.register(&info("a", "onprem"), t0).unwrap();
    let (s, _) = c.hello(&hello("x"), t0).unwrap();
    let mut out = Out::default();
    c.draft_message(s, block(1, 1, Some(vec![1]), 1, vec![]), t0, &mut out);
    c.flush(t0 + Duration::from_millis(2), &mut out);
    let launch = out.launches[0].clone();
    c.batch_done(launch.batch_id, Ok(answer_all(&launch, 0)), t0, &mut out);
    c.register(&info("b", "onprem"), t0).unwrap();
    c.node_action("a", NodeAction::Drain).unwrap();
    let mut out = Out::default();
    c.draft_message(s, block(1, 2, None, 2, vec![]), t0, &mut out);
    assert_eq!(errors(&out), vec![(s, ErrorCode::ResyncNeeded)]);
    assert_eq!(out.releases.len(), 1);
    assert_eq!(out.releases[0].node_id, "a");
    assert_eq!(c.sessions_view()[0].verifier.as_deref(), Some("b"));
}

#[test]
fn a_stopping_node_drains_itself_and_comes_back_active_when_restarted() {
    use crate::registry::AdminState;
    let (mut c, t0) = core();
    c.register(&info("a", "onprem"), t0).unwrap();
    c.register(&info("b", "onprem"), t0).unwrap();
    let admin = |c: &Core, id: &str| {
        c.nodes_view(t0)
            .verifiers
            .iter()
            .find(|v| v.id == id)
            .unwrap()
            .admin
    };
    assert!(c.heartbeat("a", None, true, t0).known);
    assert_eq!(admin(&c, "a"), AdminState::Draining);
    // The restarted process registers again: active.
    c.register(&info("a", "onprem"), t0).unwrap();
    assert_eq!(admin(&c, "a"), AdminState::Active);
    // An operator's cordon is not turned into a self-drain, and survives a restart.
    c.node_action("b", NodeAction::Cordon).unwrap();
    c.heartbeat("b", None, true, t0);
    assert_eq!(admin(&c, "b"), AdminState::Cordoned);
    c.register(&info("b", "onprem"), t0).unwrap();
    assert_eq!(admin(&c, "b"), AdminState::Cordoned);
}

#[test]
fn closing_a_stream_releases_its_sessions() {
    let (mut c, t0) = core();
    c.register(&info("a", "onprem"), t0).unwrap();
    let (s, _) = c.hello(&hello("x"), t0).unwrap();
    let mut out = Out::default();
    c.draft_message(s, block(1, 1, Some(vec![1]), 1, vec![]), t0, &mut out);
    let mut out = Out::default();
    c.disconnect(s, &mut out);
    assert_eq!(c.session_count(), 0);
    assert_eq!(out.releases.len(), 1);
    assert_eq!(c.next_deadline(), None, "its queued block is gone too");
}

/// Runs one draft stream for `rounds` rounds at 20 ms RTT where every verdict accepts the whole
/// block, the draft node reports 5 ms per draft token, but each drafted token really takes
/// `real_s_per_token` on the draft side; returns the γ the coordinator asks for at the end.
fn gamma_after_rounds(real_s_per_token: f64, rounds: u64) -> u32 {
    gamma_after_rounds_of(hello("x"), real_s_per_token, rounds)
}

/// [`gamma_after_rounds`] for a draft node that says `hello`.
fn gamma_after_rounds_of(hello: Hello, real_s_per_token: f64, rounds: u64) -> u32 {
    let (mut c, t0) = core();
    c.register(&info("a", "onprem"), t0).unwrap();
    let (s, _) = c.hello(&hello, t0).unwrap();
    let half_rtt = Duration::from_millis(10);
    let (mut now, mut gamma, mut len, mut last_rt_ns) = (t0 + half_rtt, 4u32, 3usize, 0u64);
    for round in 1..=rounds {
        let history = (round == 1).then(|| vec![1; len]);
        let mut msg = block(1, round, history, len, vec![9; gamma as usize]);
        if let DraftMessage::Block(b) = &mut msg {
            b.draft_s_per_token = 0.005;
            b.last_round_trip_ns = last_rt_ns;
        }
        let sent = now - half_rtt;
        let mut out = Out::default();
        c.draft_message(s, msg, now, &mut out);
        now += Duration::from_millis(2);
        c.flush(now, &mut out);
        let launch = out.launches.last().expect("a batch was launched").clone();
        now += Duration::from_millis(5);
        let mut out = Out::default();
        c.batch_done(
            launch.batch_id,
            Ok(answer_all(&launch, gamma)),
            now,
            &mut out,
        );
        let next = out
            .messages
            .iter()
            .find_map(|(_, m)| match m {
                CoordinatorMessage::Verdict(v) => Some(v.next_gamma),
                _ => None,
            })
            .expect("a verdict");
        len += gamma as usize + 1;
        let received = now + half_rtt;
        last_rt_ns = (received - sent).as_nanos() as u64;
        gamma = next;
        let draft_side = 0.002 + f64::from(gamma) * real_s_per_token;
        now = received + Duration::from_secs_f64(draft_side) + half_rtt;
    }
    gamma
}

#[test]
fn the_round_calibration_turns_speculation_off_when_drafting_really_costs_more_than_it_saves() {
    // Reported 5 ms per draft token but really 300 ms (a draft node starved of CPU): even with
    // every token accepted, γ = 0 commits tokens faster, and the calibrated controller finds it.
    assert_eq!(gamma_after_rounds(0.3, 40), 0);
    // Drafting as cheap as reported: the same full acceptance keeps γ up.
    assert!(gamma_after_rounds(0.005, 40) > 0);
}

/// A draft node that drafts ahead says so in its hello; the coordinator shows it and plans that
/// node's γ with the pipelined round time, which never asks for less than the serial one.
#[test]
fn a_pipelining_draft_node_is_planned_as_pipelined() {
    let (mut c, t0) = core();
    c.register(&info("a", "onprem"), t0).unwrap();
    let piped = Hello {
        pipelined: true,
        ..hello("p")
    };
    c.hello(&piped, t0).unwrap();
    c.hello(&hello("s"), t0).unwrap();
    let view = c.nodes_view(t0);
    let flag = |id: &str| {
        view.drafts
            .iter()
            .find(|d| d.node_id == id)
            .unwrap()
            .pipelined
    };
    assert!(flag("p"));
    assert!(!flag("s"));
    // 30 ms per drafted token against a 20 ms RTT round: serially drafting costs more than it
    // saves (γ = 0); drafting ahead hides it behind the round, so the same node speculates.
    assert_eq!(gamma_after_rounds_of(hello("s"), 0.03, 40), 0);
    assert!(gamma_after_rounds_of(piped, 0.03, 40) > 0);
}
