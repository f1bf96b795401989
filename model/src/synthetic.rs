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
        if self.hidden % block != 0 || self.ffn % block != 0 {
            return bad(format!(
                "hidden {} and ffn {} must be multiples of {block} for {:?}",
                self.hidden, self.ffn, self.weights
            ));
        }
        if self.n_head % self.n_kv_head != 0 || (self.hidden / self.n_head) % 2 != 0 {
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
