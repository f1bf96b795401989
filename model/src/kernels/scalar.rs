//! Portable reference kernels. Safe Rust only; every SIMD path must reproduce these results bit
//! for bit (same integer lanes, same f32 operations in the same order — see `super`'s docs).

use super::{f16_to_f32, q4k_scales_mins, Q4K, Q6K, Q8_0, QK_K};

/// `Σ_e q(e)·y[e]` over `len` elements (exact).
fn idot(q: impl Fn(usize) -> i32, y: &[i8], len: usize) -> i32 {
    (0..len).map(|e| q(e) * i32::from(y[e])).sum()
}

/// Q4_K weight row · Q8_K activation row. Per super-block the integer sum
/// `Σ_s scale_s·(q·y)_s` and the min term `Σ_s min_s·Σ_{e∈s} y_e` are exact; each takes one fused
/// multiply-add into its own f32 accumulator (scales `d·x_d` and `dmin·x_d`), and the result is
/// their difference.
pub(super) fn dot_q4k(w: &[u8], xq: &[i8], xd: &[f32], xbs: &[i16]) -> f32 {
    let mut acc = 0f32;
    let mut accm = 0f32;
    for (b, blk) in w.chunks_exact(Q4K.bytes).enumerate() {
        let d = f16_to_f32([blk[0], blk[1]]) * xd[b];
        let dmin = f16_to_f32([blk[2], blk[3]]) * xd[b];
        let (sc, mn) = q4k_scales_mins(&blk[4..16]);
        let qs = &blk[16..144];
        let y = &xq[b * QK_K..(b + 1) * QK_K];
        let mut isum = 0i32;
        for c in 0..4 {
            let q = &qs[32 * c..32 * c + 32];
            let lo = idot(|e| i32::from(q[e] & 15), &y[64 * c..], 32);
            let hi = idot(|e| i32::from(q[e] >> 4), &y[64 * c + 32..], 32);
            isum += i32::from(sc[2 * c]) * lo + i32::from(sc[2 * c + 1]) * hi;
        }
        let bs = &xbs[b * 16..b * 16 + 16];
        let mut summ = 0i32;
        for j in 0..8 {
            summ += i32::from(mn[j]) * (i32::from(bs[2 * j]) + i32::from(bs[2 * j + 1]));
        }
        acc = d.mul_add(isum as f32, acc);
        accm = dmin.mul_add(summ as f32, accm);
    }
    acc - accm
}

/// Q6_K weight row · Q8_K activation row. Per super-block the integer sum
/// `Σ_s scale_s·(Σ_{e∈s} q_e·y_e − 32·Σ_{e∈s} y_e)` over its 16-element sub-blocks is exact and
/// takes one fused multiply-add (scale `d·x_d`).
pub(super) fn dot_q6k(w: &[u8], xq: &[i8], xd: &[f32], xbs: &[i16]) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(Q6K.bytes).enumerate() {
        let (ql, rest) = blk.split_at(128);
        let (qh, rest) = rest.split_at(64);
        let (scales, dbytes) = rest.split_at(16);
        let d = f16_to_f32([dbytes[0], dbytes[1]]) * xd[b];
        let y = &xq[b * QK_K..(b + 1) * QK_K];
        let bs = &xbs[b * 16..b * 16 + 16];
        let mut isum = 0i32;
        for n in 0..2 {
            let (l, h) = (&ql[64 * n..64 * n + 64], &qh[32 * n..32 * n + 32]);
            let quarters: [&dyn Fn(usize) -> i32; 4] = [
                &|e| i32::from((l[e] & 15) | ((h[e] & 3) << 4)),
                &|e| i32::from((l[e + 32] & 15) | (((h[e] >> 2) & 3) << 4)),
                &|e| i32::from((l[e] >> 4) | (((h[e] >> 4) & 3) << 4)),
                &|e| i32::from((l[e + 32] >> 4) | (((h[e] >> 6) & 3) << 4)),
            ];
            for (i, q) in quarters.iter().enumerate() {
                for half in 0..2 {
                    let s = 8 * n + 2 * i + half;
                    let p = idot(|e| q(16 * half + e), &y[16 * s..], 16);
                    isum += i32::from(scales[s] as i8) * (p - 32 * i32::from(bs[s]));
                }
            }
        }
        acc = d.mul_add(isum as f32, acc);
    }
    acc
}

/// Q8_0 weight row · Q8_0 activation row (32-element blocks, one f32 scale per activation block):
/// per block the exact integer sum takes one fused multiply-add (scale `d·x_d`).
pub(super) fn dot_q8_0(w: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(Q8_0.bytes).enumerate() {
        let d = f16_to_f32([blk[0], blk[1]]) * xd[b];
        let isum = idot(|e| i32::from(blk[2 + e] as i8), &xq[b * 32..], 32);
        acc = d.mul_add(isum as f32, acc);
    }
    acc
}
