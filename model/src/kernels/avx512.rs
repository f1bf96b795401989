//! AVX-512 (F, BW, VNNI) kernels for Q8_0 and Q4_K weights; Q6_K uses the AVX2 kernel.
//!
//! Two Q8_0 blocks per 512-bit register (block b in the low half, b + 1 in the high half), each
//! half's exact integer sum then taking its fused multiply-add in block order, as
//! `scalar::dot_q8_0` does. `vpdpbusd` computes each lane's sum of four products directly (the
//! integers are exact either way).
//!
//! These intrinsics are stable since Rust 1.89, this crate's `rust-version`.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::avx2::{f16, hsum_i32, load as load32, load_i16, q4k_scales_mins_u64};
use super::{Row, Q4K, Q8_0, QK_K};

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

/// As `avx2::block`, for Q8_0 (`q4k == false`) or Q4_K weights.
pub(super) fn block(
    q4k: bool,
    (w, rb): (&[u8], usize),
    rows: &[Row<'_>],
    out: &mut [f32],
    stride: usize,
) {
    assert!(detected());
    // SAFETY: the CPU has every feature `block_tf` enables (asserted above).
    unsafe { block_tf(q4k, (w, rb), rows, out, stride) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn block_tf(
    q4k_weights: bool,
    w: (&[u8], usize),
    rows: &[Row<'_>],
    out: &mut [f32],
    stride: usize,
) {
    // One row loop per format, each compiled on its own (see `row_major_block!` in `mod.rs`).
    if q4k_weights {
        rows_q4k(w, rows, out, stride)
    } else {
        rows_q8_0(w, rows, out, stride)
    }
}

row_loop!(rows_q4k, q4k, "avx512f,avx512bw,avx512vnni,avx2,fma,f16c");
row_loop!(rows_q8_0, q8_0, "avx512f,avx512bw,avx512vnni,avx2,fma,f16c");

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn q8_0<const R: usize>(w: &[u8], rows: [Row<'_>; R]) -> [f32; R] {
    let zero = _mm512_setzero_si512();
    let mut acc = [0f32; R];
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
            // Lanes 0..8: block b; lanes 8..16: block b + 1.
            let lo = hsum_i32(_mm512_castsi512_si256(p));
            let hi = hsum_i32(_mm512_extracti64x4_epi64::<1>(p));
            acc[r] = (d0 * rows[r].1[b]).mul_add(lo as f32, acc[r]);
            acc[r] = (d1 * rows[r].1[b + 1]).mul_add(hi as f32, acc[r]);
        }
        b += 2;
    }
    if !tail.is_empty() {
        let dw = f16(&tail[0..2]);
        let wv = load32(&tail[2..]);
        for r in 0..R {
            let yv = _mm256_loadu_si256_safe(&rows[r].0[32 * b..]);
            let p = _mm256_madd_epi16(
                _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(yv, wv)),
                _mm256_set1_epi16(1),
            );
            acc[r] = (dw * rows[r].1[b]).mul_add(hsum_i32(p) as f32, acc[r]);
        }
    }
    acc
}

#[inline(always)]
fn _mm256_loadu_si256_safe(s: &[i8]) -> __m256i {
    let s = &s[..32];
    // SAFETY: `s` is 32 readable bytes (sliced above); no alignment requirement.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

/// `[a; 16] ++ [b; 16]` as i16.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn halves_i16(a: i16, b: i16) -> __m512i {
    _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_set1_epi16(a)),
        _mm256_set1_epi16(b),
    )
}

/// Q4_K: each 32-byte chunk of quants becomes one register of its 32 low nibbles (elements
/// `64c..64c+32`, scale `2c`) and its 32 high nibbles (`64c+32..64c+64`, scale `2c+1`), against
/// 64 contiguous activations. Folding the two halves' i32 lanes (an exact integer add) gives the
/// AVX2 kernel's lanes, so the rest is the AVX2 kernel's float code.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn q4k<const R: usize>(w: &[u8], rows: [Row<'_>; R]) -> [f32; R] {
    let low = _mm256_set1_epi8(15);
    let pick: [__m512i; 4] = std::array::from_fn(|c| {
        let (s0, s1) = (2 * c as i16, 2 * c as i16 + 1);
        halves_i16(
            ((2 * s0 + 1) << 8) | (2 * s0),
            ((2 * s1 + 1) << 8) | (2 * s1),
        )
    });
    let mut acc = [0f32; R];
    let mut accm = [0f32; R];
    for (b, blk) in w.chunks_exact(Q4K.bytes).enumerate() {
        let dw = f16(&blk[0..2]);
        let dminw = f16(&blk[2..4]);
        let (sc, mn) = q4k_scales_mins_u64(&blk[4..16]);
        let sc16 = _mm512_broadcast_i32x4(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
        let mn16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64));
        let mn2 = _mm256_set_m128i(
            _mm_unpackhi_epi16(mn16, mn16),
            _mm_unpacklo_epi16(mn16, mn16),
        );
        let qs = &blk[16..144];
        let mut sumi = [_mm512_setzero_si512(); R];
        for (c, pk) in pick.iter().enumerate() {
            let q4 = load32(&qs[32 * c..]);
            let lo = _mm256_and_si256(q4, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q4), low);
            let qv = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            let s = _mm512_shuffle_epi8(sc16, *pk);
            for r in 0..R {
                let y = load64_i8(&rows[r].0[b * QK_K + 64 * c..]);
                let p = _mm512_madd_epi16(_mm512_maddubs_epi16(qv, y), s);
                sumi[r] = _mm512_add_epi32(sumi[r], p);
            }
        }
        for r in 0..R {
            let folded = _mm256_add_epi32(
                _mm512_castsi512_si256(sumi[r]),
                _mm512_extracti64x4_epi64::<1>(sumi[r]),
            );
            let xd = rows[r].1[b];
            let summ = hsum_i32(_mm256_madd_epi16(load_i16(&rows[r].2[b * 16..]), mn2));
            acc[r] = (dw * xd).mul_add(hsum_i32(folded) as f32, acc[r]);
            accm[r] = (dminw * xd).mul_add(summ as f32, accm[r]);
        }
    }
    std::array::from_fn(|r| acc[r] - accm[r])
}
