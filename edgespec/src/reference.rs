//! The reference every exactness check compares with: target-only greedy decoding of a chat
//! prompt directly on the model, one token per forward, exactly as a non-speculative server
//! would run it.
//!
//! Near-ties: our forward is batch-invariant on CPU (a position's logits are bit-identical in a
//! single-token step, a verification block or a ragged batch), so the speculative system and
//! this reference see the same logits and break ties the same way (lowest token id); no
//! tolerance is needed and none is applied.

use std::path::Path;

use anyhow::{Context, Result};
use edgespec_model::forward::load_gguf;
use edgespec_model::{ChatMessage, DeviceKind, SeqRequest, TextTokenizer};

/// The completion's token ids, the way the API reports them (`ChatOutcome::token_ids`): in
/// order, a final end-of-turn token included, at most `max_tokens`.
pub fn target_only_greedy_ids(model: &Path, prompt: &str, max_tokens: usize) -> Result<Vec<u32>> {
    let tok = TextTokenizer::from_gguf(model)?;
    let ids = tok.encode_chat(&[ChatMessage::new("user", prompt)], true)?;
    let mut lm = load_gguf(model, DeviceKind::Cpu).context("loading the reference model")?;
    let eos = tok.eos_token_ids().to_vec();
    let mut out = Vec::new();
    let mut next = ids;
    let mut start = 0;
    for _ in 0..max_tokens {
        let n = next.len();
        let logits = lm.forward_batch(&[SeqRequest {
            session: 1,
            start,
            tokens: next,
            logits_for_last: 1,
        }])?;
        start += n;
        let t = edgespec_specdec::argmax(logits[0].row(0));
        out.push(t);
        if eos.contains(&t) {
            break;
        }
        next = vec![t];
    }
    Ok(out)
}

/// [`target_only_greedy_ids`] as text, without the end-of-turn token.
pub fn target_only_greedy(model: &Path, prompt: &str, max_tokens: usize) -> Result<String> {
    let tok = TextTokenizer::from_gguf(model)?;
    let mut ids = target_only_greedy_ids(model, prompt, max_tokens)?;
    if ids.last().is_some_and(|t| tok.eos_token_ids().contains(t)) {
        ids.pop();
    }
    Ok(tok.decode(&ids)?)
}
