//! Model-free and hybrid drafting through the real node and real gRPC (a scripted coordinator
//! whose target is a tiny synthetic model): greedy output equal to target-only decoding token for
//! token, lookup speculation on a prompt that repeats itself, point-mass q under sampling, a
//! lookup-only node without a draft model, and the 400s of the `draft_method` field.

mod support;

use std::sync::Arc;

use edgespec_specdec::DraftMethod;
use serde_json::{json, Value};
use support::{Harness, Record, Target};

/// A prompt that repeats itself: lookup finds the second half in the first.
const REPEATED: &str =
    "apples, pears, plums, cherries, figs; apples, pears, plums, cherries, figs; apples, pears";

const PROMPTS: [&str; 3] = [REPEATED, "The cat sat on the mat and", "in the beginning"];

async fn post(h: &Harness, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(h.node.url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

async fn complete(h: &Harness, prompt: &str, max_tokens: usize, extra: Value) -> Value {
    let mut body = json!({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0, "return_token_ids": true});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, v) = post(h, "/v1/completions", body).await;
    assert_eq!(status, 200, "{v}");
    v
}

fn token_ids(v: &Value) -> Vec<u32> {
    v["edgespec"]["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

fn stat(v: &Value, key: &str) -> u64 {
    v["edgespec"][key].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_lookup_and_hybrid_output_equals_the_target_token_for_token() {
    let h = Harness::start(|s, _| s.gammas = vec![6, 3, 8]).await;
    let methods = [DraftMethod::Model, DraftMethod::Lookup, DraftMethod::Hybrid];
    for method in methods {
        for prompt in PROMPTS {
            let ids = h.model.tokenizer.encode(prompt).unwrap();
            let expected = h.target.greedy(&ids, 64, h.model.eos);
            let v = complete(&h, prompt, 64, json!({"draft_method": method.label()})).await;
            assert_eq!(token_ids(&v), expected, "{method} {prompt:?}");
        }
        // The chat endpoint takes the field too.
        let ids = h.chat_prompt(PROMPTS[0]);
        let body = json!({"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[0]}],
            "max_tokens": 32, "temperature": 0, "return_token_ids": true,
            "draft_method": method.label()});
        let (status, v) = post(&h, "/v1/chat/completions", body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            token_ids(&v),
            h.target.greedy(&ids, 32, h.model.eos),
            "chat {method}"
        );
    }
    let rec = h.coordinator.record();
    assert!(rec.invalid.is_empty(), "{rec:?}");
    assert_eq!(
        rec.hello_method,
        Some(DraftMethod::Model),
        "the node's default"
    );
    // Requests ran one method after the other: the blocks name their session's method.
    let mut seen = rec.block_methods.clone();
    seen.dedup();
    assert_eq!(seen, methods, "{:?}", rec.block_methods);
    // Each method reports its own draft cost: lookup's is microseconds, not the model's.
    let costs = |m: DraftMethod| -> Vec<f32> {
        rec.block_methods
            .iter()
            .zip(&rec.block_costs)
            .filter(|(&bm, &c)| bm == m && c > 0.0)
            .map(|(_, &c)| c)
            .collect()
    };
    let mut model = costs(DraftMethod::Model);
    model.sort_by(f32::total_cmp);
    let model_median = model[model.len() / 2];
    // The first lookup block comes right after the model requests: with one node-wide
    // estimate it would report about the model's cost.
    let lookup_first = costs(DraftMethod::Lookup)[0];
    assert!(
        lookup_first < 0.2 * model_median,
        "lookup {lookup_first} s/token, model {model_median}"
    );
}

/// A list, as token ids, and the prompt that repeats it twice.
fn repeated_list(h: &Harness) -> (Vec<u32>, Vec<u32>) {
    let list = h
        .model
        .tokenizer
        .encode("apples, pears, plums, cherries, figs; ")
        .unwrap();
    let prompt = [list.clone(), list.clone()].concat();
    (list, prompt)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_drafts_and_the_target_accepts_on_a_prompt_that_repeats_itself() {
    let model = support::TinyModel::new();
    let list_len = model
        .tokenizer
        .encode("apples, pears, plums, cherries, figs; ")
        .unwrap()
        .len();
    drop(model);
    // The target continues the list: what a real model does with a list repeated twice.
    let h = Harness::start(|s, st| {
        s.target = Arc::new(Target::periodic(&st.model.path, list_len));
        s.gammas = vec![8];
    })
    .await;
    let (list, prompt) = repeated_list(&h);
    for method in ["lookup", "hybrid"] {
        let v = complete_ids(&h, &prompt, 40, json!({"draft_method": method})).await;
        let expected: Vec<u32> = list.iter().copied().cycle().take(40).collect();
        assert_eq!(token_ids(&v), expected, "{method}");
        let (drafted, accepted, rounds) = (
            stat(&v, "drafted"),
            stat(&v, "accepted"),
            stat(&v, "rounds"),
        );
        assert!(
            drafted > 0 && accepted > 0,
            "{method}: lookup speculated: {}",
            v["edgespec"]
        );
        assert_eq!(
            accepted, drafted,
            "{method}: every looked-up token was right: {}",
            v["edgespec"]
        );
        assert!(
            rounds <= 10,
            "{method}: ~8 tokens per round, not one: {}",
            v["edgespec"]
        );
    }
    let metrics = reqwest::get(h.node.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for method in ["lookup", "hybrid"] {
        let line = format!("edgespec_draft_method_accepted_tokens_total{{method=\"{method}\"}}");
        let n: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("{line} in {metrics}"))
            .trim()
            .parse()
            .unwrap();
        assert!(n > 0.0, "{line} {n}");
    }
    assert!(
        metrics.contains("edgespec_draft_method_rounds_total{method=\"model\"} 0"),
        "{metrics}"
    );
}

async fn complete_ids(h: &Harness, prompt: &[u32], max_tokens: usize, extra: Value) -> Value {
    let mut body = json!({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0, "return_token_ids": true});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, v) = post(h, "/v1/completions", body).await;
    assert_eq!(status, 200, "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_lookup_tokens_are_proposed_with_a_point_mass_q() {
    let h = Harness::start(|s, _| s.gammas = vec![8]).await;
    let (_, prompt) = repeated_list(&h);
    let v = complete_ids(
        &h,
        &prompt,
        32,
        json!({"draft_method": "lookup", "temperature": 0.8, "seed": 5}),
    )
    .await;
    let rec = h.coordinator.record();
    assert!(rec.invalid.is_empty(), "{rec:?}");
    assert!(stat(&v, "drafted") > 0, "{}", v["edgespec"]);
    assert_eq!(
        rec.draft_probs_seen as u64,
        stat(&v, "drafted"),
        "one q per draft token"
    );
    assert_eq!(
        rec.point_masses, rec.draft_probs_seen,
        "every lookup q is a point mass: {rec:?}"
    );
    // Hybrid: looked-up tokens are point masses, drafted ones the model's top-K.
    let v = complete_ids(
        &h,
        &prompt,
        32,
        json!({"draft_method": "hybrid", "temperature": 0.8, "seed": 5}),
    )
    .await;
    let rec2 = h.coordinator.record();
    let drafted = stat(&v, "drafted") as usize;
    let (q, points) = (
        rec2.draft_probs_seen - rec.draft_probs_seen,
        rec2.point_masses - rec.point_masses,
    );
    assert_eq!(q, drafted, "{rec2:?}");
    assert!(
        points > 0 && points < q,
        "hybrid mixes lookup and model tokens: {points} of {q}"
    );
    // The blocks say which tokens the model drafted: at least those whose q is not a point
    // mass, and no more than the tokens that are not lookup's; lookup-only blocks mark none.
    assert_eq!(rec.model_marked, 0, "lookup blocks mark no model token");
    let marked = rec2.model_marked;
    assert_eq!(rec2.unmarked_model_tokens, 0, "{rec2:?}");
    assert!(
        marked >= q - points && marked > 0,
        "{marked} marked, {points} of {q}"
    );
}

/// A sampled hybrid request on the repeated-list prompt against a coordinator whose verdicts all
/// say `next_method = told` (the first block, before any verdict, drafts nothing): the drafted
/// token count and what the coordinator saw.
async fn hybrid_told(told: edgespec_proto::domain::DraftMethod) -> (usize, Record) {
    let h = Harness::start(|s, _| {
        s.gammas = vec![8];
        s.initial_gamma = 0;
        s.next_method = Some(told);
    })
    .await;
    let (_, prompt) = repeated_list(&h);
    let v = complete_ids(
        &h,
        &prompt,
        32,
        json!({"draft_method": "hybrid", "temperature": 0.8, "seed": 5}),
    )
    .await;
    let rec = h.coordinator.record();
    assert!(rec.invalid.is_empty(), "{rec:?}");
    let drafted = stat(&v, "drafted") as usize;
    assert!(drafted > 0, "{}", v["edgespec"]);
    assert_eq!(rec.draft_probs_seen, drafted, "one q per draft token");
    assert!(
        rec.block_methods.iter().all(|&m| m == DraftMethod::Hybrid),
        "{rec:?}"
    );
    (drafted, rec)
}

/// A hybrid session whose verdicts say `next_method = LOOKUP` (its model fallback does not pay)
/// drafts lookup only: every proposal is a point mass, none is the model's top-K.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hybrid_session_told_lookup_drafts_without_its_model() {
    let (drafted, rec) = hybrid_told(edgespec_proto::domain::DraftMethod::Lookup).await;
    assert_eq!(
        rec.point_masses, drafted,
        "lookup only: every q a point mass: {rec:?}"
    );
    assert_eq!(rec.model_marked, 0, "no model token: {rec:?}");
}

/// A hybrid session told `next_method = MODEL` (lookup's proposals fail more often than the
/// model's) drafts with its model alone, even where lookup has a match: every token is marked
/// as the model's, and none is lookup's point mass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hybrid_session_told_model_drafts_without_lookup() {
    let (drafted, rec) = hybrid_told(edgespec_proto::domain::DraftMethod::Model).await;
    assert_eq!(
        rec.model_marked, drafted,
        "every token the model's: {rec:?}"
    );
    assert!(rec.point_masses < drafted, "{rec:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_only_node_runs_without_a_draft_model() {
    let h = Harness::start(|_, st| {
        st.model.tokenizer = std::mem::take(&mut st.model.path);
        st.drafting.method = DraftMethod::Lookup;
    })
    .await;
    let models: Value = reqwest::get(h.node.url("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "tiny", "{models}");
    // Ready without a model: readiness is the coordinator link.
    edgespec_testkit::harness::eventually("/readyz answers 200", || async {
        reqwest::get(h.node.url("/readyz")).await.unwrap().status() == 200
    })
    .await;
    for prompt in PROMPTS {
        let ids = h.model.tokenizer.encode(prompt).unwrap();
        let v = complete(&h, prompt, 48, json!({})).await;
        assert_eq!(
            token_ids(&v),
            h.target.greedy(&ids, 48, h.model.eos),
            "{prompt:?}"
        );
        let v = complete(&h, prompt, 8, json!({"draft_method": "lookup"})).await;
        assert_eq!(
            token_ids(&v),
            h.target.greedy(&ids, 8, h.model.eos),
            "{prompt:?}"
        );
    }
    let rec = h.coordinator.record();
    assert_eq!(rec.hello_method, Some(DraftMethod::Lookup), "{rec:?}");
    assert!(
        rec.block_methods.iter().all(|&m| m == DraftMethod::Lookup),
        "{rec:?}"
    );
    for method in ["model", "hybrid"] {
        for path in ["/v1/completions", "/v1/chat/completions"] {
            let body = json!({"model": "tiny", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4, "draft_method": method});
            let (status, v) = post(&h, path, body).await;
            assert_eq!(status, 400, "{method} {path}: {v}");
            let msg = v["error"]["message"].as_str().unwrap();
            assert!(
                msg.contains("needs a draft model") && msg.contains("has none"),
                "{msg}"
            );
            assert_eq!(v["error"]["param"], "draft_method");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_draft_method_is_refused_with_400_naming_the_allowed_ones() {
    let h = Harness::start(|_, _| {}).await;
    for path in ["/v1/completions", "/v1/chat/completions"] {
        for bad in [json!("ngram"), json!(""), json!("Lookup")] {
            let body = json!({"model": "tiny", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4, "draft_method": bad});
            let (status, v) = post(&h, path, body).await;
            assert_eq!(status, 400, "{path} {bad}: {v}");
            let msg = v["error"]["message"].as_str().unwrap();
            for allowed in ["\"model\"", "\"lookup\"", "\"hybrid\""] {
                assert!(msg.contains(allowed), "{msg}");
            }
            assert_eq!(v["error"]["param"], "draft_method");
        }
        let (status, v) = post(
            &h,
            path,
            json!({"model": "tiny", "prompt": "hi",
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "draft_method": 3}),
        )
        .await;
        assert_eq!(status, 400, "not a string: {v}");
        // The node has a draft model: every method is served.
        for method in ["model", "lookup", "hybrid"] {
            let body = json!({"model": "tiny", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4, "temperature": 0, "draft_method": method});
            let (status, v) = post(&h, path, body).await;
            assert_eq!(status, 200, "{path} {method}: {v}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_suffix_cache_drafts_a_repeated_request_from_the_earlier_answer() {
    // Distinct tokens: the prompt alone gives lookup nothing to match.
    let prompt: Vec<u32> = vec![40, 41, 42, 43, 44, 45, 46, 47];
    for cache_tokens in [0, 4096] {
        let h = Harness::start(|s, st| {
            s.gammas = vec![8];
            st.drafting.lookup.cache_tokens = cache_tokens;
        })
        .await;
        let expected = h.target.greedy(&prompt, 48, h.model.eos);
        let first = complete_ids(&h, &prompt, 48, json!({"draft_method": "lookup"})).await;
        let again = complete_ids(&h, &prompt, 48, json!({"draft_method": "lookup"})).await;
        assert_eq!(token_ids(&first), expected);
        assert_eq!(token_ids(&again), expected);
        let (before, after) = (stat(&first, "accepted"), stat(&again, "accepted"));
        if cache_tokens == 0 {
            assert!(after < 16, "without the cache: {}", again["edgespec"]);
        } else {
            // The first session's tokens draft the second: most of the answer is accepted.
            assert!(
                after >= 32 && after > before,
                "{} then {}",
                first["edgespec"],
                again["edgespec"]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gamma_of_zero_learnt_for_the_model_does_not_stop_lookup_sessions() {
    // The coordinator finds that model drafting does not pay here: γ = 0 after every round.
    let h = Harness::start(|s, _| s.gammas = vec![0]).await;
    let (_, prompt) = repeated_list(&h);
    let first = complete_ids(&h, &prompt, 24, json!({"draft_method": "model"})).await;
    assert!(
        stat(&first, "drafted") > 0,
        "the Welcome's γ: {}",
        first["edgespec"]
    );
    let again = complete_ids(&h, &prompt, 24, json!({"draft_method": "model"})).await;
    assert_eq!(
        stat(&again, "drafted"),
        0,
        "the next model session starts at the γ = 0 learnt: {}",
        again["edgespec"]
    );
    let lookup = complete_ids(&h, &prompt, 24, json!({"draft_method": "lookup"})).await;
    assert!(
        stat(&lookup, "drafted") > 0,
        "a lookup session starts at its own method's γ: {}",
        lookup["edgespec"]
    );
}
