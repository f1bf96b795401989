//! The capacity scenario: N streams of replayed drafts on one model, speculative decoding
//! against batched target-only decoding, run directly on the model (one ragged `forward_batch`
//! per round over every active stream, as the verify node's batcher does) with the verify
//! node's own acceptance rule (`edgespec_verify_node::verdict::decide`, greedy).
//!
//! Drafts replay the target's own greedy continuation (computed first, batched, untimed), each
//! draft position replaced by a wrong token with probability `corrupt` (a fixed hash of stream
//! and position, as in `examples/bench_verify.rs`), so the acceptance rate is controlled and
//! drafting costs nothing. A stream whose committed output leaves that continuation (a numeric
//! near-tie between batch shapes, possible on a GPU) continues with γ = 0 and is counted as
//! off-path.

use std::time::Instant;

use anyhow::{ensure, Result};
use edgespec_model::{CausalLm, SeqRequest};
use edgespec_proto::domain::Block;
use edgespec_specdec::SamplingParams;
use edgespec_verify_node::verdict::decide;

use super::report::{Capacity, CapacityRun};
use super::util::{mix, prefill, tokens, Deadline, PREFILL_ROWS};

/// What to run.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub streams: Vec<usize>,
    pub gammas: Vec<usize>,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub corrupt: f64,
}

/// The result of one set of streams.
struct Outcome {
    run: CapacityRun,
    /// Each stream's committed tokens after its prompt.
    continuations: Vec<Vec<u32>>,
}

/// Drafts for a stream at continuation index `j`: `truth[j..j + g]`, each position wrong with
/// probability `corrupt`.
fn drafts(stream: usize, truth: &[u32], j: usize, g: usize, corrupt: f64, vocab: u32) -> Vec<u32> {
    let g = g.min(truth.len().saturating_sub(j));
    (0..g)
        .map(|i| {
            let t = truth[j + i];
            let h = mix((stream as u64).wrapping_mul(1_000_003) ^ ((j * 64 + i) as u64));
            if (h as f64 / u64::MAX as f64) < corrupt {
                (t + 1) % vocab
            } else {
                t
            }
        })
        .collect()
}

/// How the streams of one run draft.
struct Replay<'a> {
    /// Each stream's reference continuation; `None`: target-only.
    truths: Option<&'a [Vec<u32>]>,
    gamma: usize,
    new_tokens: usize,
    corrupt: f64,
}

/// Runs `prompts.len()` streams until each has committed `new_tokens` tokens after its first
/// (prefill, untimed). γ = 0 or no `truths`: target-only. `None` when the deadline passed.
fn run_streams(
    model: &mut dyn CausalLm,
    prompts: &[Vec<u32>],
    replay: &Replay<'_>,
    deadline: Deadline,
    sid_base: u64,
) -> Result<Option<Outcome>> {
    let Replay {
        truths,
        gamma,
        new_tokens,
        corrupt,
    } = *replay;
    let n = prompts.len();
    let vocab = model.info().vocab_size as u32;
    let sessions: Vec<u64> = (0..n as u64).map(|i| sid_base + i).collect();
    let Some(firsts) = prefill(model, &sessions, prompts, PREFILL_ROWS, deadline)? else {
        return Ok(None);
    };
    let mut committed: Vec<Vec<u32>> = prompts
        .iter()
        .zip(&firsts)
        .map(|(p, &f)| {
            let mut c = p.clone();
            c.push(f);
            c
        })
        .collect();
    let on_path = |i: usize, c: &[u32]| -> bool {
        truths.is_none_or(|t| {
            let cont = &c[prompts[i].len()..];
            t[i].get(..cont.len()) == Some(cont)
        })
    };
    let mut off: Vec<bool> = (0..n).map(|i| !on_path(i, &committed[i])).collect();
    let (mut forwards, mut rows, mut drafted, mut accepted) = (0usize, 0usize, 0usize, 0usize);
    let started = Instant::now();
    let mut round = 0u64;
    loop {
        let active: Vec<usize> = (0..n)
            .filter(|&i| committed[i].len() - prompts[i].len() - 1 < new_tokens)
            .collect();
        if active.is_empty() {
            break;
        }
        if deadline.passed() {
            for s in &sessions {
                model.release(*s);
            }
            return Ok(None);
        }
        round += 1;
        let blocks: Vec<Block> = active
            .iter()
            .map(|&i| {
                let c = &committed[i];
                let j = c.len() - prompts[i].len();
                let d = match truths {
                    Some(t) if !off[i] => drafts(i, &t[i], j, gamma, corrupt, vocab),
                    _ => Vec::new(),
                };
                Block {
                    session_id: sessions[i],
                    round,
                    committed_len: c.len(),
                    history: None,
                    draft_tokens: d,
                    draft_probs: Vec::new(),
                    sampling: SamplingParams::GREEDY,
                }
            })
            .collect();
        let batch: Vec<SeqRequest> = active
            .iter()
            .zip(&blocks)
            .map(|(&i, b)| {
                let c = &committed[i];
                let mut tokens = vec![*c.last().expect("non-empty")];
                tokens.extend_from_slice(&b.draft_tokens);
                SeqRequest {
                    session: sessions[i],
                    start: c.len() - 1,
                    tokens,
                    logits_for_last: usize::MAX,
                }
            })
            .collect();
        rows += batch.iter().map(|r| r.tokens.len()).sum::<usize>();
        let logits = model.forward_batch(&batch)?;
        forwards += 1;
        for ((&i, b), l) in active.iter().zip(&blocks).zip(&logits) {
            let v = decide(b, l)?;
            drafted += b.draft_tokens.len();
            accepted += v.accepted;
            let c = &mut committed[i];
            c.extend_from_slice(&b.draft_tokens[..v.accepted]);
            c.push(v.next_token);
            if !off[i] && !on_path(i, &committed[i]) {
                off[i] = true;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    for s in &sessions {
        model.release(*s);
    }
    let tokens: usize = committed
        .iter()
        .zip(prompts)
        .map(|(c, p)| c.len() - p.len() - 1)
        .sum();
    let run = CapacityRun {
        streams: n,
        gamma: if truths.is_some() { gamma } else { 0 },
        tokens,
        seconds,
        tokens_per_s: tokens as f64 / seconds.max(1e-9),
        forwards,
        rows_per_forward: rows as f64 / forwards.max(1) as f64,
        ms_per_forward: seconds * 1e3 / forwards.max(1) as f64,
        acceptance: (drafted > 0).then(|| accepted as f64 / drafted as f64),
        off_path_streams: off.iter().filter(|&&o| o).count(),
        ratio_vs_target_only: None,
    };
    let continuations = committed
        .into_iter()
        .zip(prompts)
        .map(|(c, p)| c[p.len()..].to_vec())
        .collect();
    Ok(Some(Outcome { run, continuations }))
}

/// Runs the scenario until `deadline`; returns the result and what was cut short.
pub fn run(
    model: &mut dyn CausalLm,
    sc: &Scenario,
    deadline: Deadline,
    progress: &mut dyn FnMut(&Capacity),
) -> Result<(Capacity, Vec<String>)> {
    let vocab = model.info().vocab_size;
    let mut out = Capacity {
        method: "directly on the model: one ragged forward per round over all active streams, \
                 the verify node's greedy acceptance rule (verdict::decide)"
            .into(),
        prompt_len: sc.prompt_len,
        new_tokens: sc.new_tokens,
        corrupt: sc.corrupt,
        goal_n8: 2.5,
        ..Capacity::default()
    };
    let mut cut = Vec::new();
    let max_n = sc.streams.iter().copied().max().unwrap_or(0);
    let max_g = sc.gammas.iter().copied().max().unwrap_or(0);
    ensure!(sc.prompt_len >= 1, "prompt length must be positive");
    if max_n == 0 {
        return Ok((out, cut));
    }
    let prompts: Vec<Vec<u32>> = (0..max_n as u64)
        .map(|i| tokens(100 + i, sc.prompt_len, vocab))
        .collect();
    eprintln!("  capacity: the target's greedy continuations of {max_n} prompts ...");
    let truth_len = sc.new_tokens + max_g + 1;
    let reference = Replay {
        truths: None,
        gamma: 0,
        new_tokens: truth_len,
        corrupt: 0.0,
    };
    let Some(truth) = run_streams(model, &prompts, &reference, deadline, 70_000)? else {
        cut.push("capacity: no time left for the greedy reference".into());
        return Ok((out, cut));
    };
    let truths = truth.continuations;
    let mut sid = 80_000u64;
    for &n in &sc.streams {
        let mut base: Option<f64> = None;
        for g in std::iter::once(0).chain(sc.gammas.iter().copied()) {
            sid += 1000;
            let t = (g > 0).then_some(&truths[..n]);
            let replay = Replay {
                truths: t,
                gamma: g,
                new_tokens: sc.new_tokens,
                corrupt: sc.corrupt,
            };
            let r = run_streams(model, &prompts[..n], &replay, deadline, sid)?;
            let Some(mut o) = r else {
                cut.push(format!("capacity: stopped at N = {n}, γ = {g}"));
                return Ok((out, cut));
            };
            if g == 0 {
                base = Some(o.run.tokens_per_s);
                // Target-only at N streams against the reference (computed at the largest N).
                o.run.off_path_streams = o
                    .continuations
                    .iter()
                    .zip(&truths)
                    .filter(|(c, t)| t.get(..c.len()) != Some(&c[..]))
                    .count();
            }
            o.run.ratio_vs_target_only = base.map(|b| o.run.tokens_per_s / b);
            eprintln!(
                "  capacity N={n:<2} {:<12} {:9.1} tok/s  x{:.2}  acc {}",
                if g == 0 {
                    "target-only".to_string()
                } else {
                    format!("SD γ={g}")
                },
                o.run.tokens_per_s,
                o.run.ratio_vs_target_only.unwrap_or(1.0),
                o.run.acceptance.map_or("–".into(), |a| format!("{a:.2}"))
            );
            if n == 8 && g > 0 {
                let r = o.run.ratio_vs_target_only.unwrap_or(0.0);
                out.best_ratio_n8 = Some(out.best_ratio_n8.map_or(r, |b| b.max(r)));
            }
            out.runs.push(o.run);
            progress(&out);
        }
    }
    Ok((out, cut))
}
