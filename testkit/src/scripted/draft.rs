//! Scripted draft streams: a tonic client of `Coordinator.Drafts` that multiplexes sessions.

use super::session::DRAFT_S_PER_TOKEN;
use super::{FINGERPRINT, VOCAB};
use edgespec_proto::domain::{CoordinatorMessage, DraftMessage};
use edgespec_proto::pb;
use edgespec_proto::pb::coordinator_client::CoordinatorClient;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
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
            draft_s_per_token: DRAFT_S_PER_TOKEN,
            pipelined: false,
            max_gamma: 0,
            method: pb::DraftMethod::Unspecified as i32,
        };
        tx.send(pb::DraftMessage {
            kind: Some(pb::draft_message::Kind::Hello(hello)),
        })
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
                        let _ = reply_tx
                            .send(DraftMessage::ProbeReply(p.reply()).into())
                            .await;
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
}

impl Drop for DraftClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}
