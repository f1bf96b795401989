//! Assembling and running the node: load the draft model, pair with the coordinator (refusing a
//! mismatched fleet), bind the HTTP listener, serve until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::Duration;

use edgespec_model::forward::load_gguf_with;
use edgespec_model::{ModelHandle, TextTokenizer};
use edgespec_runtime::ops::Exposition;
use edgespec_runtime::tls::CertWatch;
use tokio::net::TcpListener;

use crate::connection::{Backoff, Connection, Hello, Link, LinkConfig, LinkError};
use crate::engine::Engine;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::node::{Node, NodeParts};
use crate::session::{DraftConfig, SessionCtx};
use crate::settings::Settings;

/// A built draft node: model loaded, paired with the coordinator, HTTP listener bound.
#[derive(Debug)]
pub struct App {
    listener: TcpListener,
    http_addr: SocketAddr,
    node: Node,
    cert_watch: CertWatch,
}

impl App {
    /// Validates `settings`, loads the draft model, opens the coordinator stream (retrying with
    /// backoff for up to `coordinator.timeout`; a fingerprint mismatch fails at once) and binds
    /// the HTTP listener (port 0 allowed).
    pub async fn build(settings: Settings) -> Result<App, Error> {
        settings.validate()?;
        let tls = settings.tls.load(edgespec_proto::auth::Role::Draft)?;
        // With mTLS the node is the one its certificate names (peers refuse any other id).
        let node_id = tls.node_id("node.id", &settings.node.id, || {
            format!("draft-{:08x}", rand::random::<u32>())
        })?;
        // Refuse an address this TLS mode cannot dial now, not after the model load.
        tls.endpoint(&settings.coordinator.address)?;
        let device = settings.device()?;
        let path = settings.model.path.clone();
        let opts = settings.model.load_options();
        let (tokenizer, model) = tokio::task::spawn_blocking(move || {
            let tokenizer = TextTokenizer::from_gguf(&path)?;
            let model = ModelHandle::spawn("draft", move || load_gguf_with(&path, device, &opts))?;
            Ok::<_, edgespec_model::ModelError>((tokenizer, model))
        })
        .await
        .map_err(|e| Error::LoadModel(e.to_string()))?
        .map_err(|e| Error::LoadModel(e.to_string()))?;
        let info = model.info().clone();
        tracing::info!(model = %info.name, vocab = info.vocab_size, context = info.max_context, "draft model loaded");

        let metrics = Metrics::with_extra(Exposition::new().with(tls.metrics()));
        // Certificates rotated on disk are used by the next (re)connection to the coordinator.
        let cert_watch = tls.watch();
        let draft_cost = Arc::new(AtomicU32::new(0));
        let c = &settings.coordinator;
        let link_cfg = LinkConfig {
            address: c.address.clone(),
            tls,
            connect_timeout: c.connect_timeout,
            hello: Hello {
                node_id: node_id.clone(),
                model_name: info.name.clone(),
                fingerprint: info.fingerprint.clone(),
                vocab_size: info.vocab_size as u32,
                draft_s_per_token: Arc::clone(&draft_cost),
                pipelined: settings.drafting.pipeline,
                max_gamma: settings.drafting.max_gamma,
            },
        };
        let backoff = Backoff {
            initial: c.backoff_initial,
            max: c.backoff_max,
        };
        let link = first_link(&link_cfg, backoff, c.timeout).await?;
        tracing::info!(node = %node_id, coordinator = %c.address, fleet = %link.welcome.fleet_fingerprint, "paired with the coordinator");

        let listener = TcpListener::bind(settings.http.listen)
            .await
            .map_err(|source| Error::Bind {
                what: "the HTTP API",
                addr: settings.http.listen.to_string(),
                source,
            })?;
        let http_addr = listener.local_addr().map_err(|source| Error::Bind {
            what: "the HTTP API",
            addr: settings.http.listen.to_string(),
            source,
        })?;

        let d = &settings.drafting;
        let engine = Engine::spawn(model.clone(), d.max_batch_sessions, metrics.clone());
        let conn = Connection::spawn(link, link_cfg, backoff, metrics.clone());
        let ctx = SessionCtx {
            engine,
            conn,
            tokenizer,
            metrics,
            cfg: DraftConfig {
                max_gamma: d.max_gamma as usize,
                top_k: d.top_k as usize,
                pipeline: d.pipeline,
                timeout: c.timeout,
                retry_initial: c.backoff_initial,
                retry_max: c.backoff_max,
            },
            draft_cost,
            recent_gamma: Arc::new(AtomicU32::new(crate::session::NO_GAMMA_YET)),
        };
        let node = Node::new(NodeParts {
            ctx,
            model,
            served_name: settings.model.served_name.clone(),
            limits: settings.limits.clone(),
        });
        Ok(App {
            listener,
            http_addr,
            node,
            cert_watch,
        })
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The serving core (for embedding and tests).
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Serves until `shutdown` completes, then lets in-flight requests finish.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        tracing::info!(addr = %self.http_addr, "serving the OpenAI-compatible API");
        let router = crate::http::router(self.node.clone());
        axum::serve(self.listener, router)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(Error::Serve)?;
        drop(self.cert_watch);
        tracing::info!("draft node stopped");
        Ok(())
    }
}

/// Opens the first stream, retrying transport failures until `timeout`.
async fn first_link(cfg: &LinkConfig, backoff: Backoff, timeout: Duration) -> Result<Link, Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = backoff.initial;
    // A TLS refusal says more than the cancelled attempt that may end the wait: keep it.
    let mut tls_refusal: Option<String> = None;
    loop {
        match Link::open(cfg).await {
            Ok(link) => return Ok(link),
            Err(LinkError::Mismatch { draft, fleet }) => {
                return Err(Error::ModelMismatch { draft, fleet })
            }
            Err(LinkError::Refused { draft, reason }) => {
                return Err(Error::ModelMismatch {
                    draft,
                    fleet: format!("(coordinator: {reason})"),
                })
            }
            Err(LinkError::Unreachable(reason)) => {
                if edgespec_runtime::tls::tls_hint(&reason).is_some() {
                    tls_refusal = Some(reason.clone());
                }
                if tokio::time::Instant::now() + delay >= deadline {
                    return Err(Error::ConnectCoordinator {
                        address: cfg.address.clone(),
                        reason: tls_refusal.unwrap_or(reason),
                    });
                }
                tracing::warn!(%reason, "coordinator not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(backoff.max);
            }
        }
    }
}
