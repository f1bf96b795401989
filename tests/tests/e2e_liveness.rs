//! Hung and vanished peers are found (issue 15 item 5):
//!
//! - a verify node whose forward never finishes keeps heartbeating, so heartbeats alone say it
//!   is fine; the coordinator sees work without progress, quarantines it and moves its sessions,
//!   which finish with exactly the target-only tokens;
//! - a draft host that vanishes without closing its TCP connection (a blackholed link: no reset)
//!   has its stream dropped by the coordinator's HTTP/2 keepalive within twice the keepalive.
//!
//! Real coordinators on `127.0.0.1:0`, scripted verify nodes and draft streams (testkit).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use edgespec::linkemu::{CutMode, LinkConfig, LinkEmulator, LinkProfile};
use edgespec_proto::domain::ErrorCode;
use edgespec_testkit::fleet::AdminApi;
use edgespec_testkit::harness::{wait_until, Running};
use edgespec_testkit::scripted::{
    reference, DraftClient, ScriptedVerifier, ScriptedVerifierConfig, SessionScript,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "liveness-test";
/// Bound on every wait for the system (a CPU shared with other tests is slow).
const DEADLINE: Duration = Duration::from_secs(30);

struct Coordinator {
    url: String,
    grpc: std::net::SocketAddr,
    admin: AdminApi,
    running: Running<Result<(), edgespec_coordinator::Error>>,
}

async fn coordinator(settings: edgespec_coordinator::Settings) -> Result<Coordinator> {
    let app = edgespec_coordinator::App::build(settings).await?;
    let (grpc, http) = (app.grpc_addr(), app.http_addr());
    Ok(Coordinator {
        url: format!("http://{grpc}"),
        grpc,
        admin: AdminApi::http(http, TOKEN),
        running: Running::spawn(|stop| app.run(stop)),
    })
}

fn settings() -> edgespec_coordinator::Settings {
    let mut s = edgespec_coordinator::Settings::for_tests();
    s.admin.token = TOKEN.into();
    s.registry.heartbeat_interval = Duration::from_millis(100);
    s
}

/// The health the coordinator shows for verify node `id`.
async fn health(c: &Coordinator, id: &str) -> Result<String> {
    let nodes = c.admin.get("/admin/v1/nodes").await?;
    let v = nodes["verifiers"]
        .as_array()
        .context("verifiers")?
        .iter()
        .find(|n| n["id"] == id)
        .with_context(|| format!("{id} is listed"))?;
    Ok(v["health"].as_str().unwrap_or_default().to_string())
}

async fn verifier(c: &Coordinator, cfg: ScriptedVerifierConfig) -> Result<ScriptedVerifier> {
    let id = cfg.node_id.clone();
    let v = ScriptedVerifier::start(cfg).await?;
    wait_until(&format!("{id} is up"), DEADLINE, || async {
        health(c, &id).await.is_ok_and(|h| h == "up")
    })
    .await?;
    Ok(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_model_hangs_is_quarantined_and_its_sessions_finish_elsewhere() -> Result<()> {
    let mut s = settings();
    s.registry.stall_timeout = Duration::from_secs(1);
    // Far beyond the sessions' answer timeout: only the quarantine can rescue them in time.
    s.verify.timeout = Duration::from_secs(120);
    let c = coordinator(s).await?;
    // "a" answers no Verify call, ever (its model is stuck), yet heartbeats as usual.
    let mut hung = ScriptedVerifierConfig::new("a", "onprem", &c.url);
    hung.forward_base = Duration::from_secs(3600);
    let _a = verifier(&c, hung).await?;
    let _b = verifier(&c, ScriptedVerifierConfig::new("b", "onprem", &c.url)).await?;

    let d = Arc::new(DraftClient::connect(&c.url, "edge").await?);
    let scripts: Vec<SessionScript> = (1..=4).map(|i| SessionScript::new(i, 40)).collect();
    let runs: Vec<_> = scripts
        .iter()
        .cloned()
        .map(|sc| {
            let d = d.clone();
            tokio::spawn(async move { d.run_session(sc).await })
        })
        .collect();
    let mut moved = 0;
    for (run, sc) in runs.into_iter().zip(&scripts) {
        let report = run
            .await?
            .with_context(|| format!("session {}", sc.session_id))?;
        ensure!(
            report.tokens == reference(&sc.prompt, 40),
            "session {}: output differs from target-only",
            sc.session_id
        );
        ensure!(
            report.verifiers.iter().all(|v| v == "b"),
            "a verdict came from the hung node"
        );
        if report.errors.contains(&ErrorCode::ResyncNeeded) {
            moved += 1;
        }
    }
    ensure!(moved >= 1, "no session was placed on the hung node first");
    ensure!(health(&c, "a").await? == "quarantined");
    c.running.stop().await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_draft_stream_is_dropped_within_twice_the_keepalive() -> Result<()> {
    let keepalive = Duration::from_millis(500);
    let mut s = settings();
    s.grpc.keepalive_interval = keepalive;
    s.grpc.keepalive_timeout = keepalive;
    let c = coordinator(s).await?;
    let _v = verifier(&c, ScriptedVerifierConfig::new("v", "onprem", &c.url)).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let mut link = LinkConfig::symmetric(LinkProfile::ideal());
    link.cut_mode = CutMode::Blackhole;
    let stop = CancellationToken::new();
    let (emulator, control) =
        LinkEmulator::spawn(listener, c.grpc, link, stop.clone().cancelled_owned())?;
    let d = DraftClient::connect(&format!("http://{}", control.local_addr()), "edge").await?;
    let streams = || async {
        let nodes = c.admin.get("/admin/v1/nodes").await?;
        anyhow::Ok(nodes["drafts"].as_array().map_or(0, Vec::len))
    };
    wait_until("the draft stream is open", DEADLINE, || async {
        streams().await.is_ok_and(|n| n == 1)
    })
    .await?;
    // The draft host vanishes: nothing more arrives, and nothing is closed or reset.
    control.cut();
    let cut = Instant::now();
    wait_until("the coordinator drops the stream", DEADLINE, || async {
        streams().await.is_ok_and(|n| n == 0)
    })
    .await?;
    let took = cut.elapsed();
    let bound = 2 * (keepalive + keepalive);
    ensure!(
        took <= bound,
        "the stream was dropped after {took:?}, beyond twice the keepalive ({bound:?})"
    );
    drop(d);
    stop.cancel();
    emulator.await?;
    c.running.stop().await??;
    Ok(())
}
