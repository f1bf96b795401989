//! Validated domain types and their conversions to and from the wire.
//!
//! Incoming messages go through `TryFrom<pb::…>`; outgoing ones through `From<domain> for pb::…`.
//! Checks here are the ones that need no node state (lengths, ranges, distributions, enums);
//! vocabulary and session checks happen where that state lives. Every message a node reads has a
//! type here; the nodes convert at their gRPC edges only, so their cores never see prost types.
//!
//! - this module: error codes, per-session errors, sampling parameters and draft distributions;
//! - [`block`]: a session's round ([`Block`], [`DraftBlock`]) and its answer ([`Outcome`]);
//! - [`stream`]: the draft stream (hello, welcome, verdicts, probes);
//! - [`verifier`]: verify batches, results, loads and registrations.

mod block;
mod stream;
mod verifier;

pub use block::{Block, DraftBlock, Outcome};
pub use stream::{
    method_from_wire, method_to_wire, CoordinatorMessage, DraftMessage, Hello, Probe, ProbeReply,
    Verdict, Welcome,
};
pub use verifier::{
    BatchReply, Heartbeat, HeartbeatAck, ItemResult, Load, NodeInfo, Pool, Registration, Release,
    Timings, VerifyBatch, MAX_COORDINATOR_ID_LEN,
};

use crate::{pb, ProtocolError};
pub use edgespec_specdec::DraftMethod;
use edgespec_specdec::{SamplingParams, SparseDist};

/// Tolerance on the sum of a draft distribution (f32 renormalisation error on ~100 entries).
pub const PROB_SUM_TOLERANCE: f32 = 1e-3;

/// Most entries a draft distribution may carry on the wire (the draft node's `drafting.top_k`
/// is bounded by it). A larger q is refused before any work: it costs the coordinator and the
/// verify node memory and time, and buys no acceptance a top-K truncation does not.
pub const MAX_DIST_SUPPORT: usize = 256;

/// Per-session error cause (mirror of `pb::ErrorCode` without the unspecified value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Verify-side state is gone: resend the block with full history.
    ResyncNeeded,
    /// Malformed or inconsistent request.
    InvalidArgument,
    /// Admission control refused the block.
    Overloaded,
    /// No suitable verify node right now.
    Unavailable,
    /// Draft and verify models differ.
    ModelMismatch,
    /// The context window would be exceeded.
    ContextOverflow,
    /// Unexpected server-side failure.
    Internal,
}

impl ErrorCode {
    /// Metric label (`code="…"`), the same on every node.
    pub fn label(self) -> &'static str {
        match self {
            ErrorCode::ResyncNeeded => "resync_needed",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::ModelMismatch => "model_mismatch",
            ErrorCode::ContextOverflow => "context_overflow",
            ErrorCode::Internal => "internal",
        }
    }
}

impl TryFrom<i32> for ErrorCode {
    type Error = ProtocolError;
    fn try_from(v: i32) -> Result<Self, ProtocolError> {
        use pb::ErrorCode as P;
        match P::try_from(v) {
            Ok(P::ResyncNeeded) => Ok(Self::ResyncNeeded),
            Ok(P::InvalidArgument) => Ok(Self::InvalidArgument),
            Ok(P::Overloaded) => Ok(Self::Overloaded),
            Ok(P::Unavailable) => Ok(Self::Unavailable),
            Ok(P::ModelMismatch) => Ok(Self::ModelMismatch),
            Ok(P::ContextOverflow) => Ok(Self::ContextOverflow),
            Ok(P::Internal) | Ok(P::Unspecified) => Ok(Self::Internal),
            Err(_) => Err(ProtocolError::UnknownEnum {
                field: "code",
                value: v,
            }),
        }
    }
}

impl From<ErrorCode> for pb::ErrorCode {
    fn from(c: ErrorCode) -> Self {
        match c {
            ErrorCode::ResyncNeeded => Self::ResyncNeeded,
            ErrorCode::InvalidArgument => Self::InvalidArgument,
            ErrorCode::Overloaded => Self::Overloaded,
            ErrorCode::Unavailable => Self::Unavailable,
            ErrorCode::ModelMismatch => Self::ModelMismatch,
            ErrorCode::ContextOverflow => Self::ContextOverflow,
            ErrorCode::Internal => Self::Internal,
        }
    }
}

/// A per-session error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionError {
    /// The session.
    pub session_id: u64,
    /// Round of the failed block (0 if none).
    pub round: u64,
    /// Cause.
    pub code: ErrorCode,
    /// What was wrong (no prompt text).
    pub message: String,
}

impl TryFrom<pb::SessionError> for SessionError {
    type Error = ProtocolError;
    fn try_from(m: pb::SessionError) -> Result<Self, ProtocolError> {
        Ok(Self {
            session_id: m.session_id,
            round: m.round,
            code: ErrorCode::try_from(m.code)?,
            message: m.message,
        })
    }
}

impl From<SessionError> for pb::SessionError {
    fn from(e: SessionError) -> Self {
        Self {
            session_id: e.session_id,
            round: e.round,
            code: pb::ErrorCode::from(e.code) as i32,
            message: e.message,
        }
    }
}

/// Validates wire sampling parameters (top_p 0 means "off", like 1).
pub fn sampling_from_pb(m: Option<pb::SamplingParams>) -> Result<SamplingParams, ProtocolError> {
    let m = m.ok_or(ProtocolError::Missing("sampling"))?;
    if !m.temperature.is_finite() || m.temperature < 0.0 {
        return Err(ProtocolError::Range {
            field: "sampling.temperature",
            value: m.temperature.to_string(),
            allowed: "a finite number >= 0",
        });
    }
    if !(0.0..=1.0).contains(&m.top_p) {
        return Err(ProtocolError::Range {
            field: "sampling.top_p",
            value: m.top_p.to_string(),
            allowed: "0 <= top_p <= 1",
        });
    }
    Ok(SamplingParams {
        temperature: m.temperature,
        top_k: m.top_k,
        top_p: if m.top_p == 0.0 { 1.0 } else { m.top_p },
        seed: m.seed,
    })
}

/// Wire form of sampling parameters.
pub fn sampling_to_pb(p: &SamplingParams) -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        seed: p.seed,
    }
}

/// Validates one wire distribution (vocabulary bounds are checked by the verify node).
pub fn sparse_from_pb(position: usize, m: pb::SparseDist) -> Result<SparseDist, ProtocolError> {
    let bad = |reason: String| ProtocolError::BadDistribution { position, reason };
    if m.ids.len() != m.probs.len() {
        return Err(bad(format!(
            "{} ids but {} probs",
            m.ids.len(),
            m.probs.len()
        )));
    }
    if m.ids.is_empty() {
        return Err(bad("empty support".into()));
    }
    if m.ids.len() > MAX_DIST_SUPPORT {
        return Err(bad(format!(
            "{} entries; at most {MAX_DIST_SUPPORT} are accepted",
            m.ids.len()
        )));
    }
    if let Some(p) = m.probs.iter().find(|p| !(**p > 0.0 && **p <= 1.0)) {
        return Err(bad(format!("probability {p} outside (0, 1]")));
    }
    let sum: f32 = m.probs.iter().sum();
    if (sum - 1.0).abs() > PROB_SUM_TOLERANCE {
        return Err(bad(format!("probabilities sum to {sum}, not 1")));
    }
    let mut ids = m.ids.clone();
    ids.sort_unstable();
    if ids.windows(2).any(|w| w[0] == w[1]) {
        return Err(bad("duplicate token id".into()));
    }
    Ok(SparseDist {
        ids: m.ids,
        probs: m.probs,
    })
}

/// Wire form of a distribution.
pub fn sparse_to_pb(d: &SparseDist) -> pb::SparseDist {
    pb::SparseDist {
        ids: d.ids.clone(),
        probs: d.probs.clone(),
    }
}

/// Validates a whole verify batch, all or nothing: non-empty, each session at most once, a
/// coordinator id, every block well-formed. (The verify node itself reads a [`VerifyBatch`],
/// which answers a malformed block per item instead.)
pub fn batch_from_pb(m: pb::VerifyBatchRequest) -> Result<Vec<Block>, ProtocolError> {
    VerifyBatch::try_from(m)?.into_blocks()
}
