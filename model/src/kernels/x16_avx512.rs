//! AVX-512 VNNI kernels on the interleaved layout (`x16.rs`): one 512-bit register holds four
//! quants of each of 16 weight rows, `vpdpbusd` multiplies them by four broadcast activations,
//! and every 32-bit lane is one output row. Bit-identical to `scalar.rs` (see `x16.rs`).

// The loops walk several parallel register arrays (per row, per quant vector) by index.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::avx2::load as load32;
use super::x16::{q4k, q6k, Q4K_REC, Q6K_REC, Q80_QS, Q80_REC, ROWS};
use super::x16_common::{
    lane16, load16, plan_passes, prefetch_ahead, prefetch_part, quad, Sb, B32,
};
use super::{Row, WeightFormat};

#[inline(always)]
fn load64(s: &[u8]) -> __m512i {
    let s = &s[..64];
    // SAFETY: `s` is 64 readable bytes (sliced above); `loadu` has no alignment requirement.
    unsafe { _mm512_loadu_si512(s.as_ptr().cast()) }
}

/// `out[j][i] = weight row i · rows[j]` for every row of the interleaved groups `w`
/// (`nb` records each), for at most [`super::ACT_TILE`] activation rows. Each super-block record
/// is read from memory once and used for every activation row while it is in L1.
pub(super) fn block(
    format: WeightFormat,
    w: &[u8],
    nb: usize,
    rows: &[Row<'_>],
    out: &mut [&mut [f32]],
) {
    assert!(super::avx512::detected());
    assert!(rows.len() <= super::ACT_TILE);
    super::x16::check_out(format, w, nb, rows, out);
    // SAFETY: the CPU has every feature `block_tf` enables (asserted above).
    unsafe { block_tf(format, w, nb, rows, out) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn block_tf(format: WeightFormat, w: &[u8], nb: usize, rows: &[Row<'_>], out: &mut [&mut [f32]]) {
    // One loop per format, each compiled on its own (kernels inlined into one shared loop
    // compete for registers; see `row_major_block!` in `mod.rs`).
    match format {
        WeightFormat::Q4K => groups_q4k(w, nb, rows, out),
        WeightFormat::Q6K => groups_q6k(w, nb, rows, out),
        WeightFormat::Q8_0 => groups_q8_0(w, nb, rows, out),
    }
}

/// The group loop of one format: records of `$rec` bytes, kernel `$k::<R>` for R = `$arm`…
/// and `$max`, the most activation rows per pass; with `$even` the passes of a tile are as even
/// as they can be (16 rows at most 5 a pass go 4 + 4 + 4 + 4, not 5 + 5 + 5 + 1), else as long
/// as they can be.
///
/// Pass-major within a group: a pass's accumulators stay in registers across all records of the
/// group, and a group's output is stored once per pass. The first pass reads the group from
/// memory (and prefetches the records ahead); later passes find it in L1 or L2.
macro_rules! group_loop {
    ($name:ident, $k:ident, $rec:expr, $sb:ident, [$($arm:tt),*], $max:tt, $even:expr, $regs:expr) => {
        #[inline(never)]
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
        fn $name(w: &[u8], nb: usize, rows: &[Row<'_>], out: &mut [&mut [f32]]) {
            let rec = $rec;
            let ahead_n = prefetch_ahead(rec, rows.len());
            let (passes, np) = plan_passes(rows.len(), $max, $even);
            macro_rules! pass {
                ($r:tt, $g:expr, $gi:expr, $j:expr) => {{
                    let rows: &[Row<'_>; $r] =
                        (&rows[$j..$j + $r]).try_into().expect("row count");
                    let mut acc = [[_mm512_setzero_ps(); 2]; $r];
                    for (b, r) in $g.chunks_exact(rec).enumerate() {
                        let ahead = if $j == 0 {
                            let next = ($gi * nb + b + ahead_n) * rec;
                            w.get(next..next + rec)
                        } else {
                            None
                        };
                        let rs: [$sb<'_>; $r] = views!($r, k => $sb::of(&rows[k], b));
                        $k::<$r>(r.try_into().expect("a record"), rs, &mut acc, ahead);
                        if $r > $regs {
                            // Keeps the accumulators out of the kernel's registers.
                            std::hint::black_box(&mut acc);
                        }
                    }
                    store_tile(&acc, &mut out[$j..$j + $r], $gi);
                }};
            }
            for (gi, g) in w.chunks_exact(nb * rec).enumerate() {
                for &(j, n) in &passes[..np] {
                    match n {
                        $($arm => pass!($arm, g, gi, j),)*
                        _ => pass!($max, g, gi, j),
                    }
                }
            }
        }
    };
}
// At most 8 rows a pass for Q4_K and Q8_0 (32 registers, 3 per row), 5 for Q6_K (5 per row: four
// quant vectors and the sum; at R = 5 this was 90 ns a record, the two-vectors-at-a-time loop it
// replaced 101 ns), in even passes (at 16 rows 264 ns a record, 5 + 5 + 5 + 1 rows 319 ns).
// The last argument is the most rows whose accumulators stay in registers across a group's
// records; above it they go through memory once a record (`black_box`), which is what the
// record-major loop did for every pass. Q4_K at five rows with register accumulators spilled
// inside its inner loop: 69.4 ns a record against 62.6 through memory (K = 8960, one core).
group_loop!(
    groups_q4k,
    q4k_x16,
    Q4K_REC,
    Sb,
    [1, 2, 3, 4, 5, 6, 7],
    8,
    false,
    4
);
group_loop!(groups_q6k, q6k_x16, Q6K_REC, Sb, [1, 2, 3, 4], 5, true, 5);
group_loop!(
    groups_q8_0,
    q80_x16,
    Q80_REC,
    B32,
    [1, 2, 3, 4, 5, 6, 7],
    8,
    false,
    8
);

/// Group `gi`'s 16 weight rows of `R` activation rows: `out[j][16 gi..16 gi + 16]` = the 16
/// lanes of row `j` (scale sum minus min sum), one store each.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn store_tile<const R: usize>(acc: &[[__m512; 2]; R], out: &mut [&mut [f32]], gi: usize) {
    for ([d, m], o) in acc.iter().zip(out) {
        let o = &mut o[ROWS * gi..ROWS * gi + ROWS];
        // SAFETY: `o` is 16 writable f32 (sliced above); `storeu` has no alignment requirement.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), _mm512_sub_ps(*d, *m)) };
    }
}

/// Super-block `b` (record `r`) of a Q4_K group into the accumulators of `R` activation rows.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn q4k_x16<const R: usize>(
    r: &[u8; Q4K_REC],
    rows: [Sb<'_>; R],
    acc: &mut [[__m512; 2]; R],
    ahead: Option<&[u8]>,
) {
    let low = _mm512_set1_epi8(15);
    let high = _mm512_set1_epi8(-16);
    let zero = _mm512_setzero_si512();
    // Sixteen times the integer sum: the high nibbles are multiplied in place (`w & 0xF0` is
    // 16 · the quant; no shift per quant vector) and the low ones' scales by 16 instead; one exact
    // shift per row at the end. At most 16 · 8 · 32 · 15 · 127 · 63 < 2³¹ in magnitude.
    let mut isum = [zero; R];
    for c in 0..4 {
        prefetch_part(ahead, c, 4);
        let mut alo = [zero; R];
        let mut ahi = [zero; R];
        for i in 0..8 {
            let wv = load64(&r[q4k::QS + (c * 8 + i) * 64..]);
            let lo = _mm512_and_si512(wv, low);
            let hi = _mm512_and_si512(wv, high);
            let at = 64 * c + 4 * i;
            for k in 0..R {
                let y = rows[k].y;
                alo[k] = _mm512_dpbusd_epi32(alo[k], lo, _mm512_set1_epi32(quad(y, at)));
                ahi[k] = _mm512_dpbusd_epi32(ahi[k], hi, _mm512_set1_epi32(quad(y, at + 32)));
            }
        }
        let slo = _mm512_slli_epi32::<4>(_mm512_cvtepu8_epi32(load16(&r[q4k::SC + 32 * c..])));
        let shi = _mm512_cvtepu8_epi32(load16(&r[q4k::SC + 32 * c + 16..]));
        for k in 0..R {
            let s = _mm512_add_epi32(
                _mm512_mullo_epi32(alo[k], slo),
                _mm512_mullo_epi32(ahi[k], shi),
            );
            isum[k] = _mm512_add_epi32(isum[k], s);
        }
    }
    for v in &mut isum {
        *v = _mm512_srai_epi32::<4>(*v);
    }
    let mut msum = [zero; R];
    for p in 0..4 {
        let mn = _mm512_cvtepu8_epi16(load32(&r[q4k::MN + 32 * p..]));
        for k in 0..R {
            // The 32-sums of sub-blocks 2p and 2p + 1 against their mins (made by the activation
            // quantization: 14 % of this kernel at R = 5 when built here from the 16-sums).
            let bs = &rows[k].bs32[2 * p..];
            let ys = _mm512_set1_epi32(lane16(bs[0], bs[1]));
            msum[k] = _mm512_dpwssd_epi32(msum[k], mn, ys);
        }
    }
    let dw = _mm512_cvtph_ps(load32(&r[q4k::D..]));
    let dmin = _mm512_cvtph_ps(load32(&r[q4k::DMIN..]));
    for k in 0..R {
        let xd = _mm512_set1_ps(rows[k].d);
        let [d, m] = &mut acc[k];
        *d = _mm512_fmadd_ps(_mm512_mul_ps(dw, xd), _mm512_cvtepi32_ps(isum[k]), *d);
        *m = _mm512_fmadd_ps(_mm512_mul_ps(dmin, xd), _mm512_cvtepi32_ps(msum[k]), *m);
    }
}

/// Super-block `b` (record `r`) of a Q6_K group into the accumulators of `R` activation rows
/// (the second accumulator stays zero).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn q6k_x16<const R: usize>(
    r: &[u8; Q6K_REC],
    rows: [Sb<'_>; R],
    acc: &mut [[__m512; 2]; R],
    ahead: Option<&[u8]>,
) {
    let m4 = _mm512_set1_epi8(15);
    let m2 = _mm512_set1_epi8(3);
    let zero = _mm512_setzero_si512();
    // The quants' offset of −32 first: −32 · Σ_s scale_s · bsum_s, one `dpwssd` per pair of
    // scales (instead of a broadcast and a subtraction per scale and row in the loops below).
    let mut isum = [zero; R];
    for t in 0..8 {
        let (e, o) = (
            load16(&r[q6k::SC + 32 * t..]),
            load16(&r[q6k::SC + 32 * t + 16..]),
        );
        // Lane l: (scale 2t, scale 2t + 1) of row l.
        let sp = _mm512_cvtepi8_epi16(_mm256_set_m128i(
            _mm_unpackhi_epi8(e, o),
            _mm_unpacklo_epi8(e, o),
        ));
        for k in 0..R {
            let bs = rows[k].bs;
            let ys = _mm512_set1_epi32(lane16(bs[2 * t], bs[2 * t + 1]));
            isum[k] = _mm512_dpwssd_epi32(isum[k], sp, ys);
        }
    }
    for k in 0..R {
        isum[k] = _mm512_sub_epi32(zero, _mm512_slli_epi32::<5>(isum[k]));
    }
    // All four quant vectors of a quad at once (each byte loaded once).
    for n in 0..2 {
        for ih in 0..2 {
            prefetch_part(ahead, 2 * n + ih, 4);
            let mut a = [[zero; 4]; R];
            for i in 4 * ih..4 * ih + 4 {
                let l0 = load64(&r[q6k::unit(n, i) + q6k::L0..]);
                let l1 = load64(&r[q6k::unit(n, i) + q6k::L1..]);
                let h = load64(&r[q6k::unit(n, i) + q6k::H..]);
                let hb = |v: __m512i| _mm512_slli_epi16::<4>(_mm512_and_si512(v, m2));
                let qs = [
                    _mm512_or_si512(_mm512_and_si512(l0, m4), hb(h)),
                    _mm512_or_si512(_mm512_and_si512(l1, m4), hb(_mm512_srli_epi16::<2>(h))),
                    _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16::<4>(l0), m4),
                        hb(_mm512_srli_epi16::<4>(h)),
                    ),
                    _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16::<4>(l1), m4),
                        hb(_mm512_srli_epi16::<6>(h)),
                    ),
                ];
                let at = 128 * n + 4 * i;
                for k in 0..R {
                    for (q, wq) in qs.iter().enumerate() {
                        let yv = _mm512_set1_epi32(quad(rows[k].y, at + 32 * q));
                        a[k][q] = _mm512_dpbusd_epi32(a[k][q], *wq, yv);
                    }
                }
            }
            for q in 0..4 {
                let s = 8 * n + 2 * q + ih;
                let sc = _mm512_cvtepi8_epi32(load16(&r[q6k::SC + 16 * s..]));
                for k in 0..R {
                    let v = _mm512_mullo_epi32(a[k][q], sc);
                    isum[k] = _mm512_add_epi32(isum[k], v);
                }
            }
        }
    }
    let dw = _mm512_cvtph_ps(load32(&r[q6k::D..]));
    for k in 0..R {
        let xd = _mm512_set1_ps(rows[k].d);
        let [d, _] = &mut acc[k];
        *d = _mm512_fmadd_ps(_mm512_mul_ps(dw, xd), _mm512_cvtepi32_ps(isum[k]), *d);
    }
}

/// Q8_0 block `b` (record `r`) of a group into the accumulators of `R` activation rows (the
/// second accumulator stays zero): `|w|` against `y · sign w`, as the row-major kernels do.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn q80_x16<const R: usize>(
    r: &[u8; Q80_REC],
    rows: [B32<'_>; R],
    acc: &mut [[__m512; 2]; R],
    ahead: Option<&[u8]>,
) {
    prefetch_part(ahead, 0, 1);
    let zero = _mm512_setzero_si512();
    let mut isum = [zero; R];
    for i in 0..8 {
        let w = load64(&r[Q80_QS + 64 * i..]);
        let aw = _mm512_abs_epi8(w);
        let neg = _mm512_movepi8_mask(w);
        for k in 0..R {
            let y = _mm512_set1_epi32(quad(rows[k].y, 4 * i));
            // |−128| reads as 128 unsigned.
            let sy = _mm512_mask_sub_epi8(y, neg, zero, y);
            isum[k] = _mm512_dpbusd_epi32(isum[k], aw, sy);
        }
    }
    let dw = _mm512_cvtph_ps(load32(&r[..]));
    for k in 0..R {
        let xd = _mm512_set1_ps(rows[k].d);
        let [d, _] = &mut acc[k];
        *d = _mm512_fmadd_ps(_mm512_mul_ps(dw, xd), _mm512_cvtepi32_ps(isum[k]), *d);
    }
}
