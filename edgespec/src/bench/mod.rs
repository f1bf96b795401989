//! `edgespec bench`: the benchmark harness of issue 8.
//!
//! Four scenarios, all on the real Qwen pair and the dev prompts (`bench/prompts/`):
//!
//! - [`Scenario::Single`] — one stream, no link delay: target-only (γ = 0 through the same path),
//!   fixed γ ∈ {2, 4, 8} and adaptive γ (in-process [`LocalCluster`](crate::cluster::LocalCluster)).
//! - [`Scenario::Rtt`] — emulated RTT ∈ {0, 20, 50, 100} ms at 20 Mbit/s on the draft ↔
//!   coordinator link: fixed γ ∈ {1, 2, 4, 8}, adaptive, adaptive + pipelined.
//! - [`Scenario::Server`] — one verify node serving N ∈ {1, 4, 8, 16} streams whose drafts are
//!   replayed from recorded (teacher-forced) draft-model predictions, against batched
//!   target-only decoding of the same N streams.
//! - [`Scenario::Edge`] — real binaries in separate processes, draft node pinned to core 0,
//!   coordinator and verify node to core 1: SD (adaptive, pipelined) vs target-only.
//! - [`Scenario::Load`] — overload under load on a tiny synthetic target (issue 15): a ramp of
//!   concurrent draft streams against one coordinator and two verify nodes (child processes).
//!
//! Every configuration is measured `runs` times, interleaved (run 1 of every configuration, then
//! run 2, ...), so slow drift of a shared machine spreads over all of them; medians are reported
//! and ratios are taken between medians measured in the same invocation. Results go to
//! `<out>/<scenario>[-tag].json` (every run's raw numbers), a markdown table (printed and written
//! beside it) and PNG plots drawn by `bench/plot.py`.

mod edge;
mod inproc;
mod load;
mod methods;
mod report;
mod server;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use edgespec_specdec::DraftMethod;
use serde::{Deserialize, Serialize};

pub use edgespec_testkit::stats::median;
pub use report::{ConfigResult, Report, RunRecord, SummaryLine};

/// The dev prompts, embedded so the harness works from any directory of a clone.
pub const DEV_PROMPTS: &str = include_str!("../../../bench/prompts/dev-prompts.jsonl");

/// Input-grounded prompts (kind `grounded`, issue 17): edits of a quoted code block, extraction
/// from a given text, transforms of a given JSON document, answers quoting their context — the
/// answers repeat their input, so prompt lookup has something to propose. A file of their own,
/// so the round-robin selection of the dev prompts (and every earlier table) is unchanged.
pub const GROUNDED_PROMPTS: &str = include_str!("../../../bench/prompts/grounded-prompts.jsonl");

/// Which embedded prompts a scenario uses (`--prompt-set`; `--prompt-file` replaces them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptSet {
    /// `dev-prompts.jsonl` (code, prose, math, structured).
    #[default]
    Dev,
    /// `grounded-prompts.jsonl` only.
    Grounded,
    /// Grounded first, then the dev prompts: round-robin over kinds starts with `grounded`, so
    /// `--prompts 6` is two grounded prompts and one of every dev kind.
    Mixed,
}

impl PromptSet {
    /// Parses `dev`, `grounded` or `mixed`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "dev" => Ok(Self::Dev),
            "grounded" => Ok(Self::Grounded),
            "mixed" => Ok(Self::Mixed),
            other => Err(format!(
                "unknown prompt set {other:?}: expected dev, grounded or mixed"
            )),
        }
    }

    /// The JSONL text of the set.
    pub fn text(self) -> String {
        match self {
            Self::Dev => DEV_PROMPTS.to_string(),
            Self::Grounded => GROUNDED_PROMPTS.to_string(),
            Self::Mixed => format!("{GROUNDED_PROMPTS}\n{DEV_PROMPTS}"),
        }
    }
}

/// Which benchmark to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// (a) one stream, no link delay.
    Single,
    /// (b) emulated RTT sweep at 20 Mbit/s.
    Rtt,
    /// (c) verify-node throughput with replayed drafts.
    Server,
    /// (d) edge–cloud emulation with pinned processes.
    Edge,
    /// Bytes on the draft ↔ coordinator link per round and per token (greedy, sampling).
    Wire,
    /// Overload under load: a ramp of concurrent streams on a synthetic fleet.
    Load,
}

impl Scenario {
    /// Lowercase name (file names, JSON).
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Single => "single",
            Scenario::Rtt => "rtt",
            Scenario::Server => "server",
            Scenario::Edge => "edge",
            Scenario::Wire => "wire",
            Scenario::Load => "load",
        }
    }

    /// Prompts used when `--prompts` is not given.
    pub fn default_prompts(self) -> usize {
        match self {
            Scenario::Single => 12,
            _ => 4,
        }
    }

    /// Completion budget when `--max-tokens` is not given.
    pub fn default_max_tokens(self) -> u32 {
        match self {
            Scenario::Server => 64,
            Scenario::Load => 16,
            _ => 128,
        }
    }
}

/// Everything `edgespec bench` takes.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Which scenario.
    pub scenario: Scenario,
    /// Measured runs per configuration (medians over them; ≥ 3 for reported numbers).
    pub runs: usize,
    /// Output directory for JSON, markdown and PNG files.
    pub out: PathBuf,
    /// How many prompts (picked round-robin over kinds); None = the scenario's default.
    pub prompts: Option<usize>,
    /// Completion budget per request; None = the scenario's default.
    pub max_tokens: Option<u32>,
    /// Prompt file (JSONL: id, kind, prompt); None = the embedded `prompt_set`.
    pub prompt_file: Option<PathBuf>,
    /// Embedded prompts to use when there is no `prompt_file`.
    pub prompt_set: PromptSet,
    /// `single` / `edge`: compare drafting methods (each adaptive, against target-only) instead
    /// of the scenario's usual configurations; None = the usual ones (draft model).
    pub draft_methods: Option<Vec<DraftMethod>>,
    /// Target GGUF; None = the cached Qwen2.5-Coder-1.5B (fetched if missing).
    pub target: Option<PathBuf>,
    /// Draft GGUF; None = the cached Qwen2.5-Coder-0.5B (fetched if missing).
    pub draft: Option<PathBuf>,
    /// Override of the RTT list (ms) of `rtt` / `edge`.
    pub rtts_ms: Option<Vec<u64>>,
    /// Override of the stream counts of `server`.
    pub streams: Option<Vec<usize>>,
    /// `edge`: directory of the edgespec-* binaries (default: beside this executable).
    pub bin_dir: Option<PathBuf>,
    /// `edge`: do not pin with taskset (for machines with one core or without taskset).
    pub no_pin: bool,
    /// Suffix of the output file names (e.g. "smoke").
    pub tag: Option<String>,
    /// Skip the PNG plots.
    pub no_plots: bool,
}

/// One benchmark prompt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prompt {
    /// Stable id.
    pub id: String,
    /// code / prose / math / structured / grounded.
    pub kind: String,
    /// The user message.
    pub prompt: String,
}

/// Parses a JSONL prompt file.
pub fn parse_prompts(text: &str) -> Result<Vec<Prompt>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("prompt line {}", i + 1)))
        .collect()
}

/// Picks `n` prompts round-robin over kinds (in order of first appearance), so a small `n`
/// still covers every kind: n = 4 gives one code, prose, math and structured prompt.
pub fn select_prompts(all: &[Prompt], n: usize) -> Vec<Prompt> {
    let mut kinds: Vec<&str> = Vec::new();
    for p in all {
        if !kinds.contains(&p.kind.as_str()) {
            kinds.push(&p.kind);
        }
    }
    let mut queues: Vec<Vec<&Prompt>> = kinds
        .iter()
        .map(|k| all.iter().filter(|p| p.kind == *k).collect())
        .collect();
    for q in &mut queues {
        q.reverse();
    }
    let mut out = Vec::new();
    while out.len() < n && queues.iter().any(|q| !q.is_empty()) {
        for q in &mut queues {
            if out.len() < n {
                if let Some(p) = q.pop() {
                    out.push(p.clone());
                }
            }
        }
    }
    out
}

/// Median of every metric over the runs.
pub fn medians(runs: &[RunRecord]) -> BTreeMap<String, f64> {
    let mut keys: Vec<&String> = runs.iter().flat_map(|r| r.metrics.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let vals: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.metrics.get(k).copied())
                .collect();
            median(&vals).map(|m| (k.clone(), m))
        })
        .collect()
}

/// Resolved model paths.
#[derive(Debug, Clone)]
pub(crate) struct Models {
    pub target: PathBuf,
    pub draft: PathBuf,
}

async fn resolve_models(o: &BenchOptions) -> Result<Models> {
    use edgespec_model::fetch::{default_cache_dir, ensure_model, KnownModel};
    async fn get(m: KnownModel) -> Result<PathBuf> {
        tokio::task::spawn_blocking(move || ensure_model(m, &default_cache_dir(), true))
            .await?
            .with_context(|| format!("fetching {}", m.file_name()))
    }
    let target = match &o.target {
        Some(p) => p.clone(),
        None => get(KnownModel::Qwen15bTarget).await?,
    };
    let draft = match &o.draft {
        Some(p) => p.clone(),
        None => get(KnownModel::Qwen05bDraft).await?,
    };
    Ok(Models { target, draft })
}

/// The settings every scenario needs, resolved once.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub opts: BenchOptions,
    pub models: Models,
    pub prompts: Vec<Prompt>,
    pub max_tokens: u32,
}

/// Runs one scenario end to end: measure, write JSON + markdown, draw plots, print the table.
pub async fn run(opts: BenchOptions) -> Result<Report> {
    if opts.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if opts.scenario == Scenario::Load {
        // A synthetic fleet: no prompt file, no real models.
        let max_tokens = opts
            .max_tokens
            .unwrap_or(Scenario::Load.default_max_tokens());
        std::fs::create_dir_all(&opts.out)
            .with_context(|| format!("creating {}", opts.out.display()))?;
        let report = load::run(&opts, max_tokens.max(2)).await?;
        return finish(report, &opts);
    }
    let text = match &opts.prompt_file {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => opts.prompt_set.text(),
    };
    if opts.draft_methods.is_some() && !matches!(opts.scenario, Scenario::Single | Scenario::Edge) {
        bail!("--draft-methods applies to the single and edge scenarios only");
    }
    let all = parse_prompts(&text)?;
    let n = opts.prompts.unwrap_or(opts.scenario.default_prompts());
    let prompts = select_prompts(&all, n.max(1));
    if prompts.is_empty() {
        bail!("no prompts");
    }
    let max_tokens = opts
        .max_tokens
        .unwrap_or(opts.scenario.default_max_tokens())
        .max(2);
    let models = resolve_models(&opts).await?;
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let ctx = Ctx {
        opts: opts.clone(),
        models,
        prompts,
        max_tokens,
    };
    eprintln!(
        "bench {}: {} run(s), {} prompt(s) [{}], max_tokens {}",
        opts.scenario.name(),
        opts.runs,
        ctx.prompts.len(),
        ctx.prompts
            .iter()
            .map(|p| p.id.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        max_tokens
    );
    let report = match opts.scenario {
        Scenario::Single => inproc::single(&ctx).await?,
        Scenario::Rtt => inproc::rtt(&ctx).await?,
        Scenario::Server => server::run(&ctx).await?,
        Scenario::Edge => edge::run(&ctx).await?,
        Scenario::Wire => inproc::wire(&ctx).await?,
        Scenario::Load => unreachable!("run before the models are resolved"),
    };
    finish(report, &opts)
}

/// Writes the report (JSON, markdown, plots where it has any), prints its table.
fn finish(report: Report, opts: &BenchOptions) -> Result<Report> {
    let plots = !opts.no_plots && !report.plots.is_empty();
    let files = report::write(&report, &opts.out, opts.tag.as_deref(), plots)?;
    println!("{}", report.markdown());
    for f in files {
        eprintln!("wrote {}", f.display());
    }
    Ok(report)
}

/// Host facts recorded with every report (results from a loaded machine must say so).
pub(crate) fn host_info() -> serde_json::Value {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    serde_json::json!({
        "cpus": cpus,
        "cpu_model": model,
        "loadavg_at_start": load.trim(),
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "debug_build": cfg!(debug_assertions),
    })
}

/// Current 1-minute load average.
pub(crate) fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `a / b` when both are finite and b > 0.
pub(crate) fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if a.is_finite() && b.is_finite() && b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// Median over runs of the per-run ratio `a.metric / b.metric` (paired by run number).
pub(crate) fn paired_ratio(a: &ConfigResult, b: &ConfigResult, metric: &str) -> Option<f64> {
    let r: Vec<f64> = a
        .runs
        .iter()
        .zip(&b.runs)
        .filter_map(|(x, y)| {
            ratio(
                x.metrics.get(metric).copied(),
                y.metrics.get(metric).copied(),
            )
        })
        .collect();
    median(&r)
}

/// Records `c`'s tokens/s against `base` as `tokens_per_s_vs_<against>` (ratio of medians) and
/// `tokens_per_s_vs_<against>_paired` (median of per-run ratios).
pub(crate) fn set_tokens_per_s_ratio(c: &mut ConfigResult, base: &ConfigResult, against: &str) {
    let key = format!("tokens_per_s_vs_{against}");
    if let Some(v) = ratio(
        c.median.get("tokens_per_s").copied(),
        base.median.get("tokens_per_s").copied(),
    ) {
        c.ratios.insert(key.clone(), v);
    }
    if let Some(v) = paired_ratio(c, base, "tokens_per_s") {
        c.ratios.insert(format!("{key}_paired"), v);
    }
}

/// Prints the progress line of run `step` of `total` and appends the run to its configuration.
pub(crate) fn record_run(c: &mut ConfigResult, step: usize, total: usize, record: RunRecord) {
    let m = &record.metrics;
    eprintln!(
        "[{step}/{total}] run {} {:<34} {:>6.2} tok/s  fwd/tok {:.3}  acc {}",
        record.run,
        c.name,
        m.get("tokens_per_s").copied().unwrap_or(f64::NAN),
        m.get("forwards_per_token").copied().unwrap_or(f64::NAN),
        m.get("acceptance")
            .map_or("–".into(), |a| format!("{a:.2}")),
    );
    c.runs.push(record);
}

/// Where `bench/plot.py` is: under the current directory, else beside this crate's source.
pub(crate) fn plot_script() -> Option<PathBuf> {
    let here = Path::new("bench/plot.py");
    if here.exists() {
        return Some(here.to_path_buf());
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/plot.py");
    src.exists().then_some(src)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_prompts_parse_and_select_round_robin() {
        let all = parse_prompts(DEV_PROMPTS).unwrap();
        assert!(all.len() >= 4);
        let four = select_prompts(&all, 4);
        let kinds: Vec<&str> = four.iter().map(|p| p.kind.as_str()).collect();
        assert_eq!(kinds, ["code", "prose", "math", "structured"]);
        assert_eq!(select_prompts(&all, 100).len(), all.len());
    }

    #[test]
    fn grounded_prompts_quote_their_input_and_mixed_starts_with_them() {
        let grounded = parse_prompts(GROUNDED_PROMPTS).unwrap();
        assert!(grounded.len() >= 8, "issue 17 asks for at least 8");
        let mut ids: Vec<&str> = grounded.iter().map(|p| p.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), grounded.len(), "ids are unique");
        for p in &grounded {
            assert_eq!(p.kind, "grounded", "{}", p.id);
            // Every one is an instruction, a blank line, then the input its answer repeats: a
            // block of code, a JSON document, a text or log lines of its own.
            let input = p.prompt.split_once("\n\n").map_or("", |(_, input)| input);
            assert!(input.len() >= 80, "{} quotes no input", p.id);
        }
        // The dev set is untouched; the mixed set picks grounded first, then every dev kind.
        assert_eq!(PromptSet::Dev.text(), DEV_PROMPTS);
        let mixed = parse_prompts(&PromptSet::Mixed.text()).unwrap();
        let six = select_prompts(&mixed, 6);
        let kinds: Vec<&str> = six.iter().map(|p| p.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "grounded",
                "code",
                "prose",
                "math",
                "structured",
                "grounded"
            ]
        );
        assert_eq!(PromptSet::parse("mixed"), Ok(PromptSet::Mixed));
        assert!(PromptSet::parse("all").is_err());
    }
}
