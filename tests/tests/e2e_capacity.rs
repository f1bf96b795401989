//! Admission by the verify node's real capacity with several coordinators (issue 15 item 4): two
//! coordinators share one verify node that holds two sessions. When both are taken by recently
//! active sessions, a third session is refused with OVERLOADED and a message that says why, and
//! the two active sessions keep their state (no eviction, no resync) — whichever coordinator asks.
//!
//! Real coordinators and a real verify node (tiny synthetic model) on `127.0.0.1:0`; the draft
//! side is a scripted stream sending γ = 0 blocks.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use edgespec_proto::domain::{CoordinatorMessage, DraftMessage, ErrorCode, SessionError};
use edgespec_runtime::tls::TlsSettings;
use edgespec_testkit::fleet::AdminApi;
use edgespec_testkit::harness::{wait_until, Running};
use edgespec_testkit::scripted::{greedy_block, DraftClient};
use edgespec_testkit::tiny::TinyModel;
use tokio::sync::mpsc::UnboundedReceiver;

const TOKEN: &str = "capacity-test";
const DEADLINE: Duration = Duration::from_secs(30);

type Node = Running<Result<()>>;

async fn coordinator() -> Result<(SocketAddr, AdminApi, Node)> {
    let mut s = edgespec_coordinator::Settings::for_tests();
    s.admin.token = TOKEN.into();
    s.registry.heartbeat_interval = Duration::from_millis(100);
    let app = edgespec_coordinator::App::build(s).await?;
    let (grpc, http) = (app.grpc_addr(), app.http_addr());
    let running = Running::spawn(|stop| async move { Ok(app.run(stop).await?) });
    Ok((grpc, AdminApi::http(http, TOKEN), running))
}

/// One session stepped by hand with γ = 0 blocks.
struct Session {
    sid: u64,
    committed: Vec<u32>,
    round: u64,
    rx: UnboundedReceiver<CoordinatorMessage>,
}

impl Session {
    fn new(d: &DraftClient, sid: u64) -> Self {
        Self {
            sid,
            committed: vec![3 + sid as u32, 5, 7, 11],
            round: 1,
            rx: d.subscribe(sid),
        }
    }

    /// Sends the next block (with the history when `open`) and returns the answer: a verdict
    /// is applied, an error returned.
    async fn step(&mut self, d: &DraftClient, open: bool) -> Result<Option<SessionError>> {
        let block = greedy_block(self.sid, self.round, &self.committed, open, vec![]);
        d.send(DraftMessage::Block(block)).await?;
        let answer = tokio::time::timeout(DEADLINE, self.rx.recv())
            .await
            .context("an answer in time")?
            .context("the stream is open")?;
        match answer {
            CoordinatorMessage::Verdict(v) => {
                self.committed.push(v.next_token);
                self.round += 1;
                Ok(None)
            }
            CoordinatorMessage::Error(e) => Ok(Some(e)),
            m => bail!("unexpected {m:?}"),
        }
    }

    /// A round that must succeed.
    async fn verdict(&mut self, d: &DraftClient, open: bool) -> Result<()> {
        match self.step(d, open).await? {
            None => Ok(()),
            Some(e) => bail!("session {}: {:?}: {}", self.sid, e.code, e.message),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_fill_one_node_and_the_overflow_is_refused_without_eviction() -> Result<()>
{
    let model = TinyModel::seeded(15);
    let (a_grpc, a_admin, a) = coordinator().await?;
    let (b_grpc, b_admin, b) = coordinator().await?;
    let mut vs = edgespec_verify_node::Settings::default();
    vs.model.path = model.path.clone();
    vs.server.listen = ([127, 0, 0, 1], 0).into();
    vs.server.node_id = "shared".into();
    vs.server.drain_timeout = Duration::ZERO;
    vs.sessions.capacity = 2;
    vs.sessions.evict_idle_after = Duration::from_secs(600);
    vs.coordinator.addresses = vec![format!("http://{a_grpc}"), format!("http://{b_grpc}")];
    vs.coordinator.heartbeat_interval = Duration::from_millis(100);
    vs.coordinator.retry_interval = Duration::from_millis(100);
    vs.tls = TlsSettings::plaintext();
    let app = edgespec_verify_node::App::build(vs).await?;
    let metrics = app.metrics();
    let verify: Node = Running::spawn(|stop| async move { Ok(app.run(stop).await?) });
    for admin in [&a_admin, &b_admin] {
        wait_until("the verify node is up", DEADLINE, || async {
            admin.get("/admin/v1/nodes").await.is_ok_and(|n| {
                n["verifiers"]
                    .as_array()
                    .is_some_and(|v| v.iter().any(|v| v["health"] == "up"))
            })
        })
        .await?;
    }
    let fp = model.fingerprint();
    let da = DraftClient::connect_with(&format!("http://{a_grpc}"), "edge-a", &fp).await?;
    let db = DraftClient::connect_with(&format!("http://{b_grpc}"), "edge-b", &fp).await?;

    // Each coordinator opens one session: the node is full of recently active sessions.
    let mut a1 = Session::new(&da, 1);
    let mut b1 = Session::new(&db, 1);
    a1.verdict(&da, true).await?;
    b1.verdict(&db, true).await?;
    // A third session, from either coordinator, is refused clearly.
    for (d, sid) in [(&db, 2), (&da, 2)] {
        let mut extra = Session::new(d, sid);
        let e = extra
            .step(d, true)
            .await?
            .context("the overflow session was admitted")?;
        ensure!(
            e.code == ErrorCode::Overloaded,
            "{:?}: {}",
            e.code,
            e.message
        );
        ensure!(
            e.message.contains("full") || e.message.contains("capacity"),
            "the refusal does not say why: {}",
            e.message
        );
    }
    // The active sessions kept their state: their next rounds need no resync.
    for _ in 0..3 {
        a1.verdict(&da, false).await?;
        b1.verdict(&db, false).await?;
    }
    ensure!(
        metrics.evictions.get() == 0,
        "a recently active session was evicted"
    );

    verify.close().await?;
    a.close().await?;
    b.close().await?;
    Ok(())
}
