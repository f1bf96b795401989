//! The draft node under overload (issue 15 items 2 and 3): heavy work only after admission, a
//! quick and clear 429 with `Retry-After` instead of a hang or a late 503, bounded stop strings,
//! and a client that leaves a non-streaming request closing its session at the coordinator.

mod support;

use std::time::Duration;

use axum::body::Bytes;
use serde_json::{json, Value};
use support::Harness;
use tokio::task::JoinHandle;

const PROMPT: &str = "def fib(n): the answer is";
/// A bound on liveness, not a speed assertion: "answers", as opposed to "hangs".
const PROMPTLY: Duration = Duration::from_secs(5);
const ONE_MIB: usize = 1 << 20;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// A completion request whose body is `size` bytes: a plain-text prompt padding it out.
fn body_of(size: usize, stop: Vec<String>) -> Bytes {
    let head = json!({"model": "tiny", "max_tokens": 8, "temperature": 0, "stop": stop,
                      "prompt": ""})
    .to_string();
    let pad = size - head.len();
    let prompt = "ab ".repeat(pad / 3 + 1)[..pad].to_string();
    let body = json!({"model": "tiny", "max_tokens": 8, "temperature": 0, "stop": stop,
                      "prompt": prompt})
    .to_string();
    assert_eq!(body.len(), size);
    Bytes::from(body)
}

async fn post_bytes(h: &Harness, body: Bytes) -> reqwest::Response {
    client()
        .post(h.node.url("/v1/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// A non-streaming request left running in a task (aborting it disconnects its client).
fn spawn_request(h: &Harness, body: Value) -> JoinHandle<reqwest::Response> {
    let req = client().post(h.node.url("/v1/completions")).json(&body);
    tokio::spawn(async move { req.send().await.unwrap() })
}

fn retry_after(r: &reqwest::Response) -> u64 {
    r.headers()
        .get("retry-after")
        .unwrap_or_else(|| panic!("a {} without Retry-After", r.status()))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// What the flood sends, and what each kind must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flood {
    /// Five stop strings: 400 before admission.
    TooManyStops,
    /// One 64 KiB stop string: 400 before admission.
    LongStop,
    /// A valid-looking 1 MiB request with four stop strings of the longest allowed length: it
    /// waits for a slot, and with every slot taken gets 429 + Retry-After. Its prompt is far
    /// beyond `max_prompt_tokens`, so a node that tokenised before admission would answer 400
    /// `context_length_exceeded` instead.
    Admissible,
    /// One byte over `max_body_bytes`: 413.
    Oversized,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_large_requests_is_refused_quickly_while_health_and_small_requests_answer() {
    let h = Harness::start(|s, st| {
        // Blocks are never answered: the holders below keep both slots.
        s.silent = true;
        st.limits.max_concurrent_sessions = 2;
        st.coordinator.timeout = Duration::from_secs(300);
    })
    .await;
    let limits = edgespec_draft_node::Settings::default().limits;
    assert_eq!(limits.max_body_bytes, ONE_MIB);
    let small = json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0});
    let holders: Vec<_> = (0..2).map(|_| spawn_request(&h, small.clone())).collect();
    h.coordinator
        .wait_for("both slots taken", |r| r.blocks >= 2)
        .await;

    let long = |n: usize| "x".repeat(n);
    let kinds = [
        Flood::TooManyStops,
        Flood::LongStop,
        Flood::Admissible,
        Flood::Oversized,
    ];
    let bodies: Vec<(Flood, Bytes)> = kinds
        .iter()
        .map(|&k| {
            let b = match k {
                Flood::TooManyStops => body_of(ONE_MIB - 1, vec![long(100); 5]),
                Flood::LongStop => body_of(ONE_MIB - 1, vec![long(64 * 1024)]),
                Flood::Admissible => body_of(
                    ONE_MIB - 1,
                    vec![long(limits.max_stop_len); limits.max_stop_strings],
                ),
                Flood::Oversized => body_of(ONE_MIB + 1, vec![long(100)]),
            };
            (k, b)
        })
        .collect();
    let flood: Vec<_> = (0..200)
        .map(|i| {
            let (kind, body) = bodies[i % bodies.len()].clone();
            let url = h.node.url("/v1/completions");
            tokio::spawn(async move {
                let r = client()
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                (kind, r)
            })
        })
        .collect();

    // Meanwhile the node stays live: /healthz and a small request answer.
    healthz_answers_promptly(&h, "during the flood").await;
    let r = tokio::time::timeout(PROMPTLY, post_bytes(&h, Bytes::from(small.to_string())))
        .await
        .expect("a small request is answered during the flood");
    assert_eq!(r.status(), 429, "both slots are held");
    assert!(retry_after(&r) >= 1);

    let answers = tokio::time::timeout(Duration::from_secs(90), futures::future::join_all(flood))
        .await
        .expect("every flood request is answered (none hangs)");
    let mut seen = std::collections::BTreeMap::new();
    for a in answers {
        let (kind, r) = a.expect("the request task ran");
        let status = match r {
            Ok(r) => r.status().as_u16(),
            // An oversized body may be cut off by the 413 while it is still being sent.
            Err(e) if kind == Flood::Oversized => {
                assert!(!e.is_timeout(), "{e}");
                413
            }
            Err(e) => panic!("{kind:?}: {e}"),
        };
        *seen.entry((format!("{kind:?}"), status)).or_insert(0) += 1;
        let want = match kind {
            Flood::TooManyStops | Flood::LongStop => 400,
            Flood::Admissible => 429,
            Flood::Oversized => 413,
        };
        assert_eq!(status, want, "{kind:?}; all answers so far: {seen:?}");
    }
    println!("flood answers: {seen:?}");

    // The holders' clients leave: their sessions close and free the slots; the node then
    // serves again, with the exact greedy text (nothing lost or repeated).
    for t in &holders {
        t.abort();
    }
    h.coordinator
        .wait_for("the holders' sessions closed", |r| r.closes.len() == 2)
        .await;
    h.coordinator.update(|s| s.silent = false);
    let (expected, _, _) = h.expected(PROMPT, 8);
    let r = post_bytes(&h, Bytes::from(small.to_string())).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["text"], expected.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admitted_large_prompts_are_tokenised_off_the_async_workers() {
    // Slots free this time: each 1 MiB request is admitted, tokenised (far beyond
    // max_prompt_tokens: 400) or turned away after admission_wait; /healthz keeps answering.
    let h = Harness::start(|_, st| st.limits.max_concurrent_sessions = 2).await;
    let limits = edgespec_draft_node::Settings::default().limits;
    let body = body_of(
        ONE_MIB - 1,
        vec!["x".repeat(limits.max_stop_len); limits.max_stop_strings],
    );
    let flood: Vec<_> = (0..32)
        .map(|_| {
            let url = h.node.url("/v1/completions");
            let body = body.clone();
            tokio::spawn(async move {
                let r = client()
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let after = r.headers().get("retry-after").cloned();
                let status = r.status().as_u16();
                let v: Value = r.json().await.unwrap();
                (status, after, v)
            })
        })
        .collect();
    healthz_answers_promptly(&h, "while prompts are tokenised").await;
    let answers = tokio::time::timeout(Duration::from_secs(90), futures::future::join_all(flood))
        .await
        .expect("every request is answered");
    let mut tokenised = 0;
    for a in answers {
        let (status, after, v) = a.unwrap();
        match status {
            400 => {
                assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
                tokenised += 1;
            }
            429 => assert!(after.is_some(), "429 without Retry-After: {v}"),
            other => panic!("{other}: {v}"),
        }
    }
    assert!(tokenised >= 1, "at least the first ones were admitted");
    assert_eq!(h.coordinator.record().blocks, 0, "nothing was generated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_a_non_streaming_request_closes_its_session() {
    let h = Harness::start(|s, _| s.block_delay = Duration::from_millis(40)).await;
    let (_, n, _) = h.expected(PROMPT, 200);
    assert_eq!(
        n, 200,
        "the prompt must not hit eos, or the test proves nothing"
    );
    let request = spawn_request(
        &h,
        json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 200, "temperature": 0}),
    );
    h.coordinator
        .wait_for("a few rounds", |r| r.verdicts >= 2)
        .await;
    request.abort();
    h.session_closed_early().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_that_keeps_refusing_the_first_block_is_a_429_not_a_late_503() {
    let h = Harness::start(|s, st| {
        s.overloaded_blocks = usize::MAX;
        st.coordinator.timeout = Duration::from_secs(60);
        st.limits.admission_wait = Duration::from_millis(300);
        st.limits.retry_after = Duration::from_secs(2);
    })
    .await;
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        post_bytes(
            &h,
            Bytes::from(
                json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
                    .to_string(),
            ),
        ),
    )
    .await
    .expect("answered long before coordinator.timeout");
    assert_eq!(r.status(), 429);
    assert_eq!(retry_after(&r), 2);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
    assert!(
        h.coordinator.record().overloads_sent >= 2,
        "retried before giving up"
    );
    h.coordinator
        .wait_for("the session's close", |r| r.closes.len() == 1)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_are_bounded_in_number_and_length() {
    let h = Harness::start(|_, _| {}).await;
    let limits = edgespec_draft_node::Settings::default().limits;
    let ok = "s".repeat(limits.max_stop_len);
    for (stop, want) in [
        (vec![ok.clone(); limits.max_stop_strings], 200),
        (vec![ok.clone(); limits.max_stop_strings + 1], 400),
        (vec![format!("{ok}s")], 400),
    ] {
        let r = post_bytes(
            &h,
            Bytes::from(
                json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                       "stop": stop})
                .to_string(),
            ),
        )
        .await;
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, want, "{v}");
        if want == 400 {
            assert_eq!(v["error"]["param"], "stop", "{v}");
        }
    }
}

/// `/healthz` answers five times in a row, each within [`PROMPTLY`].
async fn healthz_answers_promptly(h: &Harness, when: &str) {
    for _ in 0..5 {
        let r = tokio::time::timeout(PROMPTLY, client().get(h.node.url("/healthz")).send())
            .await
            .unwrap_or_else(|_| panic!("/healthz answers {when}"))
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}
