//! End to end with the real pair: the Qwen2.5-Coder 1.5B target behind the service, drafts from
//! the 0.5B draft model. Greedy speculative output must equal target-only greedy decoding
//! (computed directly on a second copy of the target, one token per forward; the model's CPU
//! forward is batch invariant, so the two are bit-comparable).

mod common;

use common::*;
use edgespec_model::fetch::{default_cache_dir, ensure_model, KnownModel};
use edgespec_model::forward::load_gguf;
use edgespec_model::{ChatMessage, DeviceKind, ModelHandle, SeqRequest, TextTokenizer};
use edgespec_specdec::argmax;

const NEW_TOKENS: usize = 32;
const GAMMA: usize = 4;

fn spawn_model(name: &str, path: std::path::PathBuf) -> ModelHandle {
    ModelHandle::spawn(name, move || load_gguf(&path, DeviceKind::Cpu)).unwrap()
}

async fn next(model: &ModelHandle, session: u64, start: usize, tokens: Vec<u32>) -> u32 {
    let rows = model
        .forward_batch(vec![SeqRequest {
            session,
            start,
            tokens,
            logits_for_last: 1,
        }])
        .await
        .unwrap();
    argmax(rows[0].row(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_speculation_with_the_real_pair_equals_target_greedy() {
    let (target_path, draft_path) = tokio::task::spawn_blocking(|| {
        let dir = default_cache_dir();
        (
            ensure_model(KnownModel::Qwen15bTarget, &dir, false).unwrap(),
            ensure_model(KnownModel::Qwen05bDraft, &dir, false).unwrap(),
        )
    })
    .await
    .unwrap();
    let tokenizer = TextTokenizer::from_gguf(&target_path).unwrap();
    let text = tokenizer.apply_chat_template(
        &[ChatMessage::new(
            "user",
            "Write a Python function that returns the n-th Fibonacci number iteratively.",
        )],
        true,
    );
    let prompt = tokenizer.encode(&text).unwrap();

    // Target-only greedy reference.
    let (tp, dp) = (target_path.clone(), draft_path.clone());
    let reference_model = tokio::task::spawn_blocking(move || spawn_model("reference", tp))
        .await
        .unwrap();
    let mut reference = Vec::new();
    let mut t = next(&reference_model, 1, 0, prompt.clone()).await;
    for i in 0..NEW_TOKENS {
        reference.push(t);
        if i + 1 < NEW_TOKENS {
            t = next(&reference_model, 1, prompt.len() + i, vec![t]).await;
        }
    }
    reference_model.shutdown().await;
    drop(reference_model);

    // Speculative: the 0.5B drafts γ tokens greedily; its cache holds the committed tokens
    // except the last (plus unverified drafts, dropped by the next round's start).
    let draft = tokio::task::spawn_blocking(move || spawn_model("draft", dp))
        .await
        .unwrap();
    let mut s = settings(&target_path);
    s.sessions.max_block_tokens = GAMMA;
    let node = Node::start(s).await;
    let mut committed = prompt.clone();
    let mut draft_cached = 0usize;
    let mut accepted_total = 0;
    let mut rounds = 0;
    while committed.len() < prompt.len() + NEW_TOKENS {
        let n = committed.len();
        let mut d = vec![next(&draft, 7, draft_cached, committed[draft_cached..].to_vec()).await];
        for i in 1..GAMMA {
            d.push(next(&draft, 7, n + i - 1, vec![d[i - 1]]).await);
        }
        let history: &[u32] = if rounds == 0 { &committed } else { &[] };
        let resp = node.verify(vec![item(1, n, history, &d)]).await;
        let o = outcome(&resp.results[0]);
        let a = o.accepted as usize;
        committed.extend_from_slice(&d[..a]);
        committed.push(o.next_token);
        assert_eq!(o.committed_len as usize, committed.len());
        draft_cached = (n + GAMMA - 1).min(n + a);
        accepted_total += a;
        rounds += 1;
    }
    let got = &committed[prompt.len()..prompt.len() + NEW_TOKENS];
    assert_eq!(
        got,
        &reference[..],
        "speculative: {:?}\nreference: {:?}",
        tokenizer.decode(got),
        tokenizer.decode(&reference)
    );
    assert!(
        accepted_total >= NEW_TOKENS / 2,
        "the draft should agree often on this prompt: {accepted_total} accepted in {rounds} rounds"
    );
    node.stop().await.unwrap();
    draft.shutdown().await;
}
