//! f32 vector helpers for attention: a dot product with eight partial sums (also four keys, or
//! two queries and four keys, at once) and weighted sums of rows for several heads (`dst += w ·
//! x` term by term), portable and with AVX2 (and AVX-512) intrinsics chosen at run time. Every
//! form performs the same roundings in the same order (a multiply, then an add, never fused; the
//! eight partial sums are the eight lanes), so they give the same bits. `e^x` and `silu` are in
//! `exp.rs`.

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

/// `[dot4(a0, b), dot4(a1, b)]`, bit for bit: two queries against the same four keys, eight
/// independent chains of adds (four were too few to hide the adds' latency; grouped-query
/// attention has several query heads per key).
pub(crate) fn dot4x2(a: [&[f32]; 2], b: [&[f32]; 4]) -> [[f32; 4]; 2] {
    #[cfg(target_arch = "x86_64")]
    if super::avx2::detected()
        && a[1].len() == a[0].len()
        && b.iter().all(|b| b.len() == a[0].len())
    {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { dot4x2_avx2(a, b) };
    }
    a.map(|a| dot4(a, b))
}

/// Weighted sums of rows for several heads sharing the rows `xs`: `dst[h·d..(h + 1)·d] =
/// Σ_j w[h·n + j] · xs[j]` (`d = dst.len() / heads`, `n = xs.len()`), term by term in position
/// order from zero, each a multiply and then an add (never fused), so every build gives the same
/// bits. With AVX2 the heads go six at a time over 16 values of every row (32 with AVX-512), so
/// each row is read once for all of them (one head at a time read it once per head: attention's
/// values, six query heads per kv head).
pub(crate) fn weighted_sum_heads(dst: &mut [f32], heads: usize, w: &[f32], xs: &[&[f32]]) {
    let n = xs.len();
    let d = dst.len() / heads.max(1);
    assert!(
        w.len() == heads * n && dst.len() == heads * d,
        "weighted_sum_heads shapes"
    );
    #[cfg(target_arch = "x86_64")]
    if super::mode() == super::Mode::Ours(super::Isa::Avx512)
        && d.is_multiple_of(32)
        && xs.iter().all(|x| x.len() >= d)
    {
        // SAFETY: the AVX-512 set is selected only where the CPU has it (`mode`).
        return unsafe { weighted_sum_heads_avx512(dst, heads, w, xs) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::avx2::detected() && d.is_multiple_of(16) && xs.iter().all(|x| x.len() >= d) {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { weighted_sum_heads_avx2(dst, heads, w, xs) };
    }
    for (dh, wh) in dst.chunks_exact_mut(d).zip(w.chunks_exact(n)) {
        dh.fill(0.0);
        weighted_sum_onto_any(dh, wh, xs);
    }
}

/// The portable weighted sum, continued from `dst` as it is: `dst += Σ_j w[j] · xs[j]` for
/// j = 0, 1, … in order, each term a multiply and then an add.
fn weighted_sum_onto_any(dst: &mut [f32], w: &[f32], xs: &[&[f32]]) {
    for (&w, x) in w.iter().zip(xs) {
        axpy_any(dst, w, x);
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
fn dot4x2_avx2(a: [&[f32]; 2], b: [&[f32]; 4]) -> [[f32; 4]; 2] {
    use std::arch::x86_64::*;
    let n = a[0].len();
    let m = n / 8 * 8;
    let (a, b) = (a.map(|a| &a[..n]), b.map(|b| &b[..n]));
    let mut acc = [[_mm256_setzero_ps(); 4]; 2];
    for c in 0..m / 8 {
        let load = |v: &[f32]| {
            let v = &v[8 * c..8 * c + 8];
            // SAFETY: `v` is 8 readable f32 (sliced above); `loadu` needs no alignment.
            unsafe { _mm256_loadu_ps(v.as_ptr()) }
        };
        let keys = b.map(load);
        for (acc, a) in acc.iter_mut().zip(a) {
            let x = load(a);
            for (acc, k) in acc.iter_mut().zip(keys) {
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(x, k));
            }
        }
    }
    let mut out = [[0f32; 4]; 2];
    for ((out, acc), a) in out.iter_mut().zip(acc).zip(a) {
        for ((o, acc), b) in out.iter_mut().zip(acc).zip(b) {
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` is 8 writable f32.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
            *o = combine(&lanes, tail_dot(&a[m..], &b[m..]));
        }
    }
    out
}

/// The heads of [`weighted_sum_heads`] six at a time (the most a block keeps in registers), each
/// group through `$block::<H>`.
#[cfg(target_arch = "x86_64")]
macro_rules! by_six_heads {
    ($dst:expr, $heads:expr, $w:expr, $xs:expr, $block:ident) => {{
        let n = $xs.len();
        let d = $dst.len() / $heads;
        let mut h0 = 0;
        while h0 < $heads {
            let hs = ($heads - h0).min(6);
            let (dg, wg) = (&mut $dst[h0 * d..(h0 + hs) * d], &$w[h0 * n..(h0 + hs) * n]);
            match hs {
                1 => $block::<1>(dg, wg, $xs),
                2 => $block::<2>(dg, wg, $xs),
                3 => $block::<3>(dg, wg, $xs),
                4 => $block::<4>(dg, wg, $xs),
                5 => $block::<5>(dg, wg, $xs),
                _ => $block::<6>(dg, wg, $xs),
            }
            h0 += hs;
        }
    }};
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn weighted_sum_heads_avx2(dst: &mut [f32], heads: usize, w: &[f32], xs: &[&[f32]]) {
    by_six_heads!(dst, heads, w, xs, heads_block)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn weighted_sum_heads_avx512(dst: &mut [f32], heads: usize, w: &[f32], xs: &[&[f32]]) {
    by_six_heads!(dst, heads, w, xs, heads_block_512)
}

/// [`heads_block`] with 512-bit registers, 32 values at a time (the same multiply and add per
/// value, so the same bits).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn heads_block_512<const H: usize>(dst: &mut [f32], w: &[f32], xs: &[&[f32]]) {
    use std::arch::x86_64::*;
    let n = xs.len();
    let d = dst.len() / H;
    let wh: [&[f32]; H] = std::array::from_fn(|h| &w[h * n..(h + 1) * n]);
    for b0 in (0..d).step_by(32) {
        let mut acc = [[_mm512_setzero_ps(); 2]; H];
        for (j, x) in xs.iter().enumerate() {
            let x = &x[b0..b0 + 32];
            // SAFETY: `x` is 32 readable f32 (sliced above); no alignment needed.
            let (x0, x1) = unsafe {
                (
                    _mm512_loadu_ps(x.as_ptr()),
                    _mm512_loadu_ps(x.as_ptr().add(16)),
                )
            };
            for (acc, wh) in acc.iter_mut().zip(&wh) {
                let wv = _mm512_set1_ps(wh[j]);
                acc[0] = _mm512_add_ps(acc[0], _mm512_mul_ps(wv, x0));
                acc[1] = _mm512_add_ps(acc[1], _mm512_mul_ps(wv, x1));
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            let o = &mut dst[h * d + b0..h * d + b0 + 32];
            // SAFETY: `o` is 32 writable f32 (sliced above); no alignment needed.
            unsafe {
                _mm512_storeu_ps(o.as_mut_ptr(), acc[0]);
                _mm512_storeu_ps(o.as_mut_ptr().add(16), acc[1]);
            }
        }
    }
}

/// `H` heads' weighted sums, 16 values at a time: 2·H accumulators (12 at most, of AVX2's 16
/// registers), each row's 16 values loaded once for all heads.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn heads_block<const H: usize>(dst: &mut [f32], w: &[f32], xs: &[&[f32]]) {
    use std::arch::x86_64::*;
    let n = xs.len();
    let d = dst.len() / H;
    let wh: [&[f32]; H] = std::array::from_fn(|h| &w[h * n..(h + 1) * n]);
    for b0 in (0..d).step_by(16) {
        let mut acc = [[_mm256_setzero_ps(); 2]; H];
        for (j, x) in xs.iter().enumerate() {
            let x = &x[b0..b0 + 16];
            // SAFETY: `x` is 16 readable f32 (sliced above); no alignment needed.
            let (x0, x1) = unsafe {
                (
                    _mm256_loadu_ps(x.as_ptr()),
                    _mm256_loadu_ps(x.as_ptr().add(8)),
                )
            };
            for (acc, wh) in acc.iter_mut().zip(&wh) {
                let wv = _mm256_set1_ps(wh[j]);
                acc[0] = _mm256_add_ps(acc[0], _mm256_mul_ps(wv, x0));
                acc[1] = _mm256_add_ps(acc[1], _mm256_mul_ps(wv, x1));
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            let o = &mut dst[h * d + b0..h * d + b0 + 16];
            // SAFETY: `o` is 16 writable f32 (sliced above); no alignment needed.
            unsafe {
                _mm256_storeu_ps(o.as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(o.as_mut_ptr().add(8), acc[1]);
            }
        }
    }
}

/// Asks for the cache lines of `s` ahead of their use (a no-op where there is no prefetch
/// instruction).
#[inline]
pub(crate) fn prefetch(s: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for off in (0..s.len()).step_by(16) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch never faults, and the address is inside `s`.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(s.as_ptr().add(off).cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = s;
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

    /// `dot4`, `dot4x2` and `weighted_sum_heads` give the bits of `dot` and of the portable
    /// term-by-term sum,
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
            let a1 = values(n, 2);
            let [g0, g1] = dot4x2([&a, &a1], [&b[0], &b[1], &b[2], &b[3]]);
            let want1: Vec<f32> = b.iter().map(|b| dot_any(&a1, b)).collect();
            assert_eq!(bits(&g0), bits(&want), "dot4x2 first n={n}");
            assert_eq!(bits(&g1), bits(&want1), "dot4x2 second n={n}");
            for terms in [1usize, 5, 33] {
                let xs: Vec<Vec<f32>> = (0..terms).map(|j| values(n, 100 + j as u32)).collect();
                let rows: Vec<&[f32]> = xs.iter().map(|x| &x[..]).collect();
                // Several heads over the same rows: each head's bits are the portable sum's.
                for heads in [1usize, 5, 6, 7, 13] {
                    let ws: Vec<f32> = (0..heads * terms)
                        .map(|i| ((i as f32) * 0.37).sin())
                        .collect();
                    let mut got = values(heads * n, 9);
                    weighted_sum_heads(&mut got, heads, &ws, &rows);
                    for h in 0..heads {
                        let mut one = vec![0f32; n];
                        weighted_sum_onto_any(&mut one, &ws[h * terms..(h + 1) * terms], &rows);
                        assert_eq!(
                            bits(&got[h * n..(h + 1) * n]),
                            bits(&one),
                            "heads {heads} h {h} n={n}"
                        );
                    }
                }
            }
        }
    }
}
