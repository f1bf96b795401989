//! The interleaved ("x16") weight layout for the multi-row kernels: K-quant weights repacked once
//! at load time so that one SIMD register holds the same four quant bytes of 16 consecutive
//! weight rows. A 32-bit lane then belongs to one output row, and `vpdpbusd` (or AVX2's
//! `maddubs` + `madd`) multiplies four quants of 16 rows by four broadcast activations at once:
//! a sub-block's scale is applied once per 16 rows and 32 (Q4_K) or 16 (Q6_K) elements, not once
//! per element group as in the row-major kernels, which is what makes a block of several
//! activation rows (verification, prefill) cheap.
//!
//! The numbers are the same as the row-major reference (`scalar.rs`) bit for bit: per
//! super-block the integer sums are exact whatever the lane layout, and each row's float steps
//! are the same fused multiply-adds in the same order.
//!
//! Layout of one group of 16 rows, super-block after super-block (`nb = k / 256` records):
//!
//! Q4_K record, 2368 bytes (16 × 148; the original is 16 × 144):
//! - `0..32`: `d` of rows 0..15 (f16);
//! - `32..64`: `dmin` of rows 0..15 (f16);
//! - `64..192`: `scale[s][row]`, s = 0..7 (u8, unpacked from the 6-bit fields);
//! - `192..320`: `min[2p][row], min[2p+1][row]` for p = 0..3 (u8 pairs);
//! - `320..2368`: quants, `[chunk c: 4][quad i: 8][row: 16][4 bytes]` = bytes `32c + 4i ..+4`
//!   of each row's `qs` (low nibbles: elements `64c + 4i..+4`, high: `64c + 32 + 4i..+4`).
//!
//! Q8_0 record (one 32-element block), 544 bytes (16 × 34, the original size):
//! - `0..32`: `d` of rows 0..15 (f16);
//! - `32..544`: quants, `[quad i: 8][row: 16][4 bytes]` = bytes `4i ..+4` of each row's block.
//!
//! Q6_K record, 3360 bytes (16 × 210, the original size):
//! - `0..32`: `d` of rows 0..15 (f16);
//! - `32..288`: `scale[s][row]`, s = 0..15 (i8);
//! - `288..3360`: quants in the order the kernels read them, `[half n: 2][quad i: 8]` units of
//!   192 bytes: `ql` bytes `64n + 4i ..+4` (`[row: 16][4]`), then `ql` bytes `64n + 32 + 4i ..+4`,
//!   then `qh` bytes `32n + 4i ..+4` (a first layout with all `ql` before all `qh` made the
//!   one-row kernels wait on memory: the prefetchers follow one stream better than three).

use super::{q4k_scales_mins, WeightFormat, Q4K, Q6K, Q8_0};

/// Weight rows per interleaved group.
pub(crate) const ROWS: usize = 16;
/// Bytes of one Q4_K super-block record of a group.
pub(crate) const Q4K_REC: usize = 2368;
/// Bytes of one Q6_K super-block record of a group.
pub(crate) const Q6K_REC: usize = 3360;
/// Bytes of one Q8_0 block record of a group.
pub(crate) const Q80_REC: usize = 544;
/// Offset of the quants in a Q8_0 record.
pub(crate) const Q80_QS: usize = 32;

/// Offsets inside a Q4_K record.
pub(crate) mod q4k {
    pub const D: usize = 0;
    pub const DMIN: usize = 32;
    pub const SC: usize = 64;
    pub const MN: usize = 192;
    pub const QS: usize = 320;
}

/// Offsets inside a Q6_K record.
pub(crate) mod q6k {
    pub const D: usize = 0;
    pub const SC: usize = 32;
    /// The 192-byte unit of half `n`, quad `i`: low-quant lines `l0`, `l1`, then the high bits.
    pub const fn unit(n: usize, i: usize) -> usize {
        288 + (n * 8 + i) * 192
    }
    pub const L0: usize = 0;
    pub const L1: usize = 64;
    pub const H: usize = 128;
}

/// The interleaved kernels' output: one segment per activation row, each one value per weight row
/// of `w` (panics otherwise, before any kernel runs).
#[cfg(target_arch = "x86_64")]
pub(crate) fn check_out(
    format: WeightFormat,
    w: &[u8],
    nb: usize,
    rows: &[super::Row<'_>],
    out: &[&mut [f32]],
) {
    let groups = w.len() / (nb * record_bytes(format)).max(1);
    assert_eq!(
        out.len(),
        rows.len(),
        "one output segment per activation row"
    );
    assert!(
        out.iter().all(|o| o.len() == groups * ROWS),
        "output segments of {} values",
        groups * ROWS
    );
}

/// Bytes of one (super-)block record of a group.
pub(crate) fn record_bytes(format: WeightFormat) -> usize {
    match format {
        WeightFormat::Q4K => Q4K_REC,
        WeightFormat::Q6K => Q6K_REC,
        WeightFormat::Q8_0 => Q80_REC,
    }
}

/// Repacked weights in memory of their own: an anonymous mapping, advised (on Linux) into
/// transparent huge pages. The weights are most of what a forward reads, once each, front to
/// back; with 4 KiB pages that is a TLB miss every 4 KiB (a nested page walk in a VM), and the
/// hardware prefetchers stop at every 4 KiB boundary. Where huge pages are off (or unavailable)
/// this is ordinary memory.
pub(crate) struct Packed(memmap2::MmapMut);

impl Packed {
    /// `len` zero bytes.
    fn zeroed(len: usize) -> Packed {
        let map = memmap2::MmapMut::map_anon(len)
            .unwrap_or_else(|e| panic!("mapping {len} bytes for repacked weights: {e}"));
        // Advice only: without it (THP off, or `madvise` refused) the pages are 4 KiB.
        #[cfg(target_os = "linux")]
        if let Err(e) = map.advise(memmap2::Advice::HugePage) {
            tracing::debug!(error = %e, "madvise(MADV_HUGEPAGE) on repacked weights");
        }
        Packed(map)
    }
}

impl std::ops::Deref for Packed {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::DerefMut for Packed {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Packed({} bytes)", self.0.len())
    }
}

/// Repacks a row-major weight `[n, k]` into the interleaved layout; `None` where `n` is not a
/// multiple of 16.
pub(crate) fn pack(format: WeightFormat, data: &[u8], n: usize, k: usize) -> Option<Packed> {
    let rec = record_bytes(format);
    let shape = format.shape();
    if n == 0 || !n.is_multiple_of(ROWS) || !k.is_multiple_of(shape.elems) {
        return None;
    }
    let nb = k / shape.elems;
    let rb = nb * shape.bytes;
    assert_eq!(data.len(), n * rb, "weight size");
    let mut out = Packed::zeroed(n / ROWS * nb * rec);
    for (g, dst) in out.chunks_exact_mut(nb * rec).enumerate() {
        for (b, r) in dst.chunks_exact_mut(rec).enumerate() {
            let block = |row: usize| {
                let at = (g * ROWS + row) * rb + b * shape.bytes;
                &data[at..at + shape.bytes]
            };
            match format {
                WeightFormat::Q4K => pack_q4k(r, block),
                WeightFormat::Q6K => pack_q6k(r, block),
                WeightFormat::Q8_0 => pack_q8_0(r, block),
            }
        }
    }
    Some(out)
}

fn pack_q4k<'a>(r: &mut [u8], block: impl Fn(usize) -> &'a [u8]) {
    for row in 0..ROWS {
        let blk = block(row);
        debug_assert_eq!(blk.len(), Q4K.bytes);
        r[q4k::D + 2 * row..][..2].copy_from_slice(&blk[0..2]);
        r[q4k::DMIN + 2 * row..][..2].copy_from_slice(&blk[2..4]);
        let (sc, mn) = q4k_scales_mins(&blk[4..16]);
        for s in 0..8 {
            r[q4k::SC + 16 * s + row] = sc[s];
        }
        for p in 0..4 {
            r[q4k::MN + 32 * p + 2 * row] = mn[2 * p];
            r[q4k::MN + 32 * p + 2 * row + 1] = mn[2 * p + 1];
        }
        let qs = &blk[16..144];
        for c in 0..4 {
            for i in 0..8 {
                let at = q4k::QS + (c * 8 + i) * 64 + 4 * row;
                r[at..at + 4].copy_from_slice(&qs[32 * c + 4 * i..][..4]);
            }
        }
    }
}

fn pack_q6k<'a>(r: &mut [u8], block: impl Fn(usize) -> &'a [u8]) {
    for row in 0..ROWS {
        let blk = block(row);
        debug_assert_eq!(blk.len(), Q6K.bytes);
        let (ql, rest) = blk.split_at(128);
        let (qh, rest) = rest.split_at(64);
        let (scales, d) = rest.split_at(16);
        r[q6k::D + 2 * row..][..2].copy_from_slice(d);
        for s in 0..16 {
            r[q6k::SC + 16 * s + row] = scales[s];
        }
        for n in 0..2 {
            for i in 0..8 {
                let u = q6k::unit(n, i) + 4 * row;
                r[u + q6k::L0..][..4].copy_from_slice(&ql[64 * n + 4 * i..][..4]);
                r[u + q6k::L1..][..4].copy_from_slice(&ql[64 * n + 32 + 4 * i..][..4]);
                r[u + q6k::H..][..4].copy_from_slice(&qh[32 * n + 4 * i..][..4]);
            }
        }
    }
}

fn pack_q8_0<'a>(r: &mut [u8], block: impl Fn(usize) -> &'a [u8]) {
    for row in 0..ROWS {
        let blk = block(row);
        debug_assert_eq!(blk.len(), Q8_0.bytes);
        r[2 * row..][..2].copy_from_slice(&blk[0..2]);
        for i in 0..8 {
            let at = Q80_QS + (i * ROWS + row) * 4;
            r[at..at + 4].copy_from_slice(&blk[2 + 4 * i..][..4]);
        }
    }
}
