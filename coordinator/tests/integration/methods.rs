//! Drafting methods (issue 17) over real gRPC: a session's method reaches the admin API and
//! the metrics, and the γ controller plans it with that method's reported cost.

use crate::support::{self, get_json, Manual};
use edgespec_proto::domain::DraftMethod;
use edgespec_testkit::scripted::DraftClient;

#[tokio::test]
async fn a_lookup_session_is_shown_and_counted_under_its_method() {
    let coord = support::start(support::settings()).await;
    let _v = support::verifier(&coord, "a", "onprem").await;
    let d = DraftClient::connect(&coord.url(), "edge").await.unwrap();
    let mut lookup = Manual::new(&d, 1, vec![1, 2, 3]);
    lookup.method = (DraftMethod::Lookup, 1e-5);
    let mut model = Manual::new(&d, 2, vec![4, 5, 6]);
    for round in 0..3 {
        lookup.verdict(&d, 3, round == 0).await;
    }
    model.verdict(&d, 2, true).await;

    let sessions = get_json(&coord.admin("/admin/v1/sessions")).await;
    let method_of = |sid: u64| {
        sessions["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["draft_session_id"] == sid)
            .unwrap()["method"]
            .clone()
    };
    assert_eq!(method_of(1), "lookup", "{sessions}");
    assert_eq!(method_of(2), "model", "{sessions}");

    let nodes = get_json(&coord.admin("/admin/v1/nodes")).await;
    let draft = &nodes["drafts"][0];
    assert_eq!(draft["method"], "model", "the hello's default: {draft}");
    let by_method = |m: &str| {
        draft["methods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["method"] == m)
            .unwrap_or_else(|| panic!("no {m} in {draft}"))
            .clone()
    };
    let l = by_method("lookup");
    assert_eq!(l["rounds"], 3, "{l}");
    assert_eq!(l["drafted_tokens"], 9, "{l}");
    assert!(l["mean_gamma"].as_f64().is_some(), "{l}");
    // Planned with the lookup cost it reported, not the model's 1 ms.
    let planned = l["planned_draft_ms_per_token"].as_f64().unwrap();
    assert!((planned - 0.01).abs() < 1e-6, "{l}");
    assert_eq!(by_method("model")["rounds"], 1, "{draft}");

    let text = support::http()
        .get(coord.admin("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "edgespec_coordinator_rounds_total 4",
        "edgespec_coordinator_method_rounds_total{method=\"lookup\"} 3",
        "edgespec_coordinator_method_drafted_tokens_total{method=\"lookup\"} 9",
        "edgespec_coordinator_method_rounds_total{method=\"model\"} 1",
        "edgespec_coordinator_method_gamma_count{method=\"lookup\"} 3",
        "edgespec_coordinator_method_rounds_total{method=\"hybrid\"} 0",
    ] {
        assert!(text.contains(line), "no {line}:\n{text}");
    }
    coord.stop().await;
}
