//! Kernel tests: every SIMD path bit-identical to the scalar reference on random blocks; the
//! scalar reference within a derived bound of candle's dequantize-then-f32 product; results
//! independent of the row count and of the pool's size.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::*;

/// A small deterministic generator (xorshift*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn byte(&mut self) -> u8 {
        (self.next() >> 56) as u8
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// A finite f16 scale of moderate size (bit pattern), sign random.
    fn f16_scale(&mut self) -> [u8; 2] {
        let exp = 5 + (self.next() % 16) as u16; // 2^-10 .. 2^5
        let man = (self.next() % 1024) as u16;
        let sign = (self.next() % 2) as u16;
        ((sign << 15) | (exp << 10) | man).to_le_bytes()
    }
}

/// `nb` random blocks of `format`: random quant bytes, finite f16 scales.
fn random_row(rng: &mut Rng, format: WeightFormat, nb: usize) -> Vec<u8> {
    let shape = format.shape();
    let mut v: Vec<u8> = (0..nb * shape.bytes).map(|_| rng.byte()).collect();
    for blk in v.chunks_exact_mut(shape.bytes) {
        let scale_at: &[usize] = match format {
            WeightFormat::Q4K => &[0, 2],
            WeightFormat::Q6K => &[208],
            WeightFormat::Q8_0 => &[0],
        };
        for &at in scale_at {
            blk[at..at + 2].copy_from_slice(&rng.f16_scale());
        }
    }
    v
}

fn random_x(rng: &mut Rng, n: usize) -> Vec<f32> {
    // Mixed magnitudes, a few exact zeros and one outlier per row, as activations have.
    (0..n)
        .map(|i| match i % 97 {
            0 => 0.0,
            13 => 40.0 * rng.unit(),
            _ => rng.unit() * (1.0 + (i % 7) as f32),
        })
        .collect()
}

const FORMATS: [WeightFormat; 3] = [WeightFormat::Q4K, WeightFormat::Q6K, WeightFormat::Q8_0];

#[test]
fn f16_conversion_is_exact() {
    assert_eq!(f16_to_f32(0x3c00u16.to_le_bytes()), 1.0);
    assert_eq!(f16_to_f32(0xc000u16.to_le_bytes()), -2.0);
    assert_eq!(f16_to_f32(0x0001u16.to_le_bytes()), 2f32.powi(-24));
    assert_eq!(f16_to_f32(0x7bffu16.to_le_bytes()), 65504.0);
    assert_eq!(f16_to_f32(0x7c00u16.to_le_bytes()), f32::INFINITY);
    assert_eq!(
        f16_to_f32(0x8000u16.to_le_bytes()).to_bits(),
        (-0f32).to_bits()
    );
}

#[test]
fn quantize_rounds_half_to_even_and_sums_blocks() {
    // amax 127 → d = 1, so values quantize to their nearest integer.
    let mut x = vec![0f32; 256];
    x[0] = 127.0;
    x[1] = 2.5;
    x[2] = -3.5;
    x[3] = 0.49;
    let a = quantize(&x, 256, ActFormat::Q8K);
    assert_eq!(a.d, vec![1.0]);
    assert_eq!(&a.qs[..4], &[127, 2, -4, 0]);
    assert_eq!(a.bsums[0], 125);
    assert!(a.bsums[1..].iter().all(|&s| s == 0));
    let z = quantize(&[0f32; 64], 64, ActFormat::Q8_0);
    assert_eq!(z.d, vec![0.0, 0.0]);
    assert!(z.qs.iter().all(|&q| q == 0));
}

/// The AVX2 quantization gives the portable one's bits and 16-sums, on rows with zeros, ties,
/// outliers, NaNs and infinities (a block with an infinity is all zeros; a NaN value quantizes
/// to 0).
#[test]
fn quantization_is_the_same_on_every_path() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for block in [32usize, 256] {
        let mut x = random_x(&mut rng, 8 * block);
        x[3] = f32::NAN;
        x[block + 5] = f32::INFINITY;
        x[2 * block + 7] = -0.0;
        x[3 * block..4 * block].fill(0.0);
        x[4 * block + 1] = 127.0;
        x[4 * block + 2] = 2.5;
        x[4 * block + 3] = -3.5;
        x[5 * block] = 1e30;
        let nb = x.len() / block;
        let (mut q1, mut d1) = (vec![0i8; x.len()], vec![0f32; nb]);
        let (mut q2, mut d2) = (vec![0i8; x.len()], vec![0f32; nb]);
        acts::quantize_row_any(&x, block, &mut q1, &mut d1);
        let mut s1 = vec![0i16; x.len() / 16];
        acts::sums16(&q1, &mut s1);
        // Sums of an all-zero block are written too (not left as they were).
        let mut s2 = vec![7i16; x.len() / 16];
        acts::quantize_row(&x, block, &mut q2, &mut d2, &mut s2);
        assert_eq!(q2, q1, "values, block {block}");
        assert_eq!(s2, s1, "16-sums, block {block}");
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&d2), bits(&d1), "scales, block {block}");
    }
}

/// Every SIMD path equals the scalar reference bit for bit on random blocks and activations.
#[test]
fn simd_dots_equal_the_scalar_reference_bit_for_bit() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for format in FORMATS {
        for &nb_k in &[1usize, 3, 7] {
            let k = nb_k * QK_K;
            let nb = k / format.shape().elems;
            for _ in 0..20 {
                let w = random_row(&mut rng, format, nb);
                let acts = quantize(&random_x(&mut rng, k), k, format.act());
                let want = dot(Isa::Scalar, format, &w, &acts, 0);
                for isa in Isa::available() {
                    let got = dot(isa, format, &w, &acts, 0);
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{format:?} k={k} {isa:?}: {got} vs scalar {want}"
                    );
                }
            }
        }
    }
}

/// On AArch64 NEON is always among the instruction sets the tests above walk (so they compare
/// its kernels with the scalar reference), and it keeps weights row-major.
#[cfg(target_arch = "aarch64")]
#[test]
fn neon_is_available_and_row_major() {
    assert!(Isa::available().contains(&Isa::Neon));
    assert!(!has_x16(Isa::Neon));
}

/// candle's quantization of `w` (`[n, k]`) and its dequantized f32 copy.
fn candle_weight(w: &[f32], n: usize, k: usize, dtype: GgmlDType) -> (QTensor, Vec<f32>) {
    let t = Tensor::from_vec(w.to_vec(), (n, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, dtype).unwrap();
    let deq = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    (q, deq)
}

/// Against candle's dequantize-then-f32 product the only difference is the activation rounding:
/// each element moves by at most half an activation step (`d/2`), so
/// `|ours − exact| ≤ Σ_i |w_i|·d_{block(i)}/2`, plus f32 rounding (1e-4 relative).
#[test]
fn dots_match_candles_dequantized_product_within_the_activation_rounding() {
    let mut rng = Rng(42);
    let (n, k) = (8, 3 * QK_K);
    for (format, dtype) in [
        (WeightFormat::Q4K, GgmlDType::Q4K),
        (WeightFormat::Q6K, GgmlDType::Q6K),
        (WeightFormat::Q8_0, GgmlDType::Q8_0),
    ] {
        // Sub-blocks of different spread and offset, so every scale and min matters.
        let w: Vec<f32> = (0..n * k)
            .map(|i| rng.unit() * (0.25 + ((i / 32) % 8) as f32) + ((i / 16) % 5) as f32 * 0.3)
            .collect();
        let (q, deq) = candle_weight(&w, n, k, dtype);
        let data = q.data().unwrap();
        // A positive mean (as after SiLU), so that min and offset terms weigh in; no outliers,
        // so that the bound is tight enough to see a wrong term.
        let x: Vec<f32> = (0..k).map(|_| rng.unit() + 0.7).collect();
        let acts = quantize(&x, k, format.act());
        let block = format.act().block();
        let rb = data.len() / n;
        for isa in Isa::available() {
            for row in 0..n {
                let wr = &deq[row * k..(row + 1) * k];
                let exact: f64 = wr.iter().zip(&x).map(|(a, b)| f64::from(a * b)).sum();
                let bound: f64 = wr
                    .iter()
                    .enumerate()
                    .map(|(i, a)| f64::from(a.abs() * acts.d[i / block] / 2.0))
                    .sum::<f64>()
                    + 1e-4
                        * wr.iter()
                            .zip(&x)
                            .map(|(a, b)| f64::from((a * b).abs()))
                            .sum::<f64>();
                let got = dot(isa, format, &data[row * rb..(row + 1) * rb], &acts, 0);
                assert!(
                    (f64::from(got) - exact).abs() <= bound,
                    "{format:?} {isa:?} row {row}: {got} vs {exact} (bound {bound})"
                );
            }
        }
    }
}

/// A row's outputs are the same bits whatever `m`, the other rows, and the pool size.
#[test]
fn matmul_rows_are_invariant_to_batch_size_and_pool_size() {
    let mut rng = Rng(7);
    let k = 2 * QK_K;
    let ws: Vec<(Vec<u8>, usize, WeightFormat)> = FORMATS
        .iter()
        .map(|&f| {
            let n = 37; // off the task grid
            let nb = k / f.shape().elems;
            let data = (0..n).flat_map(|_| random_row(&mut rng, f, nb)).collect();
            (data, n, f)
        })
        .collect();
    let refs: Vec<WeightRef<'_>> = ws
        .iter()
        .map(|(d, n, f)| WeightRef {
            data: d,
            n: *n,
            k,
            format: *f,
            packed: false,
        })
        .collect();
    let m = 19; // more than one activation tile
    let x = random_x(&mut rng, m * k);
    let pools = [Pool::new(1), Pool::new(2), Pool::new(3)];
    let reference = matmul_in(&pools[0], Isa::Scalar, &refs, &x, m);
    for isa in Isa::available() {
        let full = matmul_in(&pools[1], isa, &refs, &x, m);
        // Multi-row SIMD kernels (4, 2 and 1 rows at a time) equal the scalar reference.
        assert_eq!(full, reference, "{isa:?} against scalar");
        for p in &pools {
            assert_eq!(matmul_in(p, isa, &refs, &x, m), full, "{isa:?} pool {p:?}");
        }
        for r in [0, 5, 18] {
            let one = matmul_in(&pools[2], isa, &refs, &x[r * k..(r + 1) * k], 1);
            for (l, w) in refs.iter().enumerate() {
                let row = &full[l][r * w.n..(r + 1) * w.n];
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(row), bits(&one[l]), "{isa:?} layer {l} row {r}");
            }
        }
        // Each output is the plain dot of its weight row and activation row.
        let acts = quantize(&x, k, ActFormat::Q8K);
        let rb = refs[0].data.len() / refs[0].n;
        assert_eq!(
            full[0][3 * refs[0].n + 36].to_bits(),
            dot(
                isa,
                WeightFormat::Q4K,
                &refs[0].data[36 * rb..37 * rb],
                &acts,
                3
            )
            .to_bits()
        );
    }
}

#[test]
fn pool_visits_every_item_once_and_propagates_panics() {
    let pool = Pool::new(3);
    for len in [0usize, 1, 2, 5, 1000] {
        let mut items = vec![0u32; len];
        pool.for_each_mut(&mut items, |v| *v += 1);
        assert!(items.iter().all(|&v| v == 1), "len {len}");
    }
    let mut items = vec![0u32; 64];
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pool.for_each_mut(&mut items, |v| {
            if *v == 0 {
                panic!("boom");
            }
        })
    }));
    assert!(r.is_err());
    // Still usable afterwards.
    let mut items = vec![1u32; 64];
    pool.for_each_mut(&mut items, |v| *v *= 2);
    assert!(items.iter().all(|&v| v == 2));
    // Many short operations back to back (workers joining late, or not at all), each complete.
    let mut items = vec![0u32; 3];
    for round in 1..=20_000u32 {
        pool.for_each_mut(&mut items, |v| *v += 1);
        assert!(items.iter().all(|&v| v == round));
    }
}

/// The interleaved layout's kernels equal the row-major scalar reference bit for bit, for every
/// activation row count (the 4/2/1 row groups and more than one tile) and pool size.
#[test]
fn interleaved_kernels_equal_the_row_major_reference() {
    let mut rng = Rng(0x51ed_270b_2701_3a5d);
    let k = 3 * QK_K;
    let n = 48; // three groups of 16
    for format in FORMATS {
        let nb = k / format.shape().elems;
        let data: Vec<u8> = (0..n)
            .flat_map(|_| random_row(&mut rng, format, nb))
            .collect();
        let packed = x16::pack(format, &data, n, k).expect("n is a multiple of 16");
        assert_eq!(
            x16::pack(format, &data[..16 * nb * format.shape().bytes], 16, k).map(|p| p.len()),
            Some(packed.len() / 3)
        );
        let plain = WeightRef {
            data: &data,
            n,
            k,
            format,
            packed: false,
        };
        let inter = WeightRef {
            data: &packed,
            packed: true,
            ..plain
        };
        for m in [1usize, 2, 3, 5, 6, 7, 12, 17] {
            let x = random_x(&mut rng, m * k);
            let want = matmul_in(&Pool::new(1), Isa::Scalar, &[plain], &x, m);
            for isa in Isa::available().into_iter().filter(|&i| has_x16(i)) {
                for threads in [1, 3] {
                    let got = matmul_in(&Pool::new(threads), isa, &[inter], &x, m);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got[0]),
                        bits(&want[0]),
                        "{format:?} {isa:?} m={m} threads={threads}"
                    );
                }
            }
        }
    }
    // Off the 16-row grid: no interleaved layout.
    assert!(x16::pack(WeightFormat::Q4K, &vec![0; 8 * 144], 8, QK_K).is_none());
    assert!(x16::pack(WeightFormat::Q8_0, &vec![0; 8 * 34], 8, 32).is_none());
    // Q8_0 rows of 28 blocks (the 0.5B's width, 896) interleave too.
    let data: Vec<u8> = (0..16)
        .flat_map(|_| random_row(&mut rng, WeightFormat::Q8_0, 28))
        .collect();
    let packed = x16::pack(WeightFormat::Q8_0, &data, 16, 896).expect("16 rows");
    let x = random_x(&mut rng, 3 * 896);
    let plain = WeightRef {
        data: &data,
        n: 16,
        k: 896,
        format: WeightFormat::Q8_0,
        packed: false,
    };
    let want = matmul_in(&Pool::new(1), Isa::Scalar, &[plain], &x, 3);
    for isa in Isa::available().into_iter().filter(|&i| has_x16(i)) {
        let inter = WeightRef {
            data: &packed,
            packed: true,
            ..plain
        };
        let got = matmul_in(&Pool::new(2), isa, &[inter], &x, 3);
        assert_eq!(got, want, "Q8_0 k=896 {isa:?}");
    }
}
