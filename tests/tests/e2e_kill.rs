//! Hard faults on the real binaries, run as child processes: a verify node `SIGKILL`ed
//! mid-answer, the coordinator `SIGKILL`ed and a new one started on the same address, and the
//! draft node's link blackholed (packets dropped, no reset) mid-answer. Each answer must equal
//! an independent single-token target-only reference, token id for token id, and each test
//! proves its fault landed during the stream (the answer was still going, and the draft node
//! resynced).
//!
//! SmolLM2-135M serves as target and draft (fast); γ is fixed at 3.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use edgespec::client::{ChatOutcome, ChatRequest};
use edgespec::linkemu::{CutMode, LinkControl, LinkEmulator, LinkProfile};
use edgespec::procs::{
    admin_get, coordinator_env, draft_env, free_addr, verify_env, wait_fleet, NodeProcess, Role,
};
use edgespec_testkit::reference::references;
use edgespec_tests::{smollm, stream_counting, wait_pieces};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The tests of this file run one at a time: each starts three or four model processes, and
/// together on two cores they would only measure the machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const PROMPT: &str = "Write a Rust function that reverses a string, with a doc comment.";
const MAX_TOKENS: u32 = 64;

async fn reference() -> Result<Vec<u32>> {
    let model = smollm()?;
    Ok(references(&model, &[PROMPT], MAX_TOKENS as usize)
        .await?
        .remove(0))
}

/// Starts the answer and waits until it is under way (3 pieces of text), or says how it ended.
async fn answer_under_way(http: SocketAddr) -> Result<JoinHandle<Result<ChatOutcome>>> {
    let req = ChatRequest {
        prompt: PROMPT.into(),
        max_tokens: MAX_TOKENS,
        ..Default::default()
    };
    let (answer, mut pieces) = stream_counting(format!("http://{http}/v1"), req);
    if let Err(e) = wait_pieces(&mut pieces, 3, Duration::from_secs(120)).await {
        if answer.is_finished() {
            bail!("{e}: the answer ended with {:?}", answer.await?);
        }
        return Err(e);
    }
    ensure!(!answer.is_finished(), "the answer ended before the fault");
    Ok(answer)
}

/// Coordinator, one verify node and a draft node (dialling `via`, or the coordinator), up.
struct SmallFleet {
    coordinator: NodeProcess,
    _verify: NodeProcess,
    _draft: NodeProcess,
    http: SocketAddr,
}

/// Starts a [`SmallFleet`]; `link` puts a link emulator (in this process) between the draft
/// node and the coordinator and returns its control.
async fn small_fleet(
    model: &std::path::Path,
    link: Option<&CancellationToken>,
) -> Result<(SmallFleet, Option<LinkControl>)> {
    let (grpc, admin) = (free_addr()?, free_addr()?);
    let mut coordinator = NodeProcess::start(Role::Coordinator, &coordinator_env(grpc, admin, 3))?;
    let mut verify = NodeProcess::start(
        Role::Verify,
        &verify_env("verify-a", model, free_addr()?, &[grpc]),
    )?;
    let (dial, control) = match link {
        Some(stop) => {
            // Not port 0: the kernel could hand this listener a port that `free_addr` gave a
            // node process which has not bound it yet.
            let listener = tokio::net::TcpListener::bind(free_addr()?).await?;
            let dial = listener.local_addr()?;
            let (_task, control) = LinkEmulator::spawn(
                listener,
                grpc,
                LinkProfile::delay(Duration::from_millis(2)),
                stop.clone().cancelled_owned(),
            )?;
            (dial, Some(control))
        }
        None => (grpc, None),
    };
    let http = free_addr()?;
    let mut draft = NodeProcess::start(Role::Draft, &draft_env("draft-0", model, http, dial))?;
    wait_fleet(
        admin,
        1,
        1,
        &mut [&mut coordinator, &mut verify, &mut draft],
    )
    .await?;
    Ok((
        SmallFleet {
            coordinator,
            _verify: verify,
            _draft: draft,
            http,
        },
        control,
    ))
}

/// Checks the answer against the reference and that the draft node resynced during it.
fn check(out: &ChatOutcome, reference: &[u32], fault: &str) -> Result<()> {
    ensure!(
        out.token_ids == reference,
        "{fault}: token ids differ from target-only decoding\n got: {:?}\nwant: {:?}",
        out.token_ids,
        reference
    );
    let resyncs = out.stat("resyncs").unwrap_or(0.0);
    ensure!(
        resyncs >= 1.0,
        "{fault}: the answer never resynced, so the fault did not hit it: {:?}",
        out.stats
    );
    ensure!(
        out.stat("accepted").unwrap_or(0.0) > 0.0,
        "{fault}: nothing was speculated: {:?}",
        out.stats
    );
    Ok(())
}

/// The verify node serving the first session, from the coordinator's admin API.
async fn serving_verifier(admin: SocketAddr) -> Result<String> {
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = admin_get(admin, "/admin/v1/sessions").await?;
        if let Some(node) = v["sessions"]
            .as_array()
            .and_then(|a| a.first())
            .and_then(|s| s["verifier"].as_str())
        {
            return Ok(node.to_string());
        }
        ensure!(
            tokio::time::Instant::now() < until,
            "no session was placed: {v}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_serving_verify_node_loses_nothing() -> Result<()> {
    edgespec_tests::init_logs();
    let _serial = ONE_AT_A_TIME.lock().await;
    let model = smollm()?;
    let want = reference().await?;
    let (grpc, admin) = (free_addr()?, free_addr()?);
    let mut coordinator = NodeProcess::start(Role::Coordinator, &coordinator_env(grpc, admin, 3))?;
    let mut verifiers = Vec::new();
    for id in ["verify-a", "verify-b"] {
        let env = verify_env(id, &model, free_addr()?, &[grpc]);
        verifiers.push((id, NodeProcess::start(Role::Verify, &env)?));
    }
    let http = free_addr()?;
    let mut draft = NodeProcess::start(Role::Draft, &draft_env("draft-0", &model, http, grpc))?;
    {
        let mut procs: Vec<&mut NodeProcess> = vec![&mut coordinator, &mut draft];
        procs.extend(verifiers.iter_mut().map(|(_, p)| p));
        wait_fleet(admin, 2, 1, &mut procs).await?;
    }

    let answer = answer_under_way(http).await?;
    let serving = serving_verifier(admin).await?;
    let (_, victim) = verifiers
        .iter_mut()
        .find(|(id, _)| *id == serving)
        .context("the serving node is one of ours")?;
    victim.kill().await?;

    let out = answer.await??;
    check(&out, &want, "verify node SIGKILL")?;
    // The session finished on the survivor (the coordinator saw the victim go down).
    let nodes = admin_get(admin, "/admin/v1/nodes").await?;
    let down = nodes["verifiers"]
        .as_array()
        .context("verifiers")?
        .iter()
        .any(|n| n["id"].as_str() == Some(serving.as_str()) && n["health"] == "down");
    ensure!(down, "the killed node is not marked down: {nodes}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_coordinator_and_a_new_one_on_its_address_loses_nothing() -> Result<()> {
    edgespec_tests::init_logs();
    let _serial = ONE_AT_A_TIME.lock().await;
    let model = smollm()?;
    let want = reference().await?;
    let (mut fleet, _) = small_fleet(&model, None).await?;
    let answer = answer_under_way(fleet.http).await?;
    let coordinator = &mut fleet.coordinator;
    coordinator.kill().await?;
    // A new process (empty state) on the same addresses: the verify node re-registers, the
    // draft node reconnects and resyncs its session from its own committed tokens.
    coordinator.restart()?;

    let out = answer.await??;
    check(&out, &want, "coordinator SIGKILL + restart")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_draft_link_loses_nothing() -> Result<()> {
    edgespec_tests::init_logs();
    let _serial = ONE_AT_A_TIME.lock().await;
    let model = smollm()?;
    let want = reference().await?;
    let stop = CancellationToken::new();
    let (fleet, link) = small_fleet(&model, Some(&stop)).await?;
    let link = link.context("the fleet has a link")?;
    let answer = answer_under_way(fleet.http).await?;
    link.cut_with(CutMode::Blackhole);
    // Silence, not a reset: nothing moves while the link is a blackhole.
    let before = link.stats();
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        !answer.is_finished(),
        "the answer finished through a blackhole"
    );
    ensure!(
        link.stats().bytes_down == before.bytes_down,
        "bytes crossed the blackhole"
    );
    link.restore();

    let out = answer.await??;
    check(&out, &want, "draft link blackhole")?;
    ensure!(
        link.stats().connections_accepted >= 2,
        "the draft node never reconnected"
    );
    stop.cancel();
    Ok(())
}
