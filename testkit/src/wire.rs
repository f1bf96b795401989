//! Wire messages that tests and benchmarks of a verify node build by hand.

use edgespec_proto::pb;

/// Greedy sampling parameters on the wire.
pub const GREEDY: pb::SamplingParams = pb::SamplingParams {
    temperature: 0.0,
    top_k: 0,
    top_p: 1.0,
    seed: 0,
};

/// A greedy verify item of `session_id` at `committed_len` (its round number too); a non-empty
/// `history` opens or resyncs the session.
pub fn greedy_item(
    session_id: u64,
    committed_len: usize,
    history: &[u32],
    drafts: &[u32],
) -> pb::VerifyItem {
    pb::VerifyItem {
        session_id,
        round: committed_len as u64,
        committed_len: committed_len as u32,
        history: history.to_vec(),
        draft_tokens: drafts.to_vec(),
        draft_probs: vec![],
        sampling: Some(GREEDY),
    }
}
