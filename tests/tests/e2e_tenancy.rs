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
use edgespec_runtime::tls::TlsSettings;
use edgespec_tests::smollm;

const MAX_TOKENS: u32 = 40;

/// A running node: [`Running::close`] stops it.
type Running = edgespec_testkit::harness::Running<Result<()>>;

const ADMIN_TOKEN: &str = "tenancy-test";

/// A plaintext coordinator on `grpc` (port 0: any) with a fixed γ of 2.
async fn coordinator(grpc: SocketAddr) -> Result<(SocketAddr, Running)> {
    let (grpc, _, running) = coordinator_with_admin(grpc).await?;
    Ok((grpc, running))
}

/// [`coordinator`], also returning its admin HTTP address (token [`ADMIN_TOKEN`]).
async fn coordinator_with_admin(grpc: SocketAddr) -> Result<(SocketAddr, SocketAddr, Running)> {
    let mut cs = edgespec_coordinator::Settings::for_tests();
    cs.admin.token = ADMIN_TOKEN.into();
    cs.grpc.listen = grpc;
    cs.policy.gamma_min = 2;
    cs.policy.gamma_max = 2;
    cs.policy.initial_gamma = 2;
    let app = edgespec_coordinator::App::build(cs).await?;
    let (addr, admin) = (app.grpc_addr(), app.http_addr());
    Ok((
        addr,
        admin,
        Running::spawn(|stop| async move { Ok(app.run(stop).await?) }),
    ))
}

async fn verify_node(
    model: &std::path::Path,
    coordinators: &[SocketAddr],
) -> Result<(SocketAddr, Running)> {
    verify_node_as(model, coordinators, "shared-verify", Duration::ZERO).await
}

async fn verify_node_as(
    model: &std::path::Path,
    coordinators: &[SocketAddr],
    id: &str,
    drain_timeout: Duration,
) -> Result<(SocketAddr, Running)> {
    let mut vs = edgespec_verify_node::Settings::default();
    vs.model.path = model.to_path_buf();
    vs.server.listen = ([127, 0, 0, 1], 0).into();
    vs.server.node_id = id.into();
    vs.server.drain_timeout = drain_timeout;
    vs.coordinator.addresses = coordinators.iter().map(|a| format!("http://{a}")).collect();
    vs.coordinator.heartbeat_interval = Duration::from_millis(100);
    vs.coordinator.retry_interval = Duration::from_millis(100);
    vs.tls = TlsSettings::plaintext();
    let app = edgespec_verify_node::App::build(vs).await?;
    let addr = app.grpc_addr();
    Ok((
        addr,
        Running::spawn(|stop| async move { Ok(app.run(stop).await?) }),
    ))
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
    Ok((
        base,
        Running::spawn(|stop| async move { Ok(app.run(stop).await?) }),
    ))
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

/// Reference answers (token ids) by target-only greedy decoding, one token per forward.
async fn references(model: &std::path::Path, prompts: [&'static str; 2]) -> Result<Vec<Vec<u32>>> {
    edgespec_testkit::reference::references(model, &prompts, MAX_TOKENS as usize).await
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

fn check(out: &ChatOutcome, reference: &[u32], what: &str) -> Result<()> {
    ensure!(
        out.token_ids == reference,
        "{what}: the answer's token ids differ from target-only greedy for its own prompt\n \
         got: {:?}\nwant: {:?}",
        out.token_ids,
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
        n.close().await?;
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
    coord.close().await?;
    let orphans = live_sessions(verify).await?;
    ensure!(
        orphans >= 1,
        "the verify node forgot the old instance's session"
    );

    // A new instance on the same address numbers from 1 again. The draft node reconnects and
    // resyncs its session; a second request opens another one.
    let (_, coord) = coordinator(grpc).await?;
    let second = ask(&base, prompts[1]);
    let first = async { first.await.context("first request task")? };
    let (a, b) = tokio::try_join!(first, second)?;
    check(&a, &want[0], "the request that crossed the restart")?;
    check(&b, &want[1], "a request on the new instance")?;
    // The new instance numbered its sessions from 1 again and released them when they ended;
    // the old instance's state must still be there, untouched (had the node keyed sessions by
    // the bare id, the new session 1 would have reused and then released the old one's slot).
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut live = live_sessions(verify).await?;
    while live != orphans && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
        live = live_sessions(verify).await?;
    }
    ensure!(
        live == orphans,
        "after the new instance's sessions ended the node holds {live} sessions; the old \
         instance left {orphans}"
    );

    for n in [draft, coord, vnode] {
        n.close().await?;
    }
    Ok(())
}

/// The verify nodes in the coordinator's admin view: (id, health, admin state).
async fn nodes(admin: SocketAddr) -> Result<Vec<(String, String, String)>> {
    let v: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{admin}/admin/v1/nodes"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?
        .json()
        .await?;
    Ok(v["verifiers"]
        .as_array()
        .context("verifiers")?
        .iter()
        .map(|n| {
            let s = |k: &str| n[k].as_str().unwrap_or_default().to_string();
            (s("id"), s("health"), s("admin"))
        })
        .collect())
}

/// A verify node that is stopped (SIGTERM's path) drains itself: it tells the coordinator over
/// its own heartbeat, which moves the session to the other node at its next block, and it
/// exits only once it holds none. No admin token involved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_verify_node_drains_itself_through_its_coordinator() -> Result<()> {
    edgespec_tests::init_logs();
    let model = smollm()?;
    let prompt = "Write a Python function that adds two numbers.";
    let want = references(&model, [prompt, prompt]).await?;

    let (grpc, admin, coord) = coordinator_with_admin(([127, 0, 0, 1], 0).into()).await?;
    let drain = Duration::from_secs(60);
    let (va, node_a) = verify_node_as(&model, &[grpc], "verify-a", drain).await?;
    let (vb, node_b) = verify_node_as(&model, &[grpc], "verify-b", drain).await?;
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    while nodes(admin).await?.iter().filter(|n| n.1 == "up").count() < 2 {
        ensure!(
            tokio::time::Instant::now() < until,
            "verify nodes did not register"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (base, draft) = draft_node(&model, grpc).await?;

    let answer = tokio::spawn({
        let base = base.clone();
        async move { ask(&base, prompt).await }
    });
    // Stop whichever node holds the session, mid-answer.
    let (holder, holder_id, other, mut remaining) = loop {
        ensure!(
            tokio::time::Instant::now() < until,
            "no session reached a verify node"
        );
        let (a, b) = (live_sessions(va).await?, live_sessions(vb).await?);
        if a > 0 {
            break (node_a, "verify-a", vb, Some(node_b));
        }
        if b > 0 {
            break (node_b, "verify-b", va, Some(node_a));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    ensure!(
        !answer.is_finished(),
        "the answer ended before the node was stopped"
    );
    let stopping = tokio::spawn(holder.close());
    let mut moved = 0;
    while !stopping.is_finished() {
        moved = moved.max(live_sessions(other).await.unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stopping.await??;
    // The answer goes on, on the other node.
    while !answer.is_finished() {
        moved = moved.max(live_sessions(other).await.unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let state = nodes(admin)
        .await?
        .into_iter()
        .find(|n| n.0 == holder_id)
        .context("the stopped node left the registry at once")?;
    ensure!(
        state.2 == "draining",
        "the coordinator did not drain {holder_id}: {state:?}"
    );
    ensure!(
        moved >= 1,
        "the session never reached the other node while {holder_id} drained"
    );
    let out = answer.await??;
    check(&out, &want[0], "the answer whose verify node drained")?;

    for n in [Some(draft), Some(coord), remaining.take()]
        .into_iter()
        .flatten()
    {
        n.close().await?;
    }
    Ok(())
}
