//! A draft node whose coordinator is not there when it starts: its API answers at once,
//! `/readyz` says 503 (and why) for as long as the coordinator stays away — well past
//! `coordinator.timeout`, the node never gives up — and once a coordinator comes up at that
//! address the node becomes ready and answers with the target's output. A request that arrives
//! while the node connects waits for the stream instead of failing.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edgespec_testkit::harness::free_addr;
use serde_json::{json, Value};
use support::{script, settings, RunningNode, ScriptedCoordinator, Target, TinyModel};
use tokio::net::{TcpListener, TcpStream};

const PROMPT: &str = "def fib(n): the answer is";

/// Makes the coordinator reachable at `at` (where the node dials) by forwarding every connection
/// to `to`, where the scripted coordinator listens.
async fn forward(at: SocketAddr, to: SocketAddr) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(at)
        .await
        .expect("the vacant address is free again");
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

async fn readyz(http: &reqwest::Client, node: &RunningNode) -> (u16, Value) {
    let r = http.get(node.url("/readyz")).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

async fn complete(http: &reqwest::Client, node: &RunningNode) -> reqwest::Response {
    http.post(node.url("/v1/completions"))
        .json(&json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 0}))
        .send()
        .await
        .unwrap()
}

/// What the target alone produces for [`PROMPT`] (24 tokens at most).
fn expected(model: &TinyModel, target: &Target) -> String {
    let ids = model.tokenizer.encode(PROMPT).unwrap();
    target.expected(model, &ids, 24).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_without_a_coordinator_serves_at_once_and_connects_when_it_comes_up() {
    let model = TinyModel::new();
    let target = Arc::new(Target::new(&model.path, 3));
    // An address nothing listens on yet, taken by `forward` later.
    let addr = free_addr().unwrap();
    let mut st = settings(&model, &format!("http://{addr}"));
    // Short, so the node outlives several of them before the coordinator appears.
    let timeout = Duration::from_millis(400);
    st.coordinator.timeout = timeout;
    st.coordinator.backoff_max = Duration::from_millis(100);
    let node = RunningNode::start(st).await;
    let http = reqwest::Client::new();

    // The API answers at once; /readyz is 503 and says what it is waiting for.
    let models = http.get(node.url("/v1/models")).send().await.unwrap();
    assert_eq!(models.status(), 200);
    let (status, body) = readyz(&http, &node).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "unavailable");
    let reason = body["reason"].as_str().unwrap();
    assert!(
        reason.contains("connecting") && reason.contains(&addr.to_string()),
        "{reason}"
    );

    // Three coordinator.timeouts later it is still up, still not ready, and has the last
    // connection error to show. Requests fail fast meanwhile (the coordinator has been away
    // longer than coordinator.timeout).
    let started = tokio::time::Instant::now();
    let mut last_reason = String::new();
    while started.elapsed() < timeout * 3 || !last_reason.contains("): ") {
        let (status, body) = readyz(&http, &node).await;
        assert_eq!(status, 503, "{body}");
        last_reason = body["reason"].as_str().unwrap().to_string();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = complete(&http, &node).await;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "service_unavailable", "{v}");

    // The coordinator comes up at that address: the node connects by itself and serves.
    let coordinator =
        ScriptedCoordinator::start(script(Arc::clone(&target), &model.fingerprint)).await;
    let _forwarder = forward(addr, coordinator.addr).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = readyz(&http, &node).await;
        if status == 200 {
            assert_eq!(body["status"], "ready");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready 20 s after the coordinator came up: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = complete(&http, &node).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["text"], expected(&model, &target), "{v}");
    assert!(coordinator.record().verdicts > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_arrives_while_the_node_connects_waits_for_the_coordinator() {
    let model = TinyModel::new();
    let target = Arc::new(Target::new(&model.path, 3));
    // Started (on its own port) before the free address is picked, so that the OS cannot hand
    // the coordinator that very address: the node must not reach it before `forward` below.
    let coordinator =
        ScriptedCoordinator::start(script(Arc::clone(&target), &model.fingerprint)).await;
    // An address nothing listens on yet, taken by `forward` later.
    let addr = free_addr().unwrap();
    let mut st = settings(&model, &format!("http://{addr}"));
    st.coordinator.timeout = Duration::from_secs(30);
    st.coordinator.backoff_max = Duration::from_millis(100);
    let node = RunningNode::start(st).await;
    let http = reqwest::Client::new();

    // Admitted (the coordinator has been away for less than coordinator.timeout): it waits.
    let request = {
        let (http, url) = (http.clone(), node.url("/v1/completions"));
        tokio::spawn(async move {
            http.post(url)
                .json(
                    &json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 0}),
                )
                .send()
                .await
                .unwrap()
        })
    };
    // Only once the node has tried and failed at least once does the coordinator appear.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = readyz(&http, &node).await;
        assert_eq!(status, 503, "{body}");
        if body["reason"].as_str().unwrap().contains("): ") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!request.is_finished(), "the request did not wait");
    let _forwarder = forward(addr, coordinator.addr).await;

    let r = request.await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["text"], expected(&model, &target), "{v}");
    // Its session started once the stream was up, with the coordinator's Welcome: its first
    // block went out on the live stream (no resync) and it drafted.
    assert_eq!(v["edgespec"]["resyncs"], 0, "{v}");
    assert!(v["edgespec"]["drafted"].as_u64().unwrap() > 0, "{v}");
    let (status, _) = readyz(&http, &node).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_that_refuses_the_draft_model_keeps_the_node_up_and_says_why() {
    let model = TinyModel::new();
    let target = Arc::new(Target::new(&model.path, 0));
    let http = reqwest::Client::new();
    let fleet = "ab".repeat(32);

    // A Welcome naming another fleet fingerprint, then a coordinator refusing the stream itself
    // (FAILED_PRECONDITION): the node serves, is not ready, names both fingerprints, and refuses
    // requests with model_mismatch instead of exiting.
    for refuse in [false, true] {
        let mut sc = script(Arc::clone(&target), &fleet);
        sc.refuse = refuse;
        let coordinator = ScriptedCoordinator::start(sc).await;
        let node = RunningNode::start(settings(&model, &coordinator.url())).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let reason = loop {
            let (status, body) = readyz(&http, &node).await;
            assert_eq!(status, 503, "{body}");
            let reason = body["reason"].as_str().unwrap().to_string();
            if reason.contains("refuses this draft model") {
                break reason;
            }
            assert!(tokio::time::Instant::now() < deadline, "{body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(reason.contains(&model.fingerprint), "{reason}");
        if !refuse {
            assert!(reason.contains(&fleet), "{reason}");
        }
        let r = complete(&http, &node).await;
        assert_eq!(r.status(), 503);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "model_mismatch", "{v}");
    }

    // An empty fleet fingerprint (no verify node registered yet) is no refusal.
    let coordinator = ScriptedCoordinator::start(script(target, "")).await;
    let node = RunningNode::start(settings(&model, &coordinator.url())).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while readyz(&http, &node).await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
