//! AVX-VNNI kernels on the interleaved layout (`x16.rs`), for CPUs with 256-bit `vpdpbusd` but
//! no AVX-512 (Intel's client cores from Alder Lake on; where AVX-512 VNNI is there too, `auto`
//! takes that): the AVX2 kernels' structure (each half of a 64-byte line is 8 weight rows × 4 quants, one 32-bit lane per row),
//! with one `vpdpbusd` per four quants, row and activation row where AVX2 needs `maddubs`, an
//! add of i16 sums and, every few quads, `madd` with ones. Bit-identical to `scalar.rs` (see
//! `x16.rs`).

// The loops walk several parallel register arrays (per row, per quant vector) by index.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::avx2::load as load32;
use super::x16::{q4k, q6k, Q4K_REC, Q6K_REC, Q80_QS, Q80_REC, ROWS};
use super::x16_common::{
    finish_x8, load16, load8, plan_passes, prefetch_ahead, prefetch_part, q4k_mins_x8,
    q6k_offset_x8, q6k_quants_x8, q6k_scaled_x8, quad, Sb, B32, HALF,
};
use super::{Row, WeightFormat};

/// Whether this CPU has AVX2, FMA, F16C and AVX-VNNI (checked once).
pub(super) fn detected() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| super::avx2::detected() && is_x86_feature_detected!("avxvnni"))
}

// `block`, the group loops (at most 4 rows a pass, as on AVX2) and `store`.
x8_block!("avx2,fma,f16c,avxvnni");

/// Rows `8h..8h + 8` of super-block `b` (record `r`) of a Q4_K group into the accumulators of
/// `R` activation rows.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
fn q4k_x8<const R: usize>(
    r: &[u8; Q4K_REC],
    h: usize,
    rows: [Sb<'_>; R],
    acc: &mut [[__m256; 2]; R],
    ahead: Option<&[u8]>,
) {
    let low = _mm256_set1_epi8(15);
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
                alo[k] = _mm256_dpbusd_avx_epi32(alo[k], lo, _mm256_set1_epi32(quad(y, at)));
                ahi[k] = _mm256_dpbusd_avx_epi32(ahi[k], hi, _mm256_set1_epi32(quad(y, at + 32)));
            }
        }
        let slo = _mm256_cvtepu8_epi32(load8(&r[q4k::SC + 32 * c + 8 * h..]));
        let shi = _mm256_cvtepu8_epi32(load8(&r[q4k::SC + 32 * c + 16 + 8 * h..]));
        for k in 0..R {
            let lo = _mm256_mullo_epi32(alo[k], slo);
            let hi = _mm256_mullo_epi32(ahi[k], shi);
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
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
fn q6k_x8<const R: usize>(
    r: &[u8; Q6K_REC],
    h: usize,
    rows: [Sb<'_>; R],
    acc: &mut [[__m256; 2]; R],
    ahead: Option<&[u8]>,
) {
    let zero = _mm256_setzero_si256();
    // The quants' offset of −32 first (`x16_common::q6k_offset_x8`).
    let mut isum = q6k_offset_x8(r, h, &rows);
    for n in 0..2 {
        for ih in 0..2 {
            prefetch_part(ahead, 4 * h + 2 * n + ih, 8);
            // Quants 2·hi and 2·hi + 1 (`x16_common::q6k_quants_x8`).
            for hi in 0..2 {
                let mut a = [[zero; 2]; R];
                for i in 4 * ih..4 * ih + 4 {
                    let qs = q6k_quants_x8(r, h, (n, hi, i));
                    let at = 128 * n + 64 * hi + 4 * i;
                    for k in 0..R {
                        for (t, wq) in qs.iter().enumerate() {
                            let yv = _mm256_set1_epi32(quad(rows[k].y, at + 32 * t));
                            a[k][t] = _mm256_dpbusd_avx_epi32(a[k][t], *wq, yv);
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
    let dw = _mm256_cvtph_ps(load16(&r[q6k::D + 16 * h..]));
    finish_x8(dw, isum, None, rows.map(|row| row.d), acc);
}

/// Rows `8h..8h + 8` of Q8_0 block `b` (record `r`) of a group into the accumulators of `R`
/// activation rows (the second accumulator stays zero): `|w|` against `y · sign w`, as the
/// row-major kernels do (`|−128|` reads as 128 unsigned).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
fn q80_x8<const R: usize>(
    r: &[u8; Q80_REC],
    h: usize,
    rows: [B32<'_>; R],
    acc: &mut [[__m256; 2]; R],
    ahead: Option<&[u8]>,
) {
    prefetch_part(ahead, h, 2);
    let zero = _mm256_setzero_si256();
    let mut isum = [zero; R];
    for i in 0..8 {
        let w = load32(&r[Q80_QS + 64 * i + 32 * h..]);
        let aw = _mm256_sign_epi8(w, w);
        for k in 0..R {
            let y = _mm256_set1_epi32(quad(rows[k].y, 4 * i));
            isum[k] = _mm256_dpbusd_avx_epi32(isum[k], aw, _mm256_sign_epi8(y, w));
        }
    }
    let dw = _mm256_cvtph_ps(load16(&r[16 * h..]));
    finish_x8(dw, isum, None, rows.map(|row| row.d), acc);
}
