//! Starting coordinators and waiting for conditions.

use edgespec_coordinator::{App, Settings};
pub use edgespec_testkit::harness::eventually;
use edgespec_testkit::harness::Running;
use edgespec_testkit::scripted::{ScriptedVerifier, ScriptedVerifierConfig};
use std::net::SocketAddr;
use std::time::Duration;

pub const TOKEN: &str = "test-admin-token";

/// A running coordinator.
pub struct Coord {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    running: Running<Result<(), edgespec_coordinator::Error>>,
}

impl Coord {
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// Graceful shutdown; returns once the coordinator has stopped.
    pub async fn stop(self) {
        tokio::time::timeout(Duration::from_secs(20), self.running.stop())
            .await
            .expect("coordinator stops in time")
            .expect("task joins")
            .expect("coordinator ran cleanly");
    }
}

/// Settings for tests: loopback, port 0, a token, short heartbeats.
pub fn settings() -> Settings {
    let mut s = Settings::for_tests();
    s.admin.token = TOKEN.into();
    s.registry.heartbeat_interval = Duration::from_millis(100);
    s.verify.timeout = Duration::from_secs(5);
    s
}

pub async fn start(settings: Settings) -> Coord {
    let app = App::build(settings).await.expect("coordinator binds");
    let (grpc, http) = (app.grpc_addr(), app.http_addr());
    Coord {
        grpc,
        http,
        running: Running::spawn(|shutdown| app.run(shutdown)),
    }
}

/// Starts a scripted verifier registering with `coord` and waits until the coordinator lists it
/// as up.
pub async fn verifier(coord: &Coord, id: &str, pool: &str) -> ScriptedVerifier {
    verifier_with(coord, ScriptedVerifierConfig::new(id, pool, &coord.url())).await
}

pub async fn verifier_with(coord: &Coord, cfg: ScriptedVerifierConfig) -> ScriptedVerifier {
    let id = cfg.node_id.clone();
    let v = ScriptedVerifier::start(cfg).await.expect("verifier starts");
    let url = coord.admin("/admin/v1/nodes");
    eventually(&format!("verifier {id} registered"), || async {
        let nodes = get_json(&url).await;
        nodes["verifiers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == id.as_str() && n["health"] == "up")
    })
    .await;
    v
}

pub fn http() -> reqwest::Client {
    reqwest::Client::new()
}

pub async fn get_json(url: &str) -> serde_json::Value {
    let r = http()
        .get(url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("GET");
    assert!(r.status().is_success(), "GET {url}: {}", r.status());
    r.json().await.expect("json")
}

/// Verify node `id` as `GET /admin/v1/nodes` lists it.
pub async fn verifier_view(coord: &Coord, id: &str) -> serde_json::Value {
    let nodes = get_json(&coord.admin("/admin/v1/nodes")).await;
    nodes["verifiers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id)
        .unwrap()
        .clone()
}

pub async fn post(url: &str) -> reqwest::StatusCode {
    http()
        .post(url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("POST")
        .status()
}

use edgespec_proto::domain::{CoordinatorMessage, DraftBlock, DraftMessage, DraftMethod};
use edgespec_testkit::scripted::{
    greedy_block, target_next, DraftClient, DRAFT_S_PER_TOKEN, VOCAB,
};
use tokio::sync::mpsc::UnboundedReceiver;

/// A session stepped by hand, one block at a time.
pub struct Manual {
    pub sid: u64,
    pub committed: Vec<u32>,
    pub round: u64,
    pub rx: UnboundedReceiver<CoordinatorMessage>,
    /// The method its blocks name, and the draft cost they report for it.
    pub method: (DraftMethod, f32),
}

impl Manual {
    pub fn new(d: &DraftClient, sid: u64, prompt: Vec<u32>) -> Self {
        Self {
            sid,
            committed: prompt,
            round: 1,
            rx: d.subscribe(sid),
            method: (DraftMethod::Model, DRAFT_S_PER_TOKEN),
        }
    }

    /// Re-subscribes on a new stream (after a reconnect).
    pub fn attach(&mut self, d: &DraftClient) {
        self.rx = d.subscribe(self.sid);
    }

    /// Sends the next block (γ drafts, the last one wrong when γ ≥ 2) and waits for the answer;
    /// a verdict is applied.
    pub async fn step(
        &mut self,
        d: &DraftClient,
        gamma: usize,
        history: bool,
    ) -> CoordinatorMessage {
        let mut drafts = Vec::new();
        let mut prev = *self.committed.last().unwrap();
        for i in 0..gamma {
            let mut t = target_next(prev);
            if gamma >= 2 && i == gamma - 1 {
                t = (t + 1) % VOCAB;
            }
            drafts.push(t);
            prev = t;
        }
        let block = DraftBlock {
            client_send_unix_ns: 1_000_000 + self.round,
            method: self.method.0,
            draft_s_per_token: self.method.1,
            ..greedy_block(
                self.sid,
                self.round,
                &self.committed,
                history,
                drafts.clone(),
            )
        };
        d.send(DraftMessage::Block(block)).await.unwrap();
        let m = tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("an answer arrives")
            .expect("stream open");
        if let CoordinatorMessage::Verdict(v) = &m {
            assert_eq!(v.round, self.round);
            assert_eq!(v.client_send_unix_ns, 1_000_000 + self.round, "echoed");
            self.committed.extend_from_slice(&drafts[..v.accepted]);
            self.committed.push(v.next_token);
            assert_eq!(v.committed_len, self.committed.len());
            self.round += 1;
        }
        m
    }

    /// Like `step`, but expects a verdict and returns its verifier id.
    pub async fn verdict(
        &mut self,
        d: &DraftClient,
        gamma: usize,
        history: bool,
    ) -> edgespec_proto::domain::Verdict {
        match self.step(d, gamma, history).await {
            CoordinatorMessage::Verdict(v) => v,
            m => panic!("expected a verdict, got {m:?}"),
        }
    }

    /// Like `step`, but expects a session error and returns its code.
    pub async fn error(
        &mut self,
        d: &DraftClient,
        gamma: usize,
        history: bool,
    ) -> edgespec_proto::domain::ErrorCode {
        match self.step(d, gamma, history).await {
            CoordinatorMessage::Error(e) => e.code,
            m => panic!("expected an error, got {m:?}"),
        }
    }
}
