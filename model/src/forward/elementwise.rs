//! The MLP's `silu(gate) · up` on our worker pool: one pass, the rows' elements split over the
//! pool. candle computes `silu` and the product as two single-threaded passes for tensors under
//! 64 Ki elements (every decode step and verification block of the supported models), during
//! which the pool's other threads sit idle: 1.5 % of a verification block of 5 on the 1.5B was
//! `expf` on the calling thread alone.
//!
//! Each element is `v / (1 + e^(−v)) · u`, the expression of candle's `silu` then `mul` for f32,
//! with our vectorized `e^x` (`kernels::exp::exp_inplace`, within 1 ulp; libm's `expf` one
//! value at a time was most of this op): the same bits whatever the split, within a few ulp of
//! candle's. Other devices and dtypes keep candle's ops.

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use crate::kernels::{exp, pool};

/// `silu(gate) * up` (same shape).
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.device().is_cpu() && gate.dtype() == DType::F32 && up.dtype() == DType::F32 {
        gate.apply_op2_no_bwd(up, &SiluMul)
    } else {
        gate.silu()? * up
    }
}

/// Elements per unit of work handed to the pool.
const CHUNK: usize = 4096;

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gl: &Layout,
        up: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if gl.shape() != ul.shape() {
            bail!(
                "silu-mul: gate {:?} and up {:?} differ in shape",
                gl.shape(),
                ul.shape()
            );
        }
        let (CpuStorage::F32(g), CpuStorage::F32(u)) = (gate, up) else {
            bail!("silu-mul: f32 only");
        };
        let (Some((g0, g1)), Some((u0, u1))) = (gl.contiguous_offsets(), ul.contiguous_offsets())
        else {
            bail!("silu-mul: contiguous tensors only");
        };
        let (g, u) = (&g[g0..g1], &u[u0..u1]);
        let mut out = vec![0f32; g.len()];
        let mut units: Vec<_> = out
            .chunks_mut(CHUNK)
            .zip(g.chunks(CHUNK).zip(u.chunks(CHUNK)))
            .collect();
        pool().for_each_mut(&mut units, |(o, (g, u))| exp::silu_mul(o, g, u));
        drop(units);
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// The fused op agrees with candle's `silu` then `mul` to within 4 ulp plus 1e-30 (its `e^x`
    /// is ours, and clamps where candle's overflows), for sizes below, at and above a chunk, including
    /// large, small and zero gates; and a value's bits do not depend on the tensor's size.
    #[test]
    fn agrees_with_candles_silu_then_mul() {
        let mut first: Option<Vec<u32>> = None;
        for n in [1usize, 7, CHUNK, 3 * CHUNK + 5] {
            let g: Vec<f32> = (0..n)
                .map(|i| match i % 11 {
                    0 => 0.0,
                    1 => 95.0,
                    2 => -95.0,
                    _ => ((i as f32) * 0.37).sin() * 6.0,
                })
                .collect();
            let u: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.91).cos() * 3.0).collect();
            let gt = Tensor::from_vec(g, (1, n), &Device::Cpu).unwrap();
            let ut = Tensor::from_vec(u, (1, n), &Device::Cpu).unwrap();
            let bits = |t: Tensor| -> Vec<u32> {
                let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                v.iter().map(|f| f.to_bits()).collect()
            };
            let want = bits((gt.silu().unwrap() * &ut).unwrap());
            let got = bits(silu_mul(&gt, &ut).unwrap());
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                let (g, w) = (f32::from_bits(g), f32::from_bits(w));
                let tol = 4.0 * f32::EPSILON * w.abs() + 1e-30;
                assert!(
                    (g - w).abs() <= tol,
                    "n={n} i={i}: {g} against candle's {w}"
                );
            }
            // The same gates and ups at the start of every size: the same bits.
            let first = first.get_or_insert_with(|| got.clone());
            let common = first.len().min(got.len());
            assert_eq!(got[..common], first[..common], "n={n}");
        }
    }

    #[test]
    fn refuses_mismatched_shapes() {
        let a = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
        let err = silu_mul(&a, &b).unwrap_err().to_string();
        assert!(err.contains("differ in shape"), "{err}");
    }
}
