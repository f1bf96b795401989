//! The tokenizer on tiny synthetic GGUF files (no download): it builds from any GGUF with the
//! real metadata layout, and agrees with the forward loader's fingerprint.

use std::io::BufReader;

use candle_core::quantized::gguf_file;
use edgespec_model::synthetic::{TinyArch, TinySpec};
use edgespec_model::{ChatMessage, TextTokenizer};
use edgespec_testkit::tiny::TinyModel;

fn tiny(arch: TinyArch) -> (TinySpec, TextTokenizer, gguf_file::Content) {
    let m = TinyModel::new(TinySpec {
        arch,
        ..TinySpec::default()
    });
    let file = std::fs::File::open(&m.path).unwrap();
    let content = gguf_file::Content::read(&mut BufReader::new(file)).unwrap();
    (m.spec.clone(), m.tokenizer(), content)
}

#[test]
fn builds_from_synthetic_metadata() {
    for arch in [TinyArch::Qwen2, TinyArch::Llama] {
        let (spec, tok, content) = tiny(arch);
        assert_eq!(tok.vocab_size(), spec.vocab_size());
        assert!(tok.eos_token_ids().contains(&spec.eos_id()));
        assert!(tok.eos_token_ids().contains(&spec.endoftext_id()));
        assert_eq!(tok.token_to_id("<|im_start|>"), Some(spec.im_start_id()));
        assert_eq!(
            tok.fingerprint(),
            edgespec_model::forward::tokenizer_fingerprint(&content)
        );

        // Merges apply: " the" is one token when `Ġthe` is in the vocabulary.
        if let Some(the) = tok.token_to_id("Ġthe") {
            assert_eq!(tok.encode(" the").unwrap(), vec![the]);
        }
        let text = "def f(x):\n    return x  # the end 你好 👋<|im_end|>";
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids.last(), Some(&spec.eos_id()));
        assert_eq!(tok.decode(&ids).unwrap(), text);

        // The synthetic template has no default system prompt.
        assert_eq!(tok.default_system_prompt(), None);
        assert_eq!(
            tok.apply_chat_template(&[ChatMessage::new("user", "hi")], true),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
