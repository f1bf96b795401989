//! Reading a node's PEM files and turning them into what its servers and clients use: the
//! rustls server configurations (gRPC with client certificates required, admin HTTPS without),
//! tonic's client identity and trust root, and the facts the node reports (its identity, the
//! certificate's notAfter).

use std::path::Path;
use std::sync::Arc;

use edgespec_proto::auth::{identity_from_der, PeerIdentity, Role};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tonic::transport::{Certificate, Identity};

use super::{TlsError, TlsSettings};

/// The three files as read, compared byte for byte to notice a rotation.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Pem {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pem { .. }")
    }
}

/// One generation of loaded TLS material.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub pem: Pem,
    /// Trust root for the servers this node dials.
    pub ca: Certificate,
    /// This node's certificate and key, presented when it dials.
    pub identity: Identity,
    /// The gRPC servers' configuration: client certificates from the CA required.
    pub grpc: Arc<ServerConfig>,
    /// The admin HTTPS configuration: no client certificate asked for (a bearer token
    /// authorizes there).
    pub https: Arc<ServerConfig>,
    /// The identity the certificate names.
    pub own: PeerIdentity,
    /// The certificate's notAfter, unix seconds.
    pub not_after: i64,
}

/// Reads the three files named in `settings`.
pub(crate) fn read(settings: &TlsSettings) -> Result<Pem, TlsError> {
    let ca = read_pem("tls.ca", &settings.ca)?;
    let cert = read_pem("tls.cert", &settings.cert)?;
    let key = read_pem("tls.key", &settings.key)?;
    if !has_block(&ca, "CERTIFICATE") {
        return Err(bad_pem("tls.ca", &settings.ca, "no CERTIFICATE block"));
    }
    if !has_block(&cert, "CERTIFICATE") {
        return Err(bad_pem("tls.cert", &settings.cert, "no CERTIFICATE block"));
    }
    if !has_block(&key, "PRIVATE KEY") {
        return Err(bad_pem("tls.key", &settings.key, "no PRIVATE KEY block"));
    }
    Ok(Pem { ca, cert, key })
}

/// Checks `pem` for a node of `role` and builds every configuration from it, so a key that
/// does not match its certificate or a PEM rustls cannot parse is found here.
pub(crate) fn build(settings: &TlsSettings, role: Role, pem: Pem) -> Result<Loaded, TlsError> {
    let file_error = |why: String| TlsError::File {
        key: "tls.cert",
        path: settings.cert.clone(),
        why,
    };
    let first = first_certificate(&pem.cert).map_err(file_error)?;
    let own =
        identity_from_der(&first, &settings.trust_domain).map_err(|e| file_error(e.to_string()))?;
    if own.role != role {
        return Err(file_error(format!(
            "the certificate is for {own} (role {}), but this is a {role} node; each role needs \
             its own certificate",
            own.role
        )));
    }
    let not_after = not_after(&first).map_err(file_error)?;
    let (grpc, https) = server_configs(&pem)?;
    Ok(Loaded {
        ca: Certificate::from_pem(pem.ca.clone()),
        identity: Identity::from_pem(pem.cert.clone(), pem.key.clone()),
        grpc,
        https,
        own,
        not_after,
        pem,
    })
}

fn server_configs(pem: &Pem) -> Result<(Arc<ServerConfig>, Arc<ServerConfig>), TlsError> {
    let bad = |what: &str, e: &dyn std::fmt::Display| TlsError::Invalid(format!("{what}: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&pem.ca) {
        let ca = ca.map_err(|e| bad("tls.ca", &e))?;
        roots.add(ca).map_err(|e| bad("tls.ca", &e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| bad("tls.ca", &e))?;
    let certs = CertificateDer::pem_slice_iter(&pem.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("tls.cert", &e))?;
    let key = PrivateKeyDer::from_pem_slice(&pem.key).map_err(|e| bad("tls.key", &e))?;
    let builder = || {
        ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("protocol versions", &e))
    };
    let mut grpc = builder()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs.clone(), key.clone_key())
        .map_err(|e| bad("tls.cert / tls.key", &e))?;
    grpc.alpn_protocols = vec![b"h2".to_vec()];
    let mut https = builder()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad("tls.cert / tls.key", &e))?;
    https.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((Arc::new(grpc), Arc::new(https)))
}

/// The DER of the first certificate of a PEM chain.
fn first_certificate(cert_pem: &[u8]) -> Result<Vec<u8>, String> {
    let first = x509_parser::pem::Pem::iter_from_buffer(cert_pem)
        .next()
        .ok_or("no CERTIFICATE block (expected PEM)")?
        .map_err(|e| format!("unreadable PEM: {e}"))?;
    Ok(first.contents)
}

/// The notAfter of a DER certificate, unix seconds.
pub(crate) fn not_after(der: &[u8]) -> Result<i64, String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
    Ok(cert.validity().not_after.timestamp())
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
