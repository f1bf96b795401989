//! Faults in the middle of a generation: the answer completes with exactly the uninterrupted
//! token ids (no committed token lost or duplicated), and each test proves that its fault landed
//! while the answer was being produced:
//!
//! - a verify node dies (a second one is present): the session is seen on the other node while
//!   the answer is still streaming, and the draft node resynced;
//! - the draft node's link to the coordinator is cut: the draft node is refused while trying to
//!   reconnect, the answer is still open when the link comes back, it reconnects and resyncs;
//! - the coordinator restarts: the new coordinator verifies rounds of the answer, which resynced.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use edgespec::client::{ChatOutcome, ChatRequest};
use edgespec::cluster::{
    ClusterOptions, DraftSpec, LocalCluster, PolicyOverrides, LOCAL_ADMIN_TOKEN,
};
use edgespec::linkemu::LinkProfile;
use edgespec_tests::{qwen_pair, stream_counting, target_only_greedy_ids, wait_pieces, PROMPTS};
use tokio::task::JoinHandle;

const MAX_TOKENS: u32 = 48;
/// Pieces of text to see before the fault (the answer is under way).
const BEFORE_FAULT: usize = 3;
/// Bound on every wait for the system (a CPU shared with other tests is slow).
const DEADLINE: Duration = Duration::from_secs(120);

fn request() -> ChatRequest {
    ChatRequest {
        prompt: PROMPTS[0].to_string(),
        max_tokens: MAX_TOKENS,
        temperature: 0.0,
        seed: None,
        top_k: None,
        ..Default::default()
    }
}

/// Polls `probe` until it yields a value, while the answer is still streaming: fails when the
/// answer ends first (the condition was not met mid-answer) or at the deadline.
async fn while_streaming<T, F, Fut>(
    task: &JoinHandle<Result<ChatOutcome>>,
    what: &str,
    mut probe: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        ensure!(
            !task.is_finished(),
            "the answer ended before {what}: the fault did not land mid-answer"
        );
        if let Some(v) = probe().await? {
            return Ok(v);
        }
        ensure!(
            tokio::time::Instant::now() < until,
            "no {what} within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The verify node of the (only) open session, from the admin API; `None` when no session is
/// open or it is not placed.
async fn serving_verifier(cluster: &LocalCluster) -> Result<Option<String>> {
    let v: serde_json::Value = cluster
        .admin_client()
        .get(cluster.admin_url("/admin/v1/sessions"))
        .bearer_auth(LOCAL_ADMIN_TOKEN)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(v["sessions"][0]["verifier"].as_str().map(str::to_string))
}

/// A counter of the coordinator's `/metrics`.
async fn coordinator_counter(cluster: &LocalCluster, name: &str) -> Result<f64> {
    let text = cluster
        .admin_client()
        .get(cluster.admin_url("/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("no {name} in the coordinator's metrics"))
}

/// The uninterrupted answer (target-only greedy ids, computed once for all tests) and cluster
/// options on the real pair.
async fn reference_and_options() -> Result<(Vec<u32>, ClusterOptions)> {
    static REFERENCE: OnceLock<Result<Vec<u32>, String>> = OnceLock::new();
    let (target, draft) = qwen_pair()?;
    let t = target.clone();
    let reference = tokio::task::spawn_blocking(move || {
        REFERENCE
            .get_or_init(|| {
                target_only_greedy_ids(&t, PROMPTS[0], MAX_TOKENS as usize)
                    .map_err(|e| format!("{e:#}"))
            })
            .clone()
    })
    .await?
    .map_err(|e| anyhow!(e))?;
    Ok((reference, ClusterOptions::new(target, draft)))
}

fn fixed_gamma() -> PolicyOverrides {
    PolicyOverrides {
        gamma_bounds: Some((3, 3)),
        ..Default::default()
    }
}

/// The answer's ids equal the reference's and the draft node resent its history at least once.
fn check_answer(out: &ChatOutcome, reference: &[u32], fault: &str) -> Result<()> {
    assert_eq!(out.token_ids, reference, "token ids changed by the {fault}");
    let resyncs = out
        .stat("resyncs")
        .with_context(|| format!("no resyncs in the statistics {:?}", out.stats))?;
    assert!(
        resyncs >= 1.0,
        "no resync during the answer: the {fault} did not reach it; stats {:?}",
        out.stats
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_node_death_mid_generation_fails_over_without_loss() -> Result<()> {
    edgespec_tests::init_logs();
    let (reference, mut opts) = reference_and_options().await?;
    opts.verify_nodes = 2;
    opts.policy = fixed_gamma();
    let mut cluster = LocalCluster::start(opts).await?;

    let (task, mut rx) = stream_counting(cluster.openai_base(), request());
    wait_pieces(&mut rx, BEFORE_FAULT, DEADLINE).await?;
    let victim = while_streaming(&task, "the session was placed", || {
        serving_verifier(&cluster)
    })
    .await?;
    let index: usize = victim
        .strip_prefix("verify-")
        .and_then(|i| i.parse().ok())
        .with_context(|| format!("unexpected verifier id {victim}"))?;
    cluster.kill_verify_node(index).await?;
    // The switch, seen while the answer is still streaming.
    let survivor = while_streaming(&task, "the session moved off the dead node", || async {
        Ok(serving_verifier(&cluster).await?.filter(|v| *v != victim))
    })
    .await?;

    let out = task.await??;
    check_answer(&out, &reference, "failover")?;
    assert_ne!(survivor, victim);
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_draft_link_resumes_the_stream() -> Result<()> {
    edgespec_tests::init_logs();
    let (reference, mut opts) = reference_and_options().await?;
    opts.policy = fixed_gamma();
    opts.drafts = vec![DraftSpec {
        link: Some(LinkProfile::delay(Duration::from_millis(5))),
        pipelined: false,
        ..Default::default()
    }];
    let cluster = LocalCluster::start(opts).await?;
    let link = cluster.drafts[0].link.clone().context("draft link")?;

    let (task, mut rx) = stream_counting(cluster.openai_base(), request());
    wait_pieces(&mut rx, BEFORE_FAULT, DEADLINE).await?;
    let accepted_before = link.stats().connections_accepted;
    link.cut();
    // The outage lasts until the draft node has noticed it and tried to reconnect; the answer
    // cannot end meanwhile (no verdict crosses a cut link), so it must still be open.
    while_streaming(&task, "the draft node tried to reconnect", || async {
        Ok((link.stats().connections_refused >= 1).then_some(()))
    })
    .await?;
    link.restore();

    let out = task.await??;
    check_answer(&out, &reference, "link outage")?;
    assert!(
        link.stats().connections_accepted > accepted_before + link.stats().connections_refused,
        "the draft node never reconnected: {:?}",
        link.stats()
    );
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_restart_mid_generation_loses_nothing() -> Result<()> {
    edgespec_tests::init_logs();
    let (reference, mut opts) = reference_and_options().await?;
    opts.policy = fixed_gamma();
    let mut cluster = LocalCluster::start(opts).await?;

    let (task, mut rx) = stream_counting(cluster.openai_base(), request());
    wait_pieces(&mut rx, BEFORE_FAULT, DEADLINE).await?;
    cluster.restart_coordinator().await?;

    let out = task.await??;
    check_answer(&out, &reference, "coordinator restart")?;
    assert_eq!(out.finish_reason.as_deref(), Some("length"));
    // The new coordinator (fresh metrics) verified rounds of this answer: it was still going.
    let rounds = coordinator_counter(&cluster, "edgespec_coordinator_rounds_total").await?;
    assert!(
        rounds >= 1.0,
        "the restarted coordinator verified no round: the answer ended before the restart"
    );
    cluster.stop().await
}
