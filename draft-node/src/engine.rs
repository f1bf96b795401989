//! The draft engine: one task that owns the draft model handle and batches the single-step
//! forwards of every drafting session into one `forward_batch` (state struct [`StepQueue`] +
//! thin actor). Sessions ask for "truncate my KV to `start`, append `tokens`, give me the logits
//! of the last position"; whatever arrives while a forward runs goes into the next one.

use std::collections::{HashSet, VecDeque};
use std::time::Instant;

use edgespec_model::{ModelHandle, SeqRequest};
use tokio::sync::{mpsc, oneshot};

use crate::error::GenError;
use crate::metrics::Metrics;

/// Commands queued before senders feel back-pressure.
const COMMAND_CAPACITY: usize = 1024;

/// One session's forward step.
#[derive(Debug)]
pub(crate) struct Step {
    /// Session (draft KV) id.
    pub session: u64,
    /// Cached tokens to keep.
    pub start: usize,
    /// Tokens to append (at least one).
    pub tokens: Vec<u32>,
    reply: oneshot::Sender<Result<Vec<f32>, GenError>>,
}

enum Command {
    Step(Step),
    Release(u64),
}

/// Pending steps, batched so that a session appears at most once per forward.
#[derive(Debug, Default)]
pub(crate) struct StepQueue {
    pending: VecDeque<Step>,
}

impl StepQueue {
    /// Queue a step.
    pub fn push(&mut self, step: Step) {
        self.pending.push_back(step);
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Up to `max` steps of distinct sessions in arrival order. Steps whose caller gave up are
    /// dropped; a second step of a session already in the batch waits for the next one.
    pub fn take_batch(&mut self, max: usize) -> Vec<Step> {
        let mut batch = Vec::new();
        let mut seen = HashSet::new();
        let mut deferred = VecDeque::new();
        while let Some(step) = self.pending.pop_front() {
            if step.reply.is_closed() {
                continue;
            }
            if batch.len() < max && seen.insert(step.session) {
                batch.push(step);
            } else {
                deferred.push_back(step);
            }
        }
        self.pending = deferred;
        batch
    }
}

/// Cloneable handle to the engine task.
#[derive(Debug, Clone)]
pub(crate) struct Engine {
    tx: mpsc::Sender<Command>,
}

impl Engine {
    /// Start the engine task over `model`; it ends when every handle is dropped.
    pub fn spawn(model: ModelHandle, max_batch: usize, metrics: Metrics) -> Engine {
        let (tx, rx) = mpsc::channel(COMMAND_CAPACITY);
        tokio::spawn(run(model, rx, max_batch.max(1), metrics));
        Engine { tx }
    }

    /// Truncate `session`'s KV to `start`, append `tokens`, and return the logits after the last
    /// one.
    pub async fn step(
        &self,
        session: u64,
        start: usize,
        tokens: Vec<u32>,
    ) -> Result<Vec<f32>, GenError> {
        let (reply, rx) = oneshot::channel();
        let step = Step {
            session,
            start,
            tokens,
            reply,
        };
        let gone = || GenError::Internal("the draft model is not running".into());
        self.tx
            .send(Command::Step(step))
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Forget `session`'s draft KV (best effort; queued behind its earlier steps).
    pub async fn release(&self, session: u64) {
        let _ = self.tx.send(Command::Release(session)).await;
    }
}

async fn run(model: ModelHandle, mut rx: mpsc::Receiver<Command>, max: usize, metrics: Metrics) {
    let mut queue = StepQueue::default();
    loop {
        if queue.is_empty() {
            match rx.recv().await {
                Some(cmd) => accept(&model, &mut queue, cmd).await,
                None => return,
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            accept(&model, &mut queue, cmd).await;
        }
        let batch = queue.take_batch(max);
        if batch.is_empty() {
            continue;
        }
        forward(&model, batch, &metrics).await;
    }
}

async fn accept(model: &ModelHandle, queue: &mut StepQueue, cmd: Command) {
    match cmd {
        Command::Step(step) => queue.push(step),
        Command::Release(session) => {
            if let Err(e) = model.release(session).await {
                tracing::warn!(error = %e, "releasing a draft session failed");
            }
        }
    }
}

async fn forward(model: &ModelHandle, batch: Vec<Step>, metrics: &Metrics) {
    let requests: Vec<SeqRequest> = batch
        .iter()
        .map(|s| SeqRequest {
            session: s.session,
            start: s.start,
            tokens: s.tokens.clone(),
            logits_for_last: 1,
        })
        .collect();
    let started = Instant::now();
    let result = model.forward_batch(requests).await;
    metrics.observe_draft_forward(started.elapsed(), batch.len());
    match result {
        Ok(rows) => {
            for (step, logits) in batch.into_iter().zip(rows) {
                let _ = step.reply.send(Ok(logits.data));
            }
        }
        Err(e) if batch.len() > 1 => {
            // No cache changed; run each session alone so one bad step fails only its session.
            tracing::warn!(error = %e, sessions = batch.len(), "batched draft forward failed; retrying one by one");
            for step in batch {
                Box::pin(forward(model, vec![step], metrics)).await;
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "draft forward failed");
            for step in batch {
                let _ = step.reply.send(Err(GenError::Internal(format!(
                    "the draft model failed: {e}"
                ))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(session: u64) -> (Step, oneshot::Receiver<Result<Vec<f32>, GenError>>) {
        let (reply, rx) = oneshot::channel();
        let s = Step {
            session,
            start: 0,
            tokens: vec![1],
            reply,
        };
        (s, rx)
    }

    #[test]
    fn a_batch_holds_each_session_once_and_skips_abandoned_steps() {
        let mut q = StepQueue::default();
        let (a1, _ra1) = step(1);
        let (a2, _ra2) = step(1);
        let (b, rb) = step(2);
        let (c, _rc) = step(3);
        q.push(a1);
        q.push(b);
        q.push(a2);
        q.push(c);
        drop(rb);
        let first: Vec<u64> = q.take_batch(8).iter().map(|s| s.session).collect();
        assert_eq!(first, vec![1, 3]);
        let second: Vec<u64> = q.take_batch(8).iter().map(|s| s.session).collect();
        assert_eq!(second, vec![1]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_batch_is_capped() {
        let mut q = StepQueue::default();
        let rxs: Vec<_> = (0..5)
            .map(|i| {
                let (s, rx) = step(i);
                q.push(s);
                rx
            })
            .collect();
        assert_eq!(q.take_batch(2).len(), 2);
        assert_eq!(q.take_batch(2).len(), 2);
        assert_eq!(q.take_batch(2).len(), 1);
        drop(rxs);
    }
}
