//! Building the `tokenizers` BPE from GGUF metadata, the way llama.cpp's converter describes it.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::ModelError;

/// Qwen2's split (its tokenizer.json), also used by llama.cpp for `pre = qwen2`.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's split: like Qwen2's but digits in runs of up to three.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp `llama_token_type`) that are added as special tokens.
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// The tokenizer part of GGUF metadata.
pub(super) struct Metadata {
    pub arch: Option<String>,
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    pub token_types: Vec<i32>,
    pub eos: Option<u32>,
    pub chat_template: Option<String>,
}

fn tok_err(msg: impl Into<String>) -> ModelError {
    ModelError::Tokenizer(msg.into())
}

fn string_array(content: &Content, key: &str) -> Result<Vec<String>, ModelError> {
    let v = content
        .metadata
        .get(key)
        .ok_or_else(|| tok_err(format!("GGUF metadata lacks `{key}`")))?;
    let arr = v.to_vec().map_err(|e| tok_err(format!("`{key}`: {e}")))?;
    arr.iter()
        .map(|x| {
            x.to_string()
                .cloned()
                .map_err(|e| tok_err(format!("`{key}`: {e}")))
        })
        .collect()
}

fn opt_string(content: &Content, key: &str) -> Option<String> {
    content
        .metadata
        .get(key)
        .and_then(|v| v.to_string().ok().cloned())
}

fn as_i32(v: &Value) -> Option<i32> {
    v.to_i32()
        .ok()
        .or_else(|| v.to_u32().ok().and_then(|x| i32::try_from(x).ok()))
}

impl Metadata {
    pub fn read(content: &Content) -> Result<Self, ModelError> {
        let model = opt_string(content, "tokenizer.ggml.model");
        if model.as_deref() != Some("gpt2") {
            return Err(tok_err(format!(
                "only byte-level BPE tokenizers (`tokenizer.ggml.model` = gpt2) are supported, found {model:?}"
            )));
        }
        let tokens = string_array(content, "tokenizer.ggml.tokens")?;
        let merges = string_array(content, "tokenizer.ggml.merges")?;
        let token_types = match content.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| tok_err(format!("`tokenizer.ggml.token_type`: {e}")))?
                .iter()
                .map(|x| as_i32(x).unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let eos = content
            .metadata
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.to_u32().ok());
        Ok(Metadata {
            arch: opt_string(content, "general.architecture"),
            pre: opt_string(content, "tokenizer.ggml.pre"),
            tokens,
            merges,
            token_types,
            eos,
            chat_template: opt_string(content, "tokenizer.chat_template"),
        })
    }

    fn is_special(&self, id: usize) -> bool {
        self.token_types
            .get(id)
            .is_some_and(|&t| is_special_type(t))
    }
}

/// Whether a GGUF token type marks a special token (control or user-defined).
pub(crate) fn is_special_type(token_type: i32) -> bool {
    matches!(token_type, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED)
}

pub(super) struct Built {
    pub tokenizer: Tokenizer,
    pub token_bytes: Vec<Vec<u8>>,
    pub eos: Vec<u32>,
}

fn split(pattern: &str) -> Result<PreTokenizerWrapper, ModelError> {
    Split::new(
        SplitPattern::Regex(pattern.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map(Into::into)
    .map_err(|e| tok_err(format!("bad split regex: {e}")))
}

/// The pipeline (normalise with NFC?, pre-tokenizer, ignore_merges) for a `tokenizer.ggml.pre`.
fn pipeline(pre: Option<&str>) -> Result<(bool, PreTokenizerWrapper, bool), ModelError> {
    let bytes_only = || ByteLevel::new(false, true, false).into();
    Ok(match pre {
        Some("qwen2") | Some("deepseek-r1-qwen") => (
            true,
            Sequence::new(vec![split(QWEN2_SPLIT)?, bytes_only()]).into(),
            false,
        ),
        Some("llama-bpe") | Some("llama3") | Some("smaug-bpe") => (
            false,
            Sequence::new(vec![split(LLAMA3_SPLIT)?, bytes_only()]).into(),
            true,
        ),
        // SmolLM's tokenizer.json: single digits, then GPT-2's byte-level regex.
        Some("smollm") => (
            false,
            Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            false,
        ),
        Some("gpt2") | Some("default") | None => {
            (false, ByteLevel::new(false, true, true).into(), false)
        }
        Some(other) => {
            tracing::warn!(
                pre = other,
                "unknown tokenizer.ggml.pre; using GPT-2's split"
            );
            (false, ByteLevel::new(false, true, true).into(), false)
        }
    })
}

pub(super) fn build(meta: &Metadata) -> Result<Built, ModelError> {
    let vocab: Vocab = meta
        .tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), id as u32))
        .collect();
    let merges = meta
        .merges
        .iter()
        .map(|m| {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| tok_err(format!("malformed merge `{m}`")))?;
            // A merge must make a token of the vocabulary (the BPE builder would refuse it
            // too, but panics first when the result is longer than every token).
            if !vocab.contains_key(&format!("{a}{b}")) {
                return Err(tok_err(format!(
                    "merge `{m}` makes a token that is not in the vocabulary"
                )));
            }
            Ok((a.to_string(), b.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (nfc, pre_tokenizer, ignore_merges) = pipeline(meta.pre.as_deref())?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| tok_err(format!("building the BPE: {e}")))?;

    let mut tokenizer = Tokenizer::new(bpe);
    if nfc {
        tokenizer
            .with_normalizer(Some(NFC))
            .map_err(|e| tok_err(e.to_string()))?;
    }
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> = (0..meta.tokens.len())
        .filter(|&id| meta.is_special(id))
        .map(|id| AddedToken::from(meta.tokens[id].clone(), true))
        .collect();
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| tok_err(format!("adding special tokens: {e}")))?;

    let unbyte = byte_decoder();
    let token_bytes = meta
        .tokens
        .iter()
        .enumerate()
        .map(|(id, t)| {
            if meta.is_special(id) {
                t.as_bytes().to_vec()
            } else {
                unbyte_token(t, &unbyte)
            }
        })
        .collect();

    let mut eos: Vec<u32> = meta.eos.into_iter().collect();
    for name in ["<|im_end|>", "<|endoftext|>"] {
        if let Some(id) = tokenizer.token_to_id(name) {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    Ok(Built {
        tokenizer,
        token_bytes,
        eos,
    })
}

/// GPT-2's byte ↔ printable-char table, inverted: char → byte.
fn byte_decoder() -> std::collections::HashMap<char, u8> {
    let mut printable: Vec<u8> = (b'!'..=b'~')
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut map: std::collections::HashMap<char, u8> =
        printable.iter().map(|&b| (char::from(b), b)).collect();
    printable.sort_unstable();
    let mut next = 256u32;
    for b in 0..=255u8 {
        if printable.binary_search(&b).is_err() {
            if let Some(c) = char::from_u32(next) {
                map.insert(c, b);
            }
            next += 1;
        }
    }
    map
}

fn unbyte_token(token: &str, table: &std::collections::HashMap<char, u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(token.len());
    for c in token.chars() {
        match table.get(&c) {
            Some(&b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}
