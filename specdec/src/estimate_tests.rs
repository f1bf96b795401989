//! Tests of the time-decayed estimators on replayed timelines.

use super::*;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn ewma_is_empty_then_tracks_samples() {
    let mut e = Ewma::new(1.0);
    assert_eq!(e.get(), None);
    e.observe(4.0, 0.0);
    assert_eq!(e.get(), Some(4.0));
    // Same instant: plain average.
    e.observe(2.0, 0.0);
    assert!(close(e.get().unwrap(), 3.0));
    assert!(close(e.weight(), 2.0));
}

#[test]
fn ewma_halves_old_weight_every_half_life() {
    let mut e = Ewma::new(2.0);
    e.observe(0.0, 10.0);
    // Two seconds later the old sample weighs 1/2 against the new one's 1: (0·½ + 3·1) / 1.5.
    e.observe(3.0, 12.0);
    assert!(close(e.get().unwrap(), 2.0));
    assert!(close(e.weight(), 1.5));
    // After a very long gap only the newest sample matters.
    e.observe(7.0, 1e6);
    assert!(close(e.get().unwrap(), 7.0));
}

#[test]
fn ewma_prior_counts_as_weighted_samples_and_fades() {
    let mut e = Ewma::with_prior(1.0, 10.0, 3.0);
    assert_eq!(e.get(), Some(10.0));
    e.observe(2.0, 0.0);
    assert!(close(e.get().unwrap(), 8.0));
    for t in 1..=60 {
        e.observe(2.0, f64::from(t));
    }
    assert!((e.get().unwrap() - 2.0).abs() < 1e-6);
}

#[test]
fn ewma_ignores_bad_samples_and_backwards_time() {
    let mut e = Ewma::new(1.0);
    e.observe(1.0, 5.0);
    e.observe(f64::NAN, 6.0);
    e.observe(9.0, f64::INFINITY);
    e.observe_weighted(9.0, 0.0, 6.0);
    e.observe_weighted(9.0, -1.0, 6.0);
    assert_eq!(e.get(), Some(1.0));
    // A timestamp in the past decays nothing and does not move the clock back.
    e.observe(3.0, 4.0);
    assert!(close(e.get().unwrap(), 2.0));
    e.observe(3.0, 5.0);
    assert!(close(e.weight(), 3.0));
}

#[test]
fn ewma_with_zero_half_life_keeps_only_the_latest_instant() {
    let mut e = Ewma::new(0.0);
    e.observe(1.0, 0.0);
    e.observe(3.0, 0.0);
    assert!(close(e.get().unwrap(), 2.0));
    e.observe(5.0, 1.0);
    assert_eq!(e.get(), Some(5.0));
}

fn prior(alpha: f64, weight: f64) -> AcceptancePrior {
    AcceptancePrior {
        alpha,
        weight,
        half_life_s: 100.0,
    }
}

#[test]
fn acceptance_starts_at_the_prior() {
    assert!(close(
        AcceptanceEstimator::new(prior(0.7, 5.0)).alpha(),
        0.7
    ));
    assert!(close(
        AcceptanceEstimator::new(prior(3.0, 5.0)).alpha(),
        1.0
    ));
    assert!(close(
        AcceptanceEstimator::new(prior(0.7, 0.0)).alpha(),
        0.0
    ));
}

#[test]
fn acceptance_counts_only_tested_positions() {
    let mut a = AcceptanceEstimator::new(prior(0.5, 0.0));
    // γ = 4, 1 accepted: positions 0 (accepted) and 1 (rejected) were tested; 2 and 3 never.
    a.observe(4, 1, 0.0).unwrap();
    assert!(close(a.alpha(), 0.5));
    // γ = 4, all accepted: 4 tested, 4 accepted → (1 + 4) / (2 + 4).
    a.observe(4, 4, 0.0).unwrap();
    assert!(close(a.alpha(), 5.0 / 6.0));
    // γ = 0 carries no information.
    a.observe(0, 0, 0.0).unwrap();
    assert!(close(a.alpha(), 5.0 / 6.0));
}

#[test]
fn acceptance_converges_to_the_true_rate_of_a_geometric_process() {
    // Replay rounds of γ = 5 whose acceptances follow α = 0.8 exactly in expectation: feed the
    // expected counts for each outcome a (P(a) = 0.8^a·0.2 for a < 5, 0.8^5 for a = 5).
    let mut a = AcceptanceEstimator::new(prior(0.3, 4.0));
    let alpha: f64 = 0.8;
    for round in 0..2000 {
        let t = f64::from(round) * 0.01;
        let u = f64::from(round % 1000) / 1000.0;
        // Inverse CDF of the truncated geometric.
        let mut cdf = 0.0;
        let mut accepted = 5;
        for k in 0..5 {
            cdf += alpha.powi(k) * (1.0 - alpha);
            if u < cdf {
                accepted = k as usize;
                break;
            }
        }
        a.observe(5, accepted, t).unwrap();
    }
    assert!((a.alpha() - 0.8).abs() < 0.01, "{}", a.alpha());
}

#[test]
fn acceptance_rejects_impossible_rounds() {
    let mut a = AcceptanceEstimator::new(prior(0.5, 1.0));
    assert!(matches!(
        a.observe(2, 3, 0.0),
        Err(SpecError::InvalidObservation { .. })
    ));
    assert!(close(a.alpha(), 0.5));
}

#[test]
fn acceptance_forgets_old_behaviour() {
    let mut a = AcceptanceEstimator::new(AcceptancePrior {
        alpha: 0.5,
        weight: 4.0,
        half_life_s: 1.0,
    });
    for t in 0..10 {
        a.observe(4, 4, f64::from(t)).unwrap();
    }
    assert!(a.alpha() > 0.99);
    for t in 10..30 {
        a.observe(4, 0, f64::from(t)).unwrap();
    }
    assert!(a.alpha() < 0.01, "{}", a.alpha());
}

#[test]
fn link_defaults_before_samples() {
    let cfg = LinkConfig::default();
    let l = LinkEstimator::new(cfg);
    assert_eq!(l.rtt_s(), cfg.default_rtt_s);
    assert_eq!(l.bandwidth_bytes_per_s(), cfg.default_bandwidth_bytes_per_s);
    assert!(cfg.default_rtt_s > 0.0 && cfg.default_bandwidth_bytes_per_s > 0.0);
}

#[test]
fn link_rtt_subtracts_server_time() {
    let mut l = LinkEstimator::new(LinkConfig::default());
    l.observe_round_trip(10.0, 10.050, 0.030);
    assert!((l.rtt_s() - 0.020).abs() < 1e-9);
    l.observe_round_trip(11.0, 11.030, 0.002);
    assert!((l.rtt_s() - 0.024).abs() < 1e-3);
    // Server time from another clock exceeding the elapsed time clamps the sample at 0.
    let mut l = LinkEstimator::new(LinkConfig::default());
    l.observe_round_trip(1.0, 1.010, 0.015);
    assert_eq!(l.rtt_s(), 0.0);
}

#[test]
fn link_ignores_nonsense_round_trips() {
    let mut l = LinkEstimator::new(LinkConfig::default());
    l.observe_round_trip(2.0, 1.0, 0.0);
    l.observe_round_trip(f64::NAN, 1.0, 0.0);
    l.observe_round_trip(1.0, 2.0, f64::INFINITY);
    assert_eq!(l.rtt_s(), LinkConfig::default().default_rtt_s);
}

#[test]
fn link_bandwidth_is_total_bytes_over_total_time() {
    let cfg = LinkConfig {
        min_bandwidth_sample_bytes: 1000,
        ..LinkConfig::default()
    };
    let mut l = LinkEstimator::new(cfg);
    // Too small or zero-time transfers say nothing.
    l.observe_transfer(999, 0.001, 0.0);
    l.observe_transfer(1_000_000, 0.0, 0.0);
    assert_eq!(l.bandwidth_bytes_per_s(), cfg.default_bandwidth_bytes_per_s);
    l.observe_transfer(1_000_000, 1.0, 0.0);
    l.observe_transfer(3_000_000, 1.0, 0.0);
    // 4 MB in 2 s, not the mean of 1 and 3 MB/s.
    assert!((l.bandwidth_bytes_per_s() - 2e6).abs() < 1.0);
}
