//! A session's round: the block the draft side sends and the outcome the verify side returns.

use super::{sampling_from_pb, sampling_to_pb, sparse_from_pb, sparse_to_pb};
use crate::{pb, ProtocolError};
use edgespec_specdec::{DraftMethod, SamplingParams, SparseDist};

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

impl Block {
    /// Rows the verify forward runs for this block: the whole history on an open or resync (the
    /// KV is rebuilt), else the last committed token, plus every draft token. The coordinator's
    /// batching budget and the verify node's batcher both count with this.
    pub fn forward_tokens(&self) -> usize {
        self.history.as_ref().map_or(1, Vec::len) + self.draft_tokens.len()
    }
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
        if m.draft_tokens.len() > edgespec_specdec::MAX_GAMMA {
            return Err(ProtocolError::Range {
                field: "draft_tokens",
                value: format!("{} tokens", m.draft_tokens.len()),
                allowed: "at most 64 (the protocol's ceiling on γ)",
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
    /// How the session drafts; `draft_s_per_token` is this method's cost.
    pub method: DraftMethod,
    /// The node's draft model alone, seconds per token (0 if it has none or has not measured).
    pub model_s_per_token: f32,
    /// Hybrid blocks: bit i set when draft token i came from the draft model (0 otherwise).
    pub model_token_mask: u64,
}

impl TryFrom<pb::DraftBlock> for DraftBlock {
    type Error = ProtocolError;
    fn try_from(m: pb::DraftBlock) -> Result<Self, ProtocolError> {
        for (field, v) in [
            ("draft_s_per_token", m.draft_s_per_token),
            ("model_s_per_token", m.model_s_per_token),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(ProtocolError::Range {
                    field,
                    value: v.to_string(),
                    allowed: "a finite number >= 0",
                });
            }
        }
        let n = m.draft_tokens.len();
        let beyond = if n >= 64 { 0 } else { m.model_token_mask >> n };
        if beyond != 0 {
            return Err(ProtocolError::Range {
                field: "model_token_mask",
                value: format!("{:#x} with {n} draft tokens", m.model_token_mask),
                allowed: "bits only below the number of draft tokens",
            });
        }
        let method = super::stream::method_from_wire(m.method);
        if m.model_token_mask != 0 && method != DraftMethod::Hybrid {
            return Err(ProtocolError::Range {
                field: "model_token_mask",
                value: format!("{:#x} on a {method} block", m.model_token_mask),
                allowed: "0 unless the block's method is hybrid",
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
            method,
            model_s_per_token: m.model_s_per_token,
            model_token_mask: m.model_token_mask,
        })
    }
}

impl From<&DraftBlock> for pb::DraftBlock {
    fn from(d: &DraftBlock) -> Self {
        // The round's fields are a verify item's.
        let b = pb::VerifyItem::from(&d.block);
        Self {
            session_id: b.session_id,
            round: b.round,
            committed_len: b.committed_len,
            history: b.history,
            draft_tokens: b.draft_tokens,
            draft_probs: b.draft_probs,
            sampling: b.sampling,
            max_new_tokens: d.max_new_tokens,
            client_send_unix_ns: d.client_send_unix_ns,
            draft_s_per_token: d.draft_s_per_token,
            last_round_trip_ns: d.last_round_trip_ns,
            drafted_ahead: d.drafted_ahead,
            method: super::stream::method_to_wire(d.method),
            model_s_per_token: d.model_s_per_token,
            model_token_mask: d.model_token_mask,
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
