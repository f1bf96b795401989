//! The node's ONE bidirectional stream to the coordinator, shared by every session: a task that
//! opens it (retrying with backoff for as long as the node runs: the node serves, and answers
//! `/readyz`, while it connects), writes the sessions' blocks, routes verdicts and errors back by
//! session id, answers probes, and reconnects with backoff when the stream breaks — after which
//! every session with a block in flight resends it with its full history (see [`router`]).

mod link;
mod router;
mod status;

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use edgespec_proto::domain::{DraftBlock, DraftMessage, SessionError};
pub(crate) use edgespec_proto::domain::{Verdict, Welcome};
use tokio::sync::{mpsc, watch};

pub(crate) use link::{Hello, Link, LinkConfig, LinkError};
use router::Router;
pub(crate) use status::LinkStatus;

use crate::error::GenError;
use crate::metrics::Metrics;

/// Commands queued before sessions feel back-pressure.
const COMMAND_CAPACITY: usize = 4096;

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
    address: String,
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
    /// Starts the connection task, which opens the stream at once and retries with `backoff`
    /// for as long as a handle lives.
    pub fn start(cfg: LinkConfig, backoff: Backoff, metrics: Metrics) -> Self {
        let (tx, rx) = mpsc::channel(COMMAND_CAPACITY);
        let (status_tx, status) = watch::channel(LinkStatus::connecting());
        let (welcome_tx, welcome) = watch::channel(Welcome::default());
        let address = cfg.address.clone();
        let task = Task {
            cfg,
            backoff,
            metrics,
            status: status_tx,
            welcome: welcome_tx,
            router: Router::default(),
            ever_connected: false,
        };
        tokio::spawn(task.run(rx));
        Connection {
            tx,
            status,
            welcome,
            address,
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

    /// The coordinator's address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Waits until the first stream is up (or the link is known refused), at most `timeout`:
    /// sessions start with the coordinator's Welcome (γ bounds, speculation on/off).
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), GenError> {
        let mut status = self.status.clone();
        let waited = tokio::time::timeout(
            timeout,
            status.wait_for(|s| !matches!(s, LinkStatus::Connecting { .. })),
        )
        .await;
        match waited {
            Err(_) => Err(GenError::Unavailable(format!(
                "the coordinator could not be reached within {}s; retry later",
                timeout.as_secs()
            ))),
            Ok(Err(_)) => Err(GenError::Internal(
                "the coordinator connection stopped".into(),
            )),
            Ok(Ok(s)) => match &*s {
                LinkStatus::Refused(why) => Err(GenError::ModelMismatch(format!(
                    "the verify fleet does not serve this draft model's tokenizer: {why}"
                ))),
                _ => Ok(()),
            },
        }
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
    /// A stream was up at least once (the first one is "connected", later ones "re-established").
    ever_connected: bool,
}

impl Task {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut link: Option<Link> = None;
        tracing::info!(coordinator = %self.cfg.address, "connecting to the coordinator");
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
                            self.status.send_replace(LinkStatus::Down {
                                since: Instant::now(),
                                last_error: Some(reason),
                            });
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
                            self.failed(&e, delay);
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
        if self.ever_connected {
            tracing::info!(resyncs = asked, "coordinator stream re-established");
        } else {
            tracing::info!(
                coordinator = %self.cfg.address,
                fleet = %l.welcome.fleet_fingerprint,
                "connected to the coordinator"
            );
            self.ever_connected = true;
        }
        self.metrics.connected(true);
        self.welcome.send_replace(l.welcome.clone());
        self.status.send_replace(LinkStatus::Up);
    }

    fn failed(&mut self, e: &LinkError, retry_in: Duration) {
        match e {
            LinkError::Unreachable(reason) => {
                // A refused certificate needs an operator (new files are picked up by the next
                // attempt); anything else is an outage that retrying outlasts.
                if edgespec_runtime::tls::tls_hint(reason).is_some() {
                    tracing::error!(%reason, ?retry_in, "the coordinator refused this node, or its TLS handshake failed; retrying");
                } else {
                    tracing::warn!(%reason, ?retry_in, "cannot reach the coordinator; retrying");
                }
                self.status.send_modify(|s| s.note_error(reason));
            }
            LinkError::Mismatch { .. } | LinkError::Refused { .. } => {
                tracing::error!(error = %e, ?retry_in, "the verify fleet does not serve this draft model; retrying");
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
                let round = v.round;
                if !self.router.deliver_verdict(v) {
                    tracing::debug!(round, "dropping a verdict for no block in flight");
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
