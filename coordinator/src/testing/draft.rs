//! Scripted draft streams: a tonic client of `Coordinator.Drafts` that multiplexes sessions.

use super::{target_next, FINGERPRINT, VOCAB};
use edgespec_proto::domain::{Block, CoordinatorMessage, DraftBlock, DraftMessage, ErrorCode};
use edgespec_proto::pb;
use edgespec_proto::pb::coordinator_client::CoordinatorClient;
use edgespec_specdec::SamplingParams;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

type Routes = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<CoordinatorMessage>>>>;

/// One draft node's stream.
#[derive(Debug)]
pub struct DraftClient {
    tx: mpsc::Sender<pb::DraftMessage>,
    routes: Routes,
    welcome: pb::Welcome,
    reader: JoinHandle<()>,
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
    /// Every n-th absolute position the draft guesses wrong (0: a perfect draft).
    pub miss_every: usize,
    /// Use this γ instead of the coordinator's `next_gamma`.
    pub fixed_gamma: Option<u32>,
    /// Retries of OVERLOADED / UNAVAILABLE before giving up.
    pub max_retries: usize,
    /// How long to wait for one answer.
    pub answer_timeout: Duration,
}

impl SessionScript {
    /// A session with a 4-token prompt derived from `session_id`.
    pub fn new(session_id: u64, max_new_tokens: usize) -> Self {
        let first = (session_id % u64::from(VOCAB)) as u32;
        Self {
            session_id,
            prompt: vec![
                first,
                (first + 1) % VOCAB,
                (first + 2) % VOCAB,
                (first + 3) % VOCAB,
            ],
            max_new_tokens,
            miss_every: 3,
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

/// The tokens a target-only greedy decoder produces: `prompt` plus `n` tokens.
pub fn reference(prompt: &[u32], n: usize) -> Vec<u32> {
    let mut out = prompt.to_vec();
    for _ in 0..n {
        out.push(target_next(*out.last().expect("non-empty prompt")));
    }
    out
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl DraftClient {
    /// Opens a stream as draft node `node_id` with the scripted fingerprint.
    pub async fn connect(url: &str, node_id: &str) -> Result<Self, Status> {
        Self::connect_with(url, node_id, FINGERPRINT).await
    }

    /// Opens a stream with a given fingerprint; fails with the coordinator's status (e.g.
    /// FAILED_PRECONDITION on a model mismatch).
    pub async fn connect_with(url: &str, node_id: &str, fingerprint: &str) -> Result<Self, Status> {
        let mut client = CoordinatorClient::connect(url.to_string())
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let (tx, rx) = mpsc::channel(4096);
        let hello = pb::DraftHello {
            node_id: node_id.into(),
            model_name: "scripted-draft".into(),
            fingerprint: fingerprint.into(),
            vocab_size: VOCAB,
            draft_s_per_token: 0.001,
            pipelined: false,
        };
        tx.send(DraftMessage::Hello(hello).into())
            .await
            .map_err(|_| Status::internal("stream closed"))?;
        let mut inbound = client.drafts(ReceiverStream::new(rx)).await?.into_inner();
        let welcome = match inbound.message().await? {
            Some(pb::CoordinatorMessage {
                kind: Some(pb::coordinator_message::Kind::Welcome(w)),
            }) => w,
            _ => {
                return Err(Status::internal(
                    "the coordinator did not answer with Welcome",
                ))
            }
        };
        let routes: Routes = Arc::default();
        let (r, reply_tx) = (routes.clone(), tx.clone());
        let reader = tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                let Ok(m) = CoordinatorMessage::try_from(m) else {
                    continue;
                };
                let session = match &m {
                    CoordinatorMessage::Probe(p) => {
                        let reply = pb::ProbeReply {
                            probe_id: p.probe_id,
                            padding_len: p.padding.len() as u32,
                        };
                        let _ = reply_tx.send(DraftMessage::ProbeReply(reply).into()).await;
                        continue;
                    }
                    CoordinatorMessage::Verdict(v) => v.session_id,
                    CoordinatorMessage::Error(e) => e.session_id,
                    CoordinatorMessage::Welcome(_) => continue,
                };
                if let Some(route) = r.lock().expect("lock").get(&session) {
                    let _ = route.send(m);
                }
            }
            // The stream ended: dropping the routes wakes every waiting session.
            r.lock().expect("lock").clear();
        });
        Ok(Self {
            tx,
            routes,
            welcome,
            reader,
        })
    }

    /// The coordinator's Welcome.
    pub fn welcome(&self) -> &pb::Welcome {
        &self.welcome
    }

    /// Receives the answers for `session_id` from now on.
    pub fn subscribe(&self, session_id: u64) -> mpsc::UnboundedReceiver<CoordinatorMessage> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.routes.lock().expect("lock").insert(session_id, tx);
        rx
    }

    /// Sends a raw message.
    pub async fn send(&self, m: DraftMessage) -> Result<(), Status> {
        self.tx
            .send(m.into())
            .await
            .map_err(|_| Status::unavailable("draft stream closed"))
    }

    /// Closes a session.
    pub async fn close(&self, session_id: u64) -> Result<(), Status> {
        self.routes.lock().expect("lock").remove(&session_id);
        self.send(DraftMessage::Close { session_id }).await
    }

    /// Drives a session to `max_new_tokens` like a draft node: drafts γ tokens (wrong every
    /// `miss_every`-th position), sends history on the first block and after RESYNC_NEEDED,
    /// retries OVERLOADED / UNAVAILABLE, applies verdicts. Closes the session at the end.
    pub async fn run_session(&self, script: SessionScript) -> Result<SessionReport, String> {
        let mut rx = self.subscribe(script.session_id);
        let mut report = SessionReport::default();
        let mut committed = script.prompt.clone();
        let target_len = script.prompt.len() + script.max_new_tokens;
        let mut gamma = script.fixed_gamma.unwrap_or(self.welcome.initial_gamma);
        let (mut with_history, mut round, mut last_rt, mut retries) = (true, 1u64, 0u64, 0usize);
        while committed.len() < target_len {
            let remaining = target_len - committed.len();
            let g = (gamma as usize).min(remaining - 1);
            let mut drafts = Vec::with_capacity(g);
            let mut prev = *committed.last().expect("non-empty");
            for i in 0..g {
                let pos = committed.len() + i;
                let mut t = target_next(prev);
                if script.miss_every > 0 && pos % script.miss_every == 0 {
                    t = (t + 1) % VOCAB;
                }
                drafts.push(t);
                prev = t;
            }
            let block = DraftBlock {
                block: Block {
                    session_id: script.session_id,
                    round,
                    committed_len: committed.len(),
                    history: with_history.then(|| committed.clone()),
                    draft_tokens: drafts.clone(),
                    draft_probs: Vec::new(),
                    sampling: SamplingParams::GREEDY,
                },
                max_new_tokens: remaining as u32,
                client_send_unix_ns: unix_ns(),
                draft_s_per_token: 0.001,
                last_round_trip_ns: last_rt,
                drafted_ahead: false,
            };
            let sent = Instant::now();
            self.send(DraftMessage::Block(block))
                .await
                .map_err(|e| e.to_string())?;
            let answer = tokio::time::timeout(script.answer_timeout, rx.recv())
                .await
                .map_err(|_| format!("session {}: no answer to round {round}", script.session_id))?
                .ok_or_else(|| format!("session {}: stream closed", script.session_id))?;
            match answer {
                CoordinatorMessage::Verdict(v) => {
                    if v.round != round {
                        return Err(format!("verdict for round {} while at {round}", v.round));
                    }
                    let rt = sent.elapsed();
                    last_rt = rt.as_nanos() as u64;
                    committed.extend_from_slice(&drafts[..v.accepted as usize]);
                    committed.push(v.next_token);
                    if committed.len() != v.committed_len as usize {
                        return Err(format!(
                            "committed_len {} but the draft holds {}",
                            v.committed_len,
                            committed.len()
                        ));
                    }
                    gamma = script.fixed_gamma.unwrap_or(v.next_gamma);
                    with_history = false;
                    round += 1;
                    report.rounds += 1;
                    report.gammas.push(v.next_gamma);
                    report.verifiers.push(v.verifier_id);
                    report.latencies.push(rt);
                    report.coordinator_ns.push(v.coordinator_ns);
                }
                CoordinatorMessage::Error(e) => {
                    report.errors.push(e.code);
                    match e.code {
                        ErrorCode::ResyncNeeded => with_history = true,
                        ErrorCode::Overloaded | ErrorCode::Unavailable => {
                            retries += 1;
                            if retries > script.max_retries {
                                return Err(format!(
                                    "gave up after {retries} retries: {}",
                                    e.message
                                ));
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        _ => return Err(format!("session error {:?}: {}", e.code, e.message)),
                    }
                }
                other => return Err(format!("unexpected message {other:?}")),
            }
        }
        self.close(script.session_id)
            .await
            .map_err(|e| e.to_string())?;
        report.tokens = committed;
        Ok(report)
    }
}

impl Drop for DraftClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}
