//! Coordinator restart: soft state rebuilds itself.

use crate::support::{self, Manual};
use edgespec_proto::domain::ErrorCode;
use edgespec_testkit::scripted::{reference, DraftClient};

#[tokio::test]
async fn after_a_restart_verifiers_reregister_and_sessions_resync() {
    let first = support::start(support::settings()).await;
    let grpc = first.grpc;
    let v = support::verifier(&first, "a", "onprem").await;
    let d = DraftClient::connect(&first.url(), "edge").await.unwrap();
    let mut s = Manual::new(&d, 1, vec![4, 2]);
    s.verdict(&d, 3, true).await;
    s.verdict(&d, 3, false).await;
    let registrations = v.registrations();
    first.stop().await;
    drop(d);

    // Same address, new instance (as behind a Kubernetes Service).
    let mut settings = support::settings();
    settings.grpc.listen = grpc;
    let second = support::start(settings).await;
    support::eventually("verifier re-registered", || async {
        v.registrations() > registrations
    })
    .await;
    let d = DraftClient::connect(&second.url(), "edge").await.unwrap();
    assert!(!d.welcome().fleet_fingerprint.is_empty());
    s.attach(&d);
    assert_eq!(s.error(&d, 3, false).await, ErrorCode::ResyncNeeded);
    s.verdict(&d, 3, true).await;
    s.verdict(&d, 3, false).await;
    assert_eq!(s.committed, reference(&[4, 2], s.committed.len() - 2));
    second.stop().await;
}
