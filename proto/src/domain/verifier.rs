//! Coordinator ↔ verify node: batches, their results, load reports, registrations and releases.

use super::{Block, ErrorCode, Outcome, SessionError};
use crate::{pb, ProtocolError};
use std::collections::HashSet;

/// Longest coordinator instance id accepted.
pub const MAX_COORDINATOR_ID_LEN: usize = 128;

fn coordinator_id(id: String) -> Result<String, ProtocolError> {
    if id.is_empty() {
        return Err(ProtocolError::Missing(
            "coordinator_id (it scopes the request's session ids)",
        ));
    }
    if id.len() > MAX_COORDINATOR_ID_LEN {
        return Err(ProtocolError::Range {
            field: "coordinator_id",
            value: format!("{} bytes", id.len()),
            allowed: "at most 128 bytes",
        });
    }
    Ok(id)
}

/// One `Verify` call: blocks of different sessions for one batched forward.
///
/// On the way in, a batch is refused whole when it is empty, names a session twice or has no
/// valid coordinator id; a block that is malformed on its own becomes that item's
/// `INVALID_ARGUMENT` (one bad session never fails the others).
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyBatch {
    /// Batch id, echoed in the reply.
    pub batch_id: u64,
    /// The sending coordinator's instance id.
    pub coordinator_id: String,
    /// Model fingerprint the coordinator expects.
    pub fingerprint: String,
    /// The blocks, in order; `Err` for an item that failed validation.
    pub items: Vec<Result<Block, SessionError>>,
}

impl VerifyBatch {
    /// The valid blocks, in order.
    pub fn blocks(&self) -> impl Iterator<Item = &Block> {
        self.items.iter().filter_map(|i| i.as_ref().ok())
    }

    /// Refuses the batch if any item is malformed (for peers that want all or nothing).
    pub fn into_blocks(self) -> Result<Vec<Block>, ProtocolError> {
        self.items
            .into_iter()
            .map(|i| {
                i.map_err(|e| ProtocolError::Item {
                    session_id: e.session_id,
                    message: e.message,
                })
            })
            .collect()
    }
}

impl TryFrom<pb::VerifyBatchRequest> for VerifyBatch {
    type Error = ProtocolError;
    fn try_from(m: pb::VerifyBatchRequest) -> Result<Self, ProtocolError> {
        if m.items.is_empty() {
            return Err(ProtocolError::Empty("VerifyBatchRequest has no items"));
        }
        let mut seen = HashSet::with_capacity(m.items.len());
        if let Some(item) = m.items.iter().find(|i| !seen.insert(i.session_id)) {
            return Err(ProtocolError::Range {
                field: "items.session_id",
                value: item.session_id.to_string(),
                allowed: "each session at most once per batch",
            });
        }
        let coordinator_id = coordinator_id(m.coordinator_id)?;
        let items = m
            .items
            .into_iter()
            .map(|item| {
                let (session_id, round) = (item.session_id, item.round);
                Block::try_from(item).map_err(|e| SessionError {
                    session_id,
                    round,
                    code: ErrorCode::InvalidArgument,
                    message: e.to_string(),
                })
            })
            .collect();
        Ok(Self {
            batch_id: m.batch_id,
            coordinator_id,
            fingerprint: m.fingerprint,
            items,
        })
    }
}

impl From<&VerifyBatch> for pb::VerifyBatchRequest {
    fn from(b: &VerifyBatch) -> Self {
        Self {
            batch_id: b.batch_id,
            coordinator_id: b.coordinator_id.clone(),
            fingerprint: b.fingerprint.clone(),
            items: b.blocks().map(pb::VerifyItem::from).collect(),
        }
    }
}

/// Where the time of one block went on the verify node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// Arrival to forward start.
    pub queue_ns: u64,
    /// Duration of the forward that served the item (0 if it never reached one).
    pub forward_ns: u64,
    /// Arrival to answer.
    pub total_ns: u64,
    /// Rows in that forward.
    pub batch_tokens: u32,
    /// Sessions in that forward.
    pub batch_sessions: u32,
}

impl From<pb::VerifyTimings> for Timings {
    fn from(t: pb::VerifyTimings) -> Self {
        Self {
            queue_ns: t.queue_ns,
            forward_ns: t.forward_ns,
            total_ns: t.total_ns,
            batch_tokens: t.batch_tokens,
            batch_sessions: t.batch_sessions,
        }
    }
}

impl From<Timings> for pb::VerifyTimings {
    fn from(t: Timings) -> Self {
        Self {
            queue_ns: t.queue_ns,
            forward_ns: t.forward_ns,
            total_ns: t.total_ns,
            batch_tokens: t.batch_tokens,
            batch_sessions: t.batch_sessions,
        }
    }
}

/// The answer for one block of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemResult {
    /// Session (as the batch named it).
    pub session_id: u64,
    /// Round answered.
    pub round: u64,
    /// The outcome, or why the block was not verified.
    pub result: Result<Outcome, SessionError>,
    /// Where the time went.
    pub timings: Timings,
}

impl TryFrom<pb::VerifyResult> for ItemResult {
    type Error = ProtocolError;
    fn try_from(r: pb::VerifyResult) -> Result<Self, ProtocolError> {
        use pb::verify_result::Result as R;
        let result = match r
            .result
            .ok_or(ProtocolError::Missing("VerifyResult.result"))?
        {
            R::Outcome(o) => Ok(Outcome::from(o)),
            R::Error(e) => Err(SessionError::try_from(e)?),
        };
        Ok(Self {
            session_id: r.session_id,
            round: r.round,
            result,
            timings: r.timings.map(Timings::from).unwrap_or_default(),
        })
    }
}

impl From<ItemResult> for pb::VerifyResult {
    fn from(r: ItemResult) -> Self {
        use pb::verify_result::Result as R;
        Self {
            session_id: r.session_id,
            round: r.round,
            result: Some(match r.result {
                Ok(o) => R::Outcome(o.into()),
                Err(e) => R::Error(e.into()),
            }),
            timings: Some(r.timings.into()),
        }
    }
}

/// The answer to a [`VerifyBatch`]: one result per item, in order, and the node's load.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchReply {
    /// Batch id.
    pub batch_id: u64,
    /// Per item; an unreadable result is `Err` with why (the coordinator resyncs that session).
    pub results: Vec<Result<ItemResult, ProtocolError>>,
    /// The node's load after the batch (`None` if absent or malformed).
    pub load: Option<Load>,
}

impl From<pb::VerifyBatchResponse> for BatchReply {
    fn from(m: pb::VerifyBatchResponse) -> Self {
        Self {
            batch_id: m.batch_id,
            results: m.results.into_iter().map(ItemResult::try_from).collect(),
            load: m.load.and_then(|l| Load::try_from(l).ok()),
        }
    }
}

impl From<BatchReply> for pb::VerifyBatchResponse {
    fn from(r: BatchReply) -> Self {
        Self {
            batch_id: r.batch_id,
            results: r
                .results
                .into_iter()
                .filter_map(Result::ok)
                .map(pb::VerifyResult::from)
                .collect(),
            load: r.load.map(pb::VerifierLoad::from),
        }
    }
}

/// A verify node's load report.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Load {
    /// Sessions with live KV state (all coordinators' together).
    pub active_sessions: u32,
    /// Bytes held by KV caches.
    pub kv_bytes: u64,
    /// The KV budget in bytes.
    pub kv_budget_bytes: u64,
    /// Tokens waiting for a forward.
    pub queued_tokens: u32,
    /// Fraction of recent wall time spent in forwards, in [0, 1].
    pub busy_fraction: f32,
    /// Fitted fixed cost of one forward, seconds (≥ 0).
    pub verify_base_s: f32,
    /// Fitted cost per token in a forward, seconds (≥ 0).
    pub verify_per_token_s: f32,
    /// When the node's model last completed work, Unix ms on the node's clock (0: never). Only
    /// its changes mean something to a coordinator (progress), not its value against another
    /// clock.
    pub last_progress_unix_ms: u64,
    /// Sessions active within the node's idle-eviction time (≤ `active_sessions`): the ones a
    /// new session may not displace.
    pub recent_sessions: u32,
}

impl TryFrom<pb::VerifierLoad> for Load {
    type Error = ProtocolError;
    fn try_from(l: pb::VerifierLoad) -> Result<Self, ProtocolError> {
        let non_negative = |field, v: f32| {
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(ProtocolError::Range {
                    field,
                    value: v.to_string(),
                    allowed: "a finite number >= 0",
                })
            }
        };
        if l.recent_sessions > l.active_sessions {
            return Err(ProtocolError::Range {
                field: "load.recent_sessions",
                value: l.recent_sessions.to_string(),
                allowed: "recent_sessions <= active_sessions",
            });
        }
        if !(0.0..=1.0).contains(&l.busy_fraction) {
            return Err(ProtocolError::Range {
                field: "load.busy_fraction",
                value: l.busy_fraction.to_string(),
                allowed: "0 <= busy_fraction <= 1",
            });
        }
        Ok(Self {
            active_sessions: l.active_sessions,
            kv_bytes: l.kv_bytes,
            kv_budget_bytes: l.kv_budget_bytes,
            queued_tokens: l.queued_tokens,
            busy_fraction: l.busy_fraction,
            verify_base_s: non_negative("load.verify_base_s", l.verify_base_s)?,
            verify_per_token_s: non_negative("load.verify_per_token_s", l.verify_per_token_s)?,
            last_progress_unix_ms: l.last_progress_unix_ms,
            recent_sessions: l.recent_sessions,
        })
    }
}

impl From<Load> for pb::VerifierLoad {
    fn from(l: Load) -> Self {
        Self {
            active_sessions: l.active_sessions,
            kv_bytes: l.kv_bytes,
            kv_budget_bytes: l.kv_budget_bytes,
            queued_tokens: l.queued_tokens,
            busy_fraction: l.busy_fraction,
            verify_base_s: l.verify_base_s,
            verify_per_token_s: l.verify_per_token_s,
            last_progress_unix_ms: l.last_progress_unix_ms,
            recent_sessions: l.recent_sessions,
        }
    }
}

/// Placement pool of a verify node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pool {
    /// Hardware the operator owns: preferred.
    Onprem,
    /// Rented capacity: used for bursts.
    Cloud,
}

impl Pool {
    /// Wire, setting and label name.
    pub fn as_str(self) -> &'static str {
        match self {
            Pool::Onprem => "onprem",
            Pool::Cloud => "cloud",
        }
    }

    /// Parses a wire or setting name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "onprem" => Some(Pool::Onprem),
            "cloud" => Some(Pool::Cloud),
            _ => None,
        }
    }
}

impl std::fmt::Display for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a verify node says about itself (registration and `Info`).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    /// Stable node id (non-empty).
    pub node_id: String,
    /// Address coordinators dial (an `http://` or `https://` URL).
    pub advertise_addr: String,
    /// Placement pool.
    pub pool: Pool,
    /// Target model name.
    pub model_name: String,
    /// Tokenizer fingerprint (non-empty).
    pub fingerprint: String,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Context window.
    pub max_context: u32,
    /// Sessions it can hold (≥ 1).
    pub capacity_sessions: u32,
    /// Most tokens per block.
    pub max_block_tokens: u32,
    /// Most tokens per forward (0: unknown).
    pub max_batch_tokens: u32,
    /// Device description.
    pub device: String,
    /// Load at the time of the message.
    pub load: Load,
}

impl TryFrom<pb::NodeInfo> for NodeInfo {
    type Error = ProtocolError;
    fn try_from(i: pb::NodeInfo) -> Result<Self, ProtocolError> {
        if i.node_id.is_empty() {
            return Err(ProtocolError::Missing("node_id"));
        }
        if i.fingerprint.is_empty() {
            return Err(ProtocolError::Missing("fingerprint"));
        }
        if !i.advertise_addr.starts_with("http://") && !i.advertise_addr.starts_with("https://") {
            return Err(ProtocolError::Range {
                field: "advertise_addr",
                value: format!("{:?}", i.advertise_addr),
                allowed: "an http:// or https:// URL",
            });
        }
        let pool = Pool::parse(&i.pool).ok_or_else(|| ProtocolError::Range {
            field: "pool",
            value: format!("{:?}", i.pool),
            allowed: "\"onprem\" or \"cloud\"",
        })?;
        if i.capacity_sessions == 0 {
            return Err(ProtocolError::Range {
                field: "capacity_sessions",
                value: "0".into(),
                allowed: ">= 1",
            });
        }
        Ok(Self {
            node_id: i.node_id,
            advertise_addr: i.advertise_addr,
            pool,
            model_name: i.model_name,
            fingerprint: i.fingerprint,
            vocab_size: i.vocab_size,
            max_context: i.max_context,
            capacity_sessions: i.capacity_sessions,
            max_block_tokens: i.max_block_tokens,
            max_batch_tokens: i.max_batch_tokens,
            device: i.device,
            load: i.load.map(Load::try_from).transpose()?.unwrap_or_default(),
        })
    }
}

impl From<&NodeInfo> for pb::NodeInfo {
    fn from(i: &NodeInfo) -> Self {
        Self {
            node_id: i.node_id.clone(),
            advertise_addr: i.advertise_addr.clone(),
            pool: i.pool.as_str().into(),
            model_name: i.model_name.clone(),
            fingerprint: i.fingerprint.clone(),
            vocab_size: i.vocab_size,
            max_context: i.max_context,
            capacity_sessions: i.capacity_sessions,
            max_block_tokens: i.max_block_tokens,
            max_batch_tokens: i.max_batch_tokens,
            device: i.device.clone(),
            load: Some(i.load.into()),
        }
    }
}

/// A verify node's heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct Heartbeat {
    /// The node.
    pub node_id: String,
    /// Its load, when it sent a valid one.
    pub load: Option<Load>,
    /// It is stopping and asks to be drained.
    pub draining: bool,
}

impl TryFrom<pb::VerifierHeartbeatRequest> for Heartbeat {
    type Error = ProtocolError;
    fn try_from(h: pb::VerifierHeartbeatRequest) -> Result<Self, ProtocolError> {
        if h.node_id.is_empty() {
            return Err(ProtocolError::Missing("node_id"));
        }
        Ok(Self {
            node_id: h.node_id,
            load: h.load.map(Load::try_from).transpose()?,
            draining: h.draining,
        })
    }
}

impl From<&Heartbeat> for pb::VerifierHeartbeatRequest {
    fn from(h: &Heartbeat) -> Self {
        Self {
            node_id: h.node_id.clone(),
            load: h.load.map(pb::VerifierLoad::from),
            draining: h.draining,
        }
    }
}

/// A coordinator releases sessions it no longer needs on a verify node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// The coordinator's instance id.
    pub coordinator_id: String,
    /// Its session ids.
    pub session_ids: Vec<u64>,
}

impl TryFrom<pb::ReleaseRequest> for Release {
    type Error = ProtocolError;
    fn try_from(r: pb::ReleaseRequest) -> Result<Self, ProtocolError> {
        Ok(Self {
            coordinator_id: coordinator_id(r.coordinator_id)?,
            session_ids: r.session_ids,
        })
    }
}

impl From<&Release> for pb::ReleaseRequest {
    fn from(r: &Release) -> Self {
        Self {
            coordinator_id: r.coordinator_id.clone(),
            session_ids: r.session_ids.clone(),
        }
    }
}

/// A coordinator's answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The coordinator's instance id.
    pub coordinator_id: String,
    /// How often the node must heartbeat.
    pub heartbeat_interval: std::time::Duration,
}

impl From<pb::RegisterVerifierResponse> for Registration {
    fn from(r: pb::RegisterVerifierResponse) -> Self {
        Self {
            coordinator_id: r.coordinator_id,
            heartbeat_interval: std::time::Duration::from_millis(u64::from(
                r.heartbeat_interval_ms,
            )),
        }
    }
}

impl From<Registration> for pb::RegisterVerifierResponse {
    fn from(r: Registration) -> Self {
        Self {
            coordinator_id: r.coordinator_id,
            heartbeat_interval_ms: u32::try_from(r.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
        }
    }
}

/// A coordinator's answer to a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatAck {
    /// False: the node must register again.
    pub known: bool,
    /// Drained or cordoned.
    pub cordoned: bool,
}

impl From<pb::VerifierHeartbeatResponse> for HeartbeatAck {
    fn from(r: pb::VerifierHeartbeatResponse) -> Self {
        Self {
            known: r.known,
            cordoned: r.cordoned,
        }
    }
}

impl From<HeartbeatAck> for pb::VerifierHeartbeatResponse {
    fn from(a: HeartbeatAck) -> Self {
        Self {
            known: a.known,
            cordoned: a.cordoned,
        }
    }
}
