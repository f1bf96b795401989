//! Fuzzing the draft node's OpenAI request decoding: request bodies of `/v1/completions` and
//! `/v1/chat/completions` through the real axum router (`edgespec_draft_node::router`) of a node
//! built on the tiny synthetic model, in process (no socket).
//!
//! Target `openai_requests`: JSON objects built field by field from valid values, values out of
//! range, values of the wrong JSON type, unknown fields and oversized prompts, sometimes
//! byte-mutated afterwards (so also invalid JSON, invalid UTF-8, nesting beyond serde_json's depth
//! limit). Properties:
//! - no panic, never a 5xx; every answer is an OpenAI error object
//!   (`{"error": {"message", "type", "param", "code"}}`);
//! - the decision matches the documented rules, checked by a reference written here from the
//!   OpenAI shapes and `docs/` (not from `openai.rs`): a body that is not JSON or has a field of
//!   the wrong type is a 400 without `param`; otherwise a request that breaks a rule is a 400
//!   (404 for an unknown model) whose `param` names one of the broken rules' fields, and a
//!   request that breaks none passes validation. The node's one generation slot is held by a
//!   request the (silent) scripted coordinator never answers, and `limits.admission_wait` is 0,
//!   so a request that passes validation is answered 429 at once instead of generating. The node
//!   tokenises only once admitted, so the rules on the prompt's token count (empty, beyond
//!   `max_prompt_tokens`, no room left for `max_tokens`) are not reached here: `tests/api.rs`
//!   covers them;
//! - bodies above `limits.max_body_bytes` are a 413;
//! - no single allocation above 8 MiB (bodies are at most ~20 KiB).
//!
//! `EDGESPEC_FUZZ_CASES=1000000 cargo test -p edgespec-draft-node --test fuzz_openai -- --nocapture`
//! runs a campaign (see docs/BENCHMARKS.md, "Fuzzing").

#[path = "../../proto/tests/fuzz_support/mod.rs"]
mod fuzz_support;
mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use edgespec_draft_node::App;
use edgespec_model::{ChatMessage, TextTokenizer};
use fuzz_support::{byte_mutation, mutate_bytes, ByteMutation, Counters};
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use tower::ServiceExt;

use support::{script, settings, ScriptedCoordinator, Target, TinyModel};

const MODEL: &str = "tiny";
const MAX_TOKENS: i64 = 1000;
const MAX_PROMPT_TOKENS: usize = 64;
const MAX_BODY_BYTES: usize = 16 * 1024;
const MAX_STOP: usize = 4;
const MAX_STOP_LEN: usize = 256;

// ---------------------------------------------------------------------------------------------
// Field values: `None` leaves the field out.

type Field = Option<Value>;

fn field(options: Vec<(u32, BoxedStrategy<Value>)>) -> BoxedStrategy<Field> {
    let mut all: Vec<(u32, BoxedStrategy<Field>)> = options
        .into_iter()
        .map(|(w, s)| (w, s.prop_map(Some).boxed()))
        .collect();
    all.push((4, Just(None).boxed()));
    proptest::strategy::Union::new_weighted(all).boxed()
}

fn v(x: Value) -> BoxedStrategy<Value> {
    Just(x).boxed()
}

fn text() -> BoxedStrategy<String> {
    prop_oneof![
        6 => "[a-z ]{0,24}",
        2 => ".{0,12}",
        1 => prop::sample::select(&[
            "", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "\u{0}", "\u{FFFD}", "é👋🏽",
        ][..])
        .prop_map(str::to_string),
        1 => (0usize..200).prop_map(|n| "the ".repeat(n)),
    ]
    .boxed()
}

fn token_ids() -> BoxedStrategy<Value> {
    let id = prop_oneof![
        8 => (0u64..297).prop_map(Value::from),
        1 => (297u64..400).prop_map(Value::from),
        1 => Just(Value::from(u32::MAX)),
        1 => Just(Value::from(u32::MAX as u64 + 1)),
        1 => Just(json!(-1)),
        1 => Just(json!(1.5)),
    ];
    prop::collection::vec(id, 0..8)
        .prop_map(Value::from)
        .boxed()
}

fn prompt() -> BoxedStrategy<Field> {
    field(vec![
        (6, text().prop_map(Value::from).boxed()),
        (2, text().prop_map(|t| json!([t])).boxed()),
        (1, (text(), text()).prop_map(|(a, b)| json!([a, b])).boxed()),
        (1, v(json!([]))),
        (3, token_ids()),
        (1, token_ids().prop_map(|t| json!([t])).boxed()),
        (
            1,
            (token_ids(), token_ids())
                .prop_map(|(a, b)| json!([a, b]))
                .boxed(),
        ),
        (1, v(json!([[]]))),
        (1, v(Value::Null)),
        (1, v(json!(5))),
        (1, v(json!([1, "a"]))),
        (
            1,
            (70usize..2000)
                .prop_map(|n| Value::from("ab ".repeat(n)))
                .boxed(),
        ),
        (
            1,
            Just(Value::from("x".repeat(MAX_BODY_BYTES + 10))).boxed(),
        ),
    ])
}

fn messages() -> BoxedStrategy<Field> {
    let role = prop_oneof![
        6 => prop::sample::select(&["system", "developer", "user", "assistant"][..]),
        1 => prop::sample::select(&["tool", "", "User", "function"][..]),
    ]
    .prop_map(Value::from);
    let part = prop_oneof![
        6 => text().prop_map(|t| json!({"type": "text", "text": t})),
        1 => Just(json!({"type": "image_url", "image_url": {"url": "x"}})),
        1 => Just(json!({"type": "text"})),
        1 => Just(json!({"type": "text", "text": null})),
        1 => Just(json!({"type": "text", "text": 5})),
        1 => Just(json!({"text": "no type"})),
    ];
    let content: BoxedStrategy<Option<Value>> = prop_oneof![
        6 => text().prop_map(|t| Some(Value::from(t))),
        2 => prop::collection::vec(part, 0..3).prop_map(|p| Some(Value::from(p))),
        1 => Just(None),
        1 => Just(Some(Value::Null)),
        1 => Just(Some(json!(5))),
    ]
    .boxed();
    let message = (prop::option::weighted(0.95, role), content).prop_map(|(r, c)| {
        let mut m = Map::new();
        if let Some(r) = r {
            m.insert("role".into(), r);
        }
        if let Some(c) = c {
            m.insert("content".into(), c);
        }
        Value::Object(m)
    });
    field(vec![
        (
            12,
            prop::collection::vec(message, 0..4)
                .prop_map(Value::from)
                .boxed(),
        ),
        (1, v(Value::Null)),
        (1, v(json!("hi"))),
        (
            1,
            (70usize..400)
                .prop_map(|n| json!([{"role": "user", "content": "ab ".repeat(n)}]))
                .boxed(),
        ),
    ])
}

fn int_field(valid: BoxedStrategy<i64>, odd: &'static [i64]) -> BoxedStrategy<Field> {
    field(vec![
        (6, valid.prop_map(Value::from).boxed()),
        (2, prop::sample::select(odd).prop_map(Value::from).boxed()),
        (1, v(Value::Null)),
        (1, v(json!(u64::MAX))),
        (1, v(json!(1.5))),
        (1, v(json!("5"))),
    ])
}

fn float_field(valid: std::ops::RangeInclusive<f64>, odd: &'static [f64]) -> BoxedStrategy<Field> {
    field(vec![
        (6, valid.prop_map(Value::from).boxed()),
        (3, prop::sample::select(odd).prop_map(Value::from).boxed()),
        (1, (0i64..3).prop_map(Value::from).boxed()),
        (1, v(Value::Null)),
        (1, v(json!("1"))),
    ])
}

fn bool_field() -> BoxedStrategy<Field> {
    field(vec![
        (6, any::<bool>().prop_map(Value::from).boxed()),
        (1, v(Value::Null)),
        (1, v(json!(1))),
    ])
}

const ODD_FLOATS: &[f64] = &[
    0.0,
    -0.0,
    1.0,
    2.0,
    2.000_000_1,
    2.1,
    -0.1,
    1e-45,
    1e-46,
    1e39,
    1e300,
    -1e300,
    1.000_000_1,
    0.5,
];

#[derive(Debug, Clone)]
struct Case {
    chat: bool,
    fields: Vec<(&'static str, Field)>,
    mutations: Vec<ByteMutation>,
    /// Replace the body by this (raw bytes, deep nesting, non-objects).
    raw: Option<Vec<u8>>,
}

fn common_fields() -> Vec<(&'static str, BoxedStrategy<Field>)> {
    vec![
        (
            "model",
            prop_oneof![
                16 => Just(Some(Value::from(MODEL))),
                1 => Just(Some(Value::from("gpt-4"))),
                1 => Just(None),
                1 => Just(Some(Value::Null)),
                1 => Just(Some(json!(5))),
            ]
            .boxed(),
        ),
        (
            "max_tokens",
            int_field(
                (1i64..300).boxed(),
                &[-1, 0, 448, 470, 511, 512, 1000, 1001, i64::MAX, i64::MIN],
            ),
        ),
        ("temperature", float_field(0.0..=2.0, ODD_FLOATS)),
        ("top_p", float_field(0.0..=1.0, ODD_FLOATS)),
        (
            "top_k",
            int_field(
                (-1i64..100).boxed(),
                &[-2, -1, 0, 4_294_967_295, 4_294_967_296, i64::MIN],
            ),
        ),
        ("seed", int_field(any::<i64>().boxed(), &[0, -1, i64::MAX])),
        (
            "stop",
            field(vec![
                (3, text().prop_map(Value::from).boxed()),
                (
                    3,
                    prop::collection::vec(text().prop_map(Value::from), 0..20)
                        .prop_map(Value::from)
                        .boxed(),
                ),
                (1, v(Value::Null)),
                (1, v(json!([5]))),
            ]),
        ),
        ("stream", bool_field()),
        (
            "stream_options",
            field(vec![
                (
                    3,
                    any::<bool>()
                        .prop_map(|b| json!({"include_usage": b}))
                        .boxed(),
                ),
                (1, v(json!({}))),
                (1, v(json!({"other": 1}))),
                (1, v(json!({"include_usage": null}))),
                (1, v(Value::Null)),
                (1, v(json!(5))),
            ]),
        ),
        ("n", int_field((1i64..2).boxed(), &[0, 1, 2, -1])),
        (
            "presence_penalty",
            float_field(0.0..=0.0, &[0.0, -0.0, 0.5, -2.0]),
        ),
        (
            "frequency_penalty",
            float_field(0.0..=0.0, &[0.0, -0.0, 0.5, -2.0]),
        ),
        ("return_token_ids", bool_field()),
        (
            "user",
            field(vec![
                (1, v(json!("someone"))),
                (1, v(json!({"nested": [1, 2]}))),
            ]),
        ),
    ]
}

/// Values of `name` that break no rule (or leave it out).
fn valid(name: &str) -> BoxedStrategy<Field> {
    let some = |s: BoxedStrategy<Value>| prop::option::weighted(0.7, s).boxed();
    match name {
        "model" => Just(Some(Value::from(MODEL))).boxed(),
        "max_tokens" | "max_completion_tokens" => some((1i64..300).prop_map(Value::from).boxed()),
        "temperature" => some((0.0f64..=2.0).prop_map(Value::from).boxed()),
        "top_p" => some((0.01f64..=1.0).prop_map(Value::from).boxed()),
        "top_k" => some((-1i64..100).prop_map(Value::from).boxed()),
        "seed" => some(any::<i64>().prop_map(Value::from).boxed()),
        "stop" => some(
            prop::collection::vec("[a-z.]{1,4}", 0..4)
                .prop_map(Value::from)
                .boxed(),
        ),
        "stream" | "return_token_ids" => some(any::<bool>().prop_map(Value::from).boxed()),
        "stream_options" => some(
            any::<bool>()
                .prop_map(|b| json!({"include_usage": b}))
                .boxed(),
        ),
        "n" | "best_of" => some(Just(json!(1)).boxed()),
        "presence_penalty" | "frequency_penalty" => some(Just(json!(0.0)).boxed()),
        "prompt" => prop_oneof![
            3 => "[a-z ]{1,24}".prop_map(|t| Some(Value::from(t))),
            1 => prop::collection::vec(0u32..297, 1..8).prop_map(|t| Some(json!(t))),
        ]
        .boxed(),
        "messages" => prop::collection::vec(
            (
                prop::sample::select(&["system", "developer", "user", "assistant"][..]),
                "[a-z ]{0,10}",
            )
                .prop_map(|(r, c)| json!({"role": r, "content": c})),
            1..3,
        )
        .prop_map(|m| Some(Value::from(m)))
        .boxed(),
        "echo" => some(Just(json!(false)).boxed()),
        "logprobs" => some(Just(Value::Null).boxed()),
        "suffix" => some(Just(json!("")).boxed()),
        _ => Just(None).boxed(),
    }
}

fn case() -> impl Strategy<Value = Case> {
    let mut completion = common_fields();
    completion.extend([
        ("prompt", prompt()),
        ("echo", bool_field()),
        (
            "logprobs",
            field(vec![
                (3, v(Value::Null)),
                (1, v(json!(0))),
                (1, v(json!(5))),
                (1, v(json!({}))),
            ]),
        ),
        ("best_of", int_field((1i64..2).boxed(), &[0, 1, 2])),
        (
            "suffix",
            field(vec![
                (3, v(json!(""))),
                (1, v(json!("tail"))),
                (1, v(Value::Null)),
                (1, v(json!(3))),
            ]),
        ),
    ]);
    let mut chat = common_fields();
    chat.extend([
        ("messages", messages()),
        (
            "max_completion_tokens",
            int_field((1i64..300).boxed(), &[-1, 0, 470, 512, 1000, 1001]),
        ),
        ("logprobs", bool_field()),
    ]);
    // Most cases are clean (every field valid or absent) but for at most one field, so that
    // valid requests and single broken rules are common; the rest draw every field freely.
    let fields = |list: Vec<(&'static str, BoxedStrategy<Field>)>| {
        let (names, strategies): (Vec<_>, Vec<_>) = list.into_iter().unzip();
        let valids: Vec<BoxedStrategy<Field>> = names.iter().map(|n| valid(n)).collect();
        (
            strategies,
            valids,
            prop::option::weighted(0.7, any::<proptest::sample::Index>()),
            prop::bool::weighted(0.6),
        )
            .prop_map(move |(free, valid, odd, clean)| {
                let odd = odd.map(|i| i.index(names.len()));
                names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        let v = if !clean || odd == Some(i) {
                            free[i].clone()
                        } else {
                            valid[i].clone()
                        };
                        (*n, v)
                    })
                    .collect::<Vec<_>>()
            })
    };
    let raw = prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..40),
        1 => (1usize..400).prop_map(|d| format!("{{\"model\":\"tiny\",\"prompt\":{}1{}}}", "[".repeat(d), "]".repeat(d)).into_bytes()),
        1 => prop::sample::select(&["", "null", "[]", "[\"tiny\"]", "\"tiny\"", "{}", "{\"model\":\"tiny\",\"model\":\"tiny\",\"prompt\":\"a\"}"][..])
            .prop_map(|s| s.as_bytes().to_vec()),
    ];
    (
        any::<bool>(),
        fields(completion),
        fields(chat),
        prop_oneof![
            6 => Just(Vec::new()),
            1 => prop::collection::vec(byte_mutation(), 1..4),
        ],
        prop::option::weighted(0.05, raw),
    )
        .prop_map(|(is_chat, c, ch, mutations, raw)| Case {
            chat: is_chat,
            fields: if is_chat { ch } else { c },
            mutations,
            raw,
        })
}

const JSON_TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\"",
    b"\\",
    b"null",
    b"1e400",
    b"-",
    b"0",
    b"\xff",
    b"\xc3",
    b"\\ud800",
    b"\"model\":\"tiny\",",
    b"\"prompt\":",
    b"\"messages\":[",
];

fn body(case: &Case) -> Vec<u8> {
    if let Some(raw) = &case.raw {
        return raw.clone();
    }
    let mut m = Map::new();
    for (k, v) in &case.fields {
        if let Some(v) = v {
            m.insert(k.to_string(), v.clone());
        }
    }
    let mut b = serde_json::to_vec(&Value::Object(m)).unwrap();
    mutate_bytes(&mut b, &case.mutations, JSON_TOKENS);
    b
}

// ---------------------------------------------------------------------------------------------
// The reference: what the API must answer.

#[derive(Debug, PartialEq)]
enum Expect {
    /// Passes validation (then 429: the one slot is taken).
    Valid,
    /// 400 without `param`: not JSON, or a field of the wrong type.
    Malformed,
    /// A 400/404 naming one of these fields.
    Broken(Vec<(u16, &'static str)>),
}

struct TypeError;

fn opt<'a>(o: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    o.get(k).filter(|v| !v.is_null())
}

fn ty_i64(o: &Map<String, Value>, k: &str) -> Result<Option<i64>, TypeError> {
    match opt(o, k) {
        None => Ok(None),
        Some(v) => v.as_i64().map(Some).ok_or(TypeError),
    }
}

fn ty_f32(o: &Map<String, Value>, k: &str) -> Result<Option<f32>, TypeError> {
    match opt(o, k) {
        None => Ok(None),
        Some(v) => v.as_f64().map(|x| Some(x as f32)).ok_or(TypeError),
    }
}

fn ty_bool(o: &Map<String, Value>, k: &str) -> Result<Option<bool>, TypeError> {
    match opt(o, k) {
        None => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or(TypeError),
    }
}

fn ty_str<'a>(o: &'a Map<String, Value>, k: &str) -> Result<Option<&'a str>, TypeError> {
    match opt(o, k) {
        None => Ok(None),
        Some(v) => v.as_str().map(Some).ok_or(TypeError),
    }
}

fn u32_list(v: &Value) -> Option<Vec<u32>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
        .collect()
}

enum Prompt {
    Texts(Vec<String>),
    Tokens(Vec<Vec<u32>>),
}

fn ty_prompt(o: &Map<String, Value>) -> Result<Option<Prompt>, TypeError> {
    let Some(v) = opt(o, "prompt") else {
        return Ok(None);
    };
    if let Some(s) = v.as_str() {
        return Ok(Some(Prompt::Texts(vec![s.to_string()])));
    }
    let arr = v.as_array().ok_or(TypeError)?;
    if let Some(ts) = arr.iter().map(|x| x.as_str().map(str::to_string)).collect() {
        return Ok(Some(Prompt::Texts(ts)));
    }
    if let Some(ids) = u32_list(v) {
        return Ok(Some(Prompt::Tokens(vec![ids])));
    }
    if let Some(lists) = arr.iter().map(u32_list).collect() {
        return Ok(Some(Prompt::Tokens(lists)));
    }
    Err(TypeError)
}

/// `Some(messages)` or a type error; a message is (role, Ok(text) or Err(()) for a bad part).
#[allow(clippy::type_complexity)]
fn ty_messages(o: &Map<String, Value>) -> Result<Vec<(String, Result<String, ()>)>, TypeError> {
    let arr = o
        .get("messages")
        .and_then(Value::as_array)
        .ok_or(TypeError)?;
    let mut out = Vec::new();
    for m in arr {
        let m = m.as_object().ok_or(TypeError)?;
        let role = m.get("role").and_then(Value::as_str).ok_or(TypeError)?;
        let content = match opt(m, "content") {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                let mut bad = false;
                for p in parts {
                    let p = p.as_object().ok_or(TypeError)?;
                    let kind = p.get("type").and_then(Value::as_str).ok_or(TypeError)?;
                    let t = ty_str(p, "text")?;
                    match (kind, t) {
                        ("text", Some(t)) => text.push_str(t),
                        _ => bad = true,
                    }
                }
                if bad {
                    Err(())
                } else {
                    Ok(text)
                }
            }
            Some(_) => return Err(TypeError),
        };
        out.push((role.to_string(), content));
    }
    Ok(out)
}

struct Ctx {
    tokenizer: TextTokenizer,
    vocab: usize,
}

fn expect(ctx: &Ctx, chat: bool, body: &[u8]) -> Expect {
    if body.len() > MAX_BODY_BYTES {
        return Expect::Broken(vec![(413, "")]);
    }
    let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(body) else {
        return Expect::Malformed;
    };
    expect_object(ctx, chat, &o).unwrap_or(Expect::Malformed)
}

fn expect_object(ctx: &Ctx, chat: bool, o: &Map<String, Value>) -> Result<Expect, TypeError> {
    // Types first: serde refuses the whole body on any of these.
    let model = o.get("model").and_then(Value::as_str).ok_or(TypeError)?;
    let max_tokens = ty_i64(o, "max_tokens")?;
    let temperature = ty_f32(o, "temperature")?;
    let top_p = ty_f32(o, "top_p")?;
    let top_k = ty_i64(o, "top_k")?;
    ty_i64(o, "seed")?;
    let stop: Vec<usize> = match opt(o, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.len()],
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            a.iter().map(|s| s.as_str().map_or(0, str::len)).collect()
        }
        Some(_) => return Err(TypeError),
    };
    ty_bool(o, "stream")?;
    if let Some(so) = opt(o, "stream_options") {
        let so = so.as_object().ok_or(TypeError)?;
        if so.contains_key("include_usage") {
            so["include_usage"].as_bool().ok_or(TypeError)?;
        }
    }
    let n = ty_i64(o, "n")?;
    let presence = ty_f32(o, "presence_penalty")?;
    let frequency = ty_f32(o, "frequency_penalty")?;
    ty_bool(o, "return_token_ids")?;

    let mut broken: Vec<(u16, &'static str)> = Vec::new();
    if model != MODEL {
        broken.push((404, "model"));
    }
    let (_prompt, _prompt_param, max) = if chat {
        let messages = ty_messages(o)?;
        let max_completion = ty_i64(o, "max_completion_tokens")?;
        if ty_bool(o, "logprobs")? == Some(true) {
            broken.push((400, "logprobs"));
        }
        if messages.is_empty() {
            broken.push((400, "messages"));
        }
        let mut ok = Vec::new();
        for (role, content) in messages {
            let role = match role.as_str() {
                "system" | "developer" => "system",
                "user" | "assistant" => role.as_str(),
                _ => {
                    broken.push((400, "messages"));
                    continue;
                }
            };
            match content {
                Ok(c) => ok.push(ChatMessage::new(role, c)),
                Err(()) => broken.push((400, "messages")),
            }
        }
        let prompt = ctx.tokenizer.encode_chat(&ok, true).expect("chat encodes");
        (Some(prompt), "messages", max_completion.or(max_tokens))
    } else {
        let p = ty_prompt(o)?;
        if ty_bool(o, "echo")? == Some(true) {
            broken.push((400, "echo"));
        }
        if opt(o, "logprobs").is_some() {
            broken.push((400, "logprobs"));
        }
        if ty_i64(o, "best_of")?.is_some_and(|b| b != 1) {
            broken.push((400, "best_of"));
        }
        if ty_str(o, "suffix")?.is_some_and(|s| !s.is_empty()) {
            broken.push((400, "suffix"));
        }
        let prompt = match p {
            None => {
                broken.push((400, "prompt"));
                None
            }
            Some(Prompt::Texts(ts)) if ts.len() == 1 => {
                Some(ctx.tokenizer.encode_plain(&ts[0]).expect("text encodes"))
            }
            Some(Prompt::Tokens(ls)) if ls.len() == 1 => {
                if ls[0].iter().any(|&t| t as usize >= ctx.vocab) {
                    broken.push((400, "prompt"));
                }
                Some(ls[0].clone())
            }
            Some(_) => {
                broken.push((400, "prompt"));
                None
            }
        };
        (prompt, "prompt", max_tokens)
    };
    if n.is_some_and(|n| n != 1) {
        broken.push((400, "n"));
    }
    if presence.is_some_and(|p| p != 0.0) {
        broken.push((400, "presence_penalty"));
    }
    if frequency.is_some_and(|p| p != 0.0) {
        broken.push((400, "frequency_penalty"));
    }
    // The prompt's token count is checked once admitted (see the top of the file).
    if max.is_some_and(|m| !(1..=MAX_TOKENS).contains(&m)) {
        broken.push((400, "max_tokens"));
    }
    if temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        broken.push((400, "temperature"));
    }
    if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        broken.push((400, "top_p"));
    }
    if top_k.is_some_and(|k| !(-1..=u32::MAX as i64).contains(&k)) {
        broken.push((400, "top_k"));
    }
    if stop.len() > MAX_STOP || stop.iter().any(|&l| l > MAX_STOP_LEN) {
        broken.push((400, "stop"));
    }
    Ok(if broken.is_empty() {
        Expect::Valid
    } else {
        Expect::Broken(broken)
    })
}

// ---------------------------------------------------------------------------------------------
// The node

struct Node {
    rt: tokio::runtime::Runtime,
    router: Router,
    ctx: Ctx,
    _coordinator: ScriptedCoordinator,
    _model: TinyModel,
}

fn post(path: &str, body: Vec<u8>) -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap()
}

impl Node {
    fn start() -> Node {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let model = TinyModel::new();
        let (router, coordinator, node) = rt.block_on(async {
            let target = Arc::new(Target::new(&model.path, 3));
            let mut sc = script(target, &model.fingerprint);
            // Blocks are never answered: the one generation slot stays taken.
            sc.silent = true;
            let coordinator = ScriptedCoordinator::start(sc).await;
            let mut st = settings(&model, &coordinator.url());
            st.model.served_name = MODEL.into();
            st.coordinator.timeout = Duration::from_secs(24 * 3600);
            st.limits.max_tokens = MAX_TOKENS as u32;
            st.limits.default_max_tokens = 256;
            st.limits.max_prompt_tokens = MAX_PROMPT_TOKENS as u32;
            st.limits.max_body_bytes = MAX_BODY_BYTES;
            st.limits.max_concurrent_sessions = 1;
            st.limits.admission_wait = Duration::ZERO;
            let app = App::build(st).await.expect("the draft node starts");
            let node = app.node().clone();
            (edgespec_draft_node::router(node.clone()), coordinator, node)
        });
        let ctx = Ctx {
            tokenizer: node.tokenizer().clone(),
            vocab: node.model_info().vocab_size,
        };
        let n = Node {
            rt,
            router,
            ctx,
            _coordinator: coordinator,
            _model: model,
        };
        // Take the one slot with a request that never ends, then wait until a valid request
        // is turned away (a probe that took the slot itself times out and keeps it).
        let occupier = n.router.clone().oneshot(post(
            "/v1/completions",
            serde_json::to_vec(&json!({"model": MODEL, "prompt": "hold", "max_tokens": 5}))
                .unwrap(),
        ));
        n.rt.spawn(occupier);
        n.rt.block_on(async { tokio::time::sleep(Duration::from_millis(100)).await });
        let probe = || {
            serde_json::to_vec(&json!({"model": MODEL, "prompt": "probe", "max_tokens": 5}))
                .unwrap()
        };
        for _ in 0..100 {
            if let Some((StatusCode::TOO_MANY_REQUESTS, _)) =
                n.call("/v1/completions", probe(), Duration::from_millis(500))
            {
                return n;
            }
        }
        panic!("no request ever took the node's only generation slot");
    }

    /// The answer, or `None` if there is none within `limit`.
    fn call(&self, path: &str, body: Vec<u8>, limit: Duration) -> Option<(StatusCode, Vec<u8>)> {
        self.rt.block_on(async {
            tokio::time::timeout(limit, async {
                let resp = self.router.clone().oneshot(post(path, body)).await.unwrap();
                let status = resp.status();
                let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                    .await
                    .unwrap();
                (status, bytes.to_vec())
            })
            .await
            .ok()
        })
    }
}

fn check(
    node: &Node,
    c: &Counters,
    stats: &std::cell::RefCell<std::collections::BTreeMap<u16, u64>>,
    case: Case,
) -> Result<(), TestCaseError> {
    let body = body(&case);
    let path = if case.chat {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    c.exec(1);
    let Some((status, answer)) = node.call(path, body.clone(), Duration::from_secs(10)) else {
        return Err(TestCaseError::fail(format!(
            "no answer within 10 s to {}",
            String::from_utf8_lossy(&body)
        )));
    };
    *stats.borrow_mut().entry(status.as_u16()).or_insert(0) += 1;
    let shown = || {
        String::from_utf8_lossy(&body)
            .chars()
            .take(600)
            .collect::<String>()
    };
    prop_assert!(
        !status.is_server_error(),
        "{} → {}: {}",
        shown(),
        status,
        String::from_utf8_lossy(&answer)
    );
    let err: Value = serde_json::from_slice(&answer)
        .map_err(|e| TestCaseError::fail(format!("answer is not JSON ({e}): {answer:?}")))?;
    let e = &err["error"];
    prop_assert!(
        e["message"].is_string()
            && e["type"].is_string()
            && (e["param"].is_null() || e["param"].is_string())
            && (e["code"].is_null() || e["code"].is_string()),
        "not an OpenAI error object: {}",
        err
    );
    let want = expect(&node.ctx, case.chat, &body);
    let mutated = case.raw.is_some() || !case.mutations.is_empty();
    c.accepted(status == StatusCode::TOO_MANY_REQUESTS);
    match &want {
        Expect::Valid => {
            // A byte-mutated body may repeat a key: serde refuses it, a JSON value keeps the last.
            let dup_ok = mutated && status == StatusCode::BAD_REQUEST && e["param"].is_null();
            prop_assert!(
                status == StatusCode::TOO_MANY_REQUESTS || dup_ok,
                "valid {} → {} {}",
                shown(),
                status,
                err
            );
            if status == StatusCode::TOO_MANY_REQUESTS {
                prop_assert_eq!(e["code"].as_str(), Some("rate_limit_exceeded"));
            }
        }
        // A byte-mutated body that is not a JSON value may still be a request: serde skips an
        // unknown field's value without checking its UTF-8 or the range of its numbers (found
        // by the campaign: `{"{content": "<invalid UTF-8>", "role": ...}` in a message is a
        // message without content). Only the generic properties apply then.
        Expect::Malformed if mutated && serde_json::from_slice::<Value>(&body).is_err() => {}
        Expect::Malformed => {
            prop_assert_eq!(status, StatusCode::BAD_REQUEST, "{} → {}", shown(), err);
            prop_assert!(e["param"].is_null(), "{} → {}", shown(), err);
        }
        Expect::Broken(list) if list == &[(413, "")] => {
            prop_assert_eq!(
                status,
                StatusCode::PAYLOAD_TOO_LARGE,
                "{} bytes → {}",
                body.len(),
                err
            );
        }
        Expect::Broken(list) => {
            let dup_ok = mutated && status == StatusCode::BAD_REQUEST && e["param"].is_null();
            let named = list
                .iter()
                .any(|(s, p)| *s == status.as_u16() && e["param"].as_str() == Some(*p));
            prop_assert!(
                named || dup_ok,
                "{} → {} {}; expected one of {:?}",
                shown(),
                status,
                err,
                list
            );
        }
    }
    Ok(())
}

#[test]
fn openai_requests() {
    let node = Node::start();
    let stats = std::cell::RefCell::new(std::collections::BTreeMap::new());
    fuzz_support::run("openai_requests", 3_000, 8 << 20, case(), |c, case| {
        check(&node, c, &stats, case)
    });
    println!("openai_requests statuses: {:?}", stats.borrow());
}

/// `openai_requests` campaign, 513 360 cases in: an unknown key in a chat message whose value is
/// invalid UTF-8. Not a node bug (serde skips unknown fields' values unchecked, and the message
/// is one without content); the harness's reference had expected a 400. Pinned here: such a
/// body passes validation like the same body without the odd key.
#[test]
fn regression_unknown_key_with_invalid_utf8_is_ignored() {
    let node = Node::start();
    let mut body = br#"{"model":"tiny","max_tokens":1,"messages":[{"{content":""#.to_vec();
    body.extend([0xff, b'a']);
    body.extend(br#"","role":"developer"},{"content":"a ","role":"system"}]}"#);
    assert!(serde_json::from_slice::<Value>(&body).is_err());
    let (status, answer) = node
        .call("/v1/chat/completions", body, Duration::from_secs(10))
        .expect("an answer");
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        String::from_utf8_lossy(&answer)
    );
}
