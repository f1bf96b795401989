//! Scenario (d) `edge`: the real binaries in separate processes, pinned like separate hardware —
//! the draft node on core 0 (`taskset -c 0`), coordinator and verify node on core 1 — with the
//! draft node reaching the coordinator through the link emulator (in this process). SD
//! (adaptive γ, pipelined drafting) at each RTT against target-only decoding on the verify core
//! (speculation off, γ = 0 through the same path, no link delay).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::inproc::{drive_prompts, http_client, warmup, References};
use super::report::{Column, ConfigResult, PlotSpec, Report, RunRecord, SummaryLine};
use super::{host_info, loadavg, medians, record_run, set_tokens_per_s_ratio, unix_s, Ctx};
use crate::linkemu::{LinkEmulator, LinkProfile};
use crate::procs::free_addr;
use edgespec_specdec::DraftMethod;
use edgespec_testkit::fleet::{AdminApi, FleetWait};

const TOKEN: &str = "bench-admin-token";
const LINK_MBIT: u64 = 20;
const READY_TIMEOUT: Duration = Duration::from_secs(240);

/// A child process that is killed (and reaped) when dropped, whatever happened.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(format!(
                "{} exited ({st}); log tail:\n{}",
                self.name,
                log_tail(&self.log)
            )),
            _ => None,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// The binaries: `--bin-dir`, else the directory of this executable.
fn bin_dir(ctx: &Ctx) -> Result<PathBuf> {
    let dir = match &ctx.opts.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("executable has no directory")?
            .to_path_buf(),
    };
    for b in [
        "edgespec-coordinator",
        "edgespec-verify-node",
        "edgespec-draft-node",
    ] {
        if !dir.join(b).exists() {
            bail!(
                "{} not found in {}: build the node binaries first \
                 (cargo build -p edgespec-coordinator -p edgespec-verify-node \
                 -p edgespec-draft-node, with --release for a release edgespec)",
                b,
                dir.display()
            );
        }
    }
    Ok(dir)
}

fn spawn(
    ctx: &Ctx,
    dir: &Path,
    work: &Path,
    name: &'static str,
    core: u32,
    config: &str,
) -> Result<Proc> {
    let cfg = work.join(format!("{name}.toml"));
    std::fs::write(&cfg, config)?;
    let log = work.join(format!("{name}.log"));
    let out = std::fs::File::create(&log)?;
    let bin = dir.join(name);
    let mut cmd = if ctx.opts.no_pin {
        Command::new(&bin)
    } else {
        let mut c = Command::new("taskset");
        c.arg("-c").arg(core.to_string()).arg(&bin);
        c
    };
    cmd.arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        // This process sized candle's pool for its own (unpinned) CPUs; each pinned child must
        // size its own from its affinity (edgespec_model::configure_cpu_threads).
        .env_remove("CANDLE_NUM_THREADS")
        .env_remove("RAYON_NUM_THREADS")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Proc { name, child, log })
}

/// The benchmark's processes talk over loopback only: plaintext, said explicitly (the nodes'
/// default is mutual TLS).
const PLAINTEXT: &str = "[tls]\nmode = \"plaintext\"\n";

/// One deployment: coordinator + verify node on core 1, draft node on core 0 behind a link.
struct Deployment {
    procs: Vec<Proc>,
    link_stop: CancellationToken,
    draft_http: SocketAddr,
    work: PathBuf,
}

impl Deployment {
    async fn start(ctx: &Ctx, speculation: bool, rtt_ms: u64, method: DraftMethod) -> Result<Self> {
        let dir = bin_dir(ctx)?;
        let work = std::env::temp_dir().join(format!("edgespec-bench-edge-{}", std::process::id()));
        std::fs::create_dir_all(&work)?;
        let (grpc, admin, verify, http) = (free_addr()?, free_addr()?, free_addr()?, free_addr()?);
        let mut procs = Vec::new();
        let link_stop = CancellationToken::new();
        let mut d = Self {
            procs: Vec::new(),
            link_stop: link_stop.clone(),
            draft_http: http,
            work: work.clone(),
        };
        procs.push(spawn(
            ctx,
            &dir,
            &work,
            "edgespec-coordinator",
            1,
            &format!(
                "[grpc]\nlisten = \"{grpc}\"\n[admin]\nlisten = \"{admin}\"\ntoken = \"{TOKEN}\"\n\
                 [policy]\nspeculation_enabled = {speculation}\npipelined = true\n{PLAINTEXT}"
            ),
        )?);
        procs.push(spawn(
            ctx,
            &dir,
            &work,
            "edgespec-verify-node",
            1,
            &format!(
                "[server]\nlisten = \"{verify}\"\nnode_id = \"verify-edge\"\n[model]\npath = {:?}\n\
                 [coordinator]\naddresses = [\"http://{grpc}\"]\n{PLAINTEXT}",
                ctx.models.target.display().to_string()
            ),
        )?);
        d.procs = procs;
        // The link: the draft node dials it, it forwards to the coordinator.
        // Not port 0: the kernel could hand this listener a port that `free_addr` gave a
        // node process which has not bound it yet.
        let listener = tokio::net::TcpListener::bind(free_addr()?).await?;
        let link_addr = listener.local_addr()?;
        let (handle, _control) = LinkEmulator::spawn(
            listener,
            grpc,
            LinkProfile::wan(Duration::from_millis(rtt_ms), LINK_MBIT),
            link_stop.cancelled_owned(),
        )?;
        drop(handle);
        // The draft node refuses to start until the verify fleet is known; wait for it first.
        d.wait(admin, 1, 0).await?;
        // A lookup draft node loads no model: only the target's tokenizer metadata.
        let model = match method {
            DraftMethod::Lookup => {
                format!("tokenizer = {:?}", ctx.models.target.display().to_string())
            }
            _ => format!("path = {:?}", ctx.models.draft.display().to_string()),
        };
        d.procs.push(spawn(
            ctx,
            &dir,
            &work,
            "edgespec-draft-node",
            0,
            &format!(
                "[node]\nid = \"draft-edge\"\n[model]\n{model}\n[http]\nlisten = \"{http}\"\n\
                 [coordinator]\naddress = \"http://{link_addr}\"\n[drafting]\npipeline = true\n\
                 method = \"{method}\"\n{PLAINTEXT}"
            ),
        )?);
        d.wait(admin, 1, 1).await?;
        d.wait_http().await?;
        Ok(d)
    }

    fn check_alive(&mut self) -> Result<()> {
        for p in &mut self.procs {
            if let Some(e) = p.exited() {
                bail!("{e}");
            }
        }
        Ok(())
    }

    async fn wait(&mut self, admin: SocketAddr, verifiers: usize, drafts: usize) -> Result<()> {
        let want = FleetWait {
            poll: Duration::from_millis(200),
            ..FleetWait::new(verifiers, drafts, READY_TIMEOUT)
        };
        AdminApi::http(admin, TOKEN)
            .wait_fleet(want, || self.check_alive())
            .await
            .context("the edge deployment did not come up")
    }

    async fn wait_http(&mut self) -> Result<()> {
        let client = http_client()?;
        let url = format!("http://{}/v1/models", self.draft_http);
        let until = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            self.check_alive()?;
            if client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > until {
                bail!("the draft node's API did not come up within {READY_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn base(&self) -> String {
        format!("http://{}/v1", self.draft_http)
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        // Draft node first, then the verify node and the coordinator; Proc::drop kills and reaps.
        while let Some(p) = self.procs.pop() {
            drop(p);
        }
        self.link_stop.cancel();
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

struct Plan {
    name: String,
    series: String,
    speculation: bool,
    rtt_ms: u64,
    method: DraftMethod,
}

/// Scenario (d).
pub(super) async fn run(ctx: &Ctx) -> Result<Report> {
    let rtts = ctx.opts.rtts_ms.clone().unwrap_or_else(|| vec![0, 20, 50]);
    let mut plans = vec![Plan {
        name: "target-only (verify core)".into(),
        series: "target-only".into(),
        speculation: false,
        rtt_ms: 0,
        method: DraftMethod::Model,
    }];
    let methods = ctx.opts.draft_methods.clone();
    for &r in &rtts {
        for &m in methods.as_deref().unwrap_or(&[DraftMethod::Model]) {
            let series = match methods {
                Some(_) => format!("SD adaptive+pipelined {m}"),
                None => "SD adaptive+pipelined".into(),
            };
            plans.push(Plan {
                name: format!("rtt={r}ms {series}"),
                series,
                speculation: true,
                rtt_ms: r,
                method: m,
            });
        }
    }
    let mut configs: Vec<ConfigResult> = plans
        .iter()
        .map(|p| ConfigResult {
            name: p.name.clone(),
            series: p.series.clone(),
            x: p.rtt_ms as f64,
            params: json!({
                "speculation": p.speculation,
                "adaptive": true,
                "pipelined": p.speculation,
                "rtt_ms": p.rtt_ms,
                "link_mbit": LINK_MBIT,
                "draft_method": p.method.label(),
            }),
            runs: Vec::new(),
            median: BTreeMap::new(),
            ratios: BTreeMap::new(),
        })
        .collect();
    let mut refs = References::new();
    let total = ctx.opts.runs * plans.len();
    for run in 1..=ctx.opts.runs {
        for (i, p) in plans.iter().enumerate() {
            let started = unix_s();
            let load = loadavg();
            let result = async {
                let dep = Deployment::start(ctx, p.speculation, p.rtt_ms, p.method).await?;
                let client = http_client()?;
                let base = dep.base();
                warmup(&client, &base, &ctx.prompts[0]).await?;
                let r = drive_prompts(&client, &base, &ctx.prompts, ctx.max_tokens, 0.0, &mut refs)
                    .await;
                drop(dep);
                r
            }
            .await
            .with_context(|| format!("{} (run {run})", p.name))?;
            let (metrics, detail) = result;
            let step = (run - 1) * plans.len() + i + 1;
            let record = RunRecord {
                run,
                started_unix_s: started,
                loadavg: load,
                metrics,
                detail,
            };
            record_run(&mut configs[i], step, total, record);
        }
    }
    for c in &mut configs {
        c.median = medians(&c.runs);
    }
    if let Some(methods) = &methods {
        return methods_report(ctx, configs, methods, rtts);
    }
    let base = configs[0].clone();
    let mut summary = Vec::new();
    for c in configs.iter_mut() {
        set_tokens_per_s_ratio(c, &base, "target_only");
        if c.params["speculation"] == true {
            let rtt = c.x;
            summary.push(SummaryLine::ratio(
                format!("RTT {rtt} ms: SD (adaptive, pipelined) / target-only on the verify core"),
                c.ratios.get("tokens_per_s_vs_target_only").copied(),
                Some(if rtt <= 20.0 { 1.5 } else { 1.2 }),
            ));
        }
    }
    Ok(Report {
        scenario: "edge".into(),
        created_unix_s: unix_s(),
        host: host_info(),
        params: json!({
            "runs": ctx.opts.runs,
            "max_tokens": ctx.max_tokens,
            "prompts": ctx.prompts.iter().map(|p| &p.id).collect::<Vec<_>>(),
            "target": ctx.models.target,
            "draft": ctx.models.draft,
            "rtts_ms": rtts,
            "link_mbit": LINK_MBIT,
            "pinned": !ctx.opts.no_pin,
            "bin_dir": bin_dir(ctx)?,
        }),
        x_label: "RTT ms".into(),
        baseline: "target-only on the verify core (speculation off, no link delay)".into(),
        configs,
        summary,
        columns: vec![
            Column::new("tokens_per_s", "tok/s", 2),
            Column::new("ratio:tokens_per_s_vs_target_only", "× target-only", 2),
            Column::new("forwards_per_token", "target fwd/token", 3),
            Column::new("acceptance", "acceptance", 2),
            Column::new("gamma_mean", "γ mean", 2),
            Column::new("text_mismatches", "text ≠ ref", 0),
        ],
        plots: vec![PlotSpec::new(
            "edge-tokens-per-s.png",
            "tokens_per_s",
            "tokens/s",
            "Edge–cloud emulation: draft on core 0, verify on core 1",
        )],
        notes: vec![
            "Separate processes (the edgespec-* binaries): draft node pinned to core 0, coordinator and verify node to core 1 (taskset), so the verify core does only target work.".into(),
            format!("The draft node dials the coordinator through the link emulator of the bench process (half the RTT each way, {LINK_MBIT} Mbit/s). The target-only baseline runs with speculation off (γ = 0 through the same path) and no link delay: the best a verify core does alone."),
            "Each configuration starts fresh processes per run (one warm-up request, then the prompts one at a time); every process is killed at the end, also on error.".into(),
        ],
    })
}

/// The report of `edge --draft-methods`: SD with each method against target-only on the verify
/// core, per prompt kind.
fn methods_report(
    ctx: &Ctx,
    mut configs: Vec<ConfigResult>,
    methods: &[DraftMethod],
    rtts: Vec<u64>,
) -> Result<Report> {
    let kinds = super::methods::kinds(&ctx.prompts);
    let summary = super::methods::compare(&mut configs, &kinds, "SD");
    Ok(Report {
        scenario: "edge".into(),
        created_unix_s: unix_s(),
        host: host_info(),
        params: json!({
            "runs": ctx.opts.runs,
            "max_tokens": ctx.max_tokens,
            "prompts": ctx.prompts.iter().map(|p| &p.id).collect::<Vec<_>>(),
            "prompt_set": ctx.opts.prompt_set,
            "target": ctx.models.target,
            "draft": ctx.models.draft,
            "draft_methods": methods.iter().map(|m| m.label()).collect::<Vec<_>>(),
            "rtts_ms": rtts,
            "link_mbit": LINK_MBIT,
            "pinned": !ctx.opts.no_pin,
            "bin_dir": bin_dir(ctx)?,
        }),
        x_label: "RTT ms".into(),
        baseline: "target-only on the verify core (speculation off, no link delay), per prompt kind too".into(),
        configs,
        summary,
        columns: super::methods::columns(&kinds),
        plots: vec![PlotSpec::new(
            "edge-methods-tokens-per-s.png",
            "tokens_per_s",
            "tokens/s",
            "Edge–cloud emulation by drafting method",
        )],
        notes: super::methods::notes(&format!(
            "Separate processes: draft node pinned to core 0, coordinator and verify node to core 1 (taskset); the draft node dials the coordinator through the link emulator ({LINK_MBIT} Mbit/s, half the RTT each way) and pipelines model drafting. A `lookup` draft node loads no draft model (tokenizer from the target's GGUF)."
        )),
    })
}
