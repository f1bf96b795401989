//! Running a checked request and turning its events into an OpenAI response: admission (a
//! generation slot, or 429 with `Retry-After`), tokenising on a blocking thread, then one JSON
//! body or an SSE stream of chunks ending with `data: [DONE]`. The first event is awaited before
//! answering, so a request that fails before producing anything (a fleet that keeps refusing its
//! first block as overloaded included) gets a proper HTTP status even when streaming.
//!
//! A client that goes away drops this future (hyper cancels the handler of a closed
//! connection), and with it the event receiver: the session sees it and closes itself at the
//! coordinator, streaming or not.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::openai::Checked;
use super::unix_secs;
use crate::error::GenError;
use crate::node::Node;
use crate::session::{GenEvent, Summary};

/// Which endpoint is answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Completion,
    Chat,
}

impl Kind {
    fn endpoint(self) -> &'static str {
        match self {
            Kind::Completion => "completions",
            Kind::Chat => "chat_completions",
        }
    }
}

/// Fields every response object repeats.
#[derive(Debug, Clone)]
struct Meta {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    fn usage(&self, s: &Summary) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": s.completion_tokens,
            "total_tokens": self.prompt_tokens + s.completion_tokens,
        })
    }
}

fn extension(s: &Summary, with_ids: bool) -> Value {
    let st = &s.stats;
    let mut v = json!({
        "drafted": st.drafted,
        "accepted": st.accepted,
        "rounds": st.rounds,
        "acceptance_rate": st.acceptance_rate(),
        "gamma_mean": st.gamma_mean(),
        "target_forwards": st.rounds,
        "resyncs": st.resyncs,
        "pipelined_kept": st.pipelined_kept,
    });
    if with_ids {
        v["token_ids"] = json!(s.token_ids);
    }
    v
}

/// Admits a checked request, tokenises it and answers it.
pub(crate) async fn generate(
    node: &Node,
    kind: Kind,
    checked: Result<Checked, ApiError>,
) -> Response {
    let endpoint = kind.endpoint();
    let checked = match checked {
        Ok(c) => c,
        Err(e) => return invalid(node, endpoint, e),
    };
    let admission = match node.admit().await {
        Ok(a) => a,
        Err(e) => return failed(node, endpoint, e),
    };
    // Up to `max_body_bytes` of text: never on an async worker. The slot travels with the work,
    // so a client that leaves meanwhile frees it only once the tokeniser is done.
    let tokenizing = node.clone();
    let tokenized =
        tokio::task::spawn_blocking(move || (checked.tokenize(&tokenizing), admission)).await;
    let (p, admission) = match tokenized {
        Ok((Ok(p), admission)) => (p, admission),
        Ok((Err(e), _)) => return invalid(node, endpoint, e),
        Err(_) => {
            return failed(
                node,
                endpoint,
                GenError::Internal("the prompt could not be tokenized".into()),
            )
        }
    };
    let meta = Meta {
        kind,
        id: format!(
            "{}-{:016x}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            rand::random::<u64>()
        ),
        created: unix_secs(),
        model: node.served_name().to_string(),
        prompt_tokens: p.generate.prompt.len(),
    };
    let mut rx = match node.generate(p.generate, admission) {
        Ok(rx) => rx,
        Err(e) => return failed(node, endpoint, e),
    };
    let first = match rx.recv().await {
        Some(GenEvent::Failed(e)) => return failed(node, endpoint, e),
        Some(ev) => ev,
        None => return failed(node, endpoint, stopped()),
    };
    if p.stream {
        node.metrics().request(endpoint, "ok");
        return sse(meta, first, rx, p.include_usage, p.return_token_ids);
    }
    let mut text = String::new();
    let mut next = Some(first);
    let summary = loop {
        let ev = match next.take() {
            Some(ev) => Some(ev),
            None => rx.recv().await,
        };
        match ev {
            Some(GenEvent::Text(t)) => text.push_str(&t),
            Some(GenEvent::Done(s)) => break s,
            Some(GenEvent::Failed(e)) => return failed(node, endpoint, e),
            None => return failed(node, endpoint, stopped()),
        }
    };
    node.metrics().request(endpoint, "ok");
    let finish = summary.finish_reason.as_str();
    let choice = match kind {
        Kind::Completion => json!({
            "index": 0, "text": text, "logprobs": null, "finish_reason": finish,
        }),
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": finish,
        }),
    };
    let mut body = meta.envelope(false, json!([choice]));
    body["usage"] = meta.usage(&summary);
    body["edgespec"] = extension(&summary, p.return_token_ids);
    Json(body).into_response()
}

fn stopped() -> GenError {
    GenError::Internal("the generation stopped unexpectedly".into())
}

fn invalid(node: &Node, endpoint: &'static str, e: ApiError) -> Response {
    node.metrics().request(endpoint, "invalid");
    e.into_response()
}

/// A failure before the response started; an overloaded node or fleet says when to come back.
fn failed(node: &Node, endpoint: &'static str, e: GenError) -> Response {
    let overloaded = matches!(e, GenError::Overloaded(_));
    node.metrics()
        .request(endpoint, if overloaded { "overloaded" } else { "error" });
    let mut answer = ApiError::from(e);
    if overloaded {
        answer.retry_after = Some(node.limits().retry_after.as_secs_f64().ceil() as u64);
    }
    answer.into_response()
}

struct SseState {
    meta: Meta,
    rx: mpsc::Receiver<GenEvent>,
    pending: Option<GenEvent>,
    include_usage: bool,
    token_ids: bool,
    done: bool,
}

fn data(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

fn sse(
    meta: Meta,
    first: GenEvent,
    rx: mpsc::Receiver<GenEvent>,
    include_usage: bool,
    token_ids: bool,
) -> Response {
    let opening = match meta.kind {
        Kind::Chat => vec![data(&meta.envelope(
            true,
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
                    "logprobs": null, "finish_reason": null}]),
        ))],
        Kind::Completion => Vec::new(),
    };
    let state = SseState {
        meta,
        rx,
        pending: Some(first),
        include_usage,
        token_ids,
        done: false,
    };
    let body = stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        let ev = match st.pending.take() {
            Some(ev) => Some(ev),
            None => st.rx.recv().await,
        };
        let events = chunks(&mut st, ev);
        Some((events, st))
    });
    let events = stream::iter(vec![opening])
        .chain(body)
        .flat_map(|v| stream::iter(v.into_iter().map(Ok::<_, Infallible>)));
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn chunks(st: &mut SseState, ev: Option<GenEvent>) -> Vec<Event> {
    let m = &st.meta;
    let choice = |text: Option<&str>, finish: Option<&str>| match m.kind {
        Kind::Completion => json!([{"index": 0, "text": text.unwrap_or(""), "logprobs": null,
                                    "finish_reason": finish}]),
        Kind::Chat => {
            let delta = text.map_or(json!({}), |t| json!({"content": t}));
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}])
        }
    };
    match ev {
        Some(GenEvent::Text(t)) => vec![data(&m.envelope(true, choice(Some(&t), None)))],
        Some(GenEvent::Done(s)) => {
            st.done = true;
            let mut last = m.envelope(true, choice(None, Some(s.finish_reason.as_str())));
            last["edgespec"] = extension(&s, st.token_ids);
            let mut out = vec![data(&last)];
            if st.include_usage {
                let mut usage = m.envelope(true, json!([]));
                usage["usage"] = m.usage(&s);
                out.push(data(&usage));
            }
            out.push(Event::default().data("[DONE]"));
            out
        }
        Some(GenEvent::Failed(e)) => {
            st.done = true;
            vec![
                data(&ApiError::from(e).to_json()),
                Event::default().data("[DONE]"),
            ]
        }
        None => {
            st.done = true;
            vec![
                data(&ApiError::from(stopped()).to_json()),
                Event::default().data("[DONE]"),
            ]
        }
    }
}
