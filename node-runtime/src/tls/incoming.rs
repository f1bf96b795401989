//! TLS termination in front of a server: accepted TCP connections are handshaken with the
//! server configuration current at that moment (so a certificate reloaded from disk is what
//! the next connection sees), then handed over as [`TlsStream`]s: to tonic as a stream of
//! connections (`serve_with_incoming`; tonic reads the peer certificates from it for the
//! per-role authorization) or to axum as a listener.
//!
//! Handshakes run in their own tasks with a timeout, so a client that connects and stalls cannot
//! hold up the accept loop; completed connections go through a bounded channel.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server.
const READY_BACKLOG: usize = 64;

/// Gives the server configuration for the next handshake.
pub(crate) type ConfigSource = Arc<dyn Fn() -> Arc<ServerConfig> + Send + Sync>;

/// TLS connections accepted on one listener.
pub struct TlsIncoming {
    local: Option<SocketAddr>,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl std::fmt::Debug for TlsIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsIncoming({:?})", self.local)
    }
}

impl TlsIncoming {
    /// Accepts on `listener` (Nagle off: small verdict messages must not wait for an ACK) and
    /// handshakes with `config()`; the accept task ends when this value is dropped.
    pub(crate) fn new(listener: TcpListener, config: ConfigSource, what: &'static str) -> Self {
        let local = listener.local_addr().ok();
        let (tx, ready) = mpsc::channel(READY_BACKLOG);
        tokio::spawn(accept_loop(listener, config, tx, what));
        TlsIncoming { local, ready }
    }
}

async fn accept_loop(
    listener: TcpListener,
    config: ConfigSource,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    what: &'static str,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = tx.closed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = TlsAcceptor::from(config());
        let tx = tx.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = tx.send((tls, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, what, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, what, "TLS handshake timed out"),
            }
        });
    }
}

impl tokio_stream::Stream for TlsIncoming {
    type Item = std::io::Result<TlsStream<TcpStream>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.ready
            .poll_recv(cx)
            .map(|next| next.map(|(stream, _)| Ok(stream)))
    }
}

impl axum::serve::Listener for TlsIncoming {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task only ends when this receiver is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.local
            .ok_or_else(|| std::io::Error::other("the listener had no local address"))
    }
}
