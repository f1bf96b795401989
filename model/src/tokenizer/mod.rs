//! The text tokenizer, built from a GGUF file's own metadata (`tokenizer.ggml.*`): a byte-level
//! BPE (`tokenizers` crate) with the pre-tokenizer named by `tokenizer.ggml.pre`, the ChatML chat
//! format, incremental detokenisation, and the vocabulary fingerprint that decides whether two
//! models can pair for speculative decoding.

mod build;

pub(crate) use build::is_special_type;
mod chat;
mod stream;

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use sha2::{Digest, Sha256};

pub use chat::ChatMessage;
pub use stream::StreamDecoder;

use crate::ModelError;

/// A tokenizer read from GGUF metadata. Cheap to clone.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    /// The same tokenizer with special-token matching off: text that spells a control token
    /// (`<|im_start|>`) is encoded as the characters it is. For anything a user wrote.
    plain: Arc<tokenizers::Tokenizer>,
    /// Raw bytes of every token id (byte-level mapping undone; special tokens verbatim).
    token_bytes: Arc<Vec<Vec<u8>>>,
    eos: Vec<u32>,
    fingerprint: String,
    default_system: Option<String>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.token_bytes.len())
            .field("eos", &self.eos)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl TextTokenizer {
    /// Read the metadata of the GGUF at `path` (tensor data is not read).
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let mut file = std::fs::File::open(path).map_err(|e| ModelError::Io {
            context: format!("opening {}", path.display()),
            source: e,
        })?;
        let mut reader = std::io::BufReader::new(&mut file);
        let content = crate::forward::read_gguf_content(&mut reader, &path.display().to_string())?;
        Self::from_gguf_content(&content)
    }

    /// Build from already-parsed GGUF metadata.
    pub fn from_gguf_content(content: &gguf_file::Content) -> Result<Self, ModelError> {
        let meta = build::Metadata::read(content)?;
        let built = build::build(&meta)?;
        let mut plain = built.tokenizer.clone();
        plain.set_encode_special_tokens(true);
        let default_system = chat::default_system_prompt(
            meta.arch.as_deref(),
            meta.pre.as_deref(),
            meta.chat_template.as_deref(),
        );
        Ok(TextTokenizer {
            inner: Arc::new(built.tokenizer),
            plain: Arc::new(plain),
            token_bytes: Arc::new(built.token_bytes),
            eos: built.eos,
            fingerprint: fingerprint_from_metadata(&meta.tokens, &meta.merges),
            default_system,
        })
    }

    /// Token ids for `text`; special tokens written in the text (`<|im_end|>`) become their ids.
    /// No BOS is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| ModelError::Tokenizer(format!("encoding failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids for `text` as plain text: strings that spell special tokens are encoded as
    /// ordinary characters, never as control tokens. No BOS is added.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .plain
            .encode_fast(text, false)
            .map_err(|e| ModelError::Tokenizer(format!("encoding failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of a conversation in ChatML (see [`TextTokenizer::apply_chat_template`]):
    /// the template's own markers become their control tokens, everything the messages say
    /// (roles and content) is encoded as plain text, so a user who writes `<|im_start|>` or
    /// `<|endoftext|>` into a message cannot inject a turn or end the prompt. For conversations
    /// without such strings the ids equal `encode(&apply_chat_template(..))`.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, ModelError> {
        let mut ids = Vec::new();
        for segment in chat::chatml_segments(
            messages,
            self.default_system.as_deref(),
            add_generation_prompt,
        ) {
            match segment {
                chat::Segment::Marker(m) => match self.inner.token_to_id(m) {
                    Some(id) => ids.push(id),
                    // A vocabulary without ChatML markers: they are plain text there too.
                    None => ids.extend(self.encode_plain(m)?),
                },
                chat::Segment::Text(t) => ids.extend(self.encode_plain(&t)?),
                chat::Segment::Borrowed(t) => ids.extend(self.encode_plain(t)?),
            }
        }
        Ok(ids)
    }

    /// Text for `ids`, special tokens included verbatim; invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend_from_slice(self.bytes_of(id)?);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The raw bytes a token stands for.
    pub fn bytes_of(&self, id: u32) -> Result<&[u8], ModelError> {
        self.token_bytes
            .get(id as usize)
            .map(Vec::as_slice)
            .ok_or(ModelError::TokenOutOfVocab {
                vocab_size: self.token_bytes.len(),
            })
    }

    /// Number of token ids (= the GGUF token list, = the logit row length).
    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Tokens that end a generation: the GGUF eos plus `<|im_end|>` / `<|endoftext|>` if present.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Id of a token string (special tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// See [`fingerprint_from_metadata`].
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The system prompt the model's template inserts when a conversation has none.
    pub fn default_system_prompt(&self) -> Option<&str> {
        self.default_system.as_deref()
    }

    /// Render a conversation in ChatML (`<|im_start|>role\ncontent<|im_end|>\n` per message),
    /// adding the model's default system prompt when the first message is not a system one, and
    /// `<|im_start|>assistant\n` when `add_generation_prompt`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> String {
        chat::render_chatml(
            messages,
            self.default_system.as_deref(),
            add_generation_prompt,
        )
    }

    /// An incremental detokeniser over this vocabulary.
    pub fn stream_decoder(&self) -> StreamDecoder {
        StreamDecoder::new(Arc::clone(&self.token_bytes))
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Vocabulary fingerprint: lowercase hex sha256 over each token (in id order) followed by a NUL
/// byte, then one `\n`, then each merge (`"a b"`) followed by a NUL byte. The same definition as
/// `forward::tokenizer_fingerprint` (a test holds them equal). Two models may pair iff their
/// fingerprints match.
pub fn fingerprint_from_metadata(tokens: &[String], merges: &[String]) -> String {
    let mut h = Sha256::new();
    for t in tokens {
        h.update(t.as_bytes());
        h.update([0u8]);
    }
    h.update(b"\n");
    for m in merges {
        h.update(m.as_bytes());
        h.update([0u8]);
    }
    hex::encode(h.finalize())
}
