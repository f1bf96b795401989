//! Tenant isolation on a shared verify node: the sessions of two coordinators (or of one
//! coordinator before and after a restart) never share KV state, even when both number their
//! sessions the same way, and a verify node that stops drains itself through its coordinators.
//!
//! Real processes' parts in-process: coordinators, a verify node and draft nodes on
//! `127.0.0.1:0`, real gRPC, SmolLM2-135M as target and draft (fast; draft = target keeps both
//! sessions in lock-step, so their committed lengths stay equal round after round — the case in
//! which a shared slot silently continues the other user's context).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use edgespec::client::{stream_chat, ChatOutcome, ChatRequest};
use edgespec_model::{ChatMessage, TextTokenizer};
use edgespec_proto::pb::verifier_client::VerifierClient;
use edgespec_proto::pb::InfoRequest;
use edgespec_proto::tls::TlsSettings;
use edgespec_tests::{smollm, target_only_greedy};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const MAX_TOKENS: u32 = 40;

/// A running node: cancel `stop` and await `task` to stop it.
struct Running {
    stop: CancellationToken,
    task: JoinHandle<Result<()>>,
}

impl Running {
    async fn stop(self) -> Result<()> {
        self.stop.cancel();
        self.task.await?
    }
}

fn spawn<F>(run: impl FnOnce(tokio_util::sync::WaitForCancellationFutureOwned) -> F) -> Running
where
    F: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(stop.clone().cancelled_owned()));
    Running { stop, task }
}

/// A plaintext coordinator on `grpc` (port 0: any) with a fixed γ of 2.
async fn coordinator(grpc: SocketAddr) -> Result<(SocketAddr, Running)> {
    let mut cs = edgespec_coordinator::Settings::for_tests();
    cs.grpc.listen = grpc;
    cs.policy.gamma_min = 2;
    cs.policy.gamma_max = 2;
    cs.policy.initial_gamma = 2;
    let app = edgespec_coordinator::App::build(cs).await?;
    let addr = app.grpc_addr();
    Ok((addr, spawn(|stop| async move { Ok(app.run(stop).await?) })))
}

async fn verify_node(
    model: &std::path::Path,
    coordinators: &[SocketAddr],
) -> Result<(SocketAddr, Running)> {
    let mut vs = edgespec_verify_node::Settings::default();
    vs.model.path = model.to_path_buf();
    vs.server.listen = ([127, 0, 0, 1], 0).into();
    vs.server.node_id = "shared-verify".into();
    vs.server.drain_timeout = Duration::ZERO;
    vs.coordinator.addresses = coordinators.iter().map(|a| format!("http://{a}")).collect();
    vs.coordinator.heartbeat_interval = Duration::from_millis(100);
    vs.coordinator.retry_interval = Duration::from_millis(100);
    vs.tls = TlsSettings::plaintext();
    let app = edgespec_verify_node::App::build(vs).await?;
    let addr = app.grpc_addr();
    Ok((addr, spawn(|stop| async move { Ok(app.run(stop).await?) })))
}

async fn draft_node(model: &std::path::Path, coordinator: SocketAddr) -> Result<(String, Running)> {
    let mut ds = edgespec_draft_node::Settings::default();
    ds.model.path = model.to_path_buf();
    ds.http.listen = ([127, 0, 0, 1], 0).into();
    ds.coordinator.address = format!("http://{coordinator}");
    ds.coordinator.backoff_initial = Duration::from_millis(50);
    ds.tls = TlsSettings::plaintext();
    let app = edgespec_draft_node::App::build(ds).await?;
    let base = format!("http://{}/v1", app.http_addr());
    Ok((base, spawn(|stop| async move { Ok(app.run(stop).await?) })))
}

/// Live sessions the verify node holds (all coordinators together).
async fn live_sessions(verify: SocketAddr) -> Result<u32> {
    let mut c = VerifierClient::connect(format!("http://{verify}")).await?;
    let info = c.info(InfoRequest {}).await?.into_inner();
    Ok(info.load.map_or(0, |l| l.active_sessions))
}

/// Two prompts whose chat prompts have the same number of tokens (asserted).
fn equal_length_prompts(model: &std::path::Path) -> Result<[&'static str; 2]> {
    let prompts = [
        "Write a Python function that adds two numbers.",
        "Write a Python function that sorts a list.",
    ];
    let tok = TextTokenizer::from_gguf(model)?;
    let len = |p: &str| -> Result<usize> {
        Ok(tok.encode_chat(&[ChatMessage::new("user", p)], true)?.len())
    };
    ensure!(
        len(prompts[0])? == len(prompts[1])?,
        "the test needs prompts of equal token length: {} vs {}",
        len(prompts[0])?,
        len(prompts[1])?
    );
    Ok(prompts)
}

async fn ask(base: &str, prompt: &str) -> Result<ChatOutcome> {
    stream_chat(
        &reqwest::Client::new(),
        base,
        &ChatRequest {
            prompt: prompt.into(),
            max_tokens: MAX_TOKENS,
            ..Default::default()
        },
        |_| {},
    )
    .await
}

/// Reference answers (text and token count) by target-only greedy decoding.
async fn references(model: &std::path::Path, prompts: [&'static str; 2]) -> Result<Vec<String>> {
    let m = model.to_path_buf();
    tokio::task::spawn_blocking(move || {
        prompts
            .iter()
            .map(|p| target_only_greedy(&m, p, MAX_TOKENS as usize))
            .collect::<Result<Vec<_>>>()
    })
    .await?
}

/// Polls the verify node's live-session count while `work` runs; returns the work's output and
/// the highest count seen.
async fn watching<T>(
    verify: SocketAddr,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<(T, u32)> {
    let mut work = std::pin::pin!(work);
    let mut peak = 0;
    loop {
        tokio::select! {
            out = &mut work => return Ok((out?, peak)),
            () = tokio::time::sleep(Duration::from_millis(20)) => {
                peak = peak.max(live_sessions(verify).await.unwrap_or(0));
            }
        }
    }
}

fn check(out: &ChatOutcome, reference: &str, what: &str) -> Result<()> {
    ensure!(
        out.text == reference,
        "{what}: the answer differs from target-only greedy for its own prompt\n got: {:?}\nwant: {:?}",
        out.text,
        reference
    );
    ensure!(
        out.stat("accepted").unwrap_or(0.0) > 0.0,
        "{what}: no draft token was accepted, so the test did not speculate: {:?}",
        out.stats
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_sharing_a_verify_node_keep_their_sessions_apart() -> Result<()> {
    edgespec_tests::init_logs();
    let model = smollm()?;
    let prompts = equal_length_prompts(&model)?;
    let want = references(&model, prompts).await?;

    let any: SocketAddr = ([127, 0, 0, 1], 0).into();
    let (c1, coord1) = coordinator(any).await?;
    let (c2, coord2) = coordinator(any).await?;
    let (verify, vnode) = verify_node(&model, &[c1, c2]).await?;
    let (base1, d1) = draft_node(&model, c1).await?;
    let (base2, d2) = draft_node(&model, c2).await?;

    // Both coordinators number their first session 1: the same wire id, the same length.
    let ((a, b), peak) = watching(verify, async {
        tokio::try_join!(ask(&base1, prompts[0]), ask(&base2, prompts[1]))
    })
    .await?;
    check(&a, &want[0], "through coordinator 1")?;
    check(&b, &want[1], "through coordinator 2")?;
    ensure!(
        peak >= 2,
        "the verify node never held the two coordinators' sessions as two sessions (peak {peak})"
    );

    for n in [d1, d2, coord1, coord2, vnode] {
        n.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_never_touches_its_predecessors_sessions() -> Result<()> {
    edgespec_tests::init_logs();
    let model = smollm()?;
    let prompts = equal_length_prompts(&model)?;
    let want = references(&model, prompts).await?;

    let (grpc, coord) = coordinator(([127, 0, 0, 1], 0).into()).await?;
    let (verify, vnode) = verify_node(&model, &[grpc]).await?;
    let (base, draft) = draft_node(&model, grpc).await?;

    // The first instance opens session 1 on the verify node; it is stopped while the answer is
    // under way, so the node keeps that session's state (nobody releases it).
    let first = tokio::spawn({
        let base = base.clone();
        async move { ask(&base, prompts[0]).await }
    });
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    while live_sessions(verify).await? == 0 {
        ensure!(
            tokio::time::Instant::now() < until,
            "no session reached the verify node"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    coord.stop().await?;
    let orphans = live_sessions(verify).await?;
    ensure!(
        orphans >= 1,
        "the verify node forgot the old instance's session"
    );

    // A new instance on the same address numbers from 1 again. The draft node reconnects and
    // resyncs its session; a second request opens another one.
    let (_, coord) = coordinator(grpc).await?;
    let ((a, b), peak) = watching(verify, async {
        let second = ask(&base, prompts[1]);
        let first = async { first.await.context("first request task")? };
        tokio::try_join!(first, second)
    })
    .await?;
    check(&a, &want[0], "the request that crossed the restart")?;
    check(&b, &want[1], "a request on the new instance")?;
    // The old instance's state stayed where it was, beside the new instance's sessions.
    // Old state + the resynced session + the new one, all at once.
    ensure!(
        peak >= orphans + 2,
        "the new instance's sessions took over the old instance's slots (peak {peak}, \
         orphans {orphans})"
    );
    ensure!(
        live_sessions(verify).await? >= orphans,
        "the new instance released the old instance's sessions"
    );

    for n in [draft, coord, vnode] {
        n.stop().await?;
    }
    Ok(())
}
