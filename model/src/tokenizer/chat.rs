//! The ChatML conversation format shared by Qwen2.5 and SmolLM2.

use serde::{Deserialize, Serialize};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

const QWEN_SYSTEM: &str = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";
const SMOLLM_SYSTEM: &str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/// The system prompt a model's own template inserts when none is given. The GGUF's Jinja template
/// is not executed; we recognise the known defaults in it, and fall back to Qwen's for qwen2 models
/// without a template.
pub(super) fn default_system_prompt(
    arch: Option<&str>,
    pre: Option<&str>,
    template: Option<&str>,
) -> Option<String> {
    if let Some(t) = template {
        for known in [QWEN_SYSTEM, SMOLLM_SYSTEM] {
            if t.contains(known) {
                return Some(known.to_string());
            }
        }
        return None;
    }
    (arch == Some("qwen2") || pre == Some("qwen2")).then(|| QWEN_SYSTEM.to_string())
}

/// The markers ChatML puts around each message; only these become control tokens.
pub(super) const IM_START: &str = "<|im_start|>";
pub(super) const IM_END: &str = "<|im_end|>";

/// One piece of a rendered conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Segment<'a> {
    /// A template marker: its control token.
    Marker(&'static str),
    /// Text between markers (role names and message content): plain text, whatever it
    /// contains.
    Text(String),
    /// A borrowed plain-text piece.
    Borrowed(&'a str),
}

/// The conversation as markers and plain text: `<|im_start|>` `role\ncontent` `<|im_end|>`
/// `\n` per message, the model's default system prompt first when the conversation has none,
/// and `<|im_start|>` `assistant\n` when `add_generation_prompt`.
pub(super) fn chatml_segments<'a>(
    messages: &'a [ChatMessage],
    default_system: Option<&'a str>,
    add_generation_prompt: bool,
) -> Vec<Segment<'a>> {
    let mut out = Vec::new();
    let mut push = |role: &str, content: &str| {
        out.push(Segment::Marker(IM_START));
        out.push(Segment::Text(format!("{role}\n{content}")));
        out.push(Segment::Marker(IM_END));
        out.push(Segment::Borrowed("\n"));
    };
    if let Some(system) = default_system {
        if messages.first().is_none_or(|m| m.role != "system") {
            push("system", system);
        }
    }
    for m in messages {
        push(&m.role, &m.content);
    }
    if add_generation_prompt {
        out.push(Segment::Marker(IM_START));
        out.push(Segment::Borrowed("assistant\n"));
    }
    out
}

pub(super) fn render_chatml(
    messages: &[ChatMessage],
    default_system: Option<&str>,
    add_generation_prompt: bool,
) -> String {
    chatml_segments(messages, default_system, add_generation_prompt)
        .iter()
        .map(|s| match s {
            Segment::Marker(m) => *m,
            Segment::Text(t) => t.as_str(),
            Segment::Borrowed(t) => t,
        })
        .collect()
}
