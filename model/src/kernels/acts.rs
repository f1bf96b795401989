//! Activation quantization: the int8 rows every kernel multiplies, made once per layer group by
//! the same scalar code whatever the instruction set.

use super::{Pool, QK_K};

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
    /// Sums of 32 consecutive `qs` (Q8K only), row after row: Q4_K's min terms pair 16-sums,
    /// and the interleaved kernels take each pair of these as one broadcast lane.
    pub bsums32: Vec<i16>,
    pub format: ActFormat,
}

/// Rounds half to even for |v| ≤ 2²²: adding and subtracting 1.5·2²³ leaves an integer.
fn round_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

/// Quantizes `x` (`m` rows of `k`, `k` a multiple of the format's block) on the calling thread.
#[cfg(test)]
pub(crate) fn quantize(x: &[f32], k: usize, format: ActFormat) -> Acts {
    quantize_in(None, x, k, format)
}

/// [`quantize`], its rows spread over `pool` where there are several (each row is quantized
/// alone, by the same code, so the split never changes a bit).
pub(crate) fn quantize_in(pool: Option<&Pool>, x: &[f32], k: usize, format: ActFormat) -> Acts {
    let block = format.block();
    assert!(
        k > 0 && k.is_multiple_of(block) && x.len().is_multiple_of(k),
        "activation shape"
    );
    let mut acts = Acts {
        k,
        qs: vec![0; x.len()],
        d: vec![0.0; x.len() / block],
        bsums: if format == ActFormat::Q8K {
            vec![0; x.len() / 16]
        } else {
            Vec::new()
        },
        bsums32: if format == ActFormat::Q8K {
            vec![0; x.len() / 32]
        } else {
            Vec::new()
        },
        format,
    };
    // Each row's 16- and 32-element sums (Q8K), or empty slices (Q8_0 keeps none).
    let sums = acts
        .bsums
        .chunks_exact_mut(k / 16)
        .zip(acts.bsums32.chunks_exact_mut(k / 32))
        .chain(std::iter::repeat_with(<(&mut [i16], &mut [i16])>::default));
    let mut rows: Vec<_> = x
        .chunks_exact(k)
        .zip(acts.qs.chunks_exact_mut(k))
        .zip(acts.d.chunks_exact_mut(k / block))
        .zip(sums)
        .map(|(((x, q), d), s)| (x, q, d, s))
        .collect();
    type Work<'a> = (
        &'a [f32],
        &'a mut [i8],
        &'a mut [f32],
        (&'a mut [i16], &'a mut [i16]),
    );
    let work = |(x, q, d, (s16, s32)): &mut Work<'_>| {
        quantize_row(x, block, q, d);
        for (s, q) in s16.iter_mut().zip(q.chunks_exact(16)) {
            *s = q.iter().map(|&v| i16::from(v)).sum();
        }
        // At most 32 · 127 in magnitude: no overflow.
        for (s, p) in s32.iter_mut().zip(s16.chunks_exact(2)) {
            *s = p[0] + p[1];
        }
    };
    match pool {
        Some(pool) if rows.len() > 1 => pool.for_each_mut(&mut rows, work),
        _ => rows.iter_mut().for_each(work),
    }
    drop(rows);
    acts
}

/// One row's blocks: scale `d = max|x| / 127`, values rounded half to even.
fn quantize_row(x: &[f32], block: usize, qs: &mut [i8], d: &mut [f32]) {
    for ((xb, qb), d) in x
        .chunks_exact(block)
        .zip(qs.chunks_exact_mut(block))
        .zip(d.iter_mut())
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
}

impl Acts {
    /// Row `r`: values, block scales, 16-sums, 32-sums.
    pub(super) fn row(&self, r: usize) -> Row<'_> {
        let nb = self.k / self.format.block();
        (
            &self.qs[r * self.k..(r + 1) * self.k],
            &self.d[r * nb..(r + 1) * nb],
            sums_of_row(&self.bsums, self.k / 16, r),
            sums_of_row(&self.bsums32, self.k / 32, r),
        )
    }
}

/// Row `r`'s `n` sums in `v` (empty when `v` is: Q8_0 keeps none).
fn sums_of_row(v: &[i16], n: usize, r: usize) -> &[i16] {
    if v.is_empty() {
        v
    } else {
        &v[r * n..(r + 1) * n]
    }
}

/// One activation row: values, block scales, 16-sums and 32-sums (both empty for Q8_0).
pub(crate) type Row<'a> = (&'a [i8], &'a [f32], &'a [i16], &'a [i16]);
