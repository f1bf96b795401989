//! Verify cost: ms per forward for k new tokens in each of N sessions with `context` cached
//! tokens each (what one batched verify of N blocks of γ = k − 1 drafts costs).

use std::time::Instant;

use anyhow::Result;
use edgespec_model::{CausalLm, SeqRequest};

use super::report::{CostCell, VerifyCost};
use super::util::{median, prefill, tokens, Deadline, PREFILL_ROWS};

/// Grid cells in the order they are measured: first k ∈ {1, 3, 5, 9, 16} (γ = 0, 2, 4, 8, 15)
/// at N ∈ {1, 8, 32} (those present), then every other cell by N and k, so a run cut short by
/// the budget still has the cells the capacity scenario needs.
pub fn order(ns: &[usize], ks: &[usize]) -> Vec<(usize, usize)> {
    let first = |n: usize, k: usize| [1, 8, 32].contains(&n) && [1, 3, 5, 9, 16].contains(&k);
    let mut cells: Vec<(usize, usize)> = Vec::new();
    for pass in [true, false] {
        for &n in ns {
            for &k in ks {
                if first(n, k) == pass {
                    cells.push((n, k));
                }
            }
        }
    }
    cells
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct Grid {
    /// Session counts N.
    pub ns: Vec<usize>,
    /// New tokens per session k.
    pub ks: Vec<usize>,
    /// Cached tokens per session.
    pub context: usize,
    /// Timed forwards per cell (the median is reported).
    pub reps: usize,
    /// Untimed forwards per cell first.
    pub warmup: usize,
}

/// Measures the grid until `deadline`; returns the result and whether it was cut short.
pub fn run(
    model: &mut dyn CausalLm,
    grid: &Grid,
    deadline: Deadline,
    progress: &mut dyn FnMut(&VerifyCost),
) -> Result<(VerifyCost, bool)> {
    let Grid {
        ref ns,
        ref ks,
        context,
        reps,
        warmup,
    } = *grid;
    let vocab = model.info().vocab_size;
    let cells = order(ns, ks);
    let mut out = VerifyCost {
        context,
        reps,
        warmup,
        planned_cells: cells.len(),
        cells: Vec::new(),
    };
    let max_n = ns.iter().copied().max().unwrap_or(0);
    if max_n == 0 || deadline.passed() {
        return Ok((out, !cells.is_empty()));
    }
    let sessions: Vec<u64> = (0..max_n as u64).map(|i| 50_000 + i).collect();
    let prompts: Vec<Vec<u32>> = (0..max_n as u64)
        .map(|i| tokens(900 + i, context.max(1), vocab))
        .collect();
    if prefill(model, &sessions, &prompts, PREFILL_ROWS, deadline)?.is_none() {
        return Ok((out, true));
    }
    let mut cut = false;
    for (ci, &(n, k)) in cells.iter().enumerate() {
        if deadline.passed() {
            cut = true;
            break;
        }
        let batch: Vec<SeqRequest> = (0..n)
            .map(|i| SeqRequest {
                session: sessions[i],
                start: context,
                tokens: tokens(7000 + (ci * 64 + i) as u64, k, vocab),
                logits_for_last: usize::MAX,
            })
            .collect();
        for _ in 0..warmup {
            model.forward_batch(&batch)?;
        }
        let mut ms = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            let t = Instant::now();
            let l = model.forward_batch(&batch)?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            std::hint::black_box(l);
        }
        let min = ms.iter().copied().fold(f64::INFINITY, f64::min);
        let med = median(ms);
        eprintln!("  verify cost N={n:<2} k={k:<2} {med:9.2} ms/forward");
        out.cells.push(CostCell {
            sessions: n,
            k,
            rows: n * k,
            ms_median: med,
            ms_min: min,
            ms_per_row: med / (n * k) as f64,
        });
        progress(&out);
    }
    for s in sessions {
        model.release(s);
    }
    Ok((out, cut))
}
