//! The gRPC edge: the `Verifier` service. Wire messages are converted to domain types here (and
//! only here and in `registration`); call-level failures are mapped to `tonic::Status` in one
//! place ([`status`]).

use std::collections::HashSet;
use std::sync::Arc;

use edgespec_proto::auth;
use edgespec_proto::domain::{Block, ErrorCode, SessionError};
use edgespec_proto::pb;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::batcher::{Batcher, ItemResult, Timings};
use crate::load::Load;
use crate::sessions::Owner;
use crate::{Error, NodeFacts};

/// Longest coordinator instance id accepted.
const MAX_COORDINATOR_ID_LEN: usize = 128;

/// The owner of the sessions a call names: the caller's certificate identity (mTLS) plus the
/// coordinator instance id the request carries, which is required.
fn owner<T>(request: &Request<T>, coordinator_id: &str) -> Result<Owner, Status> {
    if coordinator_id.is_empty() {
        return Err(Status::invalid_argument(
            "coordinator_id is empty; it scopes the request's session ids and is required",
        ));
    }
    if coordinator_id.len() > MAX_COORDINATOR_ID_LEN {
        return Err(Status::invalid_argument(format!(
            "coordinator_id is longer than {MAX_COORDINATOR_ID_LEN} bytes"
        )));
    }
    let peer = auth::caller(request)
        .map(|c| c.uri.clone())
        .unwrap_or_default();
    Ok(Owner::new(&peer, coordinator_id))
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
    Malformed(String),
    Node(Error),
}

/// The one place call-level failures become gRPC statuses.
fn status(e: CallError) -> Status {
    match e {
        CallError::WrongFingerprint { got, ours } => Status::failed_precondition(format!(
            "model fingerprint `{got}` does not match this verify node's `{ours}`"
        )),
        CallError::Malformed(msg) => Status::invalid_argument(msg),
        CallError::Node(Error::Stopped) => Status::unavailable("the verify node is shutting down"),
        CallError::Node(e) => {
            tracing::error!(error = %e, "verify call failed");
            Status::internal("internal error on the verify node")
        }
    }
}

/// Checks the batch as a whole and converts its items: an item that is malformed on its own
/// becomes a per-item `INVALID_ARGUMENT` (one bad session never fails the others); a wrong
/// fingerprint, an empty batch or a session listed twice refuse the call.
fn convert_batch(
    m: pb::VerifyBatchRequest,
    fingerprint: &str,
) -> Result<Vec<Result<Block, SessionError>>, CallError> {
    if m.fingerprint != fingerprint {
        return Err(CallError::WrongFingerprint {
            got: m.fingerprint,
            ours: fingerprint.to_string(),
        });
    }
    if m.items.is_empty() {
        return Err(CallError::Malformed("the batch has no items".into()));
    }
    let mut seen = HashSet::with_capacity(m.items.len());
    if let Some(item) = m.items.iter().find(|i| !seen.insert(i.session_id)) {
        return Err(CallError::Malformed(format!(
            "session {} appears more than once in the batch",
            item.session_id
        )));
    }
    Ok(m.items
        .into_iter()
        .map(|item| {
            let (session_id, round) = (item.session_id, item.round);
            Block::try_from(item).map_err(|e| SessionError {
                session_id,
                round,
                code: ErrorCode::InvalidArgument,
                message: e.to_string(),
            })
        })
        .collect())
}

#[tonic::async_trait]
impl pb::verifier_server::Verifier for VerifierService {
    #[tracing::instrument(skip_all, fields(batch_id, items))]
    async fn verify(
        &self,
        request: Request<pb::VerifyBatchRequest>,
    ) -> Result<Response<pb::VerifyBatchResponse>, Status> {
        let arrived = Instant::now();
        let owner = owner(&request, &request.get_ref().coordinator_id)?;
        let m = request.into_inner();
        let batch_id = m.batch_id;
        let span = tracing::Span::current();
        span.record("batch_id", batch_id);
        span.record("items", m.items.len());
        let items = convert_batch(m, &self.facts.fingerprint).map_err(status)?;
        let blocks: Vec<Block> = items
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .cloned()
            .collect();
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
        let results = items
            .into_iter()
            .map(|item| match item {
                Ok(_) => served.next().map(result_pb).unwrap_or_else(|| {
                    // The batcher answers every block; this is only a guard.
                    error_pb(SessionError {
                        session_id: 0,
                        round: 0,
                        code: ErrorCode::Internal,
                        message: "the block was not served".into(),
                    })
                }),
                Err(e) => error_pb(e),
            })
            .collect();
        Ok(Response::new(pb::VerifyBatchResponse {
            batch_id,
            results,
            load: Some(load_pb(load)),
        }))
    }

    #[tracing::instrument(skip_all, fields(sessions))]
    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let owner = owner(&request, &request.get_ref().coordinator_id)?;
        let ids = request.into_inner().session_ids;
        tracing::Span::current().record("sessions", ids.len());
        let released = self
            .batcher
            .release(owner, ids)
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
        Ok(Response::new(node_info_pb(
            &self.facts,
            self.batcher.load(),
        )))
    }
}

fn result_pb(r: ItemResult) -> pb::VerifyResult {
    let result = match r.result {
        Ok(o) => pb::verify_result::Result::Outcome(o.into()),
        Err(e) => pb::verify_result::Result::Error(e.into()),
    };
    pb::VerifyResult {
        session_id: r.session_id,
        round: r.round,
        result: Some(result),
        timings: Some(timings_pb(r.timings)),
    }
}

fn error_pb(e: SessionError) -> pb::VerifyResult {
    pb::VerifyResult {
        session_id: e.session_id,
        round: e.round,
        result: Some(pb::verify_result::Result::Error(e.into())),
        timings: Some(timings_pb(Timings::default())),
    }
}

fn timings_pb(t: Timings) -> pb::VerifyTimings {
    pb::VerifyTimings {
        queue_ns: t.queue_ns,
        forward_ns: t.forward_ns,
        total_ns: t.total_ns,
        batch_tokens: t.batch_tokens,
        batch_sessions: t.batch_sessions,
    }
}

/// Wire form of a load report.
pub(crate) fn load_pb(l: Load) -> pb::VerifierLoad {
    pb::VerifierLoad {
        active_sessions: l.active_sessions,
        kv_bytes: l.kv_bytes,
        kv_budget_bytes: l.kv_budget_bytes,
        queued_tokens: l.queued_tokens,
        busy_fraction: l.busy_fraction,
        verify_base_s: l.verify_base_s,
        verify_per_token_s: l.verify_per_token_s,
    }
}

/// Wire form of the node's facts plus its load.
pub(crate) fn node_info_pb(f: &NodeFacts, load: Load) -> pb::NodeInfo {
    pb::NodeInfo {
        node_id: f.node_id.clone(),
        advertise_addr: f.advertise_addr.clone(),
        pool: f.pool.clone(),
        model_name: f.model_name.clone(),
        fingerprint: f.fingerprint.clone(),
        vocab_size: f.vocab_size as u32,
        max_context: f.max_context as u32,
        capacity_sessions: f.capacity_sessions as u32,
        max_block_tokens: f.max_block_tokens as u32,
        max_batch_tokens: f.max_batch_tokens as u32,
        device: f.device.clone(),
        load: Some(load_pb(load)),
    }
}
