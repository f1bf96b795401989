//! The model-thread machinery, driven with a small fake `CausalLm` (the real forward is tested
//! elsewhere): load errors and panics, commands and replies, caught panics, health,
//! shutdown and join-on-drop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use edgespec_model::{
    CausalLm, ModelError, ModelHandle, ModelHealth, ModelInfo, SeqLogits, SeqRequest, SessionId,
};

const VOCAB: usize = 3;
/// Token that makes the fake panic inside `forward_batch`.
const PANIC_TOKEN: u32 = 999;

/// Observations the fake shares with the test.
#[derive(Default)]
struct Probe {
    forward_threads: Mutex<Vec<String>>,
    dropped_on: Mutex<Option<String>>,
    dropped: AtomicBool,
}

struct FakeLm {
    info: ModelInfo,
    sessions: HashMap<SessionId, Vec<u32>>,
    probe: Arc<Probe>,
}

impl FakeLm {
    fn boxed(probe: Arc<Probe>) -> Box<dyn CausalLm> {
        Box::new(FakeLm {
            info: ModelInfo {
                arch: "fake".into(),
                name: "fake-lm".into(),
                vocab_size: VOCAB,
                max_context: 16,
                fingerprint: "f00d".into(),
                kv_bytes_per_token: 0,
            },
            sessions: HashMap::new(),
            probe,
        })
    }
}

impl Drop for FakeLm {
    fn drop(&mut self) {
        *self.probe.dropped_on.lock().unwrap() = std::thread::current().name().map(String::from);
        self.probe.dropped.store(true, Ordering::SeqCst);
    }
}

impl CausalLm for FakeLm {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward_batch(&mut self, batch: &[SeqRequest]) -> Result<Vec<SeqLogits>, ModelError> {
        let thread = std::thread::current().name().unwrap_or("?").to_string();
        self.probe.forward_threads.lock().unwrap().push(thread);
        let mut out = Vec::new();
        for req in batch {
            assert!(!req.tokens.contains(&PANIC_TOKEN), "fake model exploded");
            let cache = self.sessions.entry(req.session).or_default();
            if req.start > cache.len() {
                return Err(ModelError::BadStart {
                    session: req.session,
                    start: req.start,
                    cached: cache.len(),
                });
            }
            cache.truncate(req.start);
            let mut data = Vec::new();
            for &t in &req.tokens {
                cache.push(t);
                // Row i predicts from the prefix: encode (token, position) so tests can check order.
                data.extend([t as f32, (cache.len() - 1) as f32, req.session as f32]);
            }
            let rows = req.logits_for_last.clamp(1, req.tokens.len());
            out.push(SeqLogits {
                session: req.session,
                rows,
                vocab_size: VOCAB,
                data: data[(req.tokens.len() - rows) * VOCAB..].to_vec(),
            });
        }
        Ok(out)
    }

    fn truncate(&mut self, session: SessionId, len: usize) -> Result<(), ModelError> {
        let cache = self
            .sessions
            .get_mut(&session)
            .ok_or(ModelError::UnknownSession(session))?;
        cache.truncate(len);
        Ok(())
    }

    fn release(&mut self, session: SessionId) {
        self.sessions.remove(&session);
    }

    fn cached_len(&self, session: SessionId) -> Option<usize> {
        self.sessions.get(&session).map(Vec::len)
    }

    fn kv_bytes(&self) -> usize {
        self.sessions.values().map(|s| s.len() * 8).sum()
    }
}

fn spawn_fake() -> (ModelHandle, Arc<Probe>) {
    let probe = Arc::new(Probe::default());
    let p = Arc::clone(&probe);
    let handle = ModelHandle::spawn("fake", move || Ok(FakeLm::boxed(p))).expect("spawn");
    (handle, probe)
}

fn req(session: SessionId, start: usize, tokens: &[u32]) -> SeqRequest {
    SeqRequest {
        session,
        start,
        tokens: tokens.to_vec(),
        logits_for_last: usize::MAX,
    }
}

#[test]
fn spawn_returns_the_loader_error() {
    let err =
        ModelHandle::spawn("bad", || Err(ModelError::UnsupportedArch("mamba".into()))).unwrap_err();
    assert!(matches!(err, ModelError::UnsupportedArch(a) if a == "mamba"));
}

#[test]
fn spawn_reports_a_loader_panic() {
    let err = ModelHandle::spawn("panicky", || panic!("no weights")).unwrap_err();
    assert!(
        matches!(&err, ModelError::Panicked(m) if m.contains("no weights")),
        "{err}"
    );
}

#[tokio::test]
async fn info_and_health_are_ready_after_spawn() {
    let (h, _) = spawn_fake();
    assert_eq!(h.info().name, "fake-lm");
    assert_eq!(h.info().vocab_size, VOCAB);
    assert_eq!(h.name(), "fake");
    assert_eq!(*h.health().borrow(), ModelHealth::Ready);
}

#[tokio::test]
async fn commands_reach_the_model_on_its_own_thread() -> anyhow::Result<()> {
    let (h, probe) = spawn_fake();
    let out = h
        .forward_batch(vec![req(1, 0, &[5, 6, 7]), req(2, 0, &[9])])
        .await?;
    assert_eq!(out.len(), 2);
    assert_eq!((out[0].session, out[0].rows), (1, 3));
    assert_eq!(out[0].row(2), &[7.0, 2.0, 1.0]);
    assert_eq!(out[1].row(0), &[9.0, 0.0, 2.0]);
    // Only the trailing rows asked for come back.
    let mut tail = req(3, 0, &[4, 5, 6]);
    tail.logits_for_last = 1;
    let out = h.forward_batch(vec![tail]).await?;
    assert_eq!((out[0].rows, out[0].row(0)), (1, &[6.0, 2.0, 3.0][..]));
    assert_eq!(h.cached_len(1).await?, Some(3));
    assert_eq!(h.kv_bytes().await?, 7 * 8);

    h.truncate(1, 1).await?;
    assert_eq!(h.cached_len(1).await?, Some(1));
    let out = h.forward_batch(vec![req(1, 1, &[8])]).await?;
    assert_eq!(out[0].row(0), &[8.0, 1.0, 1.0]);

    h.release(2).await?;
    assert_eq!(h.cached_len(2).await?, None);
    assert!(matches!(
        h.truncate(2, 0).await,
        Err(ModelError::UnknownSession(2))
    ));
    // A model error is an answer, not a failure: the thread keeps serving.
    assert!(matches!(
        h.forward_batch(vec![req(1, 9, &[1])]).await,
        Err(ModelError::BadStart { start: 9, .. })
    ));
    assert_eq!(*h.health().borrow(), ModelHealth::Ready);

    let threads = probe.forward_threads.lock().unwrap().clone();
    assert!(threads.iter().all(|t| t == "model-fake"), "{threads:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_serve_concurrent_callers() -> anyhow::Result<()> {
    let (h, _) = spawn_fake();
    let mut tasks = Vec::new();
    for s in 0..32u64 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            h.forward_batch(vec![req(s, 0, &[s as u32, 1])]).await
        }));
    }
    for (s, t) in tasks.into_iter().enumerate() {
        let out = t.await??;
        assert_eq!(out[0].session, s as u64);
        assert_eq!(out[0].row(1), &[1.0, 1.0, s as f32]);
    }
    Ok(())
}

#[tokio::test]
async fn a_panic_is_an_error_and_marks_the_model_failed() {
    let (h, probe) = spawn_fake();
    let mut health = h.health();
    let err = h
        .forward_batch(vec![req(1, 0, &[PANIC_TOKEN])])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ModelError::Panicked(m) if m.contains("exploded")),
        "{err}"
    );
    let state = health
        .wait_for(|s| matches!(s, ModelHealth::Failed(_)))
        .await
        .expect("health sender alive until published")
        .clone();
    assert!(matches!(state, ModelHealth::Failed(m) if m.contains("exploded")));
    assert!(matches!(h.cached_len(1).await, Err(ModelError::ThreadGone)));
    assert!(matches!(
        h.forward_batch(vec![req(1, 0, &[1])]).await,
        Err(ModelError::ThreadGone)
    ));
    assert!(probe.dropped.load(Ordering::SeqCst));
}

#[tokio::test]
async fn shutdown_stops_the_thread_and_drops_the_model_there() {
    let (h, probe) = spawn_fake();
    let other = h.clone();
    h.forward_batch(vec![req(1, 0, &[1])]).await.unwrap();
    h.shutdown().await;
    assert!(probe.dropped.load(Ordering::SeqCst));
    assert_eq!(
        probe.dropped_on.lock().unwrap().as_deref(),
        Some("model-fake")
    );
    assert_eq!(*other.health().borrow(), ModelHealth::Stopped);
    assert!(matches!(
        other.kv_bytes().await,
        Err(ModelError::ThreadGone)
    ));
    other.shutdown().await; // idempotent
}

#[test]
fn dropping_the_last_handle_joins_the_thread() {
    let (h, probe) = spawn_fake();
    let clone = h.clone();
    drop(h);
    assert!(
        !probe.dropped.load(Ordering::SeqCst),
        "a clone still holds the model"
    );
    let health = clone.health();
    drop(clone);
    // Drop joined the thread, so the model is already gone.
    assert!(probe.dropped.load(Ordering::SeqCst));
    assert_eq!(
        probe.dropped_on.lock().unwrap().as_deref(),
        Some("model-fake")
    );
    assert_eq!(*health.borrow(), ModelHealth::Stopped);
}
