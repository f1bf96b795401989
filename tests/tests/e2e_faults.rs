//! Faults in the middle of a generation: the answer completes and equals the uninterrupted one
//! (no committed token lost or duplicated).
//!
//! - a verify node dies (a second one is present): its sessions fail over and resync;
//! - the draft node's link to the coordinator is cut for a few seconds: the stream resumes;
//! - the coordinator restarts: verify nodes re-register, sessions resync.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use edgespec::client::{stream_chat, ChatOutcome, ChatRequest};
use edgespec::cluster::{
    ClusterOptions, DraftSpec, LocalCluster, PolicyOverrides, LOCAL_ADMIN_TOKEN,
};
use edgespec::linkemu::LinkProfile;
use edgespec_tests::{qwen_pair, target_only_greedy, PROMPTS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const MAX_TOKENS: u32 = 48;

fn request() -> ChatRequest {
    ChatRequest {
        prompt: PROMPTS[0].to_string(),
        max_tokens: MAX_TOKENS,
        temperature: 0.0,
        seed: None,
        top_k: None,
    }
}

/// Starts a streamed request; the receiver gets the number of text pieces seen so far.
fn start_stream(
    base: String,
) -> (
    JoinHandle<Result<ChatOutcome>>,
    mpsc::UnboundedReceiver<usize>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut pieces = 0;
        stream_chat(&reqwest::Client::new(), &base, &request(), move |_| {
            pieces += 1;
            let _ = tx.send(pieces);
        })
        .await
    });
    (task, rx)
}

/// Waits until the stream has produced `n` pieces of text (bounded by a deadline).
async fn wait_pieces(rx: &mut mpsc::UnboundedReceiver<usize>, n: usize) -> Result<()> {
    edgespec_tests::init_logs();
    let deadline = tokio::time::sleep(Duration::from_secs(120));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            got = rx.recv() => match got {
                Some(k) if k >= n => return Ok(()),
                Some(_) => {}
                None => bail!("the stream ended before {n} pieces of text"),
            },
            _ = &mut deadline => bail!("no {n} pieces of text within the deadline"),
        }
    }
}

/// Verify node id serving the first session, from the admin API.
async fn serving_verifier(cluster: &LocalCluster) -> Result<String> {
    let v: serde_json::Value = reqwest::Client::new()
        .get(cluster.admin_url("/admin/v1/sessions"))
        .bearer_auth(LOCAL_ADMIN_TOKEN)
        .send()
        .await?
        .json()
        .await?;
    v["sessions"][0]["verifier"]
        .as_str()
        .map(str::to_string)
        .context("no placed session in /admin/v1/sessions")
}

/// The uninterrupted answer (target-only greedy) and cluster options on the real pair.
async fn reference_and_options() -> Result<(String, ClusterOptions)> {
    let (target, draft) = qwen_pair()?;
    let t = target.clone();
    let reference = tokio::task::spawn_blocking(move || {
        target_only_greedy(&t, PROMPTS[0], MAX_TOKENS as usize)
    })
    .await??;
    Ok((reference, ClusterOptions::new(target, draft)))
}

fn fixed_gamma() -> PolicyOverrides {
    PolicyOverrides {
        gamma_bounds: Some((3, 3)),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_node_death_mid_generation_fails_over_without_loss() -> Result<()> {
    edgespec_tests::init_logs();
    let (reference, mut opts) = reference_and_options().await?;
    opts.verify_nodes = 2;
    opts.policy = fixed_gamma();
    let mut cluster = LocalCluster::start(opts).await?;

    let (task, mut rx) = start_stream(cluster.openai_base());
    wait_pieces(&mut rx, 3).await?;
    let victim = serving_verifier(&cluster).await?;
    let index: usize = victim
        .strip_prefix("verify-")
        .and_then(|i| i.parse().ok())
        .with_context(|| format!("unexpected verifier id {victim}"))?;
    cluster.kill_verify_node(index).await?;

    let out = task.await??;
    assert_eq!(out.text, reference, "output changed by the failover");
    let now = serving_verifier(&cluster).await.ok();
    assert_ne!(
        now.as_deref(),
        Some(victim.as_str()),
        "session still on the dead node"
    );
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
    }];
    let cluster = LocalCluster::start(opts).await?;
    let link = cluster.drafts[0].link.clone().context("draft link")?;

    let (task, mut rx) = start_stream(cluster.openai_base());
    wait_pieces(&mut rx, 3).await?;
    link.cut();
    // The outage itself: long enough for the draft node to notice and retry a few times.
    tokio::time::sleep(Duration::from_secs(3)).await;
    link.restore();

    let out = task.await??;
    assert_eq!(out.text, reference, "output changed by the link outage");
    assert!(
        link.stats().connections_accepted >= 2,
        "the draft node never reconnected"
    );
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_restart_mid_generation_loses_nothing() -> Result<()> {
    edgespec_tests::init_logs();
    let (reference, mut opts) = reference_and_options().await?;
    opts.policy = fixed_gamma();
    let mut cluster = LocalCluster::start(opts).await?;

    let (task, mut rx) = start_stream(cluster.openai_base());
    wait_pieces(&mut rx, 3).await?;
    cluster.restart_coordinator().await?;

    let out = task.await??;
    assert_eq!(
        out.text, reference,
        "output changed by the coordinator restart"
    );
    assert_eq!(out.finish_reason.as_deref(), Some("length"));
    cluster.stop().await
}
