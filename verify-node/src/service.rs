//! The gRPC edge: the `Verifier` service. Wire messages are converted to domain types here (and
//! only here and in `registration`); call-level failures are mapped to `tonic::Status` in one
//! place ([`status`]).

use std::sync::Arc;

use edgespec_proto::auth;
use edgespec_proto::domain::{
    BatchReply, ErrorCode, ItemResult, Load, NodeInfo, Release, SessionError, Timings, VerifyBatch,
};
use edgespec_proto::{pb, ProtocolError};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::batcher::Batcher;
use crate::sessions::Owner;
use crate::{Error, NodeFacts};

/// The caller's certificate identity (mTLS; empty in plaintext mode), which together with the
/// coordinator instance id a request carries scopes its session ids.
fn peer<T>(request: &Request<T>) -> String {
    auth::caller(request)
        .map(|c| c.uri.clone())
        .unwrap_or_default()
}

/// The `edgespec.v1.Verifier` implementation.
#[derive(Debug, Clone)]
pub struct VerifierService {
    batcher: Batcher,
    facts: Arc<NodeFacts>,
}

impl VerifierService {
    /// A service that verifies through `batcher` and describes itself with `facts`.
    pub fn new(batcher: Batcher, facts: Arc<NodeFacts>) -> Self {
        Self { batcher, facts }
    }
}

/// Why a whole call was refused (mapped to a `Status` in [`status`]).
enum CallError {
    WrongFingerprint { got: String, ours: String },
    Malformed(ProtocolError),
    Node(Error),
}

/// The one place call-level failures become gRPC statuses.
fn status(e: CallError) -> Status {
    match e {
        CallError::WrongFingerprint { got, ours } => Status::failed_precondition(format!(
            "model fingerprint `{got}` does not match this verify node's `{ours}`"
        )),
        CallError::Malformed(e) => Status::invalid_argument(e.to_string()),
        CallError::Node(Error::Stopped) => Status::unavailable("the verify node is shutting down"),
        CallError::Node(e) => {
            tracing::error!(error = %e, "verify call failed");
            Status::internal("internal error on the verify node")
        }
    }
}

#[tonic::async_trait]
impl pb::verifier_server::Verifier for VerifierService {
    #[tracing::instrument(skip_all, fields(batch_id, items))]
    async fn verify(
        &self,
        request: Request<pb::VerifyBatchRequest>,
    ) -> Result<Response<pb::VerifyBatchResponse>, Status> {
        let arrived = Instant::now();
        let peer = peer(&request);
        let batch = VerifyBatch::try_from(request.into_inner())
            .map_err(|e| status(CallError::Malformed(e)))?;
        let span = tracing::Span::current();
        span.record("batch_id", batch.batch_id);
        span.record("items", batch.items.len());
        if batch.fingerprint != self.facts.fingerprint {
            return Err(status(CallError::WrongFingerprint {
                got: batch.fingerprint,
                ours: self.facts.fingerprint.clone(),
            }));
        }
        let owner = Owner::new(&peer, &batch.coordinator_id);
        let blocks: Vec<_> = batch.blocks().cloned().collect();
        let (served, load) = if blocks.is_empty() {
            (Vec::new(), self.batcher.load())
        } else {
            let reply = self
                .batcher
                .verify(owner, blocks, arrived)
                .await
                .map_err(|e| status(CallError::Node(e)))?;
            (reply.results, reply.load)
        };
        let mut served = served.into_iter();
        let results = batch
            .items
            .into_iter()
            .map(|item| match item {
                // The batcher answers every block; the fallback is only a guard.
                Ok(_) => served.next().unwrap_or_else(|| {
                    not_verified(SessionError {
                        session_id: 0,
                        round: 0,
                        code: ErrorCode::Internal,
                        message: "the block was not served".into(),
                    })
                }),
                Err(e) => not_verified(e),
            })
            .map(Ok)
            .collect();
        Ok(Response::new(
            BatchReply {
                batch_id: batch.batch_id,
                results,
                load: Some(load),
            }
            .into(),
        ))
    }

    #[tracing::instrument(skip_all, fields(sessions))]
    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let peer = peer(&request);
        let release =
            Release::try_from(request.into_inner()).map_err(|e| status(CallError::Malformed(e)))?;
        tracing::Span::current().record("sessions", release.session_ids.len());
        let owner = Owner::new(&peer, &release.coordinator_id);
        let released = self
            .batcher
            .release(owner, release.session_ids)
            .await
            .map_err(|e| status(CallError::Node(e)))?;
        Ok(Response::new(pb::ReleaseResponse {
            released: released as u32,
        }))
    }

    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        Ok(Response::new(pb::NodeInfo::from(&node_info(
            &self.facts,
            self.batcher.load(),
        ))))
    }
}

/// The result of a block that never reached a forward.
fn not_verified(e: SessionError) -> ItemResult {
    ItemResult {
        session_id: e.session_id,
        round: e.round,
        result: Err(e),
        timings: Timings::default(),
    }
}

/// The node's facts plus its load, as registrations and `Info` carry them.
pub(crate) fn node_info(f: &NodeFacts, load: Load) -> NodeInfo {
    NodeInfo {
        node_id: f.node_id.clone(),
        advertise_addr: f.advertise_addr.clone(),
        pool: f.pool,
        model_name: f.model_name.clone(),
        fingerprint: f.fingerprint.clone(),
        vocab_size: f.vocab_size as u32,
        max_context: f.max_context as u32,
        capacity_sessions: f.capacity_sessions as u32,
        max_block_tokens: f.max_block_tokens as u32,
        max_batch_tokens: f.max_batch_tokens as u32,
        device: f.device.clone(),
        load,
    }
}
