//! The drafting loop against a scripted coordinator: output equal to the target's greedy output
//! with and without pipelining, concurrent sessions, seeded sampling, resyncs, overload retries,
//! a broken stream, a coordinator that goes silent, and model mismatches at startup.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::{sse_chunks, sse_events, streamed_text, Harness, Target};

const PROMPTS: [&str; 3] = [
    "def fib(n): the answer is",
    "The cat sat on the mat and",
    "in the beginning",
];

async fn complete(h: &Harness, prompt: &str, extra: Value) -> Value {
    let mut body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 48, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let r = reqwest::Client::new()
        .post(h.node.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    v
}

fn text(v: &Value) -> &str {
    v["choices"][0]["text"].as_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_output_equals_the_target_with_and_without_pipelining() {
    for pipeline in [false, true] {
        let h = Harness::start(|_, st| st.drafting.pipeline = pipeline).await;
        for prompt in PROMPTS {
            let (expected, n, _) = h.expected(prompt, 48);
            let v = complete(&h, prompt, json!({})).await;
            assert_eq!(text(&v), expected, "pipeline={pipeline} prompt={prompt:?}");
            assert_eq!(v["usage"]["completion_tokens"], n);
        }
        // A session's close reaches the coordinator just after its response: wait for the last.
        edgespec_testkit::harness::eventually("every session closed", || async {
            h.coordinator.record().closes.len() >= PROMPTS.len()
        })
        .await;
        let rec = h.coordinator.record();
        assert!(rec.invalid.is_empty(), "{rec:?}");
        assert_eq!(
            rec.hello_pipelined,
            Some(pipeline),
            "the hello says how it drafts"
        );
        assert_eq!(
            rec.blocks_with_history,
            PROMPTS.len(),
            "history only on open: {rec:?}"
        );
        assert_eq!(rec.closes.len(), PROMPTS.len());
        assert_eq!(rec.draft_probs_seen, 0, "greedy sends no q");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_blocks_are_kept_when_the_target_agrees() {
    // A target that never deviates from the draft: every pipelined block is usable.
    let h = Harness::start(|s, st| {
        s.target = Arc::new(Target::new(&st.model.path, 0));
        s.gammas = vec![4];
        st.drafting.pipeline = true;
    })
    .await;
    let prompt = PROMPTS[0];
    let ids = h.model.tokenizer.encode(prompt).unwrap();
    let agreeing = Target::new(&h.model.path, 0);
    let out = agreeing.greedy(&ids, 48, h.model.eos);
    let v = complete(&h, prompt, json!({})).await;
    let n = out.len() - usize::from(out.last() == Some(&h.model.eos));
    assert_eq!(text(&v), h.model.tokenizer.decode(&out[..n]).unwrap());
    let ext = &v["edgespec"];
    assert_eq!(ext["acceptance_rate"], 1.0, "{ext}");
    let kept = ext["pipelined_kept"].as_u64().unwrap();
    assert!(kept >= 3, "{ext}");
    // Blocks that carry tokens drafted ahead say so (their send time says nothing about drafting
    // cost). A kept guess whose verdict came before any token was drafted ahead is not one.
    let ahead = h.coordinator.record().drafted_ahead as u64;
    assert!((1..=kept).contains(&ahead), "{ahead} of {kept} kept: {ext}");
    // The node told the coordinator that it drafts ahead, so γ is planned for pipelining.
    assert_eq!(h.coordinator.record().hello_pipelined, Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_share_the_stream_and_each_gets_its_own_output() {
    let h = Harness::start(|_, _| {}).await;
    let expected: Vec<String> = PROMPTS.iter().map(|p| h.expected(p, 48).0).collect();
    let url = h.node.url("/v1/completions");
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let url = url.clone();
            let prompt = PROMPTS[i % PROMPTS.len()];
            let stream = i % 2 == 0;
            tokio::spawn(async move {
                let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 48,
                                  "temperature": 0, "stream": stream});
                let r = reqwest::Client::new()
                    .post(url)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                if stream {
                    streamed_text(&sse_chunks(&sse_events(r).await))
                } else {
                    let v: Value = r.json().await.unwrap();
                    v["choices"][0]["text"].as_str().unwrap().to_string()
                }
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap(), expected[i % PROMPTS.len()], "request {i}");
    }
    assert_eq!(
        h.coordinator.record().hellos,
        1,
        "one stream for all sessions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_is_reproducible_and_independent_of_pipelining() {
    let mut outputs = Vec::new();
    for pipeline in [false, true] {
        let h = Harness::start(|s, st| {
            s.gammas = vec![3];
            st.drafting.pipeline = pipeline;
        })
        .await;
        let extra = json!({"temperature": 0.9, "top_p": 0.95, "seed": 1234});
        let a = complete(&h, PROMPTS[1], extra.clone()).await;
        let b = complete(&h, PROMPTS[1], extra).await;
        assert_eq!(text(&a), text(&b), "same seed, same output");
        let c = complete(&h, PROMPTS[1], json!({"temperature": 0.9, "seed": 99})).await;
        assert_ne!(text(&a), text(&c), "another seed, another output");
        assert!(
            h.coordinator.record().draft_probs_seen > 0,
            "sampling sends q"
        );
        outputs.push(text(&a).to_string());
    }
    assert_eq!(outputs[0], outputs[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_requests_are_answered_with_the_full_history() {
    let h = Harness::start(|s, _| s.resync_rounds = [2, 5, 6].into_iter().collect()).await;
    let (expected, _, _) = h.expected(PROMPTS[0], 48);
    let v = complete(&h, PROMPTS[0], json!({})).await;
    assert_eq!(text(&v), expected);
    let rec = h.coordinator.record();
    assert_eq!(rec.resyncs_sent, 3, "{rec:?}");
    assert_eq!(
        rec.blocks_with_history, 4,
        "open + one resend per resync: {rec:?}"
    );
    assert_eq!(v["edgespec"]["resyncs"], 3);
    assert!(rec.invalid.is_empty(), "{rec:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_blocks_are_retried() {
    let h = Harness::start(|s, _| s.overloaded_blocks = 3).await;
    let (expected, _, _) = h.expected(PROMPTS[2], 48);
    let v = complete(&h, PROMPTS[2], json!({})).await;
    assert_eq!(text(&v), expected);
    assert_eq!(h.coordinator.record().overloads_sent, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_stays_overloaded_fails_the_request_with_503() {
    let h = Harness::start(|s, st| {
        s.overloaded_blocks = usize::MAX;
        st.coordinator.timeout = Duration::from_millis(300);
    })
    .await;
    let r = reqwest::Client::new()
        .post(h.node.url("/v1/completions"))
        .json(&json!({"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "service_unavailable");
    assert!(
        h.coordinator.record().overloads_sent >= 2,
        "retried before giving up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_stream_is_reconnected_without_losing_or_repeating_text() {
    for pipeline in [false, true] {
        let h = Harness::start(|s, st| {
            s.drop_after_verdicts = Some(4);
            s.reject_reconnects = 2;
            st.drafting.pipeline = pipeline;
        })
        .await;
        let (expected, _, reason) = h.expected(PROMPTS[0], 48);
        let r = reqwest::Client::new()
            .post(h.node.url("/v1/completions"))
            .json(
                &json!({"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 48,
                          "temperature": 0, "stream": true}),
            )
            .send()
            .await
            .unwrap();
        let events = sse_events(r).await;
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks = sse_chunks(&events);
        assert_eq!(streamed_text(&chunks), expected, "pipeline={pipeline}");
        assert_eq!(
            chunks.last().unwrap()["choices"][0]["finish_reason"],
            reason
        );
        let rec = h.coordinator.record();
        assert_eq!(rec.drops, 1);
        assert_eq!(rec.rejected_streams, 2, "{rec:?}");
        assert_eq!(
            rec.hellos, 4,
            "two refused reconnects, then one that holds: {rec:?}"
        );
        assert_eq!(
            rec.blocks_with_history, 2,
            "open + resync after the reconnect: {rec:?}"
        );
        assert!(rec.invalid.is_empty(), "{rec:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_coordinator_fails_the_request_with_503_never_draft_text() {
    let h = Harness::start(|s, st| {
        s.silent = true;
        st.coordinator.timeout = Duration::from_millis(300);
    })
    .await;
    let r = reqwest::Client::new()
        .post(h.node.url("/v1/completions"))
        .json(&json!({"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "service_unavailable");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("coordinator"),
        "{v}"
    );
}
