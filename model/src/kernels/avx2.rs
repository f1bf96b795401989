//! AVX2 + FMA + F16C dot products, bit-identical to `scalar.rs` (same integer lanes, same fused
//! multiply-adds, same final lane tree; see the parent module's docs).
//!
//! Each kernel takes one weight row and `R` (1, 2 or 4) activation rows: the weight's blocks are
//! unpacked once and multiplied into every row, which is what makes a verification block of a
//! few rows cost little more than one row. Per row the operations are exactly those of `R = 1`,
//! so the result of a row does not depend on `R`.
//!
//! The `#[target_feature]` functions are safe to call only where the features are present; the
//! wrappers check [`detected`] (cached) first.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::{Row, Q4K, Q6K, Q8_0, QK_K};

/// Whether this CPU has AVX2, FMA and F16C (checked once).
pub(super) fn detected() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// 32 bytes from the start of `s` (panics if shorter).
#[inline(always)]
pub(super) fn load(s: &[u8]) -> __m256i {
    let s = &s[..32];
    // SAFETY: `s` is 32 readable bytes (sliced above); `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

#[inline(always)]
fn load_i8(s: &[i8]) -> __m256i {
    let s = &s[..32];
    // SAFETY: as in `load`.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

#[inline(always)]
pub(super) fn load_i16(s: &[i16]) -> __m256i {
    let s = &s[..16];
    // SAFETY: `s` is 16 readable i16 (32 bytes, sliced above); no alignment requirement.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn f16(b: &[u8]) -> f32 {
    let h = u16::from_le_bytes([b[0], b[1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))))
}

/// Sum of 8 i32 lanes (exact: the caller keeps it in range).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<1>(s));
    _mm_cvtsi128_si32(s)
}

row_major_block!("avx2,fma,f16c");

/// Scales and mins of a Q4_K block as 8 + 8 bytes (the 6-bit fields unpacked with u32 masks).
#[inline(always)]
pub(super) fn q4k_scales_mins_u64(p: &[u8]) -> (u64, u64) {
    let word = |i: usize| u32::from_le_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
    let (a, b, c) = (word(0), word(4), word(8));
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let sc_lo = a & LOW6;
    let sc_hi = (c & LOW4) | (((a >> 6) & LOW2) << 4);
    let mn_lo = b & LOW6;
    let mn_hi = ((c >> 4) & LOW4) | (((b >> 6) & LOW2) << 4);
    (
        u64::from(sc_lo) | (u64::from(sc_hi) << 32),
        u64::from(mn_lo) | (u64::from(mn_hi) << 32),
    )
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4k<const R: usize>(w: &[u8], rows: [Row<'_>; R]) -> [f32; R] {
    let low = _mm256_set1_epi8(15);
    let mut acc = [0f32; R];
    let mut accm = [0f32; R];
    for (b, blk) in w.chunks_exact(Q4K.bytes).enumerate() {
        let dw = f16(&blk[0..2]);
        let dminw = f16(&blk[2..4]);
        let (sc, mn) = q4k_scales_mins_u64(&blk[4..16]);
        // 8 scales as i16 in both 128-bit halves; sub-block s is broadcast by a byte shuffle.
        let sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
        // Each min twice, lined up with the pairs of 16-sums of its 32-element sub-block.
        let mn16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64));
        let mn2 = _mm256_set_m128i(
            _mm_unpackhi_epi16(mn16, mn16),
            _mm_unpacklo_epi16(mn16, mn16),
        );
        let qs = &blk[16..144];
        let mut sumi = [_mm256_setzero_si256(); R];
        for c in 0..4 {
            let q4 = load(&qs[32 * c..]);
            let lo = _mm256_and_si256(q4, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q4), low);
            let pick =
                |s: i16| _mm256_shuffle_epi8(sc16, _mm256_set1_epi16(((2 * s + 1) << 8) | (2 * s)));
            let s0 = pick(2 * c as i16);
            let s1 = pick(2 * c as i16 + 1);
            for r in 0..R {
                let y = &rows[r].0[b * QK_K + 64 * c..];
                let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load_i8(y)), s0);
                let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load_i8(&y[32..])), s1);
                sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(p0, p1));
            }
        }
        for r in 0..R {
            let xd = rows[r].1[b];
            let summ = hsum_i32(_mm256_madd_epi16(load_i16(&rows[r].2[b * 16..]), mn2));
            acc[r] = (dw * xd).mul_add(hsum_i32(sumi[r]) as f32, acc[r]);
            accm[r] = (dminw * xd).mul_add(summ as f32, accm[r]);
        }
    }
    std::array::from_fn(|r| acc[r] - accm[r])
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q6k<const R: usize>(w: &[u8], rows: [Row<'_>; R]) -> [f32; R] {
    let low = _mm256_set1_epi8(15);
    let two = _mm256_set1_epi8(3);
    let mut acc = [0f32; R];
    for (b, blk) in w.chunks_exact(Q6K.bytes).enumerate() {
        let (ql, rest) = blk.split_at(128);
        let (qh, rest) = rest.split_at(64);
        let (scales, dbytes) = rest.split_at(16);
        let dw = f16(dbytes);
        let sc = |i: usize| i16::from(scales[i] as i8);
        let mut scv = [_mm256_setzero_si256(); 8];
        for (i, v) in scv.iter_mut().enumerate() {
            *v = _mm256_set_m128i(_mm_set1_epi16(sc(2 * i + 1)), _mm_set1_epi16(sc(2 * i)));
        }
        let mut sumi = [_mm256_setzero_si256(); R];
        for n in 0..2 {
            let l0 = load(&ql[64 * n..]);
            let l1 = load(&ql[64 * n + 32..]);
            let h = load(&qh[32 * n..]);
            let hb = |v: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(v, two));
            let quarters = [
                _mm256_or_si256(_mm256_and_si256(l0, low), hb(h)),
                _mm256_or_si256(_mm256_and_si256(l1, low), hb(_mm256_srli_epi16::<2>(h))),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(l0), low),
                    hb(_mm256_srli_epi16::<4>(h)),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(l1), low),
                    hb(_mm256_srli_epi16::<6>(h)),
                ),
            ];
            for (i, q) in quarters.into_iter().enumerate() {
                let s = scv[4 * n + i];
                for r in 0..R {
                    let y = &rows[r].0[b * QK_K + 128 * n + 32 * i..];
                    let p = _mm256_maddubs_epi16(q, load_i8(y));
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(p, s));
                }
            }
        }
        // Σ_s scale_s · 16-sum_s, for the −32 offset of every quant.
        let sc_all = _mm256_cvtepi8_epi16(_mm_loadu_si128_safe(scales));
        for r in 0..R {
            let xd = rows[r].1[b];
            let corr = hsum_i32(_mm256_madd_epi16(load_i16(&rows[r].2[b * 16..]), sc_all)) << 5;
            acc[r] = (dw * xd).mul_add((hsum_i32(sumi[r]) - corr) as f32, acc[r]);
        }
    }
    acc
}

/// 16 bytes from the start of `s` (panics if shorter).
#[inline(always)]
fn _mm_loadu_si128_safe(s: &[u8]) -> __m128i {
    let s = &s[..16];
    // SAFETY: `s` is 16 readable bytes (sliced above); no alignment requirement.
    unsafe { _mm_loadu_si128(s.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q8_0<const R: usize>(w: &[u8], rows: [Row<'_>; R]) -> [f32; R] {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [0f32; R];
    for (b, blk) in w.chunks_exact(Q8_0.bytes).enumerate() {
        let dw = f16(&blk[0..2]);
        let wv = load(&blk[2..]);
        let aw = _mm256_sign_epi8(wv, wv);
        for r in 0..R {
            let yv = load_i8(&rows[r].0[32 * b..]);
            // |w| · (y · sign w) = w · y; |−128| reads as 128 unsigned.
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(yv, wv)), ones);
            acc[r] = (dw * rows[r].1[b]).mul_add(hsum_i32(p) as f32, acc[r]);
        }
    }
    acc
}
