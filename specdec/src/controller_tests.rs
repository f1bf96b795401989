use super::*;
use crate::estimate::{AcceptancePrior, LinkConfig};

const POOL: PoolContext = PoolContext {
    queue_s: 0.005,
    verify: VerifyCost {
        base_s: 0.02,
        per_token_s: 0.001,
    },
};

fn caps(max_gamma: usize) -> DraftCaps {
    DraftCaps {
        draft_s_per_token: 0.005,
        pipelined: false,
        max_gamma,
        method: DraftMethod::Model,
    }
}

fn policy(max_gamma: usize) -> GammaPolicy {
    GammaPolicy {
        max_gamma,
        ..GammaPolicy::default()
    }
}

/// Runs `rounds` rounds of `gamma` drafted / `accepted` accepted at `rtt` seconds, with the
/// draft side taking exactly its reported cost per token.
fn run(
    c: &GammaController,
    d: &mut DraftSide,
    s: &mut SessionGamma,
    t: &mut f64,
    rounds: usize,
    (gamma, accepted, rtt): (usize, usize, f64),
) {
    for _ in 0..rounds {
        let server = 0.03;
        *t += rtt + server + gamma as f64 * d.t_draft_s(s.method());
        c.on_block(
            d,
            s,
            BlockArrival {
                now_s: *t,
                method: s.method(),
                gamma,
                q_entries: 0,
                drafted_ahead: false,
                last_round_trip_s: rtt + server,
                last_server_s: server,
            },
        );
        c.on_verdict(s, gamma, gamma, accepted, 0, *t + rtt + server);
    }
}

#[test]
fn plans_from_priors_then_follows_acceptance() {
    let c = GammaController::new(policy(12));
    let mut d = DraftSide::new(LinkConfig::default(), caps(16));
    let mut s = SessionGamma::new(
        AcceptancePrior {
            half_life_s: 2.0,
            ..AcceptancePrior::default()
        },
        DraftMethod::Model,
    );
    let initial = c.plan(&d, &s, POOL, 0);
    assert!(initial > 0);
    let mut t = 0.0;
    run(&c, &mut d, &mut s, &mut t, 50, (8, 8, 0.04));
    let confident = c.plan(&d, &s, POOL, 0);
    assert!(confident > initial, "{initial} → {confident}");
    run(&c, &mut d, &mut s, &mut t, 400, (4, 0, 0.04));
    assert!(s.alpha() < 0.05);
    // Round 450 is not a power of two: no probe.
    assert_eq!(c.plan(&d, &s, POOL, 0), 0);
}

#[test]
fn longer_links_get_longer_blocks() {
    let c = GammaController::new(policy(12));
    let mut near = DraftSide::new(LinkConfig::default(), caps(16));
    let mut far = near;
    let (mut sn, mut sf) = (
        SessionGamma::new(AcceptancePrior::default(), DraftMethod::Model),
        SessionGamma::new(AcceptancePrior::default(), DraftMethod::Model),
    );
    let (mut tn, mut tf) = (0.0, 0.0);
    run(&c, &mut near, &mut sn, &mut tn, 20, (4, 3, 0.001));
    run(&c, &mut far, &mut sf, &mut tf, 20, (4, 3, 0.1));
    assert!(
        (far.link().rtt_s() - 0.1).abs() < 1e-6,
        "{}",
        far.link().rtt_s()
    );
    assert!(c.plan(&far, &sf, POOL, 0) > c.plan(&near, &sn, POOL, 0));
}

#[test]
fn the_node_cap_the_policy_bounds_and_the_budget_all_bound_gamma() {
    let mut s = SessionGamma::new(AcceptancePrior::default(), DraftMethod::Model);
    let mut d = DraftSide::new(LinkConfig::default(), caps(3));
    let c = GammaController::new(policy(12));
    let mut t = 0.0;
    run(&c, &mut d, &mut s, &mut t, 30, (3, 3, 0.2));
    assert_eq!(c.max_gamma(&d), 3);
    assert_eq!(c.plan(&d, &s, POOL, 0), 3, "capped by the draft node");
    assert_eq!(c.start_gamma(&d), 3, "initial γ 4 within the cap");
    assert_eq!(
        c.plan(&d, &s, POOL, 3),
        2,
        "budget 3 leaves room for the bonus token"
    );
    let off = GammaController::new(GammaPolicy {
        speculation_enabled: false,
        ..policy(12)
    });
    assert_eq!(off.plan(&d, &s, POOL, 0), 0);
    assert_eq!(off.start_gamma(&d), 0);
    let floor = GammaController::new(GammaPolicy {
        min_gamma: 2,
        ..policy(12)
    });
    assert_eq!(
        floor.plan(&d, &s, POOL, 2),
        2,
        "the floor wins over the budget"
    );
}

#[test]
fn a_session_at_gamma_zero_is_probed_at_powers_of_two_only_while_drafting_could_pay() {
    let c = GammaController::new(policy(8));
    let mut d = DraftSide::new(LinkConfig::default(), caps(16));
    let mut s = SessionGamma::new(
        AcceptancePrior {
            alpha: 0.01,
            weight: 50.0,
            half_life_s: 1e9,
        },
        DraftMethod::Model,
    );
    let mut t = 0.0;
    run(&c, &mut d, &mut s, &mut t, 15, (0, 0, 0.01));
    assert_eq!(c.plan(&d, &s, POOL, 0), 0, "round 15");
    run(&c, &mut d, &mut s, &mut t, 1, (0, 0, 0.01));
    assert_eq!(c.plan(&d, &s, POOL, 0), PROBE_GAMMA, "round 16 probes");
    run(&c, &mut d, &mut s, &mut t, 1, (0, 0, 0.01));
    assert_eq!(c.plan(&d, &s, POOL, 0), 0, "round 17");
    // Once drafting is measured to cost more than any acceptance could win back, no probes.
    let mut costly = DraftSide::new(LinkConfig::default(), caps(16));
    let mut s2 = SessionGamma::new(AcceptancePrior::default(), DraftMethod::Model);
    let mut t2 = 0.0;
    for i in 0..32 {
        let gamma = if i % 3 == 0 { 0 } else { 3 };
        t2 += 0.02 + gamma as f64 * 0.5;
        c.on_block(
            &mut costly,
            &mut s2,
            BlockArrival {
                now_s: t2,
                method: DraftMethod::Model,
                gamma,
                q_entries: 0,
                drafted_ahead: false,
                last_round_trip_s: 0.02,
                last_server_s: 0.01,
            },
        );
        c.on_verdict(&mut s2, gamma, gamma, 0, 0, t2);
    }
    assert!(costly.calibration(DraftMethod::Model).knows_drafting());
    assert_eq!(s2.rounds(), 32);
    assert_eq!(c.plan(&costly, &s2, POOL, 0), 0, "round 32 is not probed");
}

#[test]
fn catch_up_and_drafted_ahead_blocks_give_no_calibration_sample() {
    let c = GammaController::new(policy(8));
    let mut d = DraftSide::new(LinkConfig::default(), caps(16));
    let mut s = SessionGamma::new(AcceptancePrior::default(), DraftMethod::Model);
    let arrival = |now_s, gamma, drafted_ahead| BlockArrival {
        now_s,
        method: DraftMethod::Model,
        gamma,
        q_entries: 0,
        drafted_ahead,
        last_round_trip_s: 0.05,
        last_server_s: 0.01,
    };
    c.on_block(&mut d, &mut s, arrival(0.0, 0, false));
    // First γ > 0 block after γ = 0: its draft side includes the catch-up forward.
    c.on_block(&mut d, &mut s, arrival(5.0, 4, false));
    assert!(!d.calibration(DraftMethod::Model).knows_drafting());
    // A block drafted ahead measures nothing about drafting either.
    c.on_block(&mut d, &mut s, arrival(5.1, 4, true));
    assert!(!d.calibration(DraftMethod::Model).knows_drafting());
    c.on_block(&mut d, &mut s, arrival(5.3, 4, false));
    assert!(d.calibration(DraftMethod::Model).knows_drafting());
}

#[test]
fn wire_bytes_per_token_follow_the_q_payload() {
    let c = GammaController::new(policy(8));
    let mut d = DraftSide::new(LinkConfig::default(), caps(16));
    let mut s = SessionGamma::new(AcceptancePrior::default(), DraftMethod::Model);
    c.on_block(
        &mut d,
        &mut s,
        BlockArrival {
            now_s: 0.0,
            method: DraftMethod::Model,
            gamma: 4,
            q_entries: 32,
            drafted_ahead: false,
            last_round_trip_s: 0.0,
            last_server_s: 0.0,
        },
    );
    assert_eq!(s.bytes_per_token(), TOKEN_BYTES + Q_ENTRY_BYTES * 8.0);
    assert_eq!(c.inputs(&d, &s, POOL).bytes_per_token, s.bytes_per_token());
}

#[test]
fn bad_draft_cost_reports_are_ignored_and_probes_feed_the_link() {
    let mut d = DraftSide::new(
        LinkConfig::default(),
        DraftCaps {
            draft_s_per_token: f64::NAN,
            pipelined: true,
            max_gamma: 100,
            method: DraftMethod::Model,
        },
    );
    assert_eq!(d.t_draft_s(DraftMethod::Model), DEFAULT_DRAFT_S_PER_TOKEN);
    assert_eq!(d.max_gamma(), MAX_GAMMA);
    d.report_draft_cost(DraftMethod::Model, -1.0);
    assert_eq!(d.reported_draft_s_per_token(DraftMethod::Model), 0.0);
    d.report_draft_cost(DraftMethod::Model, 0.02);
    assert_eq!(d.t_draft_s(DraftMethod::Model), 0.02);
    d.observe_probe(0.25, 1.0);
    assert!((d.link().rtt_s() - 0.25).abs() < 1e-9);
    d.observe_padded_probe(1_000_000, 0.75, 2.0);
    assert!((d.link().bandwidth_bytes_per_s() - 2e6).abs() < 1.0);
}

/// Shared-CPU verify cost (the target forward is slow, each extra token cheap).
const SHARED_CPU: PoolContext = PoolContext {
    queue_s: 0.005,
    verify: VerifyCost {
        base_s: 0.08,
        per_token_s: 0.004,
    },
};

fn side(model_s_per_token: f64, pipelined: bool) -> DraftSide {
    DraftSide::new(
        LinkConfig::default(),
        DraftCaps {
            draft_s_per_token: model_s_per_token,
            pipelined,
            max_gamma: 16,
            method: DraftMethod::Model,
        },
    )
}

fn session(method: DraftMethod) -> SessionGamma {
    SessionGamma::new(AcceptancePrior::default(), method)
}

/// A hybrid session whose lookup found a match for a quarter of the γ granted in `rounds`
/// lookup-only blocks, accepted or rejected.
fn sparse_lookup(c: &GammaController, s: &mut SessionGamma, rounds: u32, accepted: bool) {
    for r in 0..rounds {
        c.on_verdict(s, 4, 1, usize::from(accepted), 0, f64::from(r) * 0.1);
    }
}

#[test]
fn a_slow_draft_model_plans_gamma_zero_where_lookup_with_the_same_acceptance_drafts() {
    let c = GammaController::new(policy(8));
    let d = side(0.1, false);
    let (model, lookup, hybrid) = (
        session(DraftMethod::Model),
        session(DraftMethod::Lookup),
        session(DraftMethod::Hybrid),
    );
    assert_eq!(model.alpha(), lookup.alpha());
    assert_eq!(
        c.plan(&d, &model, SHARED_CPU, 0),
        0,
        "100 ms a drafted token"
    );
    assert!(c.plan(&d, &lookup, SHARED_CPU, 0) > 0, "lookup costs µs");
    assert_eq!(
        c.inputs(&d, &lookup, SHARED_CPU).t_draft_s,
        DEFAULT_LOOKUP_S_PER_TOKEN,
        "before a lookup report: the lookup default, not the model's cost"
    );
    // Hybrid before its own report is priced as the model (no match: the model drafts)...
    assert_eq!(c.inputs(&d, &hybrid, SHARED_CPU).t_draft_s, 0.1);
    // ... and since the model's fallback would not pay, it drafts lookup only, planned as lookup.
    assert_eq!(
        c.plan_next(&d, &hybrid, SHARED_CPU, 0),
        (c.plan(&d, &lookup, SHARED_CPU, 0), DraftMethod::Lookup)
    );
    // Even a fast model is not expected to beat lookup alone while lookup fills every γ...
    let fast = side(0.001, false);
    assert_eq!(
        c.plan_next(&fast, &hybrid, SHARED_CPU, 0).1,
        DraftMethod::Lookup
    );
    // ... but where lookup finds few matches, the model fills the gaps; other methods keep
    // their own.
    let mut sparse = hybrid;
    sparse_lookup(&c, &mut sparse, 8, true);
    let (g, m) = c.plan_next(&fast, &sparse, SHARED_CPU, 0);
    assert!(g > 0 && m == DraftMethod::Hybrid, "{g} {m}");
    assert_eq!(
        c.plan_next(&d, &model, SHARED_CPU, 0),
        (0, DraftMethod::Model)
    );
    assert_eq!(
        c.plan_next(&d, &lookup, SHARED_CPU, 0).1,
        DraftMethod::Lookup
    );
}

/// The model cost that decides the fallback is the node's model report, not hybrid's blended
/// one (lookup tokens make a hybrid block look cheap).
#[test]
fn the_hybrid_fallback_is_priced_with_the_model_cost_report() {
    let c = GammaController::new(policy(8));
    let mut d = side(0.001, false);
    let mut hybrid = session(DraftMethod::Hybrid);
    sparse_lookup(&c, &mut hybrid, 8, true);
    d.report_draft_cost(DraftMethod::Hybrid, 1e-4);
    assert_eq!(
        c.plan_next(&d, &hybrid, SHARED_CPU, 0).1,
        DraftMethod::Hybrid
    );
    d.report_draft_cost(DraftMethod::Model, 0.1);
    assert_eq!(
        c.plan_next(&d, &hybrid, SHARED_CPU, 0).1,
        DraftMethod::Lookup
    );
}

/// Whether a hybrid session's model pays is decided on the acceptance of the tokens its model
/// drafted: lookup's accepted tokens must not vouch for model steps that keep failing.
#[test]
fn the_hybrid_fallback_is_judged_on_its_model_tokens_acceptance() {
    let c = GammaController::new(policy(8));
    let d = side(0.01, false);
    // Blocks [lookup, lookup, model, lookup]: both lookup tokens accepted, the model's rejected.
    let rounds = |mask: u64| {
        let mut s = session(DraftMethod::Hybrid);
        sparse_lookup(&c, &mut s, 4, true);
        for r in 0..12 {
            c.on_verdict(&mut s, 4, 4, 2, mask, f64::from(r) * 0.1);
        }
        s
    };
    let told = rounds(0b0100);
    assert!(
        told.alpha() > 0.6,
        "the block's α stays high: {}",
        told.alpha()
    );
    assert!(told.model_alpha() < 0.3, "{}", told.model_alpha());
    assert_eq!(c.plan_next(&d, &told, SHARED_CPU, 0).1, DraftMethod::Lookup);
    // Without the sources every token counts as lookup's: the model's α stays the prior.
    let blind = rounds(0);
    assert_eq!(blind.model_alpha(), blind.prior.alpha);
    // Once off, the model stays off: no probe at round 16 (its catch-up would cost too much).
    let mut later = told;
    for r in 16..32 {
        c.on_verdict(&mut later, 2, 2, 2, 0, f64::from(r) * 0.1);
    }
    assert_eq!(later.rounds(), 32);
    assert_eq!(
        c.plan_next(&d, &later, SHARED_CPU, 0).1,
        DraftMethod::Lookup
    );
}

/// A model that would just pay for a model session (γ > 0 past the switch-on margin) is not
/// worth a hybrid session's gaps: lookup costs nothing, and the model's catch-up over looked-up
/// tokens is not priced, so it must beat plain decoding by `HYBRID_MODEL_GAIN`.
#[test]
fn a_hybrid_session_leaves_a_marginal_model_off() {
    let c = GammaController::new(policy(8));
    let d = side(0.03, false);
    let (model, hybrid) = (session(DraftMethod::Model), session(DraftMethod::Hybrid));
    assert!(
        c.plan(&d, &model, SHARED_CPU, 0) > 0,
        "a model session drafts"
    );
    assert_eq!(
        c.plan_next(&d, &hybrid, SHARED_CPU, 0).1,
        DraftMethod::Lookup
    );
    let mut sparse = hybrid;
    sparse_lookup(&c, &mut sparse, 8, false);
    assert_eq!(
        c.plan_next(&d, &sparse, SHARED_CPU, 0).1,
        DraftMethod::Lookup,
        "not even where lookup's few proposals fail"
    );
    assert_eq!(
        c.plan_next(&side(0.01, false), &sparse, SHARED_CPU, 0).1,
        DraftMethod::Model,
        "a model well ahead of plain decoding drafts"
    );
}

/// Where lookup's proposals fail and the model's are accepted, a hybrid session drafts with its
/// model alone: looked-up tokens in front of the model's would only cut its runs short.
#[test]
fn a_hybrid_session_whose_lookup_tokens_fail_drafts_with_its_model_alone() {
    let c = GammaController::new(policy(8));
    let d = side(0.001, false);
    let mut s = session(DraftMethod::Hybrid);
    // Blocks [model, model, lookup, lookup]: both model tokens accepted, the first lookup one
    // rejected.
    for r in 0..12 {
        c.on_verdict(&mut s, 4, 4, 2, 0b0011, f64::from(r) * 0.1);
    }
    assert!(s.model_alpha() > 0.85 && s.lookup_alpha() < 0.3, "{s:?}");
    let (g, m) = c.plan_next(&d, &s, SHARED_CPU, 0);
    assert_eq!(m, DraftMethod::Model);
    assert_eq!(
        g,
        c.plan_as(&d, &s, DraftMethod::Model, SHARED_CPU, 0),
        "planned with α_model"
    );
    assert!(g >= 4, "α_model is high: {g}");
    // The same rounds read the other way round (lookup accepted, model rejected): lookup alone.
    let mut other = session(DraftMethod::Hybrid);
    for r in 0..12 {
        c.on_verdict(&mut other, 4, 4, 2, 0b1100, f64::from(r) * 0.1);
    }
    assert_eq!(
        c.plan_next(&side(0.03, false), &other, SHARED_CPU, 0).1,
        DraftMethod::Lookup
    );
    // Both good, lookup at least as good: mixed blocks.
    let mut both = session(DraftMethod::Hybrid);
    sparse_lookup(&c, &mut both, 8, true);
    for r in 0..12 {
        c.on_verdict(&mut both, 4, 4, 4, 0b0101, f64::from(r) * 0.1);
    }
    assert_eq!(c.plan_next(&d, &both, SHARED_CPU, 0).1, DraftMethod::Hybrid);
}

#[test]
fn a_lookup_cost_report_and_lookup_rounds_leave_the_model_cost_and_calibration_alone() {
    let c = GammaController::new(policy(8));
    let mut d = side(0.03, false);
    d.report_draft_cost(DraftMethod::Lookup, 1e-4);
    assert_eq!(d.t_draft_s(DraftMethod::Model), 0.03);
    assert_eq!(d.t_draft_s(DraftMethod::Lookup), 1e-4);
    assert_eq!(d.reported_draft_s_per_token(DraftMethod::Hybrid), 0.0);
    // Lookup rounds whose draft side costs next to nothing calibrate lookup only.
    let mut s = session(DraftMethod::Lookup);
    let mut t = 0.0;
    run(&c, &mut d, &mut s, &mut t, 20, (4, 3, 0.02));
    assert!(d.calibration(DraftMethod::Lookup).knows_drafting());
    assert!(!d.calibration(DraftMethod::Model).knows_drafting());
    assert_eq!(d.calibration(DraftMethod::Model).fixed_s(), 0.0);
    let model = session(DraftMethod::Model);
    assert_eq!(c.inputs(&d, &model, POOL).t_draft_s, 0.03);
}

#[test]
fn only_model_sessions_are_planned_as_pipelined() {
    let d = side(0.01, true);
    for assume in [false, true] {
        let c = GammaController::new(GammaPolicy {
            assume_pipelined: assume,
            ..policy(8)
        });
        assert!(c.inputs(&d, &session(DraftMethod::Model), POOL).pipelined);
        for m in [DraftMethod::Lookup, DraftMethod::Hybrid] {
            assert!(!c.inputs(&d, &session(m), POOL).pipelined, "{m}");
        }
    }
}

#[test]
fn lookup_needs_no_switch_on_margin_and_calibrates_its_first_block_after_gamma_zero() {
    let c = GammaController::new(policy(8));
    let mut d = side(0.01, false);
    // The smallest α at which drafting pays at all for lookup: the gain over γ = 0 is below
    // the model's switch-on margin, yet a lookup session at γ = 0 drafts.
    let mut found = false;
    for i in 1..2000 {
        let s = SessionGamma::new(
            AcceptancePrior {
                alpha: f64::from(i) * 5e-4,
                weight: 1e6,
                half_life_s: 1e9,
            },
            DraftMethod::Lookup,
        );
        let inputs = c.inputs(&d, &s, POOL);
        if plan(&inputs).gamma > 0 {
            assert_eq!(
                plan_from(&inputs, 0, SWITCH_ON_GAIN).gamma,
                0,
                "at the margin"
            );
            assert!(c.plan(&d, &s, POOL, 0) > 0, "α = {}", s.alpha());
            found = true;
            break;
        }
    }
    assert!(found);
    // No catch-up forward: the first γ > 0 lookup block after a γ = 0 one is a sample.
    let mut s = session(DraftMethod::Lookup);
    let arrival = |now_s, gamma| BlockArrival {
        now_s,
        method: DraftMethod::Lookup,
        gamma,
        q_entries: 0,
        drafted_ahead: false,
        last_round_trip_s: 0.05,
        last_server_s: 0.01,
    };
    c.on_block(&mut d, &mut s, arrival(0.0, 0));
    c.on_block(&mut d, &mut s, arrival(0.1, 4));
    assert!(d.calibration(DraftMethod::Lookup).knows_drafting());
}

#[test]
fn a_block_naming_another_method_switches_the_session_and_restarts_its_acceptance() {
    let c = GammaController::new(policy(8));
    let mut d = side(0.01, false);
    let mut s = session(DraftMethod::Model);
    let mut t = 0.0;
    run(&c, &mut d, &mut s, &mut t, 30, (4, 0, 0.02));
    assert!(s.alpha() < 0.3, "{}", s.alpha());
    let lookup = BlockArrival {
        now_s: t + 0.1,
        method: DraftMethod::Lookup,
        gamma: 4,
        q_entries: 0,
        drafted_ahead: false,
        last_round_trip_s: 0.05,
        last_server_s: 0.01,
    };
    c.on_block(&mut d, &mut s, lookup);
    assert_eq!(s.method(), DraftMethod::Lookup);
    assert_eq!(s.alpha(), AcceptancePrior::default().alpha);
    assert!(
        !d.calibration(DraftMethod::Lookup).knows_drafting(),
        "its cycle began under the model: no sample"
    );
}

/// A hybrid session's rounds calibrate the source each block was drafted with (the verdict's
/// `next_method`): model-only blocks teach what the model's rounds cost, and the first of them
/// after lookup-only blocks (the model's catch-up over the whole context) teaches nothing.
#[test]
fn a_hybrid_sessions_rounds_calibrate_the_source_they_were_drafted_with() {
    let c = GammaController::new(policy(8));
    let mut d = side(0.01, false);
    let mut s = session(DraftMethod::Hybrid);
    let mut t = 0.0;
    let block = |d: &mut DraftSide, s: &mut SessionGamma, t: &mut f64| {
        *t += 0.2;
        c.on_block(
            d,
            s,
            BlockArrival {
                now_s: *t,
                method: DraftMethod::Hybrid,
                gamma: 3,
                q_entries: 0,
                drafted_ahead: false,
                last_round_trip_s: 0.1,
                last_server_s: 0.05,
            },
        );
        c.on_verdict(s, 3, 3, 3, 0, *t + 0.1);
    };
    for _ in 0..3 {
        block(&mut d, &mut s, &mut t);
    }
    assert!(d.calibration(DraftMethod::Lookup).knows_drafting());
    assert!(!d.calibration(DraftMethod::Model).knows_drafting());
    s.set_next_source(DraftMethod::Model);
    block(&mut d, &mut s, &mut t);
    assert!(
        !d.calibration(DraftMethod::Model).knows_drafting(),
        "the switch's catch-up is not a sample"
    );
    block(&mut d, &mut s, &mut t);
    assert!(d.calibration(DraftMethod::Model).knows_drafting());
    assert!(!d.calibration(DraftMethod::Hybrid).knows_drafting());
}
