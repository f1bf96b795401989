//! A small OpenAI-API client for the demo, the end-to-end tests and the benchmarks: one chat
//! completion, streamed over SSE, with the answer text and edgespec's statistics.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use serde_json::{json, Value};

/// One chat request.
#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    /// User message.
    pub prompt: String,
    /// Completion budget.
    pub max_tokens: u32,
    /// 0 = greedy.
    pub temperature: f32,
    /// RNG seed (sampling).
    pub seed: Option<u64>,
    /// Top-k filter (edgespec extension; None = off).
    pub top_k: Option<u32>,
    /// Drafting method of this request (edgespec extension `draft_method`; None = the draft
    /// node's `drafting.method`).
    pub draft_method: Option<edgespec_specdec::DraftMethod>,
    /// Prompt kind for the draft node's per-kind metrics (edgespec extension `prompt_kind`).
    pub prompt_kind: Option<String>,
}

/// The answer and what edgespec reports about producing it.
#[derive(Debug, Clone, Default)]
pub struct ChatOutcome {
    /// Generated text.
    pub text: String,
    /// Completion tokens (from `usage`).
    pub completion_tokens: u64,
    /// Prompt tokens (from `usage`).
    pub prompt_tokens: u64,
    /// Wall time from request to the last byte.
    pub elapsed: Duration,
    /// Time to the first content chunk.
    pub first_token: Option<Duration>,
    /// The response's `edgespec` extension object (drafted, accepted, rounds, ...), if sent.
    pub stats: Option<Value>,
    /// `finish_reason` of the choice.
    pub finish_reason: Option<String>,
    /// The completion's token ids (eos included), from the `edgespec` extension: the client
    /// always asks for them (`return_token_ids`), so tests compare ids, not text.
    pub token_ids: Vec<u32>,
}

impl ChatOutcome {
    /// Completion tokens per second of wall time.
    pub fn tokens_per_s(&self) -> f64 {
        self.completion_tokens as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A numeric field of the `edgespec` extension.
    pub fn stat(&self, key: &str) -> Option<f64> {
        self.stats.as_ref()?.get(key)?.as_f64()
    }
}

/// Streams one chat completion from `base` (e.g. `http://127.0.0.1:8080/v1`), calling
/// `on_text` with every piece of text as it arrives.
pub async fn stream_chat(
    client: &reqwest::Client,
    base: &str,
    req: &ChatRequest,
    mut on_text: impl FnMut(&str),
) -> Result<ChatOutcome> {
    let mut body = json!({
        "model": "edgespec",
        "messages": [{"role": "user", "content": req.prompt}],
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "stream": true,
        "stream_options": {"include_usage": true},
        "return_token_ids": true,
    });
    if let Some(seed) = req.seed {
        body["seed"] = json!(seed);
    }
    if let Some(k) = req.top_k {
        body["top_k"] = json!(k);
    }
    if let Some(m) = req.draft_method {
        body["draft_method"] = json!(m.label());
    }
    if let Some(k) = &req.prompt_kind {
        body["prompt_kind"] = json!(k);
    }
    let started = Instant::now();
    let resp = client
        .post(format!("{base}/chat/completions"))
        .json(&body)
        .send()
        .await
        .context("sending the chat request")?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        bail!("chat request failed with {status}: {text}");
    }
    let mut out = ChatOutcome::default();
    let mut buf = String::new();
    let mut stream = resp.bytes_stream();
    let mut done = false;
    while let Some(chunk) = stream.next().await {
        buf.push_str(std::str::from_utf8(
            &chunk.context("reading the SSE stream")?,
        )?);
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                let data = data.trim();
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let v: Value =
                    serde_json::from_str(data).with_context(|| format!("bad SSE chunk: {data}"))?;
                if let Some(e) = v.get("error") {
                    return Err(anyhow!("server error mid-stream: {e}"));
                }
                absorb_chunk(&v, &mut out, started, &mut on_text);
            }
        }
    }
    if !done {
        bail!("the stream ended without data: [DONE]");
    }
    out.elapsed = started.elapsed();
    Ok(out)
}

fn absorb_chunk(
    v: &Value,
    out: &mut ChatOutcome,
    started: Instant,
    on_text: &mut impl FnMut(&str),
) {
    if let Some(choice) = v["choices"].get(0) {
        if let Some(t) = choice["delta"]["content"].as_str() {
            if !t.is_empty() {
                out.first_token.get_or_insert_with(|| started.elapsed());
                out.text.push_str(t);
                on_text(t);
            }
        }
        if let Some(r) = choice["finish_reason"].as_str() {
            out.finish_reason = Some(r.to_string());
        }
    }
    if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
        out.completion_tokens = u["completion_tokens"].as_u64().unwrap_or(0);
        out.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
    }
    if let Some(s) = v.get("edgespec").filter(|s| !s.is_null()) {
        if let Some(ids) = s["token_ids"].as_array() {
            out.token_ids = ids
                .iter()
                .filter_map(|i| i.as_u64().and_then(|i| u32::try_from(i).ok()))
                .collect();
        }
        out.stats = Some(s.clone());
    }
}
