//! Assembling and running the node: load the draft model, bind the HTTP listener, start
//! connecting to the coordinator in the background, serve until shutdown.
//!
//! The node never waits for the coordinator: it serves (and answers `/readyz` 503 with the
//! reason) while the connection task retries, for as long as the node runs, so an outage of the
//! coordinator at boot cannot make the process exit (and a supervisor's start limit give up).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use edgespec_model::forward::load_gguf_with;
use edgespec_model::{ModelHandle, TextTokenizer};
use edgespec_runtime::ops::Exposition;
use edgespec_runtime::tls::CertWatch;
use tokio::net::TcpListener;

use crate::connection::{Backoff, Connection, Hello, LinkConfig};
use crate::engine::Engine;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::node::{Node, NodeParts};
use crate::session::{DraftConfig, SessionCtx};
use crate::settings::Settings;

/// A built draft node: model loaded, HTTP listener bound, the coordinator link connecting.
#[derive(Debug)]
pub struct App {
    listener: TcpListener,
    http_addr: SocketAddr,
    node: Node,
    cert_watch: CertWatch,
}

impl App {
    /// Validates `settings`, loads the draft model, binds the HTTP listener (port 0 allowed) and
    /// starts the coordinator link, which connects in the background: this returns without
    /// waiting for the coordinator.
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

        let metrics = Metrics::with_kinds(
            Exposition::new().with(tls.metrics()),
            settings.metrics.prompt_kinds.clone(),
        );
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
                method: settings.drafting.method,
            },
        };
        let backoff = Backoff {
            initial: c.backoff_initial,
            max: c.backoff_max,
        };
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
        tracing::info!(node = %node_id, "draft node starting");
        let conn = Connection::start(link_cfg, backoff, metrics.clone());
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
                max_resyncs: c.max_resyncs as usize,
                method: d.method,
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
