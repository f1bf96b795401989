//! f32 vector helpers for attention: a dot product with eight partial sums and `dst += w · x`,
//! portable and with AVX2 intrinsics (x86-64, chosen at run time). Both perform the same
//! roundings in the same order (a multiply, then an add, never fused; the eight partial sums are
//! the eight lanes), so they give the same bits.

/// `a · b` with eight independent partial sums, combined in a fixed tree (the order depends on
/// the length only).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::avx2::detected() {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { dot_avx2(a, b) };
    }
    dot_any(a, b)
}

/// `dst[i] += w * x[i]` (a multiply, then an add).
pub(crate) fn axpy(dst: &mut [f32], w: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::avx2::detected() {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { axpy_avx2(dst, w, x) };
    }
    axpy_any(dst, w, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (ca, cb) = (a[..n].chunks_exact(8), b[..n].chunks_exact(8));
    let tail = tail_dot(ca.remainder(), cb.remainder());
    let mut acc = _mm256_setzero_ps();
    for (x, y) in ca.zip(cb) {
        // SAFETY: `x` and `y` are 8 readable f32 each (`chunks_exact`); `loadu` needs no alignment.
        let (x, y) = unsafe { (_mm256_loadu_ps(x.as_ptr()), _mm256_loadu_ps(y.as_ptr())) };
        acc = _mm256_add_ps(acc, _mm256_mul_ps(x, y));
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` is 8 writable f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    combine(&lanes, tail)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn axpy_avx2(dst: &mut [f32], w: f32, x: &[f32]) {
    use std::arch::x86_64::*;
    let n = dst.len().min(x.len());
    let (cd, cx) = (dst[..n].chunks_exact_mut(8), x[..n].chunks_exact(8));
    let wv = _mm256_set1_ps(w);
    let tail_x = cx.remainder();
    let mut cd = cd;
    for (d, x) in (&mut cd).zip(cx) {
        // SAFETY: `d` and `x` are 8 f32 each (`chunks_exact`), `d` writable; no alignment needed.
        unsafe {
            let v = _mm256_add_ps(
                _mm256_loadu_ps(d.as_ptr()),
                _mm256_mul_ps(wv, _mm256_loadu_ps(x.as_ptr())),
            );
            _mm256_storeu_ps(d.as_mut_ptr(), v);
        }
    }
    axpy_any(cd.into_remainder(), w, tail_x);
}

fn tail_dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn combine(acc: &[f32; 8], tail: f32) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

fn dot_any(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = tail_dot(ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    combine(&acc, tail)
}

fn axpy_any(dst: &mut [f32], w: f32, x: &[f32]) {
    for (d, x) in dst.iter_mut().zip(x) {
        *d += w * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` values in (−1, 1), different for each `seed`.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.731 + seed as f32).sin())
            .collect()
    }

    /// Both builds give the same bits, for lengths with and without a tail.
    #[test]
    fn every_build_gives_the_same_bits() {
        for n in [1usize, 7, 8, 64, 100, 128] {
            let (a, b) = (values(n, 1), values(n, 2));
            let want = dot_any(&a, &b);
            assert_eq!(dot(&a, &b).to_bits(), want.to_bits(), "dot n={n}");
            let mut d1 = values(n, 3);
            let mut d2 = d1.clone();
            axpy_any(&mut d1, 0.37, &a);
            axpy(&mut d2, 0.37, &a);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&d2), bits(&d1), "axpy n={n}");
        }
    }
}
