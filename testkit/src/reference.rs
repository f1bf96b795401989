//! The reference every exactness check compares with: target-only greedy decoding directly on
//! the model, one token per forward after the prompt's prefill, exactly as a non-speculative
//! server would run it.
//!
//! Near-ties: our forward is batch-invariant on CPU (a position's logits are bit-identical in a
//! single-token step, a verification block or a ragged batch), so the speculative system and
//! this reference see the same logits and break ties the same way (lowest token id); no
//! tolerance is needed and none is applied.

use std::path::Path;

use anyhow::{Context, Result};
use edgespec_model::forward::load_gguf;
use edgespec_model::{
    CausalLm, ChatMessage, DeviceKind, ModelError, SeqRequest, SessionId, TextTokenizer,
};

/// Greedy decoding of at most `max_new` tokens after `prompt` on `lm`, as session `session`
/// (released before and after): a prefill, then one token per forward. Stops after a token of
/// `stop`, which is included in the result (empty `stop`: exactly `max_new` tokens).
pub fn greedy_continuation(
    lm: &mut dyn CausalLm,
    session: SessionId,
    prompt: &[u32],
    max_new: usize,
    stop: &[u32],
) -> Result<Vec<u32>, ModelError> {
    lm.release(session);
    let mut out = Vec::with_capacity(max_new);
    let (mut start, mut next) = (0, prompt.to_vec());
    while out.len() < max_new {
        let fed = next.len();
        let logits = lm.forward_batch(&[SeqRequest {
            session,
            start,
            tokens: next,
            logits_for_last: 1,
        }])?;
        start += fed;
        let t = edgespec_specdec::argmax(logits[0].row(0));
        out.push(t);
        if stop.contains(&t) {
            break;
        }
        next = vec![t];
    }
    lm.release(session);
    Ok(out)
}

/// The completion's token ids for a chat prompt, the way the API reports them
/// (`ChatOutcome::token_ids`): in order, a final end-of-turn token included, at most
/// `max_tokens`.
pub fn target_only_greedy_ids(model: &Path, prompt: &str, max_tokens: usize) -> Result<Vec<u32>> {
    let tok = TextTokenizer::from_gguf(model)?;
    let ids = tok.encode_chat(&[ChatMessage::new("user", prompt)], true)?;
    let mut lm = load_gguf(model, DeviceKind::Cpu).context("loading the reference model")?;
    Ok(greedy_continuation(
        lm.as_mut(),
        1,
        &ids,
        max_tokens,
        tok.eos_token_ids(),
    )?)
}

/// [`target_only_greedy_ids`] of each prompt, on a blocking thread (for async tests and soaks).
pub async fn references(
    model: &Path,
    prompts: &[&str],
    max_tokens: usize,
) -> Result<Vec<Vec<u32>>> {
    let model = model.to_path_buf();
    let prompts: Vec<String> = prompts.iter().map(|p| p.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        prompts
            .iter()
            .map(|p| target_only_greedy_ids(&model, p, max_tokens))
            .collect()
    })
    .await
    .context("the reference decoder panicked")?
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
