//! The OpenAI-compatible API against a scripted coordinator: every endpoint, JSON and SSE, stop
//! strings, usage and the `edgespec` extension, client disconnects, and bad requests.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{sse_chunks, sse_events, streamed_text, Harness};

const PROMPT: &str = "def fib(n): the answer is";

async fn post(h: &Harness, path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(h.node.url(path))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn metrics_text(h: &Harness) -> String {
    reqwest::get(h.node.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_is_counted_by_the_prompt_kind_a_request_names() {
    let h = Harness::start(|_, st| st.metrics.prompt_kinds = vec!["code".into()]).await;
    for kind in [Some("code"), Some("poetry"), None] {
        let mut body =
            json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0});
        if let Some(k) = kind {
            body["prompt_kind"] = json!(k);
        }
        assert_eq!(post(&h, "/v1/completions", body).await.status(), 200);
    }
    let metrics = metrics_text(&h).await;
    let rounds = |kind: &str| -> u64 {
        let prefix = format!("edgespec_draft_kind_rounds_total{{kind=\"{kind}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // A listed kind keeps its name; an unlisted one is "other", none is "unlabelled".
    for kind in ["code", "other", "unlabelled"] {
        assert!(rounds(kind) >= 1, "no rounds for kind {kind} in\n{metrics}");
    }
    assert!(
        !metrics.contains("poetry"),
        "a client must not add labels:\n{metrics}"
    );
    assert!(metrics.contains("edgespec_draft_kind_accepted_tokens_total{kind=\"code\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_healthz_and_metrics() {
    let h = Harness::start(|_, _| {}).await;
    let models: Value = reqwest::get(h.node.url("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["object"], "model");

    let health = reqwest::get(h.node.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);

    let r = post(
        &h,
        "/v1/completions",
        json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let metrics = metrics_text(&h).await;
    for name in [
        "edgespec_draft_rounds_total",
        "edgespec_draft_drafted_tokens_total",
        "edgespec_draft_accepted_tokens_total",
        "edgespec_draft_requests_total{endpoint=\"completions\",outcome=\"ok\"} 1",
        "edgespec_draft_coordinator_connected 1",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }
    assert_eq!(
        h.coordinator.record().probe_replies,
        1,
        "probes are answered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_equals_the_targets_greedy_output() {
    let h = Harness::start(|_, _| {}).await;
    let (text, n, reason) = h.expected(PROMPT, 40);
    let r = post(
        &h,
        "/v1/completions",
        json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], text);
    assert_eq!(v["choices"][0]["finish_reason"], reason);
    let prompt_tokens = h.model.tokenizer.encode(PROMPT).unwrap().len();
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(v["usage"]["completion_tokens"], n);
    assert_eq!(v["usage"]["total_tokens"], prompt_tokens + n);
    let ext = &v["edgespec"];
    assert!(ext["rounds"].as_u64().unwrap() >= 1);
    assert!(ext["drafted"].as_u64().unwrap() >= ext["accepted"].as_u64().unwrap());
    assert!(
        ext["accepted"].as_u64().unwrap() > 0,
        "the target mostly agrees: {ext}"
    );
    assert!(ext["acceptance_rate"].as_f64().unwrap() > 0.0);
    assert!(ext["gamma_mean"].as_f64().unwrap() > 0.0);
    assert_eq!(ext["target_forwards"], ext["rounds"]);
    assert!(
        h.coordinator.record().invalid.is_empty(),
        "{:?}",
        h.coordinator.record()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_uses_the_chat_template() {
    let h = Harness::start(|_, _| {}).await;
    let ids = h.chat_prompt("write the fib function");
    let (text, n, reason) = h.expected_ids(&ids, 30);
    let r = post(
        &h,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": [{"role": "user", "content": "write the fib function"}],
               "max_tokens": 30, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], text);
    assert_eq!(v["choices"][0]["finish_reason"], reason);
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    assert_eq!(v["usage"]["completion_tokens"], n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_completion_and_chat_deliver_the_same_text_in_chunks() {
    let h = Harness::start(|_, _| {}).await;
    let (text, n, reason) = h.expected(PROMPT, 40);
    let r = post(
        &h,
        "/v1/completions",
        json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "temperature": 0,
               "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse_events(r).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks = sse_chunks(&events);
    assert_eq!(streamed_text(&chunks), text);
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    let finish = chunks
        .iter()
        .find(|c| !c["choices"][0]["finish_reason"].is_null())
        .expect("a chunk with finish_reason");
    assert_eq!(finish["choices"][0]["finish_reason"], reason);
    assert!(finish["edgespec"]["rounds"].as_u64().unwrap() >= 1);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], n);

    let ids = h.chat_prompt("hello");
    let (text, _, reason) = h.expected_ids(&ids, 25);
    let r = post(
        &h,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
               "max_tokens": 25, "temperature": 0, "stream": true}),
    )
    .await;
    let events = sse_events(r).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks = sse_chunks(&events);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_end_the_output_and_are_trimmed() {
    let h = Harness::start(|_, _| {}).await;
    let (full, _, _) = h.expected(PROMPT, 60);
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 12, "need a longer expected output: {full:?}");
    let stop: String = chars[8..11].iter().collect();
    let cut = full.find(&stop).unwrap();
    for stream in [false, true] {
        let r = post(
            &h,
            "/v1/completions",
            json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 60, "temperature": 0,
                   "stop": ["<never>", stop], "stream": stream}),
        )
        .await;
        let (text, finish) = if stream {
            let chunks = sse_chunks(&sse_events(r).await);
            (
                streamed_text(&chunks),
                chunks.last().unwrap()["choices"][0]["finish_reason"].clone(),
            )
        } else {
            let v: Value = r.json().await.unwrap();
            (
                v["choices"][0]["text"].as_str().unwrap().to_string(),
                v["choices"][0]["finish_reason"].clone(),
            )
        };
        assert_eq!(text, full[..cut], "stream={stream}");
        assert_eq!(finish, "stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_closes_its_session() {
    let h = Harness::start(|s, _| s.block_delay = Duration::from_millis(40)).await;
    let (_, n, _) = h.expected(PROMPT, 200);
    assert_eq!(
        n, 200,
        "the prompt must not hit eos, or the test proves nothing"
    );
    let mut r = post(
        &h,
        "/v1/completions",
        json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 200, "temperature": 0,
               "stream": true}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap();
    assert!(first.is_some());
    drop(r);
    h.session_closed_early().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_with_the_right_status() {
    let h = Harness::start(|_, st| st.limits.max_body_bytes = 64 * 1024).await;
    let client = reqwest::Client::new();
    let check = |v: &Value| {
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e["type"].is_string(), "{v}");
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    };

    let r = client
        .post(h.node.url("/v1/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    check(&r.json().await.unwrap());

    let r = post(
        &h,
        "/v1/completions",
        json!({"model": "gpt-4", "prompt": "hi"}),
    )
    .await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    check(&v);
    assert_eq!(v["error"]["code"], "model_not_found");

    let r = post(&h, "/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000})).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    check(&v);
    assert_eq!(v["error"]["param"], "max_tokens");

    // The tiny model's context is 512 tokens.
    let long = "x ".repeat(600);
    let r = post(
        &h,
        "/v1/completions",
        json!({"model": "tiny", "prompt": long, "max_tokens": 4}),
    )
    .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    check(&v);
    assert_eq!(v["error"]["code"], "context_length_exceeded");

    let prompt = "x ".repeat(200);
    let r = post(
        &h,
        "/v1/completions",
        json!({"model": "tiny", "prompt": prompt, "max_tokens": 250}),
    )
    .await;
    assert_eq!(r.status(), 400, "prompt + max_tokens over the context");

    for body in [
        json!({"model": "tiny", "prompt": "hi", "temperature": 3}),
        json!({"model": "tiny", "prompt": "hi", "n": 2}),
        json!({"model": "tiny", "prompt": ""}),
        json!({"model": "tiny"}),
        json!({"model": "tiny", "prompt": "hi", "max_tokens": "many"}),
        json!({"model": "tiny", "messages": []}),
    ] {
        let path = if body.get("messages").is_some() {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let r = post(&h, path, body.clone()).await;
        assert_eq!(r.status(), 400, "{body}");
        check(&r.json().await.unwrap());
    }

    let r = client
        .post(h.node.url("/v1/completions"))
        .header("content-type", "application/json")
        .body(vec![b' '; 100 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    check(&r.json().await.unwrap());

    let r = client.get(h.node.url("/v1/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        h.coordinator.record().blocks,
        0,
        "no bad request reached the coordinator"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_concurrency_limit_get_429() {
    let h = Harness::start(|s, st| {
        s.silent = true;
        st.limits.max_concurrent_sessions = 1;
        st.coordinator.timeout = Duration::from_secs(5);
    })
    .await;
    let body = json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 5, "temperature": 0});
    let first = tokio::spawn({
        let url = h.node.url("/v1/completions");
        let body = body.clone();
        async move {
            reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    });
    h.coordinator
        .wait_for("the first block", |r| r.blocks >= 1)
        .await;
    let r = post(&h, "/v1/completions", body).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    first.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_requests_finish() {
    let mut h = Harness::start(|s, _| s.block_delay = Duration::from_millis(20)).await;
    let (expected, _, _) = h.expected(PROMPT, 40);
    let r = post(
        &h,
        "/v1/completions",
        json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stream": true}),
    )
    .await;
    assert_eq!(r.status(), 200);
    h.node.shutdown();
    let events = sse_events(r).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(streamed_text(&sse_chunks(&events)), expected);
    tokio::time::timeout(Duration::from_secs(10), h.node.running.finished())
        .await
        .expect("the node stops after its last request")
        .unwrap()
        .unwrap();
    assert!(
        reqwest::get(h.node.url("/healthz")).await.is_err(),
        "no new connections after shutdown"
    );
}
