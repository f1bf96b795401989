//! `e^x` and the MLP's `silu(g) · u` on f32 slices: Cody-Waite reduction and a degree-7
//! polynomial by fused multiply-adds, sixteen lanes at a time with AVX-512, eight with AVX2+FMA and
//! the rest one at a time with the same operations, so a value's bits never depend on where it
//! sits in a slice or on the instruction set.

/// `e^x` for every value of `xs`, in place, to within 1 ulp (0.6 at worst over [−87, 88]; see
/// [`exp1`]). Sixteen lanes at a time with AVX-512, eight with AVX2 and FMA, the rest one at a
/// time with the same operations, so a value's result never
/// depends on where it sits in the slice (scores of a row, a chunk of an MLP activation): the
/// same bits alone, in a verification block or in a batch. libm's `expf`, value by value, was
/// most of the MLP's `silu` and of attention's softmax.
pub(crate) fn exp_inplace(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::avx512::detected() {
        // SAFETY: the CPU has AVX-512F, AVX2 and FMA (checked above).
        return unsafe { exp_avx512(xs) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::avx2::detected() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { exp_avx2(xs) };
    }
    xs.iter_mut().for_each(|x| *x = exp1(*x));
}

/// `out = g / (1 + e^(−g)) · u` element by element (the MLP's `silu(gate) · up`, the expression
/// of candle's `silu` then `mul`, with [`exp_inplace`]'s `e^x`); every slice the same length.
pub(crate) fn silu_mul(out: &mut [f32], g: &[f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::avx512::detected() {
        // SAFETY: the CPU has AVX-512F, AVX2 and FMA (checked above).
        return unsafe { silu_mul_avx512(out, g, u) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::avx2::detected() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { silu_mul_avx2(out, g, u) };
    }
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + exp1(-g)) * u;
    }
}

/// The range [`exp1`] takes: below it `e^x` is 0 to f32 precision (up to subnormals), above it
/// close to overflow; inputs are clamped into it (a NaN becomes the low end, as `maxps` does).
const EXP_LO: f32 = -87.0;
const EXP_HI: f32 = 88.0;
/// `ln 2` in two parts: `n · LN2_HI` is exact for every `|n| ≤ 127` (9 significant bits).
const LN2_HI: f32 = 355.0 / 512.0;
const LN2_LO: f32 = -2.121_944_4e-4;
/// `1.5 · 2²³`: `(v + MAGIC) − MAGIC` rounds `v` to an integer, half to even.
const ROUND: f32 = 12_582_912.0;
/// Taylor coefficients of `e^r`, degree 7 down to 2 (`|r| ≤ ln2 / 2`: the remainder is below
/// 1e-8 relative).
const EXP_C: [f32; 6] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
];

/// `e^x`: `x = n · ln 2 + r` with `n` an integer and `|r| ≤ ln2 / 2`, then `2ⁿ · p(r)`. The
/// operations of one lane of `exp8` / `exp16` (`exp_lanes!`), in the same order (`mul_add` is the fused
/// multiply-add either way).
#[inline(always)]
fn exp1(x: f32) -> f32 {
    let x = if x > EXP_LO { x } else { EXP_LO };
    let x = if x < EXP_HI { x } else { EXP_HI };
    let n = x.mul_add(std::f32::consts::LOG2_E, ROUND) - ROUND;
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = EXP_C[0];
    for c in &EXP_C[1..] {
        p = p.mul_add(r, *c);
    }
    let p = p.mul_add(r, 1.0);
    let p = p.mul_add(r, 1.0);
    // `n` is in −126..=127: a normal power of two.
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// The vector form of [`exp1`] for one register width: `$name(x)` with the intrinsics of that
/// width (AVX2's 8 lanes, AVX-512's 16), the same operations in the same order as [`exp1`], so
/// both widths give the same bits.
#[cfg(target_arch = "x86_64")]
macro_rules! exp_lanes {
    ($name:ident, $feat:literal, $v:ty, $set1:ident, $max:ident, $min:ident, $fmadd:ident,
     $sub:ident, $mul:ident, $cvt:ident, $addi:ident, $seti:ident, $slli:ident, $cast:ident) => {
        #[target_feature(enable = $feat)]
        fn $name(x: $v) -> $v {
            use std::arch::x86_64::*;
            let x = $max(x, $set1(EXP_LO));
            let x = $min(x, $set1(EXP_HI));
            let round = $set1(ROUND);
            let n = $sub($fmadd(x, $set1(std::f32::consts::LOG2_E), round), round);
            let r = $fmadd(n, $set1(-LN2_HI), x);
            let r = $fmadd(n, $set1(-LN2_LO), r);
            let mut p = $set1(EXP_C[0]);
            for c in &EXP_C[1..] {
                p = $fmadd(p, r, $set1(*c));
            }
            let one = $set1(1.0);
            let p = $fmadd(p, r, one);
            let p = $fmadd(p, r, one);
            let e = $slli::<23>($addi($cvt(n), $seti(127)));
            $mul(p, $cast(e))
        }
    };
}
#[cfg(target_arch = "x86_64")]
exp_lanes!(
    exp8,
    "avx2,fma",
    std::arch::x86_64::__m256,
    _mm256_set1_ps,
    _mm256_max_ps,
    _mm256_min_ps,
    _mm256_fmadd_ps,
    _mm256_sub_ps,
    _mm256_mul_ps,
    _mm256_cvtps_epi32,
    _mm256_add_epi32,
    _mm256_set1_epi32,
    _mm256_slli_epi32,
    _mm256_castsi256_ps
);
#[cfg(target_arch = "x86_64")]
exp_lanes!(
    exp16,
    "avx512f,avx2,fma",
    std::arch::x86_64::__m512,
    _mm512_set1_ps,
    _mm512_max_ps,
    _mm512_min_ps,
    _mm512_fmadd_ps,
    _mm512_sub_ps,
    _mm512_mul_ps,
    _mm512_cvtps_epi32,
    _mm512_add_epi32,
    _mm512_set1_epi32,
    _mm512_slli_epi32,
    _mm512_castsi512_ps
);

/// Sixteen lanes at a time, then eight, then the rest one at a time (the same bits everywhere).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn exp_avx512(xs: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut chunks = xs.chunks_exact_mut(16);
    for c in &mut chunks {
        // SAFETY: `c` is 16 f32 (`chunks_exact_mut`), readable and writable; no alignment needed.
        unsafe { _mm512_storeu_ps(c.as_mut_ptr(), exp16(_mm512_loadu_ps(c.as_ptr()))) };
    }
    exp_avx2(chunks.into_remainder());
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_avx2(xs: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut chunks = xs.chunks_exact_mut(8);
    for c in &mut chunks {
        // SAFETY: `c` is 8 f32 (`chunks_exact_mut`), readable and writable; no alignment needed.
        unsafe { _mm256_storeu_ps(c.as_mut_ptr(), exp8(_mm256_loadu_ps(c.as_ptr()))) };
    }
    for x in chunks.into_remainder() {
        *x = exp1(*x);
    }
}

/// [`silu_mul_avx2`] sixteen lanes at a time, the rest by it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn silu_mul_avx512(out: &mut [f32], g: &[f32], u: &[f32]) {
    use std::arch::x86_64::*;
    let n = out.len().min(g.len()).min(u.len());
    let full = n / 16 * 16;
    let one = _mm512_set1_ps(1.0);
    for i in (0..full).step_by(16) {
        let (gs, us) = (&g[i..i + 16], &u[i..i + 16]);
        // SAFETY: `gs` and `us` are 16 readable f32 (sliced above); no alignment needed.
        let (gv, uv) = unsafe { (_mm512_loadu_ps(gs.as_ptr()), _mm512_loadu_ps(us.as_ptr())) };
        // −g exactly (the sign bit flipped, as `xor` with −0 does in the 256-bit form).
        let e = exp16(_mm512_castsi512_ps(_mm512_xor_si512(
            _mm512_castps_si512(gv),
            _mm512_set1_epi32(i32::MIN),
        )));
        let y = _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), uv);
        let o = &mut out[i..i + 16];
        // SAFETY: `o` is 16 writable f32 (sliced above); no alignment needed.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), y) };
    }
    silu_mul_avx2(&mut out[full..n], &g[full..n], &u[full..n]);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn silu_mul_avx2(out: &mut [f32], g: &[f32], u: &[f32]) {
    use std::arch::x86_64::*;
    let n = out.len().min(g.len()).min(u.len());
    let full = n / 8 * 8;
    let one = _mm256_set1_ps(1.0);
    let neg = _mm256_set1_ps(-0.0);
    for i in (0..full).step_by(8) {
        let (gs, us) = (&g[i..i + 8], &u[i..i + 8]);
        // SAFETY: `gs` and `us` are 8 readable f32 (sliced above); no alignment needed.
        let (gv, uv) = unsafe { (_mm256_loadu_ps(gs.as_ptr()), _mm256_loadu_ps(us.as_ptr())) };
        let e = exp8(_mm256_xor_ps(gv, neg));
        let y = _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), uv);
        let o = &mut out[i..i + 8];
        // SAFETY: `o` is 8 writable f32 (sliced above); no alignment needed.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), y) };
    }
    for i in full..n {
        out[i] = g[i] / (1.0 + exp1(-g[i])) * u[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `exp_inplace` is within 1 ulp of the exact `e^x` over the range softmax and silu use, and
    /// gives every value the same bits wherever it sits in a slice (lanes and the scalar rest);
    /// `silu_mul` agrees with `exp1` value by value.
    #[test]
    fn exp_is_accurate_and_the_same_in_every_position() {
        let xs: Vec<f32> = (0..20_001).map(|i| -87.0 + i as f32 * 0.00875).collect();
        let mut e = xs.clone();
        exp_inplace(&mut e);
        let mut worst = 0f64;
        for (&x, &y) in xs.iter().zip(&e) {
            let want = (x as f64).exp();
            // In units of the result's last place.
            let ulp = (want as f32).abs() * f32::EPSILON;
            worst = worst.max(((y as f64) - want).abs() / ulp as f64);
        }
        assert!(worst <= 1.0, "worst error {worst} ulp");
        // Shifted by one to fifteen places, every value meets lanes and the rest differently.
        for shift in 1..16 {
            let mut shifted = xs[shift..].to_vec();
            exp_inplace(&mut shifted);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&shifted), bits(&e[shift..]), "shift {shift}");
        }
        let scalar: Vec<u32> = xs.iter().map(|&x| exp1(x).to_bits()).collect();
        assert_eq!(scalar, e.iter().map(|f| f.to_bits()).collect::<Vec<_>>());
        // Clamped outside the range, and 0 · 1 = 0 at the bottom.
        let mut edge = vec![-1e30, -100.0, 0.0, 100.0, f32::NAN];
        exp_inplace(&mut edge);
        assert!(
            edge[0] < 1e-37 && edge[1] < 1e-37 && edge[2] == 1.0,
            "{edge:?}"
        );
        assert!(edge[3] > 1e38 && edge[3].is_finite(), "{edge:?}");
        // 16 + 16 + 8 + 5: both register widths and the rest.
        let g: Vec<f32> = (0..45).map(|i| (i as f32 * 0.77).sin() * 9.0).collect();
        let u: Vec<f32> = (0..45).map(|i| (i as f32 * 0.31).cos()).collect();
        let mut out = vec![0f32; 45];
        silu_mul(&mut out, &g, &u);
        for i in 0..45 {
            let want = g[i] / (1.0 + exp1(-g[i])) * u[i];
            assert_eq!(out[i].to_bits(), want.to_bits(), "silu_mul {i}");
        }
        // The 256-bit forms alone (a machine with AVX-512 takes the 512-bit ones above).
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::avx2::detected() {
            let mut e2 = xs.clone();
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            unsafe { exp_avx2(&mut e2) };
            assert_eq!(scalar, e2.iter().map(|f| f.to_bits()).collect::<Vec<_>>());
            let mut out2 = vec![0f32; 45];
            // SAFETY: as above.
            unsafe { silu_mul_avx2(&mut out2, &g, &u) };
            assert_eq!(
                out.iter().map(|f| f.to_bits()).collect::<Vec<_>>(),
                out2.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}
