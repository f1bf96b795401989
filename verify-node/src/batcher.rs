//! The batcher: one task owns the session table and turns concurrently arriving verify requests
//! (many `VerifyBatch` calls, each with many sessions) into ONE model forward.
//!
//! It waits for a request, then collects more for up to `window` after that request arrived or
//! until `max_batch_tokens` are gathered. A request that names a session already in the forward
//! waits for the next one (one session appears at most once per forward). Every block is checked
//! before the forward; a bad one is answered with its error and left out, so it never disturbs the
//! others. After the forward each session gets its verdict, its KV cache is truncated to the
//! committed tokens, and each request is answered with its results and the node's load.
//!
//! An open or resync longer than `max_prefill_tokens` is prefilled over several forwards
//! ([`prefill`]); its request is answered once its verdict is in, and every forward meanwhile
//! also serves whatever other requests are queued, so a long prompt never stalls the node.

mod prefill;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edgespec_model::{ModelError, ModelHandle, SeqRequest, SessionId};
use edgespec_proto::domain::{Block, ErrorCode, Outcome, SessionError};
pub use edgespec_proto::domain::{ItemResult, Timings};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::load::{BusyMeter, CostFit, Load};
use crate::metrics::Metrics;
use crate::sessions::{KvUse, Limits, Owner, Planned, Refusal, SessionKey, Sessions};
use crate::verdict::decide;
use crate::Error;
use prefill::{Piece, Prefill};

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
    /// Most prefill tokens of long opens/resyncs in one forward; a longer one is prefilled in
    /// chunks (at least `limits.max_block_tokens + 1`).
    pub max_prefill_tokens: usize,
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
        // The model's own figure until the caches are measured, so the KV budget holds from the
        // first batch on.
        let bytes_per_token = model.info().kv_bytes_per_token as f64;
        let actor = Actor {
            model,
            config,
            sessions: Sessions::new(config.limits),
            metrics,
            queued_tokens: queued_tokens.clone(),
            load_tx,
            busy: BusyMeter::new(Duration::from_secs(5)),
            cost: CostFit::new(0.95),
            bytes_per_token,
            kv_bytes: 0,
            last_progress_unix_ms: 0,
            epoch: Instant::now(),
            prefills: VecDeque::new(),
            held: HashMap::new(),
            next_held: 0,
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

/// A request between its planning and its answer: the results of its blocks so far and how
/// many of them still wait (for this forward or, after it, for a chunked prefill).
struct Held {
    arrived: Instant,
    reply: oneshot::Sender<BatchReply>,
    slots: Vec<Slot>,
    waiting: usize,
}

/// When and how big a forward was.
struct ForwardStats {
    start: Instant,
    end: Instant,
    rows: usize,
    sessions: usize,
}

/// A block (by held request and index) and its planned forward.
type Placed = (u64, usize, Planned);

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
    /// When the model thread last answered (Unix ms; 0: not yet).
    last_progress_unix_ms: u64,
    epoch: Instant,
    /// Long opens being prefilled, oldest first.
    prefills: VecDeque<Prefill>,
    /// Requests not answered yet, by a batcher-local id.
    held: HashMap<u64, Held>,
    next_held: u64,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut carry: VecDeque<VerifyJob> = VecDeque::new();
        let mut open = true;
        loop {
            let first = match carry.pop_front() {
                Some(job) => Some(job),
                // A prefill in progress keeps the model busy: take what is queued, never wait.
                None if !self.prefills.is_empty() => match rx.try_recv() {
                    Ok(Command::Verify(job)) => Some(job),
                    Ok(Command::Release(owner, ids, reply)) => {
                        let _ = reply.send(self.release(owner, &ids).await);
                        continue;
                    }
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        None
                    }
                },
                None if open => match rx.recv().await {
                    Some(Command::Verify(job)) => Some(job),
                    Some(Command::Release(owner, ids, reply)) => {
                        let _ = reply.send(self.release(owner, &ids).await);
                        continue;
                    }
                    None => break,
                },
                None => break,
            };
            let Some(first) = first else {
                self.serve(Collected::new()).await;
                continue;
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
            if self
                .cancel_prefill(&key, "the session was released during its prefill")
                .await
            {
                released += 1;
            }
            let Some(local) = self.sessions.local_id(&key) else {
                continue;
            };
            self.sessions.remove(local);
            released += 1;
            if let Err(e) = self.model.release(local).await {
                tracing::warn!(error = %e, "releasing a session's KV cache failed");
            }
        }
        let load = self.publish_load().await;
        self.answer_ready(None, load);
        released
    }

    /// Stops the prefill of `key`, if one is running, answering its block with `why`; true
    /// when there was one.
    async fn cancel_prefill(&mut self, key: &SessionKey, why: &str) -> bool {
        let Some(k) = self.prefills.iter().position(|p| &p.planned.key == key) else {
            return false;
        };
        let p = self.prefills.remove(k).expect("found");
        let b = &p.planned.block;
        let error = SessionError {
            session_id: b.session_id,
            round: b.round,
            code: ErrorCode::Unavailable,
            message: why.to_string(),
        };
        self.settle(p.held, p.slot, Err(error), false);
        if let Err(e) = self.model.release(p.planned.local).await {
            tracing::warn!(error = %e, "releasing a cancelled prefill's KV cache failed");
        }
        true
    }

    /// Records the result of block `slot` of held request `held`.
    fn settle(
        &mut self,
        held: u64,
        slot: usize,
        result: Result<Outcome, SessionError>,
        forwarded: bool,
    ) {
        if let Some(h) = self.held.get_mut(&held) {
            let s = &mut h.slots[slot];
            if s.result.is_none() {
                h.waiting -= 1;
            }
            s.result = Some(result);
            s.forwarded = forwarded;
        }
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

    /// Serves one collected batch (possibly empty, when only prefills are in progress): check,
    /// make room, forward (with the next prefill chunks), decide, truncate, answer.
    async fn serve(&mut self, batch: Collected) {
        let Collected {
            jobs,
            sessions: keys,
            tokens,
        } = batch;
        // Node-local ids of every session in the batch or being prefilled: none of them may be
        // evicted for it.
        let mut pinned: HashSet<SessionId> = keys
            .iter()
            .filter_map(|k| self.sessions.local_id(k))
            .collect();
        pinned.extend(self.prefills.iter().map(|p| p.planned.local));
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
        let mut planned = self.plan_jobs(jobs);
        for (_, _, p) in &planned {
            // The owner gave up on the earlier block (a retry after its timeout).
            self.cancel_prefill(&p.key, "superseded by a newer block of the session")
                .await;
        }
        self.make_room(&mut planned, &pinned).await;
        let planned = self.start_prefills(planned);
        let forward = self.forward(planned, &span).await;
        let load = self.publish_load().await;
        self.answer_ready(Some(&forward), load);
    }

    /// Turns the planned opens longer than the prefill budget into prefills (the rest is
    /// returned to be forwarded now).
    fn start_prefills(&mut self, planned: Vec<Placed>) -> Vec<Placed> {
        let budget = self.config.max_prefill_tokens;
        let mut now = Vec::with_capacity(planned.len());
        for (held, slot, p) in planned {
            if p.seq.start > 0 || p.seq.tokens.len() <= budget {
                now.push((held, slot, p));
                continue;
            }
            // A resync of a live session rebuilds its cache: until the verdict, the table must
            // not claim a state the cache no longer has.
            self.sessions.remove(p.local);
            self.prefills.push_back(Prefill {
                held,
                slot,
                planned: p,
                done: 0,
            });
        }
        now
    }

    /// Checks every block of every job against the limits and its session's state, and holds
    /// each job until it is answered. Returns the blocks to forward with their (held request,
    /// block) position; a block that failed its check is already settled.
    fn plan_jobs(&mut self, jobs: Vec<VerifyJob>) -> Vec<Placed> {
        let mut planned = Vec::new();
        for job in jobs {
            let id = self.next_held;
            self.next_held += 1;
            let mut slots = Vec::with_capacity(job.blocks.len());
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
                    Ok(p) => planned.push((id, i, p)),
                    Err(e) => slot.result = Some(Err(e)),
                }
                slots.push(slot);
            }
            let held = Held {
                arrived: job.arrived,
                reply: job.reply,
                waiting: slots.iter().filter(|s| s.result.is_none()).count(),
                slots,
            };
            self.held.insert(id, held);
        }
        planned
    }

    /// Takes the next pieces of the prefills in progress, within the prefill budget: final
    /// pieces join `verify`, chunks are returned with their requests.
    fn next_pieces(&mut self, verify: &mut Vec<Placed>) -> Vec<(Prefill, SeqRequest)> {
        let mut budget = self.config.max_prefill_tokens;
        let mut chunks = Vec::new();
        let mut waiting = VecDeque::new();
        while let Some(p) = self.prefills.pop_front() {
            match p.next_piece(budget) {
                Some(piece @ Piece::Chunk { start, end }) => {
                    budget -= end - start;
                    let seq = p.request(&piece);
                    chunks.push((p, seq));
                }
                Some(piece @ Piece::Final { start }) => {
                    budget -= p.planned.seq.tokens.len() - start;
                    let seq = p.request(&piece);
                    let mut planned = p.planned;
                    planned.seq = seq;
                    verify.push((p.held, p.slot, planned));
                }
                None => waiting.push_back(p),
            }
        }
        self.prefills = waiting;
        chunks
    }

    /// Runs one batched forward over the planned blocks and the next prefill pieces, decides
    /// each concluded block's verdict and truncates the KV caches to the committed tokens.
    async fn forward(&mut self, mut verify: Vec<Placed>, span: &tracing::Span) -> ForwardStats {
        let chunks = self.next_pieces(&mut verify);
        let seqs: Vec<SeqRequest> = verify
            .iter()
            .map(|(_, _, p)| p.seq.clone())
            .chain(chunks.iter().map(|(_, seq)| seq.clone()))
            .collect();
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
                for ((held, i, p), logits) in verify.into_iter().zip(&logits) {
                    let result = self.conclude(p, logits, &mut truncations).await;
                    self.settle(held, i, result, true);
                }
                // Chunks come back to the front, in order: the oldest prefill finishes first.
                for (mut p, seq) in chunks.into_iter().rev() {
                    p.done = seq.start + seq.tokens.len();
                    self.prefills.push_front(p);
                }
            }
            Err(e) => {
                tracing::error!(parent: span, error = %e, "the batched forward failed");
                let aborted = chunks.into_iter().map(|(p, _)| (p.held, p.slot, p.planned));
                for (held, i, p) in verify.into_iter().chain(aborted) {
                    self.settle(held, i, Err(forward_error(&p.block, &e)), false);
                    // An open under a fresh local id (or a prefill) may have left a cache the
                    // table never names; drop it so it cannot leak.
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

    /// Answers every held request whose blocks all have results (in order), with their
    /// timings (`forward`: the forward that just ran, if any) and the load.
    fn answer_ready(&mut self, forward: Option<&ForwardStats>, load: Load) {
        let ready: Vec<u64> = self
            .held
            .iter()
            .filter(|(_, h)| h.waiting == 0)
            .map(|(&id, _)| id)
            .collect();
        for id in ready {
            let h = self.held.remove(&id).expect("listed");
            self.answer(h, forward, load);
        }
    }

    /// Answers one request with its blocks' results (in order), their timings and the load.
    fn answer(&self, held: Held, forward: Option<&ForwardStats>, load: Load) {
        let Held {
            arrived,
            reply,
            slots,
            ..
        } = held;
        let now = Instant::now();
        let total_ns = nanos(now - arrived);
        let (queue_ns, forward_ns, rows, sessions) = match forward {
            Some(f) => (
                nanos(f.start.saturating_duration_since(arrived)),
                nanos(f.end - f.start),
                f.rows,
                f.sessions,
            ),
            None => (total_ns, 0, 0, 0),
        };
        let results = slots
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
                        batch_tokens: rows as u32,
                        batch_sessions: sessions as u32,
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

    /// Evicts the long-idle sessions [`Sessions::make_room`] chooses so the batch fits the
    /// session capacity and the KV budget, and refuses (OVERLOADED) the new sessions that do
    /// not fit without evicting a recently active one.
    async fn make_room(&mut self, planned: &mut Vec<Placed>, pinned: &HashSet<SessionId>) {
        let kv = KvUse {
            bytes: self.kv_bytes,
            budget: self.config.kv_budget_bytes,
            bytes_per_token: self.bytes_per_token,
        };
        let room = self.sessions.make_room(
            planned.iter().map(|(_, _, p)| p),
            pinned,
            kv,
            std::time::Instant::now(),
        );
        for victim in room.evict {
            self.metrics.evictions.inc();
            self.evict(victim).await;
        }
        if room.over_budget {
            tracing::warn!("KV budget exceeded by sessions of the current batch");
        }
        let Limits {
            capacity,
            evict_idle_after: idle,
            ..
        } = self.config.limits;
        for (k, why) in room.refused.into_iter().rev() {
            let (held, i, p) = planned.remove(k);
            let message = match why {
                Refusal::Capacity => format!(
                    "this verify node is full: its {capacity} session slots are held by \
                     sessions active within {idle:?}; retry later or on another node"
                ),
                Refusal::KvBudget => format!(
                    "this verify node's KV memory budget ({} bytes) cannot hold the new session; \
                     retry later or on another node",
                    self.config.kv_budget_bytes
                ),
            };
            let error = SessionError {
                session_id: p.block.session_id,
                round: p.block.round,
                code: ErrorCode::Overloaded,
                message,
            };
            self.settle(held, i, Err(error), false);
        }
    }

    /// Measures KV memory and publishes the current load. An answer from the model thread is
    /// its progress: a stuck model never answers, and its last progress time stays put.
    async fn publish_load(&mut self) -> Load {
        match self.model.kv_bytes().await {
            Ok(bytes) => {
                self.last_progress_unix_ms = crate::load::unix_ms(std::time::SystemTime::now());
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
            last_progress_unix_ms: self.last_progress_unix_ms,
            recent_sessions: self.sessions.recent(std::time::Instant::now()) as u32,
        };
        self.metrics.set_load(&load);
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
