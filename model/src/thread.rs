//! The model on its own OS thread (TEI's `BackendThread` shape): a forward never runs on a tokio
//! worker. Async callers send commands over a bounded channel; each command carries the caller's
//! tracing span and a `oneshot` for the reply. Health is published on a `watch`. A panic in model
//! code is caught, answered as an error, published as `Failed`, and ends the thread. The thread
//! stops and is joined when the last handle drops, or earlier on `shutdown()`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot, watch};

use crate::{CausalLm, ModelError, ModelInfo, SeqLogits, SeqRequest, SessionId};

/// Commands waiting for the model thread before senders feel back-pressure.
pub const COMMAND_CAPACITY: usize = 64;

/// What the model thread is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelHealth {
    /// The loader is running.
    Loading,
    /// Serving commands.
    Ready,
    /// Loading failed or the model panicked; the thread has stopped.
    Failed(String),
    /// Shut down on request or because every handle was dropped.
    Stopped,
}

type Reply<T> = oneshot::Sender<T>;

enum Op {
    Forward(Vec<SeqRequest>, Reply<Result<Vec<SeqLogits>, ModelError>>),
    Truncate(SessionId, usize, Reply<Result<(), ModelError>>),
    Release(SessionId, Reply<()>),
    CachedLen(SessionId, Reply<Option<usize>>),
    KvBytes(Reply<usize>),
    Shutdown(Reply<()>),
}

struct Command {
    span: tracing::Span,
    op: Op,
}

/// A cloneable handle to a model running on its own thread.
#[derive(Clone)]
pub struct ModelHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ModelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelHandle")
            .field("name", &self.inner.name)
            .field("info", &self.inner.info)
            .finish()
    }
}

struct Inner {
    name: String,
    info: ModelInfo,
    // `Some` for the whole life of `Inner`; taken in `drop` so the thread sees the channel close
    // before we join it.
    tx: Option<mpsc::Sender<Command>>,
    health: watch::Receiver<ModelHealth>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            // The thread only finishes the command it is running (callers are gone, so queued
            // ones are skipped) and drops the model on its own thread.
            if thread.join().is_err() {
                tracing::error!(model = %self.name, "model thread panicked while stopping");
            }
        }
    }
}

impl ModelHandle {
    /// Start a thread named `model-{name}`, run `loader` on it and wait until it finishes.
    /// Returns the loader's error (or its panic as [`ModelError::Panicked`]). This blocks the
    /// calling thread for the load; from async code call it inside `spawn_blocking`.
    pub fn spawn<F>(name: &str, loader: F) -> Result<ModelHandle, ModelError>
    where
        F: FnOnce() -> Result<Box<dyn CausalLm>, ModelError> + Send + 'static,
    {
        let (health_tx, health_rx) = watch::channel(ModelHealth::Loading);
        let (tx, rx) = mpsc::channel(COMMAND_CAPACITY);
        let (loaded_tx, loaded_rx) = std::sync::mpsc::sync_channel(1);
        let thread_name = name.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("model-{name}"))
            .spawn(move || {
                let model = match catch_unwind(AssertUnwindSafe(loader)) {
                    Ok(Ok(model)) => model,
                    Ok(Err(e)) => {
                        health_tx.send_replace(ModelHealth::Failed(e.to_string()));
                        let _ = loaded_tx.send(Err(e));
                        return;
                    }
                    Err(panic) => {
                        let msg = panic_message(panic.as_ref());
                        health_tx.send_replace(ModelHealth::Failed(msg.clone()));
                        let _ = loaded_tx.send(Err(ModelError::Panicked(msg)));
                        return;
                    }
                };
                // Ready before the caller is released, so `spawn` returning means Ready.
                health_tx.send_replace(ModelHealth::Ready);
                let _ = loaded_tx.send(Ok(model.info().clone()));
                tracing::info!(model = %thread_name, "model ready");
                serve(model, rx, &health_tx, &thread_name);
            })
            .map_err(|e| ModelError::Io {
                context: format!("spawning the thread for model {name}"),
                source: e,
            })?;
        let loaded = loaded_rx.recv().unwrap_or(Err(ModelError::ThreadGone));
        match loaded {
            Ok(info) => Ok(ModelHandle {
                inner: Arc::new(Inner {
                    name: name.to_string(),
                    info,
                    tx: Some(tx),
                    health: health_rx,
                    thread: Some(thread),
                }),
            }),
            Err(e) => {
                let _ = thread.join();
                Err(e)
            }
        }
    }

    /// Static facts, read once at load.
    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Health updates (current value first).
    pub fn health(&self) -> watch::Receiver<ModelHealth> {
        self.inner.health.clone()
    }

    /// See [`CausalLm::forward_batch`].
    pub async fn forward_batch(
        &self,
        batch: Vec<SeqRequest>,
    ) -> Result<Vec<SeqLogits>, ModelError> {
        self.call(|r| Op::Forward(batch, r)).await?
    }

    /// See [`CausalLm::truncate`].
    pub async fn truncate(&self, session: SessionId, len: usize) -> Result<(), ModelError> {
        self.call(|r| Op::Truncate(session, len, r)).await?
    }

    /// See [`CausalLm::release`].
    pub async fn release(&self, session: SessionId) -> Result<(), ModelError> {
        self.call(|r| Op::Release(session, r)).await
    }

    /// See [`CausalLm::cached_len`].
    pub async fn cached_len(&self, session: SessionId) -> Result<Option<usize>, ModelError> {
        self.call(|r| Op::CachedLen(session, r)).await
    }

    /// See [`CausalLm::kv_bytes`].
    pub async fn kv_bytes(&self) -> Result<usize, ModelError> {
        self.call(Op::KvBytes).await
    }

    /// Stop the model thread after the commands queued before this one; the model (and its KV
    /// caches) is dropped. Later calls on any clone fail with [`ModelError::ThreadGone`].
    /// Idempotent.
    pub async fn shutdown(&self) {
        let _ = self.call(Op::Shutdown).await;
    }

    async fn call<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, ModelError> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command {
            span: tracing::Span::current(),
            op: op(reply),
        };
        let tx = self.inner.tx.as_ref().ok_or(ModelError::ThreadGone)?;
        tx.send(cmd).await.map_err(|_| ModelError::ThreadGone)?;
        rx.await.map_err(|_| ModelError::ThreadGone)
    }
}

fn serve(
    mut model: Box<dyn CausalLm>,
    mut rx: mpsc::Receiver<Command>,
    health: &watch::Sender<ModelHealth>,
    name: &str,
) {
    while let Some(Command { span, op }) = rx.blocking_recv() {
        let _entered = span.enter();
        if let Op::Shutdown(reply) = op {
            tracing::info!(model = %name, "model thread shutting down");
            rx.close();
            health.send_replace(ModelHealth::Stopped);
            drop(model);
            let _ = reply.send(());
            return;
        }
        if let Err(msg) = execute(model.as_mut(), op) {
            tracing::error!(model = %name, panic = %msg, "model panicked; the model thread stops");
            health.send_replace(ModelHealth::Failed(msg));
            rx.close();
            // The model may be half-updated; dropping it could panic again.
            let _ = catch_unwind(AssertUnwindSafe(move || drop(model)));
            return;
        }
    }
    health.send_replace(ModelHealth::Stopped);
}

/// Run one command, replying to its caller. `Err` carries a panic message (the caller has already
/// been answered with [`ModelError::Panicked`] where it expects a `Result`).
fn execute(model: &mut dyn CausalLm, op: Op) -> Result<(), String> {
    fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
        catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_message(p.as_ref()))
    }
    fn answer<T>(
        reply: Reply<Result<T, ModelError>>,
        r: Result<Result<T, ModelError>, String>,
    ) -> Result<(), String> {
        match r {
            Ok(v) => {
                let _ = reply.send(v);
                Ok(())
            }
            Err(msg) => {
                let _ = reply.send(Err(ModelError::Panicked(msg.clone())));
                Err(msg)
            }
        }
    }
    match op {
        Op::Forward(batch, reply) => {
            if reply.is_closed() {
                return Ok(()); // caller gave up; don't burn a forward
            }
            let rows: usize = batch.iter().map(|s| s.tokens.len()).sum();
            let _span = tracing::debug_span!("model_forward", seqs = batch.len(), rows).entered();
            answer(reply, guarded(|| model.forward_batch(&batch)))
        }
        Op::Truncate(session, len, reply) => {
            answer(reply, guarded(|| model.truncate(session, len)))
        }
        Op::Release(session, reply) => {
            guarded(|| model.release(session))?;
            let _ = reply.send(());
            Ok(())
        }
        Op::CachedLen(session, reply) => {
            let v = guarded(|| model.cached_len(session))?;
            let _ = reply.send(v);
            Ok(())
        }
        Op::KvBytes(reply) => {
            let v = guarded(|| model.kv_bytes())?;
            let _ = reply.send(v);
            Ok(())
        }
        Op::Shutdown(reply) => {
            let _ = reply.send(());
            Ok(())
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
