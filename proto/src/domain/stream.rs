//! The draft stream (`Coordinator.Drafts`): what a draft node sends ([`DraftMessage`]) and what
//! the coordinator answers ([`CoordinatorMessage`]).

use super::{DraftBlock, Outcome, SessionError, Timings};
use crate::{pb, ProtocolError};
use edgespec_specdec::{DraftMethod, MAX_GAMMA};

/// Longest node id, model name or fingerprint accepted in a hello.
pub const MAX_NAME_LEN: usize = 256;

/// A draft node introduces itself (first message of its stream).
#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    /// Stable node id.
    pub node_id: String,
    /// Draft model name (informational).
    pub model_name: String,
    /// Tokenizer fingerprint (non-empty).
    pub fingerprint: String,
    /// Draft vocabulary size.
    pub vocab_size: u32,
    /// Measured draft seconds per token (0: unknown).
    pub draft_s_per_token: f64,
    /// It drafts the next block while one is verified.
    pub pipelined: bool,
    /// Largest γ it drafts (1..=[`MAX_GAMMA`]; the wire's 0, "not stated", reads as
    /// [`MAX_GAMMA`]).
    pub max_gamma: u32,
    /// The node's default drafting method.
    pub method: DraftMethod,
}

fn name(field: &'static str, s: String) -> Result<String, ProtocolError> {
    if s.len() > MAX_NAME_LEN {
        return Err(ProtocolError::Range {
            field,
            value: format!("{} bytes", s.len()),
            allowed: "at most 256 bytes",
        });
    }
    Ok(s)
}

impl TryFrom<pb::DraftHello> for Hello {
    type Error = ProtocolError;
    fn try_from(h: pb::DraftHello) -> Result<Self, ProtocolError> {
        if h.fingerprint.is_empty() {
            return Err(ProtocolError::Missing("hello.fingerprint"));
        }
        let draft_s = f64::from(h.draft_s_per_token);
        Ok(Self {
            node_id: name("hello.node_id", h.node_id)?,
            model_name: name("hello.model_name", h.model_name)?,
            fingerprint: name("hello.fingerprint", h.fingerprint)?,
            vocab_size: h.vocab_size,
            // A nonsensical cost is "unknown", not a reason to refuse the node.
            draft_s_per_token: if draft_s.is_finite() && draft_s > 0.0 {
                draft_s
            } else {
                0.0
            },
            pipelined: h.pipelined,
            max_gamma: match h.max_gamma {
                0 => MAX_GAMMA as u32,
                n => n.min(MAX_GAMMA as u32),
            },
            method: method_from_wire(h.method),
        })
    }
}

impl From<&Hello> for pb::DraftHello {
    fn from(h: &Hello) -> Self {
        Self {
            node_id: h.node_id.clone(),
            model_name: h.model_name.clone(),
            fingerprint: h.fingerprint.clone(),
            vocab_size: h.vocab_size,
            draft_s_per_token: h.draft_s_per_token as f32,
            pipelined: h.pipelined,
            max_gamma: h.max_gamma,
            method: method_to_wire(h.method),
        }
    }
}

/// The coordinator accepts a draft node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Welcome {
    /// Coordinator instance id.
    pub coordinator_id: String,
    /// Fleet fingerprint (empty: no verify node yet).
    pub fleet_fingerprint: String,
    /// γ to start sessions with.
    pub initial_gamma: u32,
    /// Largest γ the coordinator asks this node for.
    pub max_gamma: u32,
    /// Whether speculation is on fleet-wide.
    pub speculation_enabled: bool,
}

impl From<pb::Welcome> for Welcome {
    fn from(w: pb::Welcome) -> Self {
        Self {
            coordinator_id: w.coordinator_id,
            fleet_fingerprint: w.fleet_fingerprint,
            initial_gamma: w.initial_gamma.min(MAX_GAMMA as u32),
            max_gamma: w.max_gamma.min(MAX_GAMMA as u32),
            speculation_enabled: w.speculation_enabled,
        }
    }
}

impl From<Welcome> for pb::Welcome {
    fn from(w: Welcome) -> Self {
        Self {
            coordinator_id: w.coordinator_id,
            fleet_fingerprint: w.fleet_fingerprint,
            initial_gamma: w.initial_gamma,
            max_gamma: w.max_gamma,
            speculation_enabled: w.speculation_enabled,
        }
    }
}

/// The answer to one block, with the next γ and the round's timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Session (the draft node's id).
    pub session_id: u64,
    /// Round answered.
    pub round: u64,
    /// Draft tokens accepted.
    pub accepted: usize,
    /// Correction or bonus token.
    pub next_token: u32,
    /// Committed length after the round.
    pub committed_len: usize,
    /// γ the coordinator wants next (≤ [`MAX_GAMMA`]).
    pub next_gamma: u32,
    /// Echo of the block's send time.
    pub client_send_unix_ns: u64,
    /// Time the block spent in the coordinator outside the Verify call.
    pub coordinator_ns: u64,
    /// The verify node's timings.
    pub verify: Timings,
    /// Verify node that produced it.
    pub verifier_id: String,
    /// For a hybrid session, how to draft the next block: [`DraftMethod::Lookup`] (no model
    /// fallback) or [`DraftMethod::Hybrid`]; `None` for every other method (and from older
    /// coordinators): draft with the session's method.
    pub next_method: Option<DraftMethod>,
}

impl Verdict {
    /// The verify outcome the verdict carries (check it with [`Outcome::check_against`]).
    pub fn outcome(&self) -> Outcome {
        Outcome {
            accepted: self.accepted,
            next_token: self.next_token,
            committed_len: self.committed_len,
        }
    }
}

impl TryFrom<pb::Verdict> for Verdict {
    type Error = ProtocolError;
    fn try_from(v: pb::Verdict) -> Result<Self, ProtocolError> {
        if v.next_gamma as usize > MAX_GAMMA {
            return Err(ProtocolError::Range {
                field: "verdict.next_gamma",
                value: v.next_gamma.to_string(),
                allowed: "<= 64",
            });
        }
        if u64::from(v.committed_len) < u64::from(v.accepted) + 2 {
            return Err(ProtocolError::Range {
                field: "verdict.committed_len",
                value: v.committed_len.to_string(),
                allowed: ">= accepted + 2 (a non-empty prompt plus the round's tokens)",
            });
        }
        Ok(Self {
            session_id: v.session_id,
            round: v.round,
            accepted: v.accepted as usize,
            next_token: v.next_token,
            committed_len: v.committed_len as usize,
            next_gamma: v.next_gamma,
            client_send_unix_ns: v.client_send_unix_ns,
            coordinator_ns: v.coordinator_ns,
            verify: v.verify.map(Timings::from).unwrap_or_default(),
            verifier_id: v.verifier_id,
            next_method: (v.next_method != pb::DraftMethod::Unspecified as i32)
                .then(|| method_from_wire(v.next_method)),
        })
    }
}

impl From<Verdict> for pb::Verdict {
    fn from(v: Verdict) -> Self {
        Self {
            session_id: v.session_id,
            round: v.round,
            accepted: v.accepted as u32,
            next_token: v.next_token,
            committed_len: v.committed_len as u32,
            next_gamma: v.next_gamma,
            client_send_unix_ns: v.client_send_unix_ns,
            coordinator_ns: v.coordinator_ns,
            verify: Some(v.verify.into()),
            verifier_id: v.verifier_id,
            next_method: v
                .next_method
                .map_or(pb::DraftMethod::Unspecified as i32, method_to_wire),
        }
    }
}

/// A link probe: answer at once with its id and the padding's length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Probe id.
    pub probe_id: u64,
    /// Padding bytes (bandwidth probes), else empty.
    pub padding: Vec<u8>,
}

/// The answer to a [`Probe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeReply {
    /// Probe id.
    pub probe_id: u64,
    /// Length of the padding received.
    pub padding_len: u32,
}

impl Probe {
    /// The reply to this probe.
    pub fn reply(&self) -> ProbeReply {
        ProbeReply {
            probe_id: self.probe_id,
            padding_len: self.padding.len() as u32,
        }
    }
}

/// What a draft node sends, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum DraftMessage {
    /// Stream opening.
    Hello(Hello),
    /// A round.
    Block(DraftBlock),
    /// Session finished.
    Close {
        /// The session.
        session_id: u64,
    },
    /// Probe answer.
    ProbeReply(ProbeReply),
}

impl TryFrom<pb::DraftMessage> for DraftMessage {
    type Error = ProtocolError;
    fn try_from(m: pb::DraftMessage) -> Result<Self, ProtocolError> {
        use pb::draft_message::Kind;
        match m
            .kind
            .ok_or(ProtocolError::Empty("DraftMessage has no kind"))?
        {
            Kind::Hello(h) => Ok(Self::Hello(Hello::try_from(h)?)),
            Kind::Block(b) => Ok(Self::Block(DraftBlock::try_from(b)?)),
            Kind::Close(c) => Ok(Self::Close {
                session_id: c.session_id,
            }),
            Kind::ProbeReply(p) => Ok(Self::ProbeReply(ProbeReply {
                probe_id: p.probe_id,
                padding_len: p.padding_len,
            })),
        }
    }
}

impl From<DraftMessage> for pb::DraftMessage {
    fn from(m: DraftMessage) -> Self {
        use pb::draft_message::Kind;
        let kind = match m {
            DraftMessage::Hello(h) => Kind::Hello(pb::DraftHello::from(&h)),
            DraftMessage::Block(b) => Kind::Block(pb::DraftBlock::from(&b)),
            DraftMessage::Close { session_id } => Kind::Close(pb::SessionClose { session_id }),
            DraftMessage::ProbeReply(p) => Kind::ProbeReply(pb::ProbeReply {
                probe_id: p.probe_id,
                padding_len: p.padding_len,
            }),
        };
        Self { kind: Some(kind) }
    }
}

/// What the coordinator sends, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum CoordinatorMessage {
    /// Answer to hello.
    Welcome(Welcome),
    /// A verdict.
    Verdict(Verdict),
    /// A per-session error.
    Error(SessionError),
    /// A link probe.
    Probe(Probe),
}

impl TryFrom<pb::CoordinatorMessage> for CoordinatorMessage {
    type Error = ProtocolError;
    fn try_from(m: pb::CoordinatorMessage) -> Result<Self, ProtocolError> {
        use pb::coordinator_message::Kind;
        match m
            .kind
            .ok_or(ProtocolError::Empty("CoordinatorMessage has no kind"))?
        {
            Kind::Welcome(w) => Ok(Self::Welcome(w.into())),
            Kind::Verdict(v) => Ok(Self::Verdict(Verdict::try_from(v)?)),
            Kind::Error(e) => Ok(Self::Error(SessionError::try_from(e)?)),
            Kind::Probe(p) => Ok(Self::Probe(Probe {
                probe_id: p.probe_id,
                padding: p.padding,
            })),
        }
    }
}

impl From<CoordinatorMessage> for pb::CoordinatorMessage {
    fn from(m: CoordinatorMessage) -> Self {
        use pb::coordinator_message::Kind;
        let kind = match m {
            CoordinatorMessage::Welcome(w) => Kind::Welcome(w.into()),
            CoordinatorMessage::Verdict(v) => Kind::Verdict(v.into()),
            CoordinatorMessage::Error(e) => Kind::Error(e.into()),
            CoordinatorMessage::Probe(p) => Kind::Probe(pb::Probe {
                probe_id: p.probe_id,
                padding: p.padding,
            }),
        };
        Self { kind: Some(kind) }
    }
}

/// A wire method; UNSPECIFIED (older nodes) and values this build does not know read as
/// [`DraftMethod::Model`], what every node drafted with before methods existed.
pub fn method_from_wire(v: i32) -> DraftMethod {
    match pb::DraftMethod::try_from(v) {
        Ok(pb::DraftMethod::Lookup) => DraftMethod::Lookup,
        Ok(pb::DraftMethod::Hybrid) => DraftMethod::Hybrid,
        _ => DraftMethod::Model,
    }
}

/// The wire value of a method.
pub fn method_to_wire(m: DraftMethod) -> i32 {
    let wire = match m {
        DraftMethod::Model => pb::DraftMethod::Model,
        DraftMethod::Lookup => pb::DraftMethod::Lookup,
        DraftMethod::Hybrid => pb::DraftMethod::Hybrid,
    };
    wire as i32
}
