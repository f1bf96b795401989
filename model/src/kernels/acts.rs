//! Activation quantization: the int8 rows every kernel multiplies, made once per layer group by
//! the same scalar code whatever the instruction set.

use super::QK_K;

/// How activations are quantized for a weight format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActFormat {
    /// 256-element blocks with 16-element sums.
    Q8K,
    /// 32-element blocks.
    Q8_0,
}

impl ActFormat {
    pub(super) fn block(self) -> usize {
        match self {
            ActFormat::Q8K => QK_K,
            ActFormat::Q8_0 => 32,
        }
    }
}

/// Quantized activation rows: `m` rows of `k` values in blocks of `act.block()`.
#[derive(Debug, Clone)]
pub(crate) struct Acts {
    pub k: usize,
    pub qs: Vec<i8>,
    /// One scale per block, row after row.
    pub d: Vec<f32>,
    /// Sums of 16 consecutive `qs` (Q8K only), row after row.
    pub bsums: Vec<i16>,
    pub format: ActFormat,
}

/// Rounds half to even for |v| ≤ 2²²: adding and subtracting 1.5·2²³ leaves an integer.
fn round_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

/// Quantizes `x` (`m` rows of `k`, `k` a multiple of the format's block).
pub(crate) fn quantize(x: &[f32], k: usize, format: ActFormat) -> Acts {
    let block = format.block();
    assert!(
        k.is_multiple_of(block) && x.len().is_multiple_of(k),
        "activation shape"
    );
    let nb = x.len() / block;
    let mut acts = Acts {
        k,
        qs: vec![0; x.len()],
        d: vec![0.0; nb],
        bsums: if format == ActFormat::Q8K {
            vec![0; x.len() / 16]
        } else {
            Vec::new()
        },
        format,
    };
    for ((xb, qb), d) in x
        .chunks_exact(block)
        .zip(acts.qs.chunks_exact_mut(block))
        .zip(acts.d.iter_mut())
    {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        if amax > 0.0 && amax.is_finite() {
            let id = 127.0 / amax;
            *d = amax / 127.0;
            for (q, v) in qb.iter_mut().zip(xb) {
                *q = round_even(v * id).clamp(-127.0, 127.0) as i8;
            }
        }
        // else: all zero (or non-finite: the row is garbage either way; zeros keep it finite
        // where candle would propagate NaN — the model never produces such rows).
    }
    if format == ActFormat::Q8K {
        for (s, q) in acts.bsums.iter_mut().zip(acts.qs.chunks_exact(16)) {
            *s = q.iter().map(|&v| i16::from(v)).sum();
        }
    }
    acts
}

impl Acts {
    /// Row `r`: values, block scales, 16-sums.
    pub(super) fn row(&self, r: usize) -> Row<'_> {
        let nb = self.k / self.format.block();
        let bs = if self.bsums.is_empty() {
            &self.bsums[..]
        } else {
            &self.bsums[r * self.k / 16..(r + 1) * self.k / 16]
        };
        (
            &self.qs[r * self.k..(r + 1) * self.k],
            &self.d[r * nb..(r + 1) * nb],
            bs,
        )
    }
}

/// One activation row: values, block scales, 16-sums (empty for Q8_0).
pub(crate) type Row<'a> = (&'a [i8], &'a [f32], &'a [i16]);
