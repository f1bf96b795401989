//! Placement: on-prem first, cloud burst, drain / cordon / uncordon.

use crate::support::{self, eventually, Manual};
use edgespec_proto::domain::ErrorCode;
use edgespec_testkit::scripted::{reference, DraftClient, ScriptedVerifierConfig};

#[tokio::test]
async fn prefers_onprem_then_bursts_new_sessions_to_cloud() {
    let mut s = support::settings();
    s.policy.burst_utilization = 0.5;
    let coord = support::start(s).await;
    let mut cfg = ScriptedVerifierConfig::new("onprem-1", "onprem", &coord.url());
    cfg.capacity = 2;
    let onprem = support::verifier_with(&coord, cfg).await;
    let cloud = support::verifier(&coord, "cloud-1", "cloud").await;
    let d = DraftClient::connect(&coord.url(), "edge").await.unwrap();
    let mut first = Manual::new(&d, 1, vec![1, 2]);
    assert_eq!(first.verdict(&d, 2, true).await.verifier_id, "onprem-1");
    // On-prem is now at 1/2 = the 0.5 burst threshold: the next new session bursts.
    let mut second = Manual::new(&d, 2, vec![3, 4]);
    assert_eq!(second.verdict(&d, 2, true).await.verifier_id, "cloud-1");
    // Placement is sticky.
    assert_eq!(first.verdict(&d, 3, false).await.verifier_id, "onprem-1");
    assert_eq!(second.verdict(&d, 3, false).await.verifier_id, "cloud-1");
    assert!(!onprem.batches().is_empty() && !cloud.batches().is_empty());
    // Gauges refresh on the coordinator's tick.
    let url = coord.admin("/metrics");
    support::eventually("cloud demand and pool gauges", || async {
        let text = support::http()
            .get(&url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.contains("edgespec_coordinator_cloud_demand 1")
            && text.contains("edgespec_coordinator_pool_sessions{pool=\"cloud\"} 1")
            && text.contains("edgespec_coordinator_pool_sessions{pool=\"onprem\"} 1")
    })
    .await;
    coord.stop().await;
}

#[tokio::test]
async fn cordon_and_drain_take_no_new_sessions_and_let_existing_ones_finish() {
    let coord = support::start(support::settings()).await;
    let a = support::verifier(&coord, "a", "onprem").await;
    let _b = support::verifier(&coord, "b", "onprem").await;
    let d = DraftClient::connect(&coord.url(), "edge").await.unwrap();
    let mut s1 = Manual::new(&d, 1, vec![5, 6]);
    assert_eq!(s1.verdict(&d, 2, true).await.verifier_id, "a");

    assert!(support::post(&coord.admin("/admin/v1/verifiers/a/cordon"))
        .await
        .is_success());
    let mut s2 = Manual::new(&d, 2, vec![7]);
    assert_eq!(
        s2.verdict(&d, 2, true).await.verifier_id,
        "b",
        "cordoned: no new sessions"
    );
    assert_eq!(
        s1.verdict(&d, 2, false).await.verifier_id,
        "a",
        "existing session stays"
    );

    assert!(support::post(&coord.admin("/admin/v1/verifiers/a/drain"))
        .await
        .is_success());
    let mut s3 = Manual::new(&d, 3, vec![8]);
    assert_eq!(
        s3.verdict(&d, 2, true).await.verifier_id,
        "b",
        "draining: no new sessions"
    );
    // Draining with another node available: the session moves at its next block via resync.
    assert_eq!(s1.error(&d, 2, false).await, ErrorCode::ResyncNeeded);
    assert_eq!(s1.verdict(&d, 2, true).await.verifier_id, "b");
    assert_eq!(s1.verdict(&d, 3, false).await.verifier_id, "b");
    eventually("a released the moved session", || async {
        !a.released().is_empty()
    })
    .await;
    assert_eq!(s1.committed, reference(&[5, 6], s1.committed.len() - 2));

    assert!(
        support::post(&coord.admin("/admin/v1/verifiers/a/uncordon"))
            .await
            .is_success()
    );
    let mut s4 = Manual::new(&d, 4, vec![9]);
    assert_eq!(
        s4.verdict(&d, 1, true).await.verifier_id,
        "a",
        "uncordoned and least loaded"
    );
    let a_view = support::verifier_view(&coord, "a").await;
    assert_eq!(a_view["admin"], "active");
    assert_eq!(
        support::post(&coord.admin("/admin/v1/verifiers/nope/drain")).await,
        reqwest::StatusCode::NOT_FOUND
    );
    coord.stop().await;
}

#[tokio::test]
async fn draining_the_only_node_lets_sessions_finish_in_place() {
    let coord = support::start(support::settings()).await;
    let _a = support::verifier(&coord, "a", "onprem").await;
    let d = DraftClient::connect(&coord.url(), "edge").await.unwrap();
    let mut s1 = Manual::new(&d, 1, vec![1]);
    assert_eq!(s1.verdict(&d, 2, true).await.verifier_id, "a");
    assert!(support::post(&coord.admin("/admin/v1/verifiers/a/drain"))
        .await
        .is_success());
    for _ in 0..3 {
        assert_eq!(s1.verdict(&d, 2, false).await.verifier_id, "a");
    }
    let mut s2 = Manual::new(&d, 2, vec![1]);
    assert_eq!(
        s2.error(&d, 2, true).await,
        ErrorCode::Unavailable,
        "no node takes new sessions"
    );
    coord.stop().await;
}
