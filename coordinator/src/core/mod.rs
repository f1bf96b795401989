//! The coordinator's state: registry, draft links, sessions, per-node batching queues and
//! in-flight batches, with synchronous methods that take `now` and return their side effects
//! in an [`Out`] (messages to draft streams, Verify calls to launch, releases). One actor task
//! owns it (`actor.rs`); tests drive it directly.

mod draft;
mod verify;
mod views;

pub use views::{DraftMethodView, DraftView, NodesView, SessionView, VerifierView};

use crate::batching::{BatchPolicy, NodeQueue};
use crate::metrics::Metrics;
use crate::placement::{self, BurstPolicy, Candidate, Placement};
use crate::policy::Policy;
use crate::registry::{Health, Registry};
use crate::Settings;
use edgespec_proto::domain::{Block, CoordinatorMessage, ErrorCode, SessionError, VerifyBatch};
use edgespec_specdec::{
    AcceptancePrior, DraftSide, Ewma, GammaController, LinkConfig, SessionGamma,
};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// Identifies one draft stream for the lifetime of the coordinator.
pub type StreamId = u64;

/// A Verify call to make.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Batch id (answer with [`Core::batch_done`]).
    pub batch_id: u64,
    /// Target node.
    pub node_id: String,
    /// Its address.
    pub addr: String,
    /// The request.
    pub request: VerifyBatch,
}

/// Sessions to release on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Node id.
    pub node_id: String,
    /// Its address.
    pub addr: String,
    /// Coordinator session ids.
    pub session_ids: Vec<u64>,
}

/// Side effects of a state transition, for the actor to carry out.
#[derive(Debug, Default)]
pub struct Out {
    /// Messages to draft streams.
    pub messages: Vec<(StreamId, CoordinatorMessage)>,
    /// Verify calls to make.
    pub launches: Vec<Launch>,
    /// Release calls to make.
    pub releases: Vec<Release>,
}

impl Out {
    fn error(&mut self, stream: StreamId, e: SessionError) {
        self.messages.push((stream, CoordinatorMessage::Error(e)));
    }
}

/// A draft stream: its node, what the γ controller has learnt about it, and probes.
#[derive(Debug)]
struct DraftLink {
    node_id: String,
    fingerprint: String,
    model_name: String,
    /// Link estimates, per-method draft cost and calibration, pipelining, γ cap and default
    /// method (per stream, so what is learnt carries over between requests).
    side: DraftSide,
    /// Rounds of this stream's sessions by drafting method (`DraftMethod::index`).
    by_method: [MethodStats; 3],
    /// The largest γ granted on this stream so far (Welcome or verdict): a block may not draft
    /// more (a draft node sends only what its role allows).
    granted_gamma: usize,
    sessions: HashSet<u64>,
    next_probe_at: Instant,
    probe_seq: u64,
    /// Outstanding probes: id → (sent at, padding bytes).
    probes: HashMap<u64, (Instant, usize)>,
}

/// What one draft stream's sessions of one drafting method did, for the admin view.
#[derive(Debug, Clone, Copy, Default)]
struct MethodStats {
    rounds: u64,
    drafted: u64,
    accepted: u64,
    /// Sum of the γ sent back in verdicts.
    gamma_sum: u64,
}

/// A session known to the coordinator.
#[derive(Debug)]
struct Session {
    stream: StreamId,
    draft_id: u64,
    node: Option<String>,
    /// The node holds the session's state (a block with history went there).
    synced: bool,
    /// A block of the session is queued or in flight.
    busy: bool,
    gamma: u32,
    /// Drafting method, acceptance, rounds, last block's γ and wire size, for the γ controller.
    g: SessionGamma,
    drafted: u64,
    accepted: u64,
    /// Receipt → verdict time of the last verdict (what the draft's next round trip includes
    /// besides the network), ns; 0 when not yet known.
    last_server_ns: u64,
}

/// A block waiting for or inside a Verify call.
#[derive(Debug)]
struct Item {
    global: u64,
    block: Block,
    received: Instant,
    max_new_tokens: u32,
    client_send_unix_ns: u64,
    /// Which draft tokens a hybrid block's model drafted (`DraftBlock::model_token_mask`).
    model_token_mask: u64,
    /// A node refused the session (OVERLOADED) and it was placed again: a second refusal goes
    /// to the draft node, so two full nodes cannot pass an open back and forth.
    replaced: bool,
}

#[derive(Debug)]
struct Inflight {
    node: String,
    generation: u64,
    tokens: usize,
    items: Vec<Item>,
    sent_at: Instant,
}

/// The whole coordinator state.
#[derive(Debug)]
pub struct Core {
    id: String,
    epoch: Instant,
    settings: Settings,
    policy: Policy,
    gamma: GammaController,
    registry: Registry,
    queues: HashMap<String, NodeQueue<Item>>,
    node_sessions: HashMap<String, usize>,
    streams: HashMap<StreamId, DraftLink>,
    next_stream: StreamId,
    sessions: HashMap<u64, Session>,
    by_key: HashMap<(StreamId, u64), u64>,
    next_global: u64,
    inflight: HashMap<u64, Inflight>,
    next_batch: u64,
    fleet_alpha: Ewma,
    /// The fleet's acceptance by drafting method (`DraftMethod::index`).
    method_alpha: [Ewma; 3],
    metrics: Metrics,
}

impl Core {
    /// A coordinator with no nodes, identified by `id` (changes on every start).
    pub fn new(id: String, settings: Settings, metrics: Metrics, now: Instant) -> Self {
        Self {
            id,
            epoch: now,
            policy: settings.policy.clone(),
            gamma: GammaController::new(settings.policy.gamma_policy()),
            settings,
            registry: Registry::default(),
            queues: HashMap::new(),
            node_sessions: HashMap::new(),
            streams: HashMap::new(),
            next_stream: 1,
            sessions: HashMap::new(),
            by_key: HashMap::new(),
            next_global: 1,
            inflight: HashMap::new(),
            next_batch: 1,
            fleet_alpha: Ewma::new(30.0),
            method_alpha: [Ewma::new(30.0); 3],
            metrics,
        }
    }

    /// Coordinator instance id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Replaces the policy (already validated).
    pub fn set_policy(&mut self, policy: Policy) {
        self.gamma.set_policy(policy.gamma_policy());
        self.policy = policy;
    }

    /// Verify nodes up.
    pub fn verifiers_up(&self) -> usize {
        self.registry.up_count()
    }

    /// Open sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    fn secs(&self, now: Instant) -> f64 {
        now.saturating_duration_since(self.epoch).as_secs_f64()
    }

    fn batch_policy(&self) -> BatchPolicy {
        BatchPolicy {
            window: self.policy.batch_window,
            max_tokens: self.policy.max_batch_tokens,
            max_inflight: self.settings.verify.max_inflight_batches,
        }
    }

    fn burst_policy(&self) -> BurstPolicy {
        BurstPolicy {
            queue_delay: self.policy.burst_queue_delay,
            utilization: self.policy.burst_utilization,
        }
    }

    fn link_config(&self) -> LinkConfig {
        let l = &self.settings.link;
        LinkConfig {
            half_life_s: l.half_life.as_secs_f64(),
            default_rtt_s: l.default_rtt.as_secs_f64(),
            default_bandwidth_bytes_per_s: l.default_bandwidth_bytes_per_s,
            ..LinkConfig::default()
        }
    }

    fn acceptance_prior(&self) -> AcceptancePrior {
        let a = &self.settings.acceptance;
        AcceptancePrior {
            alpha: a.prior_alpha,
            weight: a.prior_weight,
            half_life_s: a.half_life.as_secs_f64(),
        }
    }

    /// Predicted wait of a new block on `node` before its forward starts.
    fn predicted_delay(&self, node: &str) -> Duration {
        let Some(v) = self.registry.get(node) else {
            return Duration::ZERO;
        };
        let cost = v.verify_cost();
        let (pending, inflight) = self
            .queues
            .get(node)
            .map_or((0, 0), |q| (q.pending_tokens(), q.inflight_tokens()));
        let ahead = pending + inflight + v.reported.queued_tokens as usize;
        if ahead == 0 {
            return Duration::ZERO;
        }
        let budget = self.policy.max_batch_tokens.max(1);
        let forwards = ahead.div_ceil(budget) as f64;
        let secs = cost.base_s * forwards + cost.per_token_s * ahead as f64;
        Duration::from_secs_f64(secs.clamp(0.0, 3600.0))
    }

    /// Schedulable nodes as placement sees them: this coordinator's own count of sessions per
    /// node, and what the node reports for all coordinators together (recently active sessions,
    /// KV bytes against its budget).
    fn candidates(&self) -> Vec<Candidate> {
        let fleet = self.registry.fleet_fingerprint().unwrap_or_default();
        let cap_limit = self.settings.admission.max_sessions_per_node;
        self.registry
            .iter()
            .filter(|v| v.schedulable() && v.fingerprint == fleet)
            .map(|v| Candidate {
                id: v.id.clone(),
                pool: v.pool,
                sessions: self.node_sessions.get(&v.id).copied().unwrap_or(0),
                reported_sessions: v.reported.recent_sessions as usize,
                kv_full: v.reported.kv_budget_bytes > 0
                    && v.reported.kv_bytes >= v.reported.kv_budget_bytes,
                capacity: if cap_limit > 0 {
                    v.capacity.min(cap_limit)
                } else {
                    v.capacity
                },
                predicted_delay: self.predicted_delay(&v.id),
            })
            .collect()
    }

    fn place(&self, avoid: Option<&str>) -> Placement {
        placement::place(&self.candidates(), &self.burst_policy(), avoid)
    }

    /// Moves a session to `node` (or unplaces it), keeping per-node counts.
    fn assign(&mut self, global: u64, node: Option<String>) {
        let Some(s) = self.sessions.get_mut(&global) else {
            return;
        };
        if let Some(old) = s.node.take() {
            if let Some(c) = self.node_sessions.get_mut(&old) {
                *c = c.saturating_sub(1);
            }
        }
        if let Some(n) = &node {
            *self.node_sessions.entry(n.clone()).or_default() += 1;
        }
        s.node = node;
        s.synced = false;
    }

    fn release_on(&self, node: &str, ids: Vec<u64>, out: &mut Out) {
        if ids.is_empty() {
            return;
        }
        if let Some(v) = self.registry.get(node) {
            if v.health == Health::Up {
                out.releases.push(Release {
                    node_id: node.to_string(),
                    addr: v.addr.clone(),
                    session_ids: ids,
                });
            }
        }
    }

    fn session_error(
        &self,
        out: &mut Out,
        stream: StreamId,
        (session_id, round): (u64, u64),
        code: ErrorCode,
        message: impl Into<String>,
    ) {
        self.metrics.session_error(code);
        out.error(
            stream,
            SessionError {
                session_id,
                round,
                code,
                message: message.into(),
            },
        );
    }

    /// Removes a session entirely (closed, stream gone, or refused before it started).
    fn drop_session(&mut self, global: u64, out: &mut Out) {
        let Some(s) = self.sessions.get(&global) else {
            return;
        };
        let (stream, draft_id, node, synced) = (s.stream, s.draft_id, s.node.clone(), s.synced);
        if let Some(n) = &node {
            if let Some(q) = self.queues.get_mut(n) {
                q.remove_where(|i| i.global == global);
            }
            if synced {
                self.release_on(n, vec![global], out);
            }
        }
        self.assign(global, None);
        self.sessions.remove(&global);
        self.by_key.remove(&(stream, draft_id));
        if let Some(l) = self.streams.get_mut(&stream) {
            l.sessions.remove(&draft_id);
        }
    }

    /// Marks a node down: its sessions move away (see [`Core::evacuate`]).
    fn node_down(&mut self, node: &str, reason: &str, out: &mut Out) {
        if self.registry.mark_down(node) {
            tracing::warn!(
                node,
                reason,
                "verify node marked down; its sessions will resync"
            );
        }
        self.evacuate(node, out);
    }

    /// Moves everything off a node that is down or quarantined: its sessions become unplaced
    /// (re-placed at their next block, which must carry history), and its queued blocks and
    /// those of its batches still in flight are answered with RESYNC_NEEDED. A batch given up
    /// here is forgotten: should the node answer it after all, the answer is dropped, so no
    /// verdict reaches a draft node twice.
    fn evacuate(&mut self, node: &str, out: &mut Out) {
        let stranded: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, b)| b.node == node)
            .map(|(id, _)| *id)
            .collect();
        for id in stranded {
            let b = self.inflight.remove(&id).expect("listed");
            if let Some(q) = self.queues.get_mut(node) {
                q.finish(b.tokens);
            }
            for item in b.items {
                self.answer_resync(item, "verify node lost; resend the block with history", out);
            }
        }
        let affected: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.node.as_deref() == Some(node))
            .map(|(g, _)| *g)
            .collect();
        for g in affected {
            self.assign(g, None);
        }
        let pending = self
            .queues
            .get_mut(node)
            .map(|q| q.drain_pending())
            .unwrap_or_default();
        for item in pending {
            self.answer_resync(item, "verify node lost; resend the block with history", out);
        }
    }

    fn answer_resync(&mut self, item: Item, why: &str, out: &mut Out) {
        let Some(s) = self.sessions.get_mut(&item.global) else {
            return;
        };
        s.busy = false;
        s.synced = false;
        let (stream, draft_id) = (s.stream, s.draft_id);
        self.session_error(
            out,
            stream,
            (draft_id, item.block.round),
            ErrorCode::ResyncNeeded,
            why,
        );
    }

    /// Periodic work: heartbeat expiry, stalled nodes, forgetting long-down nodes, link
    /// probes, gauges.
    pub fn tick(&mut self, now: Instant, out: &mut Out) {
        let r = &self.settings.registry;
        let (timeout, stall, forget) = (
            r.heartbeat_interval * r.missed_heartbeats,
            r.stall_timeout,
            r.forget_after,
        );
        for node in self.registry.expire(now, timeout) {
            self.node_down(&node, "missed heartbeats", out);
        }
        let inflight = &self.inflight;
        let oldest = |node: &str| {
            inflight
                .values()
                .filter(|b| b.node == node)
                .map(|b| b.sent_at)
                .min()
        };
        for node in self.registry.quarantine_stalled(now, stall, oldest) {
            tracing::warn!(
                node = %node, stall_timeout = ?stall,
                "verify node has work but makes no progress: quarantined; its sessions will resync"
            );
            self.evacuate(&node, out);
        }
        for node in self.registry.forget(now, forget) {
            tracing::info!(node = %node, "verify node down for long: forgotten");
            self.queues.remove(&node);
            self.node_sessions.remove(&node);
        }
        self.send_probes(now, out);
        self.update_gauges();
    }

    /// The earliest instant a queued batch becomes due.
    pub fn next_deadline(&self) -> Option<Instant> {
        let p = self.batch_policy();
        self.queues.values().filter_map(|q| q.deadline(&p)).min()
    }
}

#[cfg(test)]
mod capacity_tests;
#[cfg(test)]
mod method_tests;
#[cfg(test)]
mod tests;

impl Core {
    /// Batches in flight.
    pub fn inflight_batches(&self) -> usize {
        self.inflight.len()
    }

    /// Address of the node an in-flight batch went to.
    pub fn inflight_addr(&self, batch_id: u64) -> Option<String> {
        let b = self.inflight.get(&batch_id)?;
        self.registry.get(&b.node).map(|v| v.addr.clone())
    }

    /// From now on, queued blocks leave at once (shutdown finishes in-flight work quickly).
    pub fn begin_shutdown(&mut self) {
        self.policy.batch_window = Duration::ZERO;
    }
}
