//! The transformer itself: weights, one ragged-batch forward, and the session table.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{QStorage, QTensor};
use candle_core::{Device, Tensor};

use super::attention::{attention, HeadShape, SessionRows};
use super::elementwise::{add_rms_norm, silu_mul};
use super::hparams::Hparams;
use super::kv::{SessionKv, StagedKv};
use super::linear::Linear;
use super::LoadOptions;
use crate::tokenizer::is_special_type;
use crate::{CausalLm, ModelError, ModelInfo, SeqLogits, SeqRequest, SessionId};

#[derive(Debug)]
struct Block {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// A validated batch entry: where its rows sit in the batch matrices.
#[derive(Debug, Clone, Copy)]
struct Segment {
    session: SessionId,
    start: usize,
    row0: usize,
    len: usize,
    /// Trailing rows that get logits.
    out_rows: usize,
}

/// A qwen2 or llama model read from GGUF, with its sessions' KV caches.
#[derive(Debug)]
pub(crate) struct GgufModel {
    info: ModelInfo,
    hp: Hparams,
    device: Device,
    embedding: QTensor,
    blocks: Vec<Block>,
    out_norm: Tensor,
    output: Linear,
    /// Token id of each output row where the head keeps only part of the vocabulary
    /// ([`LoadOptions::head_vocab`]); `None` when it computes every token's logit.
    head_ids: Option<Vec<u32>>,
    sessions: HashMap<SessionId, SessionKv>,
    /// KV caches as host vectors with the CPU attention kernel (true on the CPU); false keeps
    /// them as device tensors with tensor-op attention.
    host_kv: bool,
}

/// Reads tensors of one GGUF file.
struct Loader<'a> {
    ct: &'a Content,
    file: &'a mut File,
    device: &'a Device,
    path: String,
}

impl Loader<'_> {
    fn has(&self, name: &str) -> bool {
        self.ct.tensor_infos.contains_key(name)
    }

    fn qtensor(&mut self, name: &str) -> Result<QTensor, ModelError> {
        self.ct
            .tensor(self.file, name, self.device)
            .map_err(|e| ModelError::Load {
                path: self.path.clone(),
                reason: format!("tensor `{name}`: {e}"),
            })
    }

    /// Rows `rows` of the 2-d quantized tensor `name` (read on the host, then placed on the
    /// device); a quantized row is a whole number of blocks, so rows are copied byte for byte.
    fn qtensor_rows(&mut self, name: &str, rows: &[u32]) -> Result<QTensor, ModelError> {
        let err = |reason: String| ModelError::Load {
            path: self.path.clone(),
            reason: format!("tensor `{name}`: {reason}"),
        };
        let full = self
            .ct
            .tensor(self.file, name, &Device::Cpu)
            .map_err(|e| err(e.to_string()))?;
        let (n, k) = full.shape().dims2().map_err(|e| err(e.to_string()))?;
        let dtype = full.dtype();
        let row_bytes = k / dtype.block_size() * dtype.type_size();
        let data = full.data().map_err(|e| err(e.to_string()))?;
        let mut bytes = Vec::with_capacity(rows.len() * row_bytes);
        for &r in rows {
            let r = r as usize;
            if r >= n {
                return Err(err(format!("row {r} out of {n}")));
            }
            bytes.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
        }
        let storage = QStorage::from_data(Cow::Owned(bytes), self.device, dtype)
            .map_err(|e| err(e.to_string()))?;
        QTensor::new(storage, (rows.len(), k)).map_err(|e| err(e.to_string()))
    }

    fn f32(&mut self, name: &str) -> Result<Tensor, ModelError> {
        let q = self.qtensor(name)?;
        q.dequantize(self.device).map_err(|e| ModelError::Load {
            path: self.path.clone(),
            reason: format!("tensor `{name}`: {e}"),
        })
    }

    fn linear(&mut self, name: &str, bias: bool) -> Result<Linear, ModelError> {
        self.linear_rows(name, bias, None)
    }

    /// A linear layer, optionally with only the output rows `rows` (in that order) of the weight.
    fn linear_rows(
        &mut self,
        name: &str,
        bias: bool,
        rows: Option<&[u32]>,
    ) -> Result<Linear, ModelError> {
        let w = match rows {
            None => self.qtensor(&format!("{name}.weight"))?,
            Some(rows) => self.qtensor_rows(&format!("{name}.weight"), rows)?,
        };
        let bias_name = format!("{name}.bias");
        let b = if bias && self.has(&bias_name) {
            Some(self.f32(&bias_name)?)
        } else {
            None
        };
        Linear::new(w, b).map_err(|e| ModelError::Load {
            path: self.path.clone(),
            reason: format!("tensor `{name}`: {e}"),
        })
    }
}

impl GgufModel {
    pub(crate) fn load(
        ct: &Content,
        file: &mut File,
        device: &Device,
        path: &Path,
        opts: &LoadOptions,
    ) -> Result<Self, ModelError> {
        let shown = path.display().to_string();
        let hp = Hparams::from_gguf(ct, &shown)?;
        let head_ids = opts
            .head_vocab
            .filter(|&n| n < hp.vocab)
            .map(|n| head_rows(ct, n, hp.vocab));
        let mut ld = Loader {
            ct,
            file,
            device,
            path: shown.clone(),
        };
        let embedding = ld.qtensor("token_embd.weight")?;
        let mut blocks = Vec::with_capacity(hp.n_layer);
        for i in 0..hp.n_layer {
            let p = format!("blk.{i}");
            blocks.push(Block {
                attn_norm: ld.f32(&format!("{p}.attn_norm.weight"))?,
                q: ld.linear(&format!("{p}.attn_q"), true)?,
                k: ld.linear(&format!("{p}.attn_k"), true)?,
                v: ld.linear(&format!("{p}.attn_v"), true)?,
                o: ld.linear(&format!("{p}.attn_output"), false)?,
                ffn_norm: ld.f32(&format!("{p}.ffn_norm.weight"))?,
                gate: ld.linear(&format!("{p}.ffn_gate"), false)?,
                up: ld.linear(&format!("{p}.ffn_up"), false)?,
                down: ld.linear(&format!("{p}.ffn_down"), false)?,
            });
        }
        let out_norm = ld.f32("output_norm.weight")?;
        let head_name = if ld.has("output.weight") {
            "output"
        } else {
            "token_embd"
        };
        let output = ld.linear_rows(head_name, false, head_ids.as_deref())?;
        let load_err = |reason: String| ModelError::Load {
            path: shown.clone(),
            reason,
        };
        if head_ids.is_none() && output.out_dim() != hp.vocab {
            return Err(load_err(format!(
                "output projection has {} rows, vocabulary has {}",
                output.out_dim(),
                hp.vocab
            )));
        }
        let info = ModelInfo {
            arch: hp.arch.name().to_string(),
            name: super::model_name(ct, path),
            vocab_size: hp.vocab,
            max_context: hp.context,
            fingerprint: super::tokenizer_fingerprint(ct),
            // Keys and values (f32) of every layer's KV heads.
            kv_bytes_per_token: 2 * hp.n_layer * hp.n_kv_head * hp.head_dim * size_of::<f32>(),
        };
        tracing::info!(
            arch = %info.arch, name = %info.name, layers = hp.n_layer, hidden = hp.hidden,
            vocab = hp.vocab, head_rows = output.out_dim(), "model loaded"
        );
        Ok(Self {
            info,
            hp,
            device: device.clone(),
            embedding,
            blocks,
            out_norm,
            output,
            head_ids,
            sessions: HashMap::new(),
            host_kv: device.is_cpu(),
        })
    }

    /// Checks the whole batch before anything runs, so an error changes no cache.
    fn validate(&self, batch: &[SeqRequest]) -> Result<Vec<Segment>, ModelError> {
        if batch.is_empty() {
            return Err(ModelError::InvalidBatch("empty batch".into()));
        }
        let mut seen = HashSet::with_capacity(batch.len());
        let mut segments = Vec::with_capacity(batch.len());
        let mut row0 = 0;
        for req in batch {
            if !seen.insert(req.session) {
                return Err(ModelError::InvalidBatch(format!(
                    "session {} appears twice",
                    req.session
                )));
            }
            if req.tokens.is_empty() {
                return Err(ModelError::InvalidBatch(format!(
                    "session {} has no new tokens",
                    req.session
                )));
            }
            if req.tokens.iter().any(|&t| t as usize >= self.hp.vocab) {
                return Err(ModelError::TokenOutOfVocab {
                    vocab_size: self.hp.vocab,
                });
            }
            match self.sessions.get(&req.session) {
                None if req.start != 0 => return Err(ModelError::UnknownSession(req.session)),
                Some(kv) if req.start > kv.len() => {
                    return Err(ModelError::BadStart {
                        session: req.session,
                        start: req.start,
                        cached: kv.len(),
                    })
                }
                _ => {}
            }
            let len = req.start + req.tokens.len();
            if len > self.hp.context {
                return Err(ModelError::ContextOverflow {
                    session: req.session,
                    len,
                    max: self.hp.context,
                });
            }
            segments.push(Segment {
                session: req.session,
                start: req.start,
                row0,
                len: req.tokens.len(),
                out_rows: req.logits_for_last.clamp(1, req.tokens.len()),
            });
            row0 += req.tokens.len();
        }
        Ok(segments)
    }

    /// cos/sin tables `[rows, 1, head_dim/2]` for the positions of the batch rows.
    fn rope_tables(&self, positions: &[usize]) -> candle_core::Result<(Tensor, Tensor)> {
        let half = self.hp.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                1.0 / self
                    .hp
                    .rope_base
                    .powf((2 * i) as f32 / self.hp.head_dim as f32)
            })
            .collect();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let shape = (positions.len(), 1, half);
        Ok((
            Tensor::from_vec(cos, shape, &self.device)?,
            Tensor::from_vec(sin, shape, &self.device)?,
        ))
    }

    fn rope(&self, x: &Tensor, heads: usize, cs: &(Tensor, Tensor)) -> candle_core::Result<Tensor> {
        let rows = x.dim(0)?;
        let x = x.reshape((rows, heads, 1, self.hp.head_dim))?;
        let y = if self.hp.arch.interleaved_rope() {
            candle_nn::rotary_emb::rope_i(&x, &cs.0, &cs.1)?
        } else {
            candle_nn::rotary_emb::rope(&x, &cs.0, &cs.1)?
        };
        y.reshape((rows, heads * self.hp.head_dim))
    }

    /// Runs the validated batch; returns the logits of each segment's trailing `out_rows` rows,
    /// concatenated `[Σ out_rows, vocab]`, and every layer's staged K/V.
    fn run(
        &self,
        batch: &[SeqRequest],
        segments: &[Segment],
    ) -> candle_core::Result<(Tensor, Vec<StagedKv>)> {
        let ids: Vec<u32> = batch
            .iter()
            .flat_map(|r| r.tokens.iter().copied())
            .collect();
        let positions: Vec<usize> = segments
            .iter()
            .flat_map(|s| s.start..s.start + s.len)
            .collect();
        let rows = ids.len();
        let ids = Tensor::from_vec(ids, rows, &self.device)?;
        let x = self.embedding.embedding(&ids)?;
        let cs = self.rope_tables(&positions)?;
        let eps = self.hp.rms_eps as f32;
        let shape = HeadShape {
            n_head: self.hp.n_head,
            n_kv_head: self.hp.n_kv_head,
            head_dim: self.hp.head_dim,
        };
        let mut staged = Vec::with_capacity(self.blocks.len());
        // `x` the residual stream, `h` its norm for the next sublayer: block `i`'s attention norm,
        // the output norm after the last block.
        let norm_before = |i: usize| self.blocks.get(i).map_or(&self.out_norm, |b| &b.attn_norm);
        let (mut x, mut h) = add_rms_norm(&x, None, norm_before(0), eps)?;
        for (li, b) in self.blocks.iter().enumerate() {
            let qkv = Linear::forward_group(&[&b.q, &b.k, &b.v], &h)?;
            let q = self.rope(&qkv[0], shape.n_head, &cs)?;
            let k = self.rope(&qkv[1], shape.n_kv_head, &cs)?;
            let new = StagedKv::new(k, qkv[2].clone(), self.host_kv)?;
            let views: Vec<SessionRows<'_>> = segments
                .iter()
                .map(|s| SessionRows {
                    row0: s.row0,
                    len: s.len,
                    start: s.start,
                    cache: self.sessions.get(&s.session).map(|kv| &kv.layers[li]),
                })
                .collect();
            let a = attention(shape, &q, &new, &views)?;
            let (x1, h1) = add_rms_norm(&x, Some(&b.o.forward(&a)?), &b.ffn_norm, eps)?;
            let gu = Linear::forward_group(&[&b.gate, &b.up], &h1)?;
            let act = silu_mul(&gu[0], &gu[1])?;
            (x, h) = add_rms_norm(&x1, Some(&b.down.forward(&act)?), norm_before(li + 1), eps)?;
            staged.push(new);
        }
        // Only the rows that get logits go through the (vocabulary-wide) output projection.
        let rows_out: usize = segments.iter().map(|s| s.out_rows).sum();
        let h = if rows_out < rows {
            let keep: Vec<u32> = segments
                .iter()
                .flat_map(|s| (s.row0 + s.len - s.out_rows..s.row0 + s.len).map(|r| r as u32))
                .collect();
            h.index_select(&Tensor::from_vec(keep, rows_out, &self.device)?, 0)?
        } else {
            h
        };
        Ok((self.output.forward(&h)?, staged))
    }
}

impl CausalLm for GgufModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward_batch(&mut self, batch: &[SeqRequest]) -> Result<Vec<SeqLogits>, ModelError> {
        let segments = self.validate(batch)?;
        tracing::trace!(
            sessions = segments.len(),
            rows = segments.iter().map(|s| s.len).sum::<usize>(),
            "forward batch"
        );
        let (logits, staged) = self.run(batch, &segments)?;
        let logits: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        let logits = match &self.head_ids {
            None => logits,
            Some(ids) => scatter_rows(&logits, ids, self.hp.vocab),
        };
        for s in &segments {
            match self.sessions.get_mut(&s.session) {
                Some(kv) => kv.commit(s.start, &staged, (s.row0, s.len))?,
                None => {
                    let kv = SessionKv::from_staged(&staged, s.row0, s.len)?;
                    self.sessions.insert(s.session, kv);
                }
            }
        }
        let vocab = self.hp.vocab;
        if let [s] = segments.as_slice() {
            // The common case (one session) hands over the logits without another copy.
            return Ok(vec![SeqLogits {
                session: s.session,
                rows: s.out_rows,
                vocab_size: vocab,
                data: logits,
            }]);
        }
        let mut first = 0;
        Ok(segments
            .iter()
            .map(|s| {
                let data = logits[first * vocab..(first + s.out_rows) * vocab].to_vec();
                first += s.out_rows;
                SeqLogits {
                    session: s.session,
                    rows: s.out_rows,
                    vocab_size: vocab,
                    data,
                }
            })
            .collect())
    }

    fn truncate(&mut self, session: SessionId, len: usize) -> Result<(), ModelError> {
        let kv = self
            .sessions
            .get_mut(&session)
            .ok_or(ModelError::UnknownSession(session))?;
        kv.truncate(len)?;
        Ok(())
    }

    fn release(&mut self, session: SessionId) {
        self.sessions.remove(&session);
    }

    fn cached_len(&self, session: SessionId) -> Option<usize> {
        self.sessions.get(&session).map(SessionKv::len)
    }

    fn kv_bytes(&self) -> usize {
        self.sessions.values().map(SessionKv::bytes).sum()
    }
}

/// The output rows of a head limited to `n` tokens: ids `0..n` (byte-level BPE vocabularies
/// number tokens in merge order, so the first ids are the most frequent ones) and every control
/// or user-defined token above (end-of-turn and chat markers must stay reachable).
fn head_rows(ct: &Content, n: usize, vocab: usize) -> Vec<u32> {
    let types: &[Value] = match ct.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(types)) => types,
        _ => &[],
    };
    let special = |id: usize| {
        types
            .get(id)
            .and_then(|t| t.to_i32().ok())
            .is_some_and(is_special_type)
    };
    (0..vocab)
        .filter(|&id| id < n || special(id))
        .map(|id| id as u32)
        .collect()
}

/// Full-vocabulary logit rows from rows over `ids` only: every other token gets −∞ (probability
/// zero, never the argmax).
fn scatter_rows(kept: &[f32], ids: &[u32], vocab: usize) -> Vec<f32> {
    let rows = kept.len() / ids.len();
    let mut out = vec![f32::NEG_INFINITY; rows * vocab];
    for (src, dst) in kept
        .chunks_exact(ids.len())
        .zip(out.chunks_exact_mut(vocab))
    {
        for (&id, &v) in ids.iter().zip(src) {
            dst[id as usize] = v;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{write_tiny_gguf, TinySpec};

    fn load(path: &Path, host_kv: bool) -> GgufModel {
        let mut file = File::open(path).unwrap();
        let ct = Content::read(&mut file).unwrap();
        let mut m =
            GgufModel::load(&ct, &mut file, &Device::Cpu, path, &LoadOptions::default()).unwrap();
        m.host_kv = host_kv;
        m
    }

    fn req(session: SessionId, start: usize, tokens: Vec<u32>) -> SeqRequest {
        SeqRequest {
            session,
            start,
            tokens,
            logits_for_last: usize::MAX,
        }
    }

    /// The tensor path (what CUDA runs: device KV caches, tensor-op attention) agrees with the CPU
    /// kernel to rounding through prefill, ragged batches and truncation.
    #[test]
    fn device_kv_path_matches_host_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_gguf(&path, &TinySpec::default()).unwrap();
        let (mut host, mut dev) = (load(&path, true), load(&path, false));
        let batches = [
            vec![req(1, 0, vec![5, 6, 7, 8, 9]), req(2, 0, vec![40, 41])],
            vec![req(2, 2, vec![42, 43, 44]), req(1, 3, vec![10, 11])],
            vec![req(1, 5, vec![12]), req(3, 0, vec![1, 2, 3])],
        ];
        for batch in &batches {
            let a = host.forward_batch(batch).unwrap();
            let b = dev.forward_batch(batch).unwrap();
            for (x, y) in a.iter().zip(&b) {
                let max = x
                    .data
                    .iter()
                    .zip(&y.data)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0f32, f32::max);
                assert!(max < 1e-4, "session {}: max |Δ| = {max}", x.session);
            }
        }
        for s in 1..=3 {
            assert_eq!(host.cached_len(s), dev.cached_len(s));
        }
        dev.truncate(1, 2).unwrap();
        assert_eq!(dev.cached_len(1), Some(2));
        assert!(dev.kv_bytes() > 0);
    }
}
