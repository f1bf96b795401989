//! The crate's one error type. Variants name the operation whose input was wrong, so a caller can
//! map them to a client-facing message ("the proposal was malformed") without seeing internals.

use thiserror::Error;

/// Everything that can go wrong in the speculative-decoding core. All variants describe bad
/// input (a malformed proposal, mismatched row counts, a degenerate distribution); the math
/// itself cannot fail on well-formed input.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SpecError {
    /// A sparse draft distribution q broke one of its invariants.
    #[error("invalid proposal: {reason}")]
    InvalidProposal {
        /// What was wrong, e.g. "entry 3: duplicate token id" (never the id itself: errors may
        /// be logged, and token ids are user content).
        reason: String,
    },
    /// Verification got a number of target rows other than `drafted + 1`.
    #[error("verify: {drafted} drafted tokens need {} target rows, got {got}", drafted + 1)]
    TargetRowCount {
        /// Number of drafted tokens (γ).
        drafted: usize,
        /// Number of target rows supplied.
        got: usize,
    },
    /// Sampled verification got a number of proposal distributions other than `drafted`.
    #[error("verify: {drafted} drafted tokens need {drafted} proposal distributions, got {got}")]
    ProposalCount {
        /// Number of drafted tokens (γ).
        drafted: usize,
        /// Number of proposal distributions supplied.
        got: usize,
    },
    /// Target rows are empty or of different widths.
    #[error("verify: target row {row} has {got} entries, expected {expected} (and at least 1)")]
    TargetRowWidth {
        /// Index of the offending row.
        row: usize,
        /// Width of row 0 (the vocabulary size).
        expected: usize,
        /// Width of the offending row.
        got: usize,
    },
    /// A drafted token id is not in the vocabulary.
    #[error("verify: the drafted token at position {position} is outside the vocabulary of {vocab_size}")]
    DraftOutOfVocab {
        /// Position of the token in the draft block.
        position: usize,
        /// The token id.
        token: u32,
        /// Vocabulary size (target row width).
        vocab_size: usize,
    },
    /// A drafted token has probability 0 under the q it was supposedly sampled from.
    #[error("verify: the drafted token at position {position} is outside its proposal's support")]
    DraftNotInProposal {
        /// Position of the token in the draft block.
        position: usize,
        /// The token id.
        token: u32,
    },
    /// A target row that had to be sampled has no positive, finite probability mass.
    #[error("verify: target row {row} has no positive probability mass to sample from")]
    DegenerateTarget {
        /// Index of the offending row.
        row: usize,
    },
    /// An estimator was fed an impossible observation.
    #[error("observe: {reason}")]
    InvalidObservation {
        /// What was wrong, e.g. "accepted 5 of 4 drafted tokens".
        reason: String,
    },
}
