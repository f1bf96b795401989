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

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Result, Tensor};

/// `y = x · Wᵀ (+ b)` with a quantized `W` of shape `[n_out, n_in]`.
#[derive(Debug)]
pub(crate) struct Linear {
    weight: Arc<QTensor>,
    matmul: QMatMul,
    bias: Option<Tensor>,
    cpu: bool,
}

impl Linear {
    pub(crate) fn new(weight: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let cpu = weight.device().is_cpu();
        let weight = Arc::new(weight);
        let matmul = QMatMul::from_arc(weight.clone())?;
        Ok(Self {
            weight,
            matmul,
            bias,
            cpu,
        })
    }

    /// Output width.
    pub(crate) fn out_dim(&self) -> usize {
        self.weight.shape().dims()[0]
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
                .map(|l| l.matmul.forward(x))
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

    /// Layers with the same weight dtype share one fused call (one activation quantization, one
    /// pass over the worker pool).
    fn cpu_group(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let mut outs: Vec<Option<Tensor>> = vec![None; layers.len()];
        let mut done = vec![false; layers.len()];
        for i in 0..layers.len() {
            if done[i] {
                continue;
            }
            let dtype = layers[i].weight.dtype();
            let idx: Vec<usize> = (i..layers.len())
                .filter(|&j| layers[j].weight.dtype() == dtype)
                .collect();
            let group: Vec<&Linear> = idx.iter().map(|&j| layers[j]).collect();
            for (j, y) in idx.iter().zip(Self::cpu_same_dtype(&group, x)?) {
                done[*j] = true;
                outs[*j] = Some(y);
            }
        }
        Ok(outs.into_iter().flatten().collect())
    }

    fn cpu_same_dtype(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let m = x.dim(0)?;
        // A single row takes the compact Q6K kernel; two identical rows take the same tiled
        // kernel as a multi-row block. The second row is discarded.
        let pad = m == 1 && layers[0].weight.dtype() == GgmlDType::Q6K;
        let x2;
        let x = if pad {
            x2 = Tensor::cat(&[x, x], 0)?;
            &x2
        } else {
            x
        };
        let ws: Vec<&QTensor> = layers.iter().map(|l| l.weight.as_ref()).collect();
        let outs = match QTensor::gemv_fused_shared_lhs(&ws, x)? {
            Some(outs) => outs,
            None => layers
                .iter()
                .map(|l| l.matmul.forward(x))
                .collect::<Result<Vec<_>>>()?,
        };
        if pad {
            outs.iter().map(|y| y.narrow(0, 0, 1)).collect()
        } else {
            Ok(outs)
        }
    }
}
