//! Causal attention of a ragged batch, each session against its own cached prefix.
//!
//! The CPU kernel works on one query row and one kv head at a time (the query heads that share
//! that kv head, grouped-query attention) with a fixed summation order per head, so a position's
//! output is the same bit pattern whether it is computed alone or inside a block or a batch
//! (candle's f32 `matmul` picks different kernels for different shapes). Units are spread
//! over our kernels' worker pool (`kernels::pool`), the one the matmuls use: candle's pool would
//! keep a second set of threads spinning on the cores our matmuls run on. Other devices use
//! candle tensor ops per session.

use std::cell::RefCell;

use candle_core::{DType, Device, Result, Tensor};

use super::kv::{LayerKv, StagedKv};
use crate::kernels::exp::exp_inplace;
use crate::kernels::vecf32::{dot, dot4, dot4x2, prefetch, weighted_sum_heads};

/// Attention shape constants of one model.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadShape {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

impl HeadShape {
    fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
    fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
    fn group(&self) -> usize {
        self.n_head / self.n_kv_head
    }
}

/// One session's slice of the batch for one layer: its cached prefix and its new rows.
pub(crate) struct SessionRows<'a> {
    /// First row of this session in the batch matrices.
    pub row0: usize,
    /// Number of new rows.
    pub len: usize,
    /// Cached positions kept before the new rows.
    pub start: usize,
    /// This layer's cache (`None` for a new session).
    pub cache: Option<&'a LayerKv>,
}

/// `q: [rows, n_head*hd]` (rotated) against the staged new keys/values of the same rows and each
/// session's cached prefix. Returns `[rows, n_head*hd]`.
pub(crate) fn attention(
    shape: HeadShape,
    q: &Tensor,
    new: &StagedKv,
    sessions: &[SessionRows<'_>],
) -> Result<Tensor> {
    match new {
        StagedKv::Host { k, v, .. } if q.device().is_cpu() => {
            cpu_attention(shape, q, (k, v), sessions)
        }
        StagedKv::Host { k, v, width } => {
            let rows = q.dim(0)?;
            let k = Tensor::from_slice(k, (rows, *width), q.device())?;
            let v = Tensor::from_slice(v, (rows, *width), q.device())?;
            tensor_attention(shape, q, (&k, &v), sessions)
        }
        StagedKv::Device { k, v } => tensor_attention(shape, q, (k, v), sessions),
    }
}

/// Keys or values of one session: the cached prefix followed by the new rows.
struct Rows<'a> {
    cached: &'a [f32],
    new: &'a [f32],
    start: usize,
    width: usize,
}

impl Rows<'_> {
    #[inline]
    fn at(&self, pos: usize, offset: usize, len: usize) -> &[f32] {
        let (buf, p) = if pos < self.start {
            (self.cached, pos)
        } else {
            (self.new, pos - self.start)
        };
        let s = p * self.width + offset;
        &buf[s..s + len]
    }
}

fn cpu_attention(
    shape: HeadShape,
    q: &Tensor,
    (k, v): (&[f32], &[f32]),
    sessions: &[SessionRows<'_>],
) -> Result<Tensor> {
    let rows = q.dim(0)?;
    let (q_dim, kv_dim, hd) = (shape.q_dim(), shape.kv_dim(), shape.head_dim);
    let q = q.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; rows * q_dim];

    // (session index, position) of every batch row.
    let mut row_info = Vec::with_capacity(rows);
    let mut kvs = Vec::with_capacity(sessions.len());
    for (si, s) in sessions.iter().enumerate() {
        let (ck, cv): (&[f32], &[f32]) = match s.cache {
            Some(c) => c.host_prefix(s.start),
            None => (&[], &[]),
        };
        let new = s.row0 * kv_dim..(s.row0 + s.len) * kv_dim;
        let mk = |cached, new| Rows {
            cached,
            new,
            start: s.start,
            width: kv_dim,
        };
        kvs.push((mk(ck, &k[new.clone()]), mk(cv, &v[new])));
        row_info.extend((0..s.len).map(|i| (si, s.start + i)));
    }

    let scale = 1.0 / (hd as f32).sqrt();
    let group = shape.group();
    // A unit is one row and kv head: the `group` query heads that read the same keys and values
    // (their outputs are adjacent in the row).
    let mut units: Vec<(usize, &mut [f32])> = out.chunks_mut(group * hd).enumerate().collect();
    let work = |(unit, dst): &mut (usize, &mut [f32])| {
        SCRATCH.with(|scratch| {
            let (row, g) = (*unit / shape.n_kv_head, *unit % shape.n_kv_head);
            let (si, pos) = row_info[row];
            let q0 = row * q_dim + g * group * hd;
            let query = Query {
                q: &q[q0..q0 + group * hd],
                pos,
                kv_off: g * hd,
                scale,
            };
            attend_group(&query, hd, &kvs[si], &mut scratch.borrow_mut(), dst);
        })
    };
    // Waking the worker pool costs more than it saves on small work (a decode step over a short
    // context); which thread computes a unit never changes its result.
    let macs: usize = row_info.iter().map(|&(_, pos)| (pos + 1) * q_dim).sum();
    if macs < PARALLEL_MIN_MACS {
        units.iter_mut().for_each(work);
    } else {
        crate::kernels::pool().for_each_mut(&mut units, work);
    }
    drop(units);
    Tensor::from_vec(out, (rows, q_dim), &Device::Cpu)
}

/// Below this many multiply-adds (per K or V pass) attention runs on the calling thread. The
/// pool's workers are still spinning from the matmul just before, so handing out units is cheap:
/// on the 1.5B, 2¹⁸ instead of 2²⁰ made a verification block of 5 after 128 tokens 1.7 ms faster
/// (48.5 → 46.8 ms, medians of 4 alternating runs); 2¹⁶ was no better.
const PARALLEL_MIN_MACS: usize = 1 << 18;

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The query heads of one kv head in one query row.
struct Query<'a> {
    /// The heads' queries, one after the other.
    q: &'a [f32],
    /// Absolute position: the row attends to keys `0..=pos`.
    pos: usize,
    /// Offset of the kv head inside a key/value row.
    kv_off: usize,
    scale: f32,
}

/// Keys (and values) a pass over all of a unit's heads takes at a time: 16 KiB of a 128-wide
/// head, which stays in L1 while every head reads it (one head after the other streamed the whole
/// prefix from L2 once per head).
const KEY_BLOCK: usize = 32;

/// How many positions ahead of the scores the keys are prefetched.
const PREFETCH: usize = 16;

/// The heads of `query` against positions `0..=pos`; fixed summation order for each head (the
/// same as one head alone: the scores are dot products, each softmax sums in position order,
/// and the weighted sum adds the values in position order, a block onto the blocks before).
fn attend_group(
    query: &Query<'_>,
    hd: usize,
    (keys, values): &(Rows<'_>, Rows<'_>),
    scores: &mut Vec<f32>,
    dst: &mut [f32],
) {
    let Query {
        q,
        pos,
        kv_off,
        scale,
    } = *query;
    let n = pos + 1;
    let heads = q.len() / hd;
    scores.clear();
    scores.resize(heads * n, 0.0);
    let key = |j: usize| keys.at(j, kv_off, hd);
    let value = |j: usize| values.at(j, kv_off, hd);
    // The cache (a layer's keys and values, read once a forward) comes from memory: the keys
    // PREFETCH positions ahead of the scores, and the values at the same pace for the weighted
    // sums after them.
    for j in 0..n.min(PREFETCH) {
        prefetch(key(j));
    }
    for j0 in (0..n).step_by(KEY_BLOCK) {
        let j1 = (j0 + KEY_BLOCK).min(n);
        let quads = j0 + (j1 - j0) / 4 * 4;
        for j in (j0..quads).step_by(4) {
            for a in j..j + 4 {
                if a + PREFETCH < n {
                    prefetch(key(a + PREFETCH));
                }
                prefetch(value(a));
            }
            let ks = [key(j), key(j + 1), key(j + 2), key(j + 3)];
            // Two heads at a time against the same four keys, then the odd head alone.
            let mut h = 0;
            while h + 2 <= heads {
                let qs = [&q[h * hd..(h + 1) * hd], &q[(h + 1) * hd..(h + 2) * hd]];
                let s = dot4x2(qs, ks);
                for (t, s) in s.iter().enumerate() {
                    for (d, s) in scores[(h + t) * n + j..][..4].iter_mut().zip(s) {
                        *d = s * scale;
                    }
                }
                h += 2;
            }
            if h < heads {
                let s = dot4(&q[h * hd..(h + 1) * hd], ks);
                for (d, s) in scores[h * n + j..][..4].iter_mut().zip(s) {
                    *d = s * scale;
                }
            }
        }
        for j in quads..j1 {
            prefetch(value(j));
            for (qh, sh) in q.chunks_exact(hd).zip(scores.chunks_exact_mut(n)) {
                sh[j] = dot(qh, key(j)) * scale;
            }
        }
    }
    for sh in scores.chunks_exact_mut(n) {
        let max = sh.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        for s in sh.iter_mut() {
            *s -= max;
        }
        exp_inplace(sh);
        let sum = sh.iter().fold(0f32, |a, &s| a + s);
        let inv = 1.0 / sum;
        for s in sh.iter_mut() {
            *s *= inv;
        }
    }
    let rows: Vec<&[f32]> = (0..n).map(value).collect();
    weighted_sum_heads(dst, heads, scores, &rows);
}

pub(crate) fn tensor_attention(
    shape: HeadShape,
    q: &Tensor,
    (k, v): (&Tensor, &Tensor),
    sessions: &[SessionRows<'_>],
) -> Result<Tensor> {
    let hd = shape.head_dim;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut outs = Vec::with_capacity(sessions.len());
    for s in sessions {
        let q_s = q.narrow(0, s.row0, s.len)?;
        let mut k_s = k.narrow(0, s.row0, s.len)?;
        let mut v_s = v.narrow(0, s.row0, s.len)?;
        if let (Some(cache), true) = (s.cache, s.start > 0) {
            let (ck, cv) = cache.device_prefix(s.start)?;
            k_s = Tensor::cat(&[&ck, &k_s], 0)?;
            v_s = Tensor::cat(&[&cv, &v_s], 0)?;
        }
        let total = s.start + s.len;
        // [heads, rows, hd]
        let q_s = q_s.reshape((s.len, shape.n_head, hd))?.transpose(0, 1)?;
        let expand = |t: Tensor| -> Result<Tensor> {
            let t = t.reshape((total, shape.n_kv_head, 1, hd))?;
            let t = t.broadcast_as((total, shape.n_kv_head, shape.group(), hd))?;
            t.reshape((total, shape.n_head, hd))?
                .transpose(0, 1)?
                .contiguous()
        };
        let (k_s, v_s) = (expand(k_s)?, expand(v_s)?);
        let scores = (q_s.contiguous()?.matmul(&k_s.t()?)? * scale)?;
        // Row i (position start+i) sees keys 0..=start+i.
        let mask: Vec<f32> = (0..s.len)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if j <= s.start + i {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (1, s.len, total), q.device())?.to_dtype(DType::F32)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
        let o = probs.matmul(&v_s)?; // [heads, rows, hd]
        outs.push(o.transpose(0, 1)?.reshape((s.len, shape.q_dim()))?);
    }
    Tensor::cat(&outs, 0)?.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// The CPU kernel and the tensor path (used on CUDA) agree to rounding on a ragged batch
    /// with cached prefixes, including one new session.
    #[test]
    fn cpu_kernel_matches_tensor_ops() {
        let shape = HeadShape {
            n_head: 4,
            n_kv_head: 2,
            head_dim: 16,
        };
        let kv_dim = shape.kv_dim();
        let cache = |len: usize, seed: u32| LayerKv::Host {
            k: values(len * kv_dim, seed),
            v: values(len * kv_dim, seed + 1),
            width: kv_dim,
        };
        let (c0, c1) = (cache(7, 10), cache(3, 20));
        // Session 0 keeps 5 of its 7 cached positions and adds 3; session 1 keeps 3 and adds 1;
        // session 2 is new with 4 rows.
        let sessions = [
            SessionRows {
                row0: 0,
                len: 3,
                start: 5,
                cache: Some(&c0),
            },
            SessionRows {
                row0: 3,
                len: 1,
                start: 3,
                cache: Some(&c1),
            },
            SessionRows {
                row0: 4,
                len: 4,
                start: 0,
                cache: None,
            },
        ];
        let rows = 8;
        let q = Tensor::from_vec(
            values(rows * shape.q_dim(), 1),
            (rows, shape.q_dim()),
            &Device::Cpu,
        )
        .unwrap();
        let staged = StagedKv::Host {
            k: values(rows * kv_dim, 2),
            v: values(rows * kv_dim, 3),
            width: kv_dim,
        };
        let StagedKv::Host { k, v, .. } = &staged else {
            unreachable!()
        };
        let ours = cpu_attention(shape, &q, (k, v), &sessions).unwrap();
        let kt = Tensor::from_slice(k, (rows, kv_dim), &Device::Cpu).unwrap();
        let vt = Tensor::from_slice(v, (rows, kv_dim), &Device::Cpu).unwrap();
        let reference = tensor_attention(shape, &q, (&kt, &vt), &sessions).unwrap();
        let diff = (ours - reference)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "max |Δ| = {diff}");
    }
}
