//! Certificates reloaded from disk without a restart, and the expiry gauge.
//!
//! A watcher task re-reads the three PEM files every `tls.reload_interval` and compares them
//! byte for byte with what is loaded (mtimes miss a same-second rewrite and say nothing on a
//! Kubernetes secret's symlink swap; three small reads do not matter). On a change it builds
//! every configuration anew and swaps it in: new connections, handshakes and dials use it, open
//! connections keep the certificate they were established with. Material that does not build
//! (a key written before its certificate, a broken PEM) or that names another node leaves the
//! loaded generation in place, with a warning, until the files are right.

use std::sync::{Arc, Weak};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;

use super::{material, Shared, TlsError};
use crate::ops::Families;

/// Name of the expiry gauge on every node's `/metrics`.
pub const CERT_EXPIRY_METRIC: &str = "edgespec_tls_cert_expiry_timestamp_seconds";

/// The runtime's TLS metrics: `edgespec_tls_cert_expiry_timestamp_seconds`, the notAfter
/// (unix seconds) of the certificate this node presents now. Absent in plaintext mode.
#[derive(Clone)]
pub struct TlsMetrics {
    registry: Arc<Registry>,
    expiry: Gauge,
}

impl std::fmt::Debug for TlsMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsMetrics(expiry {})", self.expiry.get())
    }
}

impl TlsMetrics {
    pub(crate) fn new(mtls: bool) -> Self {
        let mut registry = Registry::default();
        let expiry = Gauge::default();
        if mtls {
            registry.register(
                CERT_EXPIRY_METRIC,
                "notAfter of this node's TLS certificate (unix seconds)",
                expiry.clone(),
            );
        }
        TlsMetrics {
            registry: Arc::new(registry),
            expiry,
        }
    }

    pub(crate) fn set_expiry(&self, not_after: i64) {
        self.expiry.set(not_after);
    }
}

impl Families for TlsMetrics {
    fn encode_families(&self, out: &mut String) -> std::fmt::Result {
        self.registry.encode_families(out)
    }
}

impl Shared {
    /// Re-reads the files; swaps in a new generation when they changed. `Ok(false)`: unchanged.
    pub(crate) fn reload(&self) -> Result<bool, TlsError> {
        let pem = material::read(&self.settings)?;
        if pem == self.current().pem {
            return Ok(false);
        }
        let loaded = material::build(&self.settings, self.own.role, pem)?;
        if loaded.own != self.own {
            return Err(TlsError::File {
                key: "tls.cert",
                path: self.settings.cert.clone(),
                why: format!(
                    "the new certificate is for {}, but this node runs as {}; a node keeps its \
                     identity until it restarts",
                    loaded.own, self.own
                ),
            });
        }
        let not_after = loaded.not_after;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(loaded);
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.metrics.set_expiry(not_after);
        Ok(true)
    }
}

/// The running watcher; it stops when this is dropped (or when every `Tls` handle is gone).
#[derive(Debug)]
pub struct CertWatch {
    task: Option<JoinHandle<()>>,
}

impl CertWatch {
    pub(crate) fn none() -> Self {
        CertWatch { task: None }
    }

    pub(crate) fn spawn(shared: &Arc<Shared>, interval: Duration) -> Self {
        let weak = Arc::downgrade(shared);
        CertWatch {
            task: Some(tokio::spawn(watch(weak, interval))),
        }
    }
}

impl Drop for CertWatch {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

async fn watch(shared: Weak<Shared>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last_error: Option<String> = None;
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match shared.reload() {
            Ok(true) => {
                last_error = None;
                tracing::info!(
                    identity = %shared.own,
                    not_after = shared.current().not_after,
                    "TLS certificate reloaded from disk"
                );
            }
            Ok(false) => last_error = None,
            Err(e) => {
                let e = e.to_string();
                // Once per distinct problem: files mid-rotation fail for a tick or two.
                if last_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(error = %e, "TLS files on disk are not usable; keeping the loaded certificate");
                }
                last_error = Some(e);
            }
        }
    }
}
