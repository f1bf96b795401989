//! Validated domain types and their conversions to and from the wire.
//!
//! Incoming messages go through `TryFrom<pb::…>`; outgoing ones through `From<domain> for pb::…`.
//! Checks here are the ones that need no node state (lengths, ranges, distributions, enums);
//! vocabulary and session checks happen where that state lives.

use crate::{pb, ProtocolError};
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

/// One session's round: what the verify side needs to produce a verdict. Shared by the draft
/// stream (`DraftBlock`) and the verify batch (`VerifyItem`).
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    /// Session id (draft-node scoped on the draft stream, coordinator-assigned toward verifiers).
    pub session_id: u64,
    /// Round number.
    pub round: u64,
    /// Committed tokens the draft extends (≥ 1).
    pub committed_len: usize,
    /// Full committed history on open/resync (`len == committed_len`).
    pub history: Option<Vec<u32>>,
    /// γ draft tokens.
    pub draft_tokens: Vec<u32>,
    /// One q per draft token when sampling; empty when greedy.
    pub draft_probs: Vec<SparseDist>,
    /// Sampling parameters.
    pub sampling: SamplingParams,
}

/// The raw fields shared by `pb::DraftBlock` and `pb::VerifyItem`.
struct RawBlock {
    session_id: u64,
    round: u64,
    committed_len: u32,
    history: Vec<u32>,
    draft_tokens: Vec<u32>,
    draft_probs: Vec<pb::SparseDist>,
    sampling: Option<pb::SamplingParams>,
}

impl TryFrom<RawBlock> for Block {
    type Error = ProtocolError;
    fn try_from(m: RawBlock) -> Result<Self, ProtocolError> {
        let committed_len = m.committed_len as usize;
        if committed_len == 0 {
            return Err(ProtocolError::Range {
                field: "committed_len",
                value: "0".into(),
                allowed: ">= 1 (a session starts from a non-empty prompt)",
            });
        }
        if !m.history.is_empty() && m.history.len() != committed_len {
            return Err(ProtocolError::Length {
                field: "history",
                got: m.history.len(),
                expected: committed_len,
            });
        }
        let sampling = sampling_from_pb(m.sampling)?;
        let expected_q = if sampling.is_greedy() {
            0
        } else {
            m.draft_tokens.len()
        };
        if m.draft_probs.len() != expected_q {
            return Err(ProtocolError::Length {
                field: "draft_probs",
                got: m.draft_probs.len(),
                expected: expected_q,
            });
        }
        let draft_probs = m
            .draft_probs
            .into_iter()
            .enumerate()
            .map(|(i, d)| sparse_from_pb(i, d))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, (t, q)) in m.draft_tokens.iter().zip(&draft_probs).enumerate() {
            if q.prob(*t) <= 0.0 {
                return Err(ProtocolError::BadDistribution {
                    position: i,
                    reason: format!("draft token {t} is not in its own distribution's support"),
                });
            }
        }
        Ok(Self {
            session_id: m.session_id,
            round: m.round,
            committed_len,
            history: (!m.history.is_empty()).then_some(m.history),
            draft_tokens: m.draft_tokens,
            draft_probs,
            sampling,
        })
    }
}

impl TryFrom<pb::VerifyItem> for Block {
    type Error = ProtocolError;
    fn try_from(m: pb::VerifyItem) -> Result<Self, ProtocolError> {
        Block::try_from(RawBlock {
            session_id: m.session_id,
            round: m.round,
            committed_len: m.committed_len,
            history: m.history,
            draft_tokens: m.draft_tokens,
            draft_probs: m.draft_probs,
            sampling: m.sampling,
        })
    }
}

impl From<&Block> for pb::VerifyItem {
    fn from(b: &Block) -> Self {
        Self {
            session_id: b.session_id,
            round: b.round,
            committed_len: b.committed_len as u32,
            history: b.history.clone().unwrap_or_default(),
            draft_tokens: b.draft_tokens.clone(),
            draft_probs: b.draft_probs.iter().map(sparse_to_pb).collect(),
            sampling: Some(sampling_to_pb(&b.sampling)),
        }
    }
}

/// A draft node's block with its link and cost telemetry.
#[derive(Debug, Clone, PartialEq)]
pub struct DraftBlock {
    /// The round itself.
    pub block: Block,
    /// Remaining token budget of the request.
    pub max_new_tokens: u32,
    /// Draft node wall clock at send (unix ns).
    pub client_send_unix_ns: u64,
    /// Draft cost per token in seconds (0 if unknown).
    pub draft_s_per_token: f32,
    /// Previous round's send→verdict time on the draft node (ns; 0 if none).
    pub last_round_trip_ns: u64,
    /// Drafted during the previous round (pipelining) and kept.
    pub drafted_ahead: bool,
}

impl TryFrom<pb::DraftBlock> for DraftBlock {
    type Error = ProtocolError;
    fn try_from(m: pb::DraftBlock) -> Result<Self, ProtocolError> {
        if !m.draft_s_per_token.is_finite() || m.draft_s_per_token < 0.0 {
            return Err(ProtocolError::Range {
                field: "draft_s_per_token",
                value: m.draft_s_per_token.to_string(),
                allowed: "a finite number >= 0",
            });
        }
        Ok(Self {
            block: Block::try_from(RawBlock {
                session_id: m.session_id,
                round: m.round,
                committed_len: m.committed_len,
                history: m.history,
                draft_tokens: m.draft_tokens,
                draft_probs: m.draft_probs,
                sampling: m.sampling,
            })?,
            max_new_tokens: m.max_new_tokens,
            client_send_unix_ns: m.client_send_unix_ns,
            draft_s_per_token: m.draft_s_per_token,
            last_round_trip_ns: m.last_round_trip_ns,
            drafted_ahead: m.drafted_ahead,
        })
    }
}

impl From<&DraftBlock> for pb::DraftBlock {
    fn from(d: &DraftBlock) -> Self {
        let b = &d.block;
        Self {
            session_id: b.session_id,
            round: b.round,
            committed_len: b.committed_len as u32,
            history: b.history.clone().unwrap_or_default(),
            draft_tokens: b.draft_tokens.clone(),
            draft_probs: b.draft_probs.iter().map(sparse_to_pb).collect(),
            sampling: Some(sampling_to_pb(&b.sampling)),
            max_new_tokens: d.max_new_tokens,
            client_send_unix_ns: d.client_send_unix_ns,
            draft_s_per_token: d.draft_s_per_token,
            last_round_trip_ns: d.last_round_trip_ns,
            drafted_ahead: d.drafted_ahead,
        }
    }
}

/// The verify side's answer for one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Accepted draft tokens (0..=γ).
    pub accepted: usize,
    /// Correction or bonus token.
    pub next_token: u32,
    /// Committed length after the round.
    pub committed_len: usize,
}

impl Outcome {
    /// Checks the outcome against the block it answers.
    pub fn check_against(&self, block: &Block) -> Result<(), ProtocolError> {
        if self.accepted > block.draft_tokens.len() {
            return Err(ProtocolError::Range {
                field: "accepted",
                value: self.accepted.to_string(),
                allowed: "<= number of draft tokens",
            });
        }
        let expected = block.committed_len + self.accepted + 1;
        if self.committed_len != expected {
            return Err(ProtocolError::Length {
                field: "committed_len",
                got: self.committed_len,
                expected,
            });
        }
        Ok(())
    }
}

impl From<pb::VerifyOutcome> for Outcome {
    fn from(m: pb::VerifyOutcome) -> Self {
        Self {
            accepted: m.accepted as usize,
            next_token: m.next_token,
            committed_len: m.committed_len as usize,
        }
    }
}

impl From<Outcome> for pb::VerifyOutcome {
    fn from(o: Outcome) -> Self {
        Self {
            accepted: o.accepted as u32,
            next_token: o.next_token,
            committed_len: o.committed_len as u32,
        }
    }
}

/// Validates a whole verify batch: non-empty, each session at most once.
pub fn batch_from_pb(m: pb::VerifyBatchRequest) -> Result<Vec<Block>, ProtocolError> {
    if m.items.is_empty() {
        return Err(ProtocolError::Empty("VerifyBatchRequest has no items"));
    }
    let blocks = m
        .items
        .into_iter()
        .map(Block::try_from)
        .collect::<Result<Vec<_>, _>>()?;
    let mut ids: Vec<u64> = blocks.iter().map(|b| b.session_id).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(ProtocolError::Range {
            field: "items.session_id",
            value: w[0].to_string(),
            allowed: "each session at most once per batch",
        });
    }
    Ok(blocks)
}

/// What a draft node sends, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum DraftMessage {
    /// Stream opening.
    Hello(pb::DraftHello),
    /// A round.
    Block(DraftBlock),
    /// Session finished.
    Close {
        /// The session.
        session_id: u64,
    },
    /// Probe answer.
    ProbeReply(pb::ProbeReply),
}

impl TryFrom<pb::DraftMessage> for DraftMessage {
    type Error = ProtocolError;
    fn try_from(m: pb::DraftMessage) -> Result<Self, ProtocolError> {
        use pb::draft_message::Kind;
        match m
            .kind
            .ok_or(ProtocolError::Empty("DraftMessage has no kind"))?
        {
            Kind::Hello(h) => {
                if h.fingerprint.is_empty() {
                    return Err(ProtocolError::Missing("hello.fingerprint"));
                }
                Ok(Self::Hello(h))
            }
            Kind::Block(b) => Ok(Self::Block(DraftBlock::try_from(b)?)),
            Kind::Close(c) => Ok(Self::Close {
                session_id: c.session_id,
            }),
            Kind::ProbeReply(p) => Ok(Self::ProbeReply(p)),
        }
    }
}

impl From<DraftMessage> for pb::DraftMessage {
    fn from(m: DraftMessage) -> Self {
        use pb::draft_message::Kind;
        let kind = match m {
            DraftMessage::Hello(h) => Kind::Hello(h),
            DraftMessage::Block(b) => Kind::Block(pb::DraftBlock::from(&b)),
            DraftMessage::Close { session_id } => Kind::Close(pb::SessionClose { session_id }),
            DraftMessage::ProbeReply(p) => Kind::ProbeReply(p),
        };
        Self { kind: Some(kind) }
    }
}

/// What the coordinator sends, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum CoordinatorMessage {
    /// Answer to hello.
    Welcome(pb::Welcome),
    /// A verdict.
    Verdict(pb::Verdict),
    /// A per-session error.
    Error(SessionError),
    /// A link probe.
    Probe(pb::Probe),
}

impl TryFrom<pb::CoordinatorMessage> for CoordinatorMessage {
    type Error = ProtocolError;
    fn try_from(m: pb::CoordinatorMessage) -> Result<Self, ProtocolError> {
        use pb::coordinator_message::Kind;
        match m
            .kind
            .ok_or(ProtocolError::Empty("CoordinatorMessage has no kind"))?
        {
            Kind::Welcome(w) => Ok(Self::Welcome(w)),
            Kind::Verdict(v) => Ok(Self::Verdict(v)),
            Kind::Error(e) => Ok(Self::Error(SessionError::try_from(e)?)),
            Kind::Probe(p) => Ok(Self::Probe(p)),
        }
    }
}

impl From<CoordinatorMessage> for pb::CoordinatorMessage {
    fn from(m: CoordinatorMessage) -> Self {
        use pb::coordinator_message::Kind;
        let kind = match m {
            CoordinatorMessage::Welcome(w) => Kind::Welcome(w),
            CoordinatorMessage::Verdict(v) => Kind::Verdict(v),
            CoordinatorMessage::Error(e) => Kind::Error(e.into()),
            CoordinatorMessage::Probe(p) => Kind::Probe(p),
        };
        Self { kind: Some(kind) }
    }
}
