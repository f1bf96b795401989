//! The task that owns [`Core`] and carries out its side effects: it receives commands from the
//! gRPC and HTTP edges over a bounded channel (replying through `oneshot`), fires batching
//! deadlines and periodic ticks, makes the Verify/Release calls and writes to draft streams.

use crate::core::{Core, NodesView, Out, SessionView, StreamId};
use crate::policy::{Policy, PolicyPatch};
use crate::registry::{AdminState, NodeAction};
use crate::settings::VerifySettings;
use crate::Error;
use edgespec_proto::domain::{
    BatchReply, CoordinatorMessage, DraftMessage, Heartbeat, HeartbeatAck, Hello, NodeInfo,
    Registration, Release,
};
use edgespec_proto::pb;
use edgespec_proto::pb::verifier_client::VerifierClient;
use edgespec_runtime::tls::Tls;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::Channel;
use tonic::Status;

/// Outgoing half of a draft stream, bounded by [`STREAM_QUEUE`]: a peer that stops reading
/// cannot make the coordinator hold more than that many messages for it.
pub type StreamTx = mpsc::Sender<Result<pb::CoordinatorMessage, Status>>;

/// Messages queued toward one draft stream. The coordinator writes at most one verdict or error
/// per block the draft node sent, and a draft node has at most one block in flight per session;
/// a stream whose queue is full is not reading, and is dropped (its sessions released). Probes
/// are only sent to a stream with nothing queued, so a stalled peer never accumulates 64 KiB
/// bandwidth probes.
pub const STREAM_QUEUE: usize = 1024;

const COMMAND_QUEUE: usize = 4096;

enum Command {
    Hello {
        hello: Hello,
        tx: StreamTx,
        reply: oneshot::Sender<Result<StreamId, Error>>,
    },
    Draft {
        stream: StreamId,
        msg: DraftMessage,
        received: Instant,
    },
    Invalid {
        stream: StreamId,
        session_round: (u64, u64),
        why: String,
    },
    Disconnect {
        stream: StreamId,
    },
    Register {
        info: NodeInfo,
        reply: oneshot::Sender<Result<Registration, Error>>,
    },
    Heartbeat {
        req: Heartbeat,
        reply: oneshot::Sender<HeartbeatAck>,
    },
    BatchDone {
        batch_id: u64,
        result: Result<BatchReply, String>,
    },
    Nodes {
        reply: oneshot::Sender<NodesView>,
    },
    Sessions {
        reply: oneshot::Sender<Vec<SessionView>>,
    },
    GetPolicy {
        reply: oneshot::Sender<Policy>,
    },
    SetPolicy {
        patch: PolicyPatch,
        reply: oneshot::Sender<Result<Policy, Error>>,
    },
    NodeAction {
        node: String,
        action: NodeAction,
        reply: oneshot::Sender<Result<AdminState, Error>>,
    },
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

/// Cheap, cloneable access to the actor.
#[derive(Clone, Debug)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl Handle {
    async fn send(&self, c: Command) -> Result<(), Error> {
        self.tx.send(c).await.map_err(|_| Error::ShuttingDown)
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        rx.await.map_err(|_| Error::ShuttingDown)
    }

    /// Opens a draft stream; the actor writes the Welcome to `tx` itself.
    pub async fn hello(&self, hello: Hello, tx: StreamTx) -> Result<StreamId, Error> {
        self.ask(|reply| Command::Hello { hello, tx, reply })
            .await?
    }

    /// A validated draft message.
    pub async fn draft(&self, stream: StreamId, msg: DraftMessage) -> Result<(), Error> {
        let received = Instant::now();
        self.send(Command::Draft {
            stream,
            msg,
            received,
        })
        .await
    }

    /// A draft message that failed validation.
    pub async fn invalid(
        &self,
        stream: StreamId,
        session_round: (u64, u64),
        why: String,
    ) -> Result<(), Error> {
        self.send(Command::Invalid {
            stream,
            session_round,
            why,
        })
        .await
    }

    /// A draft stream ended.
    pub async fn disconnect(&self, stream: StreamId) {
        let _ = self.send(Command::Disconnect { stream }).await;
    }

    /// Verify node registration.
    pub async fn register(&self, info: NodeInfo) -> Result<Registration, Error> {
        self.ask(|reply| Command::Register { info, reply }).await?
    }

    /// Verify node heartbeat.
    pub async fn heartbeat(&self, req: Heartbeat) -> Result<HeartbeatAck, Error> {
        self.ask(|reply| Command::Heartbeat { req, reply }).await
    }

    /// Admin: nodes.
    pub async fn nodes(&self) -> Result<NodesView, Error> {
        self.ask(|reply| Command::Nodes { reply }).await
    }

    /// Admin: sessions.
    pub async fn sessions(&self) -> Result<Vec<SessionView>, Error> {
        self.ask(|reply| Command::Sessions { reply }).await
    }

    /// Admin: policy.
    pub async fn policy(&self) -> Result<Policy, Error> {
        self.ask(|reply| Command::GetPolicy { reply }).await
    }

    /// Admin: policy update.
    pub async fn set_policy(&self, patch: PolicyPatch) -> Result<Policy, Error> {
        self.ask(|reply| Command::SetPolicy { patch, reply })
            .await?
    }

    /// Admin: drain / cordon / uncordon.
    pub async fn node_action(&self, node: String, action: NodeAction) -> Result<AdminState, Error> {
        self.ask(|reply| Command::NodeAction {
            node,
            action,
            reply,
        })
        .await?
    }

    /// Finishes in-flight work, closes every draft stream and stops the actor.
    pub async fn shutdown(&self) {
        let _ = self.ask(|done| Command::Shutdown { done }).await;
    }
}

/// What the actor publishes for readiness.
pub type Ready = watch::Receiver<usize>;

struct Actor {
    core: Core,
    verify: VerifySettings,
    tls: Tls,
    tick: Duration,
    streams: HashMap<StreamId, StreamTx>,
    clients: HashMap<String, VerifierClient<Channel>>,
    /// The certificate generation ([`Tls::version`]) the cached clients were dialled with.
    clients_tls_version: u64,
    self_tx: mpsc::Sender<Command>,
    ready: watch::Sender<usize>,
}

/// Starts the actor; returns its handle, the readiness channel (verifiers up) and its task.
pub fn spawn(
    core: Core,
    verify: VerifySettings,
    tls: Tls,
    tick: Duration,
) -> (Handle, Ready, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let (ready, ready_rx) = watch::channel(0);
    let actor = Actor {
        core,
        verify,
        tls,
        tick,
        streams: HashMap::new(),
        clients: HashMap::new(),
        clients_tls_version: 0,
        self_tx: tx.clone(),
        ready,
    };
    let task = tokio::spawn(actor.run(rx));
    (Handle { tx }, ready_rx, task)
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown: Option<(oneshot::Sender<()>, Instant)> = None;
        loop {
            let mut out = Out::default();
            let deadline = self.core.next_deadline();
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(Command::Shutdown { done }) => {
                        self.core.begin_shutdown();
                        let limit = now() + self.verify.timeout + Duration::from_secs(1);
                        shutdown = Some((done, limit));
                        self.core.flush(now(), &mut out);
                    }
                    Some(cmd) => self.handle(cmd, &mut out),
                    None => break,
                },
                () = sleep_until(deadline), if deadline.is_some() => self.core.flush(now(), &mut out),
                _ = tick.tick() => self.core.tick(now(), &mut out),
            }
            self.execute(out);
            let _ = self.ready.send_if_modified(|v| {
                let up = self.core.verifiers_up();
                std::mem::replace(v, up) != up
            });
            if let Some((_, limit)) = &shutdown {
                if self.core.inflight_batches() == 0 || now() >= *limit {
                    break;
                }
            }
        }
        // Dropping the senders ends every draft stream's response.
        self.streams.clear();
        if let Some((done, _)) = shutdown {
            let _ = done.send(());
        }
        tracing::info!("coordinator state actor stopped");
    }

    fn handle(&mut self, cmd: Command, out: &mut Out) {
        let t = now();
        match cmd {
            Command::Hello { hello, tx, reply } => match self.core.hello(&hello, t) {
                Ok((id, welcome)) => {
                    let _ = tx.try_send(Ok(CoordinatorMessage::Welcome(welcome).into()));
                    self.streams.insert(id, tx);
                    let _ = reply.send(Ok(id));
                }
                Err(e) => {
                    tracing::warn!(draft_node = %hello.node_id, error = %e, "refused a draft node");
                    let _ = reply.send(Err(e));
                }
            },
            Command::Draft {
                stream,
                msg,
                received,
            } => self.core.draft_message(stream, msg, received, out),
            Command::Invalid {
                stream,
                session_round,
                why,
            } => self.core.invalid_message(stream, session_round, why, out),
            Command::Disconnect { stream } => {
                self.streams.remove(&stream);
                self.core.disconnect(stream, out);
            }
            Command::Register { info, reply } => {
                let r = self.core.register(&info, t);
                if r.is_ok() {
                    // A fresh registration gets a fresh connection.
                    self.clients.remove(&info.advertise_addr);
                }
                let _ = reply.send(r);
            }
            Command::Heartbeat { req, reply } => {
                let _ = reply.send(self.core.heartbeat(&req.node_id, req.load, req.draining, t));
            }
            Command::BatchDone { batch_id, result } => {
                if result.is_err() {
                    // Drop the connection of a failed node; a re-registration dials afresh.
                    if let Some(addr) = self.core.inflight_addr(batch_id) {
                        self.clients.remove(&addr);
                    }
                }
                self.core.batch_done(batch_id, result, t, out);
            }
            Command::Nodes { reply } => {
                let _ = reply.send(self.core.nodes_view(t));
            }
            Command::Sessions { reply } => {
                let _ = reply.send(self.core.sessions_view());
            }
            Command::GetPolicy { reply } => {
                let _ = reply.send(self.core.policy().clone());
            }
            Command::SetPolicy { patch, reply } => {
                let r = self.core.policy().patched(&patch).map_err(Error::from);
                if let Ok(p) = &r {
                    tracing::info!(policy = ?p, "policy updated");
                    self.core.set_policy(p.clone());
                }
                let _ = reply.send(r);
            }
            Command::NodeAction {
                node,
                action,
                reply,
            } => {
                let _ = reply.send(self.core.node_action(&node, action));
            }
            Command::Shutdown { done } => {
                let _ = done.send(());
            }
        }
    }

    fn client(&mut self, addr: &str) -> Result<VerifierClient<Channel>, String> {
        // A reloaded certificate: dial afresh so new connections present it (calls in flight
        // finish on the old ones).
        let version = self.tls.version();
        if version != self.clients_tls_version {
            self.clients.clear();
            self.clients_tls_version = version;
        }
        if let Some(c) = self.clients.get(addr) {
            return Ok(c.clone());
        }
        let ep = self
            .tls
            .endpoint(addr)
            .map_err(|e| format!("bad verifier address: {e}"))?
            .connect_timeout(self.verify.connect_timeout)
            // No channel-wide deadline: each call has its own (`verify_deadline`), which a
            // batch with long prefills extends.
            .tcp_nodelay(true)
            // A verify node that vanished without a reset fails its calls within the keepalive,
            // not at the call's deadline.
            .http2_keep_alive_interval(self.core.settings().grpc.keepalive_interval)
            .keep_alive_timeout(self.core.settings().grpc.keepalive_timeout)
            .keep_alive_while_idle(true);
        let c = VerifierClient::new(ep.connect_lazy())
            .max_decoding_message_size(self.core.settings().grpc.max_message_bytes)
            .max_encoding_message_size(self.core.settings().grpc.max_message_bytes);
        self.clients.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    fn execute(&mut self, out: Out) {
        let mut stalled = Vec::new();
        for (stream, msg) in out.messages {
            let Some(tx) = self.streams.get(&stream) else {
                continue;
            };
            if matches!(msg, CoordinatorMessage::Probe(_)) && tx.capacity() < tx.max_capacity() {
                continue; // the peer is behind: a probe would only measure our own queue
            }
            if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(Ok(msg.into())) {
                stalled.push(stream);
            }
        }
        if !stalled.is_empty() {
            let mut more = Out::default();
            for stream in stalled {
                tracing::warn!(
                    stream,
                    queued = STREAM_QUEUE,
                    "a draft stream stopped reading; dropping it and releasing its sessions"
                );
                self.streams.remove(&stream);
                self.core.disconnect(stream, &mut more);
            }
            self.execute(more);
        }
        for l in out.launches {
            let done = self.self_tx.clone();
            let client = self.client(&l.addr);
            let timeout = verify_deadline(&self.verify, &l.request);
            tokio::spawn(async move {
                let result = match client {
                    Err(e) => Err(e),
                    Ok(mut c) => {
                        let request = pb::VerifyBatchRequest::from(&l.request);
                        match tokio::time::timeout(timeout, c.verify(request)).await {
                            Ok(Ok(r)) => Ok(BatchReply::from(r.into_inner())),
                            Ok(Err(s)) => {
                                Err(format!("Verify on {} failed: {}", l.node_id, s.message()))
                            }
                            Err(_) => Err(format!(
                                "Verify on {} timed out after {timeout:?}",
                                l.node_id
                            )),
                        }
                    }
                };
                let _ = done
                    .send(Command::BatchDone {
                        batch_id: l.batch_id,
                        result,
                    })
                    .await;
            });
        }
        for r in out.releases {
            let Ok(mut c) = self.client(&r.addr) else {
                continue;
            };
            let timeout = self.verify.timeout;
            let coordinator_id = self.core.id().to_string();
            tokio::spawn(async move {
                let req = pb::ReleaseRequest::from(&Release {
                    session_ids: r.session_ids,
                    coordinator_id,
                });
                if let Ok(Err(e)) = tokio::time::timeout(timeout, c.release(req)).await {
                    tracing::debug!(node = %r.node_id, error = %e.message(), "release failed");
                }
            });
        }
    }
}

/// The deadline of one Verify call: `verify.timeout`, plus `verify.prefill_timeout_per_token`
/// for every row of its opens and resyncs, so a long prompt's prefill (chunked on the node,
/// however many forwards it takes) is not taken for a dead node.
fn verify_deadline(
    verify: &VerifySettings,
    request: &edgespec_proto::domain::VerifyBatch,
) -> Duration {
    let prefill_rows: usize = request
        .blocks()
        .filter(|b| b.history.is_some())
        .map(edgespec_proto::domain::Block::forward_tokens)
        .sum();
    let rows = u32::try_from(prefill_rows).unwrap_or(u32::MAX);
    verify
        .timeout
        .saturating_add(verify.prefill_timeout_per_token.saturating_mul(rows))
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}
