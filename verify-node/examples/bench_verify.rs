//! Verify-node throughput: verified (committed) tokens per second and forwards per committed
//! token for 1, 4, 8 and 16 concurrent sessions, batched (all sessions' blocks in one forward)
//! versus one session at a time (one block per forward), with the real Qwen2.5-Coder 1.5B target on this CPU. Batched mode sends one
//! `VerifyBatch` with every active session per round, the way the coordinator calls a node.
//!
//! Drafts are replayed: the target's own greedy continuation of each prompt is computed first
//! (through the node, γ = 0, batched), and each draft position is then corrupted with probability
//! `--corrupt` (deterministically), which gives a realistic acceptance rate without paying for a
//! draft model inside the measurement. Sessions are opened untimed; the timed part is the
//! speculative rounds until `--new-tokens` tokens are committed. Every run checks that the
//! committed output equals the target's greedy output.
//!
//! `cargo run --release -p edgespec-verify-node --example bench_verify -- --runs 3`

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use edgespec_model::fetch::{default_cache_dir, ensure_model, KnownModel};
use edgespec_model::{ChatMessage, TextTokenizer};
use edgespec_proto::pb;
use edgespec_proto::pb::verifier_client::VerifierClient;
use edgespec_testkit::harness::Running;
use edgespec_testkit::stats::median;
use edgespec_testkit::wire::greedy_item;
use edgespec_verify_node::{App, Settings};
use tonic::transport::Channel;

#[derive(Debug, Parser)]
struct Args {
    /// Runs per configuration (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Tokens committed per session in the timed part.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Draft block length γ.
    #[arg(long, default_value_t = 4)]
    gamma: usize,
    /// Probability that a replayed draft token is wrong.
    #[arg(long, default_value_t = 0.15)]
    corrupt: f64,
    /// Concurrent session counts.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    sessions: Vec<usize>,
}

const PROMPTS: [&str; 16] = [
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Implement quicksort in Python.",
    "Write a Rust struct `Stack<T>` backed by a Vec with push, pop and peek methods.",
    "Write a JavaScript function that checks whether a string is a valid IPv4 address.",
    "Write a Python script that counts word frequencies in a text file.",
    "Explain what a hash map is in two sentences.",
    "Write a SQL query that returns the ten most recent orders per customer.",
    "Write a bash script that renames every .txt file in a folder to .md.",
    "Write a Go function that reverses a slice of ints in place.",
    "Write a Python class for a bank account with deposit and withdraw.",
    "Write a C function that computes the length of a string.",
    "Explain the difference between a process and a thread.",
    "Write a Python function that checks whether a number is prime.",
    "Write a TypeScript interface for a user with a name, email and age.",
    "Write a Rust function that sums the even numbers of a slice.",
    "Write a Python generator that yields the lines of a file in reverse order.",
];

/// splitmix64: a deterministic hash for the corruption pattern.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

struct Ctx {
    client: VerifierClient<Channel>,
    fingerprint: String,
    vocab: u32,
    args: Args,
}

impl Ctx {
    async fn verify(&self, items: Vec<pb::VerifyItem>) -> Result<Vec<pb::VerifyOutcome>> {
        let resp = self
            .client
            .clone()
            .verify(pb::VerifyBatchRequest {
                batch_id: 0,
                coordinator_id: "test-coordinator".into(),
                fingerprint: self.fingerprint.clone(),
                items,
            })
            .await?
            .into_inner();
        resp.results
            .into_iter()
            .map(|r| match r.result {
                Some(pb::verify_result::Result::Outcome(o)) => Ok(o),
                other => anyhow::bail!("verify failed: {other:?}"),
            })
            .collect()
    }

    fn block(
        &self,
        session: u64,
        committed: &[u32],
        history: bool,
        drafts: Vec<u32>,
    ) -> pb::VerifyItem {
        let history = if history { committed } else { &[] };
        greedy_item(session, committed.len(), history, &drafts)
    }

    /// The true continuation with each position wrong with probability `corrupt`; the pattern
    /// depends on the prompt index, so batched and one-at-a-time runs see the same drafts.
    fn drafts(&self, prompt_index: u64, truth: &[u32], len: usize) -> Vec<u32> {
        let g = self.args.gamma.min(truth.len().saturating_sub(len));
        (0..g)
            .map(|i| {
                let t = truth[len + i];
                let h = mix(prompt_index.wrapping_mul(1_000_003) ^ ((len * 64 + i) as u64));
                if (h as f64 / u64::MAX as f64) < self.args.corrupt {
                    (t + 1) % self.vocab
                } else {
                    t
                }
            })
            .collect()
    }

    /// Target-only greedy continuations (γ = 0 rounds, all sessions batched).
    async fn truths(&self, prompts: &[Vec<u32>], len: usize) -> Result<Vec<Vec<u32>>> {
        let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
        let base = 1_000_000u64;
        for step in 0..len {
            let items = seqs
                .iter()
                .enumerate()
                .map(|(i, s)| self.block(base + i as u64, s, step == 0, vec![]))
                .collect();
            for (s, o) in seqs.iter_mut().zip(self.verify(items).await?) {
                s.push(o.next_token);
            }
        }
        self.release((0..prompts.len() as u64).map(|i| base + i).collect())
            .await?;
        Ok(seqs)
    }

    async fn release(&self, ids: Vec<u64>) -> Result<()> {
        self.client
            .clone()
            .release(pb::ReleaseRequest {
                session_ids: ids,
                coordinator_id: "test-coordinator".into(),
            })
            .await?;
        Ok(())
    }
}

struct Measure {
    tokens_per_s: f64,
    forwards_per_token: f64,
    rows_per_forward: f64,
    acceptance: f64,
}

async fn measure(
    ctx: &Ctx,
    app_metrics: &edgespec_verify_node::metrics::Metrics,
    prompts: &[Vec<u32>],
    truths: &[Vec<u32>],
    batched: bool,
    id_base: u64,
) -> Result<Measure> {
    let n = prompts.len();
    let ids: Vec<u64> = (0..n as u64).map(|i| id_base + i).collect();
    // Open every session untimed (γ = 0: one token each).
    let opens = ids
        .iter()
        .zip(prompts)
        .map(|(&id, p)| ctx.block(id, p, true, vec![]))
        .collect();
    let mut starts = Vec::new();
    for ((p, o), t) in prompts.iter().zip(ctx.verify(opens).await?).zip(truths) {
        let mut c = p.clone();
        c.push(o.next_token);
        ensure!(c[..] == t[..c.len()], "open diverged from greedy");
        starts.push(c);
    }
    let (forwards0, rows0) = (app_metrics.forwards.get(), app_metrics.forward_rows.get());
    let started = Instant::now();
    let mut states: Vec<(Vec<u32>, usize, usize)> =
        starts.iter().map(|c| (c.clone(), 0, 0)).collect();
    let targets: Vec<usize> = prompts
        .iter()
        .map(|p| p.len() + 1 + ctx.args.new_tokens)
        .collect();
    loop {
        let active: Vec<usize> = (0..n).filter(|&i| states[i].0.len() < targets[i]).collect();
        if active.is_empty() {
            break;
        }
        // Batched: one VerifyBatch with every active session per round (as the coordinator
        // sends them). One at a time: one block per call, round-robin.
        let groups: Vec<Vec<usize>> = if batched {
            vec![active]
        } else {
            active.into_iter().map(|i| vec![i]).collect()
        };
        for group in groups {
            let drafts: Vec<Vec<u32>> = group
                .iter()
                .map(|&i| ctx.drafts(i as u64, &truths[i], states[i].0.len()))
                .collect();
            let items = group
                .iter()
                .zip(&drafts)
                .map(|(&i, d)| ctx.block(ids[i], &states[i].0, false, d.clone()))
                .collect();
            for ((&i, d), o) in group.iter().zip(&drafts).zip(ctx.verify(items).await?) {
                let st = &mut states[i];
                let a = o.accepted as usize;
                st.1 += d.len();
                st.2 += a;
                st.0.extend_from_slice(&d[..a]);
                st.0.push(o.next_token);
            }
        }
    }
    let results = states;
    let wall = started.elapsed().as_secs_f64();
    let forwards = app_metrics.forwards.get() - forwards0;
    let rows = app_metrics.forward_rows.get() - rows0;
    let (mut emitted, mut drafted, mut accepted) = (0usize, 0usize, 0usize);
    for (((c, d, a), s), t) in results.iter().zip(&starts).zip(truths) {
        ensure!(
            c[..] == t[..c.len()],
            "speculative output diverged from greedy"
        );
        emitted += c.len() - s.len();
        drafted += d;
        accepted += a;
    }
    ctx.release(ids).await?;
    Ok(Measure {
        tokens_per_s: emitted as f64 / wall,
        forwards_per_token: forwards as f64 / emitted as f64,
        rows_per_forward: rows as f64 / forwards.max(1) as f64,
        acceptance: accepted as f64 / drafted.max(1) as f64,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let target = tokio::task::spawn_blocking(|| {
        ensure_model(KnownModel::Qwen15bTarget, &default_cache_dir(), true)
    })
    .await??;
    let tokenizer = TextTokenizer::from_gguf(&target)?;
    let max_sessions = *args.sessions.iter().max().context("no session counts")?;
    ensure!(
        max_sessions <= PROMPTS.len(),
        "at most {} sessions",
        PROMPTS.len()
    );
    let prompts: Vec<Vec<u32>> = PROMPTS[..max_sessions]
        .iter()
        .map(|p| {
            tokenizer.encode(&tokenizer.apply_chat_template(&[ChatMessage::new("user", *p)], true))
        })
        .collect::<Result<_, _>>()?;

    let mut settings = Settings::default();
    settings.model.path = target.clone();
    settings.server.listen = "127.0.0.1:0".parse()?;
    settings.sessions.max_block_tokens = args.gamma.max(1);
    settings.batching.window = Duration::from_millis(2);
    settings.batching.max_batch_tokens = 4096;
    settings.tls = edgespec_runtime::tls::TlsSettings::plaintext();
    let app = App::build(settings).await?;
    let addr = app.grpc_addr();
    let fingerprint = app.facts().fingerprint.clone();
    let vocab = app.facts().vocab_size as u32;
    let metrics = app.metrics();
    let server = Running::spawn(|shutdown| app.run(shutdown));
    let client = VerifierClient::connect(format!("http://{addr}")).await?;
    let ctx = Ctx {
        client,
        fingerprint,
        vocab,
        args,
    };
    let truth_len = 1 + ctx.args.new_tokens + ctx.args.gamma + 1;
    eprintln!(
        "computing the greedy reference for {max_sessions} prompts ({truth_len} tokens each)..."
    );
    let truths = ctx.truths(&prompts, truth_len).await?;

    let mut rows: HashMap<(usize, bool), Vec<Measure>> = HashMap::new();
    let mut id_base = 0u64;
    for run in 0..ctx.args.runs {
        for &n in &ctx.args.sessions {
            for batched in [true, false] {
                id_base += 100;
                let m = measure(
                    &ctx,
                    &metrics,
                    &prompts[..n],
                    &truths[..n],
                    batched,
                    id_base,
                )
                .await?;
                eprintln!(
                    "run {run} sessions {n} {}: {:.1} tok/s, {:.3} forwards/token",
                    if batched { "batched" } else { "one-at-a-time" },
                    m.tokens_per_s,
                    m.forwards_per_token
                );
                rows.entry((n, batched)).or_default().push(m);
            }
        }
    }
    println!(
        "\nγ = {}, {} new tokens per session, draft corruption {:.2}, median of {} runs\n",
        ctx.args.gamma, ctx.args.new_tokens, ctx.args.corrupt, ctx.args.runs
    );
    println!("| sessions | mode | verified tokens/s | forwards / committed token | rows / forward | acceptance |");
    println!("|---:|---|---:|---:|---:|---:|");
    for &n in &ctx.args.sessions {
        for batched in [true, false] {
            let ms = &rows[&(n, batched)];
            let med = |f: fn(&Measure) -> f64| {
                median(&ms.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN)
            };
            println!(
                "| {n} | {} | {:.1} | {:.3} | {:.1} | {:.2} |",
                if batched { "batched" } else { "one at a time" },
                med(|m| m.tokens_per_s),
                med(|m| m.forwards_per_token),
                med(|m| m.rows_per_forward),
                med(|m| m.acceptance),
            );
        }
    }
    server.stop().await??;
    Ok(())
}
