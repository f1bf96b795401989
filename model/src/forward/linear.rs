//! Quantized linear layers, routed so that a row's result never depends on how many other rows
//! share the matmul.
//!
//! candle's CPU quantized matmul quantizes each activation row on its own and then picks a kernel
//! by the row count `m`. On x86_64 with AVX512-VNNI (this project's CPUs) the choices are:
//! - Q4K / Q8_0 weights with `n % 16 == 0` and `k % 256 == 0`: repacked 16-column tiles, each row
//!   accumulated on its own (bit-identical for any `m`); for Q4K with `m >= 32` on CPUs with AMX,
//!   an AMX kernel instead (bit-identical to the tiles in our measurements, but not promised, and
//!   about 1.7x slower than the tiles here at m = 40..128);
//! - Q6K with the same shape rule: the compact `vec_dot` kernel for `m == 1`, repacked tiles for
//!   `m > 1`. The two sum in different orders (|Δ| ≈ 1e-6 per output), so one position's logits
//!   would differ between a decode step and a verify block;
//! - everything else: one `vec_dot` per (row, column), row-independent.
//!
//! [`Linear::forward_group`] therefore sends every tileable matmul through
//! `QTensor::gemv_fused_shared_lhs` (the tiled kernel for any `m`, never AMX; layers of one dtype
//! reading the same input share one activation quantization and one pass over the worker pool)
//! and pads a single Q6K row to two identical rows so that it takes the tiled kernel too; the
//! padding costs nothing measurable (the output projection is memory-bound either way). Only where
//! those return `None` (other CPUs, other dtypes, other shapes) does it fall back to
//! `QMatMul::forward`.
//!
//! All of that is now the fallback: on the CPU, Q4_K, Q6_K and Q8_0 weights go through our own
//! kernels (`crate::kernels`: one dot function per output element whatever `m`, bit-identical
//! across instruction sets, one shared worker pool), unless `EDGESPEC_CPU_KERNELS=candle`.
//! The layers of a group share one activation quantization and one pass over the pool even when
//! their formats differ (the 1.5B's Q6_K `attn_v` beside its Q4_K `attn_q`/`attn_k`).

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Result, Tensor};

use crate::kernels::{self, Isa, Mode, WeightFormat, WeightRef};

/// candle's tiled kernels need the input width to be a multiple of this (a K-quant super-block).
const TILE_K: usize = 256;
/// … and the output width to be a multiple of this (one tile of rows).
const TILE_N: usize = 16;
/// Bytes of one Q8_0 block (an f16 scale and 32 i8 values); all zero is the block of 32 zeros.
const Q8_0_BLOCK_BYTES: usize = 34;
const Q8_0_BLOCK: usize = 32;

/// `y = x · Wᵀ (+ b)` with a quantized `W` of shape `[n_out, n_in]`.
#[derive(Debug)]
pub(crate) struct Linear {
    store: Store,
    bias: Option<Tensor>,
    cpu: bool,
    /// Input width of the model (`n_in`).
    in_dim: usize,
    /// Output width (`n_out`).
    out_dim: usize,
    /// Input width of the stored weight: `in_dim`, or more where zero columns were appended
    /// (module docs).
    weight_in: usize,
    /// Our kernel for this weight (CPU, a format we have, not `EDGESPEC_CPU_KERNELS=candle`).
    ours: Option<(Isa, WeightFormat)>,
}

/// Where a weight lives.
#[derive(Debug)]
enum Store {
    /// candle's tensor (row-major GGUF blocks on the CPU; any layout on other devices).
    Candle {
        weight: Arc<QTensor>,
        matmul: QMatMul,
    },
    /// Repacked into our interleaved layout (`kernels::x16`); candle's copy is dropped.
    Interleaved(kernels::x16::Packed),
}

impl Linear {
    pub(crate) fn new(weight: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let cpu = weight.device().is_cpu();
        let (out_dim, in_dim) = weight.shape().dims2()?;
        let ours = if cpu {
            our_kernel(weight.dtype())
        } else {
            None
        };
        let interleave = ours.filter(|&(isa, _)| kernels::has_x16(isa) && kernels::interleave());
        if let Some((_, format)) = interleave {
            if let Some(packed) = kernels::x16::pack(format, &weight.data()?, out_dim, in_dim) {
                return Ok(Self {
                    store: Store::Interleaved(packed),
                    bias,
                    cpu,
                    in_dim,
                    out_dim,
                    weight_in: in_dim,
                    ours,
                });
            }
        }
        let weight = if cpu && ours.is_none() {
            pad_q8_0_for_tiles(&weight)?.unwrap_or(weight)
        } else {
            weight
        };
        let (_, weight_in) = weight.shape().dims2()?;
        let weight = Arc::new(weight);
        let matmul = QMatMul::from_arc(weight.clone())?;
        Ok(Self {
            store: Store::Candle { weight, matmul },
            bias,
            cpu,
            in_dim,
            out_dim,
            weight_in,
            ours,
        })
    }

    /// candle's weight and matmul (every layer but an interleaved one).
    fn candle(&self) -> Result<(&Arc<QTensor>, &QMatMul)> {
        match &self.store {
            Store::Candle { weight, matmul } => Ok((weight, matmul)),
            Store::Interleaved(_) => {
                candle_core::bail!("linear: an interleaved weight has no candle tensor")
            }
        }
    }

    /// Whether the weight carries appended zero columns (for tests and logs).
    #[cfg(test)]
    pub(crate) fn is_padded(&self) -> bool {
        self.weight_in != self.in_dim
    }

    /// Output width.
    pub(crate) fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Whether the weight is held in the interleaved layout (for tests and logs).
    #[cfg(test)]
    pub(crate) fn is_interleaved(&self) -> bool {
        matches!(self.store, Store::Interleaved(_))
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut out = Self::forward_group(&[self], x)?;
        Ok(out.remove(0))
    }

    /// Applies several layers that read the same input `x: [m, n_in]` (contiguous).
    pub(crate) fn forward_group(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let outs = if layers.iter().all(|l| l.cpu) {
            Self::cpu_group(layers, x)?
        } else {
            layers
                .iter()
                .map(|l| l.candle()?.1.forward(x))
                .collect::<Result<Vec<_>>>()?
        };
        layers
            .iter()
            .zip(outs)
            .map(|(l, y)| match &l.bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            })
            .collect()
    }

    /// Layers with the same weight dtype and input width share one fused call (one activation
    /// quantization, one pass over the worker pool).
    fn cpu_group(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let mut outs: Vec<Option<Tensor>> = vec![None; layers.len()];
        let mut done = vec![false; layers.len()];
        let ours: Vec<usize> = (0..layers.len())
            .filter(|&i| layers[i].ours.is_some())
            .collect();
        if !ours.is_empty() {
            let group: Vec<&Linear> = ours.iter().map(|&i| layers[i]).collect();
            for (&i, y) in ours.iter().zip(Self::ours_group(&group, x)?) {
                done[i] = true;
                outs[i] = Some(y);
            }
        }
        for i in 0..layers.len() {
            if done[i] {
                continue;
            }
            let key = |l: &Linear| (l.candle().map(|(w, _)| w.dtype()).ok(), l.weight_in);
            let idx: Vec<usize> = (i..layers.len())
                .filter(|&j| key(layers[j]) == key(layers[i]))
                .collect();
            let group: Vec<&Linear> = idx.iter().map(|&j| layers[j]).collect();
            let padded;
            let xg = match layers[i].weight_in - layers[i].in_dim {
                0 => x,
                extra => {
                    padded = x.pad_with_zeros(1, 0, extra)?;
                    &padded
                }
            };
            for (j, y) in idx.iter().zip(Self::cpu_same_dtype(&group, xg)?) {
                done[*j] = true;
                outs[*j] = Some(y);
            }
        }
        Ok(outs.into_iter().flatten().collect())
    }

    /// Layers with our kernels (one instruction set per process), in one call.
    fn ours_group(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let (m, k) = x.dims2()?;
        let xs = x
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let datas = layers
            .iter()
            .map(|l| match &l.store {
                Store::Interleaved(p) => Ok(Cow::Borrowed(&p[..])),
                Store::Candle { weight, .. } => weight.data(),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut isa = Isa::Scalar;
        let mut refs = Vec::with_capacity(layers.len());
        for (l, data) in layers.iter().zip(&datas) {
            let Some((i, format)) = l.ours else {
                candle_core::bail!("ours_group: a layer without our kernel");
            };
            if l.in_dim != k {
                candle_core::bail!("linear: input width {k}, weight width {}", l.in_dim);
            }
            isa = i;
            refs.push(WeightRef {
                data: data.as_ref(),
                n: l.out_dim(),
                k,
                format,
                packed: matches!(l.store, Store::Interleaved(_)),
            });
        }
        kernels::matmul(isa, &refs, &xs, m)
            .into_iter()
            .zip(&refs)
            .map(|(y, w)| Tensor::from_vec(y, (m, w.n), &Device::Cpu))
            .collect()
    }

    fn cpu_same_dtype(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let m = x.dim(0)?;
        // A single row takes the compact Q6K kernel; two identical rows take the same tiled
        // kernel as a multi-row block. The second row is discarded.
        let pad = m == 1 && layers[0].candle()?.0.dtype() == GgmlDType::Q6K;
        let x2;
        let x = if pad {
            x2 = Tensor::cat(&[x, x], 0)?;
            &x2
        } else {
            x
        };
        let ws = layers
            .iter()
            .map(|l| Ok(l.candle()?.0.as_ref()))
            .collect::<Result<Vec<&QTensor>>>()?;
        let outs = match QTensor::gemv_fused_shared_lhs(&ws, x)? {
            Some(outs) => outs,
            None => layers
                .iter()
                .map(|l| l.candle()?.1.forward(x))
                .collect::<Result<Vec<_>>>()?,
        };
        if pad {
            outs.iter().map(|y| y.narrow(0, 0, 1)).collect()
        } else {
            Ok(outs)
        }
    }
}

/// Our kernel for a CPU weight of `dtype`, unless `EDGESPEC_CPU_KERNELS=candle` or we have none.
fn our_kernel(dtype: GgmlDType) -> Option<(Isa, WeightFormat)> {
    let Mode::Ours(isa) = kernels::mode() else {
        return None;
    };
    let format = match dtype {
        GgmlDType::Q4K => WeightFormat::Q4K,
        GgmlDType::Q6K => WeightFormat::Q6K,
        GgmlDType::Q8_0 => WeightFormat::Q8_0,
        _ => return None,
    };
    Some((isa, format))
}

/// A copy of a Q8_0 `[n, k]` CPU weight with zero blocks appended to every row up to the next
/// multiple of [`TILE_K`] columns, if that lets candle's tiled kernel take it; `None` where the
/// weight is not Q8_0, is already tileable, has `n` off the tile grid, or the kernel is not
/// available on this CPU (probed with one zero row).
fn pad_q8_0_for_tiles(weight: &QTensor) -> Result<Option<QTensor>> {
    let (n, k) = weight.shape().dims2()?;
    if weight.dtype() != GgmlDType::Q8_0
        || k % TILE_K == 0
        || n % TILE_N != 0
        || k % Q8_0_BLOCK != 0
    {
        return Ok(None);
    }
    let k_pad = k.next_multiple_of(TILE_K);
    let row = k / Q8_0_BLOCK * Q8_0_BLOCK_BYTES;
    let extra = (k_pad - k) / Q8_0_BLOCK * Q8_0_BLOCK_BYTES;
    let data = weight.data()?;
    let mut bytes = Vec::with_capacity(n * (row + extra));
    for r in data.chunks_exact(row) {
        bytes.extend_from_slice(r);
        bytes.resize(bytes.len() + extra, 0);
    }
    let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, GgmlDType::Q8_0)?;
    let padded = QTensor::new(storage, (n, k_pad))?;
    let probe = Tensor::zeros((1, k_pad), candle_core::DType::F32, &Device::Cpu)?;
    Ok(QTensor::gemv_fused_shared_lhs(&[&padded], &probe)?.map(|_| padded))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q8_0(n: usize, k: usize) -> Result<QTensor> {
        let vals: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        QTensor::quantize(
            &Tensor::from_vec(vals, (n, k), &Device::Cpu)?,
            GgmlDType::Q8_0,
        )
    }

    /// The padded layer computes the same product as the unpadded weight (up to the activation
    /// quantization, which differs between the kernels), with the output shape of the original.
    #[test]
    fn padded_q8_0_layer_matches_the_plain_product() -> Result<()> {
        let (n, k) = (32, 96);
        let w = q8_0(n, k)?;
        let reference = w.dequantize(&Device::Cpu)?;
        let lin = Linear::new(q8_0(n, k)?, None)?;
        let x: Vec<f32> = (0..3 * k)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
            .collect();
        let x = Tensor::from_vec(x, (3, k), &Device::Cpu)?;
        let y = lin.forward(&x)?;
        assert_eq!(y.dims(), &[3, n]);
        let want = x.matmul(&reference.t()?)?;
        let diff = (y - &want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(
            diff <= 0.02 * scale,
            "max |Δ| {diff} against max |y| {scale}"
        );
        Ok(())
    }

    /// A Q4_K / Q6_K / Q8_0 layer on the 16-row grid is held interleaved (where this CPU has the
    /// kernels) and computes the same bits as the row-major scalar reference.
    #[test]
    fn interleaved_layers_compute_the_row_major_reference() -> Result<()> {
        let (n, k) = (32, 512);
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q8_0] {
            let vals: Vec<f32> = (0..n * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0 + (i / 64 % 5) as f32 * 0.1)
                .collect();
            let q = || {
                QTensor::quantize(
                    &Tensor::from_vec(vals.clone(), (n, k), &Device::Cpu)?,
                    dtype,
                )
            };
            let lin = Linear::new(q()?, None)?;
            let Some((isa, format)) = lin.ours else {
                return Ok(()); // EDGESPEC_CPU_KERNELS=candle
            };
            assert_eq!(
                lin.is_interleaved(),
                kernels::has_x16(isa) && kernels::interleave(),
                "{dtype:?}"
            );
            let x: Vec<f32> = (0..5 * k)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
                .collect();
            let y = lin
                .forward(&Tensor::from_vec(x.clone(), (5, k), &Device::Cpu)?)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let plain = q()?;
            let data = plain.data()?;
            let want = kernels::matmul(
                Isa::Scalar,
                &[WeightRef {
                    data: &data,
                    n,
                    k,
                    format,
                    packed: false,
                }],
                &x,
                5,
            );
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y), bits(&want[0]), "{dtype:?}");
        }
        Ok(())
    }

    #[test]
    fn only_q8_0_off_the_tile_grid_is_padded() -> Result<()> {
        // Already a multiple of 256: nothing to do.
        assert!(pad_q8_0_for_tiles(&q8_0(16, 256)?)?.is_none());
        // Rows off the 16-row grid cannot take the tiles either way.
        assert!(pad_q8_0_for_tiles(&q8_0(8, 96)?)?.is_none());
        // Not Q8_0.
        let f = QTensor::quantize(
            &Tensor::zeros((16, 96), candle_core::DType::F32, &Device::Cpu)?,
            GgmlDType::Q4_0,
        )?;
        assert!(pad_q8_0_for_tiles(&f)?.is_none());
        // Where the CPU has the tiled Q8_0 kernel, the padded copy has the next multiple of 256.
        if let Some(p) = pad_q8_0_for_tiles(&q8_0(16, 96)?)? {
            assert_eq!(p.shape().dims(), &[16, 256]);
            let lin = Linear::new(q8_0(16, 96)?, None)?;
            // Only the candle route pads; our kernels take any multiple of 32.
            assert_eq!(lin.is_padded(), lin.ours.is_none());
        }
        Ok(())
    }
}
