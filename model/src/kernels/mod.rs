//! Our CPU quantized matmul: activation quantization, quantized dot products for the weight
//! formats of the pinned models (Q4_K, Q6_K, Q8_0) and the process-wide worker pool that runs
//! them. **All of the crate's `unsafe` lives in this module** (SIMD intrinsics in `avx2.rs`,
//! `avx512.rs`, the interleaved `x16_*.rs` kernels, `neon.rs` and attention's f32 loops in
//! `vecf32.rs`, the lifetime-erased job pointer and the disjoint-item hand-out in `pool.rs`); the rest of the
//! workspace keeps `unsafe_code = "deny"`.
//!
//! # Numerics and batch invariance
//!
//! A weight row · activation row product is computed by exactly one call of one dot function,
//! whatever the number of rows `m` in the matmul and however the pool splits the work, so a
//! position's output never depends on its neighbours. Inside a dot product the integer part is
//! exact (no i16 saturation is possible with our activation range of ±127). The f32 part is, per
//! super-block (Q4_K, Q6_K) or block (Q8_0), one fused multiply-add of the block's exact integer
//! total into the row's accumulator (plus one of the min term for Q4_K), so any lane layout —
//! element lanes in the row-major kernels, one lane per weight row in the interleaved ones
//! (`x16.rs`) — gives the same bits. The scalar reference (`scalar.rs`) performs the same
//! operations in the same order, so every SIMD path is **bit-identical** to it (the tests check
//! equality, not a tolerance).
//!
//! Activations are quantized symmetrically (`d = max|x| / 127`, round half to even), per
//! 256-element super-block for K-quant weights (Q8_K-like, with 16-element sums for the min
//! terms) and per 32-element block for Q8_0 weights. The rounding is the scalar code on every
//! path.
//!
//! # Selection
//!
//! `EDGESPEC_CPU_KERNELS` (read once): `auto` (default: the best this CPU has of AVX-512 VNNI,
//! AVX2 and scalar on x86-64, NEON on AArch64), `avx512`, `avx2`, `neon`, `scalar`, or `candle`
//! (leave every matmul to candle, as before these kernels). The AVX-512 set adds Q8_0 and Q4_K
//! kernels; all are bit-identical. `EDGESPEC_CPU_LAYOUT=rows` keeps weights row-major instead of
//! interleaved (NEON has row-major kernels only, so its weights always are).

#![allow(unsafe_code)]

// The kernel files' shared macros (`row_loop!`, `row_major_block!`, `views!`); declared first
// so that every module below sees them.
#[macro_use]
mod macros;

mod acts;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub(crate) mod exp;
#[cfg(target_arch = "aarch64")]
mod neon;
mod pool;
mod scalar;
#[cfg(test)]
mod tests;
pub(crate) mod vecf32;
pub(crate) mod x16;
#[cfg(target_arch = "x86_64")]
mod x16_avx2;
#[cfg(target_arch = "x86_64")]
mod x16_avx512;
#[cfg(target_arch = "x86_64")]
mod x16_common;
#[cfg(target_arch = "x86_64")]
mod x16_vnni;

use std::sync::OnceLock;

#[cfg(test)]
pub(crate) use acts::quantize;
pub(crate) use acts::{quantize_in, ActFormat, Acts, Row};
pub(crate) use pool::{pool, Pool};

/// Elements of a K-quant super-block.
pub(crate) const QK_K: usize = 256;

/// Elements and bytes of one weight block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockShape {
    pub elems: usize,
    pub bytes: usize,
}

pub(crate) const Q4K: BlockShape = BlockShape {
    elems: QK_K,
    bytes: 144,
};
pub(crate) const Q6K: BlockShape = BlockShape {
    elems: QK_K,
    bytes: 210,
};
pub(crate) const Q8_0: BlockShape = BlockShape {
    elems: 32,
    bytes: 34,
};

/// A weight format with our own kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WeightFormat {
    Q4K,
    Q6K,
    Q8_0,
}

impl WeightFormat {
    pub(crate) fn shape(self) -> BlockShape {
        match self {
            WeightFormat::Q4K => Q4K,
            WeightFormat::Q6K => Q6K,
            WeightFormat::Q8_0 => Q8_0,
        }
    }

    fn act(self) -> ActFormat {
        match self {
            WeightFormat::Q4K | WeightFormat::Q6K => ActFormat::Q8K,
            WeightFormat::Q8_0 => ActFormat::Q8_0,
        }
    }
}

/// An instruction set our kernels are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2 plus AVX-VNNI (256-bit `vpdpbusd`) for the interleaved kernels; row-major weights
    /// take AVX2's.
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
    /// AVX2 plus 512-bit kernels for Q8_0 and Q4_K weights.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// AArch64 Advanced SIMD (base NEON, no dotprod), row-major kernels only.
    #[cfg(target_arch = "aarch64")]
    Neon,
}

impl Isa {
    /// Every instruction set this CPU can run (the scalar one first).
    pub(crate) fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        if avx2::detected() {
            v.push(Isa::Avx2);
        }
        #[cfg(target_arch = "x86_64")]
        if x16_vnni::detected() {
            v.push(Isa::AvxVnni);
        }
        #[cfg(target_arch = "x86_64")]
        if avx512::detected() {
            v.push(Isa::Avx512);
        }
        #[cfg(target_arch = "aarch64")]
        if neon::detected() {
            v.push(Isa::Neon);
        }
        v
    }
}

/// What `EDGESPEC_CPU_KERNELS` selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Our kernels on this instruction set.
    Ours(Isa),
    /// candle's quantized matmul (the route before our kernels).
    Candle,
}

/// The process's kernel choice (`EDGESPEC_CPU_KERNELS`, read once).
pub(crate) fn mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(|| {
        let raw = std::env::var("EDGESPEC_CPU_KERNELS").unwrap_or_default();
        let best = *Isa::available().last().unwrap_or(&Isa::Scalar);
        let mode = match raw.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Mode::Ours(best),
            "scalar" => Mode::Ours(Isa::Scalar),
            "candle" => Mode::Candle,
            #[cfg(target_arch = "x86_64")]
            "avx2" if avx2::detected() => Mode::Ours(Isa::Avx2),
            #[cfg(target_arch = "x86_64")]
            "avxvnni" if x16_vnni::detected() => Mode::Ours(Isa::AvxVnni),
            #[cfg(target_arch = "x86_64")]
            "avx512" if avx512::detected() => Mode::Ours(Isa::Avx512),
            #[cfg(target_arch = "aarch64")]
            "neon" if neon::detected() => Mode::Ours(Isa::Neon),
            other => {
                tracing::warn!(
                    value = other,
                    "EDGESPEC_CPU_KERNELS: unknown or unsupported here (auto, avx512, avxvnni, \
                     avx2, neon, scalar, candle); using auto"
                );
                Mode::Ours(best)
            }
        };
        tracing::debug!(?mode, "CPU quantized kernels");
        mode
    })
}

/// Exact f16 → f32 (little-endian bytes).
pub(crate) fn f16_to_f32(b: [u8; 2]) -> f32 {
    let h = u32::from(u16::from_le_bytes(b));
    let sign = (h & 0x8000) << 16;
    let exp = (h >> 10) & 0x1f;
    let man = h & 0x3ff;
    let bits = match exp {
        0 => {
            // Zero or subnormal: man · 2⁻²⁴, exact in f32.
            let v = man as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        31 => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// The 6-bit scales and mins of a Q4_K super-block's 8 sub-blocks (from its 12 packed bytes).
pub(crate) fn q4k_scales_mins(p: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = p[j] & 63;
        mn[j] = p[j + 4] & 63;
    }
    for j in 4..8 {
        sc[j] = (p[j + 4] & 0xf) | ((p[j - 4] >> 6) << 4);
        mn[j] = (p[j + 4] >> 4) | ((p[j] >> 6) << 4);
    }
    (sc, mn)
}

/// One weight row (`k / block` blocks) · activation row `r`.
#[cfg(test)]
pub(crate) fn dot(isa: Isa, format: WeightFormat, w: &[u8], acts: &Acts, r: usize) -> f32 {
    let mut out = [0f32];
    block(isa, format, (w, w.len()), &[acts.row(r)], &mut out, 1);
    out[0]
}

/// How the SIMD kernels walk `n` activation rows: groups of 4, then 2, then 1, each weight block
/// unpacked once per group. Yields (first row, group size).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn row_groups(n: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut j = 0;
    std::iter::from_fn(move || {
        let r = match n - j {
            0 => return None,
            1 => 1,
            2 | 3 => 2,
            _ => 4,
        };
        j += r;
        Some((j - r, r))
    })
}

/// `out[i * stride + j] = weight row i · rows[j]` for every weight row of `w` (rows of `rb`
/// bytes). Every output is bit-identical to [`dot`] of its two rows, on every [`Isa`].
fn block(
    isa: Isa,
    format: WeightFormat,
    w: (&[u8], usize),
    rows: &[Row<'_>],
    out: &mut [f32],
    stride: usize,
) {
    match isa {
        Isa::Scalar => {
            for (wrow, o) in w.0.chunks_exact(w.1).zip(out.chunks_mut(stride)) {
                for (&(q, d, bs, _), o) in rows.iter().zip(o.iter_mut()) {
                    *o = match format {
                        WeightFormat::Q4K => scalar::dot_q4k(wrow, q, d, bs),
                        WeightFormat::Q6K => scalar::dot_q6k(wrow, q, d, bs),
                        WeightFormat::Q8_0 => scalar::dot_q8_0(wrow, q, d),
                    };
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::AvxVnni => avx2::block(format, w, rows, out, stride),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => match format {
            WeightFormat::Q8_0 => avx512::block(false, w, rows, out, stride),
            WeightFormat::Q4K => avx512::block(true, w, rows, out, stride),
            WeightFormat::Q6K => avx2::block(format, w, rows, out, stride),
        },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => neon::block(format, w, rows, out, stride),
    }
}

/// [`block`] for interleaved groups (`nb` super-block records each), into the output rows'
/// segments: `out[j][i]` = weight row `i` · `rows[j]` (a group's 16 values of a row are one
/// contiguous store).
// Only the x86 sets have interleaved kernels; elsewhere every arm is unreachable.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn block_x16(
    isa: Isa,
    format: WeightFormat,
    (w, nb): (&[u8], usize),
    rows: &[Row<'_>],
    out: &mut [&mut [f32]],
) {
    match isa {
        Isa::Scalar => unreachable!("no scalar kernel for interleaved weights"),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unreachable!("no NEON kernel for interleaved weights"),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x16_avx2::block(format, w, nb, rows, out),
        #[cfg(target_arch = "x86_64")]
        Isa::AvxVnni => x16_vnni::block(format, w, nb, rows, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => x16_avx512::block(format, w, nb, rows, out),
    }
}

/// A quantized weight `[n, k]` as raw blocks: row-major (`k / block` blocks per row), or in the
/// interleaved layout of [`x16`] when `packed`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WeightRef<'a> {
    pub data: &'a [u8],
    pub n: usize,
    pub k: usize,
    pub format: WeightFormat,
    pub packed: bool,
}

impl WeightRef<'_> {
    /// Bytes per weight row (for the interleaved layout a sixteenth of a group, exactly: every
    /// record is 16 rows' blocks).
    fn row_bytes(&self) -> usize {
        if self.packed {
            return self.group_bytes() / x16::ROWS;
        }
        self.k / self.format.shape().elems * self.format.shape().bytes
    }

    /// Bytes of one interleaved group of 16 rows.
    fn group_bytes(&self) -> usize {
        self.k / self.format.shape().elems * x16::record_bytes(self.format)
    }

    fn valid(&self) -> bool {
        if self.packed {
            self.n.is_multiple_of(x16::ROWS)
                && self.k.is_multiple_of(self.format.shape().elems)
                && self.data.len() == self.n / x16::ROWS * self.group_bytes()
        } else {
            self.data.len() == self.n * self.row_bytes()
        }
    }
}

/// Whether `isa` has kernels for the interleaved layout (the x86 SIMD sets have, for every
/// format; scalar and NEON keep weights row-major).
pub(crate) fn has_x16(isa: Isa) -> bool {
    match isa {
        Isa::Scalar => false,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::AvxVnni | Isa::Avx512 => true,
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => false,
    }
}

/// Whether weights are repacked into the interleaved layout where a kernel exists
/// (`EDGESPEC_CPU_LAYOUT`: `interleaved`, the default, or `rows` to keep GGUF's row-major blocks;
/// read once). Both give the same bits; the setting is for comparisons.
pub(crate) fn interleave() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let raw = std::env::var("EDGESPEC_CPU_LAYOUT").unwrap_or_default();
        match raw.trim().to_ascii_lowercase().as_str() {
            "" | "interleaved" => true,
            "rows" => false,
            other => {
                tracing::warn!(
                    value = other,
                    "EDGESPEC_CPU_LAYOUT: unknown (interleaved, rows); using interleaved"
                );
                true
            }
        }
    })
}

/// About how many weight bytes one pool task covers (for all activation rows). Large: a thread
/// streams each task's rows as one contiguous run, which the hardware prefetcher follows (with
/// 32 KiB tasks two threads interleaving their rows decoded slower than one; with 512 KiB the
/// 0.5B's two-thread decode went from 26 to 14 ms). A layer's task count is rounded up to a
/// multiple of the pool's threads so that they finish together.
const TASK_BYTES: usize = 512 << 10;
const MIN_TASK_ROWS: usize = 16;

/// Weight rows per task for a layer of `n` rows of `rb` bytes on `threads` threads (a multiple
/// of 16, the interleaved group).
fn rows_per_task(n: usize, rb: usize, threads: usize) -> usize {
    let tasks = (n * rb)
        .div_ceil(TASK_BYTES)
        .next_multiple_of(threads.max(1));
    n.div_ceil(tasks)
        .max(MIN_TASK_ROWS)
        .next_multiple_of(x16::ROWS)
}
/// Activation rows kept hot (in L1/L2) while a task walks its weight rows: for up to this many
/// rows each weight block is read from memory once.
pub(crate) const ACT_TILE: usize = 16;

/// `y_l = x · W_lᵀ` for every weight `l` (all with the same `k`), `x` being `m` rows of `k`:
/// activations are quantized once per format, then the pool computes every output row of every
/// weight. Returns each `y_l` row-major `[m, n_l]`.
pub(crate) fn matmul(isa: Isa, weights: &[WeightRef<'_>], x: &[f32], m: usize) -> Vec<Vec<f32>> {
    matmul_in(pool(), isa, weights, x, m)
}

/// [`matmul`] on a given pool.
pub(crate) fn matmul_in(
    pool: &Pool,
    isa: Isa,
    weights: &[WeightRef<'_>],
    x: &[f32],
    m: usize,
) -> Vec<Vec<f32>> {
    let Some(k) = weights.first().map(|w| w.k) else {
        return Vec::new();
    };
    assert!(weights.iter().all(|w| w.k == k && w.valid()));
    assert!(
        weights.iter().all(|w| !w.packed) || has_x16(isa),
        "interleaved weights need an interleaved kernel"
    );
    assert_eq!(x.len(), m * k, "activation shape");
    let needs = |f: ActFormat| weights.iter().any(|w| w.format.act() == f);
    let q8k = needs(ActFormat::Q8K).then(|| quantize_in(Some(pool), x, k, ActFormat::Q8K));
    let q80 = needs(ActFormat::Q8_0).then(|| quantize_in(Some(pool), x, k, ActFormat::Q8_0));
    fn rows_of(a: &Option<Acts>, m: usize) -> Vec<Row<'_>> {
        a.as_ref()
            .map_or(Vec::new(), |a| (0..m).map(|r| a.row(r)).collect())
    }
    let (rows_q8k, rows_q80) = (rows_of(&q8k, m), rows_of(&q80, m));
    // Outputs row-major `[m, n_l]`. A task owns weight rows `row0..row0 + n_rows`, that is one
    // segment of each of the `m` output rows. The interleaved kernels store into the segments
    // directly (a group's 16 values of an activation row are contiguous); the row-major ones
    // compute `[n_rows, m]` (one weight row's `m` values together) into a scratch buffer, spread
    // into the segments by the task itself. (Reordered after the pool's operation on the calling
    // thread, with the other workers idle, this was 2 % of a verification block.)
    let mut outs: Vec<Vec<f32>> = weights.iter().map(|w| vec![0f32; w.n * m]).collect();
    {
        let mut tasks: Vec<Task<'_>> = Vec::new();
        for (l, out) in outs.iter_mut().enumerate() {
            let n = weights[l].n;
            let per_task = rows_per_task(n, weights[l].row_bytes(), pool.threads());
            let first = tasks.len();
            for r0 in (0..n).step_by(per_task) {
                tasks.push(Task {
                    l,
                    row0: r0,
                    n_rows: per_task.min(n - r0),
                    segs: Vec::with_capacity(m),
                });
            }
            for row in out.chunks_mut(n) {
                for (t, seg) in row.chunks_mut(per_task).enumerate() {
                    tasks[first + t].segs.push(seg);
                }
            }
        }
        pool.for_each_mut(&mut tasks, |task| {
            let w = &weights[task.l];
            let rows = match w.format.act() {
                ActFormat::Q8K => &rows_q8k,
                ActFormat::Q8_0 => &rows_q80,
            };
            // A task's rows are one byte range in either layout (an interleaved group of 16 rows
            // is 16 rows' bytes, and tasks are whole groups).
            let rb = w.row_bytes();
            let wchunk = &w.data[task.row0 * rb..(task.row0 + task.n_rows) * rb];
            if w.packed {
                let nb = k / w.format.shape().elems;
                for r0 in (0..m).step_by(ACT_TILE) {
                    let r1 = (r0 + ACT_TILE).min(m);
                    block_x16(
                        isa,
                        w.format,
                        (wchunk, nb),
                        &rows[r0..r1],
                        &mut task.segs[r0..r1],
                    );
                }
                return;
            }
            let run = |out: &mut [f32]| {
                for r0 in (0..m).step_by(ACT_TILE) {
                    let tile = &rows[r0..(r0 + ACT_TILE).min(m)];
                    block(isa, w.format, (wchunk, rb), tile, &mut out[r0..], m);
                }
            };
            if let [seg] = task.segs.as_mut_slice() {
                // One activation row: both layouts are the same.
                run(seg);
                return;
            }
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                scratch.clear();
                scratch.resize(task.n_rows * m, 0.0);
                run(&mut scratch);
                spread(&scratch, &mut task.segs);
            });
        });
    }
    outs
}

/// One pool task of [`matmul_in`]: weight rows `row0..row0 + n_rows` of weight `l`, and their
/// segment of each output row.
struct Task<'a> {
    l: usize,
    row0: usize,
    n_rows: usize,
    segs: Vec<&'a mut [f32]>,
}

thread_local! {
    /// A task's outputs in the kernels' `[n_rows, m]` layout, reused across tasks.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `[n, m]` (`a`, one weight row's `m` values together) into `m` segments of `n`: `segs[j][i] =
/// a[i * m + j]`, in blocks of [`SPREAD_BLOCK`] weight rows so that reads and writes stay in a
/// few cache lines.
fn spread(a: &[f32], segs: &mut [&mut [f32]]) {
    let m = segs.len();
    let n = a.len() / m.max(1);
    for i0 in (0..n).step_by(SPREAD_BLOCK) {
        let i1 = (i0 + SPREAD_BLOCK).min(n);
        for (j, seg) in segs.iter_mut().enumerate() {
            for (d, i) in seg[i0..i1].iter_mut().zip(i0..i1) {
                *d = a[i * m + j];
            }
        }
    }
}
const SPREAD_BLOCK: usize = 32;
