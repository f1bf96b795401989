//! A **no-model verify node** and **scripted draft streams**, for exercising a real coordinator
//! in process on `127.0.0.1:0` without loading a model.
//!
//! [`ScriptedVerifier`] is a real tonic `Verifier` server whose "target model" is the
//! deterministic function [`target_next`] over a small vocabulary: greedy acceptance compares
//! each draft token with it. It keeps per-session committed histories (so it honours history /
//! resync and answers `ERROR_CODE_RESYNC_NEEDED` for sessions it does not know), records every
//! batch it receives, registers and heartbeats with a coordinator like a real verify node, and
//! can be killed mid-run to exercise failover.
//!
//! [`DraftClient`] is a draft node's `Drafts` stream (tonic client) that multiplexes sessions,
//! answers probes, and drives whole sessions with [`DraftClient::drive`], re-sending with
//! history on `RESYNC_NEEDED` exactly as a real draft node must; the drafts come from a
//! [`Drafter`] (the scripted target with deliberate misses, or a benchmark's replayed drafts).

mod draft;
mod session;
mod verifier;

pub use draft::DraftClient;
pub use session::{
    greedy_block, Drafter, ScriptedDrafter, SessionReport, SessionScript, DRAFT_S_PER_TOKEN,
};
pub use verifier::{RecordedBatch, ScriptedVerifier, ScriptedVerifierConfig};

/// Vocabulary size of the scripted target.
pub const VOCAB: u32 = 97;

/// Fingerprint the scripted nodes use by default.
pub const FINGERPRINT: &str = "scripted-fingerprint-v1";

/// The scripted target model: the greedy next token after `prev`.
pub fn target_next(prev: u32) -> u32 {
    ((u64::from(prev) * 2_654_435_761 + 12_345) >> 7) as u32 % VOCAB
}

/// The tokens a target-only greedy decoder of the scripted target produces: `prompt` plus `n`
/// tokens.
pub fn reference(prompt: &[u32], n: usize) -> Vec<u32> {
    let mut out = prompt.to_vec();
    for _ in 0..n {
        out.push(target_next(*out.last().expect("non-empty prompt")));
    }
    out
}
