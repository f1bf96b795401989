//! One generation: a task per request that drafts γ tokens, sends the block on the shared
//! stream, applies the verdict, streams the committed text to the client, and — with pipelining —
//! drafts the next block while the current one is being verified.

mod draft;
mod estimates;
mod extend;
mod output;
mod pipeline;
mod state;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edgespec_model::TextTokenizer;
use edgespec_proto::domain::{DraftBlock, ErrorCode, SessionError};
use edgespec_specdec::{DraftMethod, SamplingParams};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::connection::{Connection, SessionEvent, Verdict};
use crate::engine::Engine;
use crate::error::GenError;
use crate::lookup::LookupIndex;
use crate::metrics::Metrics;
use crate::suffix_cache::SuffixCache;
use draft::{BlockDraft, Drafter};
pub(crate) use estimates::Estimates;
pub use output::FinishReason;
use output::Output;
use pipeline::{Spec, StepFuture};
pub use state::GenStats;
use state::{SessionSpec, SessionState, Telemetry};

/// Events buffered toward a slow client before drafting waits.
const EVENT_CAPACITY: usize = 64;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Prompt tokens (at least one).
    pub prompt: Vec<u32>,
    /// Token budget.
    pub max_new_tokens: usize,
    /// Sampling parameters (temperature 0 = greedy).
    pub sampling: SamplingParams,
    /// Stop strings (trimmed from the output).
    pub stop: Vec<String>,
    /// How long the coordinator may refuse this request's first block as overloaded before the
    /// request fails with [`GenError::Overloaded`] (429) instead of retrying for up to
    /// `coordinator.timeout` (the node's `limits.admission_wait`).
    pub overload_wait: Duration,
    /// The prompt kind the client named, if any (metrics only).
    pub prompt_kind: Option<String>,
    /// How to draft (`None`: the node's `drafting.method`). A method that uses the draft model
    /// on a node without one fails the request ([`GenError::InvalidRequest`]).
    pub method: Option<DraftMethod>,
}

/// The end of a successful generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Completion tokens (eos included).
    pub completion_tokens: usize,
    /// Their ids, in order (sent to the client only when it asks: `return_token_ids`).
    pub token_ids: Vec<u32>,
    /// Speculation statistics.
    pub stats: GenStats,
}

/// What a generation reports, in order: text pieces, then `Done` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// The next piece of text.
    Text(String),
    /// Finished normally.
    Done(Summary),
    /// Failed; text sent so far stands.
    Failed(GenError),
}

/// Node-wide drafting configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DraftConfig {
    /// This node's cap on γ (`drafting.max_gamma`).
    pub max_gamma: usize,
    /// Sparse q size.
    pub top_k: usize,
    /// Pipelined drafting.
    pub pipeline: bool,
    /// How long the coordinator may leave a block unanswered (or keep refusing it).
    pub timeout: Duration,
    /// First retry delay after OVERLOADED/UNAVAILABLE.
    pub retry_initial: Duration,
    /// Largest retry delay.
    pub retry_max: Duration,
    /// Resyncs one request survives (`coordinator.max_resyncs`).
    pub max_resyncs: usize,
    /// How a request that names no method drafts (`drafting.method`).
    pub method: DraftMethod,
    /// Prompt lookup's n-gram lengths (`drafting.lookup.min_ngram..=max_ngram`).
    pub lookup_ngrams: (usize, usize),
}

/// What every session shares.
#[derive(Debug, Clone)]
pub(crate) struct SessionCtx {
    /// The draft model's batching engine; `None` on a lookup-only node (no draft model).
    pub engine: Option<Engine>,
    pub conn: Connection,
    pub tokenizer: TextTokenizer,
    pub metrics: Metrics,
    pub cfg: DraftConfig,
    /// Per-method draft cost (reported to the coordinator) and the coordinator's most recent γ
    /// for a session with room to use it: a new session starts with its method's instead of the
    /// Welcome's initial γ, so once the controller has found that speculation does not pay
    /// here (γ = 0) the next request does not spend a draft prefill and a full block finding
    /// out again.
    pub estimates: Arc<Estimates>,
    /// Recent sessions' tokens for lookups without a match of their own
    /// (`drafting.lookup.cache_tokens`; `None` when 0).
    pub suffix_cache: Option<Arc<SuffixCache>>,
}

/// Starts a generation; events arrive on the returned channel. Dropping it cancels the
/// generation (the session is closed at the coordinator).
pub(crate) fn spawn(
    ctx: SessionCtx,
    id: u64,
    req: GenerateRequest,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> mpsc::Receiver<GenEvent> {
    let (out, rx) = mpsc::channel(EVENT_CAPACITY);
    let method = req.method.unwrap_or(ctx.cfg.method);
    let welcome = ctx.conn.welcome();
    let initial_gamma = if !welcome.speculation_enabled {
        0
    } else {
        ctx.estimates
            .recent_gamma(method)
            .unwrap_or(welcome.initial_gamma)
    };
    // `Node::generate` refuses a model method on a node without a model.
    let drafter = match (method.uses_model(), &ctx.engine) {
        (true, Some(engine)) => Some(Drafter::new(id, engine.clone())),
        _ => None,
    };
    let lookup = (method != DraftMethod::Model).then(|| {
        let (min_n, max_n) = ctx.cfg.lookup_ngrams;
        let mut ix = LookupIndex::new(min_n, max_n);
        ix.extend(&req.prompt);
        ix
    });
    let output = Output::new(
        ctx.tokenizer.stream_decoder(),
        ctx.tokenizer.eos_token_ids().to_vec(),
        req.stop,
        req.max_new_tokens,
    );
    let state = SessionState::new(SessionSpec {
        id,
        prompt: req.prompt,
        max_new: req.max_new_tokens,
        sampling: req.sampling,
        initial_gamma,
        max_gamma: ctx.cfg.max_gamma,
        method,
    });
    let (events_tx, events) = mpsc::unbounded_channel();
    let driver = Driver {
        overload_wait: req.overload_wait,
        kind: ctx.metrics.kind_label(req.prompt_kind.as_deref()),
        method,
        drafter,
        lookup,
        ctx,
        id,
        state,
        output,
        events,
        out,
        last_round_trip_ns: 0,
        // Lookup until the coordinator's first verdict says the model pays: a model step would
        // first feed the draft model the whole prompt.
        hybrid_source: DraftMethod::Lookup,
        resyncs: 0,
    };
    let span = tracing::debug_span!("session", session = id);
    tokio::spawn(
        async move {
            let _permit = permit;
            driver.run(events_tx).await;
        }
        .instrument(span),
    );
    rx
}

/// Why the drafting loop stopped early.
enum Halt {
    Finish(FinishReason),
    ClientGone,
    Failed(GenError),
}

impl From<GenError> for Halt {
    fn from(e: GenError) -> Self {
        Halt::Failed(e)
    }
}

struct Driver {
    ctx: SessionCtx,
    id: u64,
    state: SessionState,
    output: Output,
    /// How this session drafts.
    method: DraftMethod,
    /// The session's view of its draft KV (`model` and `hybrid`).
    drafter: Option<Drafter>,
    /// The prompt lookup index over the committed tokens (`lookup` and `hybrid`).
    lookup: Option<LookupIndex>,
    events: mpsc::UnboundedReceiver<SessionEvent>,
    out: mpsc::Sender<GenEvent>,
    last_round_trip_ns: u64,
    /// Times the verify side lost this session's state so far.
    resyncs: usize,
    overload_wait: Duration,
    /// The `kind` label of this request's metrics.
    kind: String,
    /// How a hybrid session drafts its next block (`Verdict::next_method`): `Hybrid` (lookup
    /// where it matches, the model elsewhere), `Lookup` (the model's steps do not pay) or
    /// `Model` (lookup's proposals are accepted less often than the model's, and the model
    /// pays). Unused for the other methods.
    hybrid_source: DraftMethod,
}

impl Driver {
    async fn run(mut self, events_tx: mpsc::UnboundedSender<SessionEvent>) {
        self.ctx.metrics.active(1);
        self.ctx.conn.open(self.id, events_tx).await;
        let result = self.generate().await;
        if let Some(cache) = &self.ctx.suffix_cache {
            cache.insert(self.state.committed());
        }
        self.ctx.conn.close(self.id).await;
        if let Some(d) = &self.drafter {
            let (engine, session) = d.engine();
            engine.release(session).await;
        }
        self.ctx.metrics.active(-1);
        let event = match result {
            Halt::Finish(finish_reason) => GenEvent::Done(Summary {
                finish_reason,
                completion_tokens: self.output.produced(),
                token_ids: self.output.ids().to_vec(),
                stats: self.state.stats(),
            }),
            Halt::Failed(e) => GenEvent::Failed(e),
            Halt::ClientGone => {
                tracing::debug!(session = self.id, "client went away; session closed");
                return;
            }
        };
        let _ = self.out.send(event).await;
    }

    async fn generate(&mut self) -> Halt {
        let mut spec: Option<Spec> = None;
        let mut with_history = true;
        loop {
            let gamma = self.state.planned_gamma();
            let mut draft = match spec.take().and_then(|s| s.draft) {
                Some(d) => d,
                None => BlockDraft::new(self.state.committed().len(), self.state.sampling()),
            };
            draft.truncate(gamma);
            let drafted_ahead = draft.len() > 0;
            if let Err(h) = self.extend(&mut draft, gamma).await {
                return h;
            }
            let block = self
                .state
                .block(&draft, with_history, self.telemetry(drafted_ahead));
            let sent = Instant::now();
            self.ctx.conn.send(block.clone()).await;
            let (verdict, ahead) = match self.await_verdict(&block).await {
                Ok(v) => v,
                Err(h) => return self.halt(h).await,
            };
            with_history = false;
            self.last_round_trip_ns = sent.elapsed().as_nanos() as u64;
            self.hybrid_source = verdict.next_method.unwrap_or(DraftMethod::Hybrid);
            // Near the end of a request the coordinator shortens γ to the tokens left; such a
            // γ says nothing about the next request.
            if self.state.remaining() > self.ctx.cfg.max_gamma + 1 {
                self.ctx
                    .estimates
                    .set_recent_gamma(self.method, verdict.next_gamma);
            }
            let new = match self.state.apply(&block, &verdict) {
                Ok(new) => new,
                Err(e) => return Halt::Failed(e),
            };
            if let Some(ix) = self.lookup.as_mut() {
                ix.extend(&new);
            }
            let drafted = block.block.draft_tokens.len();
            self.ctx.metrics.round(
                &self.kind,
                self.method,
                drafted,
                verdict.accepted,
                sent.elapsed(),
            );
            if let Some(h) = self.emit(&new).await {
                return h;
            }
            spec = ahead.filter(|s| {
                let kept = verdict.accepted == gamma && s.guess == Some(verdict.next_token);
                self.ctx.metrics.pipeline(kept);
                kept
            });
            if spec.is_some() {
                self.state.note_pipelined();
            }
        }
    }

    /// Emits the text of newly committed tokens; `Some` when the generation is over.
    async fn emit(&mut self, tokens: &[u32]) -> Option<Halt> {
        self.ctx.metrics.emitted(tokens.len());
        for &t in tokens {
            let (text, finished) = self.output.push(t);
            if !text.is_empty() && self.out.send(GenEvent::Text(text)).await.is_err() {
                return Some(Halt::ClientGone);
            }
            if let Some(reason) = finished {
                return Some(Halt::Finish(reason));
            }
        }
        None
    }

    /// Turns an early stop into its final form (flushing held text on a normal finish).
    async fn halt(&mut self, h: Halt) -> Halt {
        if let Halt::Finish(reason) = h {
            let (text, _) = self.output.end(reason);
            if !text.is_empty() && self.out.send(GenEvent::Text(text)).await.is_err() {
                return Halt::ClientGone;
            }
        }
        h
    }

    fn telemetry(&self, drafted_ahead: bool) -> Telemetry {
        Telemetry {
            drafted_ahead,
            send_unix_ns: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            draft_s_per_token: self.ctx.estimates.cost(self.method),
            last_round_trip_ns: self.last_round_trip_ns,
            model_s_per_token: if self.drafter.is_some() {
                self.ctx.estimates.cost(DraftMethod::Model)
            } else {
                0.0
            },
        }
    }

    /// Waits for the verdict of `block`, resending it on resync/refusal, and drafting ahead in
    /// the meantime when pipelining is on.
    async fn await_verdict(&mut self, block: &DraftBlock) -> Result<(Verdict, Option<Spec>), Halt> {
        let cfg = self.ctx.cfg;
        let mut deadline = tokio::time::Instant::now() + cfg.timeout;
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut refused_since: Option<Instant> = None;
        let mut retry_delay = cfg.retry_initial;
        let mut pending = block.clone();
        let mut spec = self.plan_spec(block);
        let mut step: Option<StepFuture> = None;
        loop {
            if step.is_none() {
                step = spec.as_ref().and_then(|s| self.spec_step(s, block));
            }
            tokio::select! {
                ev = self.events.recv() => match ev {
                    Some(SessionEvent::Verdict(v)) => {
                        if let Some(f) = step.take() {
                            let done = f.await;
                            self.spec_step_done(&mut spec, done);
                        }
                        return Ok((v, spec));
                    }
                    Some(SessionEvent::Resync { round }) if round == pending.block.round => {
                        pending = self.resync(&pending).await?;
                    }
                    Some(SessionEvent::Resync { .. }) => {}
                    Some(SessionEvent::Error(e)) => match e.code {
                        ErrorCode::ResyncNeeded => {
                            pending = self.resync(&pending).await?;
                        }
                        ErrorCode::Overloaded | ErrorCode::Unavailable => {
                            let since = *refused_since.get_or_insert_with(Instant::now);
                            // Refused before its first token, the request was never really
                            // admitted: the client hears 429 (retry later) after its admission
                            // wait, not 503 after coordinator.timeout.
                            let first = e.code == ErrorCode::Overloaded
                                && self.output.produced() == 0;
                            if first && since.elapsed() >= self.overload_wait {
                                return Err(overloaded(&e).into());
                            }
                            if since.elapsed() >= cfg.timeout {
                                return Err(refused(&e, cfg.timeout).into());
                            }
                            // A first block's last retry comes as its admission wait ends.
                            let wait = if first {
                                retry_delay.min(self.overload_wait.saturating_sub(since.elapsed()))
                            } else {
                                retry_delay
                            };
                            retry_at = Some(tokio::time::Instant::now() + wait);
                            retry_delay = (retry_delay * 2).min(cfg.retry_max);
                            deadline = tokio::time::Instant::now() + cfg.timeout + retry_delay;
                        }
                        _ => return Err(session_error(e)),
                    },
                    Some(SessionEvent::Fatal(e)) => return Err(e.into()),
                    None => return Err(GenError::Internal("the coordinator connection stopped".into()).into()),
                },
                done = async { step.as_mut().expect("guarded").await }, if step.is_some() => {
                    step = None;
                    self.spec_step_done(&mut spec, done);
                },
                _ = tokio::time::sleep_until(retry_at.unwrap_or(deadline)), if retry_at.is_some() => {
                    retry_at = None;
                    self.ctx.metrics.retry();
                    self.resend(&pending, false).await;
                    deadline = tokio::time::Instant::now() + cfg.timeout;
                },
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(GenError::Unavailable(format!(
                        "the coordinator did not answer within {}",
                        humantime_secs(cfg.timeout)
                    )).into());
                },
                _ = self.out.closed() => return Err(Halt::ClientGone),
            }
        }
    }

    /// Resends `pending` with the full history, unless the request has used up its resyncs.
    /// The block keeps its deadline: a verify side that keeps losing the session (nodes
    /// flapping under load) must fail the request clearly, not keep it waiting forever.
    async fn resync(&mut self, pending: &DraftBlock) -> Result<DraftBlock, Halt> {
        self.resyncs += 1;
        let max = self.ctx.cfg.max_resyncs;
        if self.resyncs > max {
            return Err(GenError::Unavailable(format!(
                "the verify side kept losing this session ({max} resyncs); try again later"
            ))
            .into());
        }
        let block = self.state.with_history(pending);
        self.resend(&block, true).await;
        Ok(block)
    }

    async fn resend(&mut self, block: &DraftBlock, resync: bool) {
        if resync {
            self.state.note_resync();
            self.ctx.metrics.resync();
        }
        let mut b = block.clone();
        b.client_send_unix_ns = self.telemetry(false).send_unix_ns;
        self.ctx.conn.send(b).await;
    }
}

fn refused(e: &SessionError, timeout: Duration) -> GenError {
    GenError::Unavailable(format!(
        "the verify pool stayed unavailable for {}: {}",
        humantime_secs(timeout),
        e.message
    ))
}

fn overloaded(e: &SessionError) -> GenError {
    GenError::Overloaded(format!("the verify pool is overloaded: {}", e.message))
}

fn session_error(e: SessionError) -> Halt {
    match e.code {
        ErrorCode::ContextOverflow => Halt::Finish(FinishReason::Length),
        ErrorCode::ModelMismatch => Halt::Failed(GenError::ModelMismatch(format!(
            "the verify fleet's model does not match the draft model: {}",
            e.message
        ))),
        ErrorCode::InvalidArgument => Halt::Failed(GenError::Internal(format!(
            "the verify side rejected a draft block: {}",
            e.message
        ))),
        _ => Halt::Failed(GenError::Internal(format!(
            "the verify side failed: {}",
            e.message
        ))),
    }
}

fn humantime_secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}
