//! Registration against a fake coordinator: the node registers with its facts, heartbeats its
//! load, registers again when a heartbeat says `known = false` or when the coordinator comes back
//! after being down, and keeps serving verifies while no coordinator is reachable.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use edgespec_proto::pb;
use edgespec_proto::pb::coordinator_server::{Coordinator, CoordinatorServer};
use edgespec_testkit::harness::{eventually, Running};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

#[derive(Default)]
struct State {
    registrations: Vec<pb::NodeInfo>,
    heartbeats: Vec<pb::VerifierHeartbeatRequest>,
    known: HashSet<String>,
}

#[derive(Clone, Default)]
struct FakeCoordinator {
    state: Arc<Mutex<State>>,
}

impl FakeCoordinator {
    fn registrations(&self) -> Vec<pb::NodeInfo> {
        self.state.lock().unwrap().registrations.clone()
    }
    fn heartbeats(&self) -> Vec<pb::VerifierHeartbeatRequest> {
        self.state.lock().unwrap().heartbeats.clone()
    }
    /// Forget every node, as a restarted coordinator would.
    fn forget(&self) {
        self.state.lock().unwrap().known.clear();
    }
}

type DraftStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for FakeCoordinator {
    type DraftsStream = DraftStream;

    async fn drafts(
        &self,
        _request: Request<Streaming<pb::DraftMessage>>,
    ) -> Result<Response<DraftStream>, Status> {
        Err(Status::unimplemented("fake coordinator"))
    }

    async fn register_verifier(
        &self,
        request: Request<pb::RegisterVerifierRequest>,
    ) -> Result<Response<pb::RegisterVerifierResponse>, Status> {
        let info = request.into_inner().info.unwrap();
        let mut s = self.state.lock().unwrap();
        s.known.insert(info.node_id.clone());
        s.registrations.push(info);
        Ok(Response::new(pb::RegisterVerifierResponse {
            coordinator_id: "fake".into(),
            heartbeat_interval_ms: 20,
        }))
    }

    async fn verifier_heartbeat(
        &self,
        request: Request<pb::VerifierHeartbeatRequest>,
    ) -> Result<Response<pb::VerifierHeartbeatResponse>, Status> {
        let hb = request.into_inner();
        let mut s = self.state.lock().unwrap();
        let known = s.known.contains(&hb.node_id);
        s.heartbeats.push(hb);
        Ok(Response::new(pb::VerifierHeartbeatResponse {
            known,
            cordoned: false,
        }))
    }
}

struct Fake {
    coordinator: FakeCoordinator,
    running: Running<Result<(), tonic::transport::Error>>,
}

fn serve_fake(listener: TcpListener) -> Fake {
    let coordinator = FakeCoordinator::default();
    let svc = CoordinatorServer::new(coordinator.clone());
    let running = Running::spawn(|shutdown| {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
    });
    Fake {
        coordinator,
        running,
    }
}

fn node_settings(m: &TinyModel, coordinator: SocketAddr) -> edgespec_verify_node::Settings {
    let mut s = settings(&m.path);
    s.coordinator.addresses = vec![format!("http://{coordinator}")];
    s.coordinator.retry_interval = Duration::from_millis(20);
    s.coordinator.rpc_timeout = Duration::from_millis(500);
    s.server.pool = "cloud".into();
    s.sessions.capacity = 7;
    s
}

async fn serve_one_verify(node: &Node) {
    let p = prompt(1, 5, node.vocab_size);
    outcome(&node.verify(vec![item(1, 5, &p, &[])]).await.results[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_heartbeats_and_registers_again() {
    let m = tiny_model();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coord_addr = listener.local_addr().unwrap();
    let fake = serve_fake(listener);
    let node = Node::start(node_settings(&m, coord_addr)).await;

    let c = fake.coordinator.clone();
    eventually("registration", || async { !c.registrations().is_empty() }).await;
    let info = &c.registrations()[0];
    assert_eq!(info.node_id, "verify-test");
    assert_eq!(info.advertise_addr, format!("http://{}", node.addr));
    assert_eq!(info.pool, "cloud");
    assert_eq!(info.fingerprint, node.fingerprint);
    assert_eq!(info.vocab_size as usize, node.vocab_size);
    assert_eq!(info.max_context, 512);
    assert_eq!(info.capacity_sessions, 7);
    assert_eq!(info.device, "cpu");
    assert!(info.load.is_some());

    serve_one_verify(&node).await;
    eventually("heartbeats with load", || async {
        c.heartbeats()
            .iter()
            .any(|h| h.load.is_some_and(|l| l.active_sessions == 1))
    })
    .await;
    assert!(c.heartbeats().iter().all(|h| h.node_id == "verify-test"));

    // known = false → register again.
    c.forget();
    eventually("re-registration after known=false", || async {
        c.registrations().len() >= 2
    })
    .await;

    // The coordinator goes away: the node keeps serving; when a fresh coordinator comes back on
    // the same address, the node registers with it.
    fake.running.stop().await.unwrap().unwrap();
    serve_one_verify(&node).await;
    let listener = TcpListener::bind(coord_addr).await.unwrap();
    let back = serve_fake(listener);
    let c2 = back.coordinator.clone();
    eventually("registration with the restarted coordinator", || async {
        !c2.registrations().is_empty()
    })
    .await;
    node.stop().await.unwrap();
    back.running.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_without_a_coordinator_and_registers_when_one_appears() {
    let m = tiny_model();
    // An address nobody listens on (yet).
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let node = Node::start(node_settings(&m, addr)).await;
    serve_one_verify(&node).await;
    let fake = serve_fake(TcpListener::bind(addr).await.unwrap());
    let c = fake.coordinator.clone();
    eventually("late registration", || async {
        !c.registrations().is_empty()
    })
    .await;
    node.stop().await.unwrap();
    fake.running.shutdown();
}
