//! `App`: binds the listeners (port 0 allowed), reports their addresses, and runs the gRPC
//! server, the admin HTTP server and the state actor until shutdown.

use crate::actor;
use crate::admin;
use crate::core::Core;
use crate::grpc::CoordinatorService;
use crate::metrics::Metrics;
use crate::{Error, Settings};
use edgespec_proto::auth::{Role, COORDINATOR_RULES};
use edgespec_proto::pb::coordinator_server::CoordinatorServer;
use edgespec_runtime::ops::{Encoded, Exposition};
use edgespec_runtime::tls::Tls;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long servers get to close their connections after the state actor stopped.
const SERVER_GRACE: Duration = Duration::from_secs(5);

/// A coordinator with its listeners bound.
#[derive(Debug)]
pub struct App {
    settings: Settings,
    grpc: TcpListener,
    http: TcpListener,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    tls: Tls,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), Error> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { what, addr, source })?;
    let bound = l
        .local_addr()
        .map_err(|source| Error::Bind { what, addr, source })?;
    Ok((l, bound))
}

impl App {
    /// Validates the settings and binds both listeners.
    pub async fn build(settings: Settings) -> Result<App, Error> {
        settings.validate()?;
        let tls = settings.tls.load(Role::Coordinator)?;
        let (grpc, grpc_addr) = bind("gRPC", settings.grpc.listen).await?;
        let (http, http_addr) = bind("admin HTTP", settings.admin.listen).await?;
        Ok(App {
            settings,
            grpc,
            http,
            grpc_addr,
            http_addr,
            tls,
        })
    }

    /// Bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Bound admin HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Serves until `shutdown` resolves, then finishes in-flight batches, closes the draft
    /// streams and stops.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let App {
            settings,
            grpc,
            http,
            grpc_addr,
            http_addr,
            tls,
        } = self;
        // 128 random bits: verify nodes scope this instance's session ids by it, so two
        // coordinators (or one restarted) never address each other's sessions.
        let id = format!("coord-{:032x}", rand::random::<u128>());
        let metrics = Metrics::new();
        let tick = (settings.registry.heartbeat_interval / 4)
            .min(settings.link.probe_interval / 2)
            .max(Duration::from_millis(5));
        let core = Core::new(
            id.clone(),
            settings.clone(),
            metrics.clone(),
            tokio::time::Instant::now().into_std(),
        );
        let (handle, ready, actor_task) =
            actor::spawn(core, settings.verify.clone(), tls.clone(), tick);

        let stop = CancellationToken::new();
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<CoordinatorServer<CoordinatorService>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(edgespec_proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| Error::Settings(format!("reflection: {e}")))?;
        let service = CoordinatorServer::new(CoordinatorService::new(handle.clone(), stop.clone()))
            .max_decoding_message_size(settings.grpc.max_message_bytes)
            .max_encoding_message_size(settings.grpc.max_message_bytes);
        let grpc_stop = stop.clone();
        let grpc_router = tls
            .grpc_server(COORDINATOR_RULES)
            .http2_keepalive_interval(Some(settings.grpc.keepalive_interval))
            .http2_keepalive_timeout(Some(settings.grpc.keepalive_timeout))
            .tcp_nodelay(true)
            .add_service(health_service)
            .add_service(reflection)
            .add_service(service);
        let grpc_tls = tls.clone();
        let grpc_server = async move {
            grpc_tls
                .serve_grpc(grpc_router, grpc, grpc_stop.cancelled())
                .await
        };

        if settings.admin.token.is_empty() {
            tracing::warn!("admin.token is empty: every /admin/v1 request will be refused");
        }
        let exposition = Exposition::new()
            .with(Encoded(move || metrics.encode()))
            .with(tls.metrics());
        let router = admin::router(
            handle.clone(),
            ready,
            exposition,
            settings.admin.token.clone(),
        );
        let admin = crate::https::AdminListener::new(http, &tls, settings.admin.plaintext);
        let admin_scheme = admin.scheme();
        let http_task = tokio::spawn(admin.serve(router, stop.clone()));
        // Certificates rotated on disk reach both servers and the dials to verify nodes.
        let _cert_watch = tls.watch();

        tracing::info!(
            coordinator_id = %id, %grpc_addr, %http_addr, tls = tls.mode_name(), admin_scheme,
            "coordinator serving"
        );
        let grpc_task = tokio::spawn(grpc_server);

        shutdown.await;
        tracing::info!("shutting down: finishing in-flight batches");
        health_reporter
            .set_not_serving::<CoordinatorServer<CoordinatorService>>()
            .await;
        handle.shutdown().await;
        stop.cancel();
        let _ = actor_task.await;
        let servers = async {
            let g = grpc_task.await;
            let h = http_task.await;
            (g, h)
        };
        match tokio::time::timeout(SERVER_GRACE, servers).await {
            Ok((g, h)) => {
                if let Ok(Err(e)) = g {
                    return Err(Error::ServeGrpc(e));
                }
                if let Ok(Err(e)) = h {
                    return Err(Error::ServeHttp(e));
                }
            }
            Err(_) => {
                tracing::warn!("servers did not close within {SERVER_GRACE:?}; stopping anyway")
            }
        }
        tracing::info!("coordinator stopped");
        Ok(())
    }
}
