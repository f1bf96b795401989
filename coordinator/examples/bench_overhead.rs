//! Coordinator overhead benchmark with no-model (scripted) verify nodes: rounds per second and
//! the per-round latency the coordinator path adds, at 10, 100 and 1000 concurrent sessions.
//!
//! Everything runs in process on loopback; the scripted verifiers answer at once, so the
//! measured round time is pure overhead: draft stream → coordinator (batching window,
//! placement, γ) → Verify gRPC → back. Bounded: every session runs a fixed token budget.
//!
//! `cargo run --release -p edgespec-coordinator --example bench_overhead [-- <window-ms>...]`

use edgespec_coordinator::testing::{
    DraftClient, ScriptedVerifier, ScriptedVerifierConfig, SessionScript,
};
use edgespec_coordinator::{App, Settings};
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

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn run(window: Duration, sessions: usize) -> anyhow::Result<Row> {
    let mut s = Settings::for_tests();
    s.admin.token = "bench".into();
    s.policy.batch_window = window;
    s.policy.max_batch_tokens = 4096;
    s.admission.max_queued_tokens_per_node = 1 << 20;
    let app = App::build(s).await?;
    let url = format!("http://{}", app.grpc_addr());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run(async move {
        let _ = stop_rx.await;
    }));
    let mut verifiers = Vec::new();
    for (i, pool) in ["onprem", "onprem"].iter().enumerate() {
        let mut cfg = ScriptedVerifierConfig::new(&format!("v{i}"), pool, &url);
        cfg.capacity = 4096;
        verifiers.push(ScriptedVerifier::start(cfg).await?);
    }
    // Wait (bounded) until the verifiers registered.
    let deadline = Instant::now() + Duration::from_secs(10);
    while verifiers.iter().any(|v| v.registrations() == 0) {
        anyhow::ensure!(Instant::now() < deadline, "verifiers did not register");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
        let rep = r.await?.map_err(anyhow::Error::msg)?;
        rounds += rep.rounds;
        lat.extend(rep.latencies);
        coord.extend(rep.coordinator_ns.into_iter().map(Duration::from_nanos));
    }
    let wall = start.elapsed();
    let _ = stop_tx.send(());
    drop(clients);
    let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
    Ok(Row {
        window_ms: window.as_secs_f64() * 1e3,
        sessions,
        rounds,
        wall,
        p50: pct(&mut lat, 0.5),
        p99: pct(&mut lat, 0.99),
        coord_p50: pct(&mut coord, 0.5),
        coord_p99: pct(&mut coord, 0.99),
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
