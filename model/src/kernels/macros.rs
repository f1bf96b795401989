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

/// The 256-bit interleaved kernels' `block` (see `x16_avx512::block`), their group loops and
/// `store`, compiled with the target features `$feat`: used by `x16_avx2.rs` (`maddubs`) and
/// `x16_vnni.rs` (AVX-VNNI `vpdpbusd`), whose kernels `q4k_x8`, `q6k_x8` and `q80_x8` each take
/// one 8-row half of a record. The module provides `detected()`, `HALF` and those kernels.
#[cfg(target_arch = "x86_64")]
macro_rules! x8_block {
    ($feat:tt) => {
        /// As `x16_avx512::block`.
        pub(super) fn block(
            format: WeightFormat,
            w: &[u8],
            nb: usize,
            rows: &[Row<'_>],
            out: &mut [&mut [f32]],
        ) {
            assert!(detected());
            assert!(rows.len() <= super::ACT_TILE);
            super::x16::check_out(format, w, nb, rows, out);
            // SAFETY: the CPU has every feature of `$feat` (`detected`, asserted above).
            unsafe { block_tf(format, w, nb, rows, out) }
        }

        #[target_feature(enable = $feat)]
        fn block_tf(
            format: WeightFormat,
            w: &[u8],
            nb: usize,
            rows: &[Row<'_>],
            out: &mut [&mut [f32]],
        ) {
            // One loop per format, each compiled on its own (see `row_major_block!`).
            match format {
                WeightFormat::Q4K => groups_q4k(w, nb, rows, out),
                WeightFormat::Q6K => groups_q6k(w, nb, rows, out),
                WeightFormat::Q8_0 => groups_q8_0(w, nb, rows, out),
            }
        }

        x8_group_loop!($feat, groups_q4k, q4k_x8, Q4K_REC, Sb, [1, 2, 3], 4, false);
        x8_group_loop!($feat, groups_q6k, q6k_x8, Q6K_REC, Sb, [1, 2, 3], 4, true);
        x8_group_loop!(
            $feat,
            groups_q8_0,
            q80_x8,
            Q80_REC,
            B32,
            [1, 2, 3],
            4,
            false
        );

        /// `o[..8]` = `v`.
        #[inline]
        #[target_feature(enable = $feat)]
        fn store(o: &mut [f32], v: __m256) {
            let o = &mut o[..8];
            // SAFETY: `o` is 8 writable f32 (sliced above); `storeu` has no alignment requirement.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr(), v) };
        }
    };
}

/// `x8_block!`'s group loop of one format, compiled with `$feat`: records of `$rec` bytes,
/// kernel `$k::<R>` for R = `$arm`… and `$max`, the most activation rows per pass over a half
/// record, in even passes with `$even` (as in `x16_avx512.rs`).
#[cfg(target_arch = "x86_64")]
macro_rules! x8_group_loop {
    ($feat:tt, $name:ident, $k:ident, $rec:expr, $sb:ident, [$($arm:tt),*], $max:tt, $even:expr) => {
        #[inline(never)]
        #[target_feature(enable = $feat)]
        fn $name(w: &[u8], nb: usize, rows: &[Row<'_>], out: &mut [&mut [f32]]) {
            let rec = $rec;
            macro_rules! pass {
                ($r:tt, $rb:expr, $b:expr, $j:expr, $acc:expr, $ahead:expr) => {{
                    // The rows' views once for both halves.
                    let rs: [$sb<'_>; $r] = views!($r, k => $sb::of(&rows[$j + k], $b));
                    let ahead = if $j == 0 { $ahead } else { None };
                    for (h, acc) in $acc.iter_mut().enumerate() {
                        let acc: &mut [[__m256; 2]; $r] =
                            (&mut acc[$j..$j + $r]).try_into().expect("row count");
                        $k::<$r>($rb.try_into().expect("a record"), h, rs, acc, ahead)
                    }
                }};
            }
            let zero = _mm256_setzero_ps();
            let ahead_n = prefetch_ahead(rec, rows.len());
            let (passes, np) = plan_passes(rows.len(), $max, $even);
            for (gi, g) in w.chunks_exact(nb * rec).enumerate() {
                // Per half and activation row: the f32 accumulators of 8 weight rows.
                let mut acc = [[[zero; 2]; super::ACT_TILE]; 2];
                for (b, r) in g.chunks_exact(rec).enumerate() {
                    let next = (gi * nb + b + ahead_n) * rec;
                    let ahead = w.get(next..next + rec);
                    for &(j, n) in &passes[..np] {
                        match n {
                            $($arm => pass!($arm, r, b, j, acc, ahead),)*
                            _ => pass!($max, r, b, j, acc, ahead),
                        }
                    }
                }
                // Rows 16 gi + 8 h.. of each activation row, 8 at a store.
                for (h, acc) in acc.iter().enumerate() {
                    for ([d, m], o) in acc.iter().zip(out.iter_mut()) {
                        store(&mut o[ROWS * gi + HALF * h..], _mm256_sub_ps(*d, *m));
                    }
                }
            }
        }
    };
}
