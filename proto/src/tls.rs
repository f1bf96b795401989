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
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

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
        }
    }

    /// Reads and checks the files named in the settings.
    pub fn load(&self) -> Result<Tls, TlsError> {
        if self.mode == TlsMode::Plaintext {
            return Ok(Tls { material: None });
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
        let tls = Tls {
            material: Some(Material {
                ca: Certificate::from_pem(ca),
                identity: Identity::from_pem(cert, key),
                server_name: (!self.server_name.is_empty()).then(|| self.server_name.clone()),
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
}

impl Tls {
    /// Plaintext.
    pub fn plaintext() -> Tls {
        Tls { material: None }
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

    /// Applies [`Tls::server_config`] to a tonic server builder.
    pub fn apply_to_server<L>(&self, server: Server<L>) -> Result<Server<L>, TlsError> {
        match self.server_config() {
            Some(c) => server
                .tls_config(c)
                .map_err(|e| TlsError::Invalid(format!("server TLS: {}", source_chain(&e)))),
            None => Ok(server),
        }
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
        let err = s.load().unwrap_err().to_string();
        assert!(err.contains("tls.ca") && err.contains("plaintext"), "{err}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let s = TlsSettings::mtls("/nonexistent/ca.pem", "/x", "/y");
        let err = s.load().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn a_file_without_pem_blocks_is_refused() {
        let dir = std::env::temp_dir().join(format!("edgespec-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("junk.pem");
        std::fs::write(&f, "not a certificate").unwrap();
        let err = TlsSettings::mtls(&f, &f, &f)
            .load()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tls.ca") && err.contains("CERTIFICATE"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
