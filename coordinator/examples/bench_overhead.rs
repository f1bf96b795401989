//! Coordinator overhead benchmark with no-model (scripted) verify nodes: rounds per second and
//! the per-round latency the coordinator path adds, at 10, 100 and 1000 concurrent sessions.
//!
//! Everything runs in process on loopback; the scripted verifiers answer at once, so the
//! measured round time is pure overhead: draft stream → coordinator (batching window,
//! placement, γ) → Verify gRPC → back. Bounded: every session runs a fixed token budget.
//!
//! `cargo run --release -p edgespec-coordinator --example bench_overhead [-- <window-ms>...]`

use edgespec_coordinator::{App, Settings};
use edgespec_testkit::fleet::{AdminApi, FleetWait};
use edgespec_testkit::harness::Running;
use edgespec_testkit::scripted::{
    DraftClient, ScriptedVerifier, ScriptedVerifierConfig, SessionScript,
};
use edgespec_testkit::stats::quantile;
use std::sync::Arc;
use std::time::{Duration, Instant};

const DRAFT_NODES: usize = 4;
const TOKENS_PER_SESSION: usize = 120;

struct Row {
    window_ms: f64,
    sessions: usize,
    rounds: usize,
    wall: Duration,
    p50: Duration,
    p99: Duration,
    coord_p50: Duration,
    coord_p99: Duration,
}

async fn run(window: Duration, sessions: usize) -> anyhow::Result<Row> {
    let mut s = Settings::for_tests();
    s.admin.token = "bench".into();
    s.policy.batch_window = window;
    s.policy.max_batch_tokens = 4096;
    s.admission.max_queued_tokens_per_node = 1 << 20;
    let app = App::build(s).await?;
    let url = format!("http://{}", app.grpc_addr());
    let admin = AdminApi::http(app.http_addr(), "bench");
    let coordinator = Running::spawn(|shutdown| app.run(shutdown));
    let mut verifiers = Vec::new();
    for (i, pool) in ["onprem", "onprem"].iter().enumerate() {
        let mut cfg = ScriptedVerifierConfig::new(&format!("v{i}"), pool, &url);
        cfg.capacity = 4096;
        verifiers.push(ScriptedVerifier::start(cfg).await?);
    }
    admin
        .wait_fleet(
            FleetWait::new(verifiers.len(), 0, Duration::from_secs(10)),
            || Ok(()),
        )
        .await?;
    let mut clients = Vec::new();
    for i in 0..DRAFT_NODES {
        clients.push(Arc::new(
            DraftClient::connect(&url, &format!("edge-{i}")).await?,
        ));
    }
    let start = Instant::now();
    let mut runs = Vec::new();
    for i in 0..sessions {
        let d = clients[i % DRAFT_NODES].clone();
        let mut script = SessionScript::new(i as u64 + 1, TOKENS_PER_SESSION);
        script.fixed_gamma = Some(4);
        script.max_retries = 10_000;
        script.answer_timeout = Duration::from_secs(60);
        runs.push(tokio::spawn(async move { d.run_session(script).await }));
    }
    let (mut lat, mut coord) = (Vec::new(), Vec::new());
    let mut rounds = 0;
    for r in runs {
        let rep = r.await??;
        rounds += rep.rounds;
        lat.extend(rep.latencies);
        coord.extend(rep.coordinator_ns.into_iter().map(Duration::from_nanos));
    }
    let wall = start.elapsed();
    drop(clients);
    let _ = tokio::time::timeout(Duration::from_secs(20), coordinator.stop()).await;
    let pct = |v: &[Duration], q: f64| quantile(v, q).unwrap_or_default();
    Ok(Row {
        window_ms: window.as_secs_f64() * 1e3,
        sessions,
        rounds,
        wall,
        p50: pct(&lat, 0.5),
        p99: pct(&lat, 0.99),
        coord_p50: pct(&coord, 0.5),
        coord_p99: pct(&coord, 0.99),
    })
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let windows: Vec<f64> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let windows = if windows.is_empty() {
        vec![2.0, 0.0]
    } else {
        windows
    };
    println!(
        "| batch window ms | sessions | rounds | wall s | rounds/s | round p50 ms | round p99 ms | in-coordinator p50 ms | in-coordinator p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for w in windows {
        for n in [10, 100, 1000] {
            let r = run(Duration::from_secs_f64(w / 1e3), n).await?;
            println!(
                "| {} | {} | {} | {:.2} | {:.0} | {} | {} | {} | {} |",
                r.window_ms,
                r.sessions,
                r.rounds,
                r.wall.as_secs_f64(),
                r.rounds as f64 / r.wall.as_secs_f64(),
                ms(r.p50),
                ms(r.p99),
                ms(r.coord_p50),
                ms(r.coord_p99),
            );
        }
    }
    Ok(())
}
