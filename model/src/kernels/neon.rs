//! NEON (AArch64 Advanced SIMD) dot products for row-major Q4_K, Q6_K and Q8_0 weights,
//! bit-identical to `scalar.rs` (see the parent module's docs).
//!
//! Base NEON only, no `dotprod` extension (its intrinsics are not stable): a 16-byte register of
//! quants meets 16 activations as `vmull_s8` (low 8 lanes) plus `vmlal_high_s8` (high 8 lanes),
//! each i16 lane holding the sum of two products, then `vpadalq_s16` adds lane pairs into i32.
//! Exact: a product is at most 128·127 = 16256 in magnitude (Q8_0's −128 weight against ±127),
//! two of them 32512 < 32767. The float epilogue is the scalar one: per super-block (block for
//! Q8_0) the exact integer total takes one fused multiply-add, in block order.
//!
//! As in `avx2.rs`, a kernel takes one weight row and `R` (1, 2 or 4) activation rows, unpacking
//! each weight block once for the group; per row the operations are those of `R = 1`. There is
//! no interleaved-layout kernel on NEON: weights stay row-major ([`super::has_x16`]).
//!
//! NEON is part of every AArch64 Linux target's baseline, but the intrinsics are still
//! `#[target_feature(enable = "neon")]` functions: the kernels carry the feature, and [`block`]
//! checks [`detected`] before entering them.

use std::arch::aarch64::*;
use std::sync::OnceLock;

use super::{f16_to_f32, q4k_scales_mins, Row, Q4K, Q6K, Q8_0, QK_K};

/// Whether this CPU has NEON (checked once; true on every AArch64 Linux system).
pub(super) fn detected() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| std::arch::is_aarch64_feature_detected!("neon"))
}

/// 16 bytes from the start of `s` (panics if shorter).
#[inline]
#[target_feature(enable = "neon")]
fn load(s: &[u8]) -> uint8x16_t {
    let s = &s[..16];
    // SAFETY: `s` is 16 readable bytes (sliced above); `vld1q_u8` has no alignment requirement.
    unsafe { vld1q_u8(s.as_ptr()) }
}

#[inline]
#[target_feature(enable = "neon")]
fn load_i8(s: &[i8]) -> int8x16_t {
    let s = &s[..16];
    // SAFETY: as in `load`.
    unsafe { vld1q_s8(s.as_ptr()) }
}

#[inline]
#[target_feature(enable = "neon")]
fn load_i16(s: &[i16]) -> int16x8_t {
    let s = &s[..8];
    // SAFETY: `s` is 8 readable i16 (sliced above); `vld1q_s16` needs only i16 alignment, which
    // a `&[i16]` has.
    unsafe { vld1q_s16(s.as_ptr()) }
}

/// `acc + Σ q·y` over 16 quants and the first 16 activations of `y`, in four i32 lanes (exact,
/// see the module docs).
#[inline]
#[target_feature(enable = "neon")]
fn dot16(acc: int32x4_t, q: int8x16_t, y: &[i8]) -> int32x4_t {
    let y = load_i8(y);
    let p = vmlal_high_s8(vmull_s8(vget_low_s8(q), vget_low_s8(y)), q, y);
    vpadalq_s16(acc, p)
}

/// Bytes as the signed operand of [`dot16`] (unsigned quants are at most 63).
#[inline]
#[target_feature(enable = "neon")]
fn s8(v: uint8x16_t) -> int8x16_t {
    vreinterpretq_s8_u8(v)
}

row_major_block!("neon");

#[inline]
#[target_feature(enable = "neon")]
fn q4k<const R: usize>(w: &[u8], rows: [Row<'_>; R]) -> [f32; R] {
    let low = vdupq_n_u8(15);
    let mut acc = [0f32; R];
    let mut accm = [0f32; R];
    for (b, blk) in w.chunks_exact(Q4K.bytes).enumerate() {
        let dw = f16_to_f32([blk[0], blk[1]]);
        let dminw = f16_to_f32([blk[2], blk[3]]);
        let (sc, mn) = q4k_scales_mins(&blk[4..16]);
        // The 8 mins as i32, lined up with the pairwise sums of the 16-sums below.
        let mn16 = vmovl_u8(vcreate_u8(u64::from_le_bytes(mn)));
        let mn_lo = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(mn16)));
        let mn_hi = vreinterpretq_s32_u32(vmovl_high_u16(mn16));
        let qs = &blk[16..144];
        let mut sumi = [vdupq_n_s32(0); R];
        for c in 0..4 {
            let (qa, qb) = (load(&qs[32 * c..]), load(&qs[32 * c + 16..]));
            let lo = [s8(vandq_u8(qa, low)), s8(vandq_u8(qb, low))];
            let hi = [s8(vshrq_n_u8::<4>(qa)), s8(vshrq_n_u8::<4>(qb))];
            let (s0, s1) = (i32::from(sc[2 * c]), i32::from(sc[2 * c + 1]));
            for r in 0..R {
                let y = &rows[r].0[b * QK_K + 64 * c..b * QK_K + 64 * c + 64];
                let z = vdupq_n_s32(0);
                let p0 = dot16(dot16(z, lo[0], y), lo[1], &y[16..]);
                let p1 = dot16(dot16(z, hi[0], &y[32..]), hi[1], &y[48..]);
                sumi[r] = vmlaq_n_s32(vmlaq_n_s32(sumi[r], p0, s0), p1, s1);
            }
        }
        for r in 0..R {
            let bs = &rows[r].2[b * 16..b * 16 + 16];
            // Σ_j min_j · (bs[2j] + bs[2j+1]).
            let pairs_lo = vpaddlq_s16(load_i16(bs));
            let pairs_hi = vpaddlq_s16(load_i16(&bs[8..]));
            let summ = vaddvq_s32(vmlaq_s32(vmulq_s32(pairs_lo, mn_lo), pairs_hi, mn_hi));
            let xd = rows[r].1[b];
            acc[r] = (dw * xd).mul_add(vaddvq_s32(sumi[r]) as f32, acc[r]);
            accm[r] = (dminw * xd).mul_add(summ as f32, accm[r]);
        }
    }
    std::array::from_fn(|r| acc[r] - accm[r])
}

#[inline]
#[target_feature(enable = "neon")]
fn q6k<const R: usize>(w: &[u8], rows: [Row<'_>; R]) -> [f32; R] {
    let low = vdupq_n_u8(15);
    let top = vdupq_n_u8(0x30);
    let mut acc = [0f32; R];
    for (b, blk) in w.chunks_exact(Q6K.bytes).enumerate() {
        let (ql, rest) = blk.split_at(128);
        let (qh, rest) = rest.split_at(64);
        let (scales, dbytes) = rest.split_at(16);
        let dw = f16_to_f32([dbytes[0], dbytes[1]]);
        let mut sumi = [vdupq_n_s32(0); R];
        for n in 0..2 {
            let l: [uint8x16_t; 4] = std::array::from_fn(|k| load(&ql[64 * n + 16 * k..]));
            let h: [uint8x16_t; 2] = std::array::from_fn(|k| load(&qh[32 * n + 16 * k..]));
            // Quarter i, half k: elements 32·i + 16·k of this 128-element half, with high bits
            // `(h >> 2i) & 3` moved to bits 4–5.
            let quarter = |i: usize, k: usize| -> int8x16_t {
                let (lv, hv) = (l[k + 2 * (i & 1)], h[k]);
                let lq = if i < 2 {
                    vandq_u8(lv, low)
                } else {
                    vshrq_n_u8::<4>(lv)
                };
                let hq = match i {
                    0 => vshlq_n_u8::<4>(hv),
                    1 => vshlq_n_u8::<2>(hv),
                    2 => hv,
                    _ => vshrq_n_u8::<2>(hv),
                };
                s8(vorrq_u8(lq, vandq_u8(hq, top)))
            };
            let q: [[int8x16_t; 2]; 4] = std::array::from_fn(|i| [quarter(i, 0), quarter(i, 1)]);
            for (i, qi) in q.iter().enumerate() {
                for (k, &qk) in qi.iter().enumerate() {
                    let s = 8 * n + 2 * i + k;
                    let sc = i32::from(scales[s] as i8);
                    for r in 0..R {
                        let y = &rows[r].0[b * QK_K + 16 * s..b * QK_K + 16 * s + 16];
                        sumi[r] = vmlaq_n_s32(sumi[r], dot16(vdupq_n_s32(0), qk, y), sc);
                    }
                }
            }
        }
        // Σ_s scale_s · 16-sum_s, for the −32 offset of every quant.
        let sc8 = s8(load(scales));
        let (sc_lo, sc_hi) = (vmovl_s8(vget_low_s8(sc8)), vmovl_high_s8(sc8));
        for r in 0..R {
            let bs = &rows[r].2[b * 16..b * 16 + 16];
            let (b_lo, b_hi) = (load_i16(bs), load_i16(&bs[8..]));
            let c = vmull_s16(vget_low_s16(sc_lo), vget_low_s16(b_lo));
            let c = vmlal_high_s16(c, sc_lo, b_lo);
            let c = vmlal_s16(c, vget_low_s16(sc_hi), vget_low_s16(b_hi));
            let c = vmlal_high_s16(c, sc_hi, b_hi);
            let corr = vaddvq_s32(c) << 5;
            let xd = rows[r].1[b];
            acc[r] = (dw * xd).mul_add((vaddvq_s32(sumi[r]) - corr) as f32, acc[r]);
        }
    }
    acc
}

#[inline]
#[target_feature(enable = "neon")]
fn q8_0<const R: usize>(w: &[u8], rows: [Row<'_>; R]) -> [f32; R] {
    let mut acc = [0f32; R];
    for (b, blk) in w.chunks_exact(Q8_0.bytes).enumerate() {
        let dw = f16_to_f32([blk[0], blk[1]]);
        let (wa, wb) = (s8(load(&blk[2..])), s8(load(&blk[18..])));
        for r in 0..R {
            let y = &rows[r].0[32 * b..32 * b + 32];
            let p = dot16(dot16(vdupq_n_s32(0), wa, y), wb, &y[16..]);
            acc[r] = (dw * rows[r].1[b]).mul_add(vaddvq_s32(p) as f32, acc[r]);
        }
    }
    acc
}
