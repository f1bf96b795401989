//! The gRPC edge: opens the `Coordinator.Drafts` stream, says hello, checks the Welcome, and
//! converts messages between `pb` and the node's own types. The only module that knows prost
//! types besides `edgespec_proto` itself.

use std::sync::Arc;
use std::time::Duration;

use edgespec_proto::domain::{self, CoordinatorMessage, DraftBlock, DraftMessage};
use edgespec_proto::pb;
use edgespec_proto::pb::coordinator_client::CoordinatorClient;
use edgespec_runtime::tls::{source_chain, Tls};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use super::{Inbound, Welcome};
use crate::session::Estimates;

/// Outgoing messages buffered per stream.
const OUTBOUND_CAPACITY: usize = 4096;

/// What the node says about itself in `DraftHello`.
#[derive(Debug, Clone)]
pub(crate) struct Hello {
    /// Node id.
    pub node_id: String,
    /// Draft model name.
    pub model_name: String,
    /// Draft tokenizer fingerprint.
    pub fingerprint: String,
    /// Draft vocabulary size.
    pub vocab_size: u32,
    /// Measured draft seconds per token per method, updated by sessions (the hello reports
    /// the default method's).
    pub estimates: Arc<Estimates>,
    /// Whether sessions draft ahead (`drafting.pipeline`).
    pub pipelined: bool,
    /// Largest γ this node drafts (`drafting.max_gamma`).
    pub max_gamma: u32,
    /// How sessions draft by default (`drafting.method`).
    pub method: domain::DraftMethod,
}

/// How to reach the coordinator.
#[derive(Debug, Clone)]
pub(crate) struct LinkConfig {
    /// gRPC URL.
    pub address: String,
    /// mTLS material, or plaintext.
    pub tls: Tls,
    /// One attempt's timeout (connect and Welcome).
    pub connect_timeout: Duration,
    /// Our identity.
    pub hello: Hello,
}

/// Why a stream could not be opened.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum LinkError {
    /// Transport failure or an unusable answer: retry.
    #[error("{0}")]
    Unreachable(String),
    /// The Welcome names a different fleet fingerprint.
    #[error("the draft model's fingerprint {draft} differs from the verify fleet's {fleet}")]
    Mismatch { draft: String, fleet: String },
    /// The coordinator refused our model (FAILED_PRECONDITION).
    #[error("the coordinator refused the draft model (fingerprint {draft}): {reason}")]
    Refused { draft: String, reason: String },
}

/// An open `Drafts` stream.
pub(crate) struct Link {
    out: mpsc::Sender<pb::DraftMessage>,
    inbound: tonic::Streaming<pb::CoordinatorMessage>,
    /// The coordinator's Welcome.
    pub welcome: Welcome,
}

impl Link {
    /// Opens the stream and completes the hello/welcome exchange.
    pub async fn open(cfg: &LinkConfig) -> Result<Link, LinkError> {
        let unreachable = |e: &dyn std::fmt::Display| LinkError::Unreachable(e.to_string());
        let endpoint = cfg
            .tls
            .endpoint(&cfg.address)
            .map_err(|e| unreachable(&e))?
            .connect_timeout(cfg.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| LinkError::Unreachable(source_chain(&e)))?;
        let (out, rx) = mpsc::channel(OUTBOUND_CAPACITY);
        let h = &cfg.hello;
        let hello = domain::Hello {
            node_id: h.node_id.clone(),
            model_name: h.model_name.clone(),
            fingerprint: h.fingerprint.clone(),
            vocab_size: h.vocab_size,
            draft_s_per_token: f64::from(h.estimates.cost(h.method)),
            pipelined: h.pipelined,
            max_gamma: h.max_gamma,
            method: h.method,
        };
        out.send(DraftMessage::Hello(hello).into())
            .await
            .map_err(|e| unreachable(&e))?;
        let refused = |s: &tonic::Status| match s.code() {
            Code::FailedPrecondition => LinkError::Refused {
                draft: h.fingerprint.clone(),
                reason: s.message().to_string(),
            },
            // The cause (e.g. the TLS alert of a refused certificate) is in the source chain.
            _ => {
                let chain = match std::error::Error::source(s) {
                    Some(cause) => {
                        format!("{}: {}: {}", s.code(), s.message(), source_chain(cause))
                    }
                    None => format!("{}: {}", s.code(), s.message()),
                };
                LinkError::Unreachable(cfg.tls.explain_dial_error(chain))
            }
        };
        let handshake = async {
            let mut inbound = CoordinatorClient::new(channel)
                .drafts(ReceiverStream::new(rx))
                .await
                .map_err(|s| refused(&s))?
                .into_inner();
            let first = inbound.message().await.map_err(|s| refused(&s))?;
            Ok::<_, LinkError>((inbound, first))
        };
        let (inbound, first) = tokio::time::timeout(cfg.connect_timeout, handshake)
            .await
            .map_err(|_| {
                LinkError::Unreachable("no Welcome within the connect timeout".into())
            })??;
        let welcome = match first.map(CoordinatorMessage::try_from) {
            Some(Ok(CoordinatorMessage::Welcome(w))) => w,
            Some(Ok(_)) => {
                return Err(unreachable(
                    &"the coordinator's first message was not a Welcome",
                ))
            }
            Some(Err(e)) => return Err(unreachable(&e)),
            None => return Err(unreachable(&"the coordinator closed the stream at once")),
        };
        if !welcome.fleet_fingerprint.is_empty() && welcome.fleet_fingerprint != h.fingerprint {
            return Err(LinkError::Mismatch {
                draft: h.fingerprint.clone(),
                fleet: welcome.fleet_fingerprint,
            });
        }
        Ok(Link {
            out,
            inbound,
            welcome,
        })
    }

    /// Queues a message for the coordinator. `false` when the stream is gone.
    pub async fn send(&self, msg: DraftMessage) -> bool {
        self.out.send(msg.into()).await.is_ok()
    }

    /// Queues a block.
    pub async fn send_block(&self, block: &DraftBlock) -> bool {
        self.out
            .send(pb::DraftMessage {
                kind: Some(pb::draft_message::Kind::Block(pb::DraftBlock::from(block))),
            })
            .await
            .is_ok()
    }

    /// The next message from the coordinator; `Err` when the stream ended or broke.
    pub async fn recv(&mut self) -> Result<Inbound, String> {
        loop {
            let msg = match self.inbound.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return Err("the coordinator ended the stream".into()),
                Err(s) => return Err(format!("{}: {}", s.code(), s.message())),
            };
            match CoordinatorMessage::try_from(msg) {
                Ok(CoordinatorMessage::Verdict(v)) => return Ok(Inbound::Verdict(v)),
                Ok(CoordinatorMessage::Error(e)) => return Ok(Inbound::Error(e)),
                Ok(CoordinatorMessage::Welcome(w)) => return Ok(Inbound::Welcome(w)),
                Ok(CoordinatorMessage::Probe(p)) => {
                    // Answered here, at once, so the RTT estimate excludes any session work.
                    if !self.send(DraftMessage::ProbeReply(p.reply())).await {
                        return Err("the outgoing stream is closed".into());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "ignoring a malformed coordinator message"),
            }
        }
    }
}
