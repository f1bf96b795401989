//! The admin API's listener: HTTPS with the node's certificate whenever `tls.mode = "mtls"`
//! (terminated by the runtime, `edgespec_runtime::tls`, with the certificate current at each
//! handshake, so a rotated one is served without a restart), plain HTTP in plaintext mode or
//! with `admin.plaintext`.

use axum::Router;
use edgespec_runtime::tls::{Tls, TlsIncoming};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The bound admin listener, TLS or not.
pub(crate) enum AdminListener {
    Https(TlsIncoming),
    Http(TcpListener),
}

impl AdminListener {
    /// HTTPS with `tls` unless `plaintext` or `tls` is plaintext.
    pub(crate) fn new(listener: TcpListener, tls: &Tls, plaintext: bool) -> Self {
        if plaintext {
            return AdminListener::Http(listener);
        }
        match tls.https_incoming(listener) {
            Ok(https) => AdminListener::Https(https),
            Err(listener) => AdminListener::Http(listener),
        }
    }

    /// "https" or "http", for logs and URLs.
    pub(crate) fn scheme(&self) -> &'static str {
        match self {
            AdminListener::Https(_) => "https",
            AdminListener::Http(_) => "http",
        }
    }

    /// Serves `router` until `stop` is cancelled.
    pub(crate) async fn serve(
        self,
        router: Router,
        stop: CancellationToken,
    ) -> std::io::Result<()> {
        let shutdown = async move { stop.cancelled().await };
        match self {
            AdminListener::Https(l) => {
                axum::serve(l, router)
                    .with_graceful_shutdown(shutdown)
                    .await
            }
            AdminListener::Http(l) => {
                axum::serve(l, router)
                    .with_graceful_shutdown(shutdown)
                    .await
            }
        }
    }
}
