//! Driving one session over a [`DraftClient`] stream the way a draft node does: draft γ
//! tokens, send the block (with the full history first and after `RESYNC_NEEDED`), retry
//! `OVERLOADED` / `UNAVAILABLE`, apply each verdict, and stop at the budget or a stop token.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use edgespec_proto::domain::{Block, CoordinatorMessage, DraftBlock, DraftMessage, ErrorCode};
use edgespec_specdec::SamplingParams;

use super::{target_next, DraftClient, VOCAB};

/// Draft seconds per token a scripted stream reports to the γ controller (drafting is free).
pub const DRAFT_S_PER_TOKEN: f32 = 0.001;

/// Where a driven session's drafts come from.
pub trait Drafter {
    /// At most `gamma` draft tokens to follow `committed` (prompt plus generated so far).
    fn draft(&mut self, committed: &[u32], gamma: usize) -> Vec<u32>;
}

impl<F: FnMut(&[u32], usize) -> Vec<u32>> Drafter for F {
    fn draft(&mut self, committed: &[u32], gamma: usize) -> Vec<u32> {
        self(committed, gamma)
    }
}

/// Drafts from the scripted target ([`target_next`]), wrong at every `miss_every`-th absolute
/// position (0: a perfect draft).
#[derive(Debug, Clone, Copy)]
pub struct ScriptedDrafter {
    /// Every n-th absolute position the draft guesses wrong.
    pub miss_every: usize,
}

impl Default for ScriptedDrafter {
    fn default() -> Self {
        Self { miss_every: 3 }
    }
}

impl Drafter for ScriptedDrafter {
    fn draft(&mut self, committed: &[u32], gamma: usize) -> Vec<u32> {
        let mut drafts = Vec::with_capacity(gamma);
        let mut prev = *committed.last().expect("non-empty");
        for i in 0..gamma {
            let pos = committed.len() + i;
            let mut t = target_next(prev);
            if self.miss_every > 0 && pos % self.miss_every == 0 {
                t = (t + 1) % VOCAB;
            }
            drafts.push(t);
            prev = t;
        }
        drafts
    }
}

/// A session to drive to completion.
#[derive(Debug, Clone)]
pub struct SessionScript {
    /// Draft-side session id (unique per stream).
    pub session_id: u64,
    /// Prompt tokens (non-empty).
    pub prompt: Vec<u32>,
    /// Tokens to generate.
    pub max_new_tokens: usize,
    /// Tokens that end the session once generated (end of text); empty: run to the budget.
    pub stop_tokens: Vec<u32>,
    /// Use this γ instead of the coordinator's `next_gamma` (`Some(0)`: target-only rounds).
    pub fixed_gamma: Option<u32>,
    /// Retries of OVERLOADED / UNAVAILABLE before giving up.
    pub max_retries: usize,
    /// How long to wait for one answer.
    pub answer_timeout: Duration,
}

impl SessionScript {
    /// A session with a 4-token prompt of the scripted vocabulary derived from `session_id`.
    pub fn new(session_id: u64, max_new_tokens: usize) -> Self {
        let first = (session_id % u64::from(VOCAB)) as u32;
        let prompt = (0..4).map(|i| (first + i) % VOCAB).collect();
        Self::with_prompt(session_id, prompt, max_new_tokens)
    }

    /// A session over `prompt`.
    pub fn with_prompt(session_id: u64, prompt: Vec<u32>, max_new_tokens: usize) -> Self {
        Self {
            session_id,
            prompt,
            max_new_tokens,
            stop_tokens: Vec::new(),
            fixed_gamma: None,
            max_retries: 200,
            answer_timeout: Duration::from_secs(10),
        }
    }
}

/// What happened to a session.
#[derive(Debug, Clone, Default)]
pub struct SessionReport {
    /// Prompt plus generated tokens.
    pub tokens: Vec<u32>,
    /// Verdicts received.
    pub rounds: usize,
    /// Draft tokens sent in blocks that got a verdict.
    pub drafted: usize,
    /// Draft tokens accepted.
    pub accepted: usize,
    /// Error codes received, in order.
    pub errors: Vec<ErrorCode>,
    /// `next_gamma` of each verdict.
    pub gammas: Vec<u32>,
    /// Verify node of each verdict.
    pub verifiers: Vec<String>,
    /// Send → verdict time of each round.
    pub latencies: Vec<Duration>,
    /// `coordinator_ns` of each verdict.
    pub coordinator_ns: Vec<u64>,
}

impl SessionReport {
    /// How many times the coordinator answered with `code`.
    pub fn count(&self, code: ErrorCode) -> usize {
        self.errors.iter().filter(|e| **e == code).count()
    }
}

/// A greedy block of `session_id` at `round` after `committed` (carrying it as history when
/// `with_history`), with neutral client fields: a budget of 1000 tokens, no send time, no
/// measured round trip. Callers override what they check.
pub fn greedy_block(
    session_id: u64,
    round: u64,
    committed: &[u32],
    with_history: bool,
    drafts: Vec<u32>,
) -> DraftBlock {
    DraftBlock {
        block: Block {
            session_id,
            round,
            committed_len: committed.len(),
            history: with_history.then(|| committed.to_vec()),
            draft_tokens: drafts,
            draft_probs: Vec::new(),
            sampling: SamplingParams::GREEDY,
        },
        max_new_tokens: 1000,
        client_send_unix_ns: 0,
        draft_s_per_token: DRAFT_S_PER_TOKEN,
        last_round_trip_ns: 0,
        drafted_ahead: false,
        method: edgespec_proto::domain::DraftMethod::Model,
        model_s_per_token: 0.0,
        model_token_mask: 0,
    }
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Where a driven session stands between rounds.
struct Progress {
    committed: Vec<u32>,
    gamma: u32,
    with_history: bool,
    round: u64,
    last_rt: u64,
    retries: usize,
}

impl Progress {
    /// Applies a verdict on the block that carried `drafts`, answered after `rt`.
    fn apply(
        &mut self,
        v: edgespec_proto::domain::Verdict,
        drafts: &[u32],
        rt: Duration,
        report: &mut SessionReport,
    ) -> Result<()> {
        if v.round != self.round {
            bail!("verdict for round {} while at {}", v.round, self.round);
        }
        self.last_rt = rt.as_nanos() as u64;
        let accepted = v.accepted.min(drafts.len());
        self.committed.extend_from_slice(&drafts[..accepted]);
        self.committed.push(v.next_token);
        if self.committed.len() != v.committed_len {
            bail!(
                "committed_len {} but the draft holds {}",
                v.committed_len,
                self.committed.len()
            );
        }
        self.gamma = v.next_gamma;
        self.with_history = false;
        self.round += 1;
        report.rounds += 1;
        report.drafted += drafts.len();
        report.accepted += accepted;
        report.gammas.push(v.next_gamma);
        report.verifiers.push(v.verifier_id);
        report.latencies.push(rt);
        report.coordinator_ns.push(v.coordinator_ns);
        Ok(())
    }
}

impl DraftClient {
    /// Drives a session with the scripted target's drafts, wrong at every third position
    /// ([`ScriptedDrafter::default`]).
    pub async fn run_session(&self, script: SessionScript) -> Result<SessionReport> {
        self.drive(script, &mut ScriptedDrafter::default()).await
    }

    /// Drives a session to `max_new_tokens` (or a stop token) like a draft node: each round
    /// asks `drafter` for γ tokens (the coordinator's `next_gamma`, or the script's fixed γ),
    /// sends history on the first block and after RESYNC_NEEDED, retries OVERLOADED /
    /// UNAVAILABLE, and applies verdicts. Closes the session at the end.
    pub async fn drive(
        &self,
        script: SessionScript,
        drafter: &mut impl Drafter,
    ) -> Result<SessionReport> {
        let sid = script.session_id;
        let mut rx = self.subscribe(sid);
        let mut report = SessionReport::default();
        let prompt_len = script.prompt.len();
        let mut at = Progress {
            committed: script.prompt.clone(),
            gamma: script.fixed_gamma.unwrap_or(self.welcome().initial_gamma),
            with_history: true,
            round: 1,
            last_rt: 0,
            retries: 0,
        };
        loop {
            let generated = at.committed.len() - prompt_len;
            let stopped = generated > 0
                && script
                    .stop_tokens
                    .contains(at.committed.last().expect("non-empty"));
            if generated >= script.max_new_tokens || stopped {
                break;
            }
            let remaining = script.max_new_tokens - generated;
            let g = (at.gamma as usize).min(remaining - 1);
            let mut drafts = drafter.draft(&at.committed, g);
            drafts.truncate(g);
            let block = DraftBlock {
                max_new_tokens: remaining as u32,
                client_send_unix_ns: unix_ns(),
                last_round_trip_ns: at.last_rt,
                ..greedy_block(
                    sid,
                    at.round,
                    &at.committed,
                    at.with_history,
                    drafts.clone(),
                )
            };
            let sent = Instant::now();
            self.send(DraftMessage::Block(block)).await?;
            let answer = tokio::time::timeout(script.answer_timeout, rx.recv())
                .await
                .map_err(|_| anyhow!("session {sid}: no answer to round {}", at.round))?
                .ok_or_else(|| anyhow!("session {sid}: stream closed"))?;
            match answer {
                CoordinatorMessage::Verdict(v) => {
                    at.apply(v, &drafts, sent.elapsed(), &mut report)?
                }
                CoordinatorMessage::Error(e) => {
                    report.errors.push(e.code);
                    match e.code {
                        ErrorCode::ResyncNeeded => at.with_history = true,
                        ErrorCode::Overloaded | ErrorCode::Unavailable => {
                            at.retries += 1;
                            if at.retries > script.max_retries {
                                bail!(
                                    "session {sid}: gave up after {} retries: {}",
                                    at.retries,
                                    e.message
                                );
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        _ => bail!("session {sid}: error {:?}: {}", e.code, e.message),
                    }
                }
                other => bail!("session {sid}: unexpected message {other:?}"),
            }
            if let Some(g) = script.fixed_gamma {
                at.gamma = g;
            }
        }
        self.close(sid).await?;
        report.tokens = at.committed;
        Ok(report)
    }
}
