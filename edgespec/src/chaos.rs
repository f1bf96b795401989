//! `edgespec bench chaos`: a soak under random hard faults.
//!
//! The real node binaries run as child processes ([`crate::procs`]) on tiny synthetic models
//! (the draft is the target's weights quantised coarser, so drafts are mostly accepted and
//! sometimes rejected and corrected): two
//! coordinators, three verify nodes registered with both, and one draft node per coordinator,
//! each behind an in-process link emulator. `streams` clients keep asking for greedy answers
//! while a seeded schedule injects faults, one at a time: `kill -9` and restart of a verify node
//! or a coordinator, a cut (reset) or a blackhole (silence) of a draft link, and `SIGSTOP` /
//! `SIGCONT` of a verify node. Every completed answer is compared token id for token id with
//! the target-only reference for its prompt; a mismatch counts as lost or duplicated tokens and
//! must never happen. Refusals (a request that fails, clearly) are counted, not hidden.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use edgespec_testkit::reference::references;
use edgespec_testkit::stats::quantile;
use edgespec_testkit::tiny::write_tiny_pair;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio_util::sync::CancellationToken;

use crate::client::{stream_chat, ChatRequest};
use crate::linkemu::{CutMode, LinkControl, LinkEmulator, LinkProfile};
use crate::procs::{
    coordinator_env, draft_env, free_addr, verify_env, wait_fleet, NodeProcess, Role,
};

/// What a soak runs.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// How long faults are injected and new requests started.
    pub duration: Duration,
    /// Seed of the fault schedule and of the clients' prompt choice.
    pub seed: u64,
    /// Concurrent client streams (split over the draft nodes).
    pub streams: usize,
    /// Completion budget per request.
    pub max_tokens: u32,
    /// Folder for the synthetic models.
    pub dir: PathBuf,
}

/// The fault kinds, in the order of the report.
pub const FAULTS: [&str; 5] = [
    "kill -9 verify node",
    "kill -9 coordinator",
    "cut draft link",
    "blackhole draft link",
    "SIGSTOP verify node",
];

/// What a soak measured.
#[derive(Debug, Clone, Default)]
pub struct ChaosReport {
    /// Wall time of the whole soak.
    pub elapsed: Duration,
    /// Answers completed (and compared).
    pub completed: u64,
    /// Completed answers whose token ids differ from the reference (lost or duplicated
    /// tokens); must be 0.
    pub mismatched: u64,
    /// Requests that failed, by the first words of their error.
    pub refused: BTreeMap<String, u64>,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    /// Resyncs reported by the completed answers.
    pub resyncs: u64,
    /// Draft tokens accepted and drafted over the completed answers.
    pub accepted: u64,
    /// Draft tokens proposed.
    pub drafted: u64,
    /// Latency of completed answers, p50 and p99.
    pub latency_p50: Duration,
    /// p99.
    pub latency_p99: Duration,
}

impl ChaosReport {
    /// Requests that failed.
    pub fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }

    /// A markdown table of the figures.
    pub fn markdown(&self, o: &ChaosOptions) -> String {
        let mut s = String::new();
        s.push_str("| figure | value |\n|---|---:|\n");
        let mut row = |k: &str, v: String| s.push_str(&format!("| {k} | {v} |\n"));
        row("duration (s)", format!("{:.0}", self.elapsed.as_secs_f64()));
        row("seed", o.seed.to_string());
        row("concurrent streams", o.streams.to_string());
        row("answers completed", self.completed.to_string());
        row(
            "lost or duplicated tokens (answers differing from the reference)",
            self.mismatched.to_string(),
        );
        row(
            "requests refused / failed",
            self.refused_total().to_string(),
        );
        for (k, v) in &self.refused {
            row(&format!("&nbsp;&nbsp;{k}"), v.to_string());
        }
        row(
            "faults injected",
            self.faults.values().sum::<u64>().to_string(),
        );
        for (k, v) in &self.faults {
            row(&format!("&nbsp;&nbsp;{k}"), v.to_string());
        }
        row("resyncs in completed answers", self.resyncs.to_string());
        row(
            "draft acceptance",
            format!(
                "{:.2} ({} / {})",
                self.accepted as f64 / self.drafted.max(1) as f64,
                self.accepted,
                self.drafted
            ),
        );
        row(
            "latency p50 / p99 (s)",
            format!(
                "{:.2} / {:.2}",
                self.latency_p50.as_secs_f64(),
                self.latency_p99.as_secs_f64()
            ),
        );
        s
    }
}

/// Prompts of the soak (short; the tiny model's tokenizer covers them).
pub(crate) const PROMPTS: [&str; 8] = [
    "hello",
    "hello world",
    "the cat",
    "a b c",
    "write code",
    "cats and dogs",
    "hello there cat",
    "the world",
];

struct Fleet {
    coordinators: Vec<NodeProcess>,
    verifiers: Vec<NodeProcess>,
    _drafts: Vec<NodeProcess>,
    draft_http: Vec<SocketAddr>,
    links: Vec<LinkControl>,
    link_stop: CancellationToken,
}

/// Coordinators and verify nodes as child processes on one target model, every verify node
/// registered with every coordinator: the synthetic-model fleet the chaos soak and the load
/// bench (`bench::load`) share.
pub(crate) struct ProcFleet {
    /// Coordinator processes.
    pub coordinators: Vec<NodeProcess>,
    /// Their gRPC addresses (draft streams, verify-node registration).
    pub grpcs: Vec<SocketAddr>,
    /// Their admin addresses.
    pub admins: Vec<SocketAddr>,
    /// Verify node processes.
    pub verifiers: Vec<NodeProcess>,
}

/// What [`ProcFleet::start`] starts.
pub(crate) struct FleetSpec<'a> {
    /// Coordinators.
    pub coordinators: usize,
    /// Verify nodes, each registered with every coordinator.
    pub verifiers: usize,
    /// Target model of the verify nodes.
    pub target: &'a Path,
    /// Fixed γ of the coordinators.
    pub gamma: u32,
    /// Coordinator settings beyond [`coordinator_env`].
    pub coordinator_env: Vec<(&'static str, String)>,
}

impl ProcFleet {
    /// Starts the processes (without waiting for them: [`ProcFleet::wait`]).
    pub fn start(spec: &FleetSpec<'_>) -> Result<ProcFleet> {
        let mut fleet = ProcFleet {
            coordinators: Vec::new(),
            grpcs: Vec::new(),
            admins: Vec::new(),
            verifiers: Vec::new(),
        };
        for _ in 0..spec.coordinators {
            let (grpc, admin) = (free_addr()?, free_addr()?);
            let mut env = coordinator_env(grpc, admin, spec.gamma);
            env.extend(spec.coordinator_env.iter().cloned());
            fleet
                .coordinators
                .push(NodeProcess::start(Role::Coordinator, &env)?);
            fleet.grpcs.push(grpc);
            fleet.admins.push(admin);
        }
        for i in 0..spec.verifiers {
            let env = verify_env(
                &format!("verify-{i}"),
                spec.target,
                free_addr()?,
                &fleet.grpcs,
            );
            fleet
                .verifiers
                .push(NodeProcess::start(Role::Verify, &env)?);
        }
        Ok(fleet)
    }

    /// Waits until every coordinator has every verify node up and `drafts` draft nodes
    /// connected; fails at once when one of the fleet's processes or of `others` exits.
    pub async fn wait(&mut self, drafts: usize, others: &mut [NodeProcess]) -> Result<()> {
        let verifiers = self.verifiers.len();
        for admin in self.admins.clone() {
            let mut procs: Vec<&mut NodeProcess> = self.coordinators.iter_mut().collect();
            procs.extend(self.verifiers.iter_mut());
            procs.extend(others.iter_mut());
            wait_fleet(admin, verifiers, drafts, &mut procs).await?;
        }
        Ok(())
    }
}

async fn start_fleet(target: &Path, draft: &Path) -> Result<Fleet> {
    let mut core = ProcFleet::start(&FleetSpec {
        coordinators: 2,
        verifiers: 3,
        target,
        gamma: 2,
        // A stopped (SIGSTOP) verify node must time out quickly.
        coordinator_env: vec![("EDGESPEC__VERIFY__TIMEOUT", "2s".into())],
    })?;
    let link_stop = CancellationToken::new();
    let mut drafts = Vec::new();
    let mut draft_http = Vec::new();
    let mut links = Vec::new();
    for (i, grpc) in core.grpcs.iter().enumerate() {
        // Not port 0: the kernel could hand this listener a port that `free_addr` gave a
        // node process which has not bound it yet.
        let listener = tokio::net::TcpListener::bind(free_addr()?).await?;
        let dial = listener.local_addr()?;
        let (_task, link) = LinkEmulator::spawn(
            listener,
            *grpc,
            LinkProfile::delay(Duration::from_millis(1)),
            link_stop.clone().cancelled_owned(),
        )?;
        let http = free_addr()?;
        drafts.push(NodeProcess::start(
            Role::Draft,
            &draft_env(&format!("draft-{i}"), draft, http, dial),
        )?);
        draft_http.push(http);
        links.push(link);
    }
    core.wait(1, &mut drafts).await?;
    Ok(Fleet {
        coordinators: core.coordinators,
        verifiers: core.verifiers,
        _drafts: drafts,
        draft_http,
        links,
        link_stop,
    })
}

/// Injects one fault of `kind` on a target chosen by `rng`, and undoes it.
async fn inject(fleet: &mut Fleet, kind: usize, rng: &mut ChaosRng) -> Result<()> {
    let hold = Duration::from_millis(rng.random_range(500..2000));
    match kind {
        0 => {
            let i = rng.random_range(0..fleet.verifiers.len());
            fleet.verifiers[i].kill().await?;
            tokio::time::sleep(hold).await;
            fleet.verifiers[i].restart()?;
        }
        1 => {
            let i = rng.random_range(0..fleet.coordinators.len());
            fleet.coordinators[i].kill().await?;
            fleet.coordinators[i].restart()?;
        }
        2 | 3 => {
            let i = rng.random_range(0..fleet.links.len());
            let mode = if kind == 2 {
                CutMode::Reset
            } else {
                CutMode::Blackhole
            };
            fleet.links[i].cut_with(mode);
            tokio::time::sleep(hold).await;
            fleet.links[i].restore();
        }
        _ => {
            let i = rng.random_range(0..fleet.verifiers.len());
            fleet.verifiers[i].signal("STOP")?;
            tokio::time::sleep(hold).await;
            fleet.verifiers[i].signal("CONT")?;
        }
    }
    Ok(())
}

type ChaosRng = ChaCha8Rng;

#[derive(Default)]
struct Tally {
    completed: u64,
    mismatched: u64,
    refused: BTreeMap<String, u64>,
    resyncs: u64,
    accepted: u64,
    drafted: u64,
    latencies: Vec<Duration>,
}

/// A short, stable label for a failed request.
fn refusal_label(e: &anyhow::Error) -> String {
    let s = format!("{e:#}");
    for (needle, label) in [
        ("429", "HTTP 429 (overloaded)"),
        ("503", "HTTP 503 (unavailable)"),
        ("504", "HTTP 504 (timeout)"),
        ("server error mid-stream", "error mid-stream"),
        ("timed out", "client timeout"),
        ("sending the chat request", "connection failed"),
    ] {
        if s.contains(needle) {
            return label.into();
        }
    }
    "other".into()
}

/// Runs the soak.
pub async fn run(o: &ChaosOptions) -> Result<ChaosReport> {
    std::fs::create_dir_all(&o.dir)?;
    let target = o.dir.join("chaos-target.gguf");
    let draft = o.dir.join("chaos-draft.gguf");
    // The same weights quantised coarser: the draft agrees with the target most of the time and
    // disagrees sometimes, so answers mix acceptances, rejections and corrections.
    write_tiny_pair(&target, &draft, 11)?;
    let references = Arc::new(references(&target, &PROMPTS, o.max_tokens as usize).await?);

    let started = Instant::now();
    let mut fleet = start_fleet(&target, &draft).await?;
    let deadline = tokio::time::Instant::now() + o.duration;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let mut workers = Vec::new();
    for w in 0..o.streams {
        let base = format!("http://{}/v1", fleet.draft_http[w % fleet.draft_http.len()]);
        let (client, tally, references) = (client.clone(), tally.clone(), references.clone());
        let mut rng = ChaosRng::seed_from_u64(o.seed ^ (w as u64).wrapping_mul(0x9e37_79b9));
        let max_tokens = o.max_tokens;
        workers.push(tokio::spawn(async move {
            while tokio::time::Instant::now() < deadline {
                let p = rng.random_range(0..PROMPTS.len());
                let asked = Instant::now();
                let req = ChatRequest {
                    prompt: PROMPTS[p].into(),
                    max_tokens,
                    ..Default::default()
                };
                let r = stream_chat(&client, &base, &req, |_| {}).await;
                let refused = r.is_err();
                {
                    let mut t = tally.lock().expect("tally");
                    match r {
                        Ok(out) => {
                            t.completed += 1;
                            if out.token_ids != references[p] {
                                t.mismatched += 1;
                                tracing::error!(prompt = p, got = ?out.token_ids, want = ?references[p], "answer differs from the reference");
                            }
                            t.resyncs += out.stat("resyncs").unwrap_or(0.0) as u64;
                            t.accepted += out.stat("accepted").unwrap_or(0.0) as u64;
                            t.drafted += out.stat("drafted").unwrap_or(0.0) as u64;
                            t.latencies.push(asked.elapsed());
                        }
                        Err(e) => *t.refused.entry(refusal_label(&e)).or_default() += 1,
                    }
                }
                if refused {
                    // A refused client backs off a little, as a real one would.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }));
    }

    // The fault schedule: every kind once per cycle, in a seeded order, with seeded gaps.
    let mut rng = ChaosRng::seed_from_u64(o.seed);
    let mut faults: BTreeMap<String, u64> = BTreeMap::new();
    'schedule: loop {
        let mut order: Vec<usize> = (0..FAULTS.len()).collect();
        order.shuffle(&mut rng);
        for kind in order {
            let gap = Duration::from_millis(rng.random_range(1000..3000));
            if tokio::time::Instant::now() + gap >= deadline {
                break 'schedule;
            }
            tokio::time::sleep(gap).await;
            inject(&mut fleet, kind, &mut rng)
                .await
                .with_context(|| format!("injecting {}", FAULTS[kind]))?;
            *faults.entry(FAULTS[kind].to_string()).or_default() += 1;
        }
    }
    for w in workers {
        w.await?;
    }
    // Every node process must still be alive: a fault may stop a node only while injected.
    for (i, c) in fleet.coordinators.iter_mut().enumerate() {
        ensure!(c.is_running(), "coordinator {i} exited on its own");
    }
    for (i, v) in fleet.verifiers.iter_mut().enumerate() {
        ensure!(v.is_running(), "verify node {i} exited on its own");
    }
    fleet.link_stop.cancel();

    let t = std::mem::take(&mut *tally.lock().expect("tally"));
    let pct = |q: f64| quantile(&t.latencies, q).unwrap_or_default();
    Ok(ChaosReport {
        elapsed: started.elapsed(),
        completed: t.completed,
        mismatched: t.mismatched,
        refused: t.refused.clone(),
        faults,
        resyncs: t.resyncs,
        accepted: t.accepted,
        drafted: t.drafted,
        latency_p50: pct(0.5),
        latency_p99: pct(0.99),
    })
}
