//! Macros shared by the kernel files: the row-major kernels' per-format loops and dispatch
//! (`row_loop!`, `row_major_block!`) and the interleaved loops' written-out row views (`views!`).

/// `[e(0), …, e(R − 1)]` for a literal `R` in 1..=8, written out: `views!(5, k => f(k))`. The
/// interleaved group loops build their per-record activation views with it instead of
/// `std::array::from_fn`, whose closure is compiled without the loops' target features and was
/// not always inlined (for Q8_0's 544-byte records the calls took 14 % of an AVX2 prefill).
#[cfg(target_arch = "x86_64")]
macro_rules! views {
    (1, $k:ident => $e:expr) => { [{ let $k = 0; $e }] };
    (2, $k:ident => $e:expr) => { [{ let $k = 0; $e }, { let $k = 1; $e }] };
    (3, $k:ident => $e:expr) => { [{ let $k = 0; $e }, { let $k = 1; $e }, { let $k = 2; $e }] };
    (4, $k:ident => $e:expr) => {{
        let [a, b] = views!(2, $k => $e);
        let [c, d] = views!(2, t => { let $k = t + 2; $e });
        [a, b, c, d]
    }};
    (5, $k:ident => $e:expr) => {{
        let [a, b, c, d] = views!(4, $k => $e);
        [a, b, c, d, { let $k = 4; $e }]
    }};
    (6, $k:ident => $e:expr) => {{
        let [a, b, c, d] = views!(4, $k => $e);
        let [f, g] = views!(2, t => { let $k = t + 4; $e });
        [a, b, c, d, f, g]
    }};
    (7, $k:ident => $e:expr) => {{
        let [a, b, c, d, f, g] = views!(6, $k => $e);
        [a, b, c, d, f, g, { let $k = 6; $e }]
    }};
    (8, $k:ident => $e:expr) => {{
        let [a, b, c, d] = views!(4, $k => $e);
        let [f, g, h, i] = views!(4, t => { let $k = t + 4; $e });
        [a, b, c, d, f, g, h, i]
    }};
}

/// The row loop of one format's row-major kernel `$k::<R>` (R = 1, 2, 4), compiled on its own
/// with the target features `$feat` (see `row_major_block!`); used by `avx2.rs`, `avx512.rs` and
/// `neon.rs`.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! row_loop {
    ($name:ident, $k:ident, $feat:tt) => {
        #[inline(never)]
        #[target_feature(enable = $feat)]
        fn $name((w, rb): (&[u8], usize), rows: &[Row<'_>], out: &mut [f32], stride: usize) {
            macro_rules! group {
                ($r:literal, $wrow:expr, $j:expr, $o:expr) => {{
                    let rs: [Row<'_>; $r] = rows[$j..$j + $r].try_into().expect("row count");
                    let y = $k::<$r>($wrow, rs);
                    $o[$j..$j + $r].copy_from_slice(&y);
                }};
            }
            for (wrow, o) in w.chunks_exact(rb).zip(out.chunks_mut(stride)) {
                for (j, r) in super::row_groups(rows.len()) {
                    match r {
                        1 => group!(1, wrow, j, o),
                        2 => group!(2, wrow, j, o),
                        _ => group!(4, wrow, j, o),
                    }
                }
            }
        }
    };
}

/// A row-major instruction set's `block` (see [`block`]): asserts `detected()` once, then runs
/// one [`row_loop!`] per format over the module's kernels `q4k`, `q6k` and `q8_0`, all compiled
/// with the target features `$feat`. One loop per format, each compiled on its own: with the
/// three kernels inlined into one loop, AVX2's Q8_0 kernel lost its registers (0.5B decode on
/// one core 22.6 → 37 ms). Used by `avx2.rs` and `neon.rs`.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! row_major_block {
    ($feat:tt) => {
        /// `out[i * stride + j] = weight row i · rows[j]` for every weight row of `w` (rows of
        /// `rb` bytes): activation rows are taken 4, 2 or 1 at a time, each weight block
        /// unpacked once per group.
        pub(super) fn block(
            format: super::WeightFormat,
            (w, rb): (&[u8], usize),
            rows: &[Row<'_>],
            out: &mut [f32],
            stride: usize,
        ) {
            assert!(detected());
            // SAFETY: the CPU has every feature of `$feat` (`detected`, asserted above).
            unsafe { block_tf(format, (w, rb), rows, out, stride) }
        }

        #[target_feature(enable = $feat)]
        fn block_tf(
            format: super::WeightFormat,
            w: (&[u8], usize),
            rows: &[Row<'_>],
            out: &mut [f32],
            stride: usize,
        ) {
            use super::WeightFormat as F;
            match format {
                F::Q4K => rows_q4k(w, rows, out, stride),
                F::Q6K => rows_q6k(w, rows, out, stride),
                F::Q8_0 => rows_q8_0(w, rows, out, stride),
            }
        }

        row_loop!(rows_q4k, q4k, $feat);
        row_loop!(rows_q6k, q6k, $feat);
        row_loop!(rows_q8_0, q8_0, $feat);
    };
}
