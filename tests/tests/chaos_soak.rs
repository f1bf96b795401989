//! The short chaos soak (`edgespec bench chaos` is the long one): the real binaries as child
//! processes on tiny synthetic models — 2 coordinators, 3 verify nodes, 2 draft nodes behind
//! link emulators, 64 concurrent streams — under a seeded schedule of kill -9 and restart of
//! verify nodes and coordinators, cut and blackholed draft links and SIGSTOPped verify nodes.
//! Every completed answer must equal the target-only reference token for token.
//!
//! `EDGESPEC_CHAOS_SECS` sets the duration (default 60 s), `EDGESPEC_CHAOS_SEED` the seed.

use std::time::Duration;

use anyhow::{ensure, Result};
use edgespec::chaos::{run, ChaosOptions, FAULTS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_survive_a_minute_of_random_hard_faults_token_for_token() -> Result<()> {
    edgespec_tests::init_logs();
    let env = |k: &str, default: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let dir = tempfile::tempdir()?;
    let opts = ChaosOptions {
        duration: Duration::from_secs(env("EDGESPEC_CHAOS_SECS", 60)),
        seed: env("EDGESPEC_CHAOS_SEED", 7),
        streams: 64,
        max_tokens: 24,
        dir: dir.path().to_path_buf(),
    };
    let report = run(&opts).await?;
    println!("{}", report.markdown(&opts));
    ensure!(
        report.mismatched == 0,
        "{} completed answers differ from the reference (lost or duplicated tokens)",
        report.mismatched
    );
    ensure!(
        report.completed >= 64,
        "too few answers completed: {report:?}"
    );
    for kind in FAULTS {
        ensure!(
            report.faults.get(kind).copied().unwrap_or(0) >= 1,
            "the schedule never injected `{kind}`: {:?}",
            report.faults
        );
    }
    ensure!(
        report.resyncs >= 1,
        "no answer was hit by a fault: {report:?}"
    );
    ensure!(
        report.accepted > 0 && report.accepted < report.drafted,
        "the soak must both accept and reject drafts: {report:?}"
    );
    Ok(())
}
