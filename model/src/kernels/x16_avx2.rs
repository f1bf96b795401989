//! AVX2 kernels on the interleaved layout (`x16.rs`), for CPUs without VNNI: each half of a
//! 64-byte line (8 weight rows × 4 quants) goes through `maddubs` against four broadcast
//! activations; the i16 pair sums are added up while they cannot overflow (8 products of at most
//! 2·15·127 for Q4_K, 2 of at most 2·63·127 for Q6_K), then widened by `madd` with ones. Every
//! 32-bit lane is one output row. Bit-identical to `scalar.rs` (see `x16.rs`).

// The loops walk several parallel register arrays (per row, per quant vector) by index.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::avx2::load as load32;
use super::x16::{q4k, q6k, Q4K_REC, Q6K_REC, Q80_QS, Q80_REC, ROWS};
use super::x16_common::{
    finish_x8, load16, load8, plan_passes, prefetch_ahead, prefetch_part, q4k_mins_x8,
    q6k_offset_x8, q6k_quants_x8, q6k_scaled_x8, quad, Sb, B32, HALF,
};
use super::{Row, WeightFormat};

/// Whether the CPU has what these kernels need (AVX2, FMA, F16C).
fn detected() -> bool {
    super::avx2::detected()
}

// `block`, the group loops (at most 4 rows a pass, 16 registers, 3 per row; Q6_K in even passes:
// 5 rows as 3 + 2 took 296 ns a record, 4 + 1 319 ns; Q8_0's 4 + 1 is the faster, 34 against
// 38 ns; Q4_K's the same) and `store`.
x8_block!("avx2,fma,f16c");

/// Rows `8h..8h + 8` of super-block `b` (record `r`) of a Q4_K group into the accumulators of
/// `R` activation rows.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4k_x8<const R: usize>(
    r: &[u8; Q4K_REC],
    h: usize,
    rows: [Sb<'_>; R],
    acc: &mut [[__m256; 2]; R],
    ahead: Option<&[u8]>,
) {
    let low = _mm256_set1_epi8(15);
    let ones = _mm256_set1_epi16(1);
    let zero = _mm256_setzero_si256();
    let mut isum = [zero; R];
    for c in 0..4 {
        prefetch_part(ahead, 4 * h + c, 8);
        let mut alo = [zero; R];
        let mut ahi = [zero; R];
        for i in 0..8 {
            let wv = load32(&r[q4k::QS + (c * 8 + i) * 64 + 32 * h..]);
            let lo = _mm256_and_si256(wv, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(wv), low);
            let at = 64 * c + 4 * i;
            for k in 0..R {
                let y = rows[k].y;
                let pl = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(quad(y, at)));
                let ph = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(quad(y, at + 32)));
                alo[k] = _mm256_add_epi16(alo[k], pl);
                ahi[k] = _mm256_add_epi16(ahi[k], ph);
            }
        }
        let slo = _mm256_cvtepu8_epi32(load8(&r[q4k::SC + 32 * c + 8 * h..]));
        let shi = _mm256_cvtepu8_epi32(load8(&r[q4k::SC + 32 * c + 16 + 8 * h..]));
        for k in 0..R {
            let lo = _mm256_mullo_epi32(_mm256_madd_epi16(alo[k], ones), slo);
            let hi = _mm256_mullo_epi32(_mm256_madd_epi16(ahi[k], ones), shi);
            isum[k] = _mm256_add_epi32(isum[k], _mm256_add_epi32(lo, hi));
        }
    }
    let msum = q4k_mins_x8(r, h, &rows);
    let dw = _mm256_cvtph_ps(load16(&r[q4k::D + 16 * h..]));
    let dmin = _mm256_cvtph_ps(load16(&r[q4k::DMIN + 16 * h..]));
    finish_x8(dw, isum, Some((dmin, msum)), rows.map(|row| row.d), acc);
}

/// Rows `8h..8h + 8` of super-block `b` (record `r`) of a Q6_K group into the accumulators of
/// `R` activation rows (the second accumulator stays zero).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q6k_x8<const R: usize>(
    r: &[u8; Q6K_REC],
    h: usize,
    rows: [Sb<'_>; R],
    acc: &mut [[__m256; 2]; R],
    ahead: Option<&[u8]>,
) {
    let ones = _mm256_set1_epi16(1);
    let zero = _mm256_setzero_si256();
    // The quants' offset of −32 first (`x16_common::q6k_offset_x8`).
    let mut isum = q6k_offset_x8(r, h, &rows);
    if R == 1 {
        // One row: all four quant vectors of two quads at once (each byte loaded once).
        let y = rows[0].y;
        for n in 0..2 {
            for ih in 0..2 {
                prefetch_part(ahead, 4 * h + 2 * n + ih, 8);
                let mut a = [zero; 4];
                for i in (4 * ih..4 * ih + 4).step_by(2) {
                    let [q00, q01] = q6k_quants_x8(r, h, (n, 0, i));
                    let [q02, q03] = q6k_quants_x8(r, h, (n, 1, i));
                    let [q10, q11] = q6k_quants_x8(r, h, (n, 0, i + 1));
                    let [q12, q13] = q6k_quants_x8(r, h, (n, 1, i + 1));
                    let at = 128 * n + 4 * i;
                    for (q, (w0, w1)) in [(q00, q10), (q01, q11), (q02, q12), (q03, q13)]
                        .into_iter()
                        .enumerate()
                    {
                        let y0 = _mm256_set1_epi32(quad(y, at + 32 * q));
                        let y1 = _mm256_set1_epi32(quad(y, at + 32 * q + 4));
                        let p = _mm256_add_epi16(
                            _mm256_maddubs_epi16(w0, y0),
                            _mm256_maddubs_epi16(w1, y1),
                        );
                        a[q] = _mm256_add_epi32(a[q], _mm256_madd_epi16(p, ones));
                    }
                }
                for (q, aq) in a.iter().enumerate() {
                    let row0: &mut [__m256i; 1] = (&mut isum[..1]).try_into().expect("one row");
                    q6k_scaled_x8(r, h, 8 * n + 2 * q + ih, [*aq], row0);
                }
            }
        }
    } else {
        for n in 0..2 {
            for ih in 0..2 {
                prefetch_part(ahead, 4 * h + 2 * n + ih, 8);
                for hi in 0..2 {
                    let mut a = [[zero; 2]; R];
                    for i in (4 * ih..4 * ih + 4).step_by(2) {
                        let (q0, q1) = (
                            q6k_quants_x8(r, h, (n, hi, i)),
                            q6k_quants_x8(r, h, (n, hi, i + 1)),
                        );
                        let at = 128 * n + 64 * hi + 4 * i;
                        for k in 0..R {
                            let y = rows[k].y;
                            for t in 0..2 {
                                let y0 = _mm256_set1_epi32(quad(y, at + 32 * t));
                                let y1 = _mm256_set1_epi32(quad(y, at + 32 * t + 4));
                                // Two products of at most 2·63·127 each: no i16 overflow.
                                let p = _mm256_add_epi16(
                                    _mm256_maddubs_epi16(q0[t], y0),
                                    _mm256_maddubs_epi16(q1[t], y1),
                                );
                                a[k][t] = _mm256_add_epi32(a[k][t], _mm256_madd_epi16(p, ones));
                            }
                        }
                    }
                    for t in 0..2 {
                        let s = 8 * n + 2 * (2 * hi + t) + ih;
                        q6k_scaled_x8(r, h, s, a.map(|a| a[t]), &mut isum);
                    }
                }
            }
        }
    }
    let dw = _mm256_cvtph_ps(load16(&r[q6k::D + 16 * h..]));
    finish_x8(dw, isum, None, rows.map(|row| row.d), acc);
}

/// Rows `8h..8h + 8` of Q8_0 block `b` (record `r`) of a group into the accumulators of `R`
/// activation rows (the second accumulator stays zero): `maddubs` of `|w|` against
/// `y · sign w` (at most 2·128·127 per pair: no i16 overflow), widened by `madd`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q80_x8<const R: usize>(
    r: &[u8; Q80_REC],
    h: usize,
    rows: [B32<'_>; R],
    acc: &mut [[__m256; 2]; R],
    ahead: Option<&[u8]>,
) {
    prefetch_part(ahead, h, 2);
    let ones = _mm256_set1_epi16(1);
    let zero = _mm256_setzero_si256();
    let mut isum = [zero; R];
    for i in 0..8 {
        let w = load32(&r[Q80_QS + 64 * i + 32 * h..]);
        let aw = _mm256_sign_epi8(w, w);
        for k in 0..R {
            let y = _mm256_set1_epi32(quad(rows[k].y, 4 * i));
            let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(y, w));
            isum[k] = _mm256_add_epi32(isum[k], _mm256_madd_epi16(p, ones));
        }
    }
    let dw = _mm256_cvtph_ps(load16(&r[16 * h..]));
    finish_x8(dw, isum, None, rows.map(|row| row.d), acc);
}
