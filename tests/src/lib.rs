//! Shared harness of the end-to-end tests: the real models, target-only greedy references
//! computed directly on the model (no speculation, single-token steps), and a few client helpers.
#![forbid(unsafe_code)]

pub mod procs;

use std::path::PathBuf;

use anyhow::{Context, Result};
use edgespec_model::fetch::{default_cache_dir, ensure_model, KnownModel};
use edgespec_model::forward::load_gguf;
use edgespec_model::{ChatMessage, DeviceKind, SeqRequest, TextTokenizer};

/// The real Qwen pair `(target, draft)`, fetched into the cache if missing.
pub fn qwen_pair() -> Result<(PathBuf, PathBuf)> {
    let dir = default_cache_dir();
    Ok((
        ensure_model(KnownModel::Qwen15bTarget, &dir, false)?,
        ensure_model(KnownModel::Qwen05bDraft, &dir, false)?,
    ))
}

/// SmolLM2-135M, small enough to serve as both target and draft in fault tests.
pub fn smollm() -> Result<PathBuf> {
    Ok(ensure_model(
        KnownModel::SmolLm135m,
        &default_cache_dir(),
        false,
    )?)
}

/// Target-only greedy decoding of a chat prompt, one token per forward, exactly as a
/// non-speculative server would run it. Returns the completion text (stopping at an end-of-turn
/// token or after `max_tokens`).
///
/// Near-ties: our forward is batch-invariant on CPU (a position's logits are bit-identical in a
/// single-token step, a verification block or a ragged batch), so the speculative system and this
/// reference see the same logits and break ties the same way (lowest token id); no tolerance is
/// needed and none is applied.
pub fn target_only_greedy(model: &PathBuf, prompt: &str, max_tokens: usize) -> Result<String> {
    let tok = TextTokenizer::from_gguf(model)?;
    let mut ids = target_only_greedy_ids(model, prompt, max_tokens)?;
    if ids.last().is_some_and(|t| tok.eos_token_ids().contains(t)) {
        ids.pop();
    }
    Ok(tok.decode(&ids)?)
}

/// [`target_only_greedy`] as token ids, the way the API reports them
/// (`ChatOutcome::token_ids`): the completion's ids in order, an end-of-turn token included.
pub fn target_only_greedy_ids(
    model: &PathBuf,
    prompt: &str,
    max_tokens: usize,
) -> Result<Vec<u32>> {
    let tok = TextTokenizer::from_gguf(model)?;
    let ids = tok.encode_chat(&[ChatMessage::new("user", prompt)], true)?;
    let mut lm = load_gguf(model, DeviceKind::Cpu).context("loading the reference model")?;
    let eos = tok.eos_token_ids().to_vec();
    let mut out = Vec::new();
    let mut next = ids;
    let mut start = 0;
    for _ in 0..max_tokens {
        let n = next.len();
        let logits = lm.forward_batch(&[SeqRequest {
            session: 1,
            start,
            tokens: next,
            logits_for_last: 1,
        }])?;
        start += n;
        let t = edgespec_specdec::argmax(logits[0].row(0));
        out.push(t);
        if eos.contains(&t) {
            break;
        }
        next = vec![t];
    }
    Ok(out)
}

/// Prompts used across the end-to-end tests (code prompts: high acceptance, no near-ties).
pub const PROMPTS: [&str; 3] = [
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Write a Rust struct `Stack<T>` backed by a Vec with push, pop and peek methods.",
    "Explain in two sentences what a hash map is.",
];

/// Routes the components' logs to the test output (`RUST_LOG`, default `warn`).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}
