//! Registration with coordinators (a gRPC edge): register at start, heartbeat the load, and
//! register again when a heartbeat says the coordinator does not know the node (it restarted)
//! or after the coordinator was unreachable. Serving never depends on it: with every coordinator
//! down the node keeps answering the calls that reach it.

use std::sync::Arc;
use std::time::Duration;

use edgespec_proto::domain::{self, Heartbeat, HeartbeatAck};
use edgespec_proto::pb;
use edgespec_proto::pb::coordinator_client::CoordinatorClient;
use edgespec_runtime::tls::{Tls, DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_TIMEOUT};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::batcher::Batcher;
use crate::service::node_info;
use crate::NodeFacts;

/// Timing of the registration loops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistrationConfig {
    /// Heartbeat period until a coordinator names its own.
    pub heartbeat_interval: Duration,
    /// Wait between attempts to reach a coordinator that is down.
    pub retry_interval: Duration,
    /// Timeout of one call.
    pub rpc_timeout: Duration,
}

/// What the registration loops share.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Timing.
    pub config: RegistrationConfig,
    /// The node's facts.
    pub facts: Arc<NodeFacts>,
    /// For load reports.
    pub batcher: Batcher,
    /// Becomes true when the node stops: each loop heartbeats `draining` at once.
    pub draining: watch::Receiver<bool>,
    /// Coordinators that acknowledged a `draining` heartbeat.
    pub told: Arc<std::sync::atomic::AtomicUsize>,
}

/// Starts one registration loop per coordinator address; they stop when `cancel` fires.
pub fn spawn(
    addresses: &[String],
    tls: &Tls,
    shared: Registration,
    cancel: CancellationToken,
) -> Vec<JoinHandle<()>> {
    let config = shared.config;
    addresses
        .iter()
        .filter_map(|addr| {
            let client = match dial(tls, addr, &config) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(coordinator = %addr, error = %e, "invalid coordinator address");
                    return None;
                }
            };
            let registrar = Registrar {
                addr: addr.clone(),
                client,
                tls: tls.clone(),
                tls_version: tls.version(),
                config,
                facts: shared.facts.clone(),
                batcher: shared.batcher.clone(),
                draining: shared.draining.clone(),
                told: shared.told.clone(),
                acknowledged: false,
            };
            Some(tokio::spawn(registrar.run(cancel.clone())))
        })
        .collect()
}

/// A lazily connecting client of the coordinator at `addr`, with this node's current
/// certificate.
fn dial(
    tls: &Tls,
    addr: &str,
    config: &RegistrationConfig,
) -> Result<CoordinatorClient<Channel>, edgespec_runtime::tls::TlsError> {
    let endpoint = tls
        .endpoint(addr)?
        .connect_timeout(config.rpc_timeout)
        .timeout(config.rpc_timeout)
        .http2_keep_alive_interval(DEFAULT_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(DEFAULT_KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    Ok(CoordinatorClient::new(endpoint.connect_lazy()))
}

struct Registrar {
    addr: String,
    client: CoordinatorClient<Channel>,
    tls: Tls,
    /// The certificate generation `client` was dialled with.
    tls_version: u64,
    config: RegistrationConfig,
    facts: Arc<NodeFacts>,
    batcher: Batcher,
    draining: watch::Receiver<bool>,
    told: Arc<std::sync::atomic::AtomicUsize>,
    acknowledged: bool,
}

impl Registrar {
    async fn run(mut self, cancel: CancellationToken) {
        let mut registered: Option<Duration> = None; // heartbeat interval once registered
        let mut down_reported = false;
        loop {
            let wait = match registered {
                None => match self.register().await {
                    Ok(interval) => {
                        tracing::info!(coordinator = %self.addr, "registered with the coordinator");
                        down_reported = false;
                        registered = Some(interval);
                        Duration::ZERO
                    }
                    Err(e) => {
                        self.drain_told();
                        if !down_reported {
                            tracing::warn!(coordinator = %self.addr, error = %e,
                                "cannot register with the coordinator; retrying");
                            down_reported = true;
                        }
                        self.config.retry_interval
                    }
                },
                Some(interval) => match self.heartbeat().await {
                    Ok(true) => {
                        self.drain_told();
                        interval
                    }
                    Ok(false) => {
                        tracing::info!(coordinator = %self.addr,
                            "the coordinator does not know this node; registering again");
                        registered = None;
                        Duration::ZERO
                    }
                    Err(e) => {
                        // Unreachable: it cannot place sessions here either.
                        self.drain_told();
                        tracing::warn!(coordinator = %self.addr, error = %e,
                            "heartbeat failed; registering again once the coordinator is back");
                        down_reported = true;
                        registered = None;
                        self.config.retry_interval
                    }
                },
            };
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
                // Stopping: tell the coordinator now, not at the next period.
                Ok(()) = self.draining.changed() => {}
            }
        }
        tracing::debug!(coordinator = %self.addr, "registration stopped");
    }

    /// Counts this coordinator as done with the drain announcement once the node is draining
    /// and the coordinator has either heard a `draining` heartbeat or cannot be reached.
    fn drain_told(&mut self) {
        if *self.draining.borrow() && !self.acknowledged {
            self.acknowledged = true;
            self.told.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Dials afresh after a certificate reload, so the next connection presents the new one.
    fn redial_on_new_certificate(&mut self) {
        let version = self.tls.version();
        if version == self.tls_version {
            return;
        }
        match dial(&self.tls, &self.addr, &self.config) {
            Ok(c) => {
                self.client = c;
                self.tls_version = version;
            }
            Err(e) => tracing::warn!(coordinator = %self.addr, error = %e, "redialling failed"),
        }
    }

    /// Registers; returns the heartbeat interval to use.
    async fn register(&mut self) -> Result<Duration, tonic::Status> {
        self.redial_on_new_certificate();
        let info = pb::NodeInfo::from(&node_info(&self.facts, self.batcher.load()));
        let resp = self
            .client
            .register_verifier(pb::RegisterVerifierRequest { info: Some(info) })
            .await?
            .into_inner();
        let registration = domain::Registration::from(resp);
        Ok(if registration.heartbeat_interval.is_zero() {
            self.config.heartbeat_interval
        } else {
            registration.heartbeat_interval
        })
    }

    /// Sends one heartbeat; returns whether the coordinator knows the node.
    async fn heartbeat(&mut self) -> Result<bool, tonic::Status> {
        self.redial_on_new_certificate();
        let draining = *self.draining.borrow();
        let resp = self
            .client
            .verifier_heartbeat(pb::VerifierHeartbeatRequest::from(&Heartbeat {
                node_id: self.facts.node_id.clone(),
                load: Some(self.batcher.load()),
                draining,
            }))
            .await?
            .into_inner();
        Ok(HeartbeatAck::from(resp).known)
    }
}
