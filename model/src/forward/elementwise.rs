//! The MLP's `silu(gate) · up` on our worker pool: one pass, the rows' elements split over the
//! pool. candle computes `silu` and the product as two single-threaded passes for tensors under
//! 64 Ki elements (every decode step and verification block of the supported models), during
//! which the pool's other threads sit idle: 1.5 % of a verification block of 5 on the 1.5B was
//! `expf` on the calling thread alone.
//!
//! Each element is `v / (1 + e^(−v)) · u`, the expression and roundings of candle's `silu` then
//! `mul` for f32, so the bits are the same as before and the same whatever the split. Other
//! devices and dtypes keep candle's ops.

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use crate::kernels::pool;

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
        pool().for_each_mut(&mut units, |(o, (g, u))| {
            for ((o, &g), &u) in o.iter_mut().zip(*g).zip(*u) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        });
        drop(units);
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// The fused op gives candle's bits (`silu` then `mul`), for sizes below, at and above a
    /// chunk, including large, small and zero gates.
    #[test]
    fn gives_the_bits_of_candles_silu_then_mul() {
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
            assert_eq!(bits(silu_mul(&gt, &ut).unwrap()), want, "n={n}");
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
