//! Fuzzing the coordinator's decoders of operator and verify-node input: the admin API body
//! (`PolicyPatch` JSON and its validation against the policy in force), the node actions of the
//! admin API, and verify-node registrations (`NodeInfo` into the registry).
//!
//! Targets:
//! - `admin_policy`: JSON texts built from the policy's field names and awkward values (huge and
//!   negative numbers, `1e400`, humantime strings such as `18446744073709551616s`, nesting beyond
//!   serde_json's depth limit, unknown and duplicate fields), then byte-mutated; parsed as
//!   `PolicyPatch` and applied with `Policy::patched` to a random valid policy. Properties: no
//!   panic; a patch is accepted exactly when the patched policy obeys the documented bounds; an
//!   accepted policy round-trips through its JSON (GET body → PUT body → same policy).
//! - `admin_http`: the same bodies, plus node actions with arbitrary (percent-encoded) node ids and
//!   action names, wrong or missing tokens and stray paths, sent over HTTP to a real coordinator
//!   (`App` on 127.0.0.1:0 with one scripted verify node). Properties: never a 5xx; 401 without
//!   the token; PUT answers 200 with exactly the locally computed policy or 400, and the policy in
//!   force follows; an action answers 200 only for the known node and a known action, else 4xx.
//! - `registry_nodeinfo`: sequences of arbitrary `NodeInfo` registrations, heartbeats and actions
//!   on a `Registry`. Properties: no panic; a registration is accepted exactly when it obeys the
//!   rules (non-empty id and fingerprint, http(s) address, known pool, capacity ≥ 1, the fleet's
//!   fingerprint) and is then visible as registered.
//!
//! `EDGESPEC_FUZZ_CASES=1000000 cargo test -p edgespec-coordinator --test fuzz_admin -- --nocapture`
//! runs a campaign (see docs/BENCHMARKS.md, "Fuzzing").

#[path = "../../proto/tests/fuzz_support/mod.rs"]
mod fuzz_support;

use std::time::{Duration, Instant};

use edgespec_coordinator::policy::GAMMA_CEILING;
use edgespec_coordinator::registry::{AdminState, NodeAction, Pool, Registry};
use edgespec_coordinator::{App, Policy, PolicyPatch, Settings};
use edgespec_proto::pb;
use edgespec_testkit::fleet::{AdminApi, FleetWait};
use edgespec_testkit::harness::Running;
use edgespec_testkit::scripted::{ScriptedVerifier, ScriptedVerifierConfig};
use fuzz_support::{byte_mutation, mutate_bytes, ByteMutation, Counters};
use proptest::prelude::*;

const TOKEN: &str = "fuzz-admin-token";

// ---------------------------------------------------------------------------------------------
// Policy bodies

const FIELDS: &[&str] = &[
    "gamma_min",
    "gamma_max",
    "initial_gamma",
    "batch_window",
    "max_batch_tokens",
    "burst_queue_delay",
    "burst_utilization",
    "speculation_enabled",
    "pipelined",
];

const ODD_FIELDS: &[&str] = &[
    "gama",
    "",
    "GAMMA_MIN",
    "gamma_min ",
    "policy",
    "\u{0}",
    "é",
];

/// JSON value texts, valid and not.
const ODD_VALUES: &[&str] = &[
    "null",
    "true",
    "false",
    "0",
    "-0",
    "-1",
    "1",
    "8",
    "64",
    "65",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "1e400",
    "-1e400",
    "1e-400",
    "0.5",
    "1.0",
    "1.0000001",
    "2.5e-324",
    "NaN",
    "Infinity",
    "[]",
    "{}",
    "[1,2]",
    "{\"a\":1}",
    "\"\"",
    "\"5ms\"",
    "\"1s\"",
    "\"1h\"",
    "\"1h 1ns\"",
    "\"3600s\"",
    "\"1s 1ns\"",
    "\"0ns\"",
    "\"2ms 500us\"",
    "\"-1s\"",
    "\"1.5s\"",
    "\"18446744073709551615s\"",
    "\"18446744073709551616s\"",
    "\"18446744073709551615y\"",
    "\"99999999999999999999999999999999ns\"",
    "\"1000000000000 years\"",
    "\"5 ms\"",
    "\"5msms\"",
    "\"ms\"",
    "\"\\u0000\"",
    "\"\\ud800\"",
];

/// Tokens the byte mutations splice into bodies.
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
    b"\"5ms\"",
    b"\"gamma_max\":",
    b"\xff",
    b"\xc3",
    b"\\u",
    b" ",
];

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn duration_text() -> BoxedStrategy<String> {
    let unit = prop::sample::select(
        &[
            "ns", "us", "ms", "s", "sec", "m", "min", "h", "d", "w", "M", "y", "years", "", "µs",
        ][..],
    );
    let number = prop_oneof![
        0u64..2000,
        any::<u64>(),
        Just(u64::MAX),
        Just(3_600_000_000_000u64),
        Just(1_000_000_000u64),
    ];
    prop::collection::vec((number, unit), 1..4)
        .prop_map(|parts| {
            let s: Vec<String> = parts.iter().map(|(n, u)| format!("{n}{u}")).collect();
            json_string(&s.join(" "))
        })
        .boxed()
}

fn value_text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => prop::sample::select(ODD_VALUES).prop_map(str::to_string),
        3 => prop_oneof![0u32..10, 0u32..70, any::<u32>()].prop_map(|v| v.to_string()),
        1 => any::<i64>().prop_map(|v| v.to_string()),
        2 => any::<f64>().prop_map(|v| format!("{v:?}")),
        2 => (0.0f64..=1.2).prop_map(|v| format!("{v}")),
        3 => duration_text(),
        1 => any::<bool>().prop_map(|b| b.to_string()),
        1 => (1usize..300).prop_map(|d| format!("{}1{}", "[".repeat(d), "]".repeat(d))),
        1 => ".{0,12}".prop_map(|s| json_string(&s)),
    ]
    .boxed()
}

/// A JSON object text over the policy's fields (a few odd ones), then byte-mutated.
fn policy_body() -> BoxedStrategy<Vec<u8>> {
    let name = prop_oneof![
        8 => prop::sample::select(FIELDS),
        1 => prop::sample::select(ODD_FIELDS),
    ];
    let object = prop::collection::vec((name, value_text()), 0..6).prop_map(|entries| {
        let body: Vec<String> = entries
            .iter()
            .map(|(k, v)| format!("{}:{v}", json_string(k)))
            .collect();
        format!("{{{}}}", body.join(",")).into_bytes()
    });
    prop_oneof![
        8 => (object, prop_oneof![
            3 => Just(Vec::<ByteMutation>::new()),
            1 => prop::collection::vec(byte_mutation(), 1..4),
        ])
        .prop_map(|(mut b, ms)| {
            mutate_bytes(&mut b, &ms, JSON_TOKENS);
            b.truncate(8192);
            b
        }),
        1 => prop::collection::vec(any::<u8>(), 0..32),
        1 => prop::sample::select(&["", "null", "[]", "{}", "1", "\"\"", "{\"gamma_max\":}"][..])
            .prop_map(|s| s.as_bytes().to_vec()),
    ]
    .boxed()
}

/// A valid policy other than the default.
fn valid_policy() -> BoxedStrategy<Policy> {
    (
        0u32..=GAMMA_CEILING,
        0u32..=GAMMA_CEILING,
        0u32..=GAMMA_CEILING,
        0u64..=1_000_000,
        1usize..4096,
        0u64..=3_600_000,
        0.01f64..=1.0,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(a, b, c, w, t, d, u, s, p)| {
            let mut g = [a, b, c];
            g.sort_unstable();
            Policy {
                gamma_min: g[0],
                initial_gamma: g[1],
                gamma_max: g[2],
                batch_window: Duration::from_micros(w),
                max_batch_tokens: t,
                burst_queue_delay: Duration::from_millis(d),
                burst_utilization: u,
                speculation_enabled: s,
                pipelined: p,
            }
        })
        .boxed()
}

/// The documented bounds (coordinator/default.toml, docs/OPERATIONS.md), written here again.
fn policy_ok(p: &Policy) -> bool {
    p.gamma_max <= 64
        && p.gamma_min <= p.gamma_max
        && (p.gamma_min..=p.gamma_max).contains(&p.initial_gamma)
        && p.batch_window <= Duration::from_secs(1)
        && p.max_batch_tokens >= 1
        && p.burst_queue_delay <= Duration::from_secs(3600)
        && p.burst_utilization > 0.0
        && p.burst_utilization <= 1.0
}

/// Equal policies, except that `burst_utilization` may differ by one ulp: serde_json (without its
/// `float_roundtrip` feature) does not always parse the shortest decimal form of an f64 back to
/// the same f64 (found by this harness; see `burst_utilization_json_round_trip_is_off_by_one_ulp`).
fn same_policy(a: &Policy, b: &Policy) -> bool {
    let ulps = (a.burst_utilization.to_bits() as i64 - b.burst_utilization.to_bits() as i64).abs();
    ulps <= 1
        && Policy {
            burst_utilization: b.burst_utilization,
            ..a.clone()
        } == *b
}

fn apply_patch(base: &Policy, patch: &PolicyPatch) -> Policy {
    Policy {
        gamma_min: patch.gamma_min.unwrap_or(base.gamma_min),
        gamma_max: patch.gamma_max.unwrap_or(base.gamma_max),
        initial_gamma: patch.initial_gamma.unwrap_or(base.initial_gamma),
        batch_window: patch.batch_window.unwrap_or(base.batch_window),
        max_batch_tokens: patch.max_batch_tokens.unwrap_or(base.max_batch_tokens),
        burst_queue_delay: patch.burst_queue_delay.unwrap_or(base.burst_queue_delay),
        burst_utilization: patch.burst_utilization.unwrap_or(base.burst_utilization),
        speculation_enabled: patch
            .speculation_enabled
            .unwrap_or(base.speculation_enabled),
        pipelined: patch.pipelined.unwrap_or(base.pipelined),
    }
}

/// What the admin API must do with `body` against the policy `base`: `Ok(new policy)` or
/// `Err(())` for a 400. Also checks the round-trip properties of an accepted policy.
fn decide(base: &Policy, body: &[u8]) -> Result<Result<Policy, ()>, TestCaseError> {
    let Ok(patch) = serde_json::from_slice::<PolicyPatch>(body) else {
        return Ok(Err(()));
    };
    let want = apply_patch(base, &patch);
    let got = base.patched(&patch);
    prop_assert_eq!(
        got.is_ok(),
        policy_ok(&want),
        "{:?} on {:?}: {:?}",
        patch,
        base,
        got
    );
    let Ok(p) = got else { return Ok(Err(())) };
    prop_assert_eq!(&p, &want);
    prop_assert!(p.validate().is_ok());
    // GET's body, PUT back, gives the same policy; the full policy parses as itself.
    let text = serde_json::to_vec(&p).unwrap();
    let full: PolicyPatch = serde_json::from_slice(&text).map_err(|e| {
        TestCaseError::fail(format!(
            "own JSON {:?}: {e}",
            String::from_utf8_lossy(&text)
        ))
    })?;
    let again = base.patched(&full);
    prop_assert!(
        again.as_ref().is_ok_and(|q| same_policy(q, &p)),
        "{:?} → {:?}",
        p,
        again
    );
    let parsed = serde_json::from_slice::<Policy>(&text).ok();
    prop_assert!(
        parsed.as_ref().is_some_and(|q| same_policy(q, &p)),
        "{:?} → {:?}",
        p,
        parsed
    );
    Ok(Ok(p))
}

#[test]
fn admin_policy() {
    let default = Settings::default().policy;
    assert!(policy_ok(&default));
    fuzz_support::run(
        "admin_policy",
        20_000,
        1 << 20,
        (
            prop_oneof![Just(None), valid_policy().prop_map(Some)],
            policy_body(),
        ),
        |c: &Counters, (base, body)| {
            c.exec(1);
            let base = base.unwrap_or_else(|| default.clone());
            let r = decide(&base, &body)?;
            c.accepted(r.is_ok());
            Ok(())
        },
    );
}

/// Regression input of `admin_policy`: the policy GET returns, PUT back, moves
/// `burst_utilization` by one ulp (serde_json's default float parsing is not correctly rounded).
/// Not a crash. Today `back` is one ulp below `u`; with serde_json's `float_roundtrip` feature it
/// would be equal, and this test passes either way (it bounds the drift).
#[test]
fn burst_utilization_json_round_trip_is_off_by_one_ulp() {
    let u = 0.957_539_982_188_865_7_f64;
    let text = serde_json::to_string(&u).unwrap();
    assert_eq!(text, "0.9575399821888657");
    let back: f64 = serde_json::from_str(&text).unwrap();
    let ulps = (back.to_bits() as i64 - u.to_bits() as i64).abs();
    assert!(ulps <= 1, "{u} → {text} → {back}");
    println!("{u} → {text} → {back}: {ulps} ulp");
    let p = Policy {
        burst_utilization: u,
        ..Settings::default().policy
    };
    let patch: PolicyPatch = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
    let q = Settings::default().policy.patched(&patch).unwrap();
    assert!(same_policy(&q, &p));
}

/// `admin_policy`, first crash (26 542 cases into the campaign): a duration whose nanoseconds
/// carry into seconds past `u64::MAX`. humantime 2.4 builds it with `Duration::new`, which
/// panicked ("overflow in Duration::new") inside the PUT handler's body parse. A patch's
/// durations now go through `optional_duration`, which makes that a 400.
#[test]
fn regression_duration_overflow_is_a_parse_error() {
    for body in [
        r#"{"batch_window":"18446744073709551615s 1000000000ns"}"#,
        r#"{"burst_queue_delay":"18446744073709551615s 999999999ns 1ns"}"#,
    ] {
        assert!(serde_json::from_str::<PolicyPatch>(body).is_err(), "{body}");
    }
    let server = Server::start();
    let (status, answer) = server
        .send(
            "PUT",
            "/admin/v1/policy",
            &Auth::Right,
            Some(br#"{"batch_window":"18446744073709551615s 1000000000ns"}"#.to_vec()),
        )
        .unwrap();
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&answer));
    assert!(error_body(&answer));
}

// ---------------------------------------------------------------------------------------------
// admin_http

#[derive(Debug, Clone)]
enum Auth {
    Right,
    Missing,
    Wrong(String),
    LowercaseScheme,
}

#[derive(Debug, Clone)]
enum Segment {
    /// Raw bytes, every one percent-encoded.
    Encoded(Vec<u8>),
    /// Characters sent as they are (may contain `%`, `/`, `.`).
    Raw(String),
    Known(&'static str),
}

impl Segment {
    fn url_text(&self) -> String {
        match self {
            Segment::Encoded(b) => b.iter().map(|x| format!("%{x:02X}")).collect(),
            Segment::Raw(s) => s.clone(),
            Segment::Known(s) => s.to_string(),
        }
    }

    /// The decoded segment if it is one segment of valid UTF-8.
    fn decoded(&self) -> Option<String> {
        match self {
            Segment::Encoded(b) => String::from_utf8(b.clone()).ok(),
            Segment::Raw(_) => None,
            Segment::Known(s) => Some(s.to_string()),
        }
    }
}

#[derive(Debug, Clone)]
enum Request {
    PutPolicy(Auth, Vec<u8>),
    Action(Auth, Segment, Segment),
    Other(Auth, &'static str, String),
}

fn auth() -> BoxedStrategy<Auth> {
    prop_oneof![
        12 => Just(Auth::Right),
        1 => Just(Auth::Missing),
        1 => "[ -~]{0,20}".prop_map(Auth::Wrong),
        1 => Just(Auth::Wrong(TOKEN[..TOKEN.len() - 1].to_string())),
        1 => Just(Auth::LowercaseScheme),
    ]
    .boxed()
}

fn segment(known: &'static [&'static str]) -> BoxedStrategy<Segment> {
    prop_oneof![
        4 => prop::sample::select(known).prop_map(Segment::Known),
        2 => prop::collection::vec(any::<u8>(), 0..12).prop_map(Segment::Encoded),
        1 => "[a-z0-9%./~_-]{0,12}".prop_map(Segment::Raw),
    ]
    .boxed()
}

fn request() -> BoxedStrategy<Request> {
    prop_oneof![
        6 => (auth(), policy_body()).prop_map(|(a, b)| Request::PutPolicy(a, b)),
        4 => (
            auth(),
            segment(&["v1", "v2", ""]),
            segment(&["drain", "cordon", "uncordon", "Drain", "delete"]),
        )
            .prop_map(|(a, i, x)| Request::Action(a, i, x)),
        1 => (
            auth(),
            prop::sample::select(&["GET", "PUT", "POST", "DELETE", "PATCH"][..]),
            prop_oneof![
                Just("/admin/v1/policy".to_string()),
                Just("/admin/v1/nodes".to_string()),
                Just("/admin/v1/sessions".to_string()),
                Just("/healthz".to_string()),
                Just("/readyz".to_string()),
                Just("/metrics".to_string()),
                "/admin/v1/[a-z%/.]{0,16}",
                "/[a-z%/.?=&]{0,16}",
            ],
        )
            .prop_map(|(a, m, p)| Request::Other(a, m, p)),
    ]
    .boxed()
}

struct Server {
    rt: tokio::runtime::Runtime,
    base: String,
    client: reqwest::Client,
    _verifier: ScriptedVerifier,
    _coordinator: Running<Result<(), edgespec_coordinator::Error>>,
}

impl Server {
    fn start() -> Server {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut s = Settings::for_tests();
        s.admin.token = TOKEN.into();
        let (base, verifier, coordinator) = rt.block_on(async {
            let app = App::build(s).await.expect("coordinator binds");
            let (grpc, http) = (app.grpc_addr(), app.http_addr());
            let coordinator = Running::spawn(|shutdown| app.run(shutdown));
            let cfg = ScriptedVerifierConfig::new("v1", "onprem", &format!("http://{grpc}"));
            let v = ScriptedVerifier::start(cfg).await.expect("verifier starts");
            AdminApi::http(http, TOKEN)
                .wait_fleet(FleetWait::new(1, 0, Duration::from_secs(20)), || Ok(()))
                .await
                .expect("verifier v1 registers");
            (format!("http://{http}"), v, coordinator)
        });
        Server {
            rt,
            base,
            client: reqwest::Client::new(),
            _verifier: verifier,
            _coordinator: coordinator,
        }
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        auth: &Auth,
        body: Option<Vec<u8>>,
    ) -> Option<(u16, Vec<u8>)> {
        let url = format!("{}{path}", self.base);
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut rb = self.client.request(method, &url);
        rb = match auth {
            Auth::Right => rb.bearer_auth(TOKEN),
            Auth::Missing => rb,
            Auth::Wrong(t) => rb.header("authorization", format!("Bearer {t}")),
            Auth::LowercaseScheme => rb.header("authorization", format!("bearer {TOKEN}")),
        };
        if let Some(b) = body {
            rb = rb.body(b);
        }
        let req = rb.build().ok()?;
        self.rt.block_on(async {
            let r = self
                .client
                .execute(req)
                .await
                .expect("the admin API answers");
            let status = r.status().as_u16();
            Some((status, r.bytes().await.expect("a whole body").to_vec()))
        })
    }
}

fn error_body(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| v["error"].is_string())
}

#[test]
fn admin_http() {
    let server = Server::start();
    let current = std::cell::RefCell::new(Settings::default().policy);
    let policy_now = |s: &Server| -> Policy {
        let (st, body) = s
            .send("GET", "/admin/v1/policy", &Auth::Right, None)
            .unwrap();
        assert_eq!(st, 200);
        serde_json::from_slice(&body).unwrap()
    };
    assert!(same_policy(&policy_now(&server), &current.borrow()));
    let statuses = std::cell::RefCell::new(std::collections::BTreeMap::new());
    fuzz_support::run(
        "admin_http",
        2_000,
        1 << 20,
        request(),
        |c: &Counters, req| {
            let (status, body, expect) = match &req {
                Request::PutPolicy(auth, body) => {
                    let Some((st, rb)) =
                        server.send("PUT", "/admin/v1/policy", auth, Some(body.clone()))
                    else {
                        return Ok(());
                    };
                    let expect: Option<u16> = if !matches!(auth, Auth::Right) {
                        Some(401)
                    } else {
                        let base = current.borrow().clone();
                        match decide(&base, body)? {
                            Ok(p) => {
                                if st == 200 {
                                    let got: Policy = serde_json::from_slice(&rb).map_err(|e| {
                                        TestCaseError::fail(format!("PUT answered 200 with {e}"))
                                    })?;
                                    // The answer's JSON may move burst_utilization
                                    // by one ulp (see `same_policy`); the server holds `p`.
                                    prop_assert!(same_policy(&got, &p), "{:?} != {:?}", got, p);
                                    *current.borrow_mut() = p;
                                }
                                Some(200)
                            }
                            Err(()) => Some(400),
                        }
                    };
                    (st, rb, expect)
                }
                Request::Action(auth, id, action) => {
                    let path = format!(
                        "/admin/v1/verifiers/{}/{}",
                        id.url_text(),
                        action.url_text()
                    );
                    let Some((st, rb)) = server.send("POST", &path, auth, None) else {
                        return Ok(());
                    };
                    let known_action = matches!(
                        action.decoded().as_deref(),
                        Some("drain" | "cordon" | "uncordon")
                    );
                    let expect = match (auth, id.decoded()) {
                        (Auth::Right, Some(i)) if i == "v1" && known_action => Some(200),
                        (Auth::Right, Some(i)) if !i.is_empty() && action.decoded().is_some() => {
                            Some(404)
                        }
                        _ => None,
                    };
                    (st, rb, expect)
                }
                Request::Other(auth, method, path) => {
                    let Some((st, rb)) = server.send(method, path, auth, None) else {
                        return Ok(());
                    };
                    (st, rb, None)
                }
            };
            c.exec(1);
            c.accepted(status < 300);
            *statuses.borrow_mut().entry(status).or_insert(0u64) += 1;
            prop_assert!(
                status < 500,
                "{:?} → {} {:?}",
                req,
                status,
                String::from_utf8_lossy(&body)
            );
            if let Some(e) = expect {
                prop_assert_eq!(
                    status,
                    e,
                    "{:?} → {:?}",
                    req,
                    String::from_utf8_lossy(&body)
                );
            }
            if matches!(status, 400 | 401 | 404) && matches!(req, Request::PutPolicy(..)) {
                prop_assert!(error_body(&body), "{:?}", String::from_utf8_lossy(&body));
            }
            Ok(())
        },
    );
    println!("admin_http statuses: {:?}", statuses.borrow());
    // The policy in force is the one the harness tracked.
    assert!(same_policy(&policy_now(&server), &current.borrow()));
}

// ---------------------------------------------------------------------------------------------
// registry_nodeinfo

#[derive(Debug, Clone)]
enum Op {
    Register(pb::NodeInfo),
    Heartbeat(String),
    Action(String, u8),
    Expire(u64),
}

fn node_info() -> BoxedStrategy<pb::NodeInfo> {
    let id = prop_oneof![
        4 => prop::sample::select(&["a", "b", "c"][..]).prop_map(str::to_string),
        1 => Just(String::new()),
        1 => ".{0,8}",
    ];
    let addr = prop_oneof![
        4 => Just("http://a:1".to_string()),
        1 => Just("https://b:2".to_string()),
        1 => "(http|https|ftp|HTTP)?(://)?.{0,8}",
    ];
    let pool = prop_oneof![
        3 => Just("onprem".to_string()),
        2 => Just("cloud".to_string()),
        1 => prop::sample::select(&["", "Onprem", "cloud ", "edge"][..]).prop_map(str::to_string),
    ];
    let fp = prop_oneof![
        4 => Just("fp-1".to_string()),
        1 => Just("fp-2".to_string()),
        1 => Just(String::new()),
    ];
    let load = prop::option::of(
        (
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<f32>(),
            any::<f32>(),
            any::<f32>(),
        )
            .prop_map(|(a, b, c, d, e, f, g)| pb::VerifierLoad {
                active_sessions: a,
                kv_bytes: b,
                kv_budget_bytes: c,
                queued_tokens: d,
                busy_fraction: e,
                verify_base_s: f,
                verify_per_token_s: g,
                ..Default::default()
            }),
    );
    (
        id,
        addr,
        pool,
        fp,
        prop_oneof![0u32..3, any::<u32>()],
        any::<u32>(),
        load,
    )
        .prop_map(
            |(node_id, advertise_addr, pool, fingerprint, cap, mbt, load)| pb::NodeInfo {
                node_id,
                advertise_addr,
                pool,
                model_name: "m".into(),
                fingerprint,
                vocab_size: 97,
                max_context: 512,
                capacity_sessions: cap,
                max_block_tokens: 16,
                max_batch_tokens: mbt,
                device: "cpu".into(),
                load,
            },
        )
        .boxed()
}

fn op() -> BoxedStrategy<Op> {
    let id = prop::sample::select(&["a", "b", "c", "zz"][..]).prop_map(str::to_string);
    prop_oneof![
        6 => node_info().prop_map(Op::Register),
        2 => id.clone().prop_map(Op::Heartbeat),
        2 => (id, 0u8..3).prop_map(|(i, a)| Op::Action(i, a)),
        1 => (0u64..5000).prop_map(Op::Expire),
    ]
    .boxed()
}

fn run_ops(c: &Counters, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut reg = Registry::default();
    let t0 = Instant::now();
    let mut now = t0;
    for op in ops {
        c.exec(1);
        now += Duration::from_millis(10);
        match op {
            Op::Register(info) => {
                let fleet: Option<String> = reg
                    .iter()
                    .filter(|n| n.id != info.node_id)
                    .find(|n| n.health == edgespec_coordinator::registry::Health::Up)
                    .or_else(|| reg.iter().find(|n| n.id != info.node_id))
                    .map(|n| n.fingerprint.clone());
                let ok = !info.node_id.is_empty()
                    && !info.fingerprint.is_empty()
                    && (info.advertise_addr.starts_with("http://")
                        || info.advertise_addr.starts_with("https://"))
                    && matches!(info.pool.as_str(), "onprem" | "cloud")
                    && info.capacity_sessions >= 1
                    && info.load.as_ref().is_none_or(|l| {
                        (0.0..=1.0).contains(&l.busy_fraction)
                            && [l.verify_base_s, l.verify_per_token_s]
                                .iter()
                                .all(|x| x.is_finite() && *x >= 0.0)
                    })
                    && fleet.as_ref().is_none_or(|f| *f == info.fingerprint);
                // The gRPC edge validates the message, then the registry checks the fleet.
                let r = edgespec_proto::domain::NodeInfo::try_from(info.clone())
                    .map_err(|e| e.to_string())
                    .and_then(|i| reg.register(&i, now).map_err(|e| e.to_string()));
                c.accepted(r.is_ok());
                prop_assert_eq!(r.is_ok(), ok, "{:?} → {:?}", info, r);
                if r.is_ok() {
                    let v = reg.get(&info.node_id).expect("registered");
                    prop_assert_eq!(&v.addr, &info.advertise_addr);
                    prop_assert_eq!(&v.fingerprint, &info.fingerprint);
                    prop_assert_eq!(v.capacity, info.capacity_sessions as usize);
                    let pool = if info.pool == "onprem" {
                        Pool::Onprem
                    } else {
                        Pool::Cloud
                    };
                    prop_assert_eq!(v.pool, pool);
                    prop_assert!(reg.heartbeat(&info.node_id, None, now).known);
                }
            }
            Op::Heartbeat(id) => {
                let _ = reg.heartbeat(&id, None, now);
            }
            Op::Action(id, a) => {
                let action =
                    [NodeAction::Drain, NodeAction::Cordon, NodeAction::Uncordon][a as usize];
                let known = reg.get(&id).is_some();
                let r = reg.apply(&id, action);
                prop_assert_eq!(r.is_ok(), known);
                if let Ok(s) = r {
                    let want = [
                        AdminState::Draining,
                        AdminState::Cordoned,
                        AdminState::Active,
                    ][a as usize];
                    prop_assert_eq!(s, want);
                }
            }
            Op::Expire(ms) => {
                let _ = reg.expire(now, Duration::from_millis(ms));
            }
        }
    }
    Ok(())
}

#[test]
fn registry_nodeinfo() {
    fuzz_support::run(
        "registry_nodeinfo",
        5_000,
        1 << 20,
        prop::collection::vec(op(), 1..12),
        run_ops,
    );
}
