//! Link emulator: a TCP proxy that puts a shaped "network" between a client and an upstream.
//!
//! Used by tests, the benchmark harness and capacity planning to run real gRPC traffic over a
//! link with a given delay, jitter and bandwidth per direction, and to cut and restore it live.
//! Each accepted connection is forwarded to one upstream address; the two directions are shaped
//! independently (full duplex, no head-of-line coupling) and half-close is passed through.
//!
//! What it does not emulate: packet loss, the TCP handshake's round trip, and the far side's
//! socket buffers (backpressure is the real loopback sockets').

mod conn;
mod profile;
mod shaper;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

pub use profile::{CutMode, Direction, LinkConfig, LinkProfile};

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("link profile ({direction}): bandwidth_bits_per_s must be positive or absent")]
    ZeroBandwidth { direction: Direction },
    #[error("link config: max_connections must be positive")]
    ZeroMaxConnections,
    #[error("link emulator: reading the listener's local address")]
    LocalAddr(#[source] io::Error),
}

/// The emulator; see [`LinkEmulator::spawn`].
#[derive(Debug)]
pub struct LinkEmulator;

impl LinkEmulator {
    /// Serves `listener`, forwarding every connection to `upstream` through the shaped link,
    /// until `shutdown` completes; the returned task then closes every connection and ends.
    pub fn spawn(
        listener: TcpListener,
        upstream: SocketAddr,
        config: impl Into<LinkConfig>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(JoinHandle<()>, LinkControl), LinkError> {
        let config = config.into();
        config.validate()?;
        let local_addr = listener.local_addr().map_err(LinkError::LocalAddr)?;
        let (state, _) = watch::channel(LinkState {
            up: config.up,
            down: config.down,
            cut: None,
            last_cut_mode: config.cut_mode,
            cuts: 0,
            restores: 0,
        });
        let shared = Arc::new(Shared {
            state,
            counters: Counters::default(),
            local_addr,
            default_cut_mode: config.cut_mode,
        });
        let control = LinkControl {
            shared: shared.clone(),
        };
        info!(%local_addr, %upstream, ?config, "link emulator listening");
        let task = tokio::spawn(async move {
            let stop = CancellationToken::new();
            let tracker = TaskTracker::new();
            let ctx = conn::Ctx {
                shared,
                upstream,
                seed: config.seed,
                stop: stop.clone(),
            };
            tokio::select! {
                () = shutdown => {}
                () = accept_loop(listener, ctx, config.max_connections, &tracker) => {}
            }
            stop.cancel();
            tracker.close();
            tracker.wait().await;
            info!(%local_addr, "link emulator stopped");
        });
        Ok((task, control))
    }
}

async fn accept_loop(
    listener: TcpListener,
    ctx: conn::Ctx,
    max_connections: usize,
    tracker: &TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    for id in 0u64.. {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return; // never closed
        };
        let (stream, peer) = loop {
            match listener.accept().await {
                Ok(accepted) => break accepted,
                Err(e) => {
                    warn!(error = %e, "link emulator: accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        };
        ctx.shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let span = tracing::debug_span!("linkemu_conn", conn = id, %peer);
        let ctx = ctx.clone();
        tracker.spawn(
            async move {
                ctx.serve(id, stream).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// Live control of a running emulator. Cheap to clone; every clone controls the same link.
#[derive(Debug, Clone)]
pub struct LinkControl {
    shared: Arc<Shared>,
}

impl LinkControl {
    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// Replaces both directions' profiles. Takes effect for the next chunk read on every
    /// connection, open or new; bytes already scheduled keep their release time.
    pub fn set_profile(&self, up: LinkProfile, down: LinkProfile) -> Result<(), LinkError> {
        up.validate(Direction::Up)?;
        down.validate(Direction::Down)?;
        self.shared.state.send_modify(|s| {
            s.up = up;
            s.down = down;
        });
        Ok(())
    }

    /// Current `(up, down)` profiles.
    pub fn profiles(&self) -> (LinkProfile, LinkProfile) {
        let s = self.shared.state.borrow();
        (s.up, s.down)
    }

    /// Cuts the link the configured way ([`LinkConfig::cut_mode`]).
    pub fn cut(&self) {
        self.cut_with(self.shared.default_cut_mode);
    }

    /// Cuts the link: every open connection is dropped, and new ones are turned away until
    /// [`restore`](Self::restore). `mode` chooses how peers notice (see [`CutMode`]).
    pub fn cut_with(&self, mode: CutMode) {
        info!(?mode, "link emulator: link cut");
        self.shared.state.send_modify(|s| {
            s.cut = Some(mode);
            s.last_cut_mode = mode;
            s.cuts += 1;
        });
    }

    /// Lets new connections through again; connections held by a blackhole are reset.
    pub fn restore(&self) {
        info!("link emulator: link restored");
        self.shared.state.send_modify(|s| {
            s.cut = None;
            s.restores += 1;
        });
    }

    pub fn is_cut(&self) -> bool {
        self.shared.state.borrow().cut.is_some()
    }

    pub fn stats(&self) -> LinkStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LinkStats {
            bytes_up: get(&c.bytes_up),
            bytes_down: get(&c.bytes_down),
            connections_accepted: get(&c.accepted),
            connections_active: get(&c.active),
            connections_refused: get(&c.refused),
            upstream_connect_failures: get(&c.upstream_failures),
        }
    }
}

/// A snapshot of the emulator's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkStats {
    /// Bytes delivered to the upstream.
    pub bytes_up: u64,
    /// Bytes delivered to clients.
    pub bytes_down: u64,
    /// Connections taken from the listener, including refused ones.
    pub connections_accepted: u64,
    /// Connections currently forwarding.
    pub connections_active: u64,
    /// Connections turned away because the link was cut.
    pub connections_refused: u64,
    pub upstream_connect_failures: u64,
}

#[derive(Debug)]
struct Shared {
    state: watch::Sender<LinkState>,
    counters: Counters,
    local_addr: SocketAddr,
    default_cut_mode: CutMode,
}

#[derive(Debug, Default)]
struct Counters {
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    accepted: AtomicU64,
    active: AtomicU64,
    refused: AtomicU64,
    upstream_failures: AtomicU64,
}

/// What connections watch. `cuts`/`restores` count events, so a connection that looks late
/// still sees that a cut (or restore) happened since it last looked.
#[derive(Debug, Clone, Copy)]
struct LinkState {
    up: LinkProfile,
    down: LinkProfile,
    cut: Option<CutMode>,
    last_cut_mode: CutMode,
    cuts: u64,
    restores: u64,
}

impl LinkState {
    fn profile(&self, direction: Direction) -> LinkProfile {
        match direction {
            Direction::Up => self.up,
            Direction::Down => self.down,
        }
    }
}
