//! Our forward on the real cached models: coherent greedy text, agreement with
//! candle-transformers' `quantized_qwen2`, and bit-exact batch invariance at full scale.
//!
//! The real models are fetched into the cache (`$EDGESPEC_MODEL_DIR` or
//! `$HOME/.cache/edgespec/models`) on first use, like every other command does.

use std::fs::File;
use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_qwen2::ModelWeights;
use edgespec_model::fetch::{default_cache_dir, ensure_model, KnownModel};
use edgespec_model::forward::load_gguf;
use edgespec_model::{CausalLm, ChatMessage, DeviceKind, SeqLogits, SeqRequest, TextTokenizer};
use edgespec_specdec::argmax;
use edgespec_testkit::reference::greedy_continuation;

const TARGET: KnownModel = KnownModel::Qwen15bTarget;
const DRAFT: KnownModel = KnownModel::Qwen05bDraft;
const SMOL: KnownModel = KnownModel::SmolLm135m;

fn model_path(m: KnownModel) -> PathBuf {
    ensure_model(m, &default_cache_dir(), false)
        .unwrap_or_else(|e| panic!("fetching {}: {e}", m.file_name()))
}

fn req(session: u64, start: usize, tokens: &[u32], last: usize) -> SeqRequest {
    SeqRequest {
        session,
        start,
        tokens: tokens.to_vec(),
        logits_for_last: last,
    }
}

fn chat_prompt(tok: &TextTokenizer, user: &str) -> Vec<u32> {
    let text = tok.apply_chat_template(&[ChatMessage::new("user", user)], true);
    tok.encode(&text).unwrap()
}

/// Greedy decoding with our forward: a prefill, then one token per step.
fn greedy(m: &mut dyn CausalLm, prompt: &[u32], n: usize) -> Vec<u32> {
    greedy_continuation(m, 1, prompt, n, &[]).unwrap()
}

fn assert_bits_eq(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same, "{what}: logits differ, max |Δ| = {max}");
}

#[test]
fn smollm2_greedy_answers_coherently() {
    let path = model_path(SMOL);
    let tok = TextTokenizer::from_gguf(&path).unwrap();
    let mut m = load_gguf(&path, DeviceKind::Cpu).unwrap();
    assert_eq!(m.info().arch, "llama");
    let ask = |m: &mut dyn CausalLm, q: &str| {
        let prompt = chat_prompt(&tok, q);
        tok.decode(&greedy(m, &prompt, 20)).unwrap()
    };
    let text = ask(
        m.as_mut(),
        "What is the capital city of France? Answer in one sentence.",
    );
    assert!(
        text.starts_with("The capital city of France is Paris."),
        "{text:?}"
    );
    let text = ask(m.as_mut(), "Name three primary colors.");
    for color in ["Red", "Blue", "Yellow"] {
        assert!(text.contains(color), "{text:?}");
    }
}

#[test]
fn qwen_target_greedy_writes_code_and_matches_candle_transformers() {
    let path = model_path(TARGET);
    let tok = TextTokenizer::from_gguf(&path).unwrap();
    let prompt = chat_prompt(
        &tok,
        "Write a Python function that returns the sum of the squares of a list of numbers.",
    );
    let mut m = load_gguf(&path, DeviceKind::Cpu).unwrap();
    let ours = greedy(m.as_mut(), &prompt, 32);
    drop(m);
    let text = tok.decode(&ours).unwrap();
    assert!(text.contains("def "), "{text:?}");

    // The same greedy decode with candle-transformers' model (prefill, then single steps).
    let mut file = File::open(&path).unwrap();
    let ct = gguf_file::Content::read(&mut file).unwrap();
    let mut theirs = ModelWeights::from_gguf(ct, &mut file, &Device::Cpu).unwrap();
    let mut reference = Vec::new();
    let mut x = Tensor::new(prompt.as_slice(), &Device::Cpu).unwrap();
    let mut pos = 0;
    while reference.len() < ours.len() {
        let len = x.dim(0).unwrap();
        let logits = theirs.forward(&x.unsqueeze(0).unwrap(), pos).unwrap();
        let next = argmax(&logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
        reference.push(next);
        pos += len;
        x = Tensor::new(&[next], &Device::Cpu).unwrap();
    }
    assert_eq!(
        tok.decode(&ours).unwrap(),
        tok.decode(&reference).unwrap(),
        "greedy output differs from candle-transformers"
    );
    assert_eq!(ours, reference);
}

/// Logits of a verify block, of single steps, and of a ragged batch beside another session are
/// bit-identical on the real models (tiled Q4K/Q6K kernels on the target, generic Q8_0 on the
/// draft).
fn invariance_at_scale(file: KnownModel) {
    let path = model_path(file);
    let tok = TextTokenizer::from_gguf(&path).unwrap();
    let mut m = load_gguf(&path, DeviceKind::Cpu).unwrap();
    let prefix = chat_prompt(&tok, "Print the numbers from 1 to 10 in Rust.");
    let block = tok.encode("fn main() {\n    for i in 1..=10 {").unwrap();
    let other = tok.encode("The quick brown fox").unwrap();

    m.forward_batch(&[req(1, 0, &prefix, 1), req(2, 0, &prefix, 1)])
        .unwrap();
    // Session 1 verifies the whole block at once, next to a new session 3.
    let batched = m
        .forward_batch(&[
            req(3, 0, &other, usize::MAX),
            req(1, prefix.len(), &block, usize::MAX),
        ])
        .unwrap();
    // Session 2 takes the same tokens one at a time.
    let steps: Vec<SeqLogits> = block
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            m.forward_batch(&[req(2, prefix.len() + i, &[t], 1)])
                .unwrap()
                .remove(0)
        })
        .collect();
    for (i, s) in steps.iter().enumerate() {
        assert_bits_eq(
            batched[1].row(i),
            s.row(0),
            &format!("{}: block row {i}", file.file_name()),
        );
    }
    let alone = m
        .forward_batch(&[req(4, 0, &other, usize::MAX)])
        .unwrap()
        .remove(0);
    assert_bits_eq(
        &batched[0].data,
        &alone.data,
        &format!("{}: ragged neighbour", file.file_name()),
    );
}

#[test]
fn qwen_target_is_batch_invariant() {
    invariance_at_scale(TARGET);
}

#[test]
fn qwen_draft_is_batch_invariant_and_coherent() {
    invariance_at_scale(DRAFT);
    let path = model_path(DRAFT);
    let tok = TextTokenizer::from_gguf(&path).unwrap();
    let mut m = load_gguf(&path, DeviceKind::Cpu).unwrap();
    let prompt = chat_prompt(&tok, "Write a Python function that reverses a string.");
    let text = tok.decode(&greedy(m.as_mut(), &prompt, 32)).unwrap();
    assert!(text.contains("def "), "{text:?}");
}
