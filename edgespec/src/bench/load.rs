//! `edgespec bench load`: overload under load, measured (issue 15 item 6).
//!
//! One coordinator and two verify nodes run as child processes ([`ProcFleet`], the chaos soak's
//! fleet) on a tiny synthetic target. The bench ramps through steps of concurrent draft streams
//! (default 50, 200, 500, 1000; `--streams`): each step opens that many `Drafts` streams
//! ([`DraftClient`], one per emulated draft node) and each stream drives one session at a time,
//! back to back, for [`STEP_DURATION`] — a closed loop, so the concurrency holds for the whole
//! step. Sessions are driven the way a draft node drives them ([`DraftClient::drive`]: history
//! on the first block, OVERLOADED / UNAVAILABLE retried a few times); their drafts are the
//! reference continuation with every third position wrong, so acceptance is partial.
//!
//! Per step it reports completed and refused sessions (by error code), time to first token
//! (session start → the verdict on its first block) and to completion (p50 / p99), the
//! coordinator's peak RSS (sampled from `/proc/<pid>/status`), and that every completed
//! session's tokens equal the target-only greedy reference of its prompt (mismatches must be
//! 0). Every wait is bounded: a session has [`SESSION_TIMEOUT`], a step ends
//! [`STEP_GRACE`] after its duration whatever is still running.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use edgespec_model::ChatMessage;
use edgespec_proto::domain::ErrorCode;
use edgespec_testkit::reference::greedy_continuation;
use edgespec_testkit::scripted::{DraftClient, Drafter, SessionScript};
use edgespec_testkit::stats::quantile;
use edgespec_testkit::tiny::TinyModel;
use futures::future::join_all;
use serde_json::json;

use super::report::{Column, ConfigResult, Report, RunRecord};
use super::{host_info, loadavg, medians, unix_s, BenchOptions};
use crate::chaos::{FleetSpec, ProcFleet, PROMPTS};
use crate::procs::admin_get;

/// Concurrent draft streams (one session each at a time) per step.
pub const DEFAULT_STEPS: [usize; 4] = [50, 200, 500, 1000];
/// How long each step keeps its streams busy.
pub const STEP_DURATION: Duration = Duration::from_secs(10);
/// Longest one session may take (connect excluded) before it counts as timed out.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long after its duration a step waits for the sessions still running.
pub const STEP_GRACE: Duration = Duration::from_secs(90);
/// OVERLOADED / UNAVAILABLE answers a session retries (5 ms apart, in the driver) before it
/// gives up: a refused session fails after about 100 ms.
const MAX_RETRIES: usize = 20;
/// A stream whose session was refused waits this long before its next one.
const REFUSED_BACKOFF: Duration = Duration::from_millis(100);
/// Fixed γ of the coordinator (a steady load, not the controller's choice).
const GAMMA: u32 = 4;
/// Every n-th absolute position the drafts are wrong.
const MISS_EVERY: usize = 3;

/// One prompt: its chat-encoded ids and the target-only greedy continuation.
struct Case {
    prompt: Vec<u32>,
    reference: Vec<u32>,
}

/// Drafts the reference continuation, wrong at every [`MISS_EVERY`]-th position, and notes
/// when the first verdict arrived (the first draft call with a generated token).
struct LoadDrafter<'a> {
    case: &'a Case,
    vocab: u32,
    first_verdict: Option<Instant>,
}

impl Drafter for LoadDrafter<'_> {
    fn draft(&mut self, committed: &[u32], gamma: usize) -> Vec<u32> {
        let generated = committed.len() - self.case.prompt.len();
        if generated > 0 && self.first_verdict.is_none() {
            self.first_verdict = Some(Instant::now());
        }
        (0..gamma)
            .map(|i| {
                let t = self.case.reference.get(generated + i).copied().unwrap_or(0);
                if (committed.len() + i) % MISS_EVERY == 0 {
                    (t + 1) % self.vocab
                } else {
                    t
                }
            })
            .collect()
    }
}

/// What happened to one session (or to a stream the coordinator refused).
enum Outcome {
    Completed {
        ttft: Duration,
        total: Duration,
        exact: bool,
        tokens: usize,
        drafted: usize,
        accepted: usize,
        /// OVERLOADED / UNAVAILABLE answers retried on the way.
        retried: usize,
    },
    /// Refused or failed: a label (an error code's, or what went wrong) and the error.
    Refused(String, String),
}

/// The column a refusal label is counted in.
fn bucket(label: &str) -> &'static str {
    match label.trim_start_matches("stream ") {
        "overloaded" => "refused_overloaded",
        "unavailable" => "refused_unavailable",
        "resource_exhausted" => "refused_resource_exhausted",
        _ => "refused_other",
    }
}

/// The label of a failed session. The driver reports failures as text; its retry give-up
/// message carries the coordinator's message, which names no code, so UNAVAILABLE is told
/// from OVERLOADED by the coordinator's wording ("no verify node ...").
fn session_label(e: &anyhow::Error) -> String {
    let s = format!("{e:#}");
    if s.contains("gave up after") {
        return if s.contains("no verify node") {
            "unavailable".into()
        } else {
            "overloaded".into()
        };
    }
    for code in [
        ErrorCode::InvalidArgument,
        ErrorCode::ModelMismatch,
        ErrorCode::ContextOverflow,
        ErrorCode::Internal,
        ErrorCode::ResyncNeeded,
    ] {
        if s.contains(&format!("error {code:?}:")) {
            return code.label().into();
        }
    }
    if s.contains("ResourceExhausted") {
        return "resource_exhausted".into();
    }
    if s.contains("no answer") {
        return "answer timeout".into();
    }
    if s.contains("stream closed") {
        return "stream closed".into();
    }
    "other".into()
}

/// The label of a refused stream: the gRPC status code's name in snake case, like
/// `ErrorCode::label` (`ResourceExhausted` → `resource_exhausted`).
fn stream_label(code: impl std::fmt::Debug) -> String {
    let name = format!("{code:?}");
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// Each prompt's ids and reference, on a blocking thread (one model load, one decode per
/// distinct prompt).
async fn cases(model: &TinyModel, max_tokens: usize) -> Result<(Vec<Case>, u32)> {
    let (path, vocab) = (model.path.clone(), model.spec.vocab_size() as u32);
    let tok = model.tokenizer();
    let mut lm = model.load();
    let cases = tokio::task::spawn_blocking(move || -> Result<Vec<Case>> {
        PROMPTS
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let prompt = tok.encode_chat(&[ChatMessage::new("user", *p)], true)?;
                let reference =
                    greedy_continuation(lm.as_mut(), i as u64, &prompt, max_tokens, &[])
                        .with_context(|| format!("the reference of {p:?} on {}", path.display()))?;
                Ok(Case { prompt, reference })
            })
            .collect()
    })
    .await
    .context("the reference decoder panicked")??;
    Ok((cases, vocab))
}

/// Pid of our child process whose name starts with `comm` (`/proc/<pid>/stat`; the kernel
/// keeps 15 characters of the name).
fn child_pid(comm: &str) -> Option<u32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let (name, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
        let ppid = rest.split_whitespace().nth(1)?;
        (ppid == me && comm.starts_with(name)).then_some(pid)
    })
}

/// Resident set size of `pid` in bytes (`VmRSS`), `None` once it is gone.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Samples `pid`'s RSS every 50 ms until `stop`; returns the peak.
fn sample_rss(pid: u32, stop: tokio_util::sync::CancellationToken) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut peak = 0;
        loop {
            peak = peak.max(rss_bytes(pid).unwrap_or(0));
            tokio::select! {
                _ = stop.cancelled() => return peak,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    })
}

/// What one step shares with its streams.
struct StepCtx {
    url: String,
    fingerprint: String,
    cases: Arc<Vec<Case>>,
    vocab: u32,
    max_tokens: usize,
}

/// One stream: connect, then sessions back to back until `until`.
async fn stream_worker(
    ctx: Arc<StepCtx>,
    name: String,
    seed: usize,
    until: Instant,
) -> Vec<Outcome> {
    let client = match DraftClient::connect_with(&ctx.url, &name, &ctx.fingerprint).await {
        Ok(c) => c,
        Err(status) => {
            let label = format!("stream {}", stream_label(status.code()));
            return vec![Outcome::Refused(label, status.message().to_string())];
        }
    };
    let mut out = Vec::new();
    let mut session_id = 0;
    while Instant::now() < until {
        session_id += 1;
        let case = &ctx.cases[(seed + session_id as usize) % ctx.cases.len()];
        let mut script =
            SessionScript::with_prompt(session_id, case.prompt.clone(), ctx.max_tokens);
        script.max_retries = MAX_RETRIES;
        script.answer_timeout = SESSION_TIMEOUT;
        let mut drafter = LoadDrafter {
            case,
            vocab: ctx.vocab,
            first_verdict: None,
        };
        let started = Instant::now();
        let r = tokio::time::timeout(SESSION_TIMEOUT, client.drive(script, &mut drafter)).await;
        let outcome = match r {
            Ok(Ok(rep)) => Outcome::Completed {
                ttft: drafter.first_verdict.unwrap_or(Instant::now()) - started,
                total: started.elapsed(),
                exact: rep.tokens.get(case.prompt.len()..) == Some(&case.reference[..]),
                tokens: rep.tokens.len() - case.prompt.len(),
                drafted: rep.drafted,
                accepted: rep.accepted,
                retried: rep.count(ErrorCode::Overloaded) + rep.count(ErrorCode::Unavailable),
            },
            Ok(Err(e)) => Outcome::Refused(session_label(&e), format!("{e:#}")),
            Err(_) => Outcome::Refused("session timeout".into(), String::new()),
        };
        let refused = matches!(outcome, Outcome::Refused(..));
        out.push(outcome);
        if refused {
            tokio::time::sleep(REFUSED_BACKOFF).await;
        }
    }
    out
}

/// Runs one step of `streams` concurrent streams; the run's record.
async fn step(
    ctx: &Arc<StepCtx>,
    streams: usize,
    run: usize,
    coordinator: u32,
) -> Result<RunRecord> {
    let started_unix_s = unix_s();
    let load_at_start = loadavg();
    let idle_rss = rss_bytes(coordinator).unwrap_or(0);
    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = sample_rss(coordinator, stop.clone());
    let began = Instant::now();
    let until = began + STEP_DURATION;
    let workers: Vec<_> = (0..streams)
        .map(|i| {
            let name = format!("load-{run}-{streams}-{i}");
            tokio::spawn(stream_worker(ctx.clone(), name, i, until))
        })
        .collect();
    let aborts: Vec<_> = workers.iter().map(|w| w.abort_handle()).collect();
    let joined = tokio::time::timeout(STEP_DURATION + STEP_GRACE, join_all(workers)).await;
    let outcomes: Vec<Outcome> = match joined {
        Ok(results) => results
            .into_iter()
            .flat_map(|r| r.unwrap_or_default())
            .collect(),
        Err(_) => {
            aborts.iter().for_each(|a| a.abort());
            anyhow::bail!("step of {streams} streams still running {STEP_GRACE:?} after its end");
        }
    };
    let wall = began.elapsed();
    stop.cancel();
    let peak_rss = sampler.await.unwrap_or(0);
    Ok(record(
        &outcomes,
        StepFacts {
            streams,
            run,
            started_unix_s,
            load_at_start,
            wall,
            idle_rss,
            peak_rss,
        },
    ))
}

/// A step's facts besides its outcomes.
struct StepFacts {
    streams: usize,
    run: usize,
    started_unix_s: f64,
    load_at_start: f64,
    wall: Duration,
    idle_rss: u64,
    peak_rss: u64,
}

/// The run record of a step: the table's metrics, refusals by label in the detail.
fn record(outcomes: &[Outcome], f: StepFacts) -> RunRecord {
    let (mut ttft, mut total) = (Vec::new(), Vec::new());
    let mut refused: BTreeMap<String, u64> = BTreeMap::new();
    // One error per label, to tell what an "other" was.
    let mut examples: BTreeMap<String, String> = BTreeMap::new();
    let mut m: BTreeMap<String, f64> = BTreeMap::new();
    let (mut completed, mut mismatched, mut tokens, mut drafted, mut accepted, mut retried) =
        (0u64, 0u64, 0usize, 0usize, 0usize, 0usize);
    for o in outcomes {
        match o {
            Outcome::Completed {
                ttft: t,
                total: d,
                exact,
                tokens: n,
                drafted: dr,
                accepted: a,
                retried: r,
            } => {
                completed += 1;
                mismatched += u64::from(!exact);
                ttft.push(*t);
                total.push(*d);
                tokens += n;
                drafted += dr;
                accepted += a;
                retried += r;
            }
            Outcome::Refused(label, error) => {
                *refused.entry(label.clone()).or_default() += 1;
                examples
                    .entry(label.clone())
                    .or_insert_with(|| error.clone());
            }
        }
    }
    for col in [
        "refused_overloaded",
        "refused_unavailable",
        "refused_resource_exhausted",
        "refused_other",
    ] {
        m.insert(col.into(), 0.0);
    }
    for (label, n) in &refused {
        *m.entry(bucket(label).into()).or_default() += *n as f64;
    }
    let ms = |v: &[Duration], q: f64| quantile(v, q).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    m.extend([
        ("streams".into(), f.streams as f64),
        ("sessions".into(), outcomes.len() as f64),
        ("completed".into(), completed as f64),
        ("mismatched".into(), mismatched as f64),
        ("retried_refusals".into(), retried as f64),
        ("ttft_p50_ms".into(), ms(&ttft, 0.5)),
        ("ttft_p99_ms".into(), ms(&ttft, 0.99)),
        ("done_p50_ms".into(), ms(&total, 0.5)),
        ("done_p99_ms".into(), ms(&total, 0.99)),
        ("tokens_per_s".into(), tokens as f64 / f.wall.as_secs_f64()),
        ("acceptance".into(), accepted as f64 / drafted.max(1) as f64),
        ("coordinator_rss_idle_mib".into(), mib(f.idle_rss)),
        ("coordinator_rss_peak_mib".into(), mib(f.peak_rss)),
        ("wall_s".into(), f.wall.as_secs_f64()),
        ("loadavg".into(), f.load_at_start),
    ]);
    RunRecord {
        run: f.run,
        started_unix_s: f.started_unix_s,
        loadavg: f.load_at_start,
        metrics: m,
        detail: json!({ "refused": refused, "examples": examples }),
    }
}

/// Waits (bounded) until the coordinator holds no session, so a step starts from an idle
/// fleet: the previous step's streams are gone and their sessions released.
async fn wait_idle(admin: std::net::SocketAddr) -> Result<()> {
    edgespec_testkit::harness::wait_until(
        "the coordinator to drop every session",
        Duration::from_secs(60),
        || async {
            admin_get(admin, "/admin/v1/sessions")
                .await
                .is_ok_and(|v| v["count"].as_u64() == Some(0))
        },
    )
    .await
}

/// Runs the ramp and builds the report.
pub(crate) async fn run(o: &BenchOptions, max_tokens: u32) -> Result<Report> {
    let steps = o.streams.clone().unwrap_or_else(|| DEFAULT_STEPS.to_vec());
    let model = TinyModel::seeded(11);
    let (cases, vocab) = cases(&model, max_tokens as usize).await?;
    let fingerprint = model.fingerprint();
    let mut fleet = ProcFleet::start(&FleetSpec {
        coordinators: 1,
        verifiers: 2,
        target: &model.path,
        gamma: GAMMA,
        coordinator_env: Vec::new(),
    })?;
    fleet.wait(0, &mut []).await?;
    let coordinator = child_pid("edgespec-coordinator").context("the coordinator's pid")?;
    let ctx = Arc::new(StepCtx {
        url: format!("http://{}", fleet.grpcs[0]),
        fingerprint,
        cases: Arc::new(cases),
        vocab,
        max_tokens: max_tokens as usize,
    });
    let mut configs: Vec<ConfigResult> = steps
        .iter()
        .map(|&n| ConfigResult {
            name: format!("streams={n}"),
            series: "load".into(),
            x: n as f64,
            params: json!({ "streams": n }),
            runs: Vec::new(),
            median: BTreeMap::new(),
            ratios: BTreeMap::new(),
        })
        .collect();
    for run in 1..=o.runs {
        for (c, &n) in configs.iter_mut().zip(&steps) {
            wait_idle(fleet.admins[0]).await?;
            let r = step(&ctx, n, run, coordinator).await?;
            let m = &r.metrics;
            eprintln!(
                "run {run} streams {n:>5}: {} sessions, {} completed, {} mismatched, refused {}, ttft p50/p99 {:.0}/{:.0} ms, rss peak {:.1} MiB",
                m["sessions"], m["completed"], m["mismatched"], r.detail["refused"], m["ttft_p50_ms"], m["ttft_p99_ms"], m["coordinator_rss_peak_mib"]
            );
            if let Some(ex) = r.detail["examples"].as_object() {
                for (label, e) in ex.iter().filter(|(l, _)| l.as_str() != "overloaded") {
                    eprintln!("    {label}: e.g. {e}");
                }
            }
            c.runs.push(r);
        }
    }
    for (i, v) in fleet.verifiers.iter_mut().enumerate() {
        anyhow::ensure!(v.is_running(), "verify node {i} exited during the bench");
    }
    anyhow::ensure!(
        fleet.coordinators[0].is_running(),
        "the coordinator exited during the bench"
    );
    for c in &mut configs {
        c.median = medians(&c.runs);
    }
    wait_idle(fleet.admins[0]).await?;
    let after = rss_bytes(coordinator).unwrap_or(0) as f64 / (1024.0 * 1024.0);
    let mut r = report(o, &steps, max_tokens, configs);
    r.notes.push(format!(
        "coordinator RSS after the ramp, every session gone: {after:.1} MiB"
    ));
    Ok(r)
}

fn report(
    o: &BenchOptions,
    steps: &[usize],
    max_tokens: u32,
    configs: Vec<ConfigResult>,
) -> Report {
    let col = Column::new;
    Report {
        scenario: "load".into(),
        created_unix_s: unix_s(),
        host: host_info(),
        params: json!({
            "steps": steps,
            "runs": o.runs,
            "max_tokens": max_tokens,
            "step_duration_s": STEP_DURATION.as_secs_f64(),
            "gamma": GAMMA,
            "session_retries": MAX_RETRIES,
            "refused_backoff_ms": REFUSED_BACKOFF.as_millis() as u64,
            "fleet": "1 coordinator, 2 verify nodes (child processes, default settings), tiny synthetic target",
        }),
        x_label: "streams".into(),
        baseline: "none".into(),
        configs,
        summary: Vec::new(),
        columns: vec![
            col("sessions", "sessions", 0),
            col("completed", "completed", 0),
            col("refused_overloaded", "OVERLOADED", 0),
            col("refused_unavailable", "UNAVAILABLE", 0),
            col("refused_resource_exhausted", "RESOURCE_EXHAUSTED", 0),
            col("refused_other", "other", 0),
            col("retried_refusals", "refusals retried", 0),
            col("ttft_p50_ms", "TTFT p50 ms", 0),
            col("ttft_p99_ms", "TTFT p99 ms", 0),
            col("done_p50_ms", "done p50 ms", 0),
            col("done_p99_ms", "done p99 ms", 0),
            col("tokens_per_s", "tok/s", 0),
            col("coordinator_rss_idle_mib", "coord RSS before MiB", 1),
            col("coordinator_rss_peak_mib", "coord RSS peak MiB", 1),
            col("mismatched", "mismatches", 0),
            col("wall_s", "wall s", 1),
            col("loadavg", "load avg", 1),
        ],
        plots: Vec::new(),
        notes: vec![
            format!(
                "each of `streams` Drafts streams (one per emulated draft node) drives one session at a time, back to back, for {} s; a session is {max_tokens} tokens of a chat prompt, γ = {GAMMA} fixed, drafts = the reference with every {MISS_EVERY}rd position wrong",
                STEP_DURATION.as_secs()
            ),
            format!("refused = sessions that failed, by the code of the last answer (OVERLOADED / UNAVAILABLE after {MAX_RETRIES} retries 5 ms apart), and streams refused at connect by gRPC status; a refused stream waits {} ms before its next session", REFUSED_BACKOFF.as_millis()),
            "TTFT = session start → verdict on its first block (retries included); done = start → last verdict".into(),
            "mismatches = completed sessions whose tokens differ from the target-only greedy reference (must be 0)".into(),
            "coordinator RSS: VmRSS of the coordinator process before the step (idle) and its peak during the step, sampled every 50 ms; load avg = the machine's 1-minute load average at the step's start (other work on a shared machine shows here)".into(),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_name_the_code() {
        assert_eq!(stream_label(ErrorCode::ResyncNeeded), "resync_needed");
        assert_eq!(
            bucket(&stream_label(ErrorCode::Overloaded)),
            "refused_overloaded"
        );
        let gave_up = anyhow::anyhow!("session 3: gave up after 21 retries: every verify node is at its session capacity; retry later");
        assert_eq!(session_label(&gave_up), "overloaded");
        let none = anyhow::anyhow!(
            "session 3: gave up after 21 retries: no verify node is available; retry later"
        );
        assert_eq!(session_label(&none), "unavailable");
        let internal = anyhow::anyhow!("session 3: error {:?}: boom", ErrorCode::Internal);
        assert_eq!(session_label(&internal), "internal");
    }

    #[test]
    fn drafts_follow_the_reference_with_misses() {
        let case = Case {
            prompt: vec![1, 2],
            reference: vec![5, 6, 7, 8],
        };
        let mut d = LoadDrafter {
            case: &case,
            vocab: 10,
            first_verdict: None,
        };
        // Absolute positions 2, 3, 4, 5: position 3 is wrong.
        assert_eq!(d.draft(&[1, 2], 4), vec![5, 7, 7, 8]);
        assert!(d.first_verdict.is_none());
        assert_eq!(d.draft(&[1, 2, 5], 1), vec![7]);
        assert!(d.first_verdict.is_some());
    }
}
