//! Failover: a verify node dies mid-run; its sessions resync onto another node without loss.

use crate::support::{self, eventually};
use edgespec_proto::domain::ErrorCode;
use edgespec_testkit::scripted::{reference, DraftClient, ScriptedVerifierConfig, SessionScript};
use std::time::Duration;

#[tokio::test]
async fn killing_a_verifier_mid_run_resyncs_its_sessions_without_loss() {
    let mut s = support::settings();
    s.verify.timeout = Duration::from_millis(300);
    let coord = support::start(s).await;
    let mut cfg = ScriptedVerifierConfig::new("a", "onprem", &coord.url());
    // Slow forwards keep the sessions running while the node dies.
    cfg.forward_base = Duration::from_millis(3);
    let a = support::verifier_with(&coord, cfg.clone()).await;
    cfg.node_id = "b".into();
    let _b = support::verifier_with(&coord, cfg).await;
    let d = std::sync::Arc::new(DraftClient::connect(&coord.url(), "edge").await.unwrap());
    let scripts: Vec<SessionScript> = (1..=6).map(|i| SessionScript::new(i, 200)).collect();
    let runs: Vec<_> = scripts
        .iter()
        .cloned()
        .map(|sc| {
            let d = d.clone();
            tokio::spawn(async move { d.run_session(sc).await })
        })
        .collect();
    eventually("a served a few batches", || async {
        a.batches().len() >= 5
    })
    .await;
    a.kill();
    let mut moved = 0;
    for (run, sc) in runs.into_iter().zip(&scripts) {
        let report = run.await.unwrap().expect("session completes");
        assert_eq!(
            report.tokens,
            reference(&sc.prompt, 200),
            "session {}",
            sc.session_id
        );
        if report.verifiers.iter().any(|v| v == "a") && report.verifiers.iter().any(|v| v == "b") {
            moved += 1;
            assert!(report.errors.contains(&ErrorCode::ResyncNeeded));
            let last_a = report.verifiers.iter().rposition(|v| v == "a").unwrap();
            assert!(report.verifiers[last_a..].iter().skip(1).all(|v| v == "b"));
        }
    }
    assert!(moved >= 1, "some sessions were on the killed node");
    let a_view = support::verifier_view(&coord, "a").await;
    assert_eq!(a_view["health"], "down");
    coord.stop().await;
}
