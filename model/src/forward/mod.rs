//! Our own qwen2/llama forward on candle's quantized building blocks: logits for every new
//! position, per-session truncatable KV caches, and ragged batches of sessions in one forward.
//!
//! A batch concatenates every session's new tokens into one `[rows, hidden]` matrix for the
//! embedding, norms and all linear layers; attention runs per session against its own cache
//! (causal within the new tokens, full over the cached prefix). See [`load_gguf`].
//!
//! # Batch invariance
//!
//! On the CPU a position's logits are bit-identical whether it is computed in a single-token step,
//! inside a multi-token block, or in a ragged batch beside other sessions. That is what makes
//! speculative greedy decoding produce exactly the target-only greedy output. It holds because
//! - every linear layer quantizes and reduces each activation row on its own, and `linear.rs`
//!   keeps candle on one kernel per weight whatever the row count (candle would otherwise switch
//!   Q6K weights between two kernels that round differently, and Q4K to AMX for `m >= 32`);
//! - attention is computed per (query row, head) with a fixed summation order (`attention.rs`);
//! - norms, rotary embeddings and element-wise ops are per row or per element.
//!
//! Weight matrices stored as F32/F16 (none in the supported files) would go through candle's
//! f32 gemm, which is not row-invariant. For comparison, MODELS.md measured logits differing by
//! up to ~0.5 between block and single-step forwards of candle-transformers' `quantized_qwen2`,
//! which mixes those kernels and computes attention with shape-dependent matmuls.
//!
//! The tests in `model/tests/forward_*.rs` check it bit for bit on tiny models (generic and
//! tiled kernels) and on the real models. Invariance is established for x86_64; other CPUs pick
//! other candle kernels, and CUDA makes no such promise (there the tensor path is used and results
//! match only to rounding).

mod attention;
mod elementwise;
mod hparams;
mod kv;
mod linear;
mod model;

use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::Device;
use sha2::{Digest, Sha256};

use crate::{CausalLm, DeviceKind, ModelError, ModelInfo};

/// Loads a GGUF file (`general.architecture` `qwen2` or `llama`) onto `device`.
///
/// Hyperparameters come from the `{arch}.*` metadata keys; the vocabulary size from the rows of
/// `token_embd.weight`; a missing `output.weight` means tied embeddings.
pub fn load_gguf(path: &Path, device: DeviceKind) -> Result<Box<dyn CausalLm>, ModelError> {
    load_gguf_with(path, device, &LoadOptions::default())
}

/// How to load a model: everything off by default (the model exactly as the file has it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Compute logits only for token ids below this (plus every control and user-defined token
    /// above it); every other logit is −∞. For a **draft** model only: its output head is the
    /// largest matrix of a small model (a quarter of the Qwen2.5 0.5B's weights), and byte-level
    /// BPE numbers tokens in merge order, so the first ids are the frequent ones (65 536 of
    /// 151 936 cover about 98 % of code and English). A token outside is never drafted, which
    /// costs acceptance, never correctness: verification decides every token, and under sampling
    /// the draft distribution sent for verification is the one drafted from (zero outside).
    /// Never set it for a target model: it would change the output. `None`: the whole vocabulary.
    pub head_vocab: Option<usize>,
}

/// [`load_gguf`] with [`LoadOptions`].
pub fn load_gguf_with(
    path: &Path,
    device: DeviceKind,
    opts: &LoadOptions,
) -> Result<Box<dyn CausalLm>, ModelError> {
    let shown = path.display().to_string();
    let device = open_device(device)?;
    let mut file = File::open(path).map_err(|source| ModelError::Io {
        context: format!("cannot open model {shown}"),
        source,
    })?;
    // Buffered: the metadata is read a few bytes at a time (0.74 s → 0.12 s for a 151k-token
    // vocabulary); tensor reads seek, so the file's position after this does not matter.
    let content = read_gguf_content(&mut std::io::BufReader::new(&mut file), &shown)?;
    let model = model::GgufModel::load(&content, &mut file, &device, path, opts)?;
    Ok(Box::new(model))
}

/// Parses the metadata and tensor infos of a GGUF file (`shown` names it in errors).
///
/// candle's reader panics on some malformed files (a `general.alignment` of 0 divides by zero);
/// such a panic is returned as [`ModelError::Load`] like any other malformed file.
pub fn read_gguf_content<R: std::io::Read + std::io::Seek>(
    reader: &mut R,
    shown: &str,
) -> Result<gguf_file::Content, ModelError> {
    let load_err = |reason: String| ModelError::Load {
        path: shown.to_string(),
        reason,
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        gguf_file::Content::read(reader)
    })) {
        Ok(r) => r.map_err(|e| load_err(e.to_string())),
        Err(_) => Err(load_err(
            "malformed GGUF header (the reader panicked)".into(),
        )),
    }
}

/// The [`ModelInfo`] of the GGUF at `path` from its metadata and tensor shapes alone (no tensor
/// data is read, no model is built), for a node that announces a model's facts without running it
/// (a lookup-only draft node). The vocabulary size is counted as the loader counts it, the rows
/// of `token_embd.weight`, or `tokenizer_vocab` where the file has no embedding (a tokenizer-only
/// GGUF); `kv_bytes_per_token` is 0.
pub fn read_model_info(path: &Path, tokenizer_vocab: usize) -> Result<ModelInfo, ModelError> {
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|e| ModelError::Io {
        context: format!("opening {shown}"),
        source: e,
    })?;
    let ct = read_gguf_content(&mut std::io::BufReader::new(file), &shown)?;
    let (arch, max_context) = hparams::arch_and_context(&ct, &shown)?;
    let vocab_size = ct
        .tensor_infos
        .get("token_embd.weight")
        .and_then(|t| t.shape.dims2().ok())
        .map_or(tokenizer_vocab, |(rows, _)| rows);
    Ok(ModelInfo {
        arch,
        name: model_name(&ct, path),
        vocab_size,
        max_context,
        fingerprint: tokenizer_fingerprint(&ct),
        kv_bytes_per_token: 0,
    })
}

/// GGUF `general.name`, or the file stem.
fn model_name(ct: &gguf_file::Content, path: &Path) -> String {
    match ct.metadata.get("general.name") {
        Some(Value::String(s)) => s.clone(),
        _ => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

/// Hex sha256 over the tokenizer vocabulary and merges in the GGUF metadata: the tokens of
/// `tokenizer.ggml.tokens` in id order, each followed by a `\0`, then a `\n`, then the entries of
/// `tokenizer.ggml.merges`, each followed by a `\0`. Missing keys count as empty lists.
pub fn tokenizer_fingerprint(content: &gguf_file::Content) -> String {
    let mut h = Sha256::new();
    hash_strings(&mut h, content, "tokenizer.ggml.tokens");
    h.update(b"\n");
    hash_strings(&mut h, content, "tokenizer.ggml.merges");
    hex::encode(h.finalize())
}

fn hash_strings(h: &mut Sha256, content: &gguf_file::Content, key: &str) {
    if let Some(Value::Array(items)) = content.metadata.get(key) {
        for item in items {
            if let Value::String(s) = item {
                h.update(s.as_bytes());
            }
            h.update([0u8]);
        }
    }
}

fn open_device(kind: DeviceKind) -> Result<Device, ModelError> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda(i) => {
            if !candle_core::utils::cuda_is_available() {
                return Err(ModelError::DeviceUnavailable {
                    device: format!("cuda:{i}"),
                    reason: "this build has no CUDA support (build with the `cuda` feature)"
                        .to_string(),
                });
            }
            Device::new_cuda(i).map_err(|e| ModelError::DeviceUnavailable {
                device: format!("cuda:{i}"),
                reason: e.to_string(),
            })
        }
    }
}
