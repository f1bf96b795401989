//! Transport security between nodes: mutual TLS (rustls through tonic) or, only when a node's
//! settings say so explicitly, plaintext.
//!
//! Every node has the same `[tls]` section ([`TlsSettings`]). In `mtls` mode a node serves gRPC
//! with its certificate and refuses any peer whose client certificate is missing or not signed
//! by the configured CA; when it dials (draft node → coordinator, verify node → coordinator,
//! coordinator → verify node) it presents the same certificate and accepts only a server whose
//! certificate the CA signed. [`TlsSettings::load`] reads and checks the files once at start-up,
//! so a wrong path or a broken PEM stops the node with the key and file named, not at the first
//! handshake.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

use edgespec_proto::auth::{identity_from_der, AuthorizeLayer, PeerIdentity, Role, Rule};

/// The trust domain of node identities when `tls.trust_domain` is not set.
pub const DEFAULT_TRUST_DOMAIN: &str = "edgespec";

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_string()
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
        }
    }

    /// Mutual TLS with these PEM files.
    pub fn mtls(ca: impl Into<PathBuf>, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        TlsSettings {
            mode: TlsMode::Mtls,
            ca: ca.into(),
            cert: cert.into(),
            key: key.into(),
            server_name: String::new(),
            trust_domain: default_trust_domain(),
        }
    }

    /// Reads and checks the files named in the settings for a node of `role`: in mTLS mode the
    /// certificate must name a node of that role in this trust domain (see [`edgespec_proto::auth`]).
    pub fn load(&self, role: Role) -> Result<Tls, TlsError> {
        if self.mode == TlsMode::Plaintext {
            return Ok(Tls::plaintext());
        }
        let ca = read_pem("tls.ca", &self.ca)?;
        let cert = read_pem("tls.cert", &self.cert)?;
        let key = read_pem("tls.key", &self.key)?;
        if !has_block(&ca, "CERTIFICATE") {
            return Err(bad_pem("tls.ca", &self.ca, "no CERTIFICATE block"));
        }
        if !has_block(&cert, "CERTIFICATE") {
            return Err(bad_pem("tls.cert", &self.cert, "no CERTIFICATE block"));
        }
        if !has_block(&key, "PRIVATE KEY") {
            return Err(bad_pem("tls.key", &self.key, "no PRIVATE KEY block"));
        }
        let identity = own_identity(&cert, &self.trust_domain).map_err(|why| TlsError::File {
            key: "tls.cert",
            path: self.cert.clone(),
            why,
        })?;
        if identity.role != role {
            return Err(TlsError::File {
                key: "tls.cert",
                path: self.cert.clone(),
                why: format!(
                    "the certificate is for {identity} (role {}), but this is a {role} node; \
                     each role needs its own certificate",
                    identity.role
                ),
            });
        }
        let tls = Tls {
            material: Some(Material {
                ca: Certificate::from_pem(ca.clone()),
                identity: Identity::from_pem(cert.clone(), key.clone()),
                server_name: (!self.server_name.is_empty()).then(|| self.server_name.clone()),
                pem: Arc::new(Pem { cert, key }),
                own: identity,
                trust_domain: self.trust_domain.clone(),
            }),
        };
        // Build both configurations once, so a key that does not match its certificate or a
        // PEM rustls cannot parse is found now.
        Server::builder()
            .tls_config(tls.server_config().expect("mtls has a server config"))
            .map_err(|e| TlsError::Invalid(format!("tls.cert / tls.key: {}", source_chain(&e))))?;
        Ok(tls)
    }
}

/// Loaded TLS material, cheap to clone.
#[derive(Clone, Debug)]
pub struct Tls {
    material: Option<Material>,
}

#[derive(Clone, Debug)]
struct Material {
    ca: Certificate,
    identity: Identity,
    server_name: Option<String>,
    pem: Arc<Pem>,
    own: PeerIdentity,
    trust_domain: String,
}

/// This node's certificate and key as read (the admin HTTPS listener builds its own rustls
/// configuration from them).
struct Pem {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pem { .. }")
    }
}

/// The identity the first certificate of a PEM chain names.
fn own_identity(cert_pem: &[u8], trust_domain: &str) -> Result<PeerIdentity, String> {
    let first = x509_parser::pem::Pem::iter_from_buffer(cert_pem)
        .next()
        .ok_or("no CERTIFICATE block (expected PEM)")?
        .map_err(|e| format!("unreadable PEM: {e}"))?;
    identity_from_der(&first.contents, trust_domain).map_err(|e| e.to_string())
}

impl Tls {
    /// Plaintext (no certificates, no identities: every peer may call everything).
    pub fn plaintext() -> Tls {
        Tls { material: None }
    }

    /// The identity this node's certificate names (mTLS only).
    pub fn own_identity(&self) -> Option<&PeerIdentity> {
        self.material.as_ref().map(|m| &m.own)
    }

    /// The per-role authorization layer for a gRPC server with these `rules`: enforcing in
    /// mTLS mode, a pass-through in plaintext mode.
    pub fn authorize(&self, rules: &'static [Rule]) -> AuthorizeLayer {
        match &self.material {
            Some(m) => AuthorizeLayer::new(true, &m.trust_domain, rules),
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

    /// A rustls server configuration for an HTTPS listener (the coordinator's admin API) with
    /// this node's certificate; client certificates are not asked for (a bearer token
    /// authorizes there). `None` in plaintext mode.
    pub fn https_server_config(&self) -> Result<Option<Arc<rustls::ServerConfig>>, TlsError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let Some(m) = &self.material else {
            return Ok(None);
        };
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            TlsError::Invalid(format!("admin HTTPS: {what}: {e}"))
        };
        let certs = CertificateDer::pem_slice_iter(&m.pem.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("tls.cert", &e))?;
        let key = PrivateKeyDer::from_pem_slice(&m.pem.key).map_err(|e| bad("tls.key", &e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("protocol versions", &e))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| bad("certificate and key", &e))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Some(Arc::new(config)))
    }

    /// Whether connections are mutually authenticated TLS.
    pub fn is_mtls(&self) -> bool {
        self.material.is_some()
    }

    /// "mtls" or "plaintext", for logs.
    pub fn mode_name(&self) -> &'static str {
        if self.is_mtls() {
            "mtls"
        } else {
            "plaintext"
        }
    }

    /// The server side: this node's certificate, client certificates required and checked
    /// against the CA. `None` in plaintext mode.
    pub fn server_config(&self) -> Option<ServerTlsConfig> {
        self.material.as_ref().map(|m| {
            ServerTlsConfig::new()
                .identity(m.identity.clone())
                .client_ca_root(m.ca.clone())
                .client_auth_optional(false)
        })
    }

    /// Applies [`Tls::server_config`] to a tonic server builder and wraps its routes in the
    /// per-role authorization of `rules` ([`Tls::authorize`]).
    pub fn apply_to_server<L>(
        &self,
        server: Server<L>,
        rules: &'static [Rule],
    ) -> Result<Server<tower::layer::util::Stack<AuthorizeLayer, L>>, TlsError> {
        let server = match self.server_config() {
            Some(c) => server
                .tls_config(c)
                .map_err(|e| TlsError::Invalid(format!("server TLS: {}", source_chain(&e))))?,
            None => server,
        };
        Ok(server.layer(self.authorize(rules)))
    }

    /// An endpoint for `address` (`host:port`, `http://host:port` or `https://host:port`): in
    /// mTLS mode with this node's certificate, the CA as the only trust root and the `https`
    /// scheme; in plaintext mode `http`. An `https://` address in plaintext mode is refused:
    /// it asks for TLS that is not configured.
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
        let Some(m) = &self.material else {
            if scheme == Some("https") {
                return Err(bad(
                    "https:// asks for TLS but tls.mode = \"plaintext\"; set tls.mode = \
                     \"mtls\" with certificates, or use http://",
                ));
            }
            return Endpoint::from_shared(format!("http://{rest}"))
                .map_err(|e| bad(&e.to_string()));
        };
        let endpoint =
            Endpoint::from_shared(format!("https://{rest}")).map_err(|e| bad(&e.to_string()))?;
        let mut c = ClientTlsConfig::new()
            .ca_certificate(m.ca.clone())
            .identity(m.identity.clone());
        if let Some(name) = &m.server_name {
            c = c.domain_name(name.clone());
        }
        endpoint
            .tls_config(c)
            .map_err(|e| bad(&format!("client TLS: {}", source_chain(&e))))
    }
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

fn read_pem(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    if path.as_os_str().is_empty() {
        return Err(TlsError::File {
            key,
            path: path.to_path_buf(),
            why: "not set; tls.mode = \"mtls\" needs tls.ca, tls.cert and tls.key (PEM files), \
                  or set tls.mode = \"plaintext\" to run unencrypted on a trusted network"
                .into(),
        });
    }
    std::fs::read(path).map_err(|e| TlsError::File {
        key,
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

fn has_block(pem: &[u8], label: &str) -> bool {
    let text = String::from_utf8_lossy(pem);
    text.lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.contains(label))
}

fn bad_pem(key: &'static str, path: &Path, why: &str) -> TlsError {
    TlsError::File {
        key,
        path: path.to_path_buf(),
        why: format!("{why} (expected PEM)"),
    }
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
