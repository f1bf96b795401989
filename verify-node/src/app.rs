//! Wiring: load the model, bind the listeners, then serve the `Verifier` service (with health
//! and reflection), the batcher, the registration loops and the metrics/health HTTP endpoint
//! until shutdown, finishing in-flight batches before returning.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use edgespec_model::forward::load_gguf;
use edgespec_model::{ModelHandle, ModelHealth};
use edgespec_proto::auth::{Role, VERIFIER_RULES};
use edgespec_proto::domain::Pool;
use edgespec_proto::pb::verifier_server::VerifierServer;
use edgespec_proto::FILE_DESCRIPTOR_SET;
use edgespec_runtime::ops::{self, Exposition, ReadyCheck};
use edgespec_runtime::tls::Tls;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::batcher::{Batcher, BatcherConfig};
use crate::metrics::Metrics;
use crate::registration::{self, Registration, RegistrationConfig};
use crate::service::VerifierService;
use crate::sessions::Limits;
use crate::settings::device_label;
use crate::{Error, Settings};

/// Static facts a verify node reports (`NodeInfo` without the load).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    /// Node id.
    pub node_id: String,
    /// Address coordinators dial.
    pub advertise_addr: String,
    /// Placement pool.
    pub pool: Pool,
    /// Target model name.
    pub model_name: String,
    /// Tokenizer fingerprint of the target model.
    pub fingerprint: String,
    /// Logit row length.
    pub vocab_size: usize,
    /// Longest context a session may reach.
    pub max_context: usize,
    /// Sessions held at once.
    pub capacity_sessions: usize,
    /// Longest draft block.
    pub max_block_tokens: usize,
    /// Most tokens in one forward.
    pub max_batch_tokens: usize,
    /// `cpu` or `cuda:N`.
    pub device: String,
}

/// A verify node with its model loaded and its listener bound, ready to [`run`](App::run).
#[derive(Debug)]
pub struct App {
    settings: Settings,
    listener: TcpListener,
    model: ModelHandle,
    facts: Arc<NodeFacts>,
    metrics: Arc<Metrics>,
    tls: Tls,
    health_listener: Option<TcpListener>,
    metrics_listener: TcpListener,
}

impl App {
    /// Validates `settings`, loads the target model (on its own thread), then binds the gRPC
    /// listener (port 0 allowed; see [`grpc_addr`](App::grpc_addr)).
    pub async fn build(settings: Settings) -> Result<App, Error> {
        settings.validate()?;
        // TLS files are checked before the (slow) model load, so a wrong path fails at once.
        let tls = settings.tls.load(Role::Verify)?;
        // With mTLS the node is the one its certificate names (coordinators refuse any other id).
        let node_id = tls.node_id("server.node_id", &settings.server.node_id, || {
            format!("verify-{:08x}", rand::random::<u32>())
        })?;
        let device = settings.device()?;
        let path = settings.model.path.clone();
        let shown = path.display().to_string();
        let model = tokio::task::spawn_blocking(move || {
            ModelHandle::spawn("target", move || load_gguf(&path, device))
        })
        .await
        .map_err(|e| Error::LoadModel {
            path: shown.clone(),
            source: edgespec_model::ModelError::Panicked(e.to_string()),
        })?
        .map_err(|source| Error::LoadModel {
            path: shown.clone(),
            source,
        })?;
        let listen = settings.server.listen;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| Error::Bind {
                addr: listen.to_string(),
                source,
            })?;
        let bound = listener.local_addr().map_err(|source| Error::Bind {
            addr: listen.to_string(),
            source,
        })?;
        let health_listener = match settings.server.health_listen.trim() {
            "" => None,
            addr => {
                let parsed: SocketAddr = addr
                    .parse()
                    .map_err(|e| Error::Settings(format!("server.health_listen: `{addr}`: {e}")))?;
                Some(
                    TcpListener::bind(parsed)
                        .await
                        .map_err(|source| Error::Bind {
                            addr: addr.to_string(),
                            source,
                        })?,
                )
            }
        };
        let metrics_listener = bind(settings.metrics.listen).await?;
        let facts = Arc::new(node_facts(
            &settings,
            &model,
            node_id,
            bound,
            device_label(device),
        ));
        tracing::info!(
            node = %facts.node_id, addr = %bound, pool = %facts.pool, model = %facts.model_name,
            vocab = facts.vocab_size, max_context = facts.max_context, device = %facts.device,
            tls = tls.mode_name(), "verify node ready"
        );
        Ok(App {
            settings,
            listener,
            model,
            facts,
            metrics: Arc::new(Metrics::new()),
            tls,
            health_listener,
            metrics_listener,
        })
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has a local address")
    }

    /// The bound plaintext health-only address (`server.health_listen`), if configured.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The bound `/metrics`, `/healthz`, `/readyz` address (`metrics.listen`).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_listener
            .local_addr()
            .expect("a bound listener has a local address")
    }

    /// What the node reports to coordinators.
    pub fn facts(&self) -> &NodeFacts {
        &self.facts
    }

    /// The node's metrics (live while it runs; `Metrics::encode` gives the Prometheus text).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The loaded target model.
    pub fn model(&self) -> &ModelHandle {
        &self.model
    }

    /// Serves until `shutdown` completes, then stops accepting calls, finishes the calls and
    /// batches in flight (within `server.shutdown_grace`) and stops the model.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let App {
            settings,
            listener,
            model,
            facts,
            metrics,
            tls,
            health_listener,
            metrics_listener,
        } = self;
        let limits = Limits {
            vocab_size: facts.vocab_size,
            max_context: facts.max_context,
            max_block_tokens: facts.max_block_tokens,
            capacity: settings.sessions.capacity,
            evict_idle_after: settings.sessions.evict_idle_after,
        };
        let exposition = Exposition::new().with(metrics.clone()).with(tls.metrics());
        let (batcher, batcher_task) = Batcher::spawn(
            model.clone(),
            BatcherConfig {
                limits,
                window: settings.batching.window,
                max_batch_tokens: settings.batching.max_batch_tokens,
                max_prefill_tokens: settings.batching.max_prefill_tokens,
                kv_budget_bytes: settings.sessions.kv_budget_bytes,
            },
            metrics,
        );

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<VerifierServer<VerifierService>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| Error::Reflection(e.to_string()))?;
        let stop = CancellationToken::new();
        tokio::spawn(watch_model_health(model.clone(), health, stop.clone()));
        let (draining, draining_rx) = watch::channel(false);
        let told = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let registrations = registration::spawn(
            &settings.coordinator.addresses,
            &tls,
            Registration {
                config: RegistrationConfig {
                    heartbeat_interval: settings.coordinator.heartbeat_interval,
                    retry_interval: settings.coordinator.retry_interval,
                    rpc_timeout: settings.coordinator.rpc_timeout,
                },
                facts: facts.clone(),
                batcher: batcher.clone(),
                draining: draining_rx,
                told: told.clone(),
            },
            stop.clone(),
        );

        let ops_stop = stop.clone();
        tokio::spawn(ops::serve(
            metrics_listener,
            exposition,
            model_readiness(&model),
            async move { ops_stop.cancelled().await },
        ));
        // Certificates rotated on disk reach the server and the dials to coordinators.
        let _cert_watch = tls.watch();

        if let Some(listener) = health_listener {
            let probe_health = health_service.clone();
            let probe_stop = stop.clone();
            tracing::info!(addr = ?listener.local_addr().ok(), "plaintext health listener");
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(probe_health)
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                        probe_stop.cancelled().await
                    }),
            );
        }
        let drain = Drain {
            timeout: if settings.coordinator.addresses.is_empty() {
                Duration::ZERO
            } else {
                settings.server.drain_timeout
            },
            draining,
            told,
            coordinators: settings.coordinator.addresses.len(),
            load: batcher.clone(),
        };
        let service = VerifierService::new(batcher, facts);
        let signalled = stop.clone();
        let router = tls
            .grpc_server(VERIFIER_RULES)
            .add_service(health_service)
            .add_service(reflection)
            .add_service(
                VerifierServer::new(service)
                    .max_decoding_message_size(settings.server.max_message_bytes)
                    .max_encoding_message_size(settings.server.max_message_bytes),
            );
        let server = tls.serve_grpc(router, listener, async move {
            shutdown.await;
            drain.run().await;
            tracing::info!("shutting down: finishing in-flight batches");
            signalled.cancel();
        });
        let grace = settings.server.shutdown_grace;
        let outcome = tokio::select! {
            r = server => r.map_err(Error::from),
            () = async { stop.cancelled().await; tokio::time::sleep(grace).await } => {
                Err(Error::ShutdownTimeout(grace))
            }
        };
        stop.cancel();
        for r in registrations {
            let _ = r.await;
        }
        // The server and with it the last batcher handle are gone: the batcher serves what is
        // still queued and stops.
        if tokio::time::timeout(grace, batcher_task).await.is_err() {
            tracing::error!("the batcher did not finish within the shutdown grace period");
        }
        model.shutdown().await;
        tracing::info!("verify node stopped");
        outcome
    }
}

/// The first step of a graceful stop: coordinators are told the node is draining (by the
/// registration loops' next heartbeat, sent at once) and move its sessions away at their next
/// blocks; the node keeps serving until it holds no session or the timeout passes.
struct Drain {
    timeout: Duration,
    draining: watch::Sender<bool>,
    told: Arc<std::sync::atomic::AtomicUsize>,
    coordinators: usize,
    load: Batcher,
}

impl Drain {
    async fn run(self) {
        if self.timeout.is_zero() {
            return;
        }
        let held = self.load.load().active_sessions;
        tracing::info!(sessions = held, timeout = ?self.timeout, "stopping: draining this node");
        self.draining.send_replace(true);
        let deadline = tokio::time::Instant::now() + self.timeout;
        // Every coordinator has heard it (no new session comes), and every session has moved.
        let done = || {
            self.told.load(std::sync::atomic::Ordering::SeqCst) >= self.coordinators
                && self.load.load().active_sessions == 0
        };
        while !done() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.load.load().active_sessions;
        if left > 0 {
            tracing::warn!(
                sessions = left,
                "drain timed out; the remaining sessions will resync elsewhere"
            );
        } else {
            tracing::info!("drained: no session left on this node");
        }
    }
}

/// `/readyz`: ready while the target model serves.
fn model_readiness(model: &ModelHandle) -> ReadyCheck {
    let health = model.health();
    Arc::new(move || match &*health.borrow() {
        ModelHealth::Ready => Ok("the target model serves".into()),
        ModelHealth::Loading => Err("the target model is loading".into()),
        ModelHealth::Failed(why) => Err(format!("the target model failed: {why}")),
        ModelHealth::Stopped => Err("the target model has stopped".into()),
    })
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|source| Error::Bind {
        addr: addr.to_string(),
        source,
    })
}

/// Marks the service NOT_SERVING when the model thread fails or stops.
async fn watch_model_health(
    model: ModelHandle,
    health: tonic_health::server::HealthReporter,
    stop: CancellationToken,
) {
    let mut rx = model.health();
    drop(model);
    loop {
        let state = rx.borrow_and_update().clone();
        if let ModelHealth::Failed(reason) = &state {
            tracing::error!(%reason, "the target model failed; the node stops serving verifies");
        }
        if matches!(state, ModelHealth::Failed(_) | ModelHealth::Stopped) {
            health
                .set_not_serving::<VerifierServer<VerifierService>>()
                .await;
            return;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}

fn node_facts(
    s: &Settings,
    model: &ModelHandle,
    node_id: String,
    bound: SocketAddr,
    device: String,
) -> NodeFacts {
    let info = model.info();
    let max_context = match s.model.max_context {
        0 => info.max_context,
        n => n.min(info.max_context),
    };
    let advertise_addr = if s.server.advertise_addr.is_empty() {
        let mut addr = bound;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}")
    } else {
        s.server.advertise_addr.clone()
    };
    NodeFacts {
        node_id,
        advertise_addr,
        // Validated by the settings.
        pool: Pool::parse(&s.server.pool).unwrap_or(Pool::Onprem),
        model_name: info.name.clone(),
        fingerprint: info.fingerprint.clone(),
        vocab_size: info.vocab_size,
        max_context,
        capacity_sessions: s.sessions.capacity,
        max_block_tokens: s.sessions.max_block_tokens,
        max_batch_tokens: s.batching.max_batch_tokens,
        device,
    }
}
