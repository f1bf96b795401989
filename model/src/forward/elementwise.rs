//! The residual stream's add and RMS norm ([`add_rms_norm`]), and the MLP's `silu(gate) · up` on
//! our worker pool: one pass, the rows' elements split over the pool. candle computes `silu` and the product as two single-threaded passes for tensors under
//! 64 Ki elements (every decode step and verification block of the supported models), during
//! which the pool's other threads sit idle: 1.5 % of a verification block of 5 on the 1.5B was
//! `expf` on the calling thread alone.
//!
//! Each element is `v / (1 + e^(−v)) · u`, the expression of candle's `silu` then `mul` for f32,
//! with our vectorized `e^x` (`kernels::exp::exp_inplace`, within 1 ulp; libm's `expf` one
//! value at a time was most of this op): the same bits whatever the split, within a few ulp of
//! candle's. Other devices and dtypes keep candle's ops.

use candle_core::{bail, CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};

use crate::kernels::{exp, pool};

/// The residual stream's step between two sublayers: `x + delta` (when there is a delta) and its
/// RMS norm scaled by `alpha`, `[rows, dim]` each.
///
/// On the CPU (f32) one pass on the calling thread with candle's arithmetic, bit for bit: the
/// add, the squares summed one after the other in f32, `m = sqrt(Σ/n + ε)` and `x / m · alpha`.
/// (Summed in eight lanes instead, which is faster, the norms moved by a few ulp and the 1.5B's
/// greedy answer to two of the four edge-benchmark prompts changed, one at its first token: not
/// worth the 0.1 ms.) What it saves is candle's two ops, tensors and its add's trip through
/// rayon's parallel map. Rows are independent, so a row's bits do not depend on the others.
/// Elsewhere, candle's ops.
pub(crate) fn add_rms_norm(
    x: &Tensor,
    delta: Option<&Tensor>,
    alpha: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(cpu_f32(x) && cpu_f32(alpha) && delta.is_none_or(cpu_f32)) {
        let x = match delta {
            Some(d) => (x + d)?,
            None => x.clone(),
        };
        let h = candle_nn::ops::rms_norm(&x, alpha, eps)?;
        return Ok((x, h));
    }
    let (rows, dim) = x.dims2()?;
    let alpha = alpha.to_vec1::<f32>()?;
    if alpha.len() != dim {
        bail!("rms norm: {dim} values a row, {} weights", alpha.len());
    }
    let mut xs = x.flatten_all()?.to_vec1::<f32>()?;
    if let Some(d) = delta {
        if d.dims() != x.dims() {
            bail!("residual add: {:?} and {:?}", x.dims(), d.dims());
        }
        for (a, b) in xs.iter_mut().zip(d.flatten_all()?.to_vec1::<f32>()?) {
            *a += b;
        }
    }
    let mut h = vec![0f32; xs.len()];
    for (x, h) in xs.chunks_exact(dim).zip(h.chunks_exact_mut(dim)) {
        let m = (x.iter().map(|&v| v * v).sum::<f32>() / dim as f32 + eps).sqrt();
        for ((h, &x), &a) in h.iter_mut().zip(x).zip(&alpha) {
            *h = x / m * a;
        }
    }
    Ok((
        Tensor::from_vec(xs, (rows, dim), &Device::Cpu)?,
        Tensor::from_vec(h, (rows, dim), &Device::Cpu)?,
    ))
}

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

    /// The fused add and norm give candle's `x + d` and `rms_norm` bit for bit, within 1e-6 of
    /// the norm computed in f64, and a row's bits do not depend on the other rows of the batch.
    #[test]
    fn add_rms_norm_agrees_with_candle_and_rows_stand_alone() {
        let (rows, dim) = (5, 1536);
        let val = |i: usize, f: f32| ((i as f32) * f).sin() * (1.0 + (i % 7) as f32);
        let x = Tensor::from_vec(
            (0..rows * dim).map(|i| val(i, 0.37)).collect::<Vec<_>>(),
            (rows, dim),
            &Device::Cpu,
        )
        .unwrap();
        let d = Tensor::from_vec(
            (0..rows * dim)
                .map(|i| val(i, 0.11) * 0.3)
                .collect::<Vec<_>>(),
            (rows, dim),
            &Device::Cpu,
        )
        .unwrap();
        let alpha = Tensor::from_vec(
            (0..dim)
                .map(|i| 0.5 + val(i, 0.05).abs())
                .collect::<Vec<_>>(),
            dim,
            &Device::Cpu,
        )
        .unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (sum, h) = add_rms_norm(&x, Some(&d), &alpha, 1e-6).unwrap();
        let want_sum = (&x + &d).unwrap();
        let bits = |v: Vec<f32>| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(v(&sum)), bits(v(&want_sum)));
        let want = v(&candle_nn::ops::rms_norm(&want_sum, &alpha, 1e-6).unwrap());
        let (sums, alphas) = (v(&want_sum), v(&alpha));
        assert_eq!(bits(v(&h)), bits(want.clone()), "candle's rms_norm");
        for (i, &g) in v(&h).iter().enumerate() {
            let r = &sums[i / dim * dim..][..dim];
            let ms = r.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / dim as f64;
            let exact = f64::from(sums[i]) / (ms + 1e-6).sqrt() * f64::from(alphas[i % dim]);
            assert!(
                (f64::from(g) - exact).abs() <= 1e-6 * exact.abs(),
                "value {i}: {g} against {exact}"
            );
        }
        // Row 3 alone: the same bits as in the batch; without a delta, the norm of `x` itself.
        let row = |t: &Tensor| t.narrow(0, 3, 1).unwrap();
        let (_, h3) = add_rms_norm(&row(&x), Some(&row(&d)), &alpha, 1e-6).unwrap();
        assert_eq!(bits(v(&h3)), bits(v(&row(&h))));
        let (same, h_plain) = add_rms_norm(&want_sum, None, &alpha, 1e-6).unwrap();
        assert_eq!(bits(v(&same)), bits(v(&want_sum)));
        assert_eq!(bits(v(&h_plain)), bits(v(&h)));
    }

    #[test]
    fn refuses_mismatched_shapes() {
        let a = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
        let err = silu_mul(&a, &b).unwrap_err().to_string();
        assert!(err.contains("differ in shape"), "{err}");
    }
}
