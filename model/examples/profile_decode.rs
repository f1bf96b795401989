//! A decode-only loop to profile under `perf` (no comparison model, no verify or batch runs):
//!
//! ```text
//! cargo build --release -p edgespec-model --example profile_decode
//! perf record -F 499 -g target/release/examples/profile_decode FILE.gguf [steps] [head_vocab] [k]
//! perf report --no-children --sort symbol
//! ```
//! Prints decode ms/token (median of the steps) after a 32-token prefill. `head_vocab` limits the
//! output head as a draft node's `model.head_vocab` does (`-` for the whole vocabulary). `k` > 1
//! makes every step a verification block: k new tokens with logits for all of them, of which
//! only the first is kept (the next block starts one position later, as after a rejection), so
//! the context grows by one token a step whatever `k`.

use std::time::Instant;

use anyhow::{Context, Result};
use edgespec_model::forward::{load_gguf_with, LoadOptions};
use edgespec_model::{configure_cpu_threads, DeviceKind, SeqRequest};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .context("usage: profile_decode FILE.gguf [steps] [head_vocab|-] [k]")?;
    let steps: usize = args.next().map_or(Ok(200), |s| s.parse())?;
    let head_vocab = args
        .next()
        .filter(|s| s != "-")
        .map(|s| s.parse())
        .transpose()?;
    let k: usize = args.next().map_or(Ok(1), |s| s.parse())?;
    configure_cpu_threads();
    let opts = LoadOptions { head_vocab };
    let mut lm = load_gguf_with(std::path::Path::new(&path), DeviceKind::Cpu, &opts)?;
    let prompt: Vec<u32> = (0..32).map(|i| 100 + i * 7).collect();
    let mut next = 0u32;
    let mut start = 0;
    let mut tokens = prompt;
    let mut times = Vec::with_capacity(steps);
    for _ in 0..=steps {
        let n = tokens.len();
        let t = Instant::now();
        let out = lm.forward_batch(&[SeqRequest {
            session: 1,
            start,
            tokens: std::mem::take(&mut tokens),
            logits_for_last: if n == 32 { 1 } else { k },
        }])?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        let row = out[0].row(0);
        next = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(next, |(i, _)| i as u32);
        start += if n == 32 { n } else { 1 };
        tokens = (0..k as u32)
            .map(|i| if i == 0 { next } else { (next + 13 * i) % 1000 })
            .collect();
    }
    let mut decode = times[1..].to_vec();
    decode.sort_by(f64::total_cmp);
    println!(
        "prefill 32 tokens {:.1} ms; {k}-token step median {:.1} ms (fastest {:.1}) over {steps} steps",
        times[0],
        decode[decode.len() / 2],
        decode[0]
    );
    Ok(())
}
