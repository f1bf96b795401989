//! AVX-512 (F, BW, VNNI) kernel for Q8_0 weights; the K-quant formats use the AVX2 kernels.
//!
//! Two Q8_0 blocks per 512-bit register: the low half accumulates the even blocks and the high
//! half the odd ones, which is exactly the two-chain order of `scalar::dot_q8_0` (and of the
//! AVX2 kernel), so the result is bit-identical to both. `vpdpbusd` computes each lane's sum of
//! four products directly (the integers are exact either way).
//!
//! These intrinsics are stable since Rust 1.89 (the workspace says 1.85; the AVX2 code needs
//! 1.87 for safe intrinsic calls in `#[target_feature]` functions too).
#![allow(clippy::incompatible_msrv)]

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::{Row, Q8_0};

/// Whether this CPU has AVX-512 F/BW/VNNI on top of AVX2/FMA/F16C (checked once).
pub(super) fn detected() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        super::avx2::detected()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    })
}

#[inline(always)]
fn load64_i8(s: &[i8]) -> __m512i {
    let s = &s[..64];
    // SAFETY: `s` is 64 readable bytes (sliced above); `loadu` has no alignment requirement.
    unsafe { _mm512_loadu_si512(s.as_ptr().cast()) }
}

#[inline(always)]
fn load32(s: &[u8]) -> __m256i {
    let s = &s[..32];
    // SAFETY: `s` is 32 readable bytes (sliced above); no alignment requirement.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

/// As `avx2::block`, for Q8_0 weights only.
pub(super) fn block_q8_0(
    (w, rb): (&[u8], usize),
    rows: &[Row<'_>],
    out: &mut [f32],
    stride: usize,
) {
    assert!(detected());
    // SAFETY: the CPU has every feature `block_tf` enables (asserted above).
    unsafe { block_tf((w, rb), rows, out, stride) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn block_tf((w, rb): (&[u8], usize), rows: &[Row<'_>], out: &mut [f32], stride: usize) {
    for (wrow, o) in w.chunks_exact(rb).zip(out.chunks_mut(stride)) {
        let mut j = 0;
        while j < rows.len() {
            if rows.len() - j >= 2 {
                let rs: [Row<'_>; 2] = rows[j..j + 2].try_into().expect("two rows");
                o[j..j + 2].copy_from_slice(&q8_0::<2>(wrow, rs));
                j += 2;
            } else {
                o[j] = q8_0::<1>(wrow, [rows[j]])[0];
                j += 1;
            }
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn f16(b: &[u8]) -> f32 {
    let h = u16::from_le_bytes([b[0], b[1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn hsum8(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

/// `[a; 8] ++ [b; 8]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn halves(a: f32, b: f32) -> __m512 {
    let lo = _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_set1_ps(a)));
    _mm512_castpd_ps(_mm512_insertf64x4::<1>(
        lo,
        _mm256_castps_pd(_mm256_set1_ps(b)),
    ))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn q8_0<const R: usize>(w: &[u8], rows: [Row<'_>; R]) -> [f32; R] {
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); R];
    let pairs = w.chunks_exact(2 * Q8_0.bytes);
    let tail = pairs.remainder();
    let mut b = 0;
    for pair in pairs {
        let (d0, d1) = (f16(&pair[0..2]), f16(&pair[34..36]));
        let w0 = _mm512_castsi256_si512(load32(&pair[2..34]));
        let wv = _mm512_inserti64x4::<1>(w0, load32(&pair[36..68]));
        let aw = _mm512_abs_epi8(wv);
        let neg = _mm512_movepi8_mask(wv);
        for r in 0..R {
            let y = load64_i8(&rows[r].0[32 * b..]);
            // y · sign w (w = 0 contributes 0 through |w|); |−128| reads as 128 unsigned.
            let sy = _mm512_mask_sub_epi8(y, neg, zero, y);
            let p = _mm512_dpbusd_epi32(zero, aw, sy);
            let d = halves(d0 * rows[r].1[b], d1 * rows[r].1[b + 1]);
            acc[r] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(p), acc[r]);
        }
        b += 2;
    }
    let mut out = [0f32; R];
    for r in 0..R {
        let mut even = _mm512_castps512_ps256(acc[r]);
        let odd = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc[r])));
        if !tail.is_empty() {
            // The last block has an even index: it closes the even chain.
            let dw = f16(&tail[0..2]);
            let wv = load32(&tail[2..]);
            let yv = _mm256_loadu_si256_safe(&rows[r].0[32 * b..]);
            let p = _mm256_madd_epi16(
                _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(yv, wv)),
                _mm256_set1_epi16(1),
            );
            let d = dw * rows[r].1[b];
            even = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p), even);
        }
        out[r] = hsum8(_mm256_add_ps(even, odd));
    }
    out
}

#[inline(always)]
fn _mm256_loadu_si256_safe(s: &[i8]) -> __m256i {
    let s = &s[..32];
    // SAFETY: `s` is 32 readable bytes (sliced above); no alignment requirement.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}
