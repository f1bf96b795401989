//! The no-model verify node.

use super::{target_next, FINGERPRINT, VOCAB};
use edgespec_proto::domain::{self, ErrorCode, Outcome};
use edgespec_proto::pb;
use edgespec_proto::pb::coordinator_client::CoordinatorClient;
use edgespec_proto::pb::verifier_server::{Verifier, VerifierServer};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

/// How a scripted verify node presents itself.
#[derive(Debug, Clone)]
pub struct ScriptedVerifierConfig {
    /// Node id.
    pub node_id: String,
    /// "onprem" or "cloud".
    pub pool: String,
    /// Sessions it says it can hold.
    pub capacity: u32,
    /// Model fingerprint.
    pub fingerprint: String,
    /// Coordinator to register with ("http://host:port"); `None`: stay unregistered.
    pub coordinator: Option<String>,
    /// Heartbeat period.
    pub heartbeat_interval: Duration,
    /// Simulated forward time per batch (0: answer at once).
    pub forward_base: Duration,
    /// Simulated forward time per token in the batch.
    pub forward_per_token: Duration,
}

impl ScriptedVerifierConfig {
    /// A node called `node_id` in `pool` registering with `coordinator`.
    pub fn new(node_id: &str, pool: &str, coordinator: &str) -> Self {
        Self {
            node_id: node_id.into(),
            pool: pool.into(),
            capacity: 1024,
            fingerprint: FINGERPRINT.into(),
            coordinator: Some(coordinator.into()),
            heartbeat_interval: Duration::from_millis(100),
            forward_base: Duration::ZERO,
            forward_per_token: Duration::ZERO,
        }
    }
}

/// One `Verify` call as the node received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedBatch {
    /// Batch id.
    pub batch_id: u64,
    /// Coordinator session ids of the items, in order.
    pub session_ids: Vec<u64>,
    /// Items that carried a full history.
    pub with_history: usize,
    /// Tokens of the forward (history + draft + 1 per item).
    pub tokens: usize,
}

#[derive(Debug, Default)]
struct Shared {
    sessions: Mutex<HashMap<u64, Vec<u32>>>,
    batches: Mutex<Vec<RecordedBatch>>,
    released: Mutex<Vec<u64>>,
    registrations: AtomicU64,
    dead: AtomicBool,
}

#[derive(Clone)]
struct Service {
    cfg: ScriptedVerifierConfig,
    shared: Arc<Shared>,
    addr: String,
}

/// A running scripted verify node.
#[derive(Debug)]
pub struct ScriptedVerifier {
    addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl ScriptedVerifier {
    /// Binds `127.0.0.1:0`, serves, and (if configured) registers and heartbeats.
    pub async fn start(cfg: ScriptedVerifierConfig) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let svc = Service {
            cfg: cfg.clone(),
            shared: shared.clone(),
            addr: format!("http://{addr}"),
        };
        let server = tonic::transport::Server::builder()
            .add_service(VerifierServer::new(svc.clone()))
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            );
        let mut tasks = vec![tokio::spawn(async move {
            let _ = server.await;
        })];
        if let Some(coord) = cfg.coordinator.clone() {
            tasks.push(tokio::spawn(heartbeat_loop(svc, coord)));
        }
        Ok(Self {
            addr,
            shared,
            tasks,
        })
    }

    /// Bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// "http://addr".
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every batch received so far.
    pub fn batches(&self) -> Vec<RecordedBatch> {
        self.shared.batches.lock().expect("lock").clone()
    }

    /// Session ids released so far.
    pub fn released(&self) -> Vec<u64> {
        self.shared.released.lock().expect("lock").clone()
    }

    /// Successful registrations so far.
    pub fn registrations(&self) -> u64 {
        self.shared.registrations.load(Ordering::SeqCst)
    }

    /// Sessions with state on the node.
    pub fn session_count(&self) -> usize {
        self.shared.sessions.lock().expect("lock").len()
    }

    /// Simulates a crash: stops serving and heartbeating; calls on open connections hang (so the
    /// coordinator sees a timeout or a transport error, as with a dead machine).
    pub fn kill(&self) {
        self.shared.dead.store(true, Ordering::SeqCst);
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for ScriptedVerifier {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Service {
    fn info(&self) -> pb::NodeInfo {
        pb::NodeInfo {
            node_id: self.cfg.node_id.clone(),
            advertise_addr: self.addr.clone(),
            pool: self.cfg.pool.clone(),
            model_name: "scripted".into(),
            fingerprint: self.cfg.fingerprint.clone(),
            vocab_size: VOCAB,
            max_context: 1 << 20,
            capacity_sessions: self.cfg.capacity,
            max_block_tokens: 64,
            max_batch_tokens: 1 << 16,
            device: "none".into(),
            load: Some(self.load()),
        }
    }

    fn load(&self) -> pb::VerifierLoad {
        pb::VerifierLoad {
            active_sessions: self.shared.sessions.lock().expect("lock").len() as u32,
            ..Default::default()
        }
    }

    fn verify_one(&self, b: &domain::Block) -> Result<Outcome, (ErrorCode, String)> {
        let mut sessions = self.shared.sessions.lock().expect("lock");
        if let Some(h) = &b.history {
            sessions.insert(b.session_id, h.clone());
        }
        let Some(committed) = sessions.get_mut(&b.session_id) else {
            return Err((
                ErrorCode::ResyncNeeded,
                "unknown session; resend with history".into(),
            ));
        };
        if committed.len() != b.committed_len {
            return Err((
                ErrorCode::InvalidArgument,
                format!(
                    "committed_len {} but the node holds {}",
                    b.committed_len,
                    committed.len()
                ),
            ));
        }
        let mut prev = *committed.last().expect("committed_len >= 1");
        let mut accepted = 0;
        for &t in &b.draft_tokens {
            if t != target_next(prev) {
                break;
            }
            committed.push(t);
            prev = t;
            accepted += 1;
        }
        let next = target_next(prev);
        committed.push(next);
        Ok(Outcome {
            accepted,
            next_token: next,
            committed_len: committed.len(),
        })
    }
}

#[tonic::async_trait]
impl Verifier for Service {
    async fn verify(
        &self,
        request: Request<pb::VerifyBatchRequest>,
    ) -> Result<Response<pb::VerifyBatchResponse>, Status> {
        if self.shared.dead.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let start = Instant::now();
        let req = request.into_inner();
        if req.fingerprint != self.cfg.fingerprint {
            return Err(Status::failed_precondition("fingerprint mismatch"));
        }
        let batch_id = req.batch_id;
        let blocks =
            domain::batch_from_pb(req).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let tokens: usize = blocks
            .iter()
            .map(|b| b.history.as_ref().map_or(0, Vec::len) + b.draft_tokens.len() + 1)
            .sum();
        self.shared
            .batches
            .lock()
            .expect("lock")
            .push(RecordedBatch {
                batch_id,
                session_ids: blocks.iter().map(|b| b.session_id).collect(),
                with_history: blocks.iter().filter(|b| b.history.is_some()).count(),
                tokens,
            });
        let forward = self.cfg.forward_base + self.cfg.forward_per_token * tokens as u32;
        if !forward.is_zero() {
            tokio::time::sleep(forward).await;
        }
        if self.shared.dead.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let total_ns = start.elapsed().as_nanos() as u64;
        let timings = pb::VerifyTimings {
            queue_ns: 0,
            forward_ns: forward.as_nanos() as u64,
            total_ns,
            batch_tokens: tokens as u32,
            batch_sessions: blocks.len() as u32,
        };
        let results = blocks
            .iter()
            .map(|b| pb::VerifyResult {
                session_id: b.session_id,
                round: b.round,
                result: Some(match self.verify_one(b) {
                    Ok(o) => pb::verify_result::Result::Outcome(o.into()),
                    Err((code, message)) => pb::verify_result::Result::Error(
                        domain::SessionError {
                            session_id: b.session_id,
                            round: b.round,
                            code,
                            message,
                        }
                        .into(),
                    ),
                }),
                timings: Some(timings),
            })
            .collect();
        Ok(Response::new(pb::VerifyBatchResponse {
            batch_id,
            results,
            load: Some(self.load()),
        }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let ids = request.into_inner().session_ids;
        let mut sessions = self.shared.sessions.lock().expect("lock");
        let released = ids
            .iter()
            .filter(|id| sessions.remove(id).is_some())
            .count();
        self.shared.released.lock().expect("lock").extend(&ids);
        Ok(Response::new(pb::ReleaseResponse {
            released: released as u32,
        }))
    }

    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::NodeInfo>, Status> {
        Ok(Response::new(self.info()))
    }
}

/// Registers, then heartbeats; registers again whenever the coordinator says it does not know
/// the node (restart) or cannot be reached.
async fn heartbeat_loop(svc: Service, coordinator: String) {
    let mut registered = false;
    loop {
        let client = CoordinatorClient::connect(coordinator.clone()).await.ok();
        if let Some(mut c) = client {
            loop {
                if !registered {
                    let req = pb::RegisterVerifierRequest {
                        info: Some(svc.info()),
                    };
                    match c.register_verifier(req).await {
                        Ok(_) => {
                            registered = true;
                            svc.shared.registrations.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(s) if s.code() == tonic::Code::FailedPrecondition => return,
                        Err(_) => break,
                    }
                }
                tokio::time::sleep(svc.cfg.heartbeat_interval).await;
                let req = pb::VerifierHeartbeatRequest {
                    node_id: svc.cfg.node_id.clone(),
                    load: Some(svc.load()),
                    draining: false,
                };
                match c.verifier_heartbeat(req).await {
                    Ok(r) => registered = r.into_inner().known,
                    // Keep `registered`: after a reconnect the heartbeat itself tells us (known =
                    // false) whether the coordinator restarted.
                    Err(_) => break,
                }
            }
        }
        tokio::time::sleep(svc.cfg.heartbeat_interval / 2).await;
    }
}
