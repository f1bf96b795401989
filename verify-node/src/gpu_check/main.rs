//! `edgespec-gpu-check`: one self-contained check of the verify path on a device, prepared so
//! that a single call on a lent GPU machine measures everything (`deploy/tools/gpu-check` runs
//! it there; `cargo test -p edgespec-verify-node --test gpu_check` runs it on the CPU).
//!
//! Sections, in order, each stopped or skipped (and said so in the report) when the time budget
//! runs out:
//! 1. **correctness** on tiny synthetic models: the device's logits against a CPU reference (on
//!    the CPU: a second CPU load), greedy decoding of a fixed prompt on both, and batch
//!    invariance on the device (a position's logits alone, inside a block, inside a ragged batch);
//! 2. per model at real shapes (`--shapes real`: Qwen2 1.5B and 7B Q4_K_M layouts; `small`:
//!    two small stand-ins), generated into `--work-dir` at run time (`write_shaped_gguf`):
//!    batch invariance at that shape (and logits/greedy against a CPU load when the device is a
//!    GPU), the **capacity** scenario (N streams of replayed drafts, SD against batched
//!    target-only, `capacity.rs`), and the **verify cost** grid (ms per forward for k new tokens ×
//!    N sessions, `cost.rs`).
//!
//! Results: `<out>/gpu-check.json` and `<out>/gpu-check.md`, rewritten after every section. Exit
//! status 0 when every section that ran succeeded (stopping early is not an error), 1 when one
//! failed, 2 on bad arguments.

#![forbid(unsafe_code)]

mod capacity;
mod correctness;
mod cost;
mod report;
mod util;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clap::{Parser, ValueEnum};
use edgespec_model::synthetic::{
    write_shaped_gguf, write_tiny_gguf, ShapeSpec, TinyArch, TinySpec, TinyWeights,
};
use edgespec_model::{CausalLm, DeviceKind};
use edgespec_verify_node::settings::{device_label, parse_device};
use serde_json::json;

use report::{Host, ModelReport, Report};
use util::{tokens, Deadline};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Shapes {
    /// Tiny and small models: the CI-sized run (seconds on a CPU).
    Small,
    /// Synthetic Qwen2 1.5B and 7B Q4_K_M (about 1.1 and 4.7 GB, generated at run time).
    Real,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Section {
    /// Tiny-model correctness (device against CPU).
    Correctness,
    /// Per-model correctness at the model's shape.
    ModelCorrectness,
    /// The capacity scenario.
    Capacity,
    /// The verify-cost grid.
    Cost,
}

/// Correctness and speed of the verify path on a device (see the crate docs of this binary).
#[derive(Debug, Parser)]
#[command(name = "edgespec-gpu-check")]
struct Args {
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Model shapes.
    #[arg(long, value_enum, default_value = "small")]
    shapes: Shapes,
    /// Where gpu-check.json and gpu-check.md go.
    #[arg(long)]
    out: PathBuf,
    /// Wall-clock budget in seconds; sections stop early (and say so) when it runs out.
    #[arg(long, default_value_t = 240.0)]
    budget_s: f64,
    /// Where the synthetic GGUF files are written (a folder is made inside; removed at the end).
    #[arg(long, env = "TMPDIR", default_value = "/tmp")]
    work_dir: PathBuf,
    /// Keep the generated model files.
    #[arg(long)]
    keep_files: bool,
    /// Only models whose name contains one of these (e.g. `1.5b,7b`).
    #[arg(long, value_delimiter = ',')]
    models: Option<Vec<String>>,
    /// Sections to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    sections: Option<Vec<Section>>,
    /// Verify-cost grid: session counts N (default real 1,2,4,8,16,32; small 1,2,4).
    #[arg(long, value_delimiter = ',')]
    sessions: Option<Vec<usize>>,
    /// Verify-cost grid: new tokens per session k (default real 1..16; small 1,2,5).
    #[arg(long, value_delimiter = ',')]
    ks: Option<Vec<usize>>,
    /// Verify-cost grid: cached tokens per session (default real 256; small 16).
    #[arg(long)]
    context: Option<usize>,
    /// Verify-cost grid: timed forwards per cell (median reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Verify-cost grid: untimed forwards per cell first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Capacity: stream counts N (default real 1,8,32; small 1,8).
    #[arg(long, value_delimiter = ',')]
    streams: Option<Vec<usize>>,
    /// Capacity: draft lengths γ compared with target-only (default real 2,4,8; small 2,4).
    #[arg(long, value_delimiter = ',')]
    gammas: Option<Vec<usize>>,
    /// Capacity: probability that a replayed draft token is wrong.
    #[arg(long, default_value_t = 0.2)]
    corrupt: f64,
    /// Capacity: prompt tokens per stream (default real 128; small 12).
    #[arg(long)]
    prompt_len: Option<usize>,
    /// Capacity: committed tokens per stream in the timed part (default real 64; small 8).
    #[arg(long)]
    new_tokens: Option<usize>,
    /// Per-model correctness: skip the CPU reference load on a GPU (batch invariance only).
    #[arg(long)]
    no_cpu_reference: bool,
    /// Run the per-model sections on these GGUF files instead of generated models (e.g. the
    /// real 1.5B, to compare its speed with the synthetic one's).
    #[arg(long, value_delimiter = ',')]
    gguf: Vec<PathBuf>,
}

/// A model of section 2: generated from a spec, or an existing file.
enum Source {
    Generate(ShapeSpec),
    File(PathBuf),
}

impl Source {
    fn name(&self) -> String {
        match self {
            Source::Generate(s) => s.name.clone(),
            Source::File(p) => p
                .file_stem()
                .map_or("model".into(), |s| s.to_string_lossy().into_owned()),
        }
    }

    /// Bytes a forward reads (for the budget split).
    fn bytes(&self) -> u64 {
        match self {
            Source::Generate(s) => s.weight_bytes(),
            Source::File(p) => std::fs::metadata(p).map_or(1, |m| m.len()),
        }
    }
}

fn main() -> ExitCode {
    edgespec_model::configure_cpu_threads();
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs `f`, turning a panic (cudarc panics when a CUDA library cannot be loaded) into an error.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(anyhow!("panicked: {msg}"))
        }
    }
}

/// An error for the report: its first line (candle appends a backtrace to some errors when
/// `RUST_BACKTRACE` is set; `{:#}` already puts the whole context chain on that line).
fn brief(e: String) -> String {
    match e.split_once('\n') {
        Some((first, _)) => first.to_string(),
        None => e,
    }
}

struct Ctx<'a> {
    args: &'a Args,
    device: DeviceKind,
    started: Instant,
    end: Deadline,
    work: PathBuf,
    report: Report,
}

impl Ctx<'_> {
    fn save(&mut self) {
        self.report.elapsed_s = self.started.elapsed().as_secs_f64();
        self.report.host.loadavg_end = report::loadavg();
        if let Err(e) = self.report.write(&self.args.out) {
            eprintln!("warning: cannot write the report: {e:#}");
        }
    }

    fn wants(&self, s: Section) -> bool {
        self.args.sections.as_ref().is_none_or(|v| v.contains(&s))
    }

    fn reference_label(&self) -> &'static str {
        if self.device == DeviceKind::Cpu {
            "second cpu load"
        } else {
            "cpu"
        }
    }

    /// Loads `path` on the device and a reference (a CPU load; a second one on the CPU).
    fn load_pair(&self, path: &Path) -> Result<(Box<dyn CausalLm>, Box<dyn CausalLm>)> {
        let (d, _) = util::load(path, self.device).context("loading on the device")?;
        let (r, _) = util::load(path, DeviceKind::Cpu).context("loading the CPU reference")?;
        Ok((d, r))
    }
}

fn run(args: &Args) -> Result<bool> {
    let device = parse_device(&args.device).map_err(|e| anyhow!("--device: {e}"))?;
    let started = Instant::now();
    let end = Deadline(started + Duration::from_secs_f64(args.budget_s.max(0.0)));
    let work = args
        .work_dir
        .join(format!("edgespec-gpu-check-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let real = args.shapes == Shapes::Real;
    let pick = |v: &Option<Vec<usize>>, real_d: Vec<usize>, small_d: Vec<usize>| {
        v.clone().unwrap_or(if real { real_d } else { small_d })
    };
    let grid = cost::Grid {
        ns: pick(&args.sessions, vec![1, 2, 4, 8, 16, 32], vec![1, 2, 4]),
        ks: pick(&args.ks, (1..=16).collect(), vec![1, 2, 5]),
        context: args.context.unwrap_or(if real { 256 } else { 16 }),
        reps: args.reps.max(1),
        warmup: args.warmup,
    };
    let scenario = capacity::Scenario {
        streams: pick(&args.streams, vec![1, 8, 32], vec![1, 8]),
        gammas: pick(&args.gammas, vec![2, 4, 8], vec![2, 4]),
        prompt_len: args.prompt_len.unwrap_or(if real { 128 } else { 12 }),
        new_tokens: args.new_tokens.unwrap_or(if real { 64 } else { 8 }),
        corrupt: args.corrupt,
    };
    let report = Report {
        schema: "edgespec-gpu-check/1",
        device: device_label(device),
        shapes: format!("{:?}", args.shapes).to_lowercase(),
        budget_s: args.budget_s,
        host: Host {
            cpu_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            candle_cuda_build: cfg!(feature = "cuda"),
            os: std::env::consts::OS.into(),
            debug_build: cfg!(debug_assertions),
            loadavg_start: report::loadavg(),
            loadavg_end: String::new(),
        },
        params: json!({
            "verify_cost": {
                "sessions": grid.ns, "ks": grid.ks, "context": grid.context,
                "reps": grid.reps, "warmup": grid.warmup,
            },
            "capacity": {
                "streams": scenario.streams, "gammas": scenario.gammas,
                "prompt_len": scenario.prompt_len, "new_tokens": scenario.new_tokens,
                "corrupt": scenario.corrupt,
            },
            "models": args.models, "sections": args.sections.as_ref().map(|v| format!("{v:?}")),
            "cpu_reference": device != DeviceKind::Cpu && !args.no_cpu_reference,
        }),
        ..Report::default()
    };
    let mut ctx = Ctx {
        args,
        device,
        started,
        end,
        work: work.clone(),
        report,
    };
    ctx.save();
    eprintln!(
        "edgespec-gpu-check: device {}, shapes {:?}, budget {} s",
        ctx.report.device, args.shapes, args.budget_s
    );
    if ctx.wants(Section::Correctness) {
        tiny_correctness(&mut ctx);
    }
    let specs: Vec<ShapeSpec> = if real {
        vec![ShapeSpec::qwen2_1_5b_q4km(), ShapeSpec::qwen2_7b_q4km()]
    } else {
        vec![
            ShapeSpec::small("small-a", 2, 256, 4, 512),
            ShapeSpec::small("small-b", 2, 512, 8, 1024),
        ]
    };
    let specs: Vec<Source> = if args.gguf.is_empty() {
        specs.into_iter().map(Source::Generate).collect()
    } else {
        args.gguf.iter().cloned().map(Source::File).collect()
    };
    let specs: Vec<Source> = specs
        .into_iter()
        .filter(|s| {
            args.models
                .as_ref()
                .is_none_or(|m| m.iter().any(|m| s.name().contains(m.as_str())))
        })
        .collect();
    // Each model's share of the time left: on a GPU much of a forward is per layer and per
    // session (kernel launches), which both models have alike, so the shares grow slowly with
    // size (1.5B : 7B = 41 : 59).
    let weights: Vec<f64> = specs
        .iter()
        .map(|s| (s.bytes() as f64).powf(0.25))
        .collect();
    let model_sections = [Section::ModelCorrectness, Section::Capacity, Section::Cost];
    if model_sections.iter().any(|s| ctx.wants(*s)) {
        for (i, spec) in specs.iter().enumerate() {
            let share = weights[i] / weights[i..].iter().sum::<f64>();
            let deadline = ctx.end.share(share);
            if ctx.end.passed() {
                ctx.report
                    .stopped_early
                    .push(format!("{}: skipped (budget)", spec.name()));
                ctx.save();
                continue;
            }
            model_sections_for(&mut ctx, spec, &grid, &scenario, deadline);
        }
    }
    ctx.report.finished = true;
    ctx.save();
    if !args.keep_files {
        let _ = std::fs::remove_dir_all(&work);
    }
    println!("{}", ctx.report.markdown());
    Ok(ctx.report.errors.is_empty())
}

/// Section 1: tiny models.
fn tiny_correctness(ctx: &mut Ctx<'_>) {
    let tinies = [
        ("tiny-qwen2-q8_0", TinySpec::default()),
        (
            "tiny-qwen2-q4km",
            TinySpec {
                weights: TinyWeights::Q4KM,
                hidden: 256,
                ffn: 512,
                seed: 5,
                ..TinySpec::default()
            },
        ),
        (
            "tiny-llama-q8_0",
            TinySpec {
                arch: TinyArch::Llama,
                seed: 7,
                ..TinySpec::default()
            },
        ),
    ];
    for (name, spec) in tinies {
        if ctx.end.passed() {
            ctx.report
                .stopped_early
                .push(format!("correctness: {name} skipped (budget)"));
            continue;
        }
        eprintln!("correctness: {name}");
        let path = ctx.work.join(format!("{name}.gguf"));
        let label = ctx.reference_label();
        let r = guarded(|| {
            write_tiny_gguf(&path, &spec)?;
            let (mut dev, mut reference) = ctx.load_pair(&path)?;
            let vocab = spec.vocab_size();
            let prompt = tokens(1, 12, vocab);
            let continuation = tokens(2, 7, vocab);
            let plan = correctness::Plan {
                name,
                reference_label: label,
                prompt: &prompt,
                greedy_tokens: 24,
                continuation: &continuation,
            };
            correctness::compare(dev.as_mut(), Some(reference.as_mut()), &plan)
        });
        match r {
            Ok(c) => ctx.report.correctness.push(c),
            Err(e) => ctx
                .report
                .errors
                .push(brief(format!("correctness {name}: {e:#}"))),
        }
        let _ = std::fs::remove_file(&path);
        ctx.save();
    }
}

/// Section 2 for one model: generate, load, correctness at shape, capacity, verify cost.
fn model_sections_for(
    ctx: &mut Ctx<'_>,
    source: &Source,
    grid: &cost::Grid,
    scenario: &capacity::Scenario,
    deadline: Deadline,
) {
    let name = source.name();
    let path = match source {
        Source::Generate(_) => ctx.work.join(format!("{name}.gguf")),
        Source::File(p) => p.clone(),
    };
    let mut mr = ModelReport {
        name: name.clone(),
        ..ModelReport::default()
    };
    match source {
        Source::Generate(spec) => {
            eprintln!(
                "{name}: generating {:.0} MB of weights into {} ...",
                spec.weight_bytes() as f64 / 1e6,
                path.display()
            );
            mr.shape = json!({
                "layers": spec.n_layer, "hidden": spec.hidden, "heads": spec.n_head,
                "kv_heads": spec.n_kv_head, "ffn": spec.ffn, "vocab": spec.vocab,
                "weights": format!("{:?}", spec.weights), "q6k_layers": spec.q6k_layers,
                "synthetic": true,
            });
        }
        Source::File(p) => mr.shape = json!({ "file": p, "synthetic": false }),
    }
    let loaded = guarded(|| {
        if let Source::Generate(spec) = source {
            let t = Instant::now();
            mr.file_bytes = write_shaped_gguf(&path, spec)?;
            mr.generate_s = t.elapsed().as_secs_f64();
        } else {
            mr.file_bytes = std::fs::metadata(&path)?.len();
        }
        let (m, load_s) = util::load(&path, ctx.device)?;
        mr.load_s = load_s;
        Ok(m)
    });
    let keep = ctx.args.keep_files || !matches!(source, Source::Generate(_));
    let remove = move |path: &Path| {
        if !keep {
            let _ = std::fs::remove_file(path);
        }
    };
    ctx.report.models.push(mr);
    let idx = ctx.report.models.len() - 1;
    let mut model = match loaded {
        Ok(m) => m,
        Err(e) => {
            ctx.report.errors.push(brief(format!("{name}: {e:#}")));
            remove(&path);
            ctx.save();
            return;
        }
    };
    eprintln!(
        "{name}: generated in {:.1} s, loaded in {:.1} s",
        ctx.report.models[idx].generate_s, ctx.report.models[idx].load_s
    );
    ctx.save();

    // Correctness at this shape.
    if ctx.wants(Section::ModelCorrectness) {
        if deadline.passed() {
            ctx.report
                .stopped_early
                .push(format!("{name} correctness: skipped (budget)"));
        } else {
            eprintln!("{name}: correctness");
            let with_reference = ctx.device != DeviceKind::Cpu && !ctx.args.no_cpu_reference;
            let vocab = model.info().vocab_size;
            let r = guarded(|| {
                let mut reference = if with_reference {
                    Some(util::load(&path, DeviceKind::Cpu)?.0)
                } else {
                    None
                };
                let prompt = tokens(3, 16, vocab);
                let continuation = tokens(4, 7, vocab);
                let plan = correctness::Plan {
                    name: &name,
                    reference_label: if with_reference { "cpu" } else { "none" },
                    prompt: &prompt,
                    greedy_tokens: 8,
                    continuation: &continuation,
                };
                correctness::compare(
                    model.as_mut(),
                    reference.as_mut().map(|r| r.as_mut() as &mut dyn CausalLm),
                    &plan,
                )
            });
            match r {
                Ok(c) => ctx.report.models[idx].correctness = Some(c),
                Err(e) => ctx
                    .report
                    .errors
                    .push(brief(format!("{name} correctness: {e:#}"))),
            }
        }
        ctx.save();
    }

    // Capacity: up to 60 % of what is left of this model's share.
    if ctx.wants(Section::Capacity) {
        if deadline.passed() {
            ctx.report
                .stopped_early
                .push(format!("{name} capacity: skipped (budget)"));
        } else {
            eprintln!("{name}: capacity");
            let cap_deadline = if ctx.wants(Section::Cost) {
                deadline.share(0.6)
            } else {
                deadline
            };
            let r = guarded(|| {
                capacity::run(model.as_mut(), scenario, cap_deadline, &mut |c| {
                    ctx.report.models[idx].capacity = Some(c.clone());
                    ctx.save();
                })
            });
            match r {
                Ok((c, cut)) => {
                    ctx.report.models[idx].capacity = Some(c);
                    ctx.report
                        .stopped_early
                        .extend(cut.into_iter().map(|c| format!("{name} {c} (budget)")));
                }
                Err(e) => ctx
                    .report
                    .errors
                    .push(brief(format!("{name} capacity: {e:#}"))),
            }
        }
        ctx.save();
    }

    // Verify cost grid: the rest of the share.
    if ctx.wants(Section::Cost) {
        if deadline.passed() {
            ctx.report
                .stopped_early
                .push(format!("{name} verify cost: skipped (budget)"));
        } else {
            eprintln!("{name}: verify cost");
            let r = guarded(|| {
                cost::run(model.as_mut(), grid, deadline, &mut |v| {
                    ctx.report.models[idx].verify_cost = Some(v.clone());
                    ctx.save();
                })
            });
            match r {
                Ok((v, cut)) => {
                    if cut {
                        ctx.report.stopped_early.push(format!(
                            "{name} verify cost: {} of {} cells (budget)",
                            v.cells.len(),
                            v.planned_cells
                        ));
                    }
                    ctx.report.models[idx].verify_cost = Some(v);
                }
                Err(e) => ctx
                    .report
                    .errors
                    .push(brief(format!("{name} verify cost: {e:#}"))),
            }
        }
        ctx.save();
    }
    drop(model);
    remove(&path);
}
