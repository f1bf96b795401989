//! Test support: a tiny synthetic draft model, a scripted coordinator (a real tonic `Coordinator`
//! server whose "target" is deterministic and which can inject resyncs, overloads, stream drops
//! and model refusals), and a draft node started on 127.0.0.1:0.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgespec_draft_node::{App, Settings};
use edgespec_model::forward::load_gguf;
use edgespec_model::synthetic::TinySpec;
use edgespec_model::{CausalLm, DeviceKind, SeqRequest, TextTokenizer};
use edgespec_proto::domain::{
    CoordinatorMessage, DraftBlock, DraftMessage, ErrorCode, SessionError,
};
use edgespec_proto::pb;
use edgespec_proto::pb::coordinator_server::{Coordinator, CoordinatorServer};
use edgespec_specdec::{argmax, DraftMethod};
use edgespec_testkit::harness::{eventually, Running};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// The default tiny model (`edgespec_testkit::tiny`), with what the tests read from it.
pub struct TinyModel {
    _file: edgespec_testkit::tiny::TinyModel,
    pub path: PathBuf,
    pub tokenizer: TextTokenizer,
    pub fingerprint: String,
    pub eos: u32,
}

impl TinyModel {
    pub fn new() -> TinyModel {
        let file = edgespec_testkit::tiny::TinyModel::new(TinySpec::default());
        TinyModel {
            path: file.path.clone(),
            tokenizer: file.tokenizer(),
            fingerprint: file.fingerprint(),
            eos: file.spec.eos_id(),
            _file: file,
        }
    }
}

/// The scripted target: greedy over the tiny model, except that every position divisible by
/// `perturb_every` takes the next-best byte token instead — so drafts from the same model are
/// accepted most of the time but not always.
pub struct Target {
    model: Mutex<Box<dyn CausalLm>>,
    pub perturb_every: usize,
    /// Instead of the model: repeat the context with this period (the token `period` positions
    /// back), a target that continues a repeated list the way a real model would.
    pub period: Option<usize>,
}

impl Target {
    pub fn new(path: &Path, perturb_every: usize) -> Target {
        Target {
            model: Mutex::new(load_gguf(path, DeviceKind::Cpu).unwrap()),
            perturb_every,
            period: None,
        }
    }

    /// A target that continues its context with period `period` (see [`Target::period`]).
    pub fn periodic(path: &Path, period: usize) -> Target {
        Target {
            period: Some(period),
            ..Target::new(path, 0)
        }
    }

    /// The target's token after each of the last `rows` prefixes of `seq`.
    pub fn next_tokens(&self, seq: &[u32], rows: usize) -> Vec<u32> {
        if let Some(p) = self.period {
            return (seq.len() + 1 - rows..=seq.len())
                .map(|len| if len >= p { seq[len - p] } else { 0 })
                .collect();
        }
        let mut m = self.model.lock().unwrap();
        let out = m
            .forward_batch(&[SeqRequest {
                session: 0,
                start: 0,
                tokens: seq.to_vec(),
                logits_for_last: rows,
            }])
            .unwrap();
        m.release(0);
        let l = &out[0];
        (0..l.rows)
            .map(|i| {
                let pos = seq.len() - l.rows + i + 1; // length of the prefix this row extends
                let best = argmax(l.row(i));
                if self.perturb_every > 0 && pos % self.perturb_every == 0 {
                    (best + 1) % 256
                } else {
                    best
                }
            })
            .collect()
    }

    /// What the node must produce for `ids`: the text of [`Target::greedy`] (without a final
    /// end of text), its token count, and the finish reason.
    pub fn expected(
        &self,
        model: &TinyModel,
        ids: &[u32],
        max_new: usize,
    ) -> (String, usize, &'static str) {
        let out = self.greedy(ids, max_new, model.eos);
        let n = out.len();
        let (text_ids, reason) = match out.last() {
            Some(&t) if t == model.eos => (&out[..n - 1], "stop"),
            _ => (&out[..], "length"),
        };
        (model.tokenizer.decode(text_ids).unwrap(), n, reason)
    }

    /// Target-only greedy decoding: what the node must produce.
    pub fn greedy(&self, prompt: &[u32], max_new: usize, eos: u32) -> Vec<u32> {
        let mut seq = prompt.to_vec();
        let mut out = Vec::new();
        while out.len() < max_new {
            let t = self.next_tokens(&seq, 1)[0];
            out.push(t);
            seq.push(t);
            if t == eos {
                break;
            }
        }
        out
    }
}

/// What the scripted coordinator does.
#[derive(Clone)]
pub struct Script {
    /// Fleet fingerprint sent in Welcome.
    pub fleet_fingerprint: String,
    /// Refuse every stream with FAILED_PRECONDITION.
    pub refuse: bool,
    pub initial_gamma: u32,
    pub max_gamma: u32,
    /// γ asked for after each round, cycling.
    pub gammas: Vec<u32>,
    /// Answer RESYNC_NEEDED (and forget the session) to the first history-less block of these
    /// rounds.
    pub resync_rounds: HashSet<u64>,
    /// Answer OVERLOADED to this many blocks first.
    pub overloaded_blocks: usize,
    /// Break the stream (once) after this many verdicts.
    pub drop_after_verdicts: Option<usize>,
    /// Refuse this many reconnecting streams with UNAVAILABLE (a coordinator restarting).
    pub reject_reconnects: usize,
    /// Stop answering blocks altogether (the verify pool is gone).
    pub silent: bool,
    /// Wait this long before answering each block (a slow link).
    pub block_delay: Duration,
    /// Greedy target; with sampling, every draft is accepted and the bonus is the target's.
    pub target: Arc<Target>,
    /// `Verdict::next_method` of every verdict.
    pub next_method: Option<edgespec_proto::domain::DraftMethod>,
}

/// What the scripted coordinator saw.
#[derive(Debug, Default, Clone)]
pub struct Record {
    pub hellos: usize,
    pub blocks: usize,
    pub blocks_with_history: usize,
    pub verdicts: usize,
    pub resyncs_sent: usize,
    pub overloads_sent: usize,
    pub drops: usize,
    pub rejected_streams: usize,
    pub closes: Vec<u64>,
    pub probe_replies: usize,
    pub invalid: Vec<String>,
    pub draft_probs_seen: usize,
    /// Blocks marked `drafted_ahead` (pipelined and kept).
    pub drafted_ahead: usize,
    /// `pipelined` of the last hello.
    pub hello_pipelined: Option<bool>,
    /// `method` of the last hello (the node's default drafting method).
    pub hello_method: Option<DraftMethod>,
    /// `method` of every block, in arrival order.
    pub block_methods: Vec<DraftMethod>,
    /// `draft_s_per_token` of every block, in arrival order.
    pub block_costs: Vec<f32>,
    /// Draft distributions that are a point mass on their own draft token (lookup under
    /// sampling).
    pub point_masses: usize,
    /// Draft tokens marked as the model's in blocks' `model_token_mask`.
    pub model_marked: usize,
    /// Tokens marked as lookup's (mask bit clear) in a hybrid block whose q is not a point mass:
    /// a lookup token is always proposed with certainty, so any is a wrong mask.
    pub unmarked_model_tokens: usize,
}

struct Shared {
    script: Mutex<Script>,
    record: Mutex<Record>,
    injected: Mutex<HashSet<(u64, u64)>>,
}

#[derive(Clone)]
struct Service(Arc<Shared>);

/// A running scripted coordinator.
pub struct ScriptedCoordinator {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    _server: Running<()>,
}

impl ScriptedCoordinator {
    pub async fn start(script: Script) -> ScriptedCoordinator {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            script: Mutex::new(script),
            record: Mutex::new(Record::default()),
            injected: Mutex::new(HashSet::new()),
        });
        let svc = Service(Arc::clone(&shared));
        let server = Running::spawn(|shutdown| async move {
            tonic::transport::Server::builder()
                .add_service(CoordinatorServer::new(svc))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
                .await
                .unwrap();
        });
        ScriptedCoordinator {
            addr,
            shared,
            _server: server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn record(&self) -> Record {
        self.shared.record.lock().unwrap().clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut Script)) {
        f(&mut self.shared.script.lock().unwrap());
    }

    /// Polls `cond` on the record until it holds or 10 s pass.
    pub async fn wait_for(&self, what: &str, cond: impl Fn(&Record) -> bool) {
        eventually(what, || async { cond(&self.record()) }).await;
    }
}

type Out = mpsc::Sender<Result<pb::CoordinatorMessage, Status>>;

#[tonic::async_trait]
impl Coordinator for Service {
    type DraftsStream =
        Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send + 'static>>;

    async fn drafts(
        &self,
        request: Request<Streaming<pb::DraftMessage>>,
    ) -> Result<Response<Self::DraftsStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty stream"))?;
        let Ok(DraftMessage::Hello(hello)) = DraftMessage::try_from(first) else {
            return Err(Status::invalid_argument("first message must be a hello"));
        };
        let script = self.0.script.lock().unwrap().clone();
        {
            let mut r = self.0.record.lock().unwrap();
            r.hellos += 1;
            r.hello_pipelined = Some(hello.pipelined);
            r.hello_method = Some(hello.method);
            if r.hellos > 1 && r.rejected_streams < script.reject_reconnects {
                r.rejected_streams += 1;
                return Err(Status::unavailable("scripted: coordinator restarting"));
            }
        }
        if script.refuse {
            return Err(Status::failed_precondition(format!(
                "model mismatch: draft fingerprint {} differs from the fleet's {}",
                hello.fingerprint, script.fleet_fingerprint
            )));
        }
        let (tx, rx) = mpsc::channel(1024);
        let welcome = edgespec_proto::domain::Welcome {
            coordinator_id: "scripted".into(),
            fleet_fingerprint: script.fleet_fingerprint.clone(),
            initial_gamma: script.initial_gamma,
            max_gamma: script.max_gamma,
            speculation_enabled: true,
        };
        tx.send(Ok(CoordinatorMessage::Welcome(welcome).into()))
            .await
            .unwrap();
        tx.send(Ok(CoordinatorMessage::Probe(
            edgespec_proto::domain::Probe {
                probe_id: 1,
                padding: vec![0; 64],
            },
        )
        .into()))
            .await
            .unwrap();
        let shared = Arc::clone(&self.0);
        tokio::spawn(async move { serve_stream(shared, inbound, tx).await });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn register_verifier(
        &self,
        _: Request<pb::RegisterVerifierRequest>,
    ) -> Result<Response<pb::RegisterVerifierResponse>, Status> {
        Err(Status::unimplemented("scripted coordinator"))
    }

    async fn verifier_heartbeat(
        &self,
        _: Request<pb::VerifierHeartbeatRequest>,
    ) -> Result<Response<pb::VerifierHeartbeatResponse>, Status> {
        Err(Status::unimplemented("scripted coordinator"))
    }
}

async fn serve_stream(shared: Arc<Shared>, mut inbound: Streaming<pb::DraftMessage>, tx: Out) {
    // Session state is per stream, like a coordinator that forgets a broken stream's sessions.
    let mut sessions: HashMap<u64, Vec<u32>> = HashMap::new();
    while let Ok(Some(msg)) = inbound.message().await {
        let msg = match DraftMessage::try_from(msg) {
            Ok(m) => m,
            Err(e) => {
                shared.record.lock().unwrap().invalid.push(e.to_string());
                continue;
            }
        };
        match msg {
            DraftMessage::Hello(_) => shared
                .record
                .lock()
                .unwrap()
                .invalid
                .push("second hello".into()),
            DraftMessage::Close { session_id } => {
                sessions.remove(&session_id);
                shared.record.lock().unwrap().closes.push(session_id);
            }
            DraftMessage::ProbeReply(_) => shared.record.lock().unwrap().probe_replies += 1,
            DraftMessage::Block(b) => {
                let reply = handle_block(&shared, &mut sessions, b).await;
                match reply {
                    Reply::Send(m) => {
                        if tx.send(Ok(m.into())).await.is_err() {
                            return;
                        }
                    }
                    Reply::Nothing => {}
                    Reply::Drop => {
                        let _ = tx
                            .send(Err(Status::unavailable("scripted stream drop")))
                            .await;
                        return;
                    }
                }
            }
        }
    }
}

enum Reply {
    Send(CoordinatorMessage),
    Nothing,
    Drop,
}

fn error(b: &DraftBlock, code: ErrorCode, message: &str) -> Reply {
    Reply::Send(CoordinatorMessage::Error(SessionError {
        session_id: b.block.session_id,
        round: b.block.round,
        code,
        message: message.into(),
    }))
}

async fn handle_block(
    shared: &Arc<Shared>,
    sessions: &mut HashMap<u64, Vec<u32>>,
    d: DraftBlock,
) -> Reply {
    let script = shared.script.lock().unwrap().clone();
    if !script.block_delay.is_zero() {
        tokio::time::sleep(script.block_delay).await;
    }
    let b = &d.block;
    {
        let mut r = shared.record.lock().unwrap();
        r.blocks += 1;
        r.blocks_with_history += usize::from(b.history.is_some());
        r.draft_probs_seen += b.draft_probs.len();
        r.drafted_ahead += usize::from(d.drafted_ahead);
        r.block_methods.push(d.method);
        r.block_costs.push(d.draft_s_per_token);
        r.point_masses += b
            .draft_probs
            .iter()
            .zip(&b.draft_tokens)
            .filter(|(q, &t)| q.ids == [t] && q.probs == [1.0])
            .count();
        r.model_marked += d.model_token_mask.count_ones() as usize;
        if d.method == DraftMethod::Hybrid {
            r.unmarked_model_tokens += b
                .draft_probs
                .iter()
                .zip(&b.draft_tokens)
                .enumerate()
                .filter(|&(i, (q, &t))| {
                    d.model_token_mask >> i & 1 == 0 && !(q.ids == [t] && q.probs == [1.0])
                })
                .count();
        }
        if script.silent {
            return Reply::Nothing;
        }
        if script.drop_after_verdicts.is_some_and(|n| r.verdicts >= n) && r.drops == 0 {
            r.drops += 1;
            return Reply::Drop;
        }
        if r.overloads_sent < script.overloaded_blocks {
            r.overloads_sent += 1;
            return error(&d, ErrorCode::Overloaded, "scripted overload");
        }
    }
    if let Some(h) = &b.history {
        sessions.insert(b.session_id, h.clone());
    } else if script.resync_rounds.contains(&b.round)
        && shared
            .injected
            .lock()
            .unwrap()
            .insert((b.session_id, b.round))
    {
        sessions.remove(&b.session_id);
        shared.record.lock().unwrap().resyncs_sent += 1;
        return error(&d, ErrorCode::ResyncNeeded, "scripted resync");
    }
    let Some(committed) = sessions.get_mut(&b.session_id) else {
        shared.record.lock().unwrap().resyncs_sent += 1;
        return error(&d, ErrorCode::ResyncNeeded, "unknown session");
    };
    if committed.len() != b.committed_len {
        let msg = format!(
            "committed_len {} but the session holds {}",
            b.committed_len,
            committed.len()
        );
        shared.record.lock().unwrap().invalid.push(msg.clone());
        return error(&d, ErrorCode::InvalidArgument, &msg);
    }
    let mut seq = committed.clone();
    seq.extend_from_slice(&b.draft_tokens);
    let gamma = b.draft_tokens.len();
    let target = Arc::clone(&script.target);
    let rows = tokio::task::spawn_blocking(move || target.next_tokens(&seq, gamma + 1))
        .await
        .unwrap();
    let (accepted, next_token) = if b.sampling.is_greedy() {
        let a = b
            .draft_tokens
            .iter()
            .zip(&rows)
            .take_while(|(d, t)| d == t)
            .count();
        (a, rows[a])
    } else {
        (gamma, rows[gamma])
    };
    committed.extend_from_slice(&b.draft_tokens[..accepted]);
    committed.push(next_token);
    let mut r = shared.record.lock().unwrap();
    let next_gamma = script.gammas[r.verdicts % script.gammas.len()];
    r.verdicts += 1;
    Reply::Send(CoordinatorMessage::Verdict(
        edgespec_proto::domain::Verdict {
            session_id: b.session_id,
            round: b.round,
            accepted,
            next_token,
            committed_len: committed.len(),
            next_gamma,
            client_send_unix_ns: d.client_send_unix_ns,
            coordinator_ns: 0,
            verify: Default::default(),
            verifier_id: "scripted".into(),
            next_method: script.next_method,
        },
    ))
}

/// A script with the given target and sensible defaults.
pub fn script(target: Arc<Target>, fingerprint: &str) -> Script {
    Script {
        fleet_fingerprint: fingerprint.to_string(),
        refuse: false,
        initial_gamma: 4,
        max_gamma: 8,
        gammas: vec![4, 2, 5, 3],
        resync_rounds: HashSet::new(),
        overloaded_blocks: 0,
        drop_after_verdicts: None,
        reject_reconnects: 0,
        silent: false,
        block_delay: Duration::ZERO,
        target,
        next_method: None,
    }
}

/// Node settings for tests: the tiny model, the scripted coordinator, port 0.
pub fn settings(model: &TinyModel, coordinator: &str) -> Settings {
    let mut s = Settings::default();
    s.model.path = model.path.clone();
    s.model.served_name = "tiny".into();
    s.http.listen = "127.0.0.1:0".parse().unwrap();
    s.coordinator.address = coordinator.to_string();
    s.coordinator.timeout = Duration::from_secs(10);
    s.coordinator.backoff_initial = Duration::from_millis(20);
    s.coordinator.backoff_max = Duration::from_millis(200);
    s.limits.max_tokens = 256;
    s.tls = edgespec_runtime::tls::TlsSettings::plaintext();
    s
}

/// A running draft node.
pub struct RunningNode {
    pub addr: SocketAddr,
    pub running: Running<Result<(), edgespec_draft_node::Error>>,
}

impl RunningNode {
    pub async fn start(settings: Settings) -> RunningNode {
        let app = App::build(settings).await.expect("the draft node starts");
        let addr = app.http_addr();
        RunningNode {
            addr,
            running: Running::spawn(|shutdown| app.run(shutdown)),
        }
    }

    /// Asks the node to shut down gracefully.
    pub fn shutdown(&mut self) {
        self.running.shutdown();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

/// Everything a test needs: model, target, coordinator, node.
pub struct Harness {
    pub model: TinyModel,
    pub target: Arc<Target>,
    pub coordinator: ScriptedCoordinator,
    pub node: RunningNode,
}

impl Harness {
    /// The only session was closed at the coordinator long before its 200 tokens (its client
    /// left).
    pub async fn session_closed_early(&self) {
        self.coordinator
            .wait_for("the session's close", |r| r.closes.len() == 1)
            .await;
        let rec = self.coordinator.record();
        assert!(
            rec.verdicts < 40,
            "the session stopped when its client left, not after all 200 tokens: {rec:?}"
        );
    }

    pub async fn start(customise: impl FnOnce(&mut Script, &mut Settings)) -> Harness {
        let model = TinyModel::new();
        let target = Arc::new(Target::new(&model.path, 3));
        let mut sc = script(Arc::clone(&target), &model.fingerprint);
        let mut st = settings(&model, "http://127.0.0.1:1");
        customise(&mut sc, &mut st);
        let coordinator = ScriptedCoordinator::start(sc).await;
        st.coordinator.address = coordinator.url();
        let node = RunningNode::start(st).await;
        Harness {
            model,
            target,
            coordinator,
            node,
        }
    }

    /// The text the target alone would produce for `prompt`, and its token count.
    pub fn expected(&self, prompt: &str, max_new: usize) -> (String, usize, &'static str) {
        let ids = self.model.tokenizer.encode(prompt).unwrap();
        self.expected_ids(&ids, max_new)
    }

    pub fn expected_ids(&self, ids: &[u32], max_new: usize) -> (String, usize, &'static str) {
        self.target.expected(&self.model, ids, max_new)
    }

    pub fn chat_prompt(&self, user: &str) -> Vec<u32> {
        self.model
            .tokenizer
            .encode_chat(&[edgespec_model::ChatMessage::new("user", user)], true)
            .unwrap()
    }
}

/// The JSON chunks of SSE `events`: every event but the last (`[DONE]` when the stream ended
/// properly).
pub fn sse_chunks(events: &[String]) -> Vec<serde_json::Value> {
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

/// The text a streamed completion carried (`choices[0].text` of each chunk).
pub fn streamed_text(chunks: &[serde_json::Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect()
}

/// Reads an SSE body into its `data:` payloads.
pub async fn sse_events(resp: reqwest::Response) -> Vec<String> {
    let body = resp.text().await.unwrap();
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|s| s.trim().to_string())
        .collect()
}
