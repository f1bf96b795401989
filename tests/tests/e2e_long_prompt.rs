//! A long prompt next to a short one with `verify.timeout = 2s`, where the long prompt's
//! prefill in one forward takes longer than that (issue 15 item 1): the verify node prefills
//! it in chunks between the short request's rounds, the coordinator gives the long prefill a
//! deadline that grows with its length, so the node is never marked down, the short request
//! completes with the target-only tokens, and the long one completes (also exactly) or fails
//! with a clear error within the request timeout.
//!
//! With chunking disabled (`batching.max_prefill_tokens` huge) the short request's batch waits
//! behind the one-shot prefill past its 2 s deadline and the node is marked down: this test
//! fails.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use edgespec::client::{stream_chat, ChatOutcome, ChatRequest};
use edgespec_model::synthetic::{TinySpec, TinyWeights};
use edgespec_model::{ChatMessage, TextTokenizer};
use edgespec_testkit::fleet::{AdminApi, FleetWait};
use edgespec_testkit::harness::Running;
use edgespec_testkit::reference::greedy_continuation;
use edgespec_testkit::tiny::TinyModel;

const TOKEN: &str = "long-prompt-test";
const MAX_TOKENS: u32 = 6;
/// Prefill tokens per forward on the verify node.
const MAX_PREFILL_TOKENS: usize = 64;
/// How long the long prompt's prefill must take in one forward (well over `verify.timeout`).
const ONE_SHOT_AT_LEAST: Duration = Duration::from_secs(4);
/// Bound on each request, as a client would set it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(150);
const CONTEXT: usize = 32_768;

/// A target heavy enough that a few thousand prompt tokens take seconds to prefill on a CPU.
fn target_spec() -> TinySpec {
    TinySpec {
        seed: 21,
        n_layer: 4,
        hidden: 128,
        n_head: 4,
        n_kv_head: 2,
        ffn: 256,
        context_length: CONTEXT,
        ..TinySpec::default()
    }
}

/// The chat prompt's token ids, as the draft node encodes them.
fn encode(tok: &TextTokenizer, prompt: &str) -> Result<Vec<u32>> {
    Ok(tok.encode_chat(&[ChatMessage::new("user", prompt)], true)?)
}

/// Target-only greedy ids of `ids` on `target`, and how long it took.
fn reference(target: &Path, tok: &TextTokenizer, ids: &[u32]) -> Result<(Vec<u32>, Duration)> {
    let mut lm = edgespec_model::forward::load_gguf(target, edgespec_model::DeviceKind::Cpu)?;
    let started = Instant::now();
    let out = greedy_continuation(
        lm.as_mut(),
        1,
        ids,
        MAX_TOKENS as usize,
        tok.eos_token_ids(),
    )?;
    Ok((out, started.elapsed()))
}

/// A long prompt whose target-only prefill takes at least [`ONE_SHOT_AT_LEAST`] here (doubling
/// its length until it does), with its reference ids.
fn long_prompt(target: &Path, tok: &TextTokenizer) -> Result<(String, Vec<u32>)> {
    let mut words = 500;
    loop {
        let text: String = (0..words)
            .map(|i| format!("w{} ", i % 97))
            .collect::<String>();
        let ids = encode(tok, &text)?;
        ensure!(
            ids.len() < 16_000,
            "no prompt within 16k tokens is slow enough"
        );
        let (reference, took) = reference(target, tok, &ids)?;
        if took >= ONE_SHOT_AT_LEAST {
            eprintln!("long prompt: {} tokens, {took:?} target-only", ids.len());
            return Ok((text, reference));
        }
        words = words * 3 / 2;
    }
}

struct Fleet {
    admin: AdminApi,
    openai: String,
    nodes: Vec<Running<Result<()>>>,
}

async fn start_fleet(target: &Path, draft: &Path, max_prefill_tokens: usize) -> Result<Fleet> {
    let mut cs = edgespec_coordinator::Settings::for_tests();
    cs.admin.token = TOKEN.into();
    cs.verify.timeout = Duration::from_secs(2);
    cs.verify.prefill_timeout_per_token = Duration::from_millis(10);
    // Only the Verify deadline is under test; a connection attempt may take its time on a busy
    // test machine.
    cs.verify.connect_timeout = Duration::from_secs(10);
    // Plain target decoding through the system: the verify side is what is under test.
    cs.policy.speculation_enabled = false;
    let coordinator = edgespec_coordinator::App::build(cs).await?;
    let (grpc, admin_addr) = (coordinator.grpc_addr(), coordinator.http_addr());
    let mut nodes = vec![Running::spawn(
        |s| async move { Ok(coordinator.run(s).await?) },
    )];

    let mut vs = edgespec_verify_node::Settings::default();
    vs.server.listen = ([127, 0, 0, 1], 0).into();
    vs.server.node_id = "verify-long".into();
    vs.model.path = target.to_path_buf();
    vs.coordinator.addresses = vec![format!("http://{grpc}")];
    vs.batching.max_prefill_tokens = max_prefill_tokens;
    vs.tls = edgespec_runtime::tls::TlsSettings::plaintext();
    let verify = edgespec_verify_node::App::build(vs).await?;
    nodes.push(Running::spawn(|s| async move { Ok(verify.run(s).await?) }));

    let mut ds = edgespec_draft_node::Settings::default();
    ds.node.id = "draft-long".into();
    ds.http.listen = ([127, 0, 0, 1], 0).into();
    ds.model.path = draft.to_path_buf();
    ds.coordinator.address = format!("http://{grpc}");
    ds.coordinator.timeout = REQUEST_TIMEOUT;
    ds.tls = edgespec_runtime::tls::TlsSettings::plaintext();
    let draft_app = edgespec_draft_node::App::build(ds).await?;
    let openai = format!("http://{}/v1", draft_app.http_addr());
    nodes.push(Running::spawn(
        |s| async move { Ok(draft_app.run(s).await?) },
    ));

    let admin = AdminApi::http(admin_addr, TOKEN);
    admin
        .wait_fleet(FleetWait::new(1, 1, Duration::from_secs(60)), || Ok(()))
        .await?;
    Ok(Fleet {
        admin,
        openai,
        nodes,
    })
}

impl Fleet {
    fn ask(&self, prompt: &str) -> tokio::task::JoinHandle<(Result<ChatOutcome>, Duration)> {
        let base = self.openai.clone();
        let req = ChatRequest {
            prompt: prompt.to_string(),
            max_tokens: MAX_TOKENS,
            temperature: 0.0,
            seed: None,
            top_k: None,
            ..Default::default()
        };
        tokio::spawn(async move {
            let started = Instant::now();
            let r = tokio::time::timeout(
                REQUEST_TIMEOUT,
                stream_chat(&reqwest::Client::new(), &base, &req, |_| {}),
            )
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {REQUEST_TIMEOUT:?}")));
            (r, started.elapsed())
        })
    }

    /// The coordinator's count of failed Verify calls (each marks the node down).
    async fn verify_failures(&self) -> Result<f64> {
        let text = self
            .admin
            .client
            .get(format!("{}/metrics", self.admin.base))
            .send()
            .await?
            .text()
            .await?;
        let name = "edgespec_coordinator_verify_failures_total";
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0))
    }

    /// (up, tokens in flight) of the one verify node.
    async fn verifier(&self) -> Result<(bool, u64)> {
        let v = self.admin.get("/admin/v1/nodes").await?;
        let n = &v["verifiers"][0];
        Ok((
            n["health"].as_str() == Some("up"),
            n["inflight_tokens"].as_u64().unwrap_or(0),
        ))
    }

    async fn stop(self) -> Result<()> {
        for n in self.nodes.into_iter().rev() {
            n.close().await?;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prompt_neither_knocks_the_node_down_nor_stalls_a_short_one() -> Result<()> {
    edgespec_tests::init_logs();
    // Forwards on one core (set before any model loads; this binary holds only this test):
    // the servers' async tasks keep the other, as on a real node whose runtime is not starved
    // by its own model.
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    std::env::set_var("RAYON_NUM_THREADS", "1");
    let target = TinyModel::new(target_spec());
    let draft = TinyModel::new(TinySpec {
        weights: TinyWeights::Q4_0,
        context_length: CONTEXT,
        ..TinySpec::default()
    });
    let tok = target.tokenizer();
    let (long_text, long_reference) = tokio::task::spawn_blocking({
        let (path, tok) = (target.path.clone(), tok.clone());
        move || long_prompt(&path, &tok)
    })
    .await??;
    let short_text = "a short question";
    let (short_reference, _) = reference(&target.path, &tok, &encode(&tok, short_text)?)?;

    let fleet = start_fleet(&target.path, &draft.path, MAX_PREFILL_TOKENS).await?;
    let long = fleet.ask(&long_text);
    // The short request starts once the long prefill is in flight on the verify node, so the
    // two are in separate Verify calls and the short one's has the plain 2 s deadline.
    let mut up_throughout = true;
    let f = &fleet;
    edgespec_testkit::harness::wait_until(
        "the long prompt's batch in flight",
        Duration::from_secs(60),
        move || async move {
            let (_, inflight) = f.verifier().await.unwrap_or((false, 0));
            inflight >= 1000
        },
    )
    .await?;
    let short = fleet.ask(short_text);
    while !(short.is_finished() && long.is_finished()) {
        let (up, _) = fleet.verifier().await?;
        up_throughout &= up;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (short_result, _) = short.await?;
    let (long_result, long_took) = long.await?;
    let failures = fleet.verify_failures().await?;
    fleet.stop().await?;

    ensure!(
        failures == 0.0 && up_throughout,
        "the verify node was marked down ({failures} failed Verify calls)"
    );
    let short_out = short_result.context("the short request failed")?;
    assert_eq!(short_out.token_ids, short_reference, "short request");
    match long_result {
        Ok(out) => assert_eq!(out.token_ids, long_reference, "long request"),
        Err(e) => {
            let msg = format!("{e:#}");
            ensure!(
                msg.contains("503") && msg.contains("verify"),
                "the long request failed without a clear error: {msg}"
            );
            ensure!(long_took < REQUEST_TIMEOUT, "the long request hung");
        }
    }
    Ok(())
}
