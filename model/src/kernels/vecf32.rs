//! f32 vector helpers for attention: a dot product with eight partial sums (also four at once)
//! and a weighted sum of rows (`dst += w · x` term by term), portable and with AVX2 intrinsics
//! (x86-64, chosen at run time). Both perform the same roundings in the same order (a multiply,
//! then an add, never fused; the eight partial sums are the eight lanes), so they give the same
//! bits.

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

/// `[dot(a, b[0]), …, dot(a, b[3])]`, bit for bit: four dot products at once, so that their
/// dependent adds overlap (one dot product of 128 is a chain of 16 vector adds).
pub(crate) fn dot4(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if super::avx2::detected() && b.iter().all(|b| b.len() == a.len()) {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { dot4_avx2(a, b) };
    }
    b.map(|b| dot(a, b))
}

/// `dst = Σ_j w[j] · x(j)` for j = 0, 1, … in order, from zero, each term a multiply and then an
/// add (`dst[i] += w[j] * x(j)[i]`), with `dst` held in registers 64 values at a time (term by
/// term, it was loaded and stored once per term: attention's weighted sum of values). Every
/// `x(j)` must be at least `dst.len()` long.
#[cfg(test)]
pub(crate) fn weighted_sum<'a>(dst: &mut [f32], w: &[f32], x: impl Fn(usize) -> &'a [f32]) {
    dst.fill(0.0);
    weighted_sum_onto(dst, w, x);
}

/// [`weighted_sum`] continued from `dst` as it is: `dst += Σ_j w[j] · x(j)`, the terms added in
/// order onto each value. A sum split into consecutive runs of terms, each run added onto the
/// result of the one before, gives the bits of the whole sum from zero (the same adds in the same
/// order; a value leaves a register only as the f32 it is).
pub(crate) fn weighted_sum_onto<'a>(dst: &mut [f32], w: &[f32], x: impl Fn(usize) -> &'a [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::avx2::detected() {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { weighted_sum_onto_avx2(dst, w, x) };
    }
    weighted_sum_onto_any(dst, w, x)
}

fn weighted_sum_onto_any<'a>(dst: &mut [f32], w: &[f32], x: impl Fn(usize) -> &'a [f32]) {
    for (j, &w) in w.iter().enumerate() {
        axpy_any(dst, w, x(j));
    }
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
fn dot4_avx2(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let m = a.len() / 8 * 8;
    let mut acc = [_mm256_setzero_ps(); 4];
    for c in (0..m).step_by(8) {
        let load = |v: &[f32]| {
            let v = &v[c..c + 8];
            // SAFETY: `v` is 8 readable f32 (sliced above); `loadu` needs no alignment.
            unsafe { _mm256_loadu_ps(v.as_ptr()) }
        };
        let x = load(a);
        for (acc, b) in acc.iter_mut().zip(b) {
            *acc = _mm256_add_ps(*acc, _mm256_mul_ps(x, load(b)));
        }
    }
    let mut out = [0f32; 4];
    for ((o, acc), b) in out.iter_mut().zip(acc).zip(b) {
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` is 8 writable f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        *o = combine(&lanes, tail_dot(&a[m..], &b[m..]));
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn weighted_sum_onto_avx2<'a>(dst: &mut [f32], w: &[f32], x: impl Fn(usize) -> &'a [f32]) {
    use std::arch::x86_64::*;
    const BLOCK: usize = 64;
    let n = dst.len();
    let full = n / BLOCK * BLOCK;
    for b0 in (0..full).step_by(BLOCK) {
        let d = &dst[b0..b0 + BLOCK];
        let acc: [__m256; BLOCK / 8] = std::array::from_fn(|c| {
            // SAFETY: `d` is 64 readable f32 (sliced above), `8c + 8 <= 64`; no alignment.
            unsafe { _mm256_loadu_ps(d.as_ptr().add(8 * c)) }
        });
        let mut acc = acc;
        for (j, &wj) in w.iter().enumerate() {
            let wv = _mm256_set1_ps(wj);
            let xs = &x(j)[b0..b0 + BLOCK];
            for (c, acc) in acc.iter_mut().enumerate() {
                // SAFETY: `xs` is 64 readable f32 (sliced above), `8c + 8 <= 64`; no alignment.
                let v = unsafe { _mm256_loadu_ps(xs.as_ptr().add(8 * c)) };
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(wv, v));
            }
        }
        let d = &mut dst[b0..b0 + BLOCK];
        for (c, acc) in acc.iter().enumerate() {
            // SAFETY: `d` is 64 writable f32 (sliced above), `8c + 8 <= 64`; no alignment.
            unsafe { _mm256_storeu_ps(d.as_mut_ptr().add(8 * c), *acc) };
        }
    }
    // The rest (head sizes that are not a multiple of 64) term by term.
    let rest = &mut dst[full..];
    for (j, &wj) in w.iter().enumerate() {
        axpy_avx2(rest, wj, &x(j)[full..n]);
    }
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

    /// Both builds of `dot` give the same bits, for lengths with and without a tail.
    #[test]
    fn every_build_gives_the_same_bits() {
        for n in [1usize, 7, 8, 64, 100, 128] {
            let (a, b) = (values(n, 1), values(n, 2));
            let want = dot_any(&a, &b);
            assert_eq!(dot(&a, &b).to_bits(), want.to_bits(), "dot n={n}");
        }
    }

    /// `dot4` and `weighted_sum` give the bits of `dot` and of the portable term-by-term sum,
    /// whatever the length (a multiple of 64, of 8, or neither) and the number of terms.
    #[test]
    fn the_batched_forms_give_the_same_bits() {
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for n in [1usize, 7, 8, 64, 100, 128, 136] {
            let a = values(n, 1);
            let b: Vec<Vec<f32>> = (0..4).map(|i| values(n, 10 + i)).collect();
            let got = dot4(&a, [&b[0], &b[1], &b[2], &b[3]]);
            let want: Vec<f32> = b.iter().map(|b| dot_any(&a, b)).collect();
            assert_eq!(bits(&got), bits(&want), "dot4 n={n}");
            for terms in [1usize, 5, 33] {
                let xs: Vec<Vec<f32>> = (0..terms).map(|j| values(n, 100 + j as u32)).collect();
                let w = values(terms, 7);
                let mut got = values(n, 3);
                weighted_sum(&mut got, &w, |j| &xs[j]);
                let mut want = values(n, 4);
                want.fill(0.0);
                weighted_sum_onto_any(&mut want, &w, |j| &xs[j]);
                assert_eq!(bits(&got), bits(&want), "weighted_sum n={n} terms={terms}");
                // In runs of terms, each added onto the one before.
                let mut runs = values(n, 5);
                runs.fill(0.0);
                for j0 in (0..terms).step_by(4) {
                    let j1 = (j0 + 4).min(terms);
                    weighted_sum_onto(&mut runs, &w[j0..j1], |j| &xs[j0 + j]);
                }
                assert_eq!(bits(&runs), bits(&want), "in runs n={n} terms={terms}");
            }
        }
    }
}
