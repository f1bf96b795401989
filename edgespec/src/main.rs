//! `edgespec`: the operator CLI — a local cluster in one command, model fetch, link emulator,
//! benchmarks, and `admin` for a running fleet's coordinator.
#![forbid(unsafe_code)]

mod admin_cli;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use edgespec::client::{stream_chat, ChatRequest};
use edgespec::cluster::{
    ClusterOptions, DraftSpec, LocalCluster, PolicyOverrides, LOCAL_ADMIN_TOKEN,
};
use edgespec::linkemu::{LinkEmulator, LinkProfile};
use edgespec_model::fetch::{default_cache_dir, ensure_model, KnownModel};
use edgespec_specdec::DraftMethod;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "edgespec",
    version,
    about = "Speculative decoding split across a network"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a local cluster with the real models, answer one prompt, print its statistics.
    Demo(DemoArgs),
    /// Start a local cluster and keep it running for trying the API by hand (Ctrl-C stops it).
    Up(UpArgs),
    /// Manage the cached model files.
    Models {
        #[command(subcommand)]
        cmd: ModelsCmd,
    },
    /// Run the link emulator: a TCP proxy adding delay, jitter and a bandwidth limit.
    Link(LinkArgs),
    /// Run a benchmark scenario (docs/BENCHMARKS.md): JSON, PNG plots and a markdown table.
    Bench(BenchArgs),
    /// Operate a running fleet through its coordinator's admin API (token: EDGESPEC_ADMIN_TOKEN
    /// or --token-file).
    Admin(admin_cli::AdminArgs),
}

#[derive(clap::Args, Debug)]
struct ModelArgs {
    /// Target model GGUF (default: the cached Qwen2.5-Coder-1.5B, fetched if missing).
    #[arg(long)]
    target: Option<PathBuf>,
    /// Draft model GGUF (default: the cached Qwen2.5-Coder-0.5B, fetched if missing; not
    /// loaded with `--draft lookup`).
    #[arg(long)]
    draft_model: Option<PathBuf>,
    /// How the draft node drafts: `model` (the draft model), `lookup` (prompt lookup, no draft
    /// model: the continuation of an earlier occurrence of the last tokens in the prompt or
    /// the answer so far) or `hybrid` (lookup where it matches, else the model).
    #[arg(long, default_value = "model", value_parser = parse_method)]
    draft: DraftMethod,
    /// Fix γ (draft tokens per round) instead of letting the controller choose.
    #[arg(long)]
    gamma: Option<u32>,
    /// Draft the next block while the current one is being verified.
    #[arg(long)]
    pipelined: bool,
}

fn parse_method(s: &str) -> Result<DraftMethod, String> {
    s.parse()
}

#[derive(clap::Args, Debug)]
struct DemoArgs {
    #[command(flatten)]
    models: ModelArgs,
    /// The prompt (a chat user message; default: a code question with `--draft model`, a code
    /// edit quoting its input with `lookup` and `hybrid`).
    #[arg(long)]
    prompt: Option<String>,
    /// Completion budget.
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
}

#[derive(clap::Args, Debug)]
struct UpArgs {
    #[command(flatten)]
    models: ModelArgs,
    /// Address of the draft node's OpenAI-compatible API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
}

#[derive(Subcommand, Debug)]
enum ModelsCmd {
    /// Download, verify and cache the pinned models (a no-op for the ones already cached).
    Fetch,
    /// Print where the cached models are.
    Path,
}

#[derive(clap::Args, Debug)]
struct LinkArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Address to forward to.
    #[arg(long)]
    upstream: SocketAddr,
    /// Round-trip time to add (split evenly between directions), e.g. "50ms".
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    rtt: Duration,
    /// Bandwidth limit per direction in Mbit/s (0 = unlimited).
    #[arg(long, default_value_t = 0.0)]
    mbit: f64,
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Scenario: single (a), rtt (b), server (c), edge (d), wire (bytes on the draft link),
    /// chaos (a fault soak on synthetic models) or load (a ramp of concurrent streams on
    /// synthetic models).
    #[arg(value_parser = ["single", "rtt", "server", "edge", "wire", "chaos", "load"])]
    scenario: String,
    /// chaos: how long faults are injected.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    duration: std::time::Duration,
    /// chaos: seed of the fault schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Measured runs per configuration (medians over them; use ≥ 3 for reported numbers).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Output directory (JSON, markdown table, PNG plots).
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Number of prompts, picked round-robin over kinds (default: 12 for single, 4 otherwise).
    #[arg(long)]
    prompts: Option<usize>,
    /// Completion budget per request (default: 128; server: 64).
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Prompt file, JSONL with id, kind, prompt (default: the embedded --prompt-set).
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Embedded prompts: dev (bench/prompts/dev-prompts.jsonl), grounded (input-grounded
    /// edits, extraction and JSON transforms: bench/prompts/grounded-prompts.jsonl) or mixed
    /// (grounded first, then dev).
    #[arg(long, default_value = "dev", value_parser = edgespec::bench::PromptSet::parse)]
    prompt_set: edgespec::bench::PromptSet,
    /// single / edge: compare these drafting methods (comma-separated: model,lookup,hybrid),
    /// each with adaptive γ, against target-only, with ratios per prompt kind.
    #[arg(long, value_delimiter = ',', value_parser = parse_method)]
    draft_methods: Option<Vec<DraftMethod>>,
    /// Target model GGUF (default: the cached Qwen2.5-Coder-1.5B).
    #[arg(long)]
    target: Option<PathBuf>,
    /// Draft model GGUF (default: the cached Qwen2.5-Coder-0.5B).
    #[arg(long)]
    draft: Option<PathBuf>,
    /// rtt / edge: RTTs in ms, comma-separated (default: 0,20,50,100 / 0,20,50).
    #[arg(long, value_delimiter = ',')]
    rtts: Option<Vec<u64>>,
    /// server: stream counts, comma-separated (default: 1,4,8,16); load: the ramp's steps of
    /// concurrent streams (default: 50,200,500,1000).
    #[arg(long, value_delimiter = ',')]
    streams: Option<Vec<usize>>,
    /// edge: directory of the edgespec-* binaries (default: beside this executable).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// edge: do not pin the processes with taskset.
    #[arg(long)]
    no_pin: bool,
    /// Suffix of the output file names (e.g. smoke).
    #[arg(long)]
    tag: Option<String>,
    /// Skip the PNG plots.
    #[arg(long)]
    no_plots: bool,
}

impl BenchArgs {
    fn into_options(self) -> edgespec::bench::BenchOptions {
        use edgespec::bench::Scenario;
        edgespec::bench::BenchOptions {
            scenario: match self.scenario.as_str() {
                "single" => Scenario::Single,
                "rtt" => Scenario::Rtt,
                "server" => Scenario::Server,
                "wire" => Scenario::Wire,
                "load" => Scenario::Load,
                _ => Scenario::Edge,
            },
            runs: self.runs,
            out: self.out,
            prompts: self.prompts,
            max_tokens: self.max_tokens,
            prompt_file: self.prompt_file,
            prompt_set: self.prompt_set,
            draft_methods: self.draft_methods,
            target: self.target,
            draft: self.draft,
            rtts_ms: self.rtts,
            streams: self.streams,
            bin_dir: self.bin_dir,
            no_pin: self.no_pin,
            tag: self.tag,
            no_plots: self.no_plots,
        }
    }
}

fn main() -> Result<()> {
    // Before any thread exists: size candle's pool to this process's CPU affinity.
    edgespec_model::configure_cpu_threads();
    edgespec_runtime::init_tracing("warn", edgespec_runtime::LogOutput::Stderr);
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        match cli.cmd {
            Command::Demo(a) => demo(a).await,
            Command::Up(a) => up(a).await,
            Command::Models { cmd } => models(cmd),
            Command::Link(a) => link(a).await,
            Command::Bench(a) if a.scenario == "chaos" => chaos(a).await,
            Command::Bench(a) => edgespec::bench::run(a.into_options()).await.map(|_| ()),
            Command::Admin(a) => admin_cli::run(a, &mut std::io::stdout().lock()).await,
        }
    })
}

fn models(cmd: ModelsCmd) -> Result<()> {
    let dir = default_cache_dir();
    for m in [
        KnownModel::Qwen15bTarget,
        KnownModel::Qwen05bDraft,
        KnownModel::SmolLm135m,
    ] {
        match cmd {
            ModelsCmd::Fetch => {
                let p = ensure_model(m, &dir, true)?;
                println!("{}", p.display());
            }
            ModelsCmd::Path => println!("{}", dir.join(m.file_name()).display()),
        }
    }
    Ok(())
}

/// Resolves the model paths (fetching the defaults when missing) into cluster options.
async fn cluster_options(m: &ModelArgs) -> Result<ClusterOptions> {
    let dir = default_cache_dir();
    let target = match &m.target {
        Some(p) => p.clone(),
        None => fetch(KnownModel::Qwen15bTarget, dir.clone()).await?,
    };
    let draft = match (&m.draft_model, m.draft) {
        (Some(p), _) => p.clone(),
        // A lookup draft node loads no draft model: nothing to fetch.
        (None, DraftMethod::Lookup) => PathBuf::new(),
        (None, _) => fetch(KnownModel::Qwen05bDraft, dir).await?,
    };
    let mut opts = ClusterOptions::new(target, draft);
    opts.drafts = vec![DraftSpec {
        pipelined: m.pipelined,
        ..DraftSpec::with_method(m.draft)
    }];
    opts.policy = PolicyOverrides {
        gamma_bounds: m.gamma.map(|g| (g, g)),
        speculation_off: m.gamma == Some(0),
        pipelined: m.pipelined,
        bandwidth_probes_off: false,
    };
    Ok(opts)
}

async fn fetch(m: KnownModel, dir: PathBuf) -> Result<PathBuf> {
    tokio::task::spawn_blocking(move || ensure_model(m, &dir, true))
        .await?
        .with_context(|| format!("fetching {}", m.file_name()))
}

/// The demo's prompt with `--draft model`: the draft model predicts code well.
const MODEL_DEMO_PROMPT: &str =
    "Write a Python function that returns the n-th Fibonacci number iteratively.";

/// The demo's prompt with `--draft lookup` / `hybrid`: an edit whose answer repeats its input.
const LOOKUP_DEMO_PROMPT: &str = "Rename the variable `tmp` to `total` in this Python function. \
Answer with the whole updated function only.\n\n```python\ndef order_value(items, discount):\n    \
tmp = 0\n    for item in items:\n        tmp += item.price * item.quantity\n    if discount:\n        \
tmp = tmp * (1 - discount)\n    return round(tmp, 2)\n```";

async fn demo(a: DemoArgs) -> Result<()> {
    let opts = cluster_options(&a.models).await?;
    let method = a.models.draft;
    let prompt = a.prompt.clone().unwrap_or_else(|| {
        match method {
            DraftMethod::Model => MODEL_DEMO_PROMPT,
            DraftMethod::Lookup | DraftMethod::Hybrid => LOOKUP_DEMO_PROMPT,
        }
        .to_string()
    });
    eprintln!(
        "starting coordinator, verify node (target) and draft node ({}) on loopback ...",
        match method {
            DraftMethod::Model => "draft model",
            DraftMethod::Lookup => "prompt lookup, no draft model",
            DraftMethod::Hybrid => "prompt lookup, else the draft model",
        }
    );
    let cluster = LocalCluster::start(opts).await?;
    eprintln!(
        "cluster up: draft API {}  coordinator gRPC {}  admin {}",
        cluster.openai_base(),
        cluster.coordinator_grpc,
        cluster.admin_http
    );
    println!("\n>>> {prompt}\n");
    let req = ChatRequest {
        prompt,
        max_tokens: a.max_tokens,
        temperature: 0.0,
        seed: None,
        top_k: None,
        ..Default::default()
    };
    let client = reqwest::Client::new();
    let result = stream_chat(&client, &cluster.openai_base(), &req, |t| {
        print!("{t}");
        let _ = std::io::stdout().flush();
    })
    .await;
    println!();
    let stop = cluster.stop().await;
    let out = result?;
    stop?;
    println!("\n--- stats ---");
    println!(
        "completion tokens : {} (prompt {} tokens, finish: {})",
        out.completion_tokens,
        out.prompt_tokens,
        out.finish_reason.as_deref().unwrap_or("?")
    );
    println!(
        "throughput        : {:.1} tokens/s over {:.2} s (first token after {:.0} ms)",
        out.tokens_per_s(),
        out.elapsed.as_secs_f64(),
        out.first_token.unwrap_or_default().as_secs_f64() * 1e3
    );
    println!("draft method      : {method}");
    if let Some(s) = &out.stats {
        let f = |k: &str| s.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        println!(
            "acceptance        : {:.1}% ({} of {} drafted tokens accepted)",
            100.0 * f("acceptance_rate"),
            f("accepted"),
            f("drafted")
        );
        println!("gamma (mean)      : {:.2}", f("gamma_mean"));
        println!("rounds            : {}", f("rounds"));
        println!(
            "target forwards   : {:.3} per committed token",
            f("target_forwards") / (out.completion_tokens.max(1) as f64)
        );
    }
    Ok(())
}

async fn up(a: UpArgs) -> Result<()> {
    let mut opts = cluster_options(&a.models).await?;
    opts.http_listen = a.listen;
    let cluster = LocalCluster::start(opts).await?;
    let method = a.models.draft;
    println!("edgespec local cluster is up (Ctrl-C stops it)");
    println!("  draft method     : {method} (per request: \"draft_method\")");
    println!("  OpenAI API       : {}", cluster.openai_base());
    println!("  coordinator gRPC : {}", cluster.coordinator_grpc);
    println!(
        "  admin HTTP       : http://{}  (bearer token: {LOCAL_ADMIN_TOKEN})",
        cluster.admin_http
    );
    println!(
        "try: curl -s {}/chat/completions -H 'content-type: application/json' \\\n  -d '{{\"model\":\"edgespec\",\"messages\":[{{\"role\":\"user\",\"content\":\"Say hi\"}}],\"max_tokens\":32}}'",
        cluster.openai_base()
    );
    tokio::signal::ctrl_c().await?;
    eprintln!("stopping ...");
    cluster.stop().await
}

async fn link(a: LinkArgs) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(a.listen).await?;
    let bw = (a.mbit > 0.0).then_some((a.mbit * 1e6) as u64);
    let profile = LinkProfile {
        one_way_delay: a.rtt / 2,
        jitter: Duration::ZERO,
        bandwidth_bits_per_s: bw,
    };
    let shutdown = CancellationToken::new();
    let (handle, _control) = LinkEmulator::spawn(
        listener,
        a.upstream,
        profile,
        shutdown.clone().cancelled_owned(),
    )?;
    eprintln!(
        "link emulator {} -> {} (rtt {:?}, {} Mbit/s)",
        a.listen, a.upstream, a.rtt, a.mbit
    );
    tokio::signal::ctrl_c().await?;
    shutdown.cancel();
    handle.await?;
    Ok(())
}

/// `edgespec bench chaos`: the fault soak; prints the table and writes it to `<out>/chaos.md`.
async fn chaos(a: BenchArgs) -> Result<()> {
    let opts = edgespec::chaos::ChaosOptions {
        duration: a.duration,
        seed: a.seed,
        streams: a
            .streams
            .as_ref()
            .and_then(|s| s.first().copied())
            .unwrap_or(64),
        max_tokens: a.max_tokens.unwrap_or(24),
        dir: std::env::temp_dir().join(format!("edgespec-chaos-{}", std::process::id())),
    };
    let report = edgespec::chaos::run(&opts).await?;
    let table = report.markdown(&opts);
    println!("{table}");
    std::fs::create_dir_all(&a.out)?;
    let name = match &a.tag {
        Some(t) => format!("chaos-{t}.md"),
        None => "chaos.md".into(),
    };
    std::fs::write(a.out.join(name), &table)?;
    anyhow::ensure!(
        report.mismatched == 0,
        "{} answers differ from the reference",
        report.mismatched
    );
    Ok(())
}
