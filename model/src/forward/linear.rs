//! Quantized linear layers, routed so that a row's result never depends on how many other rows
//! share the matmul.
//!
//! candle's CPU quantized matmul quantizes each activation row on its own and then picks a kernel
//! by the row count `m`. On x86_64 with AVX512-VNNI (this project's CPUs) the choices are:
//! - Q4K / Q8_0 weights with `n % 16 == 0` and `k % 256 == 0`: repacked 16-column tiles, each row
//!   accumulated independently (bit-identical for any `m`) — **except** Q4K with `m >= 32` on CPUs
//!   with AMX, which switches to an AMX kernel that rounds differently;
//! - Q6K with the same shape rule: the compact `vec_dot` kernel for `m == 1`, repacked tiles for
//!   `m > 1`; the two sum in different orders, so one position's logits would differ between a
//!   decode step and a verify block;
//! - everything else: one `vec_dot` per (row, column), row-independent.
//!
//! [`Linear::forward_group`] therefore sends every tileable matmul through
//! `QTensor::gemv_fused_shared_lhs` (the tiled kernel for any `m`, never AMX; it also shares one
//! activation quantization between q/k/v and gate/up) and pads a single Q6K row to two rows so that
//! it takes the tiled kernel too. Only where those return `None` (other CPUs, other dtypes) does it
//! fall back to `QMatMul::forward`.

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

    fn cpu_group(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let same_dtype = layers
            .iter()
            .all(|l| l.weight.dtype() == layers[0].weight.dtype());
        if same_dtype && layers.len() > 1 {
            let ws: Vec<&QTensor> = layers.iter().map(|l| l.weight.as_ref()).collect();
            if let Some(outs) = QTensor::gemv_fused_shared_lhs(&ws, x)? {
                return Ok(outs);
            }
        }
        layers.iter().map(|l| l.cpu_single(x)).collect()
    }

    fn cpu_single(&self, x: &Tensor) -> Result<Tensor> {
        let m = x.dim(0)?;
        if m == 1 && self.weight.dtype() == GgmlDType::Q6K {
            // Two identical rows take the same (tiled) kernel as a multi-row block; the second
            // row is discarded.
            let x2 = Tensor::cat(&[x, x], 0)?;
            let y2 = self.cpu_tiled_or_plain(&x2)?;
            return y2.narrow(0, 0, 1);
        }
        self.cpu_tiled_or_plain(x)
    }

    fn cpu_tiled_or_plain(&self, x: &Tensor) -> Result<Tensor> {
        match QTensor::gemv_fused_shared_lhs(&[self.weight.as_ref()], x)? {
            Some(mut outs) => Ok(outs.remove(0)),
            None => self.matmul.forward(x),
        }
    }
}
