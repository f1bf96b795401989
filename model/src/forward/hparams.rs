//! Hyperparameters read from GGUF metadata, and the two architectures we implement.

use candle_core::quantized::gguf_file::{Content, Value};

use crate::ModelError;

/// The GGUF architectures this forward implements. They differ only in details: qwen2 has q/k/v
/// biases and NeoX-style (half-split) rotary embeddings; llama has no biases and GGUF stores its
/// q/k weights permuted for interleaved (GPT-J-style) rotary embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arch {
    Qwen2,
    Llama,
}

impl Arch {
    pub(crate) fn parse(name: &str) -> Result<Self, ModelError> {
        match name {
            "qwen2" => Ok(Arch::Qwen2),
            "llama" => Ok(Arch::Llama),
            other => Err(ModelError::UnsupportedArch(other.to_string())),
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Arch::Qwen2 => "qwen2",
            Arch::Llama => "llama",
        }
    }

    /// Whether rotary embeddings rotate interleaved pairs `(x[2i], x[2i+1])` (llama as stored in
    /// GGUF) rather than halves `(x[i], x[i + d/2])` (qwen2).
    pub(crate) fn interleaved_rope(self) -> bool {
        matches!(self, Arch::Llama)
    }
}

/// Shapes and constants of one model.
#[derive(Debug, Clone)]
pub(crate) struct Hparams {
    pub arch: Arch,
    pub n_layer: usize,
    pub hidden: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub rope_base: f32,
    pub rms_eps: f64,
    pub context: usize,
    pub vocab: usize,
}

impl Hparams {
    /// Reads `{arch}.*` keys; the vocabulary size comes from the rows of `token_embd.weight`.
    pub(crate) fn from_gguf(ct: &Content, path: &str) -> Result<Self, ModelError> {
        let load_err = |reason: String| ModelError::Load {
            path: path.to_string(),
            reason,
        };
        let arch_name = get(ct, "general.architecture", path)?
            .to_string()
            .map_err(|e| load_err(e.to_string()))?
            .clone();
        let arch = Arch::parse(&arch_name)?;
        let a = arch.name();
        let int = |key: &str| -> Result<usize, ModelError> {
            let v = get(ct, &format!("{a}.{key}"), path)?;
            as_usize(v).ok_or_else(|| load_err(format!("metadata `{a}.{key}` is not an integer")))
        };
        let float = |key: &str, default: f64| -> Result<f64, ModelError> {
            match ct.metadata.get(&format!("{a}.{key}")) {
                None => Ok(default),
                Some(v) => as_f64(v)
                    .ok_or_else(|| load_err(format!("metadata `{a}.{key}` is not a number"))),
            }
        };
        let n_layer = int("block_count")?;
        let hidden = int("embedding_length")?;
        let n_head = int("attention.head_count")?;
        let n_kv_head = match ct.metadata.get(&format!("{a}.attention.head_count_kv")) {
            Some(v) => as_usize(v).ok_or_else(|| load_err("bad head_count_kv".into()))?,
            None => n_head,
        };
        let head_dim = match ct.metadata.get(&format!("{a}.attention.key_length")) {
            Some(v) => as_usize(v).ok_or_else(|| load_err("bad key_length".into()))?,
            None if n_head > 0 => hidden / n_head,
            None => 0,
        };
        let context = int("context_length")?;
        let rope_base = float("rope.freq_base", 10_000.0)? as f32;
        let rms_eps = float("attention.layer_norm_rms_epsilon", 1e-6)?;
        // candle computes a tensor's element count and byte size without overflow checks: a
        // shape whose product overflows passes its size check with wrapped (tiny) numbers and
        // yields a tensor whose shape claims more than its data holds.
        for (name, t) in &ct.tensor_infos {
            let bytes = t
                .shape
                .dims()
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .map(|n| n / t.ggml_dtype.block_size())
                .and_then(|blocks| blocks.checked_mul(t.ggml_dtype.type_size()));
            // An empty tensor is no weight either; candle asserts on its (dangling) data pointer.
            if bytes.is_none() || t.shape.dims().contains(&0) {
                return Err(load_err(format!(
                    "tensor `{name}` has shape {:?}: empty or too large",
                    t.shape.dims()
                )));
            }
        }
        let embd = ct
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| load_err("missing tensor `token_embd.weight`".into()))?;
        let (vocab, embd_width) = embd.shape.dims2().map_err(|e| load_err(e.to_string()))?;
        // The widths must be those of the weights: buffers are sized from these numbers (a
        // key_length of 2^30 made the first forward build gigabytes of rotary tables), the layers
        // are reserved from block_count before their tensors are read, and the attention kernel
        // slices the q/k/v rows by them (a v projection one row wide made it index past them).
        let last_block = n_layer
            .checked_sub(1)
            .map(|i| format!("blk.{i}.attn_q.weight"));
        let mut agree = embd_width == hidden
            && last_block.is_none_or(|name| ct.tensor_infos.contains_key(&name));
        let dims = |name: String| ct.tensor_infos.get(&name).map(|t| t.shape.dims().to_vec());
        let q_width = n_head.checked_mul(head_dim);
        let kv_width = n_kv_head.checked_mul(head_dim);
        for i in 0..n_layer {
            if !agree {
                break;
            }
            for (part, width) in [("q", q_width), ("k", kv_width), ("v", kv_width)] {
                let w = dims(format!("blk.{i}.attn_{part}.weight"));
                let b = dims(format!("blk.{i}.attn_{part}.bias"));
                agree &= width.is_some_and(|width| {
                    w.as_deref() == Some(&[width, hidden][..])
                        && b.as_deref().is_none_or(|b| b == [width])
                });
            }
        }
        if !agree {
            return Err(load_err(format!(
                "metadata disagrees with the weights: {n_layer} blocks, width {hidden}, \
                 {n_head} heads, {n_kv_head} kv heads, head dim {head_dim}"
            )));
        }
        if n_head == 0
            || n_kv_head == 0
            || n_head % n_kv_head != 0
            || head_dim == 0
            || head_dim % 2 != 0
        {
            return Err(load_err(format!(
                "inconsistent attention shape: {n_head} heads, {n_kv_head} kv heads, head dim {head_dim}"
            )));
        }
        Ok(Hparams {
            arch,
            n_layer,
            hidden,
            n_head,
            n_kv_head,
            head_dim,
            rope_base,
            rms_eps,
            context,
            vocab,
        })
    }
}

/// `general.architecture` (any name: no weights are built from it) and `{arch}.context_length`,
/// for the facts of a file whose weights are not loaded ([`super::read_model_info`]).
pub(crate) fn arch_and_context(ct: &Content, path: &str) -> Result<(String, usize), ModelError> {
    let load_err = |reason: String| ModelError::Load {
        path: path.to_string(),
        reason,
    };
    let arch = get(ct, "general.architecture", path)?
        .to_string()
        .map_err(|e| load_err(e.to_string()))?
        .clone();
    let key = format!("{arch}.context_length");
    let context = as_usize(get(ct, &key, path)?)
        .filter(|&n| n > 0)
        .ok_or_else(|| load_err(format!("metadata `{key}` is not a count")))?;
    Ok((arch, context))
}

fn get<'a>(ct: &'a Content, key: &str, path: &str) -> Result<&'a Value, ModelError> {
    ct.metadata.get(key).ok_or_else(|| ModelError::Load {
        path: path.to_string(),
        reason: format!("missing metadata key `{key}`"),
    })
}

fn as_usize(v: &Value) -> Option<usize> {
    match v {
        Value::U8(x) => Some(*x as usize),
        Value::U16(x) => Some(*x as usize),
        Value::U32(x) => Some(*x as usize),
        Value::U64(x) => usize::try_from(*x).ok(),
        Value::I8(x) => usize::try_from(*x).ok(),
        Value::I16(x) => usize::try_from(*x).ok(),
        Value::I32(x) => usize::try_from(*x).ok(),
        Value::I64(x) => usize::try_from(*x).ok(),
        _ => None,
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        other => as_usize(other).map(|x| x as f64),
    }
}
