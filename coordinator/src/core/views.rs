//! Read-only views of the state for the admin API, and the gauges derived from it.

use super::{Core, DraftLink, MethodStats, StreamId};
use crate::registry::{AdminState, Health, Pool};
use edgespec_specdec::DraftMethod;
use serde::Serialize;

/// A verify node in `GET /admin/v1/nodes`.
#[derive(Debug, Clone, Serialize)]
pub struct VerifierView {
    /// Node id.
    pub id: String,
    /// Address.
    pub addr: String,
    /// Pool (`onprem` or `cloud`).
    pub pool: &'static str,
    /// Up / down.
    pub health: Health,
    /// Active / cordoned / draining.
    pub admin: AdminState,
    /// Device.
    pub device: String,
    /// Session capacity.
    pub capacity: usize,
    /// Sessions placed by this coordinator.
    pub sessions: usize,
    /// Tokens waiting in the coordinator's queue for the node.
    pub queued_tokens: usize,
    /// Tokens in flight.
    pub inflight_tokens: usize,
    /// Batches in flight.
    pub inflight_batches: usize,
    /// Predicted wait of a new block, ms.
    pub predicted_queue_delay_ms: f64,
    /// Fitted cost per forward, ms.
    pub verify_base_ms: f64,
    /// Fitted cost per token, ms.
    pub verify_per_token_ms: f64,
    /// Node-reported busy fraction.
    pub busy_fraction: f32,
    /// Node-reported active sessions.
    pub reported_sessions: u32,
    /// Node-reported sessions active within its idle-eviction time, every coordinator's
    /// together (what placement counts against the capacity).
    pub reported_recent_sessions: u32,
    /// Node-reported KV bytes held.
    pub reported_kv_bytes: u64,
    /// Node-reported KV budget, bytes.
    pub reported_kv_budget_bytes: u64,
    /// Seconds since the node last showed progress (an answered batch or a changed progress
    /// time), on this coordinator's clock.
    pub progress_s_ago: f64,
    /// Seconds since the last heartbeat.
    pub last_seen_s_ago: f64,
}

/// A draft node in `GET /admin/v1/nodes`.
#[derive(Debug, Clone, Serialize)]
pub struct DraftView {
    /// Stream id.
    pub stream: u64,
    /// Node id.
    pub node_id: String,
    /// Draft model.
    pub model_name: String,
    /// Open sessions.
    pub sessions: usize,
    /// Link RTT estimate, ms.
    pub rtt_ms: f64,
    /// Link bandwidth estimate.
    pub bandwidth_bytes_per_s: f64,
    /// Its default drafting method (`model`, `lookup` or `hybrid`; a request may pick another).
    pub method: &'static str,
    /// Draft cost per token of its default method, ms (0 before a report).
    pub draft_ms_per_token: f64,
    /// Whether the node drafts ahead while a block is verified.
    pub pipelined: bool,
    /// Mean α of its sessions.
    pub acceptance: Option<f64>,
    /// Its sessions by drafting method: the default method and every method it has drafted
    /// with or reported a cost for, in label order.
    pub methods: Vec<DraftMethodView>,
}

/// One drafting method of a draft node in `GET /admin/v1/nodes`.
#[derive(Debug, Clone, Serialize)]
pub struct DraftMethodView {
    /// `model`, `lookup` or `hybrid`.
    pub method: &'static str,
    /// Open sessions drafting with it.
    pub sessions: usize,
    /// Its reported draft cost per token, ms (0 before a report).
    pub draft_ms_per_token: f64,
    /// Draft cost per token the γ controller plans with, ms (the report, or the method's
    /// default before one).
    pub planned_draft_ms_per_token: f64,
    /// Verified rounds of its sessions on this stream.
    pub rounds: u64,
    /// Draft tokens of those rounds.
    pub drafted_tokens: u64,
    /// Accepted tokens of those rounds.
    pub accepted_tokens: u64,
    /// accepted / drafted tokens (none before a drafted token).
    pub acceptance: Option<f64>,
    /// Mean γ sent back to its sessions (none before a round).
    pub mean_gamma: Option<f64>,
}

/// `GET /admin/v1/nodes`.
#[derive(Debug, Clone, Serialize)]
pub struct NodesView {
    /// Coordinator instance id.
    pub coordinator_id: String,
    /// Fleet model fingerprint.
    pub fleet_fingerprint: String,
    /// Verify nodes.
    pub verifiers: Vec<VerifierView>,
    /// Draft nodes.
    pub drafts: Vec<DraftView>,
}

/// One session in `GET /admin/v1/sessions` (no text, no token ids).
#[derive(Debug, Clone, Serialize)]
pub struct SessionView {
    /// Coordinator session id.
    pub id: u64,
    /// Draft node id.
    pub draft_node: String,
    /// The draft node's session id.
    pub draft_session_id: u64,
    /// Verify node (none while unplaced).
    pub verifier: Option<String>,
    /// Drafting method (`model`, `lookup` or `hybrid`).
    pub method: &'static str,
    /// Current γ.
    pub gamma: u32,
    /// Current α estimate.
    pub alpha: f64,
    /// Hybrid sessions: the α of the tokens their draft model drafted (lookup's excluded),
    /// which decides whether the model fills in where lookup finds no match; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_alpha: Option<f64>,
    /// Hybrid sessions: the α of their looked-up tokens; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lookup_alpha: Option<f64>,
    /// Verified rounds.
    pub rounds: u64,
    /// Drafted tokens.
    pub drafted_tokens: u64,
    /// Accepted tokens.
    pub accepted_tokens: u64,
}

impl Core {
    /// Snapshot of all nodes.
    pub fn nodes_view(&self, now: std::time::Instant) -> NodesView {
        let verifiers = self
            .registry
            .iter()
            .map(|v| {
                let q = self.queues.get(&v.id);
                let cost = v.verify_cost();
                VerifierView {
                    id: v.id.clone(),
                    addr: v.addr.clone(),
                    pool: v.pool.as_str(),
                    health: v.health,
                    admin: v.admin,
                    device: v.device.clone(),
                    capacity: v.capacity,
                    sessions: self.node_sessions.get(&v.id).copied().unwrap_or(0),
                    queued_tokens: q.map_or(0, |q| q.pending_tokens()),
                    inflight_tokens: q.map_or(0, |q| q.inflight_tokens()),
                    inflight_batches: q.map_or(0, |q| q.inflight_batches()),
                    predicted_queue_delay_ms: self.predicted_delay(&v.id).as_secs_f64() * 1e3,
                    verify_base_ms: cost.base_s * 1e3,
                    verify_per_token_ms: cost.per_token_s * 1e3,
                    busy_fraction: v.reported.busy_fraction,
                    reported_sessions: v.reported.active_sessions,
                    reported_recent_sessions: v.reported.recent_sessions,
                    reported_kv_bytes: v.reported.kv_bytes,
                    reported_kv_budget_bytes: v.reported.kv_budget_bytes,
                    progress_s_ago: now.saturating_duration_since(v.progress_at).as_secs_f64(),
                    last_seen_s_ago: now.saturating_duration_since(v.last_seen).as_secs_f64(),
                }
            })
            .collect();
        let mut drafts: Vec<DraftView> = self
            .streams
            .iter()
            .map(|(id, l)| self.draft_view(*id, l))
            .collect();
        drafts.sort_by_key(|d| d.stream);
        NodesView {
            coordinator_id: self.id.clone(),
            fleet_fingerprint: self
                .registry
                .fleet_fingerprint()
                .unwrap_or_default()
                .to_string(),
            verifiers,
            drafts,
        }
    }

    fn draft_view(&self, id: StreamId, l: &DraftLink) -> DraftView {
        let (methods, alphas): (Vec<DraftMethod>, Vec<f64>) = l
            .sessions
            .iter()
            .filter_map(|d| self.by_key.get(&(id, *d)))
            .filter_map(|g| self.sessions.get(g))
            .map(|s| (s.g.method(), s.g.alpha()))
            .unzip();
        let side = &l.side;
        DraftView {
            stream: id,
            node_id: l.node_id.clone(),
            model_name: l.model_name.clone(),
            sessions: l.sessions.len(),
            rtt_ms: side.link().rtt_s() * 1e3,
            bandwidth_bytes_per_s: side.link().bandwidth_bytes_per_s(),
            method: side.method().label(),
            draft_ms_per_token: side.reported_draft_s_per_token(side.method()) * 1e3,
            pipelined: side.pipelined(),
            acceptance: (!alphas.is_empty())
                .then(|| alphas.iter().sum::<f64>() / alphas.len() as f64),
            methods: DraftMethod::ALL
                .into_iter()
                .map(|m| {
                    let open = methods.iter().filter(|x| **x == m).count();
                    (m, open, l.by_method[m.index()])
                })
                .filter(|(m, open, st)| {
                    *m == side.method()
                        || *open > 0
                        || st.rounds > 0
                        || side.reported_draft_s_per_token(*m) > 0.0
                })
                .map(|(m, open, st)| method_view(l, m, open, st))
                .collect(),
        }
    }

    /// Snapshot of all sessions, by id.
    pub fn sessions_view(&self) -> Vec<SessionView> {
        let mut v: Vec<SessionView> = self
            .sessions
            .iter()
            .map(|(g, s)| SessionView {
                id: *g,
                draft_node: self
                    .streams
                    .get(&s.stream)
                    .map(|l| l.node_id.clone())
                    .unwrap_or_default(),
                draft_session_id: s.draft_id,
                verifier: s.node.clone(),
                method: s.g.method().label(),
                gamma: s.gamma,
                alpha: s.g.alpha(),
                model_alpha: (s.g.method() == DraftMethod::Hybrid).then(|| s.g.model_alpha()),
                lookup_alpha: (s.g.method() == DraftMethod::Hybrid).then(|| s.g.lookup_alpha()),
                rounds: s.g.rounds(),
                drafted_tokens: s.drafted,
                accepted_tokens: s.accepted,
            })
            .collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// Desired cloud verify nodes: sessions beyond the on-prem pool's burst threshold, divided
    /// by what one cloud node holds at its target utilisation.
    pub fn cloud_demand(&self) -> u64 {
        let onprem_cap: f64 = self
            .registry
            .iter()
            .filter(|v| v.pool == Pool::Onprem && v.schedulable())
            .map(|v| v.capacity as f64)
            .sum();
        let excess =
            (self.sessions.len() as f64 - onprem_cap * self.policy.burst_utilization).max(0.0);
        let clouds: Vec<f64> = self
            .registry
            .iter()
            .filter(|v| v.pool == Pool::Cloud)
            .map(|v| v.capacity as f64)
            .collect();
        let per_node = if clouds.is_empty() {
            f64::from(self.settings.autoscale.cloud_node_capacity)
        } else {
            clouds.iter().sum::<f64>() / clouds.len() as f64
        };
        let per_node = (per_node * self.settings.autoscale.cloud_target_utilization).max(1.0);
        (excess / per_node).ceil() as u64
    }

    /// Refreshes the per-pool and autoscaling gauges.
    pub(super) fn update_gauges(&self) {
        use crate::metrics::PoolLabel;
        for l in self.streams.values() {
            let link = l.side.link();
            self.metrics
                .set_link(&l.node_id, link.rtt_s(), link.bandwidth_bytes_per_s());
        }
        for pool in [Pool::Onprem, Pool::Cloud] {
            let label = PoolLabel {
                pool: pool.as_str().into(),
            };
            let nodes: Vec<_> = self.registry.iter().filter(|v| v.pool == pool).collect();
            let up = nodes.iter().filter(|v| v.health == Health::Up).count();
            let cap: usize = nodes
                .iter()
                .filter(|v| v.schedulable())
                .map(|v| v.capacity)
                .sum();
            let sessions: usize = nodes
                .iter()
                .map(|v| self.node_sessions.get(&v.id).copied().unwrap_or(0))
                .sum();
            let tokens: usize = nodes
                .iter()
                .filter_map(|v| self.queues.get(&v.id))
                .map(|q| q.pending_tokens() + q.inflight_tokens())
                .sum();
            let m = &self.metrics;
            m.pool_verifiers_up.get_or_create(&label).set(up as i64);
            m.pool_capacity.get_or_create(&label).set(cap as i64);
            m.pool_sessions.get_or_create(&label).set(sessions as i64);
            m.pool_queued_tokens
                .get_or_create(&label)
                .set(tokens as i64);
        }
        self.metrics.cloud_demand.set(self.cloud_demand() as i64);
        if let Some(a) = self.fleet_alpha.get() {
            self.metrics.acceptance_rate.set(a);
        }
        for m in DraftMethod::ALL {
            if let Some(a) = self.method_alpha[m.index()].get() {
                self.metrics.set_method_acceptance(m, a);
            }
        }
    }
}

fn method_view(l: &DraftLink, m: DraftMethod, sessions: usize, st: MethodStats) -> DraftMethodView {
    DraftMethodView {
        method: m.label(),
        sessions,
        draft_ms_per_token: l.side.reported_draft_s_per_token(m) * 1e3,
        planned_draft_ms_per_token: l.side.t_draft_s(m) * 1e3,
        rounds: st.rounds,
        drafted_tokens: st.drafted,
        accepted_tokens: st.accepted,
        acceptance: (st.drafted > 0).then(|| st.accepted as f64 / st.drafted as f64),
        mean_gamma: (st.rounds > 0).then(|| st.gamma_sum as f64 / st.rounds as f64),
    }
}
