//! Tiny random models written as real GGUF files, for fast tests across the workspace.
//!
//! [`write_tiny_gguf`] writes a model with the same metadata layout as the real qwen2 / llama
//! files (hyperparameters under `{arch}.*`, the full GPT-2-style BPE tokenizer under
//! `tokenizer.ggml.*`, a ChatML `tokenizer.chat_template`) and seeded random weights, so every
//! code path that loads a real model (forward, tokenizer, fingerprint, chat formatting) runs on it
//! in milliseconds. The weights mean nothing: greedy output is arbitrary but deterministic.
//!
//! Vocabulary (ids in order):
//! - `0..256`: the 256 GPT-2 byte-level symbols, in GPT-2's order (`!`, `"`, … `Ā`, `ā`, …; a
//!   space is `Ġ`);
//! - `256..256 + n_merges`: the results of the first `n_merges` entries of [`TINY_MERGES`]
//!   (`Ġt`, `Ġa`, `he`, `in`, … `Ġthe`, … `Ġdef`), written to `tokenizer.ggml.merges`;
//! - then the specials `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (token type 3; all others 1).
//!
//! eos is `<|im_end|>`, bos and padding `<|endoftext|>`, and no bos is added (as in Qwen2.5).
//!
//! ```no_run
//! use edgespec_model::synthetic::{write_tiny_gguf, TinyArch, TinySpec};
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("tiny.gguf");
//! write_tiny_gguf(&path, &TinySpec { arch: TinyArch::Llama, seed: 7, ..TinySpec::default() })
//!     .unwrap();
//! ```

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::ModelError;

/// Merges of the tiny tokenizer, in rank order (GPT-2 symbols; `Ġ` is a space). Each merge's
/// parts are byte symbols or results of earlier merges.
pub const TINY_MERGES: &[&str] = &[
    "Ġ t", "Ġ a", "h e", "i n", "r e", "o n", "Ġt he", "e r", "Ġ s", "a t", "Ġ w", "Ġ o", "e n",
    "Ġ c", "i t", "i s", "a n", "o r", "e s", "Ġ b", "e d", "Ġ f", "in g", "Ġ p", "o u", "Ġa n",
    "a l", "a r", "Ġt o", "Ġ m", "Ġo f", "Ġ in", "Ġ d", "Ġ h", "Ġan d", "d e", "Ġ de", "Ġde f",
];

/// The special tokens, in id order after the merges.
pub const TINY_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// ChatML template written to `tokenizer.chat_template`.
pub const TINY_CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + \
message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if \
add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Which architecture's metadata and tensor layout to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TinyArch {
    /// `qwen2`: q/k/v biases, NeoX rotary embeddings.
    #[default]
    Qwen2,
    /// `llama` (SmolLM2-style): no biases, interleaved rotary embeddings.
    Llama,
}

/// How the weight matrices are quantized (norms and biases are always F32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TinyWeights {
    /// Q8_0 everywhere (block 32).
    #[default]
    Q8_0,
    /// Q4_0 everywhere (block 32).
    Q4_0,
    /// Like a real Q4_K_M file: Q4K, with Q6K for `attn_v`, `ffn_down` and the output matrix.
    /// Needs `hidden` and `ffn` to be multiples of 256 (exercises candle's tiled CPU kernels).
    Q4KM,
}

/// Shape and contents of a tiny model. `TinySpec::default()` is a 2-layer qwen2 with hidden 64,
/// 4 query / 2 kv heads, FFN 128, 297 tokens, Q8_0 weights, seed 0 (a ~100 KB file).
#[derive(Debug, Clone, PartialEq)]
pub struct TinySpec {
    /// Architecture layout.
    pub arch: TinyArch,
    /// Seed of the weight generator; equal specs give byte-identical files.
    pub seed: u64,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Embedding width (a multiple of 32; of 256 for [`TinyWeights::Q4KM`]).
    pub hidden: usize,
    /// Query heads (`hidden / n_head` must be even).
    pub n_head: usize,
    /// Key/value heads (divides `n_head`).
    pub n_kv_head: usize,
    /// FFN width (a multiple of 32; of 256 for [`TinyWeights::Q4KM`]).
    pub ffn: usize,
    /// How many of [`TINY_MERGES`] to include (clamped to its length).
    pub n_merges: usize,
    /// `{arch}.context_length`.
    pub context_length: usize,
    /// Omit `output.weight` (the output projection reuses `token_embd.weight`).
    pub tied_embeddings: bool,
    /// Quantization of the weight matrices.
    pub weights: TinyWeights,
    /// `{arch}.rope.freq_base`.
    pub rope_base: f32,
    /// `{arch}.attention.layer_norm_rms_epsilon`.
    pub rms_eps: f32,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            arch: TinyArch::Qwen2,
            seed: 0,
            n_layer: 2,
            hidden: 64,
            n_head: 4,
            n_kv_head: 2,
            ffn: 128,
            n_merges: TINY_MERGES.len(),
            context_length: 512,
            tied_embeddings: false,
            weights: TinyWeights::Q8_0,
            rope_base: 1_000_000.0,
            rms_eps: 1e-6,
        }
    }
}

impl TinySpec {
    fn merges(&self) -> &'static [&'static str] {
        &TINY_MERGES[..self.n_merges.min(TINY_MERGES.len())]
    }

    /// Number of tokens (256 bytes + merges + 3 specials).
    pub fn vocab_size(&self) -> usize {
        256 + self.merges().len() + TINY_SPECIALS.len()
    }

    /// Id of `<|endoftext|>` (bos / padding).
    pub fn endoftext_id(&self) -> u32 {
        (256 + self.merges().len()) as u32
    }

    /// Id of `<|im_start|>`.
    pub fn im_start_id(&self) -> u32 {
        self.endoftext_id() + 1
    }

    /// Id of `<|im_end|>` (eos).
    pub fn eos_id(&self) -> u32 {
        self.endoftext_id() + 2
    }

    /// The token strings in id order.
    pub fn tokens(&self) -> Vec<String> {
        let mut tokens: Vec<String> = byte_symbols().into_iter().map(String::from).collect();
        tokens.extend(self.merges().iter().map(|m| m.replace(' ', "")));
        tokens.extend(TINY_SPECIALS.iter().map(|s| s.to_string()));
        tokens
    }

    fn check(&self) -> Result<(), ModelError> {
        let block = match self.weights {
            TinyWeights::Q8_0 | TinyWeights::Q4_0 => 32,
            TinyWeights::Q4KM => 256,
        };
        let bad = |what: String| Err(ModelError::Synthetic(what));
        if self.n_layer == 0 || self.n_head == 0 || self.n_kv_head == 0 {
            return bad("layers and heads must be positive".into());
        }
        if !self.hidden.is_multiple_of(block) || !self.ffn.is_multiple_of(block) {
            return bad(format!(
                "hidden {} and ffn {} must be multiples of {block} for {:?}",
                self.hidden, self.ffn, self.weights
            ));
        }
        if !self.n_head.is_multiple_of(self.n_kv_head)
            || !(self.hidden / self.n_head).is_multiple_of(2)
        {
            return bad("n_kv_head must divide n_head and the head dim must be even".into());
        }
        Ok(())
    }
}

/// The 256 GPT-2 byte-level symbols in GPT-2's vocabulary order.
fn byte_symbols() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut symbols: Vec<char> = (0u32..256)
        .filter(|&b| printable(b))
        .filter_map(char::from_u32)
        .collect();
    let mut n = 0;
    for b in 0u32..256 {
        if !printable(b) {
            symbols.extend(char::from_u32(256 + n));
            n += 1;
        }
    }
    symbols
}

/// Writes the tiny model described by `spec` to `path` (overwriting it).
pub fn write_tiny_gguf(path: &Path, spec: &TinySpec) -> Result<(), ModelError> {
    spec.check()?;
    let tensors = tiny_tensors(spec).map_err(|e| ModelError::Synthetic(e.to_string()))?;
    let metadata = tiny_metadata(spec);
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let file = File::create(path).map_err(|source| ModelError::Io {
        context: format!("cannot create {}", path.display()),
        source,
    })?;
    let mut w = BufWriter::new(file);
    gguf_file::write(&mut w, &md, &ts).map_err(|e| ModelError::Synthetic(e.to_string()))?;
    std::io::Write::flush(&mut w).map_err(|source| ModelError::Io {
        context: format!("cannot write {}", path.display()),
        source,
    })
}

fn tiny_metadata(spec: &TinySpec) -> Vec<(String, Value)> {
    let arch = match spec.arch {
        TinyArch::Qwen2 => "qwen2",
        TinyArch::Llama => "llama",
    };
    let u32v = |x: usize| Value::U32(x as u32);
    let strings = |xs: Vec<String>| Value::Array(xs.into_iter().map(Value::String).collect());
    let tokens = spec.tokens();
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| {
            Value::I32(if i >= spec.endoftext_id() as usize {
                3
            } else {
                1
            })
        })
        .collect();
    let merges: Vec<String> = spec.merges().iter().map(|m| m.to_string()).collect();
    let head_dim = spec.hidden / spec.n_head;
    let mut md = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.into()),
        ),
        (
            "general.name".to_string(),
            Value::String(format!("tiny-{arch}-seed{}", spec.seed)),
        ),
        ("general.quantization_version".to_string(), Value::U32(2)),
    ];
    let hp = [
        ("block_count", u32v(spec.n_layer)),
        ("context_length", u32v(spec.context_length)),
        ("embedding_length", u32v(spec.hidden)),
        ("feed_forward_length", u32v(spec.ffn)),
        ("attention.head_count", u32v(spec.n_head)),
        ("attention.head_count_kv", u32v(spec.n_kv_head)),
        ("rope.freq_base", Value::F32(spec.rope_base)),
        ("attention.layer_norm_rms_epsilon", Value::F32(spec.rms_eps)),
    ];
    md.extend(hp.into_iter().map(|(k, v)| (format!("{arch}.{k}"), v)));
    if spec.arch == TinyArch::Llama {
        md.push((format!("{arch}.rope.dimension_count"), u32v(head_dim)));
        md.push((format!("{arch}.vocab_size"), u32v(spec.vocab_size())));
    }
    let tk = |k: &str| format!("tokenizer.{k}");
    md.extend([
        (tk("ggml.model"), Value::String("gpt2".into())),
        (tk("ggml.pre"), Value::String("qwen2".into())),
        (tk("ggml.tokens"), strings(tokens)),
        (tk("ggml.token_type"), Value::Array(types)),
        (tk("ggml.merges"), strings(merges)),
        (tk("ggml.eos_token_id"), Value::U32(spec.eos_id())),
        (tk("ggml.bos_token_id"), Value::U32(spec.endoftext_id())),
        (tk("ggml.padding_token_id"), Value::U32(spec.endoftext_id())),
        (tk("ggml.add_bos_token"), Value::Bool(false)),
        (
            tk("chat_template"),
            Value::String(TINY_CHAT_TEMPLATE.into()),
        ),
    ]);
    md
}

/// SplitMix64: a tiny, seedable generator (no dependency, stable across versions).
struct SplitMix(u64);

impl SplitMix {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }

    /// `len` values uniform in `center ± scale`.
    fn values(&mut self, len: usize, center: f32, scale: f32) -> Vec<f32> {
        (0..len).map(|_| center + scale * self.next_f32()).collect()
    }
}

fn tiny_tensors(spec: &TinySpec) -> candle_core::Result<Vec<(String, QTensor)>> {
    let mut rng = SplitMix(spec.seed ^ 0x005E_ED0F_ED6E_5BEC);
    let dev = Device::Cpu;
    let (h, f, v) = (spec.hidden, spec.ffn, spec.vocab_size());
    let kv = spec.n_kv_head * (h / spec.n_head);
    let (main, heavy) = match spec.weights {
        TinyWeights::Q8_0 => (GgmlDType::Q8_0, GgmlDType::Q8_0),
        TinyWeights::Q4_0 => (GgmlDType::Q4_0, GgmlDType::Q4_0),
        TinyWeights::Q4KM => (GgmlDType::Q4K, GgmlDType::Q6K),
    };
    let mut out = Vec::new();
    let mut matrix = |name: String, rows: usize, cols: usize, dtype: GgmlDType| {
        // Uniform with variance 1/cols keeps activations O(1) through the layers.
        let scale = (3.0 / cols as f32).sqrt();
        let t = Tensor::from_vec(rng.values(rows * cols, 0.0, scale), (rows, cols), &dev)?;
        out.push((name, QTensor::quantize(&t, dtype)?));
        candle_core::Result::Ok(())
    };
    matrix("token_embd.weight".into(), v, h, main)?;
    for i in 0..spec.n_layer {
        let p = format!("blk.{i}");
        matrix(format!("{p}.attn_q.weight"), h, h, main)?;
        matrix(format!("{p}.attn_k.weight"), kv, h, main)?;
        matrix(format!("{p}.attn_v.weight"), kv, h, heavy)?;
        matrix(format!("{p}.attn_output.weight"), h, h, main)?;
        matrix(format!("{p}.ffn_gate.weight"), f, h, main)?;
        matrix(format!("{p}.ffn_up.weight"), f, h, main)?;
        matrix(format!("{p}.ffn_down.weight"), h, f, heavy)?;
    }
    if !spec.tied_embeddings {
        matrix("output.weight".into(), v, h, heavy)?;
    }
    let mut vector = |name: String, len: usize, center: f32, scale: f32| {
        let t = Tensor::from_vec(rng.values(len, center, scale), len, &dev)?;
        out.push((name, QTensor::quantize(&t, GgmlDType::F32)?));
        candle_core::Result::Ok(())
    };
    for i in 0..spec.n_layer {
        let p = format!("blk.{i}");
        vector(format!("{p}.attn_norm.weight"), h, 1.0, 0.1)?;
        vector(format!("{p}.ffn_norm.weight"), h, 1.0, 0.1)?;
        if spec.arch == TinyArch::Qwen2 {
            vector(format!("{p}.attn_q.bias"), h, 0.0, 0.1)?;
            vector(format!("{p}.attn_k.bias"), kv, 0.0, 0.1)?;
            vector(format!("{p}.attn_v.bias"), kv, 0.0, 0.1)?;
        }
    }
    vector("output_norm.weight".into(), h, 1.0, 0.1)?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Real-shape models (speed measurements only)
// ---------------------------------------------------------------------------------------------

/// Blocks of Qwen2.5-Coder-1.5B-Instruct Q4_K_M (28 blocks) whose `attn_v` and `ffn_down` are
/// Q6K; the others are Q4K (read from the real file). Qwen2.5-7B also has 28 blocks, and
/// llama.cpp picks these layers by block index only, so the 7B spec uses the same list.
pub const QWEN2_Q4KM_Q6K_LAYERS: [usize; 14] = [0, 1, 5, 6, 7, 8, 9, 10, 13, 16, 19, 21, 24, 27];

/// A synthetic model at the shapes and quantization layout of a real one, for **speed**
/// measurements where the real file cannot be brought (a GPU machine without network).
///
/// Forward time does not depend on the weights' values, so generation is fast rather than
/// faithful: each matrix is a few rows of seeded random values quantized once with candle and
/// repeated, with the quantized values (not the block scales) then overwritten by a fast seeded
/// byte stream on every core, so rows differ (no tied logits) and values keep a sane range. The
/// tokenizer metadata is the tiny one (297 tokens) while the embedding and output have `vocab`
/// rows: the file is for forwards, not for text. [`write_shaped_gguf`] streams the file one
/// tensor at a time (peak memory is the largest tensor, not the file).
#[derive(Debug, Clone, PartialEq)]
pub struct ShapeSpec {
    /// Short name (`general.name` is `shape-{name}`).
    pub name: String,
    /// Architecture layout.
    pub arch: TinyArch,
    /// Seed of the generator; equal specs give byte-identical files.
    pub seed: u64,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Embedding width (a multiple of 256 for [`TinyWeights::Q4KM`], of 32 otherwise).
    pub hidden: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_kv_head: usize,
    /// FFN width (same multiple rule as `hidden`).
    pub ffn: usize,
    /// Rows of `token_embd.weight` and `output.weight` (the model's vocabulary size).
    pub vocab: usize,
    /// `{arch}.context_length`.
    pub context_length: usize,
    /// Quantization of the weight matrices.
    pub weights: TinyWeights,
    /// Under [`TinyWeights::Q4KM`]: blocks whose `attn_v` and `ffn_down` are Q6K (the output
    /// matrix is always Q6K, `token_embd` Q4K, everything else Q4K).
    pub q6k_layers: Vec<usize>,
    /// `{arch}.rope.freq_base`.
    pub rope_base: f32,
    /// `{arch}.attention.layer_norm_rms_epsilon`.
    pub rms_eps: f32,
}

impl ShapeSpec {
    /// Qwen2.5(-Coder) 1.5B Q4_K_M: 28 blocks, hidden 1536, 12 q / 2 kv heads (head dim 128),
    /// FFN 8960, vocabulary 151 936, untied output (as in the real GGUF file).
    pub fn qwen2_1_5b_q4km() -> Self {
        Self {
            name: "qwen2-1.5b-q4km".into(),
            arch: TinyArch::Qwen2,
            seed: 15,
            n_layer: 28,
            hidden: 1536,
            n_head: 12,
            n_kv_head: 2,
            ffn: 8960,
            vocab: 151_936,
            context_length: 32_768,
            weights: TinyWeights::Q4KM,
            q6k_layers: QWEN2_Q4KM_Q6K_LAYERS.to_vec(),
            rope_base: 1_000_000.0,
            rms_eps: 1e-6,
        }
    }

    /// Qwen2.5 7B Q4_K_M: 28 blocks, hidden 3584, 28 q / 4 kv heads (head dim 128), FFN 18 944,
    /// vocabulary 152 064, untied output.
    pub fn qwen2_7b_q4km() -> Self {
        Self {
            name: "qwen2-7b-q4km".into(),
            seed: 7,
            hidden: 3584,
            n_head: 28,
            n_kv_head: 4,
            ffn: 18_944,
            vocab: 152_064,
            ..Self::qwen2_1_5b_q4km()
        }
    }

    /// A small stand-in with the same layout rules (for CPU tests of the code path).
    pub fn small(name: &str, n_layer: usize, hidden: usize, n_head: usize, ffn: usize) -> Self {
        Self {
            name: name.into(),
            seed: 3,
            n_layer,
            hidden,
            n_head,
            n_kv_head: (n_head / 4).max(1),
            ffn,
            vocab: 2048,
            context_length: 4096,
            q6k_layers: (0..n_layer).step_by(2).collect(),
            ..Self::qwen2_1_5b_q4km()
        }
    }

    fn tiny(&self) -> TinySpec {
        TinySpec {
            arch: self.arch,
            seed: self.seed,
            n_layer: self.n_layer,
            hidden: self.hidden,
            n_head: self.n_head,
            n_kv_head: self.n_kv_head,
            ffn: self.ffn,
            context_length: self.context_length,
            weights: self.weights,
            rope_base: self.rope_base,
            rms_eps: self.rms_eps,
            ..TinySpec::default()
        }
    }

    /// Every tensor of the file, in file order.
    fn plan(&self) -> Vec<PlannedTensor> {
        let (h, f, v) = (self.hidden, self.ffn, self.vocab);
        let kv = self.n_kv_head * (h / self.n_head);
        let (main, six) = match self.weights {
            TinyWeights::Q8_0 => (GgmlDType::Q8_0, GgmlDType::Q8_0),
            TinyWeights::Q4_0 => (GgmlDType::Q4_0, GgmlDType::Q4_0),
            TinyWeights::Q4KM => (GgmlDType::Q4K, GgmlDType::Q6K),
        };
        let m = |name: String, rows, cols, dtype| PlannedTensor {
            name,
            dims: vec![rows, cols],
            dtype,
            vector: None,
        };
        let vec = |name: String, len, center, scale| PlannedTensor {
            name,
            dims: vec![len],
            dtype: GgmlDType::F32,
            vector: Some((center, scale)),
        };
        let mut out = vec![m("token_embd.weight".into(), v, h, main)];
        for i in 0..self.n_layer {
            let p = format!("blk.{i}");
            let heavy = if self.q6k_layers.contains(&i) {
                six
            } else {
                main
            };
            out.push(m(format!("{p}.attn_q.weight"), h, h, main));
            out.push(m(format!("{p}.attn_k.weight"), kv, h, main));
            out.push(m(format!("{p}.attn_v.weight"), kv, h, heavy));
            out.push(m(format!("{p}.attn_output.weight"), h, h, main));
            out.push(m(format!("{p}.ffn_gate.weight"), f, h, main));
            out.push(m(format!("{p}.ffn_up.weight"), f, h, main));
            out.push(m(format!("{p}.ffn_down.weight"), h, f, heavy));
            out.push(vec(format!("{p}.attn_norm.weight"), h, 1.0, 0.1));
            out.push(vec(format!("{p}.ffn_norm.weight"), h, 1.0, 0.1));
            if self.arch == TinyArch::Qwen2 {
                out.push(vec(format!("{p}.attn_q.bias"), h, 0.0, 0.1));
                out.push(vec(format!("{p}.attn_k.bias"), kv, 0.0, 0.1));
                out.push(vec(format!("{p}.attn_v.bias"), kv, 0.0, 0.1));
            }
        }
        out.push(m("output.weight".into(), v, h, six));
        out.push(vec("output_norm.weight".into(), h, 1.0, 0.1));
        out
    }

    /// Size of the tensor data (what a forward reads), in bytes.
    pub fn weight_bytes(&self) -> u64 {
        self.plan().iter().map(|t| t.bytes() as u64).sum()
    }

    fn check(&self) -> Result<(), ModelError> {
        self.tiny().check()?;
        if self.vocab == 0 {
            return Err(ModelError::Synthetic("vocab must be positive".into()));
        }
        Ok(())
    }
}

/// One tensor to write: a quantized matrix `[rows, cols]`, or an F32 vector of values uniform in
/// `center ± scale`.
#[derive(Debug, Clone)]
struct PlannedTensor {
    name: String,
    dims: Vec<usize>,
    dtype: GgmlDType,
    vector: Option<(f32, f32)>,
}

impl PlannedTensor {
    fn bytes(&self) -> usize {
        let n: usize = self.dims.iter().product();
        n / self.dtype.block_size() * self.dtype.type_size()
    }
}

/// The GGML type code of `dtype` in a GGUF tensor header (candle keeps its own mapping
/// crate-private).
pub fn ggml_type_code(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// Byte range of one block that holds quantized values (not scales), for the types generated by
/// [`write_shaped_gguf`]: any bit pattern there is a valid value.
fn value_bytes(dtype: GgmlDType) -> Option<std::ops::Range<usize>> {
    match dtype {
        // d: f16, then 32 i8.
        GgmlDType::Q8_0 => Some(2..34),
        // d: f16, then 16 bytes of nibbles.
        GgmlDType::Q4_0 => Some(2..18),
        // d, dmin: f16; scales: 12 bytes; qs: 128 bytes.
        GgmlDType::Q4K => Some(16..144),
        // ql: 128 bytes; qh: 64 bytes; scales: 16 i8; d: f16.
        GgmlDType::Q6K => Some(0..192),
        _ => None,
    }
}

/// xorshift64*: a fast seeded byte stream for weight values.
struct ByteStream(u64);

impl ByteStream {
    /// A stream for `(seed, row)`, its state spread by SplitMix64 (never zero).
    fn new(seed: u64, row: u64) -> Self {
        let mut z =
            (seed ^ row.wrapping_mul(0xD1B5_4A32_D192_ED03)).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Self((z ^ (z >> 31)) | 1)
    }

    fn fill(&mut self, dst: &mut [u8]) {
        for chunk in dst.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The bytes of one quantized matrix (see [`ShapeSpec`] for how).
fn shaped_matrix(
    rows: usize,
    cols: usize,
    dtype: GgmlDType,
    seed: u64,
) -> candle_core::Result<Vec<u8>> {
    const PATTERN_ROWS: usize = 8;
    let p = rows.min(PATTERN_ROWS);
    let mut rng = SplitMix(seed);
    let scale = (3.0 / cols as f32).sqrt();
    let t = Tensor::from_vec(rng.values(p * cols, 0.0, scale), (p, cols), &Device::Cpu)?;
    let pattern = QTensor::quantize(&t, dtype)?.data()?.into_owned();
    let row_bytes = pattern.len() / p;
    let block_bytes = dtype.type_size();
    let values = value_bytes(dtype);
    let mut out = vec![0u8; rows * row_bytes];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rows_per = rows.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (ci, chunk) in out.chunks_mut(rows_per * row_bytes).enumerate() {
            let pattern = &pattern;
            let values = values.clone();
            s.spawn(move || {
                for (ri, row) in chunk.chunks_mut(row_bytes).enumerate() {
                    let r = ci * rows_per + ri;
                    row.copy_from_slice(&pattern[(r % p) * row_bytes..(r % p + 1) * row_bytes]);
                    if let Some(range) = &values {
                        let mut stream = ByteStream::new(seed, r as u64);
                        for block in row.chunks_mut(block_bytes) {
                            stream.fill(&mut block[range.clone()]);
                        }
                    }
                }
            });
        }
    });
    Ok(out)
}

/// The GGUF metadata value type code of `v`.
pub fn gguf_value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn put_value(buf: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => buf.push(u8::from(*x)),
        Value::String(s) => put_string(buf, s),
        Value::Array(items) => {
            let ty = items.first().map_or(4, gguf_value_type);
            buf.extend_from_slice(&ty.to_le_bytes());
            buf.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(buf, item);
            }
        }
    }
}

/// Writes the real-shape model `spec` to `path` (GGUF v3, alignment 32), one tensor at a time.
/// Returns the file size in bytes.
pub fn write_shaped_gguf(path: &Path, spec: &ShapeSpec) -> Result<u64, ModelError> {
    use std::io::Write;
    spec.check()?;
    let io_err = |source| ModelError::Io {
        context: format!("cannot write {}", path.display()),
        source,
    };
    let syn = |e: candle_core::Error| ModelError::Synthetic(e.to_string());
    let mut metadata = tiny_metadata(&spec.tiny());
    for (k, v) in metadata.iter_mut() {
        if k == "general.name" {
            *v = Value::String(format!("shape-{}", spec.name));
        } else if k.ends_with(".vocab_size") {
            *v = Value::U32(spec.vocab as u32);
        }
    }
    let plan = spec.plan();
    let mut head = Vec::new();
    head.extend_from_slice(&0x4655_4747u32.to_le_bytes());
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(plan.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in &metadata {
        put_string(&mut head, k);
        head.extend_from_slice(&gguf_value_type(v).to_le_bytes());
        put_value(&mut head, v);
    }
    let pad = |n: usize| n.div_ceil(32) * 32 - n;
    let mut offset = 0usize;
    for t in &plan {
        put_string(&mut head, &t.name);
        head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for &d in t.dims.iter().rev() {
            head.extend_from_slice(&(d as u64).to_le_bytes());
        }
        head.extend_from_slice(&ggml_type_code(t.dtype).to_le_bytes());
        head.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += t.bytes() + pad(t.bytes());
    }
    head.resize(head.len() + pad(head.len()), 0);
    let file = File::create(path).map_err(|source| ModelError::Io {
        context: format!("cannot create {}", path.display()),
        source,
    })?;
    let mut w = BufWriter::with_capacity(1 << 22, file);
    w.write_all(&head).map_err(io_err)?;
    let mut total = head.len() as u64;
    let mut rng = SplitMix(spec.seed ^ 0x5AA9_E5EE_D000_0001);
    for (i, t) in plan.iter().enumerate() {
        let bytes = match t.vector {
            Some((center, scale)) => rng
                .values(t.dims[0], center, scale)
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            None => shaped_matrix(
                t.dims[0],
                t.dims[1],
                t.dtype,
                spec.seed.wrapping_mul(0x0100_0000_01B3) ^ (i as u64 + 1),
            )
            .map_err(syn)?,
        };
        debug_assert_eq!(bytes.len(), t.bytes());
        w.write_all(&bytes).map_err(io_err)?;
        w.write_all(&vec![0u8; pad(bytes.len())]).map_err(io_err)?;
        total += (bytes.len() + pad(bytes.len())) as u64;
    }
    w.flush().map_err(io_err)?;
    Ok(total)
}
