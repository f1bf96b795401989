//! A whole edgespec fleet on loopback, in one process: coordinator, verify node(s) and draft
//! node(s), each a real server on `127.0.0.1:0` talking real gRPC/HTTP, optionally with emulated
//! WAN links between the draft nodes and the coordinator. Used by `edgespec demo`/`up`, the
//! end-to-end tests and the benchmarks.

use edgespec_runtime::tls::TlsSettings;
use edgespec_specdec::DraftMethod;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use edgespec_testkit::fleet::{AdminApi, FleetWait};
use edgespec_testkit::harness::Running;
use tokio_util::sync::CancellationToken;

use crate::linkemu::{LinkControl, LinkEmulator, LinkProfile};

/// The admin token of a local cluster (loopback only, so a fixed value is fine).
pub const LOCAL_ADMIN_TOKEN: &str = "local-admin-token";

/// One draft node of the cluster.
#[derive(Debug, Clone, Copy, Default)]
pub struct DraftSpec {
    /// Emulated link to the coordinator (None: plain loopback, and the link cannot be cut).
    pub link: Option<LinkProfile>,
    /// Pipelined drafting.
    pub pipelined: bool,
    /// The node's drafting method (`drafting.method`). A `lookup` node loads no draft model: it
    /// takes its tokenizer from the target's GGUF (`model.tokenizer`).
    pub method: DraftMethod,
    /// `drafting.lookup` (min_ngram, max_ngram) instead of the node's defaults.
    pub lookup_ngram: Option<(usize, usize)>,
}

impl DraftSpec {
    /// A draft node on plain loopback drafting with `method`.
    pub fn with_method(method: DraftMethod) -> Self {
        Self {
            method,
            ..Self::default()
        }
    }
}

/// Coordinator policy values that differ from its defaults.
#[derive(Debug, Clone, Copy, Default)]
pub struct PolicyOverrides {
    /// Force γ into `[min, max]` (`Some((g, g))` fixes γ).
    pub gamma_bounds: Option<(u32, u32)>,
    /// Turn speculation off (γ = 0: target-only decoding through the same path).
    pub speculation_off: bool,
    /// Tell the γ controller that draft nodes pipeline.
    pub pipelined: bool,
    /// No padded bandwidth probes (so a link's byte counters hold only the protocol's traffic).
    pub bandwidth_probes_off: bool,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Target model GGUF for the verify node(s).
    pub target: PathBuf,
    /// Draft model GGUF for the draft node(s) (not loaded by a `lookup` draft node).
    pub draft: PathBuf,
    /// Number of verify nodes (≥ 1); each loads its own copy of the target model.
    pub verify_nodes: usize,
    /// The draft nodes (≥ 1).
    pub drafts: Vec<DraftSpec>,
    /// HTTP listen address of the first draft node (port 0 = any).
    pub http_listen: SocketAddr,
    /// Coordinator policy.
    pub policy: PolicyOverrides,
    /// Transport security between the nodes; `None` is explicit plaintext (the local demo on
    /// loopback).
    pub tls: Option<ClusterTls>,
}

/// mTLS settings of each node role of a [`LocalCluster`].
#[derive(Debug, Clone)]
pub struct ClusterTls {
    /// The coordinator's `[tls]`.
    pub coordinator: TlsSettings,
    /// Every verify node's `[tls]`.
    pub verify: TlsSettings,
    /// Every draft node's `[tls]`.
    pub draft: TlsSettings,
}

impl ClusterOptions {
    /// One verify node, one draft node on plain loopback.
    pub fn new(target: PathBuf, draft: PathBuf) -> Self {
        Self {
            target,
            draft,
            verify_nodes: 1,
            drafts: vec![DraftSpec::default()],
            http_listen: ([127, 0, 0, 1], 0).into(),
            policy: PolicyOverrides::default(),
            tls: None,
        }
    }
}

/// A node or link emulator of the cluster, running in this process.
type Component = Running<Result<()>>;

/// A draft node of a running cluster.
#[derive(Debug, Clone)]
pub struct DraftHandle {
    /// Its OpenAI-compatible HTTP address.
    pub http: SocketAddr,
    /// Control of its emulated link, if it has one.
    pub link: Option<LinkControl>,
}

impl DraftHandle {
    /// Base URL of its OpenAI-compatible API.
    pub fn openai_base(&self) -> String {
        format!("http://{}/v1", self.http)
    }
}

/// A running local cluster. Call [`LocalCluster::stop`] to shut it down gracefully.
pub struct LocalCluster {
    /// Coordinator gRPC address (stable across [`LocalCluster::restart_coordinator`]).
    pub coordinator_grpc: SocketAddr,
    /// Coordinator admin HTTP address (stable across restarts).
    pub admin_http: SocketAddr,
    /// Verify nodes' gRPC addresses.
    pub verify_grpc: Vec<SocketAddr>,
    /// The draft nodes.
    pub drafts: Vec<DraftHandle>,
    /// The admin API (its client trusts the fleet CA when the cluster runs mTLS).
    admin: AdminApi,
    coordinator_settings: edgespec_coordinator::Settings,
    coordinator: Option<Component>,
    verifiers: Vec<Option<Component>>,
    draft_nodes: Vec<Component>,
    links: Vec<Component>,
}

impl std::fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCluster")
            .field("coordinator_grpc", &self.coordinator_grpc)
            .field("admin_http", &self.admin_http)
            .field("verify_grpc", &self.verify_grpc)
            .field("drafts", &self.drafts)
            .finish_non_exhaustive()
    }
}

impl LocalCluster {
    /// Starts coordinator, verify node(s) and draft node(s), and waits until the coordinator
    /// has the verify nodes registered and the draft nodes are serving.
    pub async fn start(opts: ClusterOptions) -> Result<Self> {
        if opts.verify_nodes == 0 || opts.drafts.is_empty() {
            bail!("a cluster needs at least one verify node and one draft node");
        }
        let tls = |pick: fn(&ClusterTls) -> &TlsSettings| {
            opts.tls
                .as_ref()
                .map_or_else(TlsSettings::plaintext, |t| pick(t).clone())
        };
        let mut cs = edgespec_coordinator::Settings::for_tests();
        cs.tls = tls(|t| &t.coordinator);
        cs.admin.token = LOCAL_ADMIN_TOKEN.to_string();
        cs.policy.pipelined = opts.policy.pipelined;
        if let Some((lo, hi)) = opts.policy.gamma_bounds {
            cs.policy.gamma_min = lo;
            cs.policy.gamma_max = hi;
            cs.policy.initial_gamma = hi;
        }
        if opts.policy.speculation_off {
            cs.policy.speculation_enabled = false;
        }
        if opts.policy.bandwidth_probes_off {
            cs.link.padded_probe_every = 0;
        }
        let (coordinator, coordinator_grpc, admin_http) = start_coordinator(cs.clone()).await?;
        // In mTLS mode the admin API is HTTPS with the coordinator's certificate.
        let (client, scheme) = match &opts.tls {
            Some(t) => {
                let ca = std::fs::read(&t.coordinator.ca)
                    .with_context(|| format!("reading {}", t.coordinator.ca.display()))?;
                let client = reqwest::Client::builder()
                    .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
                    .build()?;
                (client, "https")
            }
            None => (reqwest::Client::new(), "http"),
        };
        let admin = AdminApi {
            client,
            base: format!("{scheme}://{admin_http}"),
            token: LOCAL_ADMIN_TOKEN.into(),
        };
        // A restart must come back on the same addresses, which the nodes keep dialling.
        cs.grpc.listen = coordinator_grpc;
        cs.admin.listen = admin_http;

        let mut verify_grpc = Vec::new();
        let mut verifiers = Vec::new();
        for i in 0..opts.verify_nodes {
            let mut vs = edgespec_verify_node::Settings::default();
            vs.server.listen = ([127, 0, 0, 1], 0).into();
            vs.server.node_id = format!("verify-{i}");
            // Stopping a verify node here is a kill (the fault tests' failover), not a drain.
            vs.server.drain_timeout = Duration::ZERO;
            vs.model.path = opts.target.clone();
            vs.coordinator.addresses = vec![format!("http://{coordinator_grpc}")];
            vs.tls = tls(|t| &t.verify);
            let app = edgespec_verify_node::App::build(vs)
                .await
                .with_context(|| format!("starting verify node {i}"))?;
            verify_grpc.push(app.grpc_addr());
            verifiers.push(Some(Running::spawn(|shutdown| async move {
                Ok(app.run(shutdown).await?)
            })));
        }

        let mut drafts = Vec::new();
        let mut draft_nodes = Vec::new();
        let mut links = Vec::new();
        for (i, spec) in opts.drafts.iter().enumerate() {
            let (dial, link) = match spec.link {
                Some(profile) => {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    let addr = listener.local_addr()?;
                    let stop = CancellationToken::new();
                    let (handle, control) = LinkEmulator::spawn(
                        listener,
                        coordinator_grpc,
                        profile,
                        stop.clone().cancelled_owned(),
                    )?;
                    let task = tokio::spawn(async move {
                        handle.await.context("link emulator task")?;
                        Ok(())
                    });
                    links.push(Running::adopt(stop, task));
                    (addr, Some(control))
                }
                None => (coordinator_grpc, None),
            };
            let mut ds = edgespec_draft_node::Settings::default();
            ds.node.id = format!("draft-{i}");
            ds.http.listen = if i == 0 {
                opts.http_listen
            } else {
                ([127, 0, 0, 1], 0).into()
            };
            if spec.method == DraftMethod::Lookup {
                // No weights: the tokenizer (and the model facts of the hello) from the target.
                ds.model.path = PathBuf::new();
                ds.model.tokenizer = opts.target.clone();
            } else {
                ds.model.path = opts.draft.clone();
            }
            ds.drafting.method = spec.method;
            if let Some((lo, hi)) = spec.lookup_ngram {
                ds.drafting.lookup.min_ngram = lo;
                ds.drafting.lookup.max_ngram = hi;
            }
            ds.coordinator.address = format!("http://{dial}");
            ds.drafting.pipeline = spec.pipelined;
            ds.tls = tls(|t| &t.draft);
            let app = edgespec_draft_node::App::build(ds)
                .await
                .with_context(|| format!("starting draft node {i}"))?;
            drafts.push(DraftHandle {
                http: app.http_addr(),
                link,
            });
            draft_nodes.push(Running::spawn(|shutdown| async move {
                Ok(app.run(shutdown).await?)
            }));
        }

        let cluster = Self {
            coordinator_grpc,
            admin_http,
            verify_grpc,
            drafts,
            admin,
            coordinator_settings: cs,
            coordinator: Some(coordinator),
            verifiers,
            draft_nodes,
            links,
        };
        cluster
            .wait_ready(opts.verify_nodes, Duration::from_secs(120))
            .await?;
        Ok(cluster)
    }

    /// Polls the coordinator until `verifiers` verify nodes are registered and up and every
    /// draft node is connected.
    async fn wait_ready(&self, verifiers: usize, deadline: Duration) -> Result<()> {
        let want = FleetWait::new(verifiers, self.drafts.len(), deadline);
        self.admin.wait_fleet(want, || Ok(())).await
    }

    /// The admin API's URL for `path` (`https://` when the cluster runs mTLS).
    pub fn admin_url(&self, path: &str) -> String {
        format!("{}{path}", self.admin.base)
    }

    /// A client for [`LocalCluster::admin_url`] (it trusts the fleet CA in mTLS mode).
    pub fn admin_client(&self) -> &reqwest::Client {
        &self.admin.client
    }

    /// The first draft node's API base URL.
    pub fn openai_base(&self) -> String {
        self.drafts[0].openai_base()
    }

    /// Stops verify node `i` (its server goes away; the coordinator fails its sessions over).
    pub async fn kill_verify_node(&mut self, i: usize) -> Result<()> {
        match self.verifiers.get_mut(i).and_then(Option::take) {
            Some(c) => c.close().await,
            None => bail!("verify node {i} is not running"),
        }
    }

    /// Stops the coordinator and starts a fresh one (empty state) on the same addresses.
    pub async fn restart_coordinator(&mut self) -> Result<()> {
        if let Some(c) = self.coordinator.take() {
            c.close().await.context("stopping the coordinator")?;
        }
        let (c, _, _) = start_coordinator(self.coordinator_settings.clone()).await?;
        self.coordinator = Some(c);
        Ok(())
    }

    /// Graceful shutdown of every component; returns the first component error.
    pub async fn stop(mut self) -> Result<()> {
        let mut all: Vec<Component> = self.draft_nodes.drain(..).collect();
        all.extend(self.coordinator.take());
        all.extend(self.verifiers.drain(..).flatten());
        all.append(&mut self.links);
        let mut first = Ok(());
        for c in all {
            let r = c.close().await;
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

async fn start_coordinator(
    settings: edgespec_coordinator::Settings,
) -> Result<(Component, SocketAddr, SocketAddr)> {
    let app = edgespec_coordinator::App::build(settings)
        .await
        .context("starting the coordinator")?;
    let (grpc, admin) = (app.grpc_addr(), app.http_addr());
    let running = Running::spawn(|shutdown| async move { Ok(app.run(shutdown).await?) });
    Ok((running, grpc, admin))
}
