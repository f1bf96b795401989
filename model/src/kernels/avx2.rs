//! AVX2 + FMA + F16C dot products, bit-identical to `scalar.rs` (same integer lanes, same fused
//! multiply-adds, same final lane tree; see the parent module's docs).
//!
//! The `#[target_feature]` functions are safe to call only where the features are present; the
//! public wrappers check [`detected`] once (cached) and assert it.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::{q4k_scales_mins, Q4K, Q6K, Q8_0, QK_K};

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
fn load(s: &[u8]) -> __m256i {
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

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16(b: &[u8]) -> f32 {
    let h = u16::from_le_bytes([b[0], b[1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum8(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

pub(super) fn dot_q4k(w: &[u8], xq: &[i8], xd: &[f32], xbs: &[i16]) -> f32 {
    assert!(detected());
    // SAFETY: the CPU has AVX2, FMA and F16C (asserted above).
    unsafe { q4k(w, xq, xd, xbs) }
}

pub(super) fn dot_q6k(w: &[u8], xq: &[i8], xd: &[f32], xbs: &[i16]) -> f32 {
    assert!(detected());
    // SAFETY: as in `dot_q4k`.
    unsafe { q6k(w, xq, xd, xbs) }
}

pub(super) fn dot_q8_0(w: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
    assert!(detected());
    // SAFETY: as in `dot_q4k`.
    unsafe { q8_0(w, xq, xd) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q4k(w: &[u8], xq: &[i8], xd: &[f32], xbs: &[i16]) -> f32 {
    let low = _mm256_set1_epi8(15);
    let mut acc = _mm256_setzero_ps();
    let mut accm = 0f32;
    for (b, blk) in w.chunks_exact(Q4K.bytes).enumerate() {
        let d = f16(&blk[0..2]) * xd[b];
        let dmin = f16(&blk[2..4]) * xd[b];
        let (sc, mn) = q4k_scales_mins(&blk[4..16]);
        let qs = &blk[16..144];
        let y = &xq[b * QK_K..(b + 1) * QK_K];
        let mut sumi = _mm256_setzero_si256();
        for c in 0..4 {
            let q4 = load(&qs[32 * c..]);
            let lo = _mm256_and_si256(q4, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q4), low);
            let p0 = _mm256_maddubs_epi16(lo, load_i8(&y[64 * c..]));
            let p1 = _mm256_maddubs_epi16(hi, load_i8(&y[64 * c + 32..]));
            let p0 = _mm256_madd_epi16(p0, _mm256_set1_epi16(i16::from(sc[2 * c])));
            let p1 = _mm256_madd_epi16(p1, _mm256_set1_epi16(i16::from(sc[2 * c + 1])));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p0, p1));
        }
        let bs = &xbs[b * 16..b * 16 + 16];
        let mut summ = 0i32;
        for j in 0..8 {
            summ += i32::from(mn[j]) * (i32::from(bs[2 * j]) + i32::from(bs[2 * j + 1]));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        accm = dmin.mul_add(summ as f32, accm);
    }
    hsum8(acc) - accm
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q6k(w: &[u8], xq: &[i8], xd: &[f32], xbs: &[i16]) -> f32 {
    let low = _mm256_set1_epi8(15);
    let two = _mm256_set1_epi8(3);
    let mut acc = _mm256_setzero_ps();
    let mut accc = 0f32;
    for (b, blk) in w.chunks_exact(Q6K.bytes).enumerate() {
        let (ql, rest) = blk.split_at(128);
        let (qh, rest) = rest.split_at(64);
        let (scales, dbytes) = rest.split_at(16);
        let d = f16(dbytes) * xd[b];
        let sc = |i: usize| i16::from(scales[i] as i8);
        let y = &xq[b * QK_K..(b + 1) * QK_K];
        let mut sumi = _mm256_setzero_si256();
        for n in 0..2 {
            let l0 = load(&ql[64 * n..]);
            let l1 = load(&ql[64 * n + 32..]);
            let h = load(&qh[32 * n..]);
            let hbits = |shift: i32| -> __m256i {
                let v = match shift {
                    0 => h,
                    2 => _mm256_srli_epi16::<2>(h),
                    4 => _mm256_srli_epi16::<4>(h),
                    _ => _mm256_srli_epi16::<6>(h),
                };
                _mm256_slli_epi16::<4>(_mm256_and_si256(v, two))
            };
            let quarters = [
                _mm256_or_si256(_mm256_and_si256(l0, low), hbits(0)),
                _mm256_or_si256(_mm256_and_si256(l1, low), hbits(2)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(l0), low), hbits(4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(l1), low), hbits(6)),
            ];
            for (i, q) in quarters.into_iter().enumerate() {
                let s = 8 * n + 2 * i;
                let p = _mm256_maddubs_epi16(q, load_i8(&y[128 * n + 32 * i..]));
                let scv = _mm256_set_m128i(_mm_set1_epi16(sc(s + 1)), _mm_set1_epi16(sc(s)));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scv));
            }
        }
        let bs = &xbs[b * 16..b * 16 + 16];
        let mut corr = 0i32;
        for (s, &v) in bs.iter().enumerate() {
            corr += i32::from(sc(s)) * i32::from(v);
        }
        corr *= 32;
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        accc = d.mul_add(corr as f32, accc);
    }
    hsum8(acc) - accc
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q8_0(w: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    for (b, blk) in w.chunks_exact(Q8_0.bytes).enumerate() {
        let d = f16(&blk[0..2]) * xd[b];
        let wv = load(&blk[2..]);
        let yv = load_i8(&xq[32 * b..]);
        // |w| · (y · sign w) = w · y; |−128| reads as 128 unsigned.
        let p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(yv, wv));
        let p = _mm256_madd_epi16(p, ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p), acc);
    }
    hsum8(acc)
}
