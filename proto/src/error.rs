//! Why a wire message was rejected.

/// A malformed or inconsistent wire message. The text names the offending field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    /// A required field or oneof was not set.
    #[error("missing field `{0}`")]
    Missing(&'static str),
    /// Two fields that must have the same length do not.
    #[error("`{field}` has {got} entries, expected {expected}")]
    Length {
        field: &'static str,
        got: usize,
        expected: usize,
    },
    /// A numeric field is outside its allowed range.
    #[error("`{field}` = {value} is out of range: {allowed}")]
    Range {
        field: &'static str,
        value: String,
        allowed: &'static str,
    },
    /// A draft distribution is not a probability distribution.
    #[error("draft_probs[{position}]: {reason}")]
    BadDistribution { position: usize, reason: String },
    /// An enum value this version does not know.
    #[error("unknown value {value} for enum `{field}`")]
    UnknownEnum { field: &'static str, value: i32 },
    /// One item of a batch is malformed (all-or-nothing readers refuse the batch with it).
    #[error("session {session_id}: {message}")]
    Item { session_id: u64, message: String },
    /// A message that carries nothing to do.
    #[error("empty message: {0}")]
    Empty(&'static str),
}
