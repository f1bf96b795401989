//! What the check writes: `gpu-check.json` (every figure) and `gpu-check.md` (the tables).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

/// The whole result; written again after every section, so a run that is killed still leaves
/// what it had measured.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub device: String,
    pub shapes: String,
    pub budget_s: f64,
    pub elapsed_s: f64,
    /// True once every section has run (or been skipped) and the report is final.
    pub finished: bool,
    pub host: Host,
    pub params: serde_json::Value,
    /// Sections cut short or skipped by the time budget, in words.
    pub stopped_early: Vec<String>,
    /// Sections that failed, with the error.
    pub errors: Vec<String>,
    pub correctness: Vec<Correctness>,
    pub models: Vec<ModelReport>,
}

#[derive(Debug, Default, Serialize)]
pub struct Host {
    pub cpu_threads: usize,
    pub candle_cuda_build: bool,
    pub os: String,
    pub debug_build: bool,
    /// `/proc/loadavg` when the check started and when it ended (the CPU numbers depend on it).
    pub loadavg_start: String,
    pub loadavg_end: String,
}

/// The first three fields of `/proc/loadavg` (empty where there is none).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// One model's correctness on the device, against a CPU reference.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Correctness {
    pub model: String,
    /// `cpu` (the device is a GPU) or `second cpu load` (the device is the CPU).
    pub reference: String,
    /// Prompt positions whose logit rows were compared.
    pub positions: usize,
    /// max |device − reference| over every logit of the prompt's rows (None: not compared).
    pub logits_max_abs_diff: Option<f64>,
    /// max |logit| of the reference rows, for scale.
    pub logits_max_abs: Option<f64>,
    /// Greedy tokens decoded on each side from the same prompt.
    pub greedy_tokens: usize,
    /// Whether both sides decoded the same token ids.
    pub greedy_identical: Option<bool>,
    /// Index of the first differing token, if any.
    pub greedy_first_divergence: Option<usize>,
    /// Batch invariance on the device.
    pub batch_invariance: Option<BatchInvariance>,
}

/// The largest difference between a position's logits computed alone (one token per forward)
/// and inside a multi-token block, and inside a ragged batch beside other sessions.
#[derive(Debug, Default, Clone, Serialize)]
pub struct BatchInvariance {
    /// Positions compared (each a full logit row).
    pub positions: usize,
    /// Block length (tokens in the one forward).
    pub block_len: usize,
    pub max_abs_diff_block_vs_alone: f64,
    pub max_abs_diff_batch_vs_alone: f64,
    /// Whether every compared row has the same argmax in all three.
    pub argmax_agree: bool,
    /// Whether all three are bit-identical.
    pub exact: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct ModelReport {
    pub name: String,
    pub shape: serde_json::Value,
    pub file_bytes: u64,
    pub generate_s: f64,
    pub load_s: f64,
    pub correctness: Option<Correctness>,
    pub verify_cost: Option<VerifyCost>,
    pub capacity: Option<Capacity>,
}

/// ms per forward for k new tokens in each of N sessions.
#[derive(Debug, Default, Clone, Serialize)]
pub struct VerifyCost {
    /// Cached tokens per session before the k new ones.
    pub context: usize,
    pub reps: usize,
    pub warmup: usize,
    pub planned_cells: usize,
    pub cells: Vec<CostCell>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct CostCell {
    pub sessions: usize,
    pub k: usize,
    pub rows: usize,
    pub ms_median: f64,
    pub ms_min: f64,
    pub ms_per_row: f64,
}

/// The capacity scenario: N streams of replayed drafts, SD against batched target-only.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Capacity {
    pub method: String,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub corrupt: f64,
    pub runs: Vec<CapacityRun>,
    /// Best SD / target-only committed tokens/s ratio at N = 8 (None: not measured).
    pub best_ratio_n8: Option<f64>,
    pub goal_n8: f64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct CapacityRun {
    pub streams: usize,
    /// 0: target-only.
    pub gamma: usize,
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub forwards: usize,
    pub rows_per_forward: f64,
    pub ms_per_forward: f64,
    pub acceptance: Option<f64>,
    pub off_path_streams: usize,
    pub ratio_vs_target_only: Option<f64>,
}

impl Report {
    /// Writes `gpu-check.json` and `gpu-check.md` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(dir.join("gpu-check.json"), json)?;
        std::fs::write(dir.join("gpu-check.md"), self.markdown())?;
        Ok(())
    }

    /// The tables.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# edgespec GPU check: device `{}`, shapes `{}`\n",
            self.device, self.shapes
        );
        let _ = writeln!(
            s,
            "{} s of a {} s budget{}; {} CPU threads (load average {} at the start, {} at the end); \
             candle CUDA build: {}{}.\n",
            fmt(self.elapsed_s, 1),
            fmt(self.budget_s, 0),
            if self.finished { "" } else { " (unfinished)" },
            self.host.cpu_threads,
            self.host.loadavg_start,
            self.host.loadavg_end,
            self.host.candle_cuda_build,
            if self.host.debug_build {
                "; debug build"
            } else {
                ""
            }
        );
        for e in &self.stopped_early {
            let _ = writeln!(s, "- stopped early: {e}");
        }
        for e in &self.errors {
            let _ = writeln!(s, "- ERROR: {e}");
        }
        if !self.stopped_early.is_empty() || !self.errors.is_empty() {
            s.push('\n');
        }
        let mut rows: Vec<&Correctness> = self.correctness.iter().collect();
        rows.extend(self.models.iter().filter_map(|m| m.correctness.as_ref()));
        if !rows.is_empty() {
            s.push_str("## Correctness (device against the reference)\n\n");
            s.push_str(
                "| model | reference | logits max abs diff (positions; max abs logit) | greedy identical | \
                 block vs alone | batch vs alone | argmax agree | invariant (exact) |\n",
            );
            s.push_str("|---|---|---:|---|---:|---:|---|---|\n");
            for c in rows {
                let bi = c.batch_invariance.as_ref();
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} | {} |",
                    c.model,
                    c.reference,
                    match (c.logits_max_abs_diff, c.logits_max_abs) {
                        (Some(d), Some(m)) =>
                            format!("{} ({}; {})", sci(d), c.positions, fmt(m, 2)),
                        _ => "–".into(),
                    },
                    match (c.greedy_identical, c.greedy_first_divergence) {
                        (Some(true), _) => format!("yes ({} tokens)", c.greedy_tokens),
                        (Some(false), Some(i)) =>
                            format!("NO (from token {i} of {})", c.greedy_tokens),
                        (Some(false), None) => "NO".into(),
                        (None, _) => "–".into(),
                    },
                    bi.map_or("–".into(), |b| format!(
                        "{} ({} × {})",
                        sci(b.max_abs_diff_block_vs_alone),
                        b.positions,
                        b.block_len
                    )),
                    bi.map_or("–".into(), |b| sci(b.max_abs_diff_batch_vs_alone)),
                    bi.map_or("–".into(), |b| yes(b.argmax_agree)),
                    bi.map_or("–".into(), |b| yes(b.exact)),
                );
            }
            s.push('\n');
        }
        for m in &self.models {
            let synthetic = m.shape["synthetic"] == serde_json::Value::Bool(true);
            let _ = writeln!(
                s,
                "## {}\n\n{} MB {}, loaded in {} s.\n",
                m.name,
                fmt(m.file_bytes as f64 / 1e6, 0),
                if synthetic {
                    format!(
                        "of synthetic weights, generated in {} s",
                        fmt(m.generate_s, 1)
                    )
                } else {
                    "GGUF file".to_string()
                },
                fmt(m.load_s, 1)
            );
            if let Some(c) = &m.capacity {
                let _ = writeln!(
                    s,
                    "### Capacity: replayed drafts, SD against batched target-only\n\n\
                     {}; prompt {} tokens, {} committed tokens per stream, draft corruption {}.\n",
                    c.method,
                    c.prompt_len,
                    c.new_tokens,
                    fmt(c.corrupt, 2)
                );
                s.push_str(
                    "| streams N | mode | committed tok/s | × target-only | forwards | rows/forward | \
                     ms/forward | acceptance | off-path |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
                );
                for r in &c.runs {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        r.streams,
                        if r.gamma == 0 {
                            "target-only".to_string()
                        } else {
                            format!("SD γ={}", r.gamma)
                        },
                        fmt(r.tokens_per_s, 1),
                        r.ratio_vs_target_only.map_or("–".into(), |x| fmt(x, 2)),
                        r.forwards,
                        fmt(r.rows_per_forward, 1),
                        fmt(r.ms_per_forward, 2),
                        r.acceptance.map_or("–".into(), |x| fmt(x, 2)),
                        r.off_path_streams
                    );
                }
                let _ = writeln!(
                    s,
                    "\nBest SD / target-only at N = 8: {} (goal ≥ {}).\n",
                    c.best_ratio_n8.map_or("not measured".into(), |x| fmt(x, 2)),
                    fmt(c.goal_n8, 1)
                );
            }
            if let Some(v) = &m.verify_cost {
                let _ = writeln!(
                    s,
                    "### Verify cost: ms per forward (median of {}), k new tokens × N sessions, {} cached tokens each\n",
                    v.reps, v.context
                );
                let mut ks: Vec<usize> = v.cells.iter().map(|c| c.k).collect();
                ks.sort_unstable();
                ks.dedup();
                let mut ns: Vec<usize> = v.cells.iter().map(|c| c.sessions).collect();
                ns.sort_unstable();
                ns.dedup();
                s.push_str("| N \\ k |");
                for k in &ks {
                    let _ = write!(s, " {k} |");
                }
                s.push_str("\n|---:|");
                for _ in &ks {
                    s.push_str("---:|");
                }
                s.push('\n');
                for n in &ns {
                    let _ = write!(s, "| {n} |");
                    for k in &ks {
                        let cell = v.cells.iter().find(|c| c.sessions == *n && c.k == *k);
                        let _ = write!(s, " {} |", cell.map_or("".into(), |c| fmt(c.ms_median, 2)));
                    }
                    s.push('\n');
                }
                let _ = writeln!(
                    s,
                    "\n{} of {} planned cells measured.\n",
                    v.cells.len(),
                    v.planned_cells
                );
            }
        }
        s
    }
}

fn fmt(x: f64, digits: usize) -> String {
    format!("{x:.digits$}")
}

fn sci(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else {
        format!("{x:.2e}")
    }
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "NO" }.into()
}
