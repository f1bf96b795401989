//! Shared test helpers: in-process verify nodes on 127.0.0.1:0 serving a tiny synthetic model,
//! a gRPC client, and verify items. Tiny models and the target-only greedy reference come from
//! `edgespec_testkit`.
#![allow(dead_code, unused_imports)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use edgespec_model::{CausalLm, SeqRequest};
use edgespec_proto::pb;
use edgespec_proto::pb::verifier_client::VerifierClient;
use edgespec_testkit::harness::Running;
pub use edgespec_testkit::reference::greedy_continuation;
pub use edgespec_testkit::tiny::TinyModel;
pub use edgespec_testkit::wire::{greedy_item as item, GREEDY};
use edgespec_verify_node::{App, Settings};
use tonic::transport::Channel;

/// The tiny model every verify-node test serves.
pub fn tiny_model() -> TinyModel {
    TinyModel::seeded(11)
}

/// Settings for a node on 127.0.0.1:0 serving `model`, with a short batching window.
pub fn settings(model: &Path) -> Settings {
    let mut s = Settings::default();
    s.model.path = model.to_path_buf();
    s.server.listen = "127.0.0.1:0".parse().unwrap();
    s.server.node_id = "verify-test".into();
    s.server.shutdown_grace = Duration::from_secs(10);
    s.batching.window = Duration::from_millis(2);
    s.tls = edgespec_runtime::tls::TlsSettings::plaintext();
    s
}

/// A running node.
pub struct Node {
    pub addr: SocketAddr,
    pub client: VerifierClient<Channel>,
    pub fingerprint: String,
    pub vocab_size: usize,
    running: Running<Result<(), edgespec_verify_node::Error>>,
}

impl Node {
    pub async fn start(settings: Settings) -> Node {
        let app = App::build(settings).await.unwrap();
        let addr = app.grpc_addr();
        let fingerprint = app.facts().fingerprint.clone();
        let vocab_size = app.facts().vocab_size;
        let running = Running::spawn(|shutdown| app.run(shutdown));
        let client = VerifierClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        Node {
            addr,
            client,
            fingerprint,
            vocab_size,
            running,
        }
    }

    /// Graceful shutdown; returns the result of `App::run`.
    pub async fn stop(self) -> Result<(), edgespec_verify_node::Error> {
        self.running.stop().await.unwrap()
    }

    /// Sends one batch and returns the response (panics on a call-level error).
    pub async fn verify(&self, items: Vec<pb::VerifyItem>) -> pb::VerifyBatchResponse {
        self.try_verify(items).await.unwrap()
    }

    pub async fn try_verify(
        &self,
        items: Vec<pb::VerifyItem>,
    ) -> Result<pb::VerifyBatchResponse, tonic::Status> {
        let req = pb::VerifyBatchRequest {
            batch_id: 1,
            coordinator_id: "test-coordinator".into(),
            fingerprint: self.fingerprint.clone(),
            items,
        };
        self.client
            .clone()
            .verify(req)
            .await
            .map(tonic::Response::into_inner)
    }
}

pub fn outcome(r: &pb::VerifyResult) -> pb::VerifyOutcome {
    match r.result.as_ref().unwrap() {
        pb::verify_result::Result::Outcome(o) => *o,
        pb::verify_result::Result::Error(e) => panic!("unexpected error: {e:?}"),
    }
}

pub fn error(r: &pb::VerifyResult) -> pb::SessionError {
    match r.result.as_ref().unwrap() {
        pb::verify_result::Result::Error(e) => e.clone(),
        pb::verify_result::Result::Outcome(o) => panic!("unexpected outcome: {o:?}"),
    }
}

/// The logit row after `prompt` (predicting the next token).
pub fn next_logits(model: &mut dyn CausalLm, session: u64, prompt: &[u32]) -> Vec<f32> {
    let rows = model
        .forward_batch(&[SeqRequest {
            session,
            start: 0,
            tokens: prompt.to_vec(),
            logits_for_last: 1,
        }])
        .unwrap();
    model.release(session);
    rows[0].row(0).to_vec()
}

/// A deterministic pseudo-random prompt of `n` ordinary tokens.
pub fn prompt(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (vocab as u64 - 3)) as u32
        })
        .collect()
}

/// Drives one session through the service: opens it with `prompt`, then asks `drafts` for each
/// round's draft tokens (given the committed tokens so far and the round index) until at least
/// `n` tokens are generated. Returns the generated tokens (exactly `n`) and each round's
/// `(drafted, accepted)`.
pub async fn speculate(
    node: &Node,
    session: u64,
    prompt: &[u32],
    n: usize,
    sampling: pb::SamplingParams,
    mut drafts: impl FnMut(&[u32], usize) -> Vec<u32>,
) -> (Vec<u32>, Vec<(usize, usize)>) {
    let mut committed = prompt.to_vec();
    let mut rounds = Vec::new();
    let mut first = true;
    while committed.len() < prompt.len() + n {
        let d = drafts(&committed, rounds.len());
        let mut it = item(
            session,
            committed.len(),
            if first { &committed } else { &[] },
            &d,
        );
        it.sampling = Some(sampling);
        first = false;
        let resp = node.verify(vec![it]).await;
        let o = outcome(&resp.results[0]);
        let a = o.accepted as usize;
        assert!(a <= d.len());
        committed.extend_from_slice(&d[..a]);
        committed.push(o.next_token);
        assert_eq!(o.committed_len as usize, committed.len());
        rounds.push((d.len(), a));
    }
    committed.truncate(prompt.len() + n);
    (committed[prompt.len()..].to_vec(), rounds)
}
