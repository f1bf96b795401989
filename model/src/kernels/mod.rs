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
mod matmul;
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
pub(crate) use matmul::matmul;
#[cfg(test)]
use matmul::matmul_in;
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

/// Activation rows kept hot (in L1/L2) while a task walks its weight rows: for up to this many
/// rows each weight block is read from memory once.
pub(crate) const ACT_TILE: usize = 16;
