//! The serving core behind the HTTP API: admission (coordinator state, concurrency limit) and the
//! start of generations.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use edgespec_model::{ModelHandle, ModelHealth, ModelInfo, TextTokenizer};
use tokio::sync::{mpsc, Semaphore};

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
    model: ModelHandle,
    served_name: String,
    limits: LimitSettings,
    sessions: Arc<Semaphore>,
    next_id: AtomicU64,
}

/// Parts the node is assembled from.
#[derive(Debug)]
pub(crate) struct NodeParts {
    pub ctx: SessionCtx,
    pub model: ModelHandle,
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

    /// The draft model's facts.
    pub fn model_info(&self) -> &ModelInfo {
        self.inner.model.info()
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

    /// `Ok` when the node can serve; otherwise why not.
    pub fn readiness(&self) -> Result<(), GenError> {
        match &*self.inner.model.health().borrow() {
            // `ModelHandle::spawn` returns after the load, possibly before the watch says Ready.
            ModelHealth::Ready | ModelHealth::Loading => {}
            other => {
                return Err(GenError::Unavailable(format!(
                    "the draft model is not ready ({other:?})"
                )))
            }
        }
        match self.inner.ctx.conn.status() {
            LinkStatus::Up => Ok(()),
            LinkStatus::Down { since } if since.elapsed() < self.inner.ctx.cfg.timeout => Ok(()),
            LinkStatus::Down { .. } => Err(GenError::Unavailable(
                "the coordinator is unreachable; retry later".into(),
            )),
            LinkStatus::Refused(why) => Err(GenError::ModelMismatch(format!(
                "the verify fleet does not serve this draft model's tokenizer: {why}"
            ))),
        }
    }

    /// Starts a generation. Fails fast when the coordinator is known to be away or the node is
    /// at its concurrency limit.
    pub fn generate(&self, req: GenerateRequest) -> Result<mpsc::Receiver<GenEvent>, GenError> {
        self.readiness()?;
        let permit = Arc::clone(&self.inner.sessions)
            .try_acquire_owned()
            .map_err(|_| {
                GenError::Overloaded(format!(
                    "this node is already serving {} requests; retry later",
                    self.inner.limits.max_concurrent_sessions
                ))
            })?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        Ok(session::spawn(self.inner.ctx.clone(), id, req, permit))
    }
}
