//! One proxied connection: connect upstream, pump both directions through their shapers, and
//! react to cuts and shutdown.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rand::{rngs::StdRng, Rng, SeedableRng};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::shaper::{piece_len, Shaper, MAX_PIECE};
use super::{CutMode, Direction, LinkState, Shared};

/// Pieces queued per direction between reader and writer: enough for the bandwidth-delay
/// product of any link the emulator is meant for (at most `QUEUE_PIECES * MAX_PIECE` = 4 MiB in
/// flight per direction).
const QUEUE_PIECES: usize = 256;

#[derive(Debug, Clone)]
pub(super) struct Ctx {
    pub shared: Arc<Shared>,
    pub upstream: SocketAddr,
    pub seed: u64,
    pub stop: CancellationToken,
}

enum End {
    /// Both directions finished (each half-closed in turn).
    Done,
    /// A read or write failed; the connection is torn down both ways.
    Failed(io::Error),
    Cut(LinkState),
    Shutdown,
}

impl Ctx {
    pub(super) async fn serve(&self, id: u64, mut client: TcpStream) {
        let mut state = self.shared.state.subscribe();
        let at_accept = *state.borrow_and_update();
        if at_accept.cut.is_some() {
            self.shared.counters.refused.fetch_add(1, Ordering::Relaxed);
            debug!("link is cut; turning the connection away");
            return self.after_cut(at_accept, vec![client]).await;
        }
        let cut = wait_cut(state.clone(), at_accept.cuts);
        let mut upstream = tokio::select! {
            r = TcpStream::connect(self.upstream) => match r {
                Ok(s) => s,
                Err(e) => {
                    self.shared.counters.upstream_failures.fetch_add(1, Ordering::Relaxed);
                    warn!(upstream = %self.upstream, error = %e, "link emulator: upstream connect failed");
                    return reset(client);
                }
            },
            st = cut => return self.after_cut(st, vec![client]).await,
            () = self.stop.cancelled() => return,
        };
        // Small messages must not wait for Nagle: the emulator adds the only delay.
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        debug!("forwarding");

        let counters = &self.shared.counters;
        counters.active.fetch_add(1, Ordering::Relaxed);
        let end = {
            let (cr, cw) = client.split();
            let (ur, uw) = upstream.split();
            let rng = |d: u64| {
                StdRng::seed_from_u64(self.seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ d)
            };
            let up = pump(
                cr,
                uw,
                Direction::Up,
                state.clone(),
                &counters.bytes_up,
                rng(1),
            );
            let down = pump(
                ur,
                cw,
                Direction::Down,
                state.clone(),
                &counters.bytes_down,
                rng(2),
            );
            tokio::select! {
                r = async { tokio::try_join!(up, down) } => match r {
                    Ok(_) => End::Done,
                    Err(e) => End::Failed(e),
                },
                st = wait_cut(state.clone(), at_accept.cuts) => End::Cut(st),
                () = self.stop.cancelled() => End::Shutdown,
            }
        };
        counters.active.fetch_sub(1, Ordering::Relaxed);
        match end {
            End::Done => debug!("closed"),
            End::Shutdown => debug!("closed by shutdown"),
            End::Failed(e) => {
                debug!(error = %e, "connection failed; resetting both sides");
                reset(client);
                reset(upstream);
            }
            End::Cut(st) => self.after_cut(st, vec![client, upstream]).await,
        }
    }

    /// Resets `streams` now, or (blackhole) holds them silent until the link is restored.
    async fn after_cut(&self, st: LinkState, streams: Vec<TcpStream>) {
        if st.last_cut_mode == CutMode::Blackhole && st.cut.is_some() {
            debug!("blackholed; holding silent until restore");
            let mut state = self.shared.state.subscribe();
            tokio::select! {
                _ = state.wait_for(|s| s.restores != st.restores) => {}
                () = self.stop.cancelled() => {}
            }
        }
        streams.into_iter().for_each(reset);
    }
}

/// Resolves with the state once a cut has happened after `cuts_seen` cuts.
async fn wait_cut(mut state: watch::Receiver<LinkState>, cuts_seen: u64) -> LinkState {
    let seen = state.wait_for(|s| s.cuts != cuts_seen).await.map(|st| *st);
    match seen {
        Ok(st) => st,
        // The sender lives in `Shared`, which this connection keeps alive.
        Err(_) => std::future::pending().await,
    }
}

/// Closes with RST instead of FIN, as a peer that lost the connection's state would.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

struct Piece {
    release: Instant,
    data: Vec<u8>,
}

/// Forwards `src` to `dst` through one direction's shaper until `src` reaches EOF, then
/// half-closes `dst`. Reading and writing run concurrently, joined by a bounded queue.
async fn pump(
    mut src: impl AsyncRead + Unpin,
    mut dst: impl AsyncWrite + Unpin,
    direction: Direction,
    state: watch::Receiver<LinkState>,
    delivered: &AtomicU64,
    mut rng: StdRng,
) -> io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<Piece>(QUEUE_PIECES);
    let reader = async move {
        let mut shaper = Shaper::default();
        let mut buf = vec![0u8; MAX_PIECE];
        loop {
            let n = src.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, io::Error>(());
            }
            let profile = state.borrow().profile(direction);
            let now = Instant::now();
            for data in buf[..n].chunks(piece_len(&profile)) {
                let slot = shaper.schedule(now, data.len(), &profile, rng.random());
                let piece = Piece {
                    release: slot.release,
                    data: data.to_vec(),
                };
                if tx.send(piece).await.is_err() {
                    return Ok(()); // the writer failed and reports why
                }
            }
            if let Some(wake) = shaper.pace_until(Instant::now()) {
                sleep_until(wake).await;
            }
        }
    };
    let writer = async move {
        while let Some(piece) = rx.recv().await {
            sleep_until(piece.release).await;
            dst.write_all(&piece.data).await?;
            delivered.fetch_add(piece.data.len() as u64, Ordering::Relaxed);
        }
        dst.shutdown().await
    };
    tokio::try_join!(reader, writer).map(|_| ())
}
