//! Forward-pass behaviour on tiny synthetic models: ragged batches, all-position logits, KV
//! truncation, input validation, and bit-exact batch invariance.

use std::path::Path;

use edgespec_model::forward::load_gguf;
use edgespec_model::synthetic::{write_tiny_gguf, TinyArch, TinySpec, TinyWeights};
use edgespec_model::{CausalLm, DeviceKind, ModelError, SeqLogits, SeqRequest};
use edgespec_testkit::tiny::TinyModel as Tiny;

fn tiny(spec: TinySpec) -> Tiny {
    Tiny::new(spec)
}

fn load(path: &Path) -> Box<dyn CausalLm> {
    load_gguf(path, DeviceKind::Cpu).unwrap()
}

/// A request for logits at every new position.
fn req(session: u64, start: usize, tokens: &[u32]) -> SeqRequest {
    SeqRequest {
        session,
        start,
        tokens: tokens.to_vec(),
        logits_for_last: usize::MAX,
    }
}

fn one(m: &mut dyn CausalLm, r: SeqRequest) -> SeqLogits {
    m.forward_batch(&[r]).unwrap().remove(0)
}

/// Deterministic pseudo-random token ids below `vocab`.
fn tokens(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((seed * 7919 + i * 104_729 + i * i * 31) % vocab as u64) as u32)
        .collect()
}

fn assert_rows_eq(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    if bits(a) != bits(b) {
        let max = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        panic!("{what}: logits differ (max |Δ| = {max})");
    }
}

/// All-position logits of a prefill equal the logits of feeding the same tokens one at a time.
fn block_equals_steps(t: &Tiny) {
    let v = t.spec.vocab_size();
    let toks = tokens(1, 12, v);
    let mut m = load(&t.path);
    let block = one(m.as_mut(), req(1, 0, &toks));
    assert_eq!((block.rows, block.vocab_size), (12, v));
    for (i, &tok) in toks.iter().enumerate() {
        let step = one(m.as_mut(), req(2, i, &[tok]));
        assert_rows_eq(block.row(i), step.row(0), &format!("position {i}"));
    }
    // A block in the middle of a sequence equals single steps too.
    let more = tokens(2, 5, v);
    let blk = one(m.as_mut(), req(1, 12, &more));
    for (i, &tok) in more.iter().enumerate() {
        let step = one(m.as_mut(), req(2, 12 + i, &[tok]));
        assert_rows_eq(blk.row(i), step.row(0), &format!("position {}", 12 + i));
    }
    assert_eq!(m.cached_len(1), Some(17));
    assert_eq!(m.cached_len(2), Some(17));
}

/// A ragged batch returns, per session and in request order, exactly what separate forwards give.
fn ragged_equals_separate(t: &Tiny) {
    let v = t.spec.vocab_size();
    let (pa, pb) = (tokens(3, 9, v), tokens(4, 4, v));
    let (na, nb, nc) = (tokens(5, 4, v), tokens(6, 1, v), tokens(7, 6, v));
    let mut batched = load(&t.path);
    batched
        .forward_batch(&[req(10, 0, &pa), req(20, 0, &pb)])
        .unwrap();
    // Session 10 re-verifies from position 7 (drops two cached tokens), 20 appends, 30 is new.
    let out = batched
        .forward_batch(&[req(20, 4, &nb), req(30, 0, &nc), req(10, 7, &na)])
        .unwrap();
    assert_eq!(
        out.iter().map(|o| (o.session, o.rows)).collect::<Vec<_>>(),
        vec![(20, 1), (30, 6), (10, 4)]
    );

    let mut single = load(&t.path);
    one(single.as_mut(), req(10, 0, &pa));
    one(single.as_mut(), req(20, 0, &pb));
    let expect = [
        one(single.as_mut(), req(20, 4, &nb)),
        one(single.as_mut(), req(30, 0, &nc)),
        one(single.as_mut(), req(10, 7, &na)),
    ];
    for (got, want) in out.iter().zip(&expect) {
        assert_rows_eq(&got.data, &want.data, &format!("session {}", got.session));
    }
    for s in [10, 20, 30] {
        assert_eq!(batched.cached_len(s), single.cached_len(s));
    }
    assert_eq!(batched.cached_len(10), Some(11));
}

/// Truncating and extending equals a fresh prefill of the same tokens.
fn truncate_then_extend(t: &Tiny) {
    let v = t.spec.vocab_size();
    let prefix = tokens(8, 10, v);
    let tail = tokens(9, 5, v);
    let mut m = load(&t.path);
    one(m.as_mut(), req(1, 0, &prefix));
    m.truncate(1, 6).unwrap();
    assert_eq!(m.cached_len(1), Some(6));
    m.truncate(1, 100).unwrap(); // no-op when longer than the cache
    assert_eq!(m.cached_len(1), Some(6));
    let extended = one(m.as_mut(), req(1, 6, &tail));

    let mut fresh_tokens = prefix[..6].to_vec();
    fresh_tokens.extend(&tail);
    let fresh = one(m.as_mut(), req(2, 0, &fresh_tokens));
    for i in 0..tail.len() {
        assert_rows_eq(extended.row(i), fresh.row(6 + i), &format!("tail {i}"));
    }
    // `start` below the cached length truncates implicitly.
    let again = one(m.as_mut(), req(1, 6, &tail));
    assert_rows_eq(&again.data, &extended.data, "re-extend");
}

fn all_behaviours(spec: TinySpec) {
    let t = tiny(spec);
    block_equals_steps(&t);
    ragged_equals_separate(&t);
    truncate_then_extend(&t);
}

#[test]
fn qwen2_q8_0() {
    all_behaviours(TinySpec::default());
}

#[test]
fn qwen2_q4_0_tied() {
    all_behaviours(TinySpec {
        weights: TinyWeights::Q4_0,
        tied_embeddings: true,
        seed: 3,
        ..TinySpec::default()
    });
}

#[test]
fn llama_q8_0_tied() {
    all_behaviours(TinySpec {
        arch: TinyArch::Llama,
        tied_embeddings: true,
        seed: 5,
        rope_base: 10_000.0,
        ..TinySpec::default()
    });
}

/// Hidden 256 with Q4K/Q6K weights takes candle's tiled (repacked) CPU kernels, including the Q6K
/// kernel that differs between one row and several.
#[test]
fn qwen2_q4km_tiled_kernels() {
    all_behaviours(TinySpec {
        hidden: 256,
        ffn: 512,
        n_head: 4,
        n_kv_head: 2,
        weights: TinyWeights::Q4KM,
        seed: 11,
        ..TinySpec::default()
    });
}

#[test]
fn llama_q4km_tiled_kernels() {
    all_behaviours(TinySpec {
        arch: TinyArch::Llama,
        hidden: 256,
        ffn: 512,
        n_head: 8,
        n_kv_head: 2,
        weights: TinyWeights::Q4KM,
        seed: 12,
        ..TinySpec::default()
    });
}

/// More than 32 rows in one matmul (where candle would switch to AMX for Q4K) still matches
/// single steps.
#[test]
fn large_ragged_batch_matches_steps() {
    let t = tiny(TinySpec {
        hidden: 256,
        ffn: 512,
        weights: TinyWeights::Q4KM,
        seed: 13,
        ..TinySpec::default()
    });
    let v = t.spec.vocab_size();
    let mut m = load(&t.path);
    let batch: Vec<SeqRequest> = (0..8).map(|s| req(s, 0, &tokens(s + 20, 6, v))).collect();
    let out = m.forward_batch(&batch).unwrap();
    for (r, o) in batch.iter().zip(&out) {
        for (i, &tok) in r.tokens.iter().enumerate() {
            let step = one(m.as_mut(), req(100 + r.session, i, &[tok]));
            assert_rows_eq(
                o.row(i),
                step.row(0),
                &format!("session {} pos {i}", r.session),
            );
        }
    }
}

/// `logits_for_last` returns exactly the trailing rows of the all-position logits.
#[test]
fn logits_for_last_returns_trailing_rows() {
    let t = tiny(TinySpec::default());
    let v = t.spec.vocab_size();
    let toks = tokens(4, 7, v);
    let mut m = load(&t.path);
    let all = one(m.as_mut(), req(1, 0, &toks));
    let extra = tokens(5, 3, v);
    for (n, rows) in [(0, 1), (1, 1), (3, 3), (7, 7), (100, 7)] {
        let mut r = req(2, 0, &toks);
        r.logits_for_last = n;
        // Batched beside another session whose rows are partly kept too.
        let mut r2 = req(3, 0, &extra);
        r2.logits_for_last = 2;
        let out = m.forward_batch(&[r, r2]).unwrap();
        assert_eq!(out[0].rows, rows);
        assert_rows_eq(
            &out[0].data,
            &all.data[(7 - rows) * v..],
            &format!("last {n}"),
        );
        assert_eq!(out[1].rows, 2);
        assert_eq!(m.cached_len(2), Some(7));
        let steps = one(m.as_mut(), req(3, 0, &extra));
        assert_rows_eq(&out[1].data, &steps.data[v..], "beside");
    }
}

/// A long prefill (attention spread over the worker pool) equals single steps (attention on the
/// calling thread).
#[test]
fn long_prefill_matches_steps() {
    let t = tiny(TinySpec::default());
    let v = t.spec.vocab_size();
    let toks = tokens(21, 320, v);
    let mut m = load(&t.path);
    let block = one(m.as_mut(), req(1, 0, &toks));
    for (i, &tok) in toks.iter().enumerate() {
        let step = one(m.as_mut(), req(2, i, &[tok]));
        assert_rows_eq(block.row(i), step.row(0), &format!("position {i}"));
    }
}

#[test]
fn bad_inputs_error_without_changing_caches() {
    let t = tiny(TinySpec::default());
    let v = t.spec.vocab_size();
    let mut m = load(&t.path);
    one(m.as_mut(), req(1, 0, &tokens(1, 5, v)));
    one(m.as_mut(), req(2, 0, &tokens(2, 3, v)));
    let kv_bytes = m.kv_bytes();
    let ok = req(1, 2, &[1, 2]); // would truncate session 1 if it ran
    let cases: Vec<(Vec<SeqRequest>, &str)> = vec![
        (vec![], "empty batch"),
        (
            vec![ok.clone(), req(2, 3, &[v as u32])],
            "token out of vocab",
        ),
        (vec![ok.clone(), req(2, 4, &[1])], "start beyond cache"),
        (vec![ok.clone(), req(9, 1, &[1])], "unknown session"),
        (vec![ok.clone(), req(2, 3, &[])], "no tokens"),
        (vec![ok.clone(), req(1, 3, &[1])], "duplicate session"),
        (
            vec![ok.clone(), req(2, 3, &vec![1; 510])],
            "context overflow",
        ),
    ];
    for (batch, what) in cases {
        let err = m.forward_batch(&batch).expect_err(what);
        match (&err, what) {
            (ModelError::InvalidBatch(_), "empty batch" | "no tokens" | "duplicate session") => {}
            (ModelError::TokenOutOfVocab { .. }, "token out of vocab") => {}
            (
                ModelError::BadStart {
                    start: 4,
                    cached: 3,
                    ..
                },
                "start beyond cache",
            ) => {}
            (ModelError::UnknownSession(9), "unknown session") => {}
            (
                ModelError::ContextOverflow {
                    len: 513, max: 512, ..
                },
                "context overflow",
            ) => {}
            _ => panic!("{what}: unexpected error {err:?}"),
        }
        assert_eq!(m.cached_len(1), Some(5), "{what}");
        assert_eq!(m.cached_len(2), Some(3), "{what}");
        assert_eq!(m.cached_len(9), None, "{what}");
        assert_eq!(m.kv_bytes(), kv_bytes, "{what}");
    }
    assert!(matches!(
        m.truncate(9, 1),
        Err(ModelError::UnknownSession(9))
    ));
}

#[test]
fn sessions_release_and_kv_bytes() {
    let t = tiny(TinySpec::default());
    let v = t.spec.vocab_size();
    let mut m = load(&t.path);
    assert_eq!(m.kv_bytes(), 0);
    one(m.as_mut(), req(1, 0, &tokens(1, 8, v)));
    // 2 layers × (K + V) × 8 positions × 2 kv heads × 16 dims × 4 bytes, at least.
    assert!(m.kv_bytes() >= 2 * 2 * 8 * 32 * 4, "{}", m.kv_bytes());
    m.release(1);
    assert_eq!(m.cached_len(1), None);
    assert_eq!(m.kv_bytes(), 0);
    // start == 0 on an existing session restarts it.
    one(m.as_mut(), req(2, 0, &tokens(2, 6, v)));
    one(m.as_mut(), req(2, 0, &tokens(3, 2, v)));
    assert_eq!(m.cached_len(2), Some(2));
}

#[test]
fn info_and_fingerprint() {
    let a = tiny(TinySpec::default());
    let b = tiny(TinySpec {
        seed: 99,
        arch: TinyArch::Llama,
        ..TinySpec::default()
    });
    let c = tiny(TinySpec {
        n_merges: 10,
        ..TinySpec::default()
    });
    let (ma, mb, mc) = (load(&a.path), load(&b.path), load(&c.path));
    let info = ma.info();
    assert_eq!(info.arch, "qwen2");
    assert_eq!(mb.info().arch, "llama");
    assert_eq!(info.vocab_size, 256 + 38 + 3);
    assert_eq!(info.max_context, 512);
    assert_eq!(info.name, "tiny-qwen2-seed0");
    assert_eq!(info.fingerprint.len(), 64);
    // Same tokenizer, different weights: they may pair. Different merges: they may not.
    assert_eq!(info.fingerprint, mb.info().fingerprint);
    assert_ne!(info.fingerprint, mc.info().fingerprint);
    assert_eq!(mc.info().vocab_size, 256 + 10 + 3);
}

#[test]
fn tiny_files_are_deterministic() {
    let (a, b) = (tiny(TinySpec::default()), tiny(TinySpec::default()));
    assert_eq!(
        std::fs::read(&a.path).unwrap(),
        std::fs::read(&b.path).unwrap()
    );
    let c = tiny(TinySpec {
        seed: 1,
        ..TinySpec::default()
    });
    assert_ne!(
        std::fs::read(&a.path).unwrap(),
        std::fs::read(&c.path).unwrap()
    );
}

#[test]
fn invalid_tiny_spec_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let err = write_tiny_gguf(
        &dir.path().join("bad.gguf"),
        &TinySpec {
            hidden: 64,
            weights: TinyWeights::Q4KM,
            ..TinySpec::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, ModelError::Synthetic(_)), "{err:?}");
}

#[test]
fn missing_file_and_unsupported_device_are_clear_errors() {
    let Err(err) = load_gguf(Path::new("/nonexistent/model.gguf"), DeviceKind::Cpu) else {
        panic!("loaded a missing file");
    };
    assert!(matches!(err, ModelError::Io { .. }), "{err:?}");
    if !cfg!(feature = "cuda") {
        let t = tiny(TinySpec::default());
        let Err(err) = load_gguf(&t.path, DeviceKind::Cuda(0)) else {
            panic!("opened CUDA in a CPU build");
        };
        assert!(
            matches!(err, ModelError::DeviceUnavailable { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("cuda"), "{err}");
    }
}

/// The synthetic vocabulary is what the module docs promise.
#[test]
fn tiny_vocabulary_layout() {
    let spec = TinySpec::default();
    let toks = spec.tokens();
    assert_eq!(toks.len(), spec.vocab_size());
    assert_eq!(toks[0], "!");
    assert_eq!(toks[188], "Ā"); // byte 0
    assert!(toks.contains(&"Ġ".to_string()));
    assert_eq!(toks[256], "Ġt");
    assert!(toks.contains(&"Ġthe".to_string()));
    assert_eq!(toks[spec.eos_id() as usize], "<|im_end|>");
    assert_eq!(toks[spec.endoftext_id() as usize], "<|endoftext|>");
    assert_eq!(toks[spec.im_start_id() as usize], "<|im_start|>");
    // Every merge joins two tokens that exist before it.
    for (i, m) in edgespec_model::synthetic::TINY_MERGES.iter().enumerate() {
        let (l, r) = m.split_once(' ').unwrap();
        assert!(toks[..256 + i].iter().any(|t| t == l), "{m}");
        assert!(toks[..256 + i].iter().any(|t| t == r), "{m}");
    }
}

/// A draft head limited to the first ids: those logits are the full head's, bit for bit; the
/// special tokens above stay reachable; every other token is −∞, so it is never drafted.
#[test]
fn limited_head_keeps_the_first_ids_and_the_special_tokens() {
    use edgespec_model::forward::{load_gguf_with, LoadOptions};
    let t = tiny(TinySpec::default());
    let vocab = t.spec.vocab_size();
    let mut full = load(&t.path);
    let opts = LoadOptions {
        head_vocab: Some(260),
    };
    let mut part = load_gguf_with(&t.path, DeviceKind::Cpu, &opts).unwrap();
    let prompt = tokens(3, 9, vocab);
    let a = one(full.as_mut(), req(1, 0, &prompt));
    let b = one(part.as_mut(), req(1, 0, &prompt));
    assert_eq!((a.rows, b.vocab_size), (9, vocab));
    let specials = [t.spec.eos_id(), t.spec.endoftext_id(), t.spec.im_start_id()];
    for r in 0..a.rows {
        let (fa, pb) = (a.row(r), b.row(r));
        assert_rows_eq(&fa[..260], &pb[..260], "kept ids");
        for id in 260..vocab {
            if specials.contains(&(id as u32)) {
                assert_eq!(fa[id].to_bits(), pb[id].to_bits(), "special token {id}");
            } else {
                assert_eq!(pb[id], f32::NEG_INFINITY, "token {id} outside the head");
            }
        }
    }
    // A limit at or above the vocabulary is the whole head.
    let opts = LoadOptions {
        head_vocab: Some(vocab + 5),
    };
    let mut whole = load_gguf_with(&t.path, DeviceKind::Cpu, &opts).unwrap();
    let c = one(whole.as_mut(), req(1, 0, &prompt));
    assert_rows_eq(&a.data, &c.data, "limit above the vocabulary");
}
