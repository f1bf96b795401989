//! The batcher: one task owns the session table and turns concurrently arriving verify requests
//! (many `VerifyBatch` calls, each with many sessions) into ONE model forward.
//!
//! It waits for a request, then collects more for up to `window` after that request arrived or
//! until `max_batch_tokens` are gathered. A request that names a session already in the forward
//! waits for the next one (one session appears at most once per forward). Every block is checked
//! before the forward; a bad one is answered with its error and left out, so it never disturbs the
//! others. After the forward each session gets its verdict, its KV cache is truncated to the
//! committed tokens, and each request is answered with its results and the node's load.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edgespec_model::{ModelError, ModelHandle, SeqRequest, SessionId};
use edgespec_proto::domain::{Block, ErrorCode, Outcome, SessionError};
pub use edgespec_proto::domain::{ItemResult, Timings};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::load::{BusyMeter, CostFit, Load};
use crate::metrics::Metrics;
use crate::sessions::{KvUse, Limits, Owner, Planned, SessionKey, Sessions};
use crate::verdict::decide;
use crate::Error;

/// Commands queued for the batcher before callers feel back-pressure.
const COMMAND_CAPACITY: usize = 1024;

/// How the batcher groups work and bounds memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatcherConfig {
    /// Limits every block is checked against.
    pub limits: Limits,
    /// Collection window after the first queued request.
    pub window: Duration,
    /// Token budget of one forward.
    pub max_batch_tokens: usize,
    /// KV memory budget; idle sessions are evicted (LRU) to stay under it.
    pub kv_budget_bytes: u64,
}

/// The answer for one request: results in block order plus the load right after its batch.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchReply {
    /// One result per block, in order.
    pub results: Vec<ItemResult>,
    /// Node load after the batch.
    pub load: Load,
}

struct VerifyJob {
    owner: Owner,
    blocks: Vec<Block>,
    tokens: usize,
    arrived: Instant,
    reply: oneshot::Sender<BatchReply>,
    span: tracing::Span,
}

enum Command {
    Verify(VerifyJob),
    Release(Owner, Vec<u64>, oneshot::Sender<usize>),
}

/// Handle to the batcher task. When every clone is dropped the task serves what is queued and
/// stops.
#[derive(Debug, Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Command>,
    queued_tokens: Arc<AtomicUsize>,
    load: watch::Receiver<Load>,
}

impl Batcher {
    /// Starts the batcher task on the current runtime.
    pub fn spawn(
        model: ModelHandle,
        config: BatcherConfig,
        metrics: Arc<Metrics>,
    ) -> (Batcher, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(COMMAND_CAPACITY);
        let queued_tokens = Arc::new(AtomicUsize::new(0));
        let initial = Load {
            kv_budget_bytes: config.kv_budget_bytes,
            ..Load::default()
        };
        let (load_tx, load_rx) = watch::channel(initial);
        let actor = Actor {
            model,
            config,
            sessions: Sessions::new(config.limits),
            metrics,
            queued_tokens: queued_tokens.clone(),
            load_tx,
            busy: BusyMeter::new(Duration::from_secs(5)),
            cost: CostFit::new(0.95),
            bytes_per_token: 0.0,
            kv_bytes: 0,
            epoch: Instant::now(),
        };
        let task = tokio::spawn(actor.run(rx));
        let handle = Batcher {
            tx,
            queued_tokens,
            load: load_rx,
        };
        (handle, task)
    }

    /// Verifies `blocks` (distinct sessions of `owner`) in the next forward; `arrived` is when
    /// the request reached the node.
    pub async fn verify(
        &self,
        owner: Owner,
        blocks: Vec<Block>,
        arrived: Instant,
    ) -> Result<BatchReply, Error> {
        let tokens = blocks.iter().map(Block::forward_tokens).sum();
        let (reply, rx) = oneshot::channel();
        let job = VerifyJob {
            owner,
            blocks,
            tokens,
            arrived,
            reply,
            span: tracing::Span::current(),
        };
        self.queued_tokens.fetch_add(tokens, Ordering::Relaxed);
        if self.tx.send(Command::Verify(job)).await.is_err() {
            self.queued_tokens.fetch_sub(tokens, Ordering::Relaxed);
            return Err(Error::Stopped);
        }
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Drops the state of `owner`'s sessions `ids`; returns how many were known.
    pub async fn release(&self, owner: Owner, ids: Vec<u64>) -> Result<usize, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Release(owner, ids, reply))
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// The latest load, with the tokens queued right now.
    pub fn load(&self) -> Load {
        let mut load = *self.load.borrow();
        load.queued_tokens = self.queued_tokens.load(Ordering::Relaxed) as u32;
        load
    }
}

/// Requests gathered for one forward.
struct Collected {
    jobs: Vec<VerifyJob>,
    sessions: HashSet<SessionKey>,
    tokens: usize,
}

impl Collected {
    fn new() -> Self {
        Self {
            jobs: Vec::new(),
            sessions: HashSet::new(),
            tokens: 0,
        }
    }

    /// Takes `job` unless it shares a session with the batch or would push a non-empty batch
    /// over the token budget.
    fn try_add(&mut self, job: VerifyJob, max_tokens: usize) -> Result<(), VerifyJob> {
        let key = |b: &Block| SessionKey {
            owner: job.owner.clone(),
            id: b.session_id,
        };
        let clash = job.blocks.iter().any(|b| self.sessions.contains(&key(b)));
        if !self.jobs.is_empty() && (clash || self.tokens + job.tokens > max_tokens) {
            return Err(job);
        }
        let keys: Vec<SessionKey> = job.blocks.iter().map(key).collect();
        self.sessions.extend(keys);
        self.tokens += job.tokens;
        self.jobs.push(job);
        Ok(())
    }
}

/// One block's way through a batch.
struct Slot {
    session_id: SessionId,
    round: u64,
    result: Option<Result<Outcome, SessionError>>,
    forwarded: bool,
}

/// When and how big the batch's forward was.
struct ForwardStats {
    start: Instant,
    end: Instant,
    rows: usize,
    sessions: usize,
}

struct Actor {
    model: ModelHandle,
    config: BatcherConfig,
    sessions: Sessions,
    metrics: Arc<Metrics>,
    queued_tokens: Arc<AtomicUsize>,
    load_tx: watch::Sender<Load>,
    busy: BusyMeter,
    cost: CostFit,
    /// Measured KV bytes per cached token (0 until the first forward).
    bytes_per_token: f64,
    /// KV bytes after the last batch.
    kv_bytes: u64,
    epoch: Instant,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut carry: VecDeque<VerifyJob> = VecDeque::new();
        let mut open = true;
        loop {
            let first = match carry.pop_front() {
                Some(job) => job,
                None if open => match rx.recv().await {
                    Some(Command::Verify(job)) => job,
                    Some(Command::Release(owner, ids, reply)) => {
                        let _ = reply.send(self.release(owner, &ids).await);
                        continue;
                    }
                    None => break,
                },
                None => break,
            };
            let deadline = first.arrived + self.config.window;
            let max = self.config.max_batch_tokens;
            let mut batch = Collected::new();
            let _ = batch.try_add(first, max);
            let mut later = VecDeque::new();
            for job in carry.drain(..) {
                if let Err(job) = batch.try_add(job, max) {
                    later.push_back(job);
                }
            }
            carry = later;
            while open && batch.tokens < max && Instant::now() < deadline {
                let cmd = tokio::select! {
                    cmd = rx.recv() => cmd,
                    () = tokio::time::sleep_until(deadline) => break,
                };
                match cmd {
                    Some(Command::Verify(job)) => {
                        if let Err(job) = batch.try_add(job, max) {
                            carry.push_back(job);
                        }
                    }
                    Some(Command::Release(owner, ids, reply)) => {
                        let _ = reply.send(self.release(owner, &ids).await);
                    }
                    None => open = false,
                }
            }
            self.serve(batch).await;
        }
        tracing::debug!("batcher stopped");
    }

    async fn release(&mut self, owner: Owner, ids: &[u64]) -> usize {
        let mut released = 0;
        for &id in ids {
            let key = SessionKey {
                owner: owner.clone(),
                id,
            };
            let Some(local) = self.sessions.local_id(&key) else {
                continue;
            };
            self.sessions.remove(local);
            released += 1;
            if let Err(e) = self.model.release(local).await {
                tracing::warn!(error = %e, "releasing a session's KV cache failed");
            }
        }
        self.publish_load().await;
        released
    }

    async fn evict(&mut self, id: SessionId) {
        if let Some(s) = self.sessions.remove(id) {
            // Keep the KV estimate current until the next measurement.
            let freed = (s.committed_len - 1) as f64 * self.bytes_per_token;
            self.kv_bytes = self.kv_bytes.saturating_sub(freed as u64);
        }
        if let Err(e) = self.model.release(id).await {
            tracing::warn!(error = %e, "evicting a session's KV cache failed");
        }
        tracing::debug!("evicted an idle session");
    }

    /// Serves one collected batch: check, make room, forward, decide, truncate, answer.
    async fn serve(&mut self, batch: Collected) {
        let Collected {
            jobs,
            sessions: keys,
            tokens,
        } = batch;
        // Node-local ids of every session in the batch: none of them may be evicted for it.
        let pinned: HashSet<SessionId> = keys
            .iter()
            .filter_map(|k| self.sessions.local_id(k))
            .collect();
        self.queued_tokens.fetch_sub(tokens, Ordering::Relaxed);
        let span = tracing::debug_span!(
            "verify_batch",
            requests = jobs.len(),
            sessions = pinned.len(),
            rows = tracing::field::Empty
        );
        for job in &jobs {
            span.follows_from(job.span.id());
        }
        let (mut slots, mut planned, replies) = self.plan_jobs(jobs);
        self.make_room(&mut planned, &mut slots, &pinned).await;
        let forward = self.forward(planned, &mut slots, &span).await;
        let load = self.publish_load().await;
        self.answer(replies, slots, &forward, load);
    }

    /// Checks every block of every job against the limits and its session's state. Returns one
    /// slot per block (already answered when the check failed), the blocks to forward with
    /// their (job, block) position, and each job's arrival and reply channel.
    #[allow(clippy::type_complexity)]
    fn plan_jobs(
        &mut self,
        jobs: Vec<VerifyJob>,
    ) -> (
        Vec<Vec<Slot>>,
        Vec<(usize, usize, Planned)>,
        Vec<(Instant, oneshot::Sender<BatchReply>)>,
    ) {
        let mut slots: Vec<Vec<Slot>> = Vec::with_capacity(jobs.len());
        let mut planned = Vec::new();
        let mut replies = Vec::with_capacity(jobs.len());
        for (j, job) in jobs.into_iter().enumerate() {
            let mut row = Vec::with_capacity(job.blocks.len());
            for (i, block) in job.blocks.into_iter().enumerate() {
                let mut slot = Slot {
                    session_id: block.session_id,
                    round: block.round,
                    result: None,
                    forwarded: false,
                };
                let key = SessionKey {
                    owner: job.owner.clone(),
                    id: block.session_id,
                };
                let local = self.sessions.resolve(&key);
                match self.sessions.plan(key, local, block) {
                    Ok(p) => planned.push((j, i, p)),
                    Err(e) => slot.result = Some(Err(e)),
                }
                row.push(slot);
            }
            slots.push(row);
            replies.push((job.arrived, job.reply));
        }
        (slots, planned, replies)
    }

    /// Runs the one batched forward over the planned blocks, decides each block's verdict into
    /// its slot and truncates the KV caches to the committed tokens.
    async fn forward(
        &mut self,
        planned: Vec<(usize, usize, Planned)>,
        slots: &mut [Vec<Slot>],
        span: &tracing::Span,
    ) -> ForwardStats {
        let seqs: Vec<SeqRequest> = planned.iter().map(|(_, _, p)| p.seq.clone()).collect();
        let rows: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let sessions = seqs.len();
        span.record("rows", rows);
        let start = Instant::now();
        let output = if seqs.is_empty() {
            Ok(Vec::new())
        } else {
            self.model
                .forward_batch(seqs)
                .instrument(span.clone())
                .await
        };
        let end = Instant::now();
        let forward_s = (end - start).as_secs_f64();
        if sessions > 0 {
            self.metrics.forwards.inc();
            self.metrics.forward_rows.inc_by(rows as u64);
            self.metrics.forward_seconds.observe(forward_s);
            self.busy
                .record(forward_s, (end - self.epoch).as_secs_f64());
            if output.is_ok() {
                self.cost.observe(rows, forward_s);
            }
        }
        let mut truncations = Vec::new();
        match output {
            Ok(logits) => {
                for ((j, i, p), logits) in planned.into_iter().zip(&logits) {
                    let result = self.conclude(p, logits, &mut truncations).await;
                    let slot = &mut slots[j][i];
                    slot.result = Some(result);
                    slot.forwarded = true;
                }
            }
            Err(e) => {
                tracing::error!(parent: span, error = %e, "the batched forward failed");
                for (j, i, p) in planned {
                    slots[j][i].result = Some(Err(forward_error(&p.block, &e)));
                    // An open under a fresh local id may have left a cache the table never
                    // names; drop it so it cannot leak.
                    if self.sessions.get(p.local).is_none() {
                        let _ = self.model.release(p.local).await;
                    }
                }
            }
        }
        for (id, len) in truncations {
            if let Err(e) = self.model.truncate(id, len).await {
                tracing::warn!(parent: span, error = %e, "truncating a KV cache failed");
            }
        }
        ForwardStats {
            start,
            end,
            rows,
            sessions,
        }
    }

    /// Answers every job with its blocks' results (in order), their timings and the load.
    fn answer(
        &self,
        replies: Vec<(Instant, oneshot::Sender<BatchReply>)>,
        slots: Vec<Vec<Slot>>,
        forward: &ForwardStats,
        load: Load,
    ) {
        let forward_ns = nanos(forward.end - forward.start);
        for ((arrived, reply), row) in replies.into_iter().zip(slots) {
            let total_ns = nanos(Instant::now() - arrived);
            let queue_ns = nanos(forward.start.saturating_duration_since(arrived));
            let results = row
                .into_iter()
                .inspect(|s| {
                    if let Some(Err(e)) = &s.result {
                        self.metrics.session_error(e.code.label());
                    }
                })
                .map(|s| ItemResult {
                    session_id: s.session_id,
                    round: s.round,
                    result: s.result.unwrap_or_else(|| {
                        Err(internal(s.session_id, s.round, "the block was not served"))
                    }),
                    timings: if s.forwarded {
                        Timings {
                            queue_ns,
                            forward_ns,
                            total_ns,
                            batch_tokens: forward.rows as u32,
                            batch_sessions: forward.sessions as u32,
                        }
                    } else {
                        Timings {
                            queue_ns,
                            total_ns,
                            ..Timings::default()
                        }
                    },
                })
                .collect();
            let _ = reply.send(BatchReply { results, load });
        }
    }

    /// Applies the acceptance rule to one forwarded block and records the new session state.
    async fn conclude(
        &mut self,
        p: Planned,
        logits: &edgespec_model::SeqLogits,
        truncations: &mut Vec<(SessionId, usize)>,
    ) -> Result<Outcome, SessionError> {
        let b = &p.block;
        match decide(b, logits) {
            Ok(v) => {
                let n = b.committed_len;
                let committed_len = n + v.accepted + 1;
                let m = &self.metrics;
                m.rounds.inc();
                m.drafted_tokens.inc_by(b.draft_tokens.len() as u64);
                m.accepted_tokens.inc_by(v.accepted as u64);
                m.emitted_tokens.inc_by(v.accepted as u64 + 1);
                self.sessions
                    .commit(&p.key, p.local, committed_len, v.next_token);
                if v.accepted < b.draft_tokens.len() {
                    truncations.push((p.local, n + v.accepted));
                }
                Ok(Outcome {
                    accepted: v.accepted,
                    next_token: v.next_token,
                    committed_len,
                })
            }
            Err(e) => {
                tracing::error!(error = %e, "verification failed after the forward");
                // An open replaced the session's cache; without a verdict the old state is gone.
                if p.is_open() {
                    self.evict(p.local).await;
                }
                Err(internal(
                    b.session_id,
                    b.round,
                    "the target distribution could not be sampled",
                ))
            }
        }
    }

    /// Evicts the idle sessions [`Sessions::make_room`] chooses so the batch fits the session
    /// capacity and the KV budget, and refuses the opens that cannot get a slot.
    async fn make_room(
        &mut self,
        planned: &mut Vec<(usize, usize, Planned)>,
        slots: &mut [Vec<Slot>],
        pinned: &HashSet<SessionId>,
    ) {
        let kv = KvUse {
            bytes: self.kv_bytes,
            budget: self.config.kv_budget_bytes,
            bytes_per_token: self.bytes_per_token,
        };
        let room = self
            .sessions
            .make_room(planned.iter().map(|(_, _, p)| p), pinned, kv);
        for victim in room.evict {
            self.metrics.evictions.inc();
            self.evict(victim).await;
        }
        if room.over_budget {
            tracing::warn!("KV budget exceeded by sessions of the current batch");
        }
        let capacity = self.config.limits.capacity;
        for k in room.refused.into_iter().rev() {
            let (j, i, p) = planned.remove(k);
            slots[j][i].result = Some(Err(SessionError {
                session_id: p.block.session_id,
                round: p.block.round,
                code: ErrorCode::Overloaded,
                message: format!(
                    "this verify node holds its maximum of {capacity} sessions and all are busy"
                ),
            }));
        }
    }

    /// Measures KV memory and publishes the current load.
    async fn publish_load(&mut self) -> Load {
        match self.model.kv_bytes().await {
            Ok(bytes) => {
                self.kv_bytes = bytes as u64;
                let cached = self.sessions.cached_tokens();
                if cached > 0 && bytes > 0 {
                    self.bytes_per_token = bytes as f64 / cached as f64;
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading KV bytes failed"),
        }
        let (base, per_token) = self.cost.estimate();
        let load = Load {
            active_sessions: self.sessions.len() as u32,
            kv_bytes: self.kv_bytes,
            kv_budget_bytes: self.config.kv_budget_bytes,
            queued_tokens: self.queued_tokens.load(Ordering::Relaxed) as u32,
            busy_fraction: self
                .busy
                .fraction((Instant::now() - self.epoch).as_secs_f64()),
            verify_base_s: base as f32,
            verify_per_token_s: per_token as f32,
        };
        self.load_tx.send_replace(load);
        load
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn internal(session_id: SessionId, round: u64, message: &str) -> SessionError {
    SessionError {
        session_id,
        round,
        code: ErrorCode::Internal,
        message: message.to_string(),
    }
}

/// A failed forward as the per-session error of one of its blocks (no state changed). Every
/// block was checked before the forward, so a failure here is the node's, not the request's.
fn forward_error(b: &Block, _e: &ModelError) -> SessionError {
    internal(b.session_id, b.round, "the target model's forward failed")
}
