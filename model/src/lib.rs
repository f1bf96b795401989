//! Model runtime on candle: fetching and caching the real GGUF models, the tokenizer read from GGUF
//! metadata, our own qwen2/llama forward with all-position logits, per-session truncatable KV
//! caches and ragged batches, and the model thread that keeps forwards off async workers.
//!
//! This is the only crate that imports candle. Everything it exports is candle-free: token ids,
//! `Vec<f32>` logit rows, plain settings.

pub mod error;
pub mod fetch;
pub mod forward;
// Our quantized CPU matmul kernels and worker pool: the crate's only `unsafe` code.
mod kernels;
// Synthetic GGUF files (tiny test models, real-shape models for the GPU check): compiled only
// for the crates that ask for them (`synthetic` feature) and for this crate's own unit tests.
#[cfg(any(test, feature = "synthetic"))]
pub mod synthetic;
pub mod thread;
pub mod tokenizer;

pub use error::ModelError;
pub use thread::{ModelHandle, ModelHealth};
pub use tokenizer::{ChatMessage, StreamDecoder, TextTokenizer};

/// Identifies one generation session's KV cache inside a model.
pub type SessionId = u64;

/// One session's part of a ragged batch: truncate the session's KV cache to `start` tokens (it must
/// hold at least that many; a new session starts at 0), then append `tokens` at positions
/// `start..start + tokens.len()`. Logits are returned for the last `logits_for_last` of those
/// positions (a prefill of a long history only needs the rows of its final positions; computing
/// and copying 150k-wide rows for every prompt token would dominate the cost).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqRequest {
    /// Session whose cache is extended (created when `start == 0` and it does not exist).
    pub session: SessionId,
    /// Number of cached tokens to keep before appending.
    pub start: usize,
    /// New tokens (at least one).
    pub tokens: Vec<u32>,
    /// How many trailing positions get logits: `min(logits_for_last, tokens.len())` rows, at
    /// least 1. Use `usize::MAX` for all positions.
    pub logits_for_last: usize,
}

/// Logits for the trailing new positions of one [`SeqRequest`], row-major `[rows, vocab_size]`:
/// row `i` predicts the token after new position `tokens.len() - rows + i`.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqLogits {
    /// Session these rows belong to.
    pub session: SessionId,
    /// Number of rows (`min(logits_for_last, tokens.len())`, at least 1).
    pub rows: usize,
    /// Row length.
    pub vocab_size: usize,
    /// `rows * vocab_size` logits.
    pub data: Vec<f32>,
}

impl SeqLogits {
    /// Logit row `i` (see the type's doc for which position it predicts from).
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab_size..(i + 1) * self.vocab_size]
    }
}

/// Where forwards run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceKind {
    /// CPU (default; our SIMD quantized kernels, `EDGESPEC_CPU_KERNELS`).
    #[default]
    Cpu,
    /// CUDA device by ordinal (needs the `cuda` feature).
    Cuda(usize),
}

impl std::str::FromStr for DeviceKind {
    type Err = String;

    /// `cpu` (any case) or `cuda:N`; the error says what is accepted.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("cpu") {
            return Ok(DeviceKind::Cpu);
        }
        s.strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceKind::Cuda)
            .ok_or_else(|| format!("`{s}` is not `cpu` or `cuda:N` (e.g. cuda:0)"))
    }
}

impl std::fmt::Display for DeviceKind {
    /// The form [`FromStr`](std::str::FromStr) reads, as nodes report it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceKind::Cpu => f.write_str("cpu"),
            DeviceKind::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Static facts about a loaded model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// GGUF `general.architecture` (`qwen2` or `llama`).
    pub arch: String,
    /// GGUF `general.name`, or the file stem.
    pub name: String,
    /// Logit row length.
    pub vocab_size: usize,
    /// Longest sequence (cached + new tokens) a session may hold.
    pub max_context: usize,
    /// Hex sha256 over the tokenizer's vocabulary (tokens in id order) and merges: two models
    /// can pair for speculative decoding iff their fingerprints are equal.
    pub fingerprint: String,
    /// KV-cache bytes one cached token takes (keys and values of every layer), before the
    /// caches' growth slack; 0 when unknown. Lets a memory budget hold from the first batch,
    /// before any cache has been measured.
    pub kv_bytes_per_token: usize,
}

/// A causal language model with per-session KV caches. Synchronous: it lives on the model thread.
pub trait CausalLm: Send {
    /// Static facts.
    fn info(&self) -> &ModelInfo;
    /// One forward over a ragged batch of sessions (linear layers over all rows at once, attention
    /// per session). Results come back in request order. On error no cache is changed.
    fn forward_batch(&mut self, batch: &[SeqRequest]) -> Result<Vec<SeqLogits>, ModelError>;
    /// Drop cached positions beyond `len` (no-op if the session holds fewer).
    fn truncate(&mut self, session: SessionId, len: usize) -> Result<(), ModelError>;
    /// Forget a session entirely.
    fn release(&mut self, session: SessionId);
    /// Cached length of a session, `None` if unknown.
    fn cached_len(&self, session: SessionId) -> Option<usize>;
    /// Bytes held by all KV caches (for memory budgets).
    fn kv_bytes(&self) -> usize;
}

/// Sizes candle's CPU worker pool to the CPUs this process may actually run on (our own
/// kernels' pool, `kernels/pool.rs`, follows the affinity by itself and honours the same
/// `CANDLE_NUM_THREADS`, or `EDGESPEC_CPU_THREADS`), and shortens its workers' spin.
///
/// candle sizes its pool from the machine's topology, ignoring the process's CPU affinity, so a
/// node pinned to one core (`taskset -c 1`, a cgroup cpuset, a Kubernetes CPU set) would run two
/// workers that spin against each other on that core: measured here, the 1.5B target decodes at
/// 335 ms/token pinned to one core with the default pool and 172 ms/token with a pool of one.
///
/// candle's workers (which still run the elementwise ops of 64 Ki elements or more: a prefill,
/// a large verification block) spin 25 000 pause loops after each op before they sleep, on the
/// cores our matmul workers need next. [`CANDLE_SPIN_LIMIT`] loops instead: the 0.5B's prefill
/// of 128 tokens went from 377 to 342 ms and a 16-token verification from 56 to 48 ms (medians
/// of 5 alternating runs, 2 threads).
///
/// Call it at the start of `main`, before any model is loaded or any other thread exists;
/// explicit `CANDLE_NUM_THREADS`, `RAYON_NUM_THREADS` or `CANDLE_BARRIER_POOL_SPIN_LIMIT`
/// settings are left alone.
pub fn configure_cpu_threads() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var(
            "CANDLE_BARRIER_POOL_SPIN_LIMIT",
            CANDLE_SPIN_LIMIT.to_string(),
        );
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_some()
        || std::env::var_os("RAYON_NUM_THREADS").is_some()
    {
        return;
    }
    // `available_parallelism` honours sched_getaffinity and cgroup quotas on Linux.
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
}

/// Pause loops candle's pool workers spin after an op before they sleep (candle's default is
/// 25 000); see [`configure_cpu_threads`].
pub const CANDLE_SPIN_LIMIT: u32 = 2_000;
