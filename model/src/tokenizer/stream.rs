//! Incremental detokenisation: emit text as soon as it is complete UTF-8.

use std::sync::Arc;

/// Turns a stream of token ids into text pieces. Bytes of an unfinished multi-byte character are
/// held back until it completes; invalid bytes become U+FFFD exactly as `String::from_utf8_lossy`
/// would place them, so the concatenation of every `push` result and `finish()` equals
/// `TextTokenizer::decode` of all the ids.
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    token_bytes: Arc<Vec<Vec<u8>>>,
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub(super) fn new(token_bytes: Arc<Vec<Vec<u8>>>) -> Self {
        StreamDecoder {
            token_bytes,
            pending: Vec::new(),
        }
    }

    /// Add one token; returns the text it completes, if any. Ids outside the vocabulary add
    /// nothing (`decode` rejects them).
    pub fn push(&mut self, token: u32) -> Option<String> {
        if let Some(bytes) = self.token_bytes.get(token as usize) {
            self.pending.extend_from_slice(bytes);
        }
        let mut out = String::new();
        let mut consumed = 0;
        loop {
            match std::str::from_utf8(&self.pending[consumed..]) {
                Ok(s) => {
                    out.push_str(s);
                    consumed = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = consumed + e.valid_up_to();
                    // Valid by construction: `valid_up_to` bytes passed the check above.
                    out.push_str(&String::from_utf8_lossy(&self.pending[consumed..valid]));
                    match e.error_len() {
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            consumed = valid + bad;
                        }
                        None => {
                            consumed = valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..consumed);
        (!out.is_empty()).then_some(out)
    }

    /// Whatever is still held back (an unfinished character becomes U+FFFD); resets the decoder.
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }

    /// Bytes held back waiting for the rest of a character.
    pub fn pending_bytes(&self) -> usize {
        self.pending.len()
    }
}
