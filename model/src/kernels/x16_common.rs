//! What the interleaved kernels of both instruction sets share: an activation row's share of one
//! record, the four-activation broadcast value, and the prefetch of records ahead.

use std::arch::x86_64::*;

use super::{Row, QK_K};

/// 16 bytes from the start of `s` (panics if shorter).
#[inline(always)]
pub(super) fn load16(s: &[u8]) -> __m128i {
    let s = &s[..16];
    // SAFETY: `s` is 16 readable bytes (sliced above); no alignment requirement.
    unsafe { _mm_loadu_si128(s.as_ptr().cast()) }
}

/// 8 bytes from the start of `s` (panics if shorter).
#[inline(always)]
pub(super) fn load8(s: &[u8]) -> __m128i {
    let s = &s[..8];
    // SAFETY: `s` is 8 readable bytes (sliced above); `loadl_epi64` reads exactly 8.
    unsafe { _mm_loadl_epi64(s.as_ptr().cast()) }
}

/// Weight rows per 256-bit register (the 256-bit kernels take a record in two halves).
pub(super) const HALF: usize = super::x16::ROWS / 2;

/// Four activations as one little-endian lane, for a broadcast: one 32-bit load, which the
/// broadcast takes as its memory operand (built byte by byte, as `i32::from_le_bytes` of four
/// indexed bytes compiled in the AVX2 kernels, every broadcast cost four loads, three shifts,
/// three ors and a move to a vector register).
#[inline(always)]
pub(super) fn quad<const N: usize>(y: &[i8; N], at: usize) -> i32 {
    let q = &y[at..at + 4];
    // SAFETY: `q` is 4 readable bytes (sliced above); `read_unaligned` needs no alignment. x86 is
    // little-endian, so this is `i32::from_le_bytes` of the four bytes.
    unsafe { q.as_ptr().cast::<i32>().read_unaligned() }
}

/// Two i16 as one little-endian lane (`lo` in the low half), for a broadcast. (Read as one
/// unaligned 32-bit load instead, the one-row AVX2 Q4_K kernel compiled three times slower.)
#[inline(always)]
pub(super) fn lane16(lo: i16, hi: i16) -> i32 {
    i32::from(lo as u16) | (i32::from(hi) << 16)
}

/// One activation row's share of super-block `b`: its 256 values, scale, 16-sums and 32-sums.
#[derive(Clone, Copy)]
pub(super) struct Sb<'a> {
    pub y: &'a [i8; QK_K],
    pub d: f32,
    pub bs: &'a [i16; 16],
    pub bs32: &'a [i16; 8],
}

impl<'a> Sb<'a> {
    #[inline(always)]
    pub fn of(row: &Row<'a>, b: usize) -> Self {
        let (q, d, bs, bs32) = *row;
        Sb {
            y: q[b * QK_K..(b + 1) * QK_K]
                .try_into()
                .expect("a super-block"),
            d: d[b],
            bs: bs[b * 16..b * 16 + 16].try_into().expect("16 sums"),
            bs32: bs32[b * 8..b * 8 + 8].try_into().expect("8 sums"),
        }
    }
}

/// One activation row's share of Q8_0 block `b`: its 32 values and scale.
#[derive(Clone, Copy)]
pub(super) struct B32<'a> {
    pub y: &'a [i8; 32],
    pub d: f32,
}

impl<'a> B32<'a> {
    #[inline(always)]
    pub fn of(row: &Row<'a>, b: usize) -> Self {
        let (q, d, _, _) = *row;
        B32 {
            y: q[b * 32..(b + 1) * 32].try_into().expect("a block"),
            d: d[b],
        }
    }
}

/// The register passes over a record of a tile of `rows` activation rows, at most `max` a pass:
/// `(first row, rows)` each, and how many there are. With `even` the passes are as even as they
/// can be (16 rows at most 5 a pass go 4 + 4 + 4 + 4, not 5 + 5 + 5 + 1), else as long as they
/// can be. Planned once per call by the group loops of both register widths.
pub(super) fn plan_passes(
    rows: usize,
    max: usize,
    even: bool,
) -> ([(usize, usize); super::ACT_TILE], usize) {
    let mut passes = [(0, 0); super::ACT_TILE];
    let (mut np, mut j) = (0, 0);
    while j < rows {
        let left = rows - j;
        let n = if even {
            left.div_ceil(left.div_ceil(max))
        } else {
            left.min(max)
        };
        passes[np] = (j, n);
        np += 1;
        j += n;
    }
    (passes, np)
}

/// Records ahead of the one in use that [`prefetch`] asks for, for a tile of `rows` activation
/// rows: about 4 KiB ahead for one row, 16 KiB for more; at least two records.
///
/// The distance is a lead time: a record takes about 30 ns of compute for one row (and there
/// the loop is bound by memory bandwidth, which the hardware prefetchers follow), 70–90 ns for
/// five rows, 200 ns or more for sixteen. At 4 KiB (two Q4_K records) a pass of five rows asked
/// for its records too late: the 1.5B's verification block of 5 went from 32.7 / 31.9 ms to
/// 30.1 / 29.6 at 16 KiB (two sittings, medians of 4 alternating runs), while 32 KiB was no
/// better (31.7). Sixteen rows first went slower at 16 KiB (71 → 74 ms), and kept 4 KiB; with
/// tasks of 4 MiB (`matmul.rs`) 16 KiB became the faster for 9 to 16 rows too: blocks of 9, 12
/// and 16 went 33.9 / 41.5 / 52.6 → 32.5 / 39.9 / 51.1 ms in a slow-memory phase (medians of
/// alternating runs; 8 KiB alike, fast phases within their noise). For one row, one record ahead
/// left the one-core AVX2 decode of the 1.5B waiting on memory (49.5 ms a token, two ahead 45.7,
/// none 65), and 8 or 16 KiB were slower than 4 (23.3 → 23.6 / 24.0 ms, two threads).
pub(super) const fn prefetch_ahead(rec: usize, rows: usize) -> usize {
    let bytes = if rows >= 2 { 16 << 10 } else { 4 << 10 };
    let n = bytes / rec;
    if n < 2 {
        2
    } else {
        n
    }
}

/// Part `part` of `parts` (in whole cache lines) of [`prefetch`] on `s`, if any: a kernel spreads
/// the prefetches of the record ahead over its steps. Issued in one burst at the start of a
/// record (37 lines for Q4_K, 53 for Q6_K) they overflowed the core's outstanding-miss slots and
/// stalled it, so the compute of one record did not overlap the loads of the next: the AVX2 decode
/// of the 1.5B went from 29.5 to 24.9 ms a token when each half of a record prefetched half.
#[inline(always)]
pub(super) fn prefetch_part(s: Option<&[u8]>, part: usize, parts: usize) {
    if let Some(s) = s {
        let per = s.len().div_ceil(64).div_ceil(parts) * 64;
        let (a, b) = ((part * per).min(s.len()), ((part + 1) * per).min(s.len()));
        prefetch(&s[a..b]);
    }
}

/// Asks for every cache line of `s` (a record [`prefetch_ahead`] ahead) ahead of its use.
#[inline(always)]
fn prefetch(s: &[u8]) {
    for off in (0..s.len()).step_by(64) {
        // SAFETY: a prefetch never faults, and the address is inside `s`.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(s.as_ptr().add(off).cast()) };
    }
}

// The 256-bit kernels' shared steps (`x16_avx2.rs`, `x16_vnni.rs`), on half `h` (rows
// `8h..8h + 8`) of a record. Compiled for AVX2, FMA and F16C, a subset of both callers' features,
// so that each inlines into its caller.

/// Q4_K's min term of `R` activation rows: `Σ_j min_j · bsum32_j` per weight row.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q4k_mins_x8<const R: usize>(
    r: &[u8; super::x16::Q4K_REC],
    h: usize,
    rows: &[Sb<'_>; R],
) -> [__m256i; R] {
    use super::x16::q4k;
    let mut msum = [_mm256_setzero_si256(); R];
    for p in 0..4 {
        let mn = _mm256_cvtepu8_epi16(load16(&r[q4k::MN + 32 * p + 16 * h..]));
        for (m, row) in msum.iter_mut().zip(rows) {
            // The 32-sums of sub-blocks 2p and 2p + 1 against their mins.
            let ys = _mm256_set1_epi32(lane16(row.bs32[2 * p], row.bs32[2 * p + 1]));
            *m = _mm256_add_epi32(*m, _mm256_madd_epi16(mn, ys));
        }
    }
    msum
}

/// Q6_K's offset of `R` activation rows, the start of their integer sums:
/// `−32 · Σ_s scale_s · bsum_s` per weight row, one `madd` per pair of scales (as in
/// `x16_avx512.rs`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q6k_offset_x8<const R: usize>(
    r: &[u8; super::x16::Q6K_REC],
    h: usize,
    rows: &[Sb<'_>; R],
) -> [__m256i; R] {
    use super::x16::q6k;
    let mut isum = [_mm256_setzero_si256(); R];
    for t in 0..8 {
        let (e, o) = (
            load8(&r[q6k::SC + 32 * t + 8 * h..]),
            load8(&r[q6k::SC + 32 * t + 16 + 8 * h..]),
        );
        // Lane l: (scale 2t, scale 2t + 1) of row 8h + l.
        let sp = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(e, o));
        for (s, row) in isum.iter_mut().zip(rows) {
            let ys = _mm256_set1_epi32(lane16(row.bs[2 * t], row.bs[2 * t + 1]));
            *s = _mm256_add_epi32(*s, _mm256_madd_epi16(sp, ys));
        }
    }
    isum.map(|s| _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<5>(s)))
}

/// Q6_K quants `q = 2·hi + t` (t = 0, 1) of quad `i` in half `n`, as unsigned bytes: the low
/// (hi = 0) or high nibbles of l0 (t = 0) or l1, with bits 2q, 2q + 1 of the high-bit byte on
/// top.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q6k_quants_x8(
    r: &[u8; super::x16::Q6K_REC],
    h: usize,
    (n, hi, i): (usize, usize, usize),
) -> [__m256i; 2] {
    use super::avx2::load;
    use super::x16::q6k;
    let (m4, m2) = (_mm256_set1_epi8(15), _mm256_set1_epi8(3));
    let l0 = load(&r[q6k::unit(n, i) + q6k::L0 + 32 * h..]);
    let l1 = load(&r[q6k::unit(n, i) + q6k::L1 + 32 * h..]);
    let hv = load(&r[q6k::unit(n, i) + q6k::H + 32 * h..]);
    let (l0, l1, h0, h1) = if hi == 0 {
        (l0, l1, hv, _mm256_srli_epi16::<2>(hv))
    } else {
        (
            _mm256_srli_epi16::<4>(l0),
            _mm256_srli_epi16::<4>(l1),
            _mm256_srli_epi16::<4>(hv),
            _mm256_srli_epi16::<6>(hv),
        )
    };
    let hb = |v: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(v, m2));
    [
        _mm256_or_si256(_mm256_and_si256(l0, m4), hb(h0)),
        _mm256_or_si256(_mm256_and_si256(l1, m4), hb(h1)),
    ]
}

/// `isum += scale_s · a` for each of `R` activation rows: Q6_K sub-block `s` (i8 scales) of half
/// `h`, `a` its integer sums.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q6k_scaled_x8<const R: usize>(
    r: &[u8; super::x16::Q6K_REC],
    h: usize,
    s: usize,
    a: [__m256i; R],
    isum: &mut [__m256i; R],
) {
    let sc = _mm256_cvtepi8_epi32(load8(&r[super::x16::q6k::SC + 16 * s + 8 * h..]));
    for (i, a) in isum.iter_mut().zip(a) {
        *i = _mm256_add_epi32(*i, _mm256_mullo_epi32(a, sc));
    }
}

/// The float step of a record for `R` activation rows with scales `xd`: `acc += (dw·xd)·isum`,
/// and for Q4_K (`min = Some((dmin, msum))`) `acc_min += (dmin·xd)·msum`, one fused multiply-add
/// each, as in `scalar.rs`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn finish_x8<const R: usize>(
    dw: __m256,
    isum: [__m256i; R],
    min: Option<(__m256, [__m256i; R])>,
    xd: [f32; R],
    acc: &mut [[__m256; 2]; R],
) {
    for k in 0..R {
        let x = _mm256_set1_ps(xd[k]);
        let [d, m] = &mut acc[k];
        *d = _mm256_fmadd_ps(_mm256_mul_ps(dw, x), _mm256_cvtepi32_ps(isum[k]), *d);
        if let Some((dmin, msum)) = &min {
            *m = _mm256_fmadd_ps(_mm256_mul_ps(*dmin, x), _mm256_cvtepi32_ps(msum[k]), *m);
        }
    }
}
