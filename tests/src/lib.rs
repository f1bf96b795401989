//! Shared harness of the end-to-end tests: the real models, target-only greedy references
//! computed directly on the model (no speculation, single-token steps), and a few client helpers.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use std::time::Duration;

use anyhow::{bail, Result};
use edgespec::client::{stream_chat, ChatOutcome, ChatRequest};
use edgespec_model::fetch::{default_cache_dir, ensure_model, KnownModel};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

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

/// Target-only greedy decoding of a chat prompt as text (see [`edgespec::reference`]).
pub fn target_only_greedy(model: &Path, prompt: &str, max_tokens: usize) -> Result<String> {
    edgespec::reference::target_only_greedy(model, prompt, max_tokens)
}

/// Target-only greedy decoding as token ids, the way the API reports them
/// (`ChatOutcome::token_ids`; see [`edgespec::reference`]).
pub fn target_only_greedy_ids(model: &Path, prompt: &str, max_tokens: usize) -> Result<Vec<u32>> {
    edgespec::reference::target_only_greedy_ids(model, prompt, max_tokens)
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

/// Starts a streamed chat request to `base`; the receiver gets the number of text pieces seen so
/// far, so a test can inject a fault once the answer is under way.
pub fn stream_counting(
    base: String,
    req: ChatRequest,
) -> (
    JoinHandle<Result<ChatOutcome>>,
    mpsc::UnboundedReceiver<usize>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut pieces = 0;
        stream_chat(&reqwest::Client::new(), &base, &req, move |_| {
            pieces += 1;
            let _ = tx.send(pieces);
        })
        .await
    });
    (task, rx)
}

/// Waits until the stream of [`stream_counting`] has produced `n` pieces of text, for at most
/// `deadline`.
pub async fn wait_pieces(
    rx: &mut mpsc::UnboundedReceiver<usize>,
    n: usize,
    deadline: Duration,
) -> Result<()> {
    let deadline = tokio::time::sleep(deadline);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            got = rx.recv() => match got {
                Some(k) if k >= n => return Ok(()),
                Some(_) => {}
                None => bail!("the stream ended before {n} pieces of text"),
            },
            () = &mut deadline => bail!("no {n} pieces of text within the deadline"),
        }
    }
}
