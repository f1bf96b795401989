//! The gRPC edge: the `Coordinator` service. Converts wire messages to domain types at once and
//! hands them to the actor.

use crate::actor::Handle;
use crate::Error;
use edgespec_proto::auth::{caller, check_claim, check_node_id};
use edgespec_proto::domain::{DraftMessage, Heartbeat, NodeInfo};
use edgespec_proto::pb;
use futures::Stream;
use std::pin::Pin;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// The service.
pub struct CoordinatorService {
    handle: Handle,
    stop: CancellationToken,
}

impl CoordinatorService {
    /// A service over the actor; `stop` ends every stream reader at shutdown.
    pub fn new(handle: Handle, stop: CancellationToken) -> Self {
        Self { handle, stop }
    }
}

type OutStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

/// Session id and round of a raw message, for error replies to messages that fail validation.
fn session_round(m: &pb::DraftMessage) -> (u64, u64) {
    match &m.kind {
        Some(pb::draft_message::Kind::Block(b)) => (b.session_id, b.round),
        Some(pb::draft_message::Kind::Close(c)) => (c.session_id, 0),
        _ => (0, 0),
    }
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    type DraftsStream = OutStream;

    #[tracing::instrument(skip_all)]
    async fn drafts(
        &self,
        request: Request<Streaming<pb::DraftMessage>>,
    ) -> Result<Response<Self::DraftsStream>, Status> {
        // Only the certificate's own node id may say hello (checked once the hello is read).
        let peer = caller(&request);
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream ended before its DraftHello"))?;
        let hello = match DraftMessage::try_from(first).map_err(Error::from)? {
            DraftMessage::Hello(h) => h,
            _ => {
                return Err(Error::DraftProtocol(
                    "the first message of a Drafts stream must be a DraftHello".into(),
                )
                .into())
            }
        };
        check_claim(peer.as_deref(), &hello.node_id)?;
        let (tx, rx) = mpsc::channel(crate::actor::STREAM_QUEUE);
        let stream = self.handle.hello(hello, tx).await?;
        let handle = self.handle.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    m = inbound.message() => m,
                    () = stop.cancelled() => break,
                };
                let m = match next {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(stream, error = %e.message(), "draft stream broke");
                        break;
                    }
                };
                let sr = session_round(&m);
                let sent = match DraftMessage::try_from(m) {
                    Ok(msg) => handle.draft(stream, msg).await,
                    Err(e) => handle.invalid(stream, sr, e.to_string()).await,
                };
                if sent.is_err() {
                    break;
                }
            }
            handle.disconnect(stream).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(skip_all, fields(node))]
    async fn register_verifier(
        &self,
        request: Request<pb::RegisterVerifierRequest>,
    ) -> Result<Response<pb::RegisterVerifierResponse>, Status> {
        let peer = caller(&request);
        let info = request
            .into_inner()
            .info
            .ok_or_else(|| Status::invalid_argument("RegisterVerifierRequest.info is missing"))?;
        check_claim(peer.as_deref(), &info.node_id)?;
        tracing::Span::current().record("node", info.node_id.as_str());
        let info =
            NodeInfo::try_from(info).map_err(|e| Error::InvalidRegistration(e.to_string()))?;
        Ok(Response::new(self.handle.register(info).await?.into()))
    }

    async fn verifier_heartbeat(
        &self,
        request: Request<pb::VerifierHeartbeatRequest>,
    ) -> Result<Response<pb::VerifierHeartbeatResponse>, Status> {
        check_node_id(&request, &request.get_ref().node_id)?;
        let beat = Heartbeat::try_from(request.into_inner()).map_err(Error::from)?;
        Ok(Response::new(self.handle.heartbeat(beat).await?.into()))
    }
}
