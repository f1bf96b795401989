//! OpenAI request bodies and their validation into a [`GenerateRequest`], in two steps: `check`
//! (everything that does not need the prompt's tokens, cheap, before admission) and
//! [`Checked::tokenize`] (the prompt's tokens and what depends on them, only once the request
//! holds a generation slot, off the async workers). Unknown fields are ignored (clients send
//! many); fields we cannot honour are refused with a 400 naming them.

use edgespec_model::ChatMessage;
use edgespec_specdec::{DraftMethod, SamplingParams};
use serde::Deserialize;

use super::error::ApiError;
use crate::node::Node;
use crate::session::GenerateRequest;

/// Fields shared by both endpoints.
#[derive(Debug, Deserialize)]
pub(crate) struct CommonParams {
    pub model: String,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Extension: top-k filter (0 or -1: off).
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<StopParam>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Extension: add the completion's token ids to the `edgespec` object of the response.
    pub return_token_ids: Option<bool>,
    /// Extension: the kind of prompt (one of the node's `metrics.prompt_kinds`), for the
    /// per-kind acceptance metrics.
    pub prompt_kind: Option<String>,
    /// Extension: how to draft this request (`model`, `lookup` or `hybrid`); the node's
    /// `drafting.method` when absent.
    pub draft_method: Option<String>,
}

/// `stream_options`.
#[derive(Debug, Deserialize, Default)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum StopParam {
    One(String),
    Many(Vec<String>),
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct CompletionRequest {
    #[serde(flatten)]
    pub common: CommonParams,
    pub prompt: Option<PromptParam>,
    pub echo: Option<bool>,
    pub logprobs: Option<serde_json::Value>,
    pub best_of: Option<i64>,
    pub suffix: Option<String>,
}

/// `prompt`: text or token ids, alone or as a one-element batch.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum PromptParam {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    #[serde(flatten)]
    pub common: CommonParams,
    pub messages: Vec<ChatMessageParam>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
}

/// One chat message.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatMessageParam {
    pub role: String,
    pub content: Option<ContentParam>,
}

/// Message content: a string or a list of text parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum ContentParam {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Deserialize)]
pub(crate) struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// The prompt before tokenisation.
#[derive(Debug)]
enum PromptSource {
    /// Plain text (`/v1/completions`).
    Text(String),
    /// Token ids, already checked against the vocabulary.
    Tokens(Vec<u32>),
    /// Chat messages, to go through the chat template.
    Chat(Vec<ChatMessage>),
}

/// A request that passed every check that does not need its tokens.
#[derive(Debug)]
pub(crate) struct Checked {
    prompt: PromptSource,
    prompt_param: &'static str,
    /// Asked for, already within `limits.max_tokens`.
    max_tokens: Option<usize>,
    sampling: SamplingParams,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
    return_token_ids: bool,
    prompt_kind: Option<String>,
    method: Option<DraftMethod>,
}

/// A validated request.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub generate: GenerateRequest,
    pub stream: bool,
    pub include_usage: bool,
    pub return_token_ids: bool,
}

/// Parses a JSON body, mapping syntax and type errors to 400.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("Invalid JSON body: {e}")))
}

impl CompletionRequest {
    /// Validates everything but the prompt's length.
    pub fn check(self, node: &Node) -> Result<Checked, ApiError> {
        check_model(&self.common, node)?;
        if self.echo == Some(true) {
            return Err(ApiError::invalid(Some("echo"), "echo is not supported"));
        }
        if self.logprobs.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(ApiError::invalid(
                Some("logprobs"),
                "logprobs are not supported",
            ));
        }
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(ApiError::invalid(Some("best_of"), "best_of must be 1"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid(Some("suffix"), "suffix is not supported"));
        }
        let prompt = match self.prompt {
            None => return Err(ApiError::invalid(Some("prompt"), "prompt is required")),
            Some(PromptParam::Text(t)) => PromptSource::Text(t),
            Some(PromptParam::Texts(mut ts)) if ts.len() == 1 => PromptSource::Text(ts.remove(0)),
            Some(PromptParam::Tokens(ids)) => PromptSource::Tokens(ids),
            Some(PromptParam::TokenLists(mut ls)) if ls.len() == 1 => {
                PromptSource::Tokens(ls.remove(0))
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    Some("prompt"),
                    "only one prompt per request is supported",
                ))
            }
        };
        if let PromptSource::Tokens(ids) = &prompt {
            let vocab = node.model_info().vocab_size;
            if let Some(t) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(ApiError::invalid(
                    Some("prompt"),
                    format!("token id {t} is outside the vocabulary (size {vocab})"),
                ));
            }
        }
        check_common(self.common, prompt, None, "prompt", node)
    }
}

impl ChatRequest {
    /// Validates everything but the prompt's length.
    pub fn check(self, node: &Node) -> Result<Checked, ApiError> {
        check_model(&self.common, node)?;
        if self.logprobs == Some(true) {
            return Err(ApiError::invalid(
                Some("logprobs"),
                "logprobs are not supported",
            ));
        }
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                Some("messages"),
                "messages must not be empty",
            ));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for m in self.messages {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::invalid(
                        Some("messages"),
                        format!(
                            "unsupported message role `{other}` (use system, user or assistant)"
                        ),
                    ))
                }
            };
            let content = match m.content {
                None => String::new(),
                Some(ContentParam::Text(t)) => t,
                Some(ContentParam::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    Some("messages"),
                                    format!("unsupported content part `{kind}` (only text)"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            messages.push(ChatMessage::new(role, content));
        }
        check_common(
            self.common,
            PromptSource::Chat(messages),
            self.max_completion_tokens,
            "messages",
            node,
        )
    }
}

fn check_model(c: &CommonParams, node: &Node) -> Result<(), ApiError> {
    if c.model != node.served_name() {
        return Err(ApiError::unknown_model(&c.model, node.served_name()));
    }
    Ok(())
}

fn check_common(
    c: CommonParams,
    prompt: PromptSource,
    max_completion_tokens: Option<i64>,
    prompt_param: &'static str,
    node: &Node,
) -> Result<Checked, ApiError> {
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(Some("n"), "only n = 1 is supported"));
    }
    for (name, v) in [
        ("presence_penalty", c.presence_penalty),
        ("frequency_penalty", c.frequency_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::invalid(
                Some(name),
                format!("{name} is not supported"),
            ));
        }
    }
    let limits = node.limits();
    let max_tokens = match max_completion_tokens.or(c.max_tokens) {
        None => None,
        Some(m) if m < 1 => {
            return Err(ApiError::invalid(
                Some("max_tokens"),
                "max_tokens must be at least 1",
            ))
        }
        Some(m) if m > i64::from(limits.max_tokens) => {
            return Err(ApiError::invalid(
                Some("max_tokens"),
                format!(
                    "max_tokens is {m}; this server allows at most {}",
                    limits.max_tokens
                ),
            ))
        }
        Some(m) => Some(m as usize),
    };
    let sampling = sampling(&c)?;
    let method = draft_method(c.draft_method.as_deref(), node)?;
    let stop = match c.stop {
        None => Vec::new(),
        Some(StopParam::One(s)) => vec![s],
        Some(StopParam::Many(v)) => v,
    };
    // Every stop string is searched for in the held-back text after each token: their number
    // and length bound that work.
    if stop.len() > limits.max_stop_strings {
        return Err(ApiError::invalid(
            Some("stop"),
            format!(
                "at most {} stop strings are supported",
                limits.max_stop_strings
            ),
        ));
    }
    if stop.iter().any(|s| s.len() > limits.max_stop_len) {
        return Err(ApiError::invalid(
            Some("stop"),
            format!(
                "a stop string may be at most {} bytes long",
                limits.max_stop_len
            ),
        ));
    }
    Ok(Checked {
        prompt,
        prompt_param,
        max_tokens,
        sampling,
        stop,
        stream: c.stream.unwrap_or(false),
        include_usage: c.stream_options.is_some_and(|o| o.include_usage),
        return_token_ids: c.return_token_ids.unwrap_or(false),
        prompt_kind: c.prompt_kind,
        method,
    })
}

/// The extension field `draft_method`: one of the methods, and one this node can draft with.
fn draft_method(asked: Option<&str>, node: &Node) -> Result<Option<DraftMethod>, ApiError> {
    let Some(asked) = asked else { return Ok(None) };
    let method: DraftMethod = asked.parse().map_err(|_| {
        let allowed: Vec<String> = DraftMethod::ALL
            .iter()
            .map(|m| format!("\"{m}\""))
            .collect();
        ApiError::invalid(
            Some("draft_method"),
            format!(
                "unknown draft_method {asked:?}; allowed values: {}",
                allowed.join(", ")
            ),
        )
    })?;
    if method.uses_model() && !node.has_draft_model() {
        return Err(ApiError::invalid(
            Some("draft_method"),
            format!(
                "draft_method \"{method}\" needs a draft model and this node has none; \
                 it drafts by \"lookup\" only"
            ),
        ));
    }
    Ok(Some(method))
}

impl Checked {
    /// Tokenises the prompt and checks its length against the limits and the context window.
    /// Up to `limits.max_body_bytes` of text: run it on a blocking thread, once admitted.
    pub fn tokenize(self, node: &Node) -> Result<Prepared, ApiError> {
        let param = self.prompt_param;
        let unreadable = || ApiError::invalid(Some(param), "the text could not be tokenized");
        let prompt = match self.prompt {
            // A raw prompt is plain text: strings that spell control tokens stay text (a client
            // that embeds untrusted text in its prompt cannot have it end the prompt or open a
            // turn).
            PromptSource::Text(t) => node
                .tokenizer()
                .encode_plain(&t)
                .map_err(|_| unreadable())?,
            PromptSource::Tokens(ids) => ids,
            // The template's markers become control tokens; what the messages say never does.
            PromptSource::Chat(m) => node
                .tokenizer()
                .encode_chat(&m, true)
                .map_err(|_| unreadable())?,
        };
        if prompt.is_empty() {
            return Err(ApiError::invalid(
                Some(param),
                "the prompt must not be empty",
            ));
        }
        let limits = node.limits();
        let context = node.model_info().max_context;
        let max_prompt = (limits.max_prompt_tokens as usize).min(context.saturating_sub(1));
        if prompt.len() > max_prompt {
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::invalid(
                    Some(param),
                    format!(
                        "The prompt has {} tokens; this server accepts at most {max_prompt} \
                         (model context {context}).",
                        prompt.len()
                    ),
                )
            });
        }
        let room = context - prompt.len();
        let max_new_tokens = match self.max_tokens {
            None => (limits.default_max_tokens as usize).min(room),
            Some(m) if m > room => {
                return Err(ApiError {
                    code: Some("context_length_exceeded"),
                    ..ApiError::invalid(
                        Some("max_tokens"),
                        format!(
                            "This model's maximum context length is {context} tokens. However, \
                             you requested {} tokens ({} in the prompt, {m} for the completion).",
                            prompt.len() + m,
                            prompt.len()
                        ),
                    )
                })
            }
            Some(m) => m,
        };
        Ok(Prepared {
            generate: GenerateRequest {
                prompt,
                max_new_tokens,
                sampling: self.sampling,
                stop: self.stop,
                overload_wait: limits.admission_wait,
                prompt_kind: self.prompt_kind,
                method: self.method,
            },
            stream: self.stream,
            include_usage: self.include_usage,
            return_token_ids: self.return_token_ids,
        })
    }
}

fn sampling(c: &CommonParams) -> Result<SamplingParams, ApiError> {
    // OpenAI's defaults: temperature 1, top_p 1.
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            Some("temperature"),
            "temperature must be between 0 and 2",
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(Some("top_p"), "top_p must be in (0, 1]"));
    }
    let top_k = match c.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k if k > 0 && k <= i64::from(u32::MAX) => k as u32,
        _ => {
            return Err(ApiError::invalid(
                Some("top_k"),
                "top_k must be -1, 0 or positive",
            ))
        }
    };
    let seed = match c.seed {
        Some(s) => s as u64,
        None => rand::random(),
    };
    Ok(SamplingParams {
        temperature,
        top_k,
        top_p,
        seed,
    })
}
