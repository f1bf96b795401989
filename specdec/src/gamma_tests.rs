//! Tests of the γ objective and its optimum.

use proptest::prelude::*;

use super::*;

/// An edge site over a WAN: small draft model on a CPU, target on a cloud GPU.
fn wan() -> GammaInputs {
    GammaInputs {
        alpha: 0.8,
        t_draft_s: 0.005,
        rtt_s: 0.04,
        bandwidth_bytes_per_s: 1.25e6,
        bytes_per_token: 64.0,
        queue_s: 0.005,
        verify: VerifyCost {
            base_s: 0.02,
            per_token_s: 0.001,
        },
        min_gamma: 0,
        max_gamma: 16,
        pipelined: false,
    }
}

fn gamma_at(inputs: GammaInputs) -> usize {
    plan(&inputs).gamma
}

#[test]
fn expected_tokens_closed_form_and_limits() {
    assert_eq!(expected_tokens(0.0, 5), 1.0);
    assert_eq!(expected_tokens(1.0, 5), 6.0);
    assert_eq!(expected_tokens(0.7, 0), 1.0);
    assert!((expected_tokens(0.5, 2) - 1.75).abs() < 1e-12);
    // Continuous into α = 1 and robust to junk.
    assert!((expected_tokens(1.0 - 1e-13, 7) - 8.0).abs() < 1e-9);
    assert!((expected_tokens(1.0 - 1e-9, 7) - 8.0).abs() < 1e-6);
    assert_eq!(expected_tokens(f64::NAN, 3), 1.0);
    assert_eq!(expected_tokens(2.0, 3), 4.0);
    for &alpha in &[0.01, 0.3, 0.6, 0.9, 0.99, 0.999_999] {
        for gamma in 0..20 {
            let sum: f64 = (0..=gamma).map(|i| f64::powi(alpha, i as i32)).sum();
            assert!((expected_tokens(alpha, gamma) - sum).abs() < 1e-9 * sum);
        }
    }
}

#[test]
fn gamma_zero_is_plain_target_decoding() {
    let i = wan();
    // One token per RTT + queue + a one-token forward; no drafting, no payload.
    let t0 = 0.04 + 0.005 + 0.02 + 0.001;
    assert!((round_time_s(&i, 0) - t0).abs() < 1e-12);
    assert!((tokens_per_s(&i, 0) - 1.0 / t0).abs() < 1e-9);
    let pipelined = GammaInputs {
        pipelined: true,
        ..i
    };
    assert!((round_time_s(&pipelined, 0) - t0).abs() < 1e-12);
}

#[test]
fn serial_round_time_adds_every_term() {
    let i = wan();
    let expected = 4.0 * 0.005 + 0.04 + 4.0 * 64.0 / 1.25e6 + 0.005 + 0.02 + 0.001 * 5.0;
    assert!((round_time_s(&i, 4) - expected).abs() < 1e-12);
}

#[test]
fn plan_is_the_argmax_of_the_rate() {
    let i = wan();
    let p = plan(&i);
    for gamma in 0..=16 {
        assert!(tokens_per_s(&i, gamma) <= p.tokens_per_s_expected);
    }
    assert_eq!(p.tokens_per_s_expected, tokens_per_s(&i, p.gamma));
    // Hand-checked: the WAN scenario wants a long block (≈ 6).
    assert!((5..=7).contains(&p.gamma), "{p:?}");
}

#[test]
fn gamma_falls_as_rtt_falls() {
    let rtts = [0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.001, 0.0];
    let gammas: Vec<usize> = rtts
        .iter()
        .map(|&rtt_s| gamma_at(GammaInputs { rtt_s, ..wan() }))
        .collect();
    assert!(gammas.windows(2).all(|w| w[0] >= w[1]), "{gammas:?}");
    assert!(gammas[0] > gammas[gammas.len() - 1], "{gammas:?}");
}

#[test]
fn gamma_rises_with_alpha() {
    let alphas = [0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95];
    let gammas: Vec<usize> = alphas
        .iter()
        .map(|&alpha| gamma_at(GammaInputs { alpha, ..wan() }))
        .collect();
    assert!(gammas.windows(2).all(|w| w[0] <= w[1]), "{gammas:?}");
    assert!(gammas[0] < gammas[gammas.len() - 1], "{gammas:?}");
    // Perfect acceptance with cheap drafting wants the longest block allowed.
    assert_eq!(
        gamma_at(GammaInputs {
            alpha: 1.0,
            t_draft_s: 0.0,
            ..wan()
        }),
        16
    );
}

#[test]
fn speculation_switches_off_when_it_cannot_pay() {
    // Tiny α: drafts are nearly always rejected.
    assert_eq!(
        gamma_at(GammaInputs {
            alpha: 0.02,
            ..wan()
        }),
        0
    );
    // Draft and target share one CPU on loopback: a drafted token costs as much as verifying it.
    let shared_cpu = GammaInputs {
        alpha: 0.7,
        t_draft_s: 0.02,
        rtt_s: 0.0005,
        queue_s: 0.0,
        verify: VerifyCost {
            base_s: 0.0,
            per_token_s: 0.02,
        },
        ..wan()
    };
    assert_eq!(gamma_at(shared_cpu), 0);
    // No usable link: only plain decoding has a finite cost.
    assert_eq!(
        gamma_at(GammaInputs {
            bandwidth_bytes_per_s: 0.0,
            ..wan()
        }),
        0
    );
}

#[test]
fn pool_load_shortens_gamma_then_switches_it_off() {
    let under_load = |alpha: f64| -> Vec<usize> {
        [0.0, 0.5, 0.8, 0.9, 0.95, 0.99]
            .iter()
            .map(|&rho| {
                gamma_at(GammaInputs {
                    alpha,
                    verify: wan().verify.marginal(rho),
                    ..wan()
                })
            })
            .collect()
    };
    for alpha in [0.5, 0.8] {
        let gammas = under_load(alpha);
        assert!(
            gammas.windows(2).all(|w| w[0] >= w[1]),
            "α {alpha}: {gammas:?}"
        );
        assert!(
            gammas[0] > gammas[gammas.len() - 1],
            "α {alpha}: {gammas:?}"
        );
    }
    // A mediocre draft stops speculating altogether on a saturated pool.
    let gammas = under_load(0.5);
    assert!(gammas[0] > 0 && gammas[gammas.len() - 1] == 0, "{gammas:?}");
}

#[test]
fn bounds_are_respected() {
    // Plain decoding is optimal here, but the floor wins.
    let low_alpha = GammaInputs {
        alpha: 0.02,
        min_gamma: 2,
        ..wan()
    };
    assert_eq!(gamma_at(low_alpha), 2);
    assert_eq!(
        gamma_at(GammaInputs {
            max_gamma: 3,
            ..wan()
        }),
        3
    );
    // min > max: max is raised to min.
    assert_eq!(
        gamma_at(GammaInputs {
            min_gamma: 5,
            max_gamma: 2,
            ..wan()
        }),
        5
    );
    // Unbounded max is capped.
    let free = GammaInputs {
        alpha: 1.0,
        t_draft_s: 0.0,
        max_gamma: usize::MAX,
        ..wan()
    };
    assert_eq!(gamma_at(free), MAX_GAMMA);
    assert_eq!(
        gamma_at(GammaInputs {
            min_gamma: 0,
            max_gamma: 0,
            ..wan()
        }),
        0
    );
}

#[test]
fn pipelining_hides_drafting_behind_the_round_trip() {
    let serial = wan();
    let pipelined = GammaInputs {
        pipelined: true,
        ..wan()
    };
    assert!(plan(&pipelined).tokens_per_s_expected > plan(&serial).tokens_per_s_expected);
    // Fully hidden case by hand: α = 1, so h = 1 and T = max(γ·t_draft, C).
    let sure = GammaInputs {
        alpha: 1.0,
        ..pipelined
    };
    let c4 = 0.04 + 4.0 * 64.0 / 1.25e6 + 0.005 + 0.02 + 0.005;
    assert!((round_time_s(&sure, 4) - c4).abs() < 1e-12);
    // Drafting slower than the round trip: drafting is the bottleneck.
    let slow_draft = GammaInputs {
        t_draft_s: 0.1,
        ..sure
    };
    assert!((round_time_s(&slow_draft, 4) - 0.4).abs() < 1e-12);
}

#[test]
fn junk_inputs_do_not_break_the_plan() {
    let junk = GammaInputs {
        alpha: f64::NAN,
        t_draft_s: -1.0,
        rtt_s: f64::NAN,
        queue_s: -5.0,
        verify: VerifyCost {
            base_s: 0.0,
            per_token_s: 0.0,
        },
        bytes_per_token: 0.0,
        ..wan()
    };
    let p = plan(&junk);
    assert!(p.tokens_per_s_expected.is_finite() && p.tokens_per_s_expected > 0.0);
    assert_eq!(p.gamma, 0);
}

fn inputs() -> impl Strategy<Value = GammaInputs> {
    (
        (
            0.0f64..=1.0,
            0.0f64..0.05,
            0.0f64..0.3,
            1e3f64..1e8,
            0.0f64..200.0,
        ),
        (
            0.0f64..0.05,
            0.0f64..0.1,
            0.0f64..0.02,
            0usize..6,
            0usize..24,
            any::<bool>(),
        ),
    )
        .prop_map(
            |((alpha, t_draft_s, rtt_s, bw, bytes), (queue_s, base, per, lo, hi, pipe))| {
                GammaInputs {
                    alpha,
                    t_draft_s,
                    rtt_s,
                    bandwidth_bytes_per_s: bw,
                    bytes_per_token: bytes,
                    queue_s,
                    verify: VerifyCost {
                        base_s: base,
                        per_token_s: per,
                    },
                    min_gamma: lo,
                    max_gamma: hi,
                    pipelined: pipe,
                }
            },
        )
}

proptest! {
    #[test]
    fn plan_is_bounded_and_optimal(i in inputs()) {
        let p = plan(&i);
        let hi = i.max_gamma.max(i.min_gamma);
        prop_assert!(p.gamma >= i.min_gamma && p.gamma <= hi);
        for gamma in i.min_gamma..=hi {
            prop_assert!(tokens_per_s(&i, gamma) <= p.tokens_per_s_expected * (1.0 + 1e-12));
        }
    }

    #[test]
    fn pipelined_rate_is_never_below_serial(i in inputs()) {
        let serial = plan(&GammaInputs { pipelined: false, ..i });
        let pipelined = plan(&GammaInputs { pipelined: true, ..i });
        prop_assert!(pipelined.tokens_per_s_expected >= serial.tokens_per_s_expected * (1.0 - 1e-12));
    }
}

/// From γ = 0 a small expected gain does not switch drafting on; a clear one does, and a
/// session already drafting keeps the plain optimum.
#[test]
fn switching_drafting_on_needs_a_clear_gain() {
    // Scan the draft cost for a point where the optimum is γ > 0 by only a few per cent.
    let near = (1..2000)
        .map(|i| GammaInputs {
            t_draft_s: f64::from(i) * 1e-4,
            ..wan()
        })
        .find(|i| {
            let best = plan(i);
            best.gamma > 0 && best.tokens_per_s_expected < 1.05 * tokens_per_s(i, 0)
        })
        .expect("a near-break-even draft cost");
    assert_eq!(plan_from(&near, 0, 1.10).gamma, 0);
    assert_eq!(plan_from(&near, 0, 1.0), plan(&near));
    assert_eq!(plan_from(&near, 2, 1.10), plan(&near));
    // Where drafting clearly pays, γ = 0 switches on.
    let clear = wan();
    assert!(plan(&clear).tokens_per_s_expected > 1.5 * tokens_per_s(&clear, 0));
    assert_eq!(plan_from(&clear, 0, 1.10), plan(&clear));
    // A configured minimum γ > 0 is never overridden.
    let forced = GammaInputs {
        min_gamma: 1,
        ..near
    };
    assert!(plan_from(&forced, 0, 1.10).gamma >= 1);
}
