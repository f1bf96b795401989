//! Drafting methods (issue 17): each session is planned with its own method's draft cost, and
//! the admin views and metrics break acceptance and γ down by method.

use super::tests::{answer_all, block, core, hello, info};
use super::*;
use edgespec_proto::domain::{DraftMessage, Hello};
use edgespec_specdec::{AcceptancePrior, DraftMethod};

/// `msg` (a block) drafted with `method`, whose cost the draft node reports as `s_per_token`.
fn drafted_with(mut msg: DraftMessage, method: DraftMethod, s_per_token: f32) -> DraftMessage {
    if let DraftMessage::Block(b) = &mut msg {
        b.method = method;
        b.draft_s_per_token = s_per_token;
    }
    msg
}

/// Sends every block, verifies them in one batch accepting `accepted` of each, and returns the
/// verdicts' (draft session id, next γ).
fn one_round(
    c: &mut Core,
    stream: StreamId,
    blocks: Vec<DraftMessage>,
    accepted: u32,
    now: Instant,
) -> Vec<(u64, u32)> {
    let mut out = Out::default();
    for b in blocks {
        c.draft_message(stream, b, now, &mut out);
    }
    c.flush(now + Duration::from_millis(2), &mut out);
    let launch = out.launches.last().expect("a batch").clone();
    let mut out = Out::default();
    let done = now + Duration::from_millis(5);
    c.batch_done(
        launch.batch_id,
        Ok(answer_all(&launch, accepted)),
        done,
        &mut out,
    );
    let mut v: Vec<(u64, u32)> = out
        .messages
        .iter()
        .filter_map(|(_, m)| match m {
            CoordinatorMessage::Verdict(v) => Some((v.session_id, v.next_gamma)),
            _ => None,
        })
        .collect();
    v.sort_unstable();
    v
}

/// A draft node whose model is slow (200 ms a token, its default method) also serves a lookup
/// session: with the same acceptance the model session is planned at γ = 0 and the lookup one
/// drafts, the lookup cost report leaves the model's alone, and the views and metrics show
/// each session under its own method.
#[test]
fn a_lookup_session_is_planned_with_lookup_cost_and_shown_under_its_method() {
    let (mut c, t0) = core();
    c.register(&info("a", "onprem"), t0).unwrap();
    let slow_model = Hello {
        draft_s_per_token: 0.2,
        ..hello("edge")
    };
    let (s, _) = c.hello(&slow_model, t0).unwrap();
    let model = drafted_with(
        block(1, 1, Some(vec![1, 2]), 2, vec![3, 4]),
        DraftMethod::Model,
        0.2,
    );
    let lookup = drafted_with(
        block(2, 1, Some(vec![1, 2]), 2, vec![3, 4]),
        DraftMethod::Lookup,
        1e-5,
    );
    let verdicts = one_round(&mut c, s, vec![model, lookup], 1, t0);
    assert_eq!(verdicts.len(), 2);
    assert_eq!(verdicts[0], (1, 0), "the slow model does not pay");
    assert!(
        verdicts[1].1 > 0,
        "lookup costs 10 µs a token: {verdicts:?}"
    );

    let sessions = c.sessions_view();
    let methods: Vec<(u64, &str)> = sessions
        .iter()
        .map(|v| (v.draft_session_id, v.method))
        .collect();
    assert_eq!(methods, vec![(1, "model"), (2, "lookup")]);
    assert_eq!(sessions[0].alpha, sessions[1].alpha, "same acceptance");

    let view = c.nodes_view(t0);
    let d = &view.drafts[0];
    assert_eq!(d.method, "model");
    assert!(
        (d.draft_ms_per_token - 200.0).abs() < 1e-3,
        "{}",
        d.draft_ms_per_token
    );
    let by: Vec<&str> = d.methods.iter().map(|m| m.method).collect();
    assert_eq!(by, vec!["model", "lookup"]);
    let (m, l) = (&d.methods[0], &d.methods[1]);
    assert_eq!((m.sessions, m.rounds, m.mean_gamma), (1, 1, Some(0.0)));
    assert_eq!((l.sessions, l.rounds), (1, 1));
    assert_eq!(
        (l.drafted_tokens, l.accepted_tokens, l.acceptance),
        (2, 1, Some(0.5))
    );
    assert_eq!(l.mean_gamma, Some(f64::from(verdicts[1].1)));
    assert!(
        (l.draft_ms_per_token - 0.01).abs() < 1e-6,
        "{}",
        l.draft_ms_per_token
    );
    assert!((m.planned_draft_ms_per_token - 200.0).abs() < 1e-3);

    c.update_gauges();
    let text = c.metrics.encode();
    for line in [
        "edgespec_coordinator_rounds_total 2".to_string(),
        "edgespec_coordinator_method_rounds_total{method=\"lookup\"} 1".into(),
        "edgespec_coordinator_method_rounds_total{method=\"model\"} 1".into(),
        "edgespec_coordinator_method_accepted_tokens_total{method=\"lookup\"} 1".into(),
        format!(
            "edgespec_coordinator_method_gamma_sum{{method=\"lookup\"}} {:.1}",
            verdicts[1].1
        ),
        "edgespec_coordinator_method_gamma_sum{method=\"model\"} 0.0".into(),
        "edgespec_coordinator_method_acceptance_rate{method=\"lookup\"} 0.5".into(),
    ] {
        assert!(text.contains(&line), "no {line}:\n{text}");
    }
}

/// A session follows the method of its latest block (documented in `on_block`), and a node
/// whose default is lookup plans its sessions with the lookup default before any report.
#[test]
fn a_session_follows_its_latest_blocks_method_and_the_hello_gives_the_node_default() {
    let (mut c, t0) = core();
    c.register(&info("a", "onprem"), t0).unwrap();
    let lookup_node = Hello {
        method: DraftMethod::Lookup,
        ..hello("edge")
    };
    let (s, _) = c.hello(&lookup_node, t0).unwrap();
    let view = c.nodes_view(t0);
    assert_eq!(view.drafts[0].method, "lookup");
    let lookup = &view.drafts[0].methods[0];
    assert_eq!((lookup.method, lookup.rounds), ("lookup", 0));
    assert!((lookup.planned_draft_ms_per_token - 0.02).abs() < 1e-9);

    let first = drafted_with(
        block(1, 1, Some(vec![1, 2]), 2, vec![3, 4]),
        DraftMethod::Model,
        0.2,
    );
    assert_eq!(one_round(&mut c, s, vec![first], 1, t0), vec![(1, 0)]);
    assert_eq!(c.sessions_view()[0].method, "model");
    let t1 = t0 + Duration::from_millis(50);
    let second = drafted_with(block(1, 2, None, 4, vec![5]), DraftMethod::Lookup, 0.0);
    let verdicts = one_round(&mut c, s, vec![second], 1, t1);
    assert!(verdicts[0].1 > 0, "planned as lookup now: {verdicts:?}");
    assert_eq!(c.sessions_view()[0].method, "lookup");
    let view = c.nodes_view(t1);
    let rounds: Vec<(&str, u64, usize)> = view.drafts[0]
        .methods
        .iter()
        .map(|m| (m.method, m.rounds, m.sessions))
        .collect();
    assert_eq!(rounds, vec![("model", 1, 0), ("lookup", 1, 1)]);
}

/// A hybrid session's verdict says how its next block is drafted: `LOOKUP` while the model the
/// block reports (`model_s_per_token`) would not pay on its own, `HYBRID` once it would and
/// lookup fills little of the γ; a model session's verdict leaves the field unset.
#[test]
fn a_hybrid_sessions_verdict_names_lookup_while_its_model_does_not_pay() {
    let (mut c, t0) = core();
    c.register(&info("a", "onprem"), t0).unwrap();
    let (s, _) = c.hello(&hello("edge"), t0).unwrap();
    let with_model_cost = |mut msg: DraftMessage, cost: f32| {
        if let DraftMessage::Block(b) = &mut msg {
            b.model_s_per_token = cost;
        }
        msg
    };
    let next_methods = |c: &mut Core, blocks: Vec<DraftMessage>, now: Instant| {
        let mut out = Out::default();
        for b in blocks {
            c.draft_message(s, b, now, &mut out);
        }
        c.flush(now + Duration::from_millis(2), &mut out);
        let launch = out.launches.last().expect("a batch").clone();
        let mut out = Out::default();
        c.batch_done(
            launch.batch_id,
            Ok(answer_all(&launch, 1)),
            now + Duration::from_millis(5),
            &mut out,
        );
        let mut v: Vec<(u64, Option<DraftMethod>, u32)> = out
            .messages
            .iter()
            .filter_map(|(_, m)| match m {
                CoordinatorMessage::Verdict(v) => Some((v.session_id, v.next_method, v.next_gamma)),
                _ => None,
            })
            .collect();
        v.sort_unstable_by_key(|x| x.0);
        v
    };
    let hybrid = with_model_cost(
        drafted_with(
            block(1, 1, Some(vec![1, 2]), 2, vec![3, 4]),
            DraftMethod::Hybrid,
            0.05,
        ),
        0.2,
    );
    let model = drafted_with(
        block(2, 1, Some(vec![1, 2]), 2, vec![3, 4]),
        DraftMethod::Model,
        0.2,
    );
    let v = next_methods(&mut c, vec![hybrid, model], t0);
    assert_eq!(v[0].1, Some(DraftMethod::Lookup), "200 ms model: {v:?}");
    assert!(v[0].2 > 0, "planned as lookup: {v:?}");
    assert_eq!(v[1].1, None, "a model session: {v:?}");
    // A fast model (1 ms a token) pays, and once lookup has shown that it fills little of the
    // γ granted (one token of several; accepted), the model fills the gaps.
    let mut v = Vec::new();
    for round in 2..=9u64 {
        let now = t0 + Duration::from_millis(50 * round);
        // Committed length 4 before round 2, one more after each round.
        let len = round as usize + 2;
        let hybrid = with_model_cost(
            drafted_with(
                block(1, round, None, len, vec![5]),
                DraftMethod::Hybrid,
                1e-3,
            ),
            1e-3,
        );
        v = next_methods(&mut c, vec![hybrid], now);
    }
    assert_eq!(v[0].1, Some(DraftMethod::Hybrid), "{v:?}");
}

/// A hybrid block's `model_token_mask` reaches the session's controller state: tokens drafted by
/// the model and rejected lower the model's own α (shown as `model_alpha`), while the block's α
/// stays high on lookup's accepted tokens; a block without the mask leaves the model's α alone.
#[test]
fn a_hybrid_blocks_model_tokens_are_judged_apart_from_lookups() {
    let (mut c, t0) = core();
    c.register(&info("a", "onprem"), t0).unwrap();
    let (s, _) = c.hello(&hello("edge"), t0).unwrap();
    let hybrid = |sid: u64, round: u64, len: usize, mask: u64| {
        let history = (round == 1).then(|| vec![1; len]);
        let mut msg = drafted_with(
            block(sid, round, history, len, vec![3, 4, 5]),
            DraftMethod::Hybrid,
            1e-3,
        );
        if let DraftMessage::Block(b) = &mut msg {
            b.model_token_mask = mask;
        }
        msg
    };
    let mut len = [2usize, 2];
    for round in 1..=12u64 {
        let now = t0 + Duration::from_millis(50 * round);
        // Session 1 says its middle token is the model's; session 2 sends no mask.
        let blocks = vec![hybrid(1, round, len[0], 0b010), hybrid(2, round, len[1], 0)];
        // The first (lookup) token is accepted, the second rejected.
        one_round(&mut c, s, blocks, 1, now);
        len = len.map(|l| l + 2);
    }
    let view = c.sessions_view();
    let (told, blind) = (&view[0], &view[1]);
    assert_eq!((told.method, told.rounds), ("hybrid", 12));
    let prior = AcceptancePrior::default().alpha;
    assert!(told.model_alpha.unwrap() < 0.3, "{told:?}");
    assert_eq!(blind.model_alpha, Some(prior), "{blind:?}");
    assert!(told.alpha > told.model_alpha.unwrap() + 0.15, "{told:?}");
}
