//! Forward-pass benchmark: our forward against candle-transformers' `quantized_qwen2` on the same
//! GGUF file, the cost of verifying k new tokens, and ragged batching.
//!
//! ```text
//! cargo run --release -j2 -p edgespec-model --example bench_forward -- \
//!     [--models-dir DIR] [--runs 3] [--decode 32] [--only 1.5b|0.5b] [--no-candle] \
//!     [--verify-only 1,5]
//! ```
//! `--verify-only` times only the verification of the listed k (one decode step is k = 1): a
//! short run for comparing two builds, or for `perf` on one block size.
//! `--no-candle` skips candle-transformers (the peer is then llama.cpp's `llama-bench`, run
//! separately); `EDGESPEC_CPU_KERNELS` picks our kernels (`auto`, `avx2`, `scalar`, `candle`) and
//! `taskset -c 1` pins to one core (the pool follows the affinity).
//! Model files are looked up in `--models-dir`, `$EDGESPEC_MODEL_DIR` or
//! `$HOME/.cache/edgespec/models`. Prints markdown tables; every number is the median of
//! `--runs` runs.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_qwen2::ModelWeights;
use edgespec_model::forward::load_gguf;
use edgespec_model::{CausalLm, DeviceKind, SeqRequest};

const TARGET: &str = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf";
const DRAFT: &str = "qwen2.5-coder-0.5b-instruct-q8_0.gguf";

struct Args {
    dir: PathBuf,
    runs: usize,
    decode: usize,
    only: Option<String>,
    no_candle: bool,
    /// Only the verification table, for these k.
    verify_only: Option<Vec<usize>>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        dir: std::env::var_os("EDGESPEC_MODEL_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/edgespec/models")
            }),
        runs: 3,
        decode: 32,
        only: None,
        no_candle: false,
        verify_only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--models-dir" => args.dir = PathBuf::from(value()?),
            "--runs" => args.runs = value()?.parse()?,
            "--decode" => args.decode = value()?.parse()?,
            "--only" => args.only = Some(value()?),
            "--no-candle" => args.no_candle = true,
            "--verify-only" => {
                let ks = value()?
                    .split(',')
                    .map(|k| match k.trim().parse::<usize>() {
                        Ok(k) if (1..=64).contains(&k) => Ok(k),
                        _ => Err(anyhow::anyhow!("--verify-only: {k:?} is not a k in 1..=64")),
                    })
                    .collect::<Result<Vec<_>>>()?;
                args.verify_only = Some(ks);
            }
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(args)
}

fn median(xs: Vec<f64>) -> f64 {
    edgespec_specdec::stats::median(&xs).unwrap_or(0.0)
}

use edgespec_specdec::argmax;

/// A fixed, model-independent prompt of ordinary token ids.
fn prompt(len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| 200 + (i * 7919) % 20_000).collect()
}

fn req(session: u64, start: usize, tokens: Vec<u32>, last: usize) -> SeqRequest {
    SeqRequest {
        session,
        start,
        tokens,
        logits_for_last: last,
    }
}

/// Mean ms per greedy decode step after a 32-token prefill, one run (session `s`).
fn ours_decode_run(m: &mut dyn CausalLm, s: u64, steps: usize) -> Result<f64> {
    let p = prompt(32);
    let out = m.forward_batch(&[req(s, 0, p.clone(), 1)])?;
    let mut tok = argmax(out[0].row(0));
    let t0 = Instant::now();
    for i in 0..steps {
        let out = m.forward_batch(&[req(s, p.len() + i, vec![tok], 1)])?;
        tok = argmax(out[0].row(0));
    }
    m.release(s);
    Ok(t0.elapsed().as_secs_f64() * 1e3 / steps as f64)
}

/// The same with candle-transformers' model (its KV cache cleared first).
fn candle_decode_run(model: &mut ModelWeights, steps: usize) -> Result<f64> {
    let dev = Device::Cpu;
    let p = prompt(32);
    model.clear_kv_cache();
    let x = Tensor::new(p.as_slice(), &dev)?.unsqueeze(0)?;
    let logits = model.forward(&x, 0)?.squeeze(0)?.to_vec1::<f32>()?;
    let mut tok = argmax(&logits);
    let t0 = Instant::now();
    for i in 0..steps {
        let x = Tensor::new(&[tok], &dev)?.unsqueeze(0)?;
        let logits = model
            .forward(&x, p.len() + i)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        tok = argmax(&logits);
    }
    Ok(t0.elapsed().as_secs_f64() * 1e3 / steps as f64)
}

/// Medians of one measurement for ours and candle-transformers'.
#[derive(Debug, Clone, Copy)]
struct Pair {
    ours: f64,
    theirs: f64,
}

/// Decode ms/token and 128-token prefill ms of both implementations, runs interleaved so that
/// background load hits both alike.
fn compare(m: &mut dyn CausalLm, path: &Path, args: &Args) -> Result<(Pair, Pair)> {
    let mut theirs = if args.no_candle {
        None
    } else {
        let mut file = File::open(path)?;
        let ct = gguf_file::Content::read(&mut file)?;
        Some(ModelWeights::from_gguf(ct, &mut file, &Device::Cpu)?)
    };
    let long = prompt(128);
    let x = Tensor::new(long.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let mut t: [Vec<f64>; 4] = Default::default();
    for run in 0..args.runs {
        t[0].push(ours_decode_run(m, 1000 + run as u64, args.decode)?);
        t[2].push(time_ms(|| {
            m.forward_batch(&[req(2000, 0, long.clone(), 1)])?;
            Ok(())
        })?);
        m.release(2000);
        let Some(theirs) = theirs.as_mut() else {
            continue;
        };
        t[1].push(candle_decode_run(theirs, args.decode)?);
        theirs.clear_kv_cache();
        t[3].push(time_ms(|| {
            theirs.forward(&x, 0)?;
            Ok(())
        })?);
    }
    let [a, b, c, d] = t.map(median);
    Ok((Pair { ours: a, theirs: b }, Pair { ours: c, theirs: d }))
}

/// Wall-clock ms of `f`.
fn time_ms(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t0 = Instant::now();
    f()?;
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

const VERIFY_KS: [usize; 16] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];

/// Verifying k new tokens after a 128-token prefix, all-position logits; the k values are
/// interleaved within each run so that background load hits them alike. Medians per k.
fn verify_table(m: &mut dyn CausalLm, ks: &[usize], runs: usize) -> Result<Vec<(usize, f64)>> {
    let p = prompt(128 + ks.iter().copied().max().unwrap_or(1));
    m.forward_batch(&[req(1, 0, p[..128].to_vec(), 1)])?;
    let mut times = vec![Vec::new(); ks.len()];
    for _ in 0..runs {
        for (i, &k) in ks.iter().enumerate() {
            let block = p[128..128 + k].to_vec();
            times[i].push(time_ms(|| {
                m.forward_batch(&[req(1, 128, block, usize::MAX)])?;
                Ok(())
            })?);
        }
    }
    m.release(1);
    Ok(ks
        .iter()
        .copied()
        .zip(times.into_iter().map(median))
        .collect())
}

/// 8 sessions × 5 new tokens (after 64-token prefixes): one ragged batch vs 8 calls, alternated.
fn ragged(m: &mut dyn CausalLm, runs: usize) -> Result<(f64, f64)> {
    let p = prompt(69);
    for s in 0..8 {
        m.forward_batch(&[req(s, 0, p[..64].to_vec(), 1)])?;
    }
    let new = |s: u64| req(s, 64, p[64..].to_vec(), usize::MAX);
    let batch: Vec<SeqRequest> = (0..8).map(new).collect();
    let (mut one, mut separate) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        one.push(time_ms(|| {
            m.forward_batch(&batch)?;
            Ok(())
        })?);
        separate.push(time_ms(|| {
            for s in 0..8 {
                m.forward_batch(&[new(s)])?;
            }
            Ok(())
        })?);
    }
    for s in 0..8 {
        m.release(s);
    }
    Ok((median(one), median(separate)))
}

/// The verification table; the first row (k = 1) is the decode step.
fn verify_print(rows: &[(usize, f64)]) {
    let step = rows[0].1;
    println!("\n| verify k new tokens after 128 cached | ms | × one decode step |");
    println!("|---:|---:|---:|");
    for (k, ms) in rows {
        println!("| {k} | {ms:.1} | {:.2} |", ms / step);
    }
}

fn bench_model(label: &str, path: &Path, args: &Args) -> Result<()> {
    if !path.exists() {
        bail!(
            "{} not found (run `edgespec fetch` or set EDGESPEC_MODEL_DIR)",
            path.display()
        );
    }
    let mut m = load_gguf(path, DeviceKind::Cpu)?;
    if let Some(ks) = &args.verify_only {
        let ks: Vec<usize> = std::iter::once(1)
            .chain(ks.iter().copied().filter(|&k| k != 1))
            .collect();
        println!("\n### {label}\n");
        verify_print(&verify_table(m.as_mut(), &ks, args.runs)?);
        return Ok(());
    }
    let (decode, prefill) = compare(m.as_mut(), path, args)?;
    println!(
        "\n### {label} (`{}`)\n",
        path.file_name().unwrap_or_default().to_string_lossy()
    );
    println!(
        "| | decode ms/token ({} steps after 32 tokens) | tokens/s | prefill 128 tokens, ms |",
        args.decode
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| edgespec forward | {:.1} | {:.1} | {:.0} |",
        decode.ours,
        1e3 / decode.ours,
        prefill.ours
    );
    if !args.no_candle {
        println!(
            "| candle-transformers quantized_qwen2 | {:.1} | {:.1} | {:.0} |",
            decode.theirs,
            1e3 / decode.theirs,
            prefill.theirs
        );
        println!(
            "| ratio ours / candle | {:.3} | | {:.3} |",
            decode.ours / decode.theirs,
            prefill.ours / prefill.theirs
        );
    }

    verify_print(&verify_table(m.as_mut(), &VERIFY_KS, args.runs)?);
    let (batched, separate) = ragged(m.as_mut(), args.runs)?;
    println!("\n| 8 sessions × 5 new tokens | ms |");
    println!("|---|---:|");
    println!("| one ragged batch | {batched:.1} |");
    println!("| 8 separate calls | {separate:.1} |");
    println!("| speed-up | {:.2}× |", separate / batched);
    Ok(())
}

fn main() -> Result<()> {
    edgespec_model::configure_cpu_threads();
    let args = parse_args()?;
    println!(
        "runs per number: {} (median); EDGESPEC_CPU_KERNELS={}; {} CPUs in the affinity",
        args.runs,
        std::env::var("EDGESPEC_CPU_KERNELS").unwrap_or_else(|_| "auto".into()),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for (label, file, key) in [
        ("Qwen2.5-Coder-1.5B Q4_K_M (target)", TARGET, "1.5b"),
        ("Qwen2.5-Coder-0.5B Q8_0 (draft)", DRAFT, "0.5b"),
    ] {
        if args.only.as_deref().is_some_and(|o| o != key) {
            continue;
        }
        bench_model(label, &args.dir.join(file), &args)?;
    }
    Ok(())
}
