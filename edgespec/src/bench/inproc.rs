//! Scenarios (a) `single` and (b) `rtt`: an in-process [`LocalCluster`] per configuration and
//! run (fresh estimators every time), requests streamed through the draft node's OpenAI API one
//! at a time, statistics from the response's `edgespec` object.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::report::{Column, ConfigResult, PlotSpec, Report, RunRecord, SummaryLine};
use super::{
    host_info, loadavg, medians, ratio, record_run, set_tokens_per_s_ratio, unix_s, Ctx, Prompt,
};
use crate::client::{stream_chat, ChatOutcome, ChatRequest};
use crate::cluster::{ClusterOptions, DraftSpec, LocalCluster, PolicyOverrides};
use crate::linkemu::LinkProfile;
use edgespec_specdec::DraftMethod;

/// Bandwidth of the emulated link in scenario (b).
pub(super) const RTT_SCENARIO_MBIT: u64 = 20;

/// One way of decoding.
#[derive(Debug, Clone)]
pub(super) struct Variant {
    pub series: String,
    /// Fixed γ (None: adaptive).
    pub gamma: Option<u32>,
    /// γ = 0 through the same path.
    pub off: bool,
    /// Pipelined drafting (draft node) and the controller told so.
    pub pipelined: bool,
    /// Sampling temperature of the requests (0: greedy).
    pub temperature: f32,
    /// No padded bandwidth probes (scenario `wire`: the link carries only the protocol).
    pub probes_off: bool,
    /// The draft node's drafting method (a `lookup` node loads no draft model).
    pub method: DraftMethod,
}

impl Variant {
    pub(super) fn target_only() -> Self {
        Self {
            series: "target-only".into(),
            gamma: None,
            off: true,
            pipelined: false,
            temperature: 0.0,
            probes_off: false,
            method: DraftMethod::Model,
        }
    }
    pub(super) fn fixed(g: u32) -> Self {
        Self {
            series: format!("fixed γ={g}"),
            gamma: Some(g),
            off: false,
            pipelined: false,
            temperature: 0.0,
            probes_off: false,
            method: DraftMethod::Model,
        }
    }
    pub(super) fn adaptive() -> Self {
        Self {
            series: "adaptive".into(),
            gamma: None,
            off: false,
            pipelined: false,
            temperature: 0.0,
            probes_off: false,
            method: DraftMethod::Model,
        }
    }
    pub(super) fn adaptive_pipelined() -> Self {
        Self {
            series: "adaptive+pipelined".into(),
            gamma: None,
            off: false,
            pipelined: true,
            temperature: 0.0,
            probes_off: false,
            method: DraftMethod::Model,
        }
    }
    /// Fixed γ, sampling at temperature 1 (the draft sends its sparse q).
    pub(super) fn sampled(g: u32) -> Self {
        Self {
            series: format!("sampling γ={g}"),
            temperature: 1.0,
            ..Self::fixed(g)
        }
    }
    /// Adaptive γ, drafting with `method`.
    pub(super) fn adaptive_method(method: DraftMethod) -> Self {
        Self {
            series: format!("adaptive {method}"),
            method,
            ..Self::adaptive()
        }
    }
    pub(super) fn without_probes(self) -> Self {
        Self {
            probes_off: true,
            ..self
        }
    }
    pub(super) fn policy(&self) -> PolicyOverrides {
        PolicyOverrides {
            gamma_bounds: self.gamma.map(|g| (g, g)),
            speculation_off: self.off,
            pipelined: self.pipelined,
            bandwidth_probes_off: self.probes_off,
        }
    }
    pub(super) fn params(&self) -> Value {
        json!({
            "gamma": self.gamma,
            "speculation_off": self.off,
            "pipelined": self.pipelined,
            "temperature": self.temperature,
            "bandwidth_probes_off": self.probes_off,
            "draft_method": self.method.label(),
        })
    }
}

/// An HTTP client whose requests cannot hang the benchmark.
pub(super) fn http_client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .connect_timeout(Duration::from_secs(10))
        .build()?)
}

/// One short request before measuring (first-request allocations, connection set-up).
pub(super) async fn warmup(client: &reqwest::Client, base: &str, p: &Prompt) -> Result<()> {
    let req = ChatRequest {
        prompt: p.prompt.clone(),
        max_tokens: 8,
        temperature: 0.0,
        seed: None,
        top_k: None,
        ..Default::default()
    };
    stream_chat(client, base, &req, |_| {})
        .await
        .context("warm-up request")?;
    Ok(())
}

/// Greedy texts of the first configuration measured, per prompt: every configuration is
/// lossless, so any other text is a numeric near-tie (reported, not hidden).
pub(super) type References = HashMap<String, String>;

/// Sends every prompt once, one at a time, through the draft node at `base`; returns the run's
/// aggregate metrics and its per-request detail.
pub(super) async fn drive_prompts(
    client: &reqwest::Client,
    base: &str,
    prompts: &[Prompt],
    max_tokens: u32,
    temperature: f32,
    refs: &mut References,
) -> Result<(BTreeMap<String, f64>, Value)> {
    let mut outs: Vec<(&Prompt, ChatOutcome, bool)> = Vec::new();
    for p in prompts {
        let req = ChatRequest {
            prompt: p.prompt.clone(),
            max_tokens,
            temperature,
            seed: (temperature > 0.0).then_some(1),
            top_k: None,
            prompt_kind: Some(p.kind.clone()),
            ..Default::default()
        };
        let out = stream_chat(client, base, &req, |_| {})
            .await
            .with_context(|| format!("prompt {}", p.id))?;
        let same = refs.entry(p.id.clone()).or_insert_with(|| out.text.clone()) == &out.text;
        outs.push((p, out, same));
    }
    Ok(aggregate(&outs))
}

fn aggregate(outs: &[(&Prompt, ChatOutcome, bool)]) -> (BTreeMap<String, f64>, Value) {
    let f = |o: &ChatOutcome, k: &str| o.stat(k).unwrap_or(0.0);
    let mut m = BTreeMap::new();
    let tokens: f64 = outs
        .iter()
        .map(|(_, o, _)| o.completion_tokens as f64)
        .sum();
    let secs: f64 = outs.iter().map(|(_, o, _)| o.elapsed.as_secs_f64()).sum();
    let fwd: f64 = outs.iter().map(|(_, o, _)| f(o, "target_forwards")).sum();
    let drafted: f64 = outs.iter().map(|(_, o, _)| f(o, "drafted")).sum();
    let accepted: f64 = outs.iter().map(|(_, o, _)| f(o, "accepted")).sum();
    let rounds: f64 = outs.iter().map(|(_, o, _)| f(o, "rounds")).sum();
    let gsum: f64 = outs
        .iter()
        .map(|(_, o, _)| f(o, "gamma_mean") * f(o, "rounds"))
        .sum();
    let ttft: Vec<f64> = outs
        .iter()
        .filter_map(|(_, o, _)| o.first_token.map(|d| d.as_secs_f64()))
        .collect();
    m.insert("tokens".into(), tokens);
    m.insert("seconds".into(), secs);
    m.insert("tokens_per_s".into(), tokens / secs.max(1e-9));
    m.insert("forwards_per_token".into(), fwd / tokens.max(1.0));
    m.insert("rounds".into(), rounds);
    if rounds > 0.0 {
        m.insert("gamma_mean".into(), gsum / rounds);
    }
    if drafted > 0.0 {
        m.insert("acceptance".into(), accepted / drafted);
    }
    if let Some(t) = super::median(&ttft) {
        m.insert("ttft_s".into(), t);
    }
    m.insert(
        "text_mismatches".into(),
        outs.iter().filter(|(_, _, same)| !same).count() as f64,
    );
    let mut kinds: Vec<&str> = outs.iter().map(|(p, _, _)| p.kind.as_str()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    // Every kind, and with grounded prompts among them, all the others together.
    let mut groups: Vec<(&str, Vec<&str>)> = kinds.iter().map(|&k| (k, vec![k])).collect();
    if kinds.contains(&GROUNDED) && kinds.len() > 1 {
        let rest = kinds.iter().copied().filter(|k| *k != GROUNDED).collect();
        groups.push((OTHERS, rest));
    }
    for (k, members) in &groups {
        let of_kind = || {
            outs.iter()
                .filter(|(p, _, _)| members.contains(&p.kind.as_str()))
        };
        let d: f64 = of_kind().map(|(_, o, _)| f(o, "drafted")).sum();
        let a: f64 = of_kind().map(|(_, o, _)| f(o, "accepted")).sum();
        let t: f64 = of_kind().map(|(_, o, _)| o.completion_tokens as f64).sum();
        let s: f64 = of_kind().map(|(_, o, _)| o.elapsed.as_secs_f64()).sum();
        let fw: f64 = of_kind().map(|(_, o, _)| f(o, "target_forwards")).sum();
        if d > 0.0 {
            m.insert(format!("acceptance_{k}"), a / d);
        }
        m.insert(format!("tokens_per_s_{k}"), t / s.max(1e-9));
        m.insert(format!("forwards_per_token_{k}"), fw / t.max(1.0));
    }
    let detail: Vec<Value> = outs
        .iter()
        .map(|(p, o, same)| {
            json!({
                "id": p.id,
                "kind": p.kind,
                "completion_tokens": o.completion_tokens,
                "prompt_tokens": o.prompt_tokens,
                "elapsed_s": o.elapsed.as_secs_f64(),
                "ttft_s": o.first_token.map(|d| d.as_secs_f64()),
                "tokens_per_s": o.tokens_per_s(),
                "finish_reason": o.finish_reason,
                "same_text_as_reference": same,
                "edgespec": o.stats,
            })
        })
        .collect();
    (m, json!(detail))
}

/// Starts a cluster for `v` (with `link` on the draft ↔ coordinator hop), warms it up, runs
/// every prompt once, stops it (also on error).
async fn measure_cluster(
    ctx: &Ctx,
    v: &Variant,
    link: Option<LinkProfile>,
    refs: &mut References,
) -> Result<(BTreeMap<String, f64>, Value)> {
    let mut opts = ClusterOptions::new(ctx.models.target.clone(), ctx.models.draft.clone());
    opts.drafts = vec![DraftSpec {
        link,
        pipelined: v.pipelined,
        method: v.method,
        lookup_ngram: None,
    }];
    opts.policy = v.policy();
    let cluster = LocalCluster::start(opts)
        .await
        .context("starting the local cluster")?;
    let base = cluster.openai_base();
    let result = async {
        let client = http_client()?;
        warmup(&client, &base, &ctx.prompts[0]).await?;
        let link = cluster.drafts[0].link.clone();
        let before = link.as_ref().map(|l| l.stats());
        // Sampled answers legitimately differ between configurations: compare only greedy ones.
        let mut own_refs = References::new();
        let refs = if v.temperature > 0.0 {
            &mut own_refs
        } else {
            refs
        };
        let (mut m, detail) = drive_prompts(
            &client,
            &base,
            &ctx.prompts,
            ctx.max_tokens,
            v.temperature,
            refs,
        )
        .await?;
        if let (Some(l), Some(b)) = (&link, before) {
            let after = l.stats();
            let (up, down) = (
                (after.bytes_up - b.bytes_up) as f64,
                (after.bytes_down - b.bytes_down) as f64,
            );
            let rounds = m.get("rounds").copied().unwrap_or(0.0).max(1.0);
            let tokens = m.get("tokens").copied().unwrap_or(0.0).max(1.0);
            m.insert("wire_up_bytes_per_round".into(), up / rounds);
            m.insert("wire_down_bytes_per_round".into(), down / rounds);
            m.insert("wire_up_bytes_per_token".into(), up / tokens);
            m.insert("wire_down_bytes_per_token".into(), down / tokens);
        }
        anyhow::Ok((m, detail))
    }
    .await;
    let stopped = cluster.stop().await;
    let r = result?;
    stopped.context("stopping the local cluster")?;
    Ok(r)
}

/// A configuration to measure: a variant at one x (RTT) with its link.
struct Plan {
    variant: Variant,
    x: f64,
    link: Option<LinkProfile>,
    name: String,
}

/// Measures every plan `runs` times, interleaved, and returns the configurations with medians.
async fn measure_all(ctx: &Ctx, plans: &[Plan]) -> Result<Vec<ConfigResult>> {
    let mut configs: Vec<ConfigResult> = plans
        .iter()
        .map(|p| ConfigResult {
            name: p.name.clone(),
            series: p.variant.series.clone(),
            x: p.x,
            params: {
                let mut v = p.variant.params();
                v["rtt_ms"] = json!(p.x);
                v["link_mbit"] = json!(p.link.map(|_| RTT_SCENARIO_MBIT));
                v
            },
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
            let (metrics, detail) = measure_cluster(ctx, &p.variant, p.link, &mut refs)
                .await
                .with_context(|| format!("{} (run {run})", p.name))?;
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
    Ok(configs)
}

fn params(ctx: &Ctx) -> Value {
    json!({
        "runs": ctx.opts.runs,
        "max_tokens": ctx.max_tokens,
        "prompts": ctx.prompts.iter().map(|p| &p.id).collect::<Vec<_>>(),
        "target": ctx.models.target,
        "draft": ctx.models.draft,
        "temperature": 0.0,
    })
}

const KINDS: [&str; 4] = ["code", "prose", "math", "structured"];

/// The kind of the input-grounded prompts (`bench/prompts/grounded-prompts.jsonl`).
pub(super) const GROUNDED: &str = "grounded";
/// The group of every prompt kind but `grounded` (metrics `*_others`).
pub(super) const OTHERS: &str = "others";

/// Scenario (a).
pub(super) async fn single(ctx: &Ctx) -> Result<Report> {
    if let Some(methods) = &ctx.opts.draft_methods {
        return single_methods(ctx, methods).await;
    }
    let variants = [
        Variant::target_only(),
        Variant::fixed(2),
        Variant::fixed(4),
        Variant::fixed(8),
        Variant::adaptive(),
    ];
    let plans: Vec<Plan> = variants
        .into_iter()
        .map(|v| Plan {
            name: v.series.clone(),
            variant: v,
            x: 0.0,
            link: None,
        })
        .collect();
    let mut configs = measure_all(ctx, &plans).await?;
    let base = configs[0].clone();
    for c in &mut configs {
        set_tokens_per_s_ratio(c, &base, "target_only");
    }
    let get = |s: &str| configs.iter().find(|c| c.series == s);
    let adaptive_vs =
        get("adaptive").and_then(|c| c.ratios.get("tokens_per_s_vs_target_only").copied());
    let best_fixed = configs
        .iter()
        .filter(|c| c.params["gamma"].is_u64())
        .max_by(|a, b| {
            let f = |c: &ConfigResult| c.median.get("tokens_per_s").copied().unwrap_or(0.0);
            f(a).total_cmp(&f(b))
        });
    let mut summary = vec![SummaryLine::ratio(
        "adaptive / target-only tokens/s (must not lose more than noise)".into(),
        adaptive_vs,
        Some(0.95),
    )];
    if let Some(b) = best_fixed {
        summary.push(SummaryLine::ratio(
            format!("best fixed ({}) / target-only tokens/s", b.series),
            b.ratios.get("tokens_per_s_vs_target_only").copied(),
            None,
        ));
    }
    let mut columns = vec![
        Column::new("tokens_per_s", "tok/s", 2),
        Column::new("ratio:tokens_per_s_vs_target_only", "× target-only", 2),
        Column::new("forwards_per_token", "target fwd/token", 3),
        Column::new("acceptance", "acceptance", 2),
        Column::new("gamma_mean", "γ mean", 2),
    ];
    for k in KINDS {
        columns.push(Column::new(
            &format!("acceptance_{k}"),
            &format!("acc {k}"),
            2,
        ));
    }
    columns.push(Column::new("text_mismatches", "text ≠ ref", 0));
    Ok(Report {
        scenario: "single".into(),
        created_unix_s: unix_s(),
        host: host_info(),
        params: params(ctx),
        x_label: String::new(),
        baseline: "target-only (γ = 0 through the same path)".into(),
        configs,
        summary,
        columns,
        plots: vec![
            PlotSpec::new("single-tokens-per-s.png", "tokens_per_s", "tokens/s", "Single stream, no link delay"),
            PlotSpec::new(
                "single-forwards-per-token.png",
                "forwards_per_token",
                "target forwards per committed token",
                "Single stream: target forwards per token",
            ),
        ],
        notes: vec![
            "tokens/s = completion tokens / wall time of the streamed requests (prefill and first token included), summed over the prompts of a run, one request at a time.".into(),
            "target forwards = verification rounds (one target forward each); acceptance = accepted / drafted draft tokens.".into(),
            "text ≠ ref counts answers that differ from the first configuration's (greedy decoding is lossless, so a difference is a numeric near-tie between batched and single-token forwards).".into(),
            "Draft and target share the same CPU cores here, so speculation competes with the target for compute.".into(),
        ],
    })
}

/// Scenario (b).
pub(super) async fn rtt(ctx: &Ctx) -> Result<Report> {
    let rtts = ctx
        .opts
        .rtts_ms
        .clone()
        .unwrap_or_else(|| vec![0, 20, 50, 100]);
    let mut plans = Vec::new();
    for &r in &rtts {
        for v in [
            Variant::fixed(1),
            Variant::fixed(2),
            Variant::fixed(4),
            Variant::fixed(8),
            Variant::adaptive(),
            Variant::adaptive_pipelined(),
        ] {
            plans.push(Plan {
                name: format!("rtt={r}ms {}", v.series),
                variant: v,
                x: r as f64,
                link: Some(LinkProfile::wan(
                    Duration::from_millis(r),
                    RTT_SCENARIO_MBIT,
                )),
            });
        }
    }
    let mut configs = measure_all(ctx, &plans).await?;
    let mut summary = Vec::new();
    for &r in &rtts {
        let x = r as f64;
        let tps = |c: &ConfigResult| c.median.get("tokens_per_s").copied();
        let at: Vec<ConfigResult> = configs.iter().filter(|c| c.x == x).cloned().collect();
        let best = at
            .iter()
            .filter(|c| c.params["gamma"].is_u64())
            .max_by(|a, b| tps(a).unwrap_or(0.0).total_cmp(&tps(b).unwrap_or(0.0)))
            .cloned();
        let adaptive = at.iter().find(|c| c.series == "adaptive").cloned();
        for c in configs.iter_mut().filter(|c| c.x == x) {
            if let Some(b) = &best {
                if let Some(v) = ratio(tps(c), tps(b)) {
                    c.ratios.insert("tokens_per_s_vs_best_fixed".into(), v);
                }
            }
            if c.series == "adaptive+pipelined" {
                if let Some(a) = &adaptive {
                    set_tokens_per_s_ratio(c, a, "adaptive");
                }
            }
        }
        let find = |s: &str| configs.iter().find(|c| c.x == x && c.series == s);
        if let (Some(b), Some(a)) = (&best, find("adaptive")) {
            summary.push(SummaryLine::ratio(
                format!("RTT {r} ms: adaptive / best fixed ({})", b.series),
                a.ratios.get("tokens_per_s_vs_best_fixed").copied(),
                Some(0.95),
            ));
        }
        if let Some(p) = find("adaptive+pipelined") {
            summary.push(SummaryLine::ratio(
                format!("RTT {r} ms: pipelined / non-pipelined (adaptive)"),
                p.ratios.get("tokens_per_s_vs_adaptive").copied(),
                (r == 50).then_some(1.3),
            ));
        }
    }
    Ok(Report {
        scenario: "rtt".into(),
        created_unix_s: unix_s(),
        host: host_info(),
        params: {
            let mut p = params(ctx);
            p["rtts_ms"] = json!(rtts);
            p["link_mbit"] = json!(RTT_SCENARIO_MBIT);
            p
        },
        x_label: "RTT ms".into(),
        baseline: "best fixed γ at the same RTT (adaptive+pipelined also vs adaptive)".into(),
        configs,
        summary,
        columns: vec![
            Column::new("tokens_per_s", "goodput tok/s", 2),
            Column::new("ratio:tokens_per_s_vs_best_fixed", "× best fixed", 2),
            Column::new("ratio:tokens_per_s_vs_adaptive", "× adaptive", 2),
            Column::new("forwards_per_token", "target fwd/token", 3),
            Column::new("acceptance", "acceptance", 2),
            Column::new("gamma_mean", "γ mean", 2),
            Column::new("text_mismatches", "text ≠ ref", 0),
        ],
        plots: vec![
            PlotSpec::new("rtt-goodput.png", "tokens_per_s", "goodput (tokens/s)", "Goodput vs emulated RTT (20 Mbit/s)"),
            PlotSpec::new("rtt-gamma.png", "gamma_mean", "mean γ", "Mean γ vs RTT"),
        ],
        notes: vec![
            format!("The draft node reaches the coordinator through the in-process link emulator: RTT split evenly per direction, {RTT_SCENARIO_MBIT} Mbit/s per direction."),
            "goodput = committed completion tokens / wall time of the streamed requests, one request at a time.".into(),
            "Draft and target share the same CPU cores here.".into(),
        ],
    })
}

/// Scenario `wire` (part of (b)'s question: what speculation costs on the link): bytes per round
/// and per committed token in each direction, greedy and sampling, fixed γ = 1..8, counted by
/// the link emulator on the draft ↔ coordinator hop (no padded bandwidth probes; the small RTT
/// probes remain), next to what shipping the draft's full probability rows would cost.
pub(super) async fn wire(ctx: &Ctx) -> Result<Report> {
    let vocab = edgespec_model::TextTokenizer::from_gguf(&ctx.models.target)?.vocab_size();
    let mut plans = Vec::new();
    for g in 1..=8u32 {
        for v in [Variant::fixed(g), Variant::sampled(g)] {
            plans.push(Plan {
                name: format!("wire {}", v.series),
                variant: v.without_probes(),
                x: f64::from(g),
                link: Some(LinkProfile::ideal()),
            });
        }
    }
    let mut configs = measure_all(ctx, &plans).await?;
    for c in &mut configs {
        // A design that ships the draft's full rows sends γ rows of V f32 per round upstream.
        let g = c.x;
        c.median
            .insert("naive_up_bytes_per_round".into(), g * vocab as f64 * 4.0);
        if let Some(up) = c.median.get("wire_up_bytes_per_round").copied() {
            c.median.insert(
                "naive_over_sparse".into(),
                g * vocab as f64 * 4.0 / up.max(1.0),
            );
        }
    }
    Ok(Report {
        scenario: "wire".into(),
        created_unix_s: unix_s(),
        host: host_info(),
        params: {
            let mut p = params(ctx);
            p["vocab"] = json!(vocab);
            p
        },
        x_label: "γ".into(),
        baseline: "a design that sends the draft's full probability rows (γ × V × 4 bytes per round)".into(),
        configs,
        summary: Vec::new(),
        columns: vec![
            Column::new("wire_up_bytes_per_round", "up B/round", 0),
            Column::new("wire_down_bytes_per_round", "down B/round", 0),
            Column::new("wire_up_bytes_per_token", "up B/token", 0),
            Column::new("wire_down_bytes_per_token", "down B/token", 0),
            Column::new("naive_up_bytes_per_round", "full rows up B/round", 0),
            Column::new("naive_over_sparse", "full rows / ours", 0),
            Column::new("acceptance", "acceptance", 2),
            Column::new("gamma_mean", "γ mean", 2),
        ],
        plots: Vec::new(),
        notes: vec![
            "Bytes are what the link emulator forwarded on the draft node ↔ coordinator hop during the measured requests (HTTP/2 + TLS-free gRPC framing included; the warm-up request and the stream's opening are excluded). Up = draft node → coordinator (blocks, history on open, probe replies), down = coordinator → draft node (verdicts, probes).".into(),
            "Padded bandwidth probes are off; the RTT probes (a few bytes every 2 s) remain in the counts.".into(),
            "Greedy blocks carry token ids only; sampling blocks add the sparse q (drafting.top_k = 16 id/probability pairs per draft token). \"full rows\" is what sending the draft's whole probability row (V f32) per draft token would cost; greedy needs no q at all.".into(),
            "Per round includes the first round, whose block carries the whole prompt as history.".into(),
        ],
    })
}

/// Scenario (a) by drafting method (`--draft-methods`): target-only and adaptive γ with each
/// method, one in-process cluster per configuration and run, ratios per prompt kind.
async fn single_methods(ctx: &Ctx, methods: &[DraftMethod]) -> Result<Report> {
    let mut plans = vec![Plan {
        name: "target-only".into(),
        variant: Variant::target_only(),
        x: 0.0,
        link: None,
    }];
    for &m in methods {
        let v = Variant::adaptive_method(m);
        plans.push(Plan {
            name: v.series.clone(),
            variant: v,
            x: 0.0,
            link: None,
        });
    }
    let mut configs = measure_all(ctx, &plans).await?;
    let kinds = super::methods::kinds(&ctx.prompts);
    let summary = super::methods::compare(&mut configs, &kinds, "adaptive");
    Ok(Report {
        scenario: "single".into(),
        created_unix_s: unix_s(),
        host: host_info(),
        params: {
            let mut p = params(ctx);
            p["draft_methods"] = json!(methods.iter().map(|m| m.label()).collect::<Vec<_>>());
            p["prompt_set"] = json!(ctx.opts.prompt_set);
            p
        },
        x_label: String::new(),
        baseline: "target-only (γ = 0 through the same path), per prompt kind too".into(),
        configs,
        summary,
        columns: super::methods::columns(&kinds),
        plots: vec![PlotSpec::new(
            "single-methods-tokens-per-s.png",
            "tokens_per_s",
            "tokens/s",
            "Single stream by drafting method",
        )],
        notes: super::methods::notes(
            "One process, one shared CPU: coordinator, verify node (target) and draft node on loopback. A `lookup` draft node loads no draft model (its tokenizer comes from the target's GGUF); `model` and `hybrid` load the 0.5B draft.",
        ),
    })
}
