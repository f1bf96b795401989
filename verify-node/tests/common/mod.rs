//! Shared test helpers: tiny synthetic models, in-process verify nodes on 127.0.0.1:0, a gRPC
//! client, and a target-only greedy reference computed directly on the model.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgespec_model::forward::load_gguf;
use edgespec_model::synthetic::{write_tiny_gguf, TinySpec};
use edgespec_model::{CausalLm, DeviceKind, SeqRequest};
use edgespec_proto::pb;
use edgespec_proto::pb::verifier_client::VerifierClient;
use edgespec_specdec::argmax;
use edgespec_verify_node::{App, Settings};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// A tiny model file in its own temp dir.
pub struct TinyModel {
    pub _dir: tempfile::TempDir,
    pub path: PathBuf,
    pub spec: TinySpec,
}

pub fn tiny_model() -> TinyModel {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let spec = TinySpec {
        seed: 11,
        ..TinySpec::default()
    };
    write_tiny_gguf(&path, &spec).unwrap();
    TinyModel {
        _dir: dir,
        path,
        spec,
    }
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
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), edgespec_verify_node::Error>>>,
}

impl Node {
    pub async fn start(settings: Settings) -> Node {
        let app = App::build(settings).await.unwrap();
        let addr = app.grpc_addr();
        let fingerprint = app.facts().fingerprint.clone();
        let vocab_size = app.facts().vocab_size;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run(async move {
            let _ = stopped.await;
        }));
        let client = VerifierClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        Node {
            addr,
            client,
            fingerprint,
            vocab_size,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Graceful shutdown; returns the result of `App::run`.
    pub async fn stop(mut self) -> Result<(), edgespec_verify_node::Error> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap()
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

pub fn greedy() -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
    }
}

/// A block; `history` non-empty opens/resyncs the session.
pub fn item(
    session_id: u64,
    committed_len: usize,
    history: &[u32],
    drafts: &[u32],
) -> pb::VerifyItem {
    pb::VerifyItem {
        session_id,
        round: committed_len as u64,
        committed_len: committed_len as u32,
        history: history.to_vec(),
        draft_tokens: drafts.to_vec(),
        draft_probs: vec![],
        sampling: Some(greedy()),
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

pub fn load_reference(path: &Path) -> Box<dyn CausalLm> {
    load_gguf(path, DeviceKind::Cpu).unwrap()
}

/// Target-only greedy decoding of `n` tokens after `prompt`, one token per forward.
pub fn greedy_walk(model: &mut dyn CausalLm, session: u64, prompt: &[u32], n: usize) -> Vec<u32> {
    model.release(session);
    let mut out = Vec::with_capacity(n);
    let mut logits = model
        .forward_batch(&[SeqRequest {
            session,
            start: 0,
            tokens: prompt.to_vec(),
            logits_for_last: 1,
        }])
        .unwrap();
    for len in prompt.len()..prompt.len() + n {
        let next = argmax(logits[0].row(0));
        out.push(next);
        logits = model
            .forward_batch(&[SeqRequest {
                session,
                start: len,
                tokens: vec![next],
                logits_for_last: 1,
            }])
            .unwrap();
    }
    model.release(session);
    out
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
