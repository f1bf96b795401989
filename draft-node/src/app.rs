//! Assembling and running the node: load the draft model (or, for a lookup-only node, only the
//! tokenizer and the model facts from GGUF metadata), bind the HTTP listener, start
//! connecting to the coordinator in the background, serve until shutdown.
//!
//! The node never waits for the coordinator: it serves (and answers `/readyz` 503 with the
//! reason) while the connection task retries, for as long as the node runs, so an outage of the
//! coordinator at boot cannot make the process exit (and a supervisor's start limit give up).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use edgespec_model::forward::{load_gguf_with, read_model_info};
use edgespec_model::{ModelHandle, ModelInfo, TextTokenizer};
use edgespec_runtime::ops::Exposition;
use edgespec_runtime::tls::CertWatch;
use tokio::net::TcpListener;

use crate::connection::{Backoff, Connection, Hello, LinkConfig};
use crate::engine::Engine;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::node::{Node, NodeParts};
use crate::session::{DraftConfig, Estimates, SessionCtx};
use crate::settings::Settings;
use crate::suffix_cache::SuffixCache;

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
        let (tokenizer, model, info) = load(&settings).await?;
        let what = match model {
            Some(_) => "draft model loaded",
            None => "lookup-only node: tokenizer and model facts read, no draft model loaded",
        };
        tracing::info!(
            model = %info.name, vocab = info.vocab_size, context = info.max_context,
            method = %settings.drafting.method, "{what}"
        );

        let metrics = Metrics::with_kinds(
            Exposition::new().with(tls.metrics()),
            settings.metrics.prompt_kinds.clone(),
        );
        // Certificates rotated on disk are used by the next (re)connection to the coordinator.
        let cert_watch = tls.watch();
        let estimates = Arc::new(Estimates::default());
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
                estimates: Arc::clone(&estimates),
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
        let engine = model
            .as_ref()
            .map(|m| Engine::spawn(m.clone(), d.max_batch_sessions, metrics.clone()));
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
                lookup_ngrams: (d.lookup.min_ngram, d.lookup.max_ngram),
            },
            estimates,
            suffix_cache: (d.lookup.cache_tokens > 0).then(|| {
                Arc::new(SuffixCache::new(
                    d.lookup.cache_tokens,
                    d.lookup.min_ngram,
                    d.lookup.max_ngram,
                ))
            }),
        };
        let node = Node::new(NodeParts {
            ctx,
            model,
            info,
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

/// The tokenizer, the draft model (unless the node only drafts by lookup) and the model facts.
/// A lookup-only node reads GGUF metadata only: no weights, no model thread.
async fn load(
    settings: &Settings,
) -> Result<(TextTokenizer, Option<ModelHandle>, ModelInfo), Error> {
    let device = settings.device()?;
    let path = settings.model.path.clone();
    let tokenizer_path = settings.model.tokenizer_path().to_path_buf();
    let opts = settings.model.load_options();
    let with_model = settings.drafting.method.uses_model();
    let fail = |e: &dyn std::fmt::Display| Error::LoadModel(e.to_string());
    tokio::task::spawn_blocking(move || {
        let tokenizer = TextTokenizer::from_gguf(&tokenizer_path).map_err(|e| fail(&e))?;
        if !with_model {
            let info =
                read_model_info(&tokenizer_path, tokenizer.vocab_size()).map_err(|e| fail(&e))?;
            return Ok((tokenizer, None, info));
        }
        let model = ModelHandle::spawn("draft", move || load_gguf_with(&path, device, &opts))
            .map_err(|e| fail(&e))?;
        let info = model.info().clone();
        if tokenizer.fingerprint() != info.fingerprint {
            return Err(Error::LoadModel(format!(
                "model.tokenizer {} has another tokenizer (fingerprint {}) than the draft model \
                 (fingerprint {})",
                tokenizer_path.display(),
                tokenizer.fingerprint(),
                info.fingerprint
            )));
        }
        Ok((tokenizer, Some(model), info))
    })
    .await
    .map_err(|e| fail(&e))?
}
