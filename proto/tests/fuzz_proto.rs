//! Fuzzing the wire decoders: protobuf messages → validated domain types (`edgespec_proto::domain`)
//! and raw bytes → `prost::Message::decode` → domain.
//!
//! Targets:
//! - `proto_messages`: structured `pb` messages (draft messages and blocks, verify items and
//!   batches, distributions, sampling parameters, session errors, coordinator messages, verify
//!   outcomes), most of them repaired to be valid and then mutated in one field. Properties: no
//!   panic; the domain accepts exactly what the documented rules accept (a reference check
//!   written here from the docs); accepted values round-trip (domain → pb → domain equal, and
//!   pb → domain → pb equal up to the documented normalisation `top_p = 0 → 1`).
//! - `proto_bytes`: random bytes and mutated encodings (bit flips, overwrites, truncation,
//!   deletion, duplication, inserted varints up to 2^64 − 1 such as a declared length of 2^60),
//!   decoded as every top-level message and converted. Properties: no panic, no allocation above
//!   1 MiB for a ≤ 4 KiB input, decode → encode → decode is stable.
//!
//! `EDGESPEC_FUZZ_CASES=1000000 cargo test -p edgespec-proto --test fuzz_proto -- --nocapture`
//! runs a campaign (see docs/BENCHMARKS.md, "Fuzzing").

mod fuzz_support;

use edgespec_proto::domain::{
    batch_from_pb, sampling_from_pb, sparse_from_pb, Block, CoordinatorMessage, DraftBlock,
    DraftMessage, ErrorCode, Outcome, SessionError, MAX_DIST_SUPPORT, PROB_SUM_TOLERANCE,
};
use edgespec_proto::pb;
use fuzz_support::Counters;
use proptest::prelude::*;
use proptest::sample::Index;
use prost::Message;

// ---------------------------------------------------------------------------------------------
// Values

const SPECIAL_F32: &[f32] = &[
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::MIN_POSITIVE,
    -f32::MIN_POSITIVE,
    1e-45,
    f32::EPSILON,
    1.0 + 1e-3,
    1.0 - 1e-3,
    1.0 + 2e-3,
    2.0,
    f32::MAX,
    f32::MIN,
];

fn weird_f32() -> BoxedStrategy<f32> {
    prop_oneof![
        4 => 0.0f32..=1.0,
        2 => prop::sample::select(SPECIAL_F32),
        1 => any::<f32>(),
        1 => (any::<u32>()).prop_map(f32::from_bits),
    ]
    .boxed()
}

fn token_id() -> BoxedStrategy<u32> {
    prop_oneof![
        4 => 0u32..8,
        2 => 0u32..400,
        1 => any::<u32>(),
        1 => Just(u32::MAX),
    ]
    .boxed()
}

fn any_u64() -> BoxedStrategy<u64> {
    prop_oneof![3 => 0u64..8, 1 => any::<u64>(), 1 => Just(u64::MAX)].boxed()
}

fn any_u32() -> BoxedStrategy<u32> {
    prop_oneof![3 => 0u32..8, 1 => any::<u32>(), 1 => Just(u32::MAX)].boxed()
}

fn short_string() -> BoxedStrategy<String> {
    prop_oneof![
        2 => Just(String::new()),
        3 => "[a-z0-9:/._-]{1,16}",
        1 => ".{0,24}",
    ]
    .boxed()
}

fn sampling() -> BoxedStrategy<Option<pb::SamplingParams>> {
    let params = (weird_f32(), any_u32(), weird_f32(), any_u64()).prop_map(
        |(temperature, top_k, top_p, seed)| pb::SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
        },
    );
    prop_oneof![1 => Just(None), 12 => params.prop_map(Some)].boxed()
}

fn sparse() -> BoxedStrategy<pb::SparseDist> {
    let short = (
        prop::collection::vec(token_id(), 0..10),
        prop::collection::vec(weird_f32(), 0..10),
    );
    let long = (
        prop::collection::vec(token_id(), 250..262),
        prop::collection::vec(0.0f32..1.0, 250..262),
    );
    prop_oneof![8 => short, 1 => long]
        .prop_map(|(ids, probs)| pb::SparseDist { ids, probs })
        .boxed()
}

#[derive(Debug, Clone)]
struct RawItem {
    session_id: u64,
    round: u64,
    committed_len: u32,
    history: Vec<u32>,
    draft_tokens: Vec<u32>,
    draft_probs: Vec<pb::SparseDist>,
    sampling: Option<pb::SamplingParams>,
}

fn raw_item() -> BoxedStrategy<RawItem> {
    (
        any_u64(),
        any_u64(),
        prop_oneof![4 => 0u32..6, 1 => any::<u32>()],
        prop::collection::vec(token_id(), 0..8),
        prop::collection::vec(token_id(), 0..6),
        prop::collection::vec(sparse(), 0..6),
        sampling(),
    )
        .prop_map(
            |(session_id, round, committed_len, history, draft_tokens, draft_probs, sampling)| {
                RawItem {
                    session_id,
                    round,
                    committed_len,
                    history,
                    draft_tokens,
                    draft_probs,
                    sampling,
                }
            },
        )
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// Repair (make valid) and mutation (break one thing)

/// A valid distribution built from `d`'s ids and weights that contains `token`.
fn repair_sparse(d: &pb::SparseDist, token: Option<u32>) -> pb::SparseDist {
    let mut ids: Vec<u32> = Vec::new();
    for &i in &d.ids {
        if !ids.contains(&i) && ids.len() < MAX_DIST_SUPPORT {
            ids.push(i);
        }
    }
    if let Some(t) = token {
        if !ids.contains(&t) {
            if ids.len() == MAX_DIST_SUPPORT {
                ids[0] = t;
            } else {
                ids.push(t);
            }
        }
    }
    if ids.is_empty() {
        ids.push(0);
    }
    let weights: Vec<f32> = (0..ids.len())
        .map(|i| match d.probs.get(i) {
            Some(&p) if p.is_finite() => p.abs().clamp(1e-3, 1e3),
            _ => 1.0,
        })
        .collect();
    let sum: f32 = weights.iter().sum();
    pb::SparseDist {
        ids,
        probs: weights.iter().map(|w| w / sum).collect(),
    }
}

fn repair_sampling(s: &Option<pb::SamplingParams>) -> pb::SamplingParams {
    let mut s = s.unwrap_or_default();
    if !s.temperature.is_finite() || s.temperature < 0.0 {
        s.temperature = s.temperature.abs().min(2.0);
        if s.temperature.is_nan() {
            s.temperature = 0.7;
        }
    }
    if !(0.0..=1.0).contains(&s.top_p) {
        s.top_p = 1.0;
    }
    s
}

fn repair_item(mut m: RawItem) -> RawItem {
    m.committed_len = m.committed_len.clamp(1, 1 << 20);
    if !m.history.is_empty() {
        m.history.resize(m.committed_len.min(64) as usize, 7);
        m.committed_len = m.history.len() as u32;
    }
    let s = repair_sampling(&m.sampling);
    m.sampling = Some(s);
    if s.temperature <= 0.0 {
        m.draft_probs.clear();
    } else {
        let empty = pb::SparseDist::default();
        m.draft_probs = m
            .draft_tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| repair_sparse(m.draft_probs.get(i).unwrap_or(&empty), Some(t)))
            .collect();
    }
    m
}

/// One targeted break of an otherwise valid item (`which` picks it; some choices are no-ops).
fn mutate_item(m: &mut RawItem, which: u8, v: f32, at: &Index) {
    match which % 14 {
        0 => m.committed_len = 0,
        1 => m.history.push(1),
        2 => m.sampling = None,
        3 => {
            if let Some(s) = &mut m.sampling {
                s.temperature = v;
            }
        }
        4 => {
            if let Some(s) = &mut m.sampling {
                s.top_p = v;
            }
        }
        5 => m.draft_probs.push(pb::SparseDist {
            ids: vec![1],
            probs: vec![1.0],
        }),
        6 => {
            m.draft_probs.pop();
        }
        7..=11 => {
            if m.draft_probs.is_empty() {
                return;
            }
            let i = at.index(m.draft_probs.len());
            let token = m.draft_tokens.get(i).copied();
            let d = &mut m.draft_probs[i];
            if d.ids.is_empty() {
                return;
            }
            let j = at.index(d.ids.len());
            match which % 14 {
                7 => {
                    if let Some(p) = d.probs.get_mut(j) {
                        *p = v;
                    }
                }
                8 => d.ids[j] = d.ids[(j + 1) % d.ids.len()],
                9 => d.ids.push(9999),
                10 => {
                    d.ids.clear();
                    d.probs.clear();
                }
                _ => {
                    // Move the draft token out of its own support.
                    let Some(t) = token else { return };
                    for id in &mut d.ids {
                        if *id == t {
                            *id = t.wrapping_add(1_000_003);
                        }
                    }
                }
            }
        }
        12 => m.draft_tokens.push(3),
        _ => {}
    }
}

fn verify_item(m: &RawItem) -> pb::VerifyItem {
    pb::VerifyItem {
        session_id: m.session_id,
        round: m.round,
        committed_len: m.committed_len,
        history: m.history.clone(),
        draft_tokens: m.draft_tokens.clone(),
        draft_probs: m.draft_probs.clone(),
        sampling: m.sampling,
    }
}

fn draft_block(m: &RawItem, t: &Telemetry) -> pb::DraftBlock {
    pb::DraftBlock {
        session_id: m.session_id,
        round: m.round,
        committed_len: m.committed_len,
        history: m.history.clone(),
        draft_tokens: m.draft_tokens.clone(),
        draft_probs: m.draft_probs.clone(),
        sampling: m.sampling,
        max_new_tokens: t.max_new_tokens,
        client_send_unix_ns: t.client_send_unix_ns,
        draft_s_per_token: t.draft_s_per_token,
        last_round_trip_ns: t.last_round_trip_ns,
        drafted_ahead: t.drafted_ahead,
        method: if t.hybrid {
            pb::DraftMethod::Hybrid
        } else {
            pb::DraftMethod::Lookup
        } as i32,
        // The same weird value as draft_s_per_token: both must be finite and >= 0.
        model_s_per_token: t.draft_s_per_token,
        model_token_mask: t.model_token_mask,
    }
}

#[derive(Debug, Clone)]
struct Telemetry {
    max_new_tokens: u32,
    client_send_unix_ns: u64,
    draft_s_per_token: f32,
    last_round_trip_ns: u64,
    drafted_ahead: bool,
    hybrid: bool,
    model_token_mask: u64,
}

fn telemetry() -> BoxedStrategy<Telemetry> {
    // Masks: none, the low bits (within most blocks), or any word (often beyond the tokens).
    let mask = prop_oneof![Just(0u64), 0u64..16, any_u64()];
    (
        (any_u32(), any_u64(), weird_f32(), any_u64(), any::<bool>()),
        (any::<bool>(), mask),
    )
        .prop_map(
            |(
                (max_new_tokens, client_send_unix_ns, draft_s_per_token, last_round_trip_ns, a),
                (hybrid, model_token_mask),
            )| {
                Telemetry {
                    max_new_tokens,
                    client_send_unix_ns,
                    draft_s_per_token,
                    last_round_trip_ns,
                    drafted_ahead: a,
                    hybrid,
                    model_token_mask,
                }
            },
        )
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// The documented rules, written independently of `domain.rs`

fn sampling_ok(s: &Option<pb::SamplingParams>) -> bool {
    match s {
        None => false,
        Some(s) => {
            s.temperature.is_finite() && s.temperature >= 0.0 && (0.0..=1.0).contains(&s.top_p)
        }
    }
}

fn sparse_ok(d: &pb::SparseDist) -> bool {
    let n = d.ids.len();
    if n != d.probs.len() || n == 0 || n > MAX_DIST_SUPPORT {
        return false;
    }
    if !d.probs.iter().all(|&p| p > 0.0 && p <= 1.0) {
        return false;
    }
    let sum: f32 = d.probs.iter().sum();
    let sums_to_one = (sum - 1.0).abs() <= PROB_SUM_TOLERANCE;
    if !sums_to_one {
        return false;
    }
    let mut seen = std::collections::HashSet::new();
    d.ids.iter().all(|i| seen.insert(*i))
}

fn item_ok(m: &RawItem) -> bool {
    if m.committed_len == 0 {
        return false;
    }
    if !m.history.is_empty() && m.history.len() != m.committed_len as usize {
        return false;
    }
    if !sampling_ok(&m.sampling) {
        return false;
    }
    let greedy = m.sampling.is_some_and(|s| s.temperature <= 0.0);
    let expected_q = if greedy { 0 } else { m.draft_tokens.len() };
    if m.draft_probs.len() != expected_q {
        return false;
    }
    m.draft_probs.iter().zip(&m.draft_tokens).all(|(d, t)| {
        sparse_ok(d)
            && d.ids
                .iter()
                .zip(&d.probs)
                .any(|(id, &p)| id == t && p > 0.0)
    })
}

/// The pb form an accepted message comes back as: sampling present, `top_p` 0 read as 1.
fn normalised_sampling(s: &Option<pb::SamplingParams>) -> Option<pb::SamplingParams> {
    s.map(|mut s| {
        if s.top_p == 0.0 {
            s.top_p = 1.0;
        }
        s
    })
}

fn same_bytes<M: Message>(a: &M, b: &M) -> bool {
    a.encode_to_vec() == b.encode_to_vec()
}

// ---------------------------------------------------------------------------------------------
// proto_messages

#[derive(Debug, Clone)]
enum Input {
    Item(RawItem),
    Draft(RawItem, Telemetry),
    Batch(Vec<RawItem>),
    Sparse(pb::SparseDist, Option<u32>),
    Sampling(Option<pb::SamplingParams>),
    Hello(String, f32),
    Close(u64),
    ProbeReply(u64, u32),
    EmptyDraftMessage,
    SessionError(u64, u64, i32, String),
    Outcome(u32, u32, u32, RawItem),
}

#[derive(Debug, Clone)]
struct Case {
    input: Input,
    repair: bool,
    mutate: Option<(u8, f32, Index)>,
}

fn input() -> BoxedStrategy<Input> {
    prop_oneof![
        6 => raw_item().prop_map(Input::Item),
        6 => (raw_item(), telemetry()).prop_map(|(m, t)| Input::Draft(m, t)),
        3 => prop::collection::vec(raw_item(), 0..4).prop_map(Input::Batch),
        4 => (sparse(), prop::option::of(token_id())).prop_map(|(d, t)| Input::Sparse(d, t)),
        2 => sampling().prop_map(Input::Sampling),
        1 => (short_string(), weird_f32()).prop_map(|(f, s)| Input::Hello(f, s)),
        1 => any_u64().prop_map(Input::Close),
        1 => (any_u64(), any_u32()).prop_map(|(a, b)| Input::ProbeReply(a, b)),
        1 => Just(Input::EmptyDraftMessage),
        2 => (any_u64(), any_u64(), prop_oneof![0i32..9, any::<i32>()], ".{0,8}")
            .prop_map(|(a, b, c, d)| Input::SessionError(a, b, c, d)),
        2 => (any_u32(), any_u32(), any_u32(), raw_item())
            .prop_map(|(a, b, c, m)| Input::Outcome(a, b, c, m)),
    ]
    .boxed()
}

fn case() -> impl Strategy<Value = Case> {
    (
        input(),
        any::<bool>(),
        prop::option::of((any::<u8>(), weird_f32(), any::<Index>())),
    )
        .prop_map(|(input, repair, mutate)| Case {
            input,
            repair,
            mutate,
        })
}

fn prepare(m: RawItem, repair: bool, mutate: &Option<(u8, f32, Index)>) -> RawItem {
    let mut m = if repair { repair_item(m) } else { m };
    if let Some((which, v, at)) = mutate {
        mutate_item(&mut m, *which, *v, at);
    }
    m
}

fn check_block(c: &Counters, m: &RawItem) -> Result<(), TestCaseError> {
    let pbm = verify_item(m);
    let got = Block::try_from(pbm.clone());
    c.accepted(got.is_ok());
    let expected = item_ok(m);
    prop_assert_eq!(got.is_ok(), expected, "VerifyItem {:?} → {:?}", pbm, got);
    if let Ok(b) = got {
        prop_assert!(b.committed_len >= 1);
        let back = pb::VerifyItem::from(&b);
        let mut want = pbm.clone();
        want.sampling = normalised_sampling(&want.sampling);
        prop_assert!(same_bytes(&back, &want), "{:?} != {:?}", back, want);
        prop_assert_eq!(Block::try_from(back), Ok(b));
    }
    Ok(())
}

fn check_draft(c: &Counters, m: &RawItem, t: &Telemetry) -> Result<(), TestCaseError> {
    let pbm = draft_block(m, t);
    // A model-token mask only on a hybrid block, and only over its draft tokens.
    let n = m.draft_tokens.len();
    let mask_ok =
        t.model_token_mask == 0 || (t.hybrid && (n >= 64 || t.model_token_mask < (1u64 << n)));
    let expected =
        item_ok(m) && t.draft_s_per_token.is_finite() && t.draft_s_per_token >= 0.0 && mask_ok;
    let msg = pb::DraftMessage {
        kind: Some(pb::draft_message::Kind::Block(pbm.clone())),
    };
    let got = DraftMessage::try_from(msg.clone());
    c.accepted(got.is_ok());
    prop_assert_eq!(got.is_ok(), expected, "DraftBlock {:?} → {:?}", pbm, got);
    prop_assert_eq!(DraftBlock::try_from(pbm.clone()).is_ok(), expected);
    if let Ok(d) = got {
        let back = pb::DraftMessage::from(d.clone());
        let mut want = pbm;
        want.sampling = normalised_sampling(&want.sampling);
        let want = pb::DraftMessage {
            kind: Some(pb::draft_message::Kind::Block(want)),
        };
        prop_assert!(same_bytes(&back, &want), "{:?} != {:?}", back, want);
        prop_assert_eq!(DraftMessage::try_from(back), Ok(d));
    }
    Ok(())
}

fn check_case(c: &Counters, case: Case) -> Result<(), TestCaseError> {
    let Case {
        input,
        repair,
        mutate,
    } = case;
    match input {
        Input::Item(m) => {
            c.exec(1);
            check_block(c, &prepare(m, repair, &mutate))?;
        }
        Input::Draft(m, t) => {
            c.exec(2);
            check_draft(c, &prepare(m, repair, &mutate), &t)?;
        }
        Input::Batch(items) => {
            c.exec(1);
            let items: Vec<RawItem> = items
                .into_iter()
                .enumerate()
                .map(|(i, m)| {
                    let mut m = prepare(m, repair, &None);
                    if repair && mutate.is_none() {
                        m.session_id = i as u64;
                    }
                    m
                })
                .collect();
            let req = pb::VerifyBatchRequest {
                batch_id: 1,
                fingerprint: "fp".into(),
                items: items.iter().map(verify_item).collect(),
                coordinator_id: "c".into(),
            };
            let mut ids: Vec<u64> = items.iter().map(|m| m.session_id).collect();
            ids.sort_unstable();
            ids.dedup();
            let expected =
                !items.is_empty() && items.iter().all(item_ok) && ids.len() == items.len();
            let got = batch_from_pb(req.clone());
            c.accepted(got.is_ok());
            prop_assert_eq!(got.is_ok(), expected, "{:?} → {:?}", req, got);
            if let Ok(blocks) = got {
                prop_assert_eq!(blocks.len(), items.len());
                for (b, m) in blocks.iter().zip(&items) {
                    prop_assert_eq!(b.session_id, m.session_id);
                }
            }
        }
        Input::Sparse(d, token) => {
            c.exec(1);
            let d = if repair { repair_sparse(&d, token) } else { d };
            let got = sparse_from_pb(3, d.clone());
            c.accepted(got.is_ok());
            prop_assert_eq!(got.is_ok(), sparse_ok(&d), "{:?} → {:?}", d, got);
            if let Ok(s) = got {
                prop_assert_eq!(&s.ids, &d.ids);
                if let Some(t) = token.filter(|_| repair) {
                    prop_assert!(s.prob(t) > 0.0);
                }
                let back = edgespec_proto::domain::sparse_to_pb(&s);
                prop_assert_eq!(sparse_from_pb(3, back), Ok(s));
            }
        }
        Input::Sampling(s) => {
            c.exec(1);
            let s = if repair { Some(repair_sampling(&s)) } else { s };
            let got = sampling_from_pb(s);
            c.accepted(got.is_ok());
            prop_assert_eq!(got.is_ok(), sampling_ok(&s), "{:?} → {:?}", s, got);
            if let Ok(p) = got {
                prop_assert!(p.top_p > 0.0 && p.top_p <= 1.0);
                let back = edgespec_proto::domain::sampling_to_pb(&p);
                prop_assert_eq!(Some(back), normalised_sampling(&s));
                prop_assert_eq!(sampling_from_pb(Some(back)), Ok(p));
            }
        }
        Input::Hello(fingerprint, s) => {
            c.exec(1);
            let h = pb::DraftHello {
                node_id: "n".into(),
                model_name: "m".into(),
                fingerprint: fingerprint.clone(),
                vocab_size: 5,
                draft_s_per_token: s,
                pipelined: true,
                max_gamma: 0,
                method: pb::DraftMethod::Model as i32,
            };
            let msg = pb::DraftMessage {
                kind: Some(pb::draft_message::Kind::Hello(h)),
            };
            let got = DraftMessage::try_from(msg.clone());
            prop_assert_eq!(got.is_ok(), !fingerprint.is_empty());
            if let Ok(d) = got {
                // Normalised: an unknown cap reads as the ceiling, a nonsensical cost as unknown;
                // the normalised form round-trips exactly.
                let DraftMessage::Hello(hello) = &d else {
                    return Err(TestCaseError::fail("a hello must stay a hello"));
                };
                prop_assert_eq!(hello.max_gamma, 64);
                let cost = if s.is_finite() && s > 0.0 {
                    f64::from(s)
                } else {
                    0.0
                };
                prop_assert_eq!(hello.draft_s_per_token, cost);
                let back = pb::DraftMessage::from(d.clone());
                prop_assert_eq!(DraftMessage::try_from(back), Ok(d));
            }
        }
        Input::Close(session_id) => {
            c.exec(1);
            let msg = pb::DraftMessage {
                kind: Some(pb::draft_message::Kind::Close(pb::SessionClose {
                    session_id,
                })),
            };
            let got = DraftMessage::try_from(msg.clone());
            prop_assert_eq!(&got, &Ok(DraftMessage::Close { session_id }));
            prop_assert_eq!(pb::DraftMessage::from(got.unwrap()), msg);
        }
        Input::ProbeReply(probe_id, padding_len) => {
            c.exec(1);
            let msg = pb::DraftMessage {
                kind: Some(pb::draft_message::Kind::ProbeReply(pb::ProbeReply {
                    probe_id,
                    padding_len,
                })),
            };
            let got = DraftMessage::try_from(msg.clone()).unwrap();
            prop_assert_eq!(pb::DraftMessage::from(got), msg);
        }
        Input::EmptyDraftMessage => {
            c.exec(2);
            let empty = pb::DraftMessage { kind: None };
            prop_assert!(DraftMessage::try_from(empty).is_err());
            let empty = pb::CoordinatorMessage { kind: None };
            prop_assert!(CoordinatorMessage::try_from(empty).is_err());
        }
        Input::SessionError(session_id, round, code, message) => {
            c.exec(2);
            let e = pb::SessionError {
                session_id,
                round,
                code,
                message,
            };
            let known = pb::ErrorCode::try_from(code).is_ok();
            let got = SessionError::try_from(e.clone());
            prop_assert_eq!(got.is_ok(), known, "{:?} → {:?}", e, got);
            prop_assert_eq!(ErrorCode::try_from(code).is_ok(), known);
            let msg = pb::CoordinatorMessage {
                kind: Some(pb::coordinator_message::Kind::Error(e.clone())),
            };
            let cm = CoordinatorMessage::try_from(msg);
            prop_assert_eq!(cm.is_ok(), known);
            if let Ok(se) = got {
                let back = pb::SessionError::from(se.clone());
                // The unspecified code is read as INTERNAL; every other code round-trips.
                if code != 0 {
                    prop_assert_eq!(&back, &e);
                } else {
                    prop_assert_eq!(se.code, ErrorCode::Internal);
                }
                prop_assert_eq!(SessionError::try_from(back), Ok(se));
            }
        }
        Input::Outcome(accepted, next_token, committed_len, m) => {
            c.exec(1);
            let m = prepare(m, true, &None);
            let o = Outcome::from(pb::VerifyOutcome {
                accepted,
                next_token,
                committed_len,
            });
            let b = Block::try_from(verify_item(&m)).unwrap();
            let ok = (accepted as usize) <= b.draft_tokens.len()
                && committed_len as u64 == b.committed_len as u64 + accepted as u64 + 1;
            prop_assert_eq!(o.check_against(&b).is_ok(), ok);
            prop_assert_eq!(Outcome::from(pb::VerifyOutcome::from(o)), o);
        }
    }
    Ok(())
}

#[test]
fn proto_messages() {
    fuzz_support::run("proto_messages", 20_000, 1 << 20, case(), check_case);
}

// ---------------------------------------------------------------------------------------------
// proto_bytes

/// Varints a mutation may splice in: lengths and counts from tiny to 2^64 − 1.
const VARINTS: &[u64] = &[
    0,
    1,
    127,
    128,
    255,
    1 << 14,
    1 << 21,
    u32::MAX as u64,
    1 << 32,
    1 << 60,
    u64::MAX >> 1,
    u64::MAX,
];

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Set(Index, u8),
    Insert(Index, Vec<u8>),
    /// A tag (field 1..=16, any wire type) followed by a varint from [`VARINTS`].
    InsertField(Index, u8, u8, Index),
    Delete(Index, u8),
    Truncate(Index),
    Duplicate(Index, u8),
}

fn mutation() -> BoxedStrategy<Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        3 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        2 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        3 => (any::<Index>(), 1u8..=16, 0u8..8, any::<Index>())
            .prop_map(|(i, f, w, v)| Mutation::InsertField(i, f, w, v)),
        2 => (any::<Index>(), 1u8..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), 1u8..32).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
    ]
    .boxed()
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let pos = |i: &Index, len: usize| if len == 0 { 0 } else { i.index(len + 1) };
    match m {
        Mutation::Flip(i, b) if !bytes.is_empty() => {
            let p = i.index(bytes.len());
            bytes[p] ^= 1 << b;
        }
        Mutation::Set(i, v) if !bytes.is_empty() => {
            let p = i.index(bytes.len());
            bytes[p] = *v;
        }
        Mutation::Insert(i, b) => {
            let p = pos(i, bytes.len());
            bytes.splice(p..p, b.iter().copied());
        }
        Mutation::InsertField(i, field, wire, v) => {
            let p = pos(i, bytes.len());
            let mut ins = varint(((*field as u64) << 3) | (*wire as u64 & 7));
            ins.extend(varint(VARINTS[v.index(VARINTS.len())]));
            bytes.splice(p..p, ins);
        }
        Mutation::Delete(i, n) if !bytes.is_empty() => {
            let p = i.index(bytes.len());
            let end = (p + *n as usize).min(bytes.len());
            bytes.drain(p..end);
        }
        Mutation::Truncate(i) => {
            let p = pos(i, bytes.len());
            bytes.truncate(p);
        }
        Mutation::Duplicate(i, n) if !bytes.is_empty() => {
            let p = i.index(bytes.len());
            let end = (p + *n as usize).min(bytes.len());
            let chunk = bytes[p..end].to_vec();
            bytes.extend(chunk);
        }
        _ => {}
    }
}

/// A seed encoding: one of the structured messages above, encoded.
fn seed_bytes() -> BoxedStrategy<Vec<u8>> {
    let item = (raw_item(), any::<bool>()).prop_map(|(m, r)| if r { repair_item(m) } else { m });
    prop_oneof![
        3 => (item.clone(), telemetry()).prop_map(|(m, t)| pb::DraftMessage {
            kind: Some(pb::draft_message::Kind::Block(draft_block(&m, &t))),
        }
        .encode_to_vec()),
        2 => prop::collection::vec(item, 1..3).prop_map(|items| pb::VerifyBatchRequest {
            batch_id: 9,
            fingerprint: "fp".into(),
            items: items.iter().map(verify_item).collect(),
            coordinator_id: "coord-1".into(),
        }
        .encode_to_vec()),
        1 => (any_u64(), prop_oneof![0i32..9, any::<i32>()]).prop_map(|(s, code)| {
            pb::CoordinatorMessage {
                kind: Some(pb::coordinator_message::Kind::Error(pb::SessionError {
                    session_id: s,
                    round: 2,
                    code,
                    message: "why".into(),
                })),
            }
            .encode_to_vec()
        }),
        1 => (any_u64(), any_u32()).prop_map(|(s, a)| pb::VerifyBatchResponse {
            batch_id: s,
            results: vec![pb::VerifyResult {
                session_id: s,
                round: 1,
                result: Some(pb::verify_result::Result::Outcome(pb::VerifyOutcome {
                    accepted: a,
                    next_token: 4,
                    committed_len: 9,
                })),
                timings: Some(pb::VerifyTimings::default()),
            }],
            load: Some(pb::VerifierLoad::default()),
        }
        .encode_to_vec()),
        1 => short_string().prop_map(|s| pb::RegisterVerifierRequest {
            info: Some(pb::NodeInfo {
                node_id: s.clone(),
                advertise_addr: format!("http://{s}:1"),
                pool: "onprem".into(),
                model_name: "m".into(),
                fingerprint: "fp".into(),
                vocab_size: 97,
                max_context: 512,
                capacity_sessions: 4,
                max_block_tokens: 16,
                max_batch_tokens: 64,
                device: "cpu".into(),
                load: Some(pb::VerifierLoad::default()),
            }),
        }
        .encode_to_vec()),
        1 => Just(pb::DraftMessage {
            kind: Some(pb::draft_message::Kind::Hello(pb::DraftHello {
                node_id: "draft-1".into(),
                model_name: "m".into(),
                fingerprint: "fp".into(),
                vocab_size: 97,
                draft_s_per_token: 0.01,
                pipelined: true,
                max_gamma: 8,
                method: pb::DraftMethod::Hybrid as i32,
            })),
        }
        .encode_to_vec()),
    ]
    .boxed()
}

fn bytes_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..64),
        6 => (seed_bytes(), prop::collection::vec(mutation(), 0..5)).prop_map(|(mut b, ms)| {
            for m in &ms {
                apply(&mut b, m);
            }
            b.truncate(4096);
            b
        }),
    ]
}

/// Decodes `bytes` as `M`; if that works, checks decode → encode → decode is stable and returns
/// the message.
fn decode<M: Message + Default>(bytes: &[u8]) -> Result<Option<M>, TestCaseError> {
    match M::decode(bytes) {
        Err(_) => Ok(None),
        Ok(m) => {
            let enc = m.encode_to_vec();
            let again = M::decode(&enc[..])
                .map_err(|e| TestCaseError::fail(format!("re-decoding own encoding: {e}")))?;
            prop_assert_eq!(again.encode_to_vec(), enc);
            Ok(Some(m))
        }
    }
}

fn check_bytes(c: &Counters, bytes: Vec<u8>) -> Result<(), TestCaseError> {
    c.exec(9);
    if let Some(m) = decode::<pb::DraftMessage>(&bytes)? {
        let d = DraftMessage::try_from(m);
        c.accepted(d.is_ok());
        if let Ok(d) = d {
            let back = pb::DraftMessage::from(d.clone());
            prop_assert_eq!(DraftMessage::try_from(back).ok(), Some(d));
        }
    }
    if let Some(m) = decode::<pb::CoordinatorMessage>(&bytes)? {
        let _ = CoordinatorMessage::try_from(m);
    }
    if let Some(m) = decode::<pb::VerifyBatchRequest>(&bytes)? {
        if let Ok(blocks) = batch_from_pb(m) {
            for b in &blocks {
                let again = Block::try_from(pb::VerifyItem::from(b));
                prop_assert_eq!(again.as_ref(), Ok(b));
            }
        }
    }
    if let Some(m) = decode::<pb::VerifyItem>(&bytes)? {
        let _ = Block::try_from(m);
    }
    if let Some(m) = decode::<pb::DraftBlock>(&bytes)? {
        let _ = DraftBlock::try_from(m);
    }
    if let Some(m) = decode::<pb::VerifyBatchResponse>(&bytes)? {
        for r in m.results {
            match r.result {
                Some(pb::verify_result::Result::Outcome(o)) => {
                    let _ = Outcome::from(o);
                }
                Some(pb::verify_result::Result::Error(e)) => {
                    let _ = SessionError::try_from(e);
                }
                None => {}
            }
        }
    }
    let _ = decode::<pb::RegisterVerifierRequest>(&bytes)?;
    let _ = decode::<pb::VerifierHeartbeatRequest>(&bytes)?;
    let _ = decode::<pb::ReleaseRequest>(&bytes)?;
    Ok(())
}

#[test]
fn proto_bytes() {
    fuzz_support::run("proto_bytes", 20_000, 1 << 20, bytes_input(), check_bytes);
}

// ---------------------------------------------------------------------------------------------
// Fixed inputs: declared lengths far beyond the input

/// Every field of every top-level message declared with a length (or packed count) of 2^60, then
/// a few bytes: decoding fails, and nothing large is allocated.
#[test]
fn declared_length_of_2_pow_60_is_refused_without_allocating() {
    for field in 1u64..=16 {
        for len in [1u64 << 60, u64::MAX, u32::MAX as u64, 1 << 32] {
            let mut bytes = varint((field << 3) | 2);
            bytes.extend(varint(len));
            bytes.extend([1, 2, 3, 4]);
            fuzz_support::reset_peak();
            assert!(pb::DraftMessage::decode(&bytes[..]).is_err());
            assert!(pb::CoordinatorMessage::decode(&bytes[..]).is_err());
            assert!(pb::VerifyBatchRequest::decode(&bytes[..]).is_err());
            assert!(pb::DraftBlock::decode(&bytes[..]).is_err());
            assert!(pb::VerifyItem::decode(&bytes[..]).is_err());
            assert!(pb::VerifyBatchResponse::decode(&bytes[..]).is_err());
            assert!(pb::RegisterVerifierRequest::decode(&bytes[..]).is_err());
            assert!(pb::NodeInfo::decode(&bytes[..]).is_err());
            assert!(pb::ReleaseRequest::decode(&bytes[..]).is_err());
            assert!(
                fuzz_support::peak() < 1 << 16,
                "field {field} len {len}: {} bytes allocated at once",
                fuzz_support::peak()
            );
        }
    }
}

/// A draft distribution of 2^20 entries (a 64 MiB gRPC message allows it) is refused before any
/// per-entry work.
#[test]
fn oversized_distribution_is_refused() {
    let d = pb::SparseDist {
        ids: (0..1u32 << 20).collect(),
        probs: vec![1.0 / (1u32 << 20) as f32; 1 << 20],
    };
    let e = sparse_from_pb(0, d).unwrap_err();
    assert!(e.to_string().contains("at most 256"), "{e}");
}
