//! Activation quantization: the int8 rows every kernel multiplies, made once per layer group, with
//! the same bits whatever the instruction set.

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
        quantize_row(x, block, q, d, s16);
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

/// One row's blocks: scale `d = max|x| / 127`, values rounded half to even, and (where `s16` is
/// not empty) the sums of 16 consecutive values. With AVX2 sixteen values at a time, with the same
/// bits (the same IEEE operations per value; the maximum does not depend on the order): on the
/// calling thread this was 2 % of a verification block of 5.
pub(super) fn quantize_row(x: &[f32], block: usize, qs: &mut [i8], d: &mut [f32], s16: &mut [i16]) {
    #[cfg(target_arch = "x86_64")]
    if super::avx2::detected() && block.is_multiple_of(16) {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { quantize_row_avx2(x, block, qs, d, s16) };
    }
    quantize_row_any(x, block, qs, d);
    sums16(qs, s16);
}

/// `s16[i]` = the sum of `qs[16 i..16 i + 16]` (at most 16 · 127 in magnitude).
pub(super) fn sums16(qs: &[i8], s16: &mut [i16]) {
    for (s, q) in s16.iter_mut().zip(qs.chunks_exact(16)) {
        *s = q.iter().map(|&v| i16::from(v)).sum();
    }
}

pub(super) fn quantize_row_any(x: &[f32], block: usize, qs: &mut [i8], d: &mut [f32]) {
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn quantize_row_avx2(x: &[f32], block: usize, qs: &mut [i8], d: &mut [f32], s16: &mut [i16]) {
    use std::arch::x86_64::*;
    let load = |c: &[f32]| {
        let c = &c[..8];
        // SAFETY: `c` is 8 readable f32 (sliced above); `loadu` needs no alignment.
        unsafe { _mm256_loadu_ps(c.as_ptr()) }
    };
    let sign = _mm256_set1_ps(-0.0);
    let mut s16 = s16.chunks_exact_mut(block / 16);
    for ((xb, qb), d) in x
        .chunks_exact(block)
        .zip(qs.chunks_exact_mut(block))
        .zip(d.iter_mut())
    {
        let mut sb = s16.next();
        // `max` returns its second operand when either is NaN: NaNs are skipped, as by `f32::max`.
        // Two accumulators, each a chain of half the block's maxima (the order does not matter).
        let (mut m0, mut m1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for c in xb.chunks_exact(16) {
            m0 = _mm256_max_ps(_mm256_andnot_ps(sign, load(c)), m0);
            m1 = _mm256_max_ps(_mm256_andnot_ps(sign, load(&c[8..])), m1);
        }
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` is 8 writable f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_max_ps(m0, m1)) };
        let amax = lanes.iter().fold(0f32, |a, &v| a.max(v));
        if !(amax > 0.0 && amax.is_finite()) {
            // All zero (see `quantize_row_any`): so are the sums.
            if let Some(sb) = sb {
                sb.fill(0);
            }
            continue;
        }
        let id = 127.0 / amax;
        *d = amax / 127.0;
        let (idv, magic) = (_mm256_set1_ps(id), _mm256_set1_ps(12_582_912.0));
        let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        let quant = |v: __m256| {
            let r = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(v, idv), magic), magic);
            let r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
            // A NaN value converts to 0, as `as i8` does.
            let r = _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v), r);
            _mm256_cvtps_epi32(r)
        };
        for (t, (c, q)) in xb.chunks_exact(16).zip(qb.chunks_exact_mut(16)).enumerate() {
            let (a, b) = (quant(load(c)), quant(load(&c[8..])));
            // Lanes 0..8 of the two halves: 16 × i16, then 16 × i8, in element order.
            let w = _mm256_packs_epi32(a, b);
            let w = _mm256_permute4x64_epi64::<0b11_01_10_00>(w);
            let bytes =
                _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256::<1>(w));
            let q: &mut [i8; 16] = q.try_into().expect("16 values");
            // SAFETY: `q` is 16 writable bytes; `storeu` needs no alignment.
            unsafe { _mm_storeu_si128(q.as_mut_ptr().cast(), bytes) };
            if let Some(sb) = sb.as_deref_mut() {
                // The 16-sum: the eight i32 lanes of a + b, added across (exact in i32; at most
                // 16 · 127 in magnitude).
                let v = _mm256_add_epi32(a, b);
                let v = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
                let v = _mm_add_epi32(v, _mm_unpackhi_epi64(v, v));
                let v = _mm_add_epi32(v, _mm_shuffle_epi32::<0b01>(v));
                sb[t] = _mm_cvtsi128_si32(v) as i16;
            }
        }
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
