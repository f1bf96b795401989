//! Admin API: auth, policy, health/readiness, model fingerprint checks.

use crate::support::{self, Manual, TOKEN};
use edgespec_proto::pb;
use edgespec_proto::pb::coordinator_client::CoordinatorClient;
use edgespec_testkit::scripted::{DraftClient, FINGERPRINT};
use reqwest::StatusCode;

#[tokio::test]
async fn admin_requires_the_bearer_token_but_probes_do_not() {
    let coord = support::start(support::settings()).await;
    let c = support::http();
    for path in ["/admin/v1/nodes", "/admin/v1/sessions", "/admin/v1/policy"] {
        let none = c.get(coord.admin(path)).send().await.unwrap();
        assert_eq!(none.status(), StatusCode::UNAUTHORIZED, "{path}");
        let wrong = c
            .get(coord.admin(path))
            .bearer_auth("nope")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED, "{path}");
        let right = c
            .get(coord.admin(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(right.status(), StatusCode::OK, "{path}");
    }
    let post = c
        .post(coord.admin("/admin/v1/verifiers/x/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::UNAUTHORIZED);
    let put = c
        .put(coord.admin("/admin/v1/policy"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        c.get(coord.admin("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        c.get(coord.admin("/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let ready = c.get(coord.admin("/readyz")).send().await.unwrap();
    assert_eq!(
        ready.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "no verifier yet"
    );
    let _v = support::verifier(&coord, "a", "onprem").await;
    support::eventually("ready", || async {
        c.get(coord.admin("/readyz")).send().await.unwrap().status() == StatusCode::OK
    })
    .await;
    coord.stop().await;
}

#[tokio::test]
async fn empty_token_refuses_every_admin_request() {
    let mut s = support::settings();
    s.admin.token = String::new();
    let coord = support::start(s).await;
    let r = support::http()
        .get(coord.admin("/admin/v1/nodes"))
        .bearer_auth("")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    coord.stop().await;
}

#[tokio::test]
async fn policy_updates_apply_live_and_are_validated() {
    let coord = support::start(support::settings()).await;
    let _v = support::verifier(&coord, "a", "onprem").await;
    let d = DraftClient::connect(&coord.url(), "edge").await.unwrap();
    assert!(d.welcome().speculation_enabled);
    let mut s = Manual::new(&d, 1, vec![1, 2, 3]);
    let v = s.verdict(&d, 3, true).await;
    assert!(v.next_gamma > 0, "speculation on: γ > 0 for a fast link");

    let c = support::http();
    let url = coord.admin("/admin/v1/policy");
    let bad = c
        .put(&url)
        .bearer_auth(TOKEN)
        .body(r#"{"gamma_min": 9, "gamma_max": 4}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = bad.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("gamma_min"),
        "{body}"
    );
    let unknown = c
        .put(&url)
        .bearer_auth(TOKEN)
        .body(r#"{"gama": 1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::BAD_REQUEST);
    assert!(unknown.text().await.unwrap().contains("gama"));

    let ok = c
        .put(&url)
        .bearer_auth(TOKEN)
        .body(r#"{"speculation_enabled": false, "batch_window": "1ms"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let policy: serde_json::Value = ok.json().await.unwrap();
    assert_eq!(policy["speculation_enabled"], false);
    assert_eq!(policy["batch_window"], "1ms");
    assert_eq!(policy["gamma_max"], 8, "omitted fields keep their value");
    assert_eq!(s.verdict(&d, 2, false).await.next_gamma, 0);
    assert_eq!(
        s.verdict(&d, 0, false).await.next_gamma,
        0,
        "γ = 0 rounds work"
    );
    let d2 = DraftClient::connect(&coord.url(), "edge-2").await.unwrap();
    assert!(!d2.welcome().speculation_enabled);
    assert_eq!(d2.welcome().initial_gamma, 0);

    let sessions = support::get_json(&coord.admin("/admin/v1/sessions")).await;
    let s0 = &sessions["sessions"][0];
    assert_eq!(s0["gamma"], 0);
    assert_eq!(s0["rounds"], 3);
    assert!(s0["alpha"].as_f64().is_some());
    coord.stop().await;
}

#[tokio::test]
async fn model_mismatches_are_refused_with_failed_precondition() {
    let coord = support::start(support::settings()).await;
    let _v = support::verifier(&coord, "a", "onprem").await;
    let err = DraftClient::connect_with(&coord.url(), "edge", "other-model")
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("model mismatch: draft other-model vs verify fleet"),
        "{}",
        err.message()
    );
    let mut c = CoordinatorClient::connect(coord.url()).await.unwrap();
    let info = pb::NodeInfo {
        node_id: "b".into(),
        advertise_addr: "http://127.0.0.1:9".into(),
        pool: "cloud".into(),
        fingerprint: "other-model".into(),
        capacity_sessions: 4,
        ..Default::default()
    };
    let err = c
        .register_verifier(pb::RegisterVerifierRequest { info: Some(info) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains(FINGERPRINT), "{}", err.message());
    coord.stop().await;
}

#[tokio::test]
async fn nodes_view_reports_pools_load_link_and_acceptance() {
    let coord = support::start(support::settings()).await;
    let _v = support::verifier(&coord, "a", "onprem").await;
    let d = DraftClient::connect(&coord.url(), "edge").await.unwrap();
    let mut s = Manual::new(&d, 1, vec![1, 2, 3]);
    s.verdict(&d, 3, true).await;
    // The coordinator probes every stream soon after its hello; on loopback the measured RTT
    // drops far below the 30 ms default.
    let url = coord.admin("/admin/v1/nodes");
    support::eventually("link RTT measured", || async {
        let n = support::get_json(&url).await;
        n["drafts"][0]["rtt_ms"].as_f64().unwrap() < 10.0
    })
    .await;
    let n = support::get_json(&url).await;
    let v = &n["verifiers"][0];
    assert_eq!(v["pool"], "onprem");
    assert_eq!(v["health"], "up");
    assert_eq!(v["sessions"], 1);
    assert_eq!(n["drafts"][0]["node_id"], "edge");
    assert_eq!(n["drafts"][0]["sessions"], 1);
    let alpha = n["drafts"][0]["acceptance"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&alpha));
    assert_eq!(n["fleet_fingerprint"], FINGERPRINT);
    let sessions = support::get_json(&coord.admin("/admin/v1/sessions")).await;
    let text = sessions.to_string();
    assert!(
        !text.contains("history") && !text.contains("tokens\":["),
        "no token data: {text}"
    );
    coord.stop().await;
}
