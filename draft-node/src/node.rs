//! The serving core behind the HTTP API: admission (coordinator state, concurrency limit),
//! readiness, and the start of generations.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use edgespec_model::{ModelHandle, ModelHealth, ModelInfo, TextTokenizer};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::connection::LinkStatus;
use crate::error::GenError;
use crate::metrics::Metrics;
use crate::session::{self, GenEvent, GenerateRequest, SessionCtx};
use crate::settings::LimitSettings;

/// Cloneable handle to the node's serving state.
#[derive(Debug, Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    ctx: SessionCtx,
    /// `None` on a lookup-only node.
    model: Option<ModelHandle>,
    info: ModelInfo,
    served_name: String,
    limits: LimitSettings,
    sessions: Arc<Semaphore>,
    next_id: AtomicU64,
}

/// A generation slot of the node, from [`Node::admit`] until the session it starts ends (or
/// until dropped, e.g. when the request turns out to be invalid once tokenised).
#[derive(Debug)]
pub struct Admission {
    permit: OwnedSemaphorePermit,
}

/// Parts the node is assembled from.
#[derive(Debug)]
pub(crate) struct NodeParts {
    pub ctx: SessionCtx,
    /// The draft model; `None` on a lookup-only node.
    pub model: Option<ModelHandle>,
    /// The model facts (the draft model's, or a lookup node's from GGUF metadata).
    pub info: ModelInfo,
    pub served_name: String,
    pub limits: LimitSettings,
}

impl Node {
    pub(crate) fn new(p: NodeParts) -> Self {
        let sessions = Arc::new(Semaphore::new(p.limits.max_concurrent_sessions));
        Node {
            inner: Arc::new(Inner {
                ctx: p.ctx,
                model: p.model,
                info: p.info,
                served_name: p.served_name,
                limits: p.limits,
                sessions,
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// The model name clients must ask for.
    pub fn served_name(&self) -> &str {
        &self.inner.served_name
    }

    /// The draft model's facts (a lookup-only node's come from its tokenizer's GGUF).
    pub fn model_info(&self) -> &ModelInfo {
        &self.inner.info
    }

    /// Whether this node has a draft model (`model` and `hybrid` drafting need one).
    pub fn has_draft_model(&self) -> bool {
        self.inner.model.is_some()
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.inner.ctx.tokenizer
    }

    /// Request limits.
    pub fn limits(&self) -> &LimitSettings {
        &self.inner.limits
    }

    /// Metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.ctx.metrics
    }

    /// `Ok` when the node admits requests (`/healthz`); otherwise why not. A coordinator away
    /// for less than `coordinator.timeout` still admits them: they wait for the stream.
    pub fn readiness(&self) -> Result<(), GenError> {
        self.model_ready()?;
        match self.inner.ctx.conn.status() {
            LinkStatus::Refused(why) => Err(GenError::ModelMismatch(format!(
                "the verify fleet does not serve this draft model's tokenizer: {why}"
            ))),
            s if s
                .away_for()
                .is_some_and(|away| away >= self.inner.ctx.cfg.timeout) =>
            {
                Err(GenError::Unavailable(
                    "the coordinator is unreachable; retry later".into(),
                ))
            }
            _ => Ok(()),
        }
    }

    /// `Ok` when the node can serve right now (`/readyz`): the draft model (if the node has one)
    /// is up and so is the coordinator stream. Otherwise what an operator needs to know, e.g.
    /// the coordinator's address and the last connection error while connecting.
    pub fn ready(&self) -> Result<(), String> {
        self.model_ready().map_err(|e| e.to_string())?;
        let conn = &self.inner.ctx.conn;
        match conn.status().describe(conn.address()) {
            None => Ok(()),
            Some(why) => Err(why),
        }
    }

    fn model_ready(&self) -> Result<(), GenError> {
        // A lookup-only node has no model to wait for: its readiness is the coordinator link.
        let Some(model) = &self.inner.model else {
            return Ok(());
        };
        match &*model.health().borrow() {
            // `ModelHandle::spawn` returns after the load, possibly before the watch says Ready.
            ModelHealth::Ready | ModelHealth::Loading => Ok(()),
            other => Err(GenError::Unavailable(format!(
                "the draft model is not ready ({other:?})"
            ))),
        }
    }

    /// Admission: one of the node's `limits.max_concurrent_sessions` generation slots, waited
    /// for up to `limits.admission_wait`. Fails fast when the coordinator is known to be away or
    /// refusing (503), and with [`GenError::Overloaded`] (429) when no slot frees in time. A
    /// request does its heavy work (tokenising, generating) only while it holds the slot.
    pub async fn admit(&self) -> Result<Admission, GenError> {
        self.readiness()?;
        let sessions = Arc::clone(&self.inner.sessions);
        let wait = self.inner.limits.admission_wait;
        let permit = if wait.is_zero() {
            sessions.try_acquire_owned().ok()
        } else {
            tokio::time::timeout(wait, sessions.acquire_owned())
                .await
                .ok()
                .and_then(Result::ok)
        };
        permit.map(|permit| Admission { permit }).ok_or_else(|| {
            GenError::Overloaded(format!(
                "this node is already serving {} requests; retry later",
                self.inner.limits.max_concurrent_sessions
            ))
        })
    }

    /// Starts an admitted generation; its slot is released when the session ends.
    pub fn generate(
        &self,
        req: GenerateRequest,
        admission: Admission,
    ) -> Result<mpsc::Receiver<GenEvent>, GenError> {
        self.readiness()?;
        if let Some(m) = req
            .method
            .filter(|m| m.uses_model() && !self.has_draft_model())
        {
            return Err(GenError::InvalidRequest(format!(
                "draft_method \"{m}\" needs a draft model and this node has none"
            )));
        }
        let permit = admission.permit;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        if matches!(self.inner.ctx.conn.status(), LinkStatus::Connecting { .. }) {
            return Ok(self.start_once_connected(id, req, permit));
        }
        Ok(session::spawn(self.inner.ctx.clone(), id, req, permit))
    }

    /// A request that arrives before the first stream is up waits for it (up to
    /// `coordinator.timeout`), so its session starts with the coordinator's Welcome (γ bounds,
    /// speculation on/off) instead of a blank one; its events are passed through.
    fn start_once_connected(
        &self,
        id: u64,
        req: GenerateRequest,
        permit: OwnedSemaphorePermit,
    ) -> mpsc::Receiver<GenEvent> {
        let (out, rx) = mpsc::channel(1);
        let ctx = self.inner.ctx.clone();
        tokio::spawn(async move {
            let connected = tokio::select! {
                r = ctx.conn.wait_connected(ctx.cfg.timeout) => r,
                () = out.closed() => return,
            };
            if let Err(e) = connected {
                let _ = out.send(GenEvent::Failed(e)).await;
                return;
            }
            let mut events = session::spawn(ctx, id, req, permit);
            loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Some(ev) => if out.send(ev).await.is_err() { return },
                        None => return,
                    },
                    // The client left: dropping `events` cancels the session.
                    () = out.closed() => return,
                }
            }
        });
        rx
    }
}
