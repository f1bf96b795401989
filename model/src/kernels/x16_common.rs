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

/// Records ahead of the one in use that [`prefetch`] asks for, for a tile of `rows` activation
/// rows: about 4 KiB ahead for one row and for more than 8 (two passes or more over each record),
/// 16 KiB for 2 to 8; at least two records.
///
/// The distance is a lead time: a record takes about 30 ns of compute for one row (and there
/// the loop is bound by memory bandwidth, which the hardware prefetchers follow), 70–90 ns for
/// five rows, 200 ns or more for sixteen. At 4 KiB (two Q4_K records) a pass of five rows asked
/// for its records too late: the 1.5B's verification block of 5 went from 32.7 / 31.9 ms to
/// 30.1 / 29.6 at 16 KiB (two sittings, medians of 4 alternating runs), while 32 KiB was no
/// better (31.7) and 16 rows went slower (71 → 74 ms). For one row, one record ahead left the
/// one-core AVX2 decode of the 1.5B waiting on memory (49.5 ms a token, two ahead 45.7, none 65).
pub(super) const fn prefetch_ahead(rec: usize, rows: usize) -> usize {
    let bytes = if rows >= 2 && rows <= 8 {
        16 << 10
    } else {
        4 << 10
    };
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
