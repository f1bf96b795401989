//! The node's ONE bidirectional stream to the coordinator, shared by every session: a task that
//! writes the sessions' blocks, routes verdicts and errors back by session id, answers probes,
//! and reconnects with backoff when the stream breaks — after which every session with a block
//! in flight resends it with its full history (see [`router`]).

mod link;
mod router;

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use edgespec_proto::domain::{DraftBlock, DraftMessage, SessionError};
use tokio::sync::{mpsc, watch};

pub(crate) use link::{Hello, Link, LinkConfig, LinkError};
use router::Router;

use crate::error::GenError;
use crate::metrics::Metrics;

/// Commands queued before sessions feel back-pressure.
const COMMAND_CAPACITY: usize = 4096;

/// A verdict, as the session applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// Session.
    pub session_id: u64,
    /// Round answered.
    pub round: u64,
    /// Draft tokens accepted.
    pub accepted: usize,
    /// Correction or bonus token.
    pub next_token: u32,
    /// Committed length after the round.
    pub committed_len: usize,
    /// γ the coordinator wants next.
    pub next_gamma: u32,
    /// Echo of the block's send time.
    pub client_send_unix_ns: u64,
}

/// The coordinator's Welcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Welcome {
    /// Coordinator instance.
    pub coordinator_id: String,
    /// Fleet fingerprint (empty: no verify node yet).
    pub fleet_fingerprint: String,
    /// γ to start sessions with.
    pub initial_gamma: u32,
    /// Largest γ the coordinator asks for.
    pub max_gamma: u32,
    /// Whether speculation is on fleet-wide.
    pub speculation_enabled: bool,
}

/// What the link reads.
#[derive(Debug)]
pub(crate) enum Inbound {
    Verdict(Verdict),
    Error(SessionError),
    Welcome(Welcome),
}

/// What a session hears from the connection.
#[derive(Debug)]
pub(crate) enum SessionEvent {
    /// The verdict for the block in flight.
    Verdict(Verdict),
    /// A per-session error for the block in flight.
    Error(SessionError),
    /// The stream was re-established without this block on it: resend it with full history.
    Resync { round: u64 },
    /// The session cannot continue.
    Fatal(GenError),
}

/// State of the coordinator link, for admission and `/healthz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkStatus {
    /// A stream is up.
    Up,
    /// No stream since `since`.
    Down { since: Instant },
    /// The coordinator refuses our model (message says why).
    Refused(String),
}

enum Command {
    Open(u64, mpsc::UnboundedSender<SessionEvent>),
    Send(Box<DraftBlock>),
    Close(u64),
}

/// Cloneable handle to the connection task; the task ends when every handle is dropped.
#[derive(Debug, Clone)]
pub(crate) struct Connection {
    tx: mpsc::Sender<Command>,
    status: watch::Receiver<LinkStatus>,
    welcome: watch::Receiver<Welcome>,
}

/// Reconnect policy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Connection {
    /// Starts the connection task on an already open `link`.
    pub fn spawn(link: Link, cfg: LinkConfig, backoff: Backoff, metrics: Metrics) -> Self {
        let (tx, rx) = mpsc::channel(COMMAND_CAPACITY);
        let (status_tx, status) = watch::channel(LinkStatus::Up);
        let (welcome_tx, welcome) = watch::channel(link.welcome.clone());
        let task = Task {
            cfg,
            backoff,
            metrics,
            status: status_tx,
            welcome: welcome_tx,
            router: Router::default(),
        };
        tokio::spawn(task.run(link, rx));
        Connection {
            tx,
            status,
            welcome,
        }
    }

    /// Registers a session's event channel (before its first block).
    pub async fn open(&self, session: u64, events: mpsc::UnboundedSender<SessionEvent>) {
        let _ = self.tx.send(Command::Open(session, events)).await;
    }

    /// Sends (or resends) a session's block.
    pub async fn send(&self, block: DraftBlock) {
        let _ = self.tx.send(Command::Send(Box::new(block))).await;
    }

    /// Ends a session here and at the coordinator.
    pub async fn close(&self, session: u64) {
        let _ = self.tx.send(Command::Close(session)).await;
    }

    /// Current link state.
    pub fn status(&self) -> LinkStatus {
        self.status.borrow().clone()
    }

    /// The latest Welcome.
    pub fn welcome(&self) -> Welcome {
        self.welcome.borrow().clone()
    }
}

type Connecting = Pin<Box<dyn Future<Output = Result<Link, LinkError>> + Send>>;

struct Task {
    cfg: LinkConfig,
    backoff: Backoff,
    metrics: Metrics,
    status: watch::Sender<LinkStatus>,
    welcome: watch::Sender<Welcome>,
    router: Router,
}

impl Task {
    async fn run(mut self, first: Link, mut rx: mpsc::Receiver<Command>) {
        let mut link = Some(first);
        self.router.on_connected();
        self.metrics.connected(true);
        let mut delay = self.backoff.initial;
        let mut retry_at = tokio::time::Instant::now();
        let mut connecting: Option<Connecting> = None;
        loop {
            if let Some(l) = link.as_mut() {
                tokio::select! {
                    cmd = rx.recv() => match cmd {
                        Some(cmd) => self.command(Some(&*l), cmd).await,
                        None => return,
                    },
                    msg = l.recv() => match msg {
                        Ok(m) => self.inbound(m),
                        Err(reason) => {
                            tracing::warn!(%reason, sessions = self.router.len(), "coordinator stream lost; reconnecting");
                            link = None;
                            self.router.on_disconnected();
                            self.metrics.connected(false);
                            self.status.send_replace(LinkStatus::Down { since: Instant::now() });
                            delay = self.backoff.initial;
                            retry_at = tokio::time::Instant::now();
                        }
                    },
                }
                continue;
            }
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.command(None, cmd).await,
                    None => return,
                },
                res = async { connecting.as_mut().expect("guarded").await }, if connecting.is_some() => {
                    connecting = None;
                    match res {
                        Ok(l) => {
                            self.connected(&l);
                            link = Some(l);
                        }
                        Err(e) => {
                            self.failed(&e);
                            retry_at = tokio::time::Instant::now() + delay;
                            delay = (delay * 2).min(self.backoff.max);
                        }
                    }
                },
                _ = tokio::time::sleep_until(retry_at), if connecting.is_none() => {
                    let cfg = self.cfg.clone();
                    connecting = Some(Box::pin(async move { Link::open(&cfg).await }));
                },
            }
        }
    }

    fn connected(&mut self, l: &Link) {
        let asked = self.router.on_connected();
        tracing::info!(resyncs = asked, "coordinator stream re-established");
        self.metrics.connected(true);
        self.welcome.send_replace(l.welcome.clone());
        self.status.send_replace(LinkStatus::Up);
    }

    fn failed(&mut self, e: &LinkError) {
        match e {
            LinkError::Unreachable(reason) => {
                tracing::warn!(%reason, "coordinator still unreachable");
            }
            LinkError::Mismatch { .. } | LinkError::Refused { .. } => {
                tracing::error!(error = %e, "the verify fleet no longer matches the draft model");
                self.router
                    .fail_all(&GenError::ModelMismatch(format!("model mismatch: {e}")));
                self.status.send_replace(LinkStatus::Refused(e.to_string()));
            }
        }
    }

    async fn command(&mut self, link: Option<&Link>, cmd: Command) {
        match cmd {
            Command::Open(session, events) => self.router.open(session, events),
            Command::Send(block) => {
                let b = &block.block;
                if self.router.on_send(b.session_id, b.round) {
                    if let Some(l) = link {
                        // A failed write surfaces as a broken stream on the read side.
                        l.send_block(&block).await;
                    }
                }
            }
            Command::Close(session) => {
                if self.router.close(session) {
                    if let Some(l) = link {
                        l.send(DraftMessage::Close {
                            session_id: session,
                        })
                        .await;
                    }
                }
            }
        }
    }

    fn inbound(&mut self, msg: Inbound) {
        match msg {
            Inbound::Verdict(v) => {
                if !self.router.deliver_verdict(v) {
                    tracing::debug!(round = v.round, "dropping a verdict for no block in flight");
                }
            }
            Inbound::Error(e) => {
                if !self.router.deliver_error(e) {
                    tracing::debug!("dropping a session error for no block in flight");
                }
            }
            Inbound::Welcome(w) => {
                self.welcome.send_replace(w);
            }
        }
    }
}
