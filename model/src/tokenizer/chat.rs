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

pub(super) fn render_chatml(
    messages: &[ChatMessage],
    default_system: Option<&str>,
    add_generation_prompt: bool,
) -> String {
    let mut out = String::new();
    let mut push = |role: &str, content: &str| {
        out.push_str("<|im_start|>");
        out.push_str(role);
        out.push('\n');
        out.push_str(content);
        out.push_str("<|im_end|>\n");
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
        out.push_str("<|im_start|>assistant\n");
    }
    out
}
