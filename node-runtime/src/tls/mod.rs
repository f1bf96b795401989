//! Transport security between nodes: mutual TLS (rustls) or, only when a node's settings say so
//! explicitly, plaintext.
//!
//! Every node has the same `[tls]` section ([`TlsSettings`]). In `mtls` mode a node serves gRPC
//! with its certificate and refuses any peer whose client certificate is missing or not signed
//! by the configured CA; when it dials (draft node → coordinator, verify node → coordinator,
//! coordinator → verify node) it presents the same certificate and accepts only a server whose
//! certificate the CA signed. [`TlsSettings::load`] reads and checks the files at start-up, so a
//! wrong path or a broken PEM stops the node with the key and file named, not at the first
//! handshake.
//!
//! Certificates are reloaded from disk while the node runs ([`Tls::watch`], module `reload`):
//! the servers terminate TLS themselves (`incoming`) with the configuration current at each
//! handshake, because tonic's own server TLS is fixed when the server starts. Every new dial
//! builds its client configuration from the current files too. The notAfter of the certificate
//! in use is the gauge `edgespec_tls_cert_expiry_timestamp_seconds` ([`Tls::metrics`]).

mod incoming;
mod material;
mod reload;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use edgespec_proto::auth::{AuthorizeLayer, PeerIdentity, Role, Rule};
use serde::Deserialize;
use tokio::net::TcpListener;
use tonic::transport::server::{Router, TcpIncoming};
use tonic::transport::{ClientTlsConfig, Endpoint, Server};
use tower::layer::util::{Identity as NoLayer, Stack};

pub use incoming::TlsIncoming;
pub use reload::{CertWatch, TlsMetrics, CERT_EXPIRY_METRIC};

use material::Loaded;

/// The trust domain of node identities when `tls.trust_domain` is not set.
pub const DEFAULT_TRUST_DOMAIN: &str = "edgespec";

/// How often the certificate files are checked when `tls.reload_interval` is not set.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(30);

/// HTTP/2 keepalive ping period of every gRPC server ([`Tls::grpc_server`]) and of the clients
/// that use the defaults: a peer that vanished without closing its TCP connection (a host that
/// lost power, a dropped route) is noticed within interval + timeout, not TCP's minutes.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// How long a keepalive ping may go unanswered before the connection is closed.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Concurrent HTTP/2 streams one peer connection may open on a gRPC server: far above what a
/// well-behaved peer uses (a draft node opens one stream, a coordinator at most its in-flight
/// batches per verify node), low enough that one connection cannot open streams without bound.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_string()
}

fn default_reload_interval() -> Duration {
    DEFAULT_RELOAD_INTERVAL
}

/// How a node talks to other nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Mutual TLS: both sides present certificates signed by the configured CA.
    Mtls,
    /// No encryption and no authentication. Only for a single machine or a trusted lab network
    /// (the local demo sets it explicitly).
    Plaintext,
}

/// `[tls]` of every node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// `mtls` (the default) or `plaintext`.
    pub mode: TlsMode,
    /// PEM file with the CA certificate(s) that sign every node's certificate.
    pub ca: PathBuf,
    /// PEM file with this node's certificate (chain), used both as server and as client.
    pub cert: PathBuf,
    /// PEM file with the private key of `cert`.
    pub key: PathBuf,
    /// Name expected in the certificates of the servers this node dials. Empty: the host of the
    /// address dialled (so certificates need that DNS name or IP address as a SAN).
    #[serde(default)]
    pub server_name: String,
    /// Trust domain of the node identities: every certificate names its node as the URI SAN
    /// `spiffe://<trust_domain>/<role>/<node-id>`, and peers of another domain are refused.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// How often the three files are checked for a new certificate (0: never; the node then
    /// needs a restart to pick one up).
    #[serde(default = "default_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl TlsSettings {
    /// Explicit plaintext (local demo, tests on loopback).
    pub fn plaintext() -> TlsSettings {
        TlsSettings {
            mode: TlsMode::Plaintext,
            ca: PathBuf::new(),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            server_name: String::new(),
            trust_domain: default_trust_domain(),
            reload_interval: DEFAULT_RELOAD_INTERVAL,
        }
    }

    /// Mutual TLS with these PEM files.
    pub fn mtls(ca: impl Into<PathBuf>, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        TlsSettings {
            mode: TlsMode::Mtls,
            ca: ca.into(),
            cert: cert.into(),
            key: key.into(),
            ..TlsSettings::plaintext()
        }
    }

    /// Reads and checks the files named in the settings for a node of `role`: in mTLS mode the
    /// certificate must name a node of that role in this trust domain (see
    /// [`edgespec_proto::auth`]).
    pub fn load(&self, role: Role) -> Result<Tls, TlsError> {
        if self.mode == TlsMode::Plaintext {
            return Ok(Tls::plaintext());
        }
        let loaded = material::build(self, role, material::read(self)?)?;
        let metrics = TlsMetrics::new(true);
        metrics.set_expiry(loaded.not_after);
        Ok(Tls {
            shared: Some(Arc::new(Shared {
                settings: self.clone(),
                own: loaded.own.clone(),
                current: RwLock::new(Arc::new(loaded)),
                metrics: metrics.clone(),
                version: std::sync::atomic::AtomicU64::new(0),
            })),
            metrics,
        })
    }
}

/// Loaded TLS material (reloadable), cheap to clone: every clone sees a reload.
#[derive(Clone, Debug)]
pub struct Tls {
    shared: Option<Arc<Shared>>,
    metrics: TlsMetrics,
}

/// What every clone of one [`Tls`] shares.
#[derive(Debug)]
pub(crate) struct Shared {
    settings: TlsSettings,
    /// The identity this node runs as; a reload must keep it.
    own: PeerIdentity,
    current: RwLock<Arc<Loaded>>,
    metrics: TlsMetrics,
    /// Bumped on every certificate swap ([`Tls::version`]).
    version: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn current(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A gRPC server builder with the per-role authorization layer ([`Tls::grpc_server`]).
pub type GrpcServer = Server<Stack<AuthorizeLayer, NoLayer>>;
/// Its router once services are added, for [`Tls::serve_grpc`].
pub type GrpcRouter = Router<Stack<AuthorizeLayer, NoLayer>>;

impl Tls {
    /// Plaintext (no certificates, no identities: every peer may call everything).
    pub fn plaintext() -> Tls {
        Tls {
            shared: None,
            metrics: TlsMetrics::new(false),
        }
    }

    /// The identity this node's certificate names (mTLS only).
    pub fn own_identity(&self) -> Option<&PeerIdentity> {
        self.shared.as_ref().map(|s| &s.own)
    }

    /// The per-role authorization layer for a gRPC server with these `rules`: enforcing in
    /// mTLS mode, a pass-through in plaintext mode.
    pub fn authorize(&self, rules: &'static [Rule]) -> AuthorizeLayer {
        match &self.shared {
            Some(s) => AuthorizeLayer::new(true, &s.settings.trust_domain, rules),
            None => AuthorizeLayer::new(false, "", rules),
        }
    }

    /// The node id this node runs as: `configured` unless empty, else the id in its
    /// certificate (mTLS), else `fallback()`. A configured id other than the certificate's is
    /// refused: peers would refuse every message that claims it.
    pub fn node_id(
        &self,
        key: &'static str,
        configured: &str,
        fallback: impl FnOnce() -> String,
    ) -> Result<String, TlsError> {
        match (self.own_identity(), configured) {
            (Some(id), "") => Ok(id.node_id.clone()),
            (Some(id), c) if c != id.node_id => Err(TlsError::Invalid(format!(
                "{key} = {c:?} but tls.cert is the certificate of node {:?} ({id}); leave {key} \
                 empty to use the certificate's id, or use a certificate issued for {c:?}",
                id.node_id
            ))),
            (_, "") => Ok(fallback()),
            (_, c) => Ok(c.to_string()),
        }
    }

    /// Whether connections are mutually authenticated TLS.
    pub fn is_mtls(&self) -> bool {
        self.shared.is_some()
    }

    /// "mtls" or "plaintext", for logs.
    pub fn mode_name(&self) -> &'static str {
        if self.is_mtls() {
            "mtls"
        } else {
            "plaintext"
        }
    }

    /// This node's TLS metrics, for its `/metrics` ([`crate::ops::Exposition::with`]).
    pub fn metrics(&self) -> TlsMetrics {
        self.metrics.clone()
    }

    /// Starts checking the certificate files every `tls.reload_interval` and swapping in a
    /// changed certificate (see the module docs); stops when the returned guard is dropped.
    /// Does nothing in plaintext mode or with a zero interval.
    pub fn watch(&self) -> CertWatch {
        match &self.shared {
            Some(s) if !s.settings.reload_interval.is_zero() => {
                CertWatch::spawn(s, s.settings.reload_interval)
            }
            _ => CertWatch::none(),
        }
    }

    /// Which certificate generation this node presents: 0 at start, one more at every reload
    /// that swapped in a new certificate. A client that keeps long-lived connections (the
    /// coordinator's to verify nodes, a verify node's to its coordinators) dials afresh when it
    /// changes, so its new connections present the new certificate.
    pub fn version(&self) -> u64 {
        self.shared
            .as_ref()
            .map_or(0, |s| s.version.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Re-reads the certificate files now (what [`Tls::watch`] does on each tick): `Ok(true)`
    /// when a new certificate was swapped in, `Ok(false)` when nothing changed. Files that do
    /// not form a usable configuration, or name another node, leave the loaded one in place.
    pub fn reload(&self) -> Result<bool, TlsError> {
        match &self.shared {
            Some(s) => s.reload(),
            None => Ok(false),
        }
    }

    /// `chain` (a failed dial's error chain) with what it most likely means added when the text
    /// alone does not say: under TLS 1.3 a client finishes its handshake before the server has
    /// checked the client's certificate, so a peer that refuses this node's certificate often
    /// shows only as a connection closed at the first call, without the alert.
    pub fn explain_dial_error(&self, chain: String) -> String {
        let closed = [
            "connection closed",
            "operation was canceled",
            "connection reset",
            "broken pipe",
        ]
        .iter()
        .any(|c| chain.contains(c));
        if self.is_mtls() && closed && tls_hint(&chain).is_none() {
            format!(
                "{chain} (the peer closed the connection right after the TLS handshake: it most \
                 likely refused this node's certificate; tls.cert must be signed by the CA the \
                 peer trusts)"
            )
        } else {
            chain
        }
    }

    /// A gRPC server builder with the per-role authorization of `rules` ([`Tls::authorize`]);
    /// serve its router with [`Tls::serve_grpc`], which adds the TLS.
    /// HTTP/2 keepalive is on with [`DEFAULT_KEEPALIVE_INTERVAL`] and
    /// [`DEFAULT_KEEPALIVE_TIMEOUT`] (the builder's `http2_keepalive_*` override them), and a
    /// connection may open at most [`MAX_CONCURRENT_STREAMS`] streams at once.
    pub fn grpc_server(&self, rules: &'static [Rule]) -> GrpcServer {
        Server::builder()
            .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
            .http2_keepalive_interval(Some(DEFAULT_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(DEFAULT_KEEPALIVE_TIMEOUT))
            .layer(self.authorize(rules))
    }

    /// Serves `router` on `listener` until `shutdown` completes: in mTLS mode each connection
    /// is handshaken with the certificate current at that moment and must present a client
    /// certificate the CA signed; in plaintext mode over plain TCP. Nagle is off either way.
    pub async fn serve_grpc(
        &self,
        router: GrpcRouter,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        match self.https_or_grpc_incoming(listener, Which::Grpc) {
            Ok(tls) => router.serve_with_incoming_shutdown(tls, shutdown).await,
            Err(listener) => {
                let plain = TcpIncoming::from(listener).with_nodelay(Some(true));
                router.serve_with_incoming_shutdown(plain, shutdown).await
            }
        }
    }

    /// An HTTPS listener (the coordinator's admin API) with this node's current certificate;
    /// client certificates are not asked for (a bearer token authorizes there). `Err` gives
    /// the listener back in plaintext mode.
    pub fn https_incoming(&self, listener: TcpListener) -> Result<TlsIncoming, TcpListener> {
        self.https_or_grpc_incoming(listener, Which::Https)
    }

    fn https_or_grpc_incoming(
        &self,
        listener: TcpListener,
        which: Which,
    ) -> Result<TlsIncoming, TcpListener> {
        let Some(shared) = &self.shared else {
            return Err(listener);
        };
        let shared = shared.clone();
        let (config, what): (incoming::ConfigSource, _) = match which {
            Which::Grpc => (Arc::new(move || shared.current().grpc.clone()), "gRPC"),
            Which::Https => (Arc::new(move || shared.current().https.clone()), "HTTPS"),
        };
        Ok(TlsIncoming::new(listener, config, what))
    }

    /// An endpoint for `address` (`host:port`, `http://host:port` or `https://host:port`): in
    /// mTLS mode with this node's current certificate, the CA as the only trust root and the
    /// `https` scheme; in plaintext mode `http`. An `https://` address in plaintext mode is
    /// refused: it asks for TLS that is not configured.
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, TlsError> {
        let (scheme, rest) = match address.split_once("://") {
            Some((s, r)) => (Some(s), r),
            None => (None, address),
        };
        let bad = |why: &str| TlsError::Address {
            address: address.to_string(),
            why: why.to_string(),
        };
        match scheme {
            None | Some("http" | "https") => {}
            Some(other) => return Err(bad(&format!("unknown scheme {other:?}"))),
        }
        let Some(shared) = &self.shared else {
            if scheme == Some("https") {
                return Err(bad(
                    "https:// asks for TLS but tls.mode = \"plaintext\"; set tls.mode = \
                     \"mtls\" with certificates, or use http://",
                ));
            }
            return Endpoint::from_shared(format!("http://{rest}"))
                .map_err(|e| bad(&e.to_string()));
        };
        let m = shared.current();
        let endpoint =
            Endpoint::from_shared(format!("https://{rest}")).map_err(|e| bad(&e.to_string()))?;
        let mut c = ClientTlsConfig::new()
            .ca_certificate(m.ca.clone())
            .identity(m.identity.clone());
        if !shared.settings.server_name.is_empty() {
            c = c.domain_name(shared.settings.server_name.clone());
        }
        endpoint
            .tls_config(c)
            .map_err(|e| bad(&format!("client TLS: {}", source_chain(&e))))
    }
}

#[derive(Clone, Copy)]
enum Which {
    Grpc,
    Https,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file named in the settings could not be read.
    #[error("{key} = {path:?}: {why}")]
    File {
        /// The settings key.
        key: &'static str,
        /// The path it names.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// The material does not form a usable configuration.
    #[error("invalid TLS material: {0}")]
    Invalid(String),
    /// An address cannot be dialled with this configuration.
    #[error("address {address:?}: {why}")]
    Address {
        /// The address.
        address: String,
        /// Why.
        why: String,
    },
}

/// A hint for an operator when an error chain shows a TLS refusal, e.g. "received fatal alert:
/// UnknownCA" (the peer refused our certificate) or "invalid peer certificate" (we refused the
/// peer's).
pub fn tls_hint(chain: &str) -> Option<&'static str> {
    if chain.contains("received fatal alert")
        && [
            "UnknownCA",
            "BadCertificate",
            "CertificateRequired",
            "DecryptError",
        ]
        .iter()
        .any(|a| chain.contains(a))
    {
        return Some(
            "the peer refused this node's TLS certificate: tls.cert must be signed by the CA \
             the peer trusts (and be present)",
        );
    }
    if chain.contains("invalid peer certificate") {
        return Some(
            "this node refused the peer's TLS certificate: it must be signed by tls.ca and name \
             the address dialled (or tls.server_name)",
        );
    }
    if chain.contains("InvalidContentType") || chain.contains("corrupt message") {
        return Some("TLS handshake failed: is the peer serving plaintext (tls.mode)?");
    }
    None
}

/// An error and its sources on one line (tonic's transport errors hide the rustls reason in the
/// source chain).
pub fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    if let Some(hint) = tls_hint(&out) {
        out.push_str(" (");
        out.push_str(hint);
        out.push(')');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_refusals_get_a_hint() {
        let h = tls_hint("transport error: received fatal alert: UnknownCA").unwrap();
        assert!(h.contains("tls.cert"));
        let h = tls_hint("invalid peer certificate: UnknownIssuer").unwrap();
        assert!(h.contains("tls.ca"));
        assert!(tls_hint("connection refused").is_none());
    }

    #[test]
    fn plaintext_dials_http_and_refuses_https() {
        let t = Tls::plaintext();
        assert_eq!(
            t.endpoint("127.0.0.1:1").unwrap().uri().scheme_str(),
            Some("http")
        );
        assert_eq!(
            t.endpoint("http://127.0.0.1:1").unwrap().uri().scheme_str(),
            Some("http")
        );
        let err = t.endpoint("https://127.0.0.1:1").unwrap_err().to_string();
        assert!(err.contains("plaintext"), "{err}");
        let err = t.endpoint("ftp://x:1").unwrap_err().to_string();
        assert!(err.contains("unknown scheme"), "{err}");
    }

    #[test]
    fn mtls_without_files_names_the_missing_key() {
        let s = TlsSettings::mtls("", "", "");
        let err = s.load(Role::Coordinator).unwrap_err().to_string();
        assert!(err.contains("tls.ca") && err.contains("plaintext"), "{err}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let s = TlsSettings::mtls("/nonexistent/ca.pem", "/x", "/y");
        let err = s.load(Role::Coordinator).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn a_file_without_pem_blocks_is_refused() {
        let dir = std::env::temp_dir().join(format!("edgespec-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("junk.pem");
        std::fs::write(&f, "not a certificate").unwrap();
        let err = TlsSettings::mtls(&f, &f, &f)
            .load(Role::Verify)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tls.ca") && err.contains("CERTIFICATE"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
