//! Scenario (c) `server`: one verify node (real target) behind a coordinator, serving N
//! concurrent streams whose drafts are **replayed** from recorded real draft-model output, so
//! drafting costs no CPU; against the same node doing batched target-only decoding (γ = 0 blocks)
//! of the same N streams.
//!
//! Recording (once per prompt set, cached in `<out>/server-recording.json`): the target's greedy
//! continuation T of each prompt, and the draft model's **teacher-forced** greedy prediction at
//! every position of T (`pred[j]` = the draft's argmax after prompt + T[..j]). A replayed block at
//! committed length prompt + j is `pred[j..j+γ]`. Under greedy verification this accepts exactly
//! as many tokens as the real draft model drafting from that prefix would: while the real draft
//! agrees with T its own continuation *is* T's prefix, so its next prediction is `pred[..]`; at the
//! first disagreement both are rejected at the same position, and what follows is never looked
//! at. So replay has a faithful draft for every committed prefix along the target's path. If the
//! served output ever leaves T (a numeric near-tie), that stream continues with γ = 0 and the
//! report counts it (`off_path_streams`).
//!
//! The bench process drives the coordinator's `Drafts` gRPC stream directly with these blocks,
//! through the session driver of the coordinator's own tests (`edgespec_testkit::scripted`).

use edgespec_runtime::tls::TlsSettings;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use edgespec_model::forward::load_gguf;
use edgespec_model::{ChatMessage, DeviceKind, SeqRequest, TextTokenizer};
use edgespec_proto::domain::ErrorCode;
use edgespec_specdec::argmax;
use edgespec_testkit::fleet::{AdminApi, FleetWait};
use edgespec_testkit::harness::Running;
use edgespec_testkit::reference::greedy_continuation;
use edgespec_testkit::scripted::{DraftClient, Drafter, SessionScript};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::report::{Column, ConfigResult, PlotSpec, Report, RunRecord, SummaryLine};
use super::{host_info, loadavg, medians, set_tokens_per_s_ratio, unix_s, Ctx};

/// Draft seconds per token the replaying client reports (drafting is free here).
const REPLAY_DRAFT_S_PER_TOKEN: f32 = edgespec_testkit::scripted::DRAFT_S_PER_TOKEN;
const ADMIN_TOKEN: &str = "bench-admin-token";

/// One prompt's recording.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Recorded {
    id: String,
    prompt_tokens: Vec<u32>,
    /// The target's greedy continuation (ends at eos or the budget).
    target: Vec<u32>,
    /// `pred[j]`: the draft's greedy prediction after prompt + target[..j]; `target.len() + 1`.
    pred: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Recording {
    target_model: String,
    target_bytes: u64,
    draft_model: String,
    draft_bytes: u64,
    max_tokens: u32,
    prompts: Vec<Recorded>,
    /// Greedy agreement draft vs target over all positions (teacher-forced).
    agreement: f64,
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

/// Records (or loads the cached) target paths and teacher-forced draft predictions.
async fn recording(ctx: &Ctx) -> Result<Recording> {
    let path = ctx.opts.out.join("server-recording.json");
    let (t, d) = (&ctx.models.target, &ctx.models.draft);
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(r) = serde_json::from_str::<Recording>(&text) {
            let ids: Vec<&String> = r.prompts.iter().map(|p| &p.id).collect();
            let want: Vec<&String> = ctx.prompts.iter().map(|p| &p.id).collect();
            if r.max_tokens == ctx.max_tokens
                && ids == want
                && r.target_model == t.display().to_string()
                && r.draft_model == d.display().to_string()
                && r.target_bytes == file_len(t)
                && r.draft_bytes == file_len(d)
            {
                eprintln!("using the recorded drafts in {}", path.display());
                return Ok(r);
            }
        }
    }
    eprintln!("recording target paths and teacher-forced draft predictions ...");
    let (t, d) = (t.clone(), d.clone());
    let prompts = ctx.prompts.clone();
    let max = ctx.max_tokens as usize;
    let rec = tokio::task::spawn_blocking(move || -> Result<Recording> {
        let tok = TextTokenizer::from_gguf(&t).context("target tokenizer")?;
        let eos = tok.eos_token_ids().to_vec();
        let mut target = load_gguf(&t, DeviceKind::Cpu).context("loading the target")?;
        let mut out = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let rendered = tok.apply_chat_template(&[ChatMessage::new("user", &p.prompt)], true);
            let prompt = tok.encode(&rendered)?;
            let path = greedy_continuation(target.as_mut(), i as u64 + 1, &prompt, max, &eos)?;
            out.push(Recorded {
                id: p.id.clone(),
                prompt_tokens: prompt,
                target: path,
                pred: Vec::new(),
            });
        }
        drop(target);
        let mut draft = load_gguf(&d, DeviceKind::Cpu).context("loading the draft")?;
        let (mut agree, mut total) = (0usize, 0usize);
        for (i, r) in out.iter_mut().enumerate() {
            let mut tokens = r.prompt_tokens.clone();
            tokens.extend_from_slice(&r.target);
            let rows = r.target.len() + 1;
            let sid = 1000 + i as u64;
            let l = draft.forward_batch(&[SeqRequest {
                session: sid,
                start: 0,
                tokens,
                logits_for_last: rows,
            }])?;
            draft.release(sid);
            r.pred = (0..l[0].rows).map(|k| argmax(l[0].row(k))).collect();
            for (j, t) in r.target.iter().enumerate() {
                total += 1;
                agree += usize::from(r.pred[j] == *t);
            }
        }
        Ok(Recording {
            target_model: t.display().to_string(),
            target_bytes: file_len(&t),
            draft_model: d.display().to_string(),
            draft_bytes: file_len(&d),
            max_tokens: max as u32,
            prompts: out,
            agreement: agree as f64 / total.max(1) as f64,
        })
    })
    .await??;
    std::fs::write(&path, serde_json::to_string(&rec)?)?;
    eprintln!(
        "recorded {} prompts (teacher-forced draft/target agreement {:.2}) into {}",
        rec.prompts.len(),
        rec.agreement,
        path.display()
    );
    Ok(rec)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    TargetOnly,
    Fixed(u32),
    Adaptive,
}

impl Mode {
    fn series(self) -> String {
        match self {
            Mode::TargetOnly => "target-only".into(),
            Mode::Fixed(g) => format!("SD replay γ={g}"),
            Mode::Adaptive => "SD replay adaptive".into(),
        }
    }
}

#[derive(Debug, Default, Clone, Serialize)]
struct StreamStats {
    id: String,
    generated: usize,
    rounds: usize,
    drafted: usize,
    accepted: usize,
    resyncs: usize,
    retries: usize,
    off_path: bool,
    seconds: f64,
}

static SESSION: AtomicU64 = AtomicU64::new(1);

/// Replayed drafts: `pred[j..j + γ]` at `j` generated tokens, while the served output follows the
/// recorded target path; nothing once it left it (a numeric near-tie).
struct Replay<'a> {
    rec: &'a Recorded,
    off_path: bool,
}

impl Replay<'_> {
    /// Notes whether `committed` has left the recorded path.
    fn track(&mut self, committed: &[u32]) {
        let generated = &committed[self.rec.prompt_tokens.len()..];
        if self.rec.target.get(..generated.len()) != Some(generated) {
            self.off_path = true;
        }
    }
}

impl Drafter for Replay<'_> {
    fn draft(&mut self, committed: &[u32], gamma: usize) -> Vec<u32> {
        self.track(committed);
        let j = committed.len() - self.rec.prompt_tokens.len();
        if self.off_path || j >= self.rec.pred.len() {
            return Vec::new();
        }
        self.rec.pred[j..(j + gamma).min(self.rec.pred.len())].to_vec()
    }
}

/// Drives one session to its recorded end (or the budget) with replayed drafts.
async fn drive(
    client: &DraftClient,
    rec: &Recorded,
    max_new: usize,
    mode: Mode,
    eos: &[u32],
) -> Result<StreamStats> {
    let sid = SESSION.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let script = SessionScript {
        stop_tokens: eos.to_vec(),
        fixed_gamma: match mode {
            Mode::TargetOnly => Some(0),
            Mode::Fixed(g) => Some(g),
            Mode::Adaptive => None,
        },
        max_retries: 5000,
        answer_timeout: Duration::from_secs(120),
        ..SessionScript::with_prompt(sid, rec.prompt_tokens.clone(), max_new)
    };
    let mut replay = Replay {
        rec,
        off_path: false,
    };
    let report = client.drive(script, &mut replay).await?;
    replay.track(&report.tokens);
    Ok(StreamStats {
        id: rec.id.clone(),
        generated: report.tokens.len() - rec.prompt_tokens.len(),
        rounds: report.rounds,
        drafted: report.drafted,
        accepted: report.accepted,
        resyncs: report.count(ErrorCode::ResyncNeeded),
        retries: report.count(ErrorCode::Overloaded) + report.count(ErrorCode::Unavailable),
        off_path: replay.off_path,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Verify calls the coordinator has made (sum over its `batch_sessions` histogram).
async fn verify_calls(http: &reqwest::Client, admin: std::net::SocketAddr) -> Result<f64> {
    let text = http
        .get(format!("http://{admin}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    text.lines()
        .find(|l| l.starts_with("edgespec_coordinator_batch_sessions_count"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no edgespec_coordinator_batch_sessions_count in /metrics"))
}

/// The coordinator and the verify node serving every measurement.
struct Node {
    servers: Vec<Running<()>>,
    grpc: std::net::SocketAddr,
    admin: std::net::SocketAddr,
}

impl Node {
    async fn start(target: &Path) -> Result<Self> {
        let mut cs = edgespec_coordinator::Settings::for_tests();
        cs.admin.token = ADMIN_TOKEN.into();
        // A 16-stream batch on a loaded 2-core CPU can take seconds; this is not a failover test.
        cs.verify.timeout = Duration::from_secs(120);
        let app = edgespec_coordinator::App::build(cs).await?;
        let (grpc, admin) = (app.grpc_addr(), app.http_addr());
        let mut node = Self {
            servers: vec![Running::spawn(|shutdown| async move {
                if let Err(e) = app.run(shutdown).await {
                    eprintln!("coordinator: {e}");
                }
            })],
            grpc,
            admin,
        };
        let mut vs = edgespec_verify_node::Settings::default();
        vs.server.listen = ([127, 0, 0, 1], 0).into();
        vs.server.node_id = "verify-bench".into();
        vs.model.path = target.to_path_buf();
        vs.coordinator.addresses = vec![format!("http://{grpc}")];
        vs.tls = TlsSettings::plaintext();
        let app = edgespec_verify_node::App::build(vs)
            .await
            .context("starting the verify node")?;
        node.servers.push(Running::spawn(|shutdown| async move {
            if let Err(e) = app.run(shutdown).await {
                eprintln!("verify node: {e}");
            }
        }));
        let registered = AdminApi::http(admin, ADMIN_TOKEN)
            .wait_fleet(FleetWait::new(1, 0, Duration::from_secs(120)), || Ok(()))
            .await;
        if let Err(e) = registered {
            node.shutdown().await;
            return Err(e.context("the verify node did not register"));
        }
        Ok(node)
    }

    async fn shutdown(self) {
        for s in &self.servers {
            s.shutdown();
        }
        for mut s in self.servers {
            let _ = tokio::time::timeout(Duration::from_secs(60), s.finished()).await;
        }
    }
}

/// One measurement of N concurrent streams with the same prompt mix for every N: stream i
/// replays prompt (i + r) mod P, for every rotation r = 0..P when N is not a multiple of P (so
/// N = 1 measures every prompt once, not only the first), and once when it is. Tokens and wall
/// times add up over the rotations.
async fn measure(
    node: &Node,
    fingerprint: &str,
    rec: &Recording,
    n: usize,
    mode: Mode,
    max_new: usize,
    eos: &[u32],
) -> Result<(BTreeMap<String, f64>, Value)> {
    let p = rec.prompts.len().max(1);
    let rotations = if n % p == 0 { 1 } else { p };
    let mut streams = Vec::new();
    let (mut secs, mut calls) = (0.0, 0.0);
    for r in 0..rotations {
        let streams_of = Streams { n, offset: r, mode };
        let (s, t, c) = measure_once(node, fingerprint, rec, streams_of, max_new, eos).await?;
        streams.extend(s);
        secs += t;
        calls += c;
    }
    Ok(summarise(&streams, secs, calls))
}

/// Which streams one rotation runs.
#[derive(Debug, Clone, Copy)]
struct Streams {
    /// How many, all at once.
    n: usize,
    /// Stream i replays prompt (i + offset) mod P.
    offset: usize,
    /// Target-only or SD.
    mode: Mode,
}

/// One rotation: the streams' stats, the wall time until the last finished, and the
/// coordinator's verify calls meanwhile.
async fn measure_once(
    node: &Node,
    fingerprint: &str,
    rec: &Recording,
    streams_of: Streams,
    max_new: usize,
    eos: &[u32],
) -> Result<(Vec<StreamStats>, f64, f64)> {
    let Streams { n, offset, mode } = streams_of;
    let http = reqwest::Client::new();
    let client = DraftClient::connect_with(
        &format!("http://{}", node.grpc),
        "bench-replay",
        fingerprint,
    )
    .await
    .map_err(|e| anyhow!("connecting to the coordinator: {e}"))?;
    let calls0 = verify_calls(&http, node.admin).await?;
    let started = Instant::now();
    let futs = (0..n).map(|i| {
        let r = &rec.prompts[(i + offset) % rec.prompts.len()];
        drive(&client, r, max_new, mode, eos)
    });
    let streams: Vec<StreamStats> = futures::future::try_join_all(futs).await?;
    let secs = started.elapsed().as_secs_f64();
    let calls = verify_calls(&http, node.admin).await? - calls0;
    Ok((streams, secs, calls))
}

/// The figures of a measurement.
fn summarise(streams: &[StreamStats], secs: f64, calls: f64) -> (BTreeMap<String, f64>, Value) {
    let tokens: usize = streams.iter().map(|s| s.generated).sum();
    let drafted: usize = streams.iter().map(|s| s.drafted).sum();
    let accepted: usize = streams.iter().map(|s| s.accepted).sum();
    let rounds: usize = streams.iter().map(|s| s.rounds).sum();
    let mut m = BTreeMap::new();
    m.insert("tokens".into(), tokens as f64);
    m.insert("seconds".into(), secs);
    m.insert("tokens_per_s".into(), tokens as f64 / secs.max(1e-9));
    m.insert("verify_calls".into(), calls);
    m.insert("forwards_per_token".into(), calls / (tokens.max(1) as f64));
    m.insert(
        "session_rounds_per_token".into(),
        rounds as f64 / tokens.max(1) as f64,
    );
    // With verification free (a γ+1-row forward costing what a 1-row one does) and drafting
    // free, SD could at best commit tokens/round per forward: the ceiling this prompt mix and
    // acceptance allow over target-only, whatever the hardware.
    m.insert(
        "free_verify_ceiling".into(),
        tokens as f64 / rounds.max(1) as f64,
    );
    if drafted > 0 {
        m.insert("acceptance".into(), accepted as f64 / drafted as f64);
        m.insert("gamma_mean".into(), drafted as f64 / rounds.max(1) as f64);
    }
    m.insert(
        "off_path_streams".into(),
        streams.iter().filter(|s| s.off_path).count() as f64,
    );
    (m, json!(streams))
}

/// Scenario (c).
pub(super) async fn run(ctx: &Ctx) -> Result<Report> {
    let ns = ctx
        .opts
        .streams
        .clone()
        .unwrap_or_else(|| vec![1, 4, 8, 16]);
    let rec = recording(ctx).await?;
    let tok = TextTokenizer::from_gguf(&ctx.models.target)?;
    let fingerprint = tok.fingerprint().to_string();
    let eos = tok.eos_token_ids().to_vec();
    let max_new = ctx.max_tokens as usize;
    let modes = [Mode::TargetOnly, Mode::Fixed(4), Mode::Adaptive];
    let mut configs: Vec<ConfigResult> = Vec::new();
    for &n in &ns {
        for m in modes {
            configs.push(ConfigResult {
                name: format!("N={n} {}", m.series()),
                series: m.series(),
                x: n as f64,
                params: json!({
                    "streams": n,
                    "mode": m.series(),
                    "draft_s_per_token_reported": REPLAY_DRAFT_S_PER_TOKEN,
                }),
                runs: Vec::new(),
                median: BTreeMap::new(),
                ratios: BTreeMap::new(),
            });
        }
    }
    let node = Node::start(&ctx.models.target).await?;
    let result = async {
        // Warm-up: one short target-only stream.
        measure(&node, &fingerprint, &rec, 1, Mode::TargetOnly, 4, &eos).await?;
        let total = ctx.opts.runs * configs.len();
        let mut k = 0;
        for run in 1..=ctx.opts.runs {
            for (ni, &n) in ns.iter().enumerate() {
                for (mi, &mode) in modes.iter().enumerate() {
                    k += 1;
                    let started = unix_s();
                    let load = loadavg();
                    let (metrics, detail) =
                        measure(&node, &fingerprint, &rec, n, mode, max_new, &eos)
                            .await
                            .with_context(|| format!("N={n} {} (run {run})", mode.series()))?;
                    eprintln!(
                        "[{k}/{total}] run {run} N={n:<2} {:<20} {:>7.2} tok/s  verify calls/tok {:.3}  acc {}",
                        mode.series(),
                        metrics["tokens_per_s"],
                        metrics["forwards_per_token"],
                        metrics
                            .get("acceptance")
                            .map_or("–".into(), |a| format!("{a:.2}")),
                    );
                    configs[ni * modes.len() + mi].runs.push(RunRecord {
                        run,
                        started_unix_s: started,
                        loadavg: load,
                        metrics,
                        detail,
                    });
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    node.shutdown().await;
    result?;
    for c in &mut configs {
        c.median = medians(&c.runs);
    }
    let mut summary = Vec::new();
    for (ni, &n) in ns.iter().enumerate() {
        let base = configs[ni * modes.len()].clone();
        for c in configs[ni * modes.len()..(ni + 1) * modes.len()].iter_mut() {
            set_tokens_per_s_ratio(c, &base, "target_only");
            if c.series != base.series {
                summary.push(SummaryLine::ratio(
                    format!(
                        "N = {n}: {} / batched target-only committed tokens/s",
                        c.series
                    ),
                    c.ratios.get("tokens_per_s_vs_target_only").copied(),
                    (n == 8).then_some(2.0),
                ));
            }
        }
    }
    Ok(Report {
        scenario: "server".into(),
        created_unix_s: unix_s(),
        host: host_info(),
        params: json!({
            "runs": ctx.opts.runs,
            "max_tokens": ctx.max_tokens,
            "prompts": ctx.prompts.iter().map(|p| &p.id).collect::<Vec<_>>(),
            "target": ctx.models.target,
            "draft": ctx.models.draft,
            "streams": ns,
            "teacher_forced_agreement": rec.agreement,
            "recording": ctx.opts.out.join("server-recording.json"),
        }),
        x_label: "streams N".into(),
        baseline: "batched target-only decoding (γ = 0 blocks) of the same N streams on the same node".into(),
        configs,
        summary,
        columns: vec![
            Column::new("tokens_per_s", "committed tok/s", 2),
            Column::new("ratio:tokens_per_s_vs_target_only", "× target-only", 2),
            Column::new("forwards_per_token", "verify calls/token", 3),
            Column::new("session_rounds_per_token", "rounds/token", 3),
            Column::new("free_verify_ceiling", "ceiling (free verify)", 2),
            Column::new("acceptance", "acceptance", 2),
            Column::new("gamma_mean", "γ mean", 2),
            Column::new("off_path_streams", "off-path", 0),
        ],
        plots: vec![
            PlotSpec::new("server-tokens-per-s.png", "tokens_per_s", "committed tokens/s (all streams)", "One verify node, N streams, replayed drafts"),
            PlotSpec::new("server-forwards-per-token.png", "forwards_per_token", "verify calls per committed token", "Target forwards per committed token"),
        ],
        notes: vec![
            "Drafts are replayed from a recording (teacher-forced greedy predictions of the real draft model along the target's greedy path), so drafting costs no CPU and every stream's acceptance is exactly the real draft model's under greedy verification.".into(),
            "verify calls/token = Verify calls the coordinator made (its batch_sessions histogram count) / committed tokens; each call is one batched target forward (the verify node may merge concurrent calls, so this is an upper bound on forwards). rounds/token counts per-stream rounds.".into(),
            "Every N sees the same prompt mix: stream i replays prompt (i + r) mod P, over all rotations r = 0..P unless N is a multiple of P (then one rotation already is the mix); all N streams of a rotation start together; tokens/s = committed tokens / wall time until the last stream finishes, summed over rotations (prefill included, the same for both modes). One cluster serves every configuration and run (started once per invocation, after a warm-up stream).".into(),
            "ceiling (free verify) = committed tokens / per-stream rounds: the most SD could gain over target-only with this prompt mix and acceptance if verifying γ+1 tokens cost what decoding one does and drafting were free.".into(),
            format!("The replaying client reports {REPLAY_DRAFT_S_PER_TOKEN} s per draft token to the γ controller (drafting is free here)."),
            "off-path counts streams whose served output left the recorded target path (numeric near-tie); they continue with γ = 0.".into(),
        ],
    })
}
