//! Malformed wire messages are rejected with an error naming the field; valid ones round-trip.

use edgespec_proto::domain::{
    batch_from_pb, Block, DraftBlock, DraftMessage, ErrorCode, SessionError,
};
use edgespec_proto::{pb, ProtocolError};

fn greedy() -> Option<pb::SamplingParams> {
    Some(pb::SamplingParams {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
    })
}

fn sampled() -> Option<pb::SamplingParams> {
    Some(pb::SamplingParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.9,
        seed: 7,
    })
}

fn item() -> pb::VerifyItem {
    pb::VerifyItem {
        session_id: 1,
        round: 3,
        committed_len: 4,
        history: vec![],
        draft_tokens: vec![10, 11],
        draft_probs: vec![],
        sampling: greedy(),
    }
}

fn q(ids: &[u32], probs: &[f32]) -> pb::SparseDist {
    pb::SparseDist {
        ids: ids.to_vec(),
        probs: probs.to_vec(),
    }
}

#[test]
fn valid_greedy_item_round_trips() {
    let b = Block::try_from(item()).unwrap();
    assert_eq!(b.committed_len, 4);
    assert_eq!(b.history, None);
    assert_eq!(pb::VerifyItem::from(&b), item());
}

#[test]
fn valid_sampled_item_with_history_round_trips() {
    let mut m = item();
    m.sampling = sampled();
    m.history = vec![1, 2, 3, 4];
    m.draft_probs = vec![q(&[10, 12], &[0.75, 0.25]), q(&[11], &[1.0])];
    let b = Block::try_from(m.clone()).unwrap();
    assert_eq!(b.history.as_deref(), Some(&[1, 2, 3, 4][..]));
    assert_eq!(b.draft_probs[0].prob(12), 0.25);
    assert_eq!(pb::VerifyItem::from(&b), m);
}

#[test]
fn zero_committed_len_is_rejected() {
    let mut m = item();
    m.committed_len = 0;
    let e = Block::try_from(m).unwrap_err();
    assert!(e.to_string().contains("committed_len"), "{e}");
}

#[test]
fn history_of_wrong_length_is_rejected() {
    let mut m = item();
    m.history = vec![1, 2];
    assert_eq!(
        Block::try_from(m).unwrap_err(),
        ProtocolError::Length {
            field: "history",
            got: 2,
            expected: 4
        }
    );
}

#[test]
fn missing_sampling_is_rejected() {
    let mut m = item();
    m.sampling = None;
    assert_eq!(
        Block::try_from(m).unwrap_err(),
        ProtocolError::Missing("sampling")
    );
}

#[test]
fn bad_sampling_values_are_rejected() {
    for (t, p) in [(-1.0, 1.0), (f32::NAN, 1.0), (1.0, 1.5), (1.0, -0.1)] {
        let mut m = item();
        m.sampling = Some(pb::SamplingParams {
            temperature: t,
            top_k: 0,
            top_p: p,
            seed: 0,
        });
        let e = Block::try_from(m).unwrap_err();
        assert!(matches!(e, ProtocolError::Range { .. }), "{e}");
    }
}

#[test]
fn sampling_needs_one_q_per_draft_token() {
    let mut m = item();
    m.sampling = sampled();
    m.draft_probs = vec![q(&[10], &[1.0])];
    let e = Block::try_from(m).unwrap_err();
    assert!(e.to_string().contains("draft_probs"), "{e}");
}

#[test]
fn greedy_blocks_carry_no_q() {
    let mut m = item();
    m.draft_probs = vec![q(&[10], &[1.0]), q(&[11], &[1.0])];
    assert!(matches!(
        Block::try_from(m).unwrap_err(),
        ProtocolError::Length {
            field: "draft_probs",
            ..
        }
    ));
}

#[test]
fn bad_distributions_are_rejected() {
    let cases = [
        q(&[10, 11], &[1.0]),           // length mismatch
        q(&[], &[]),                    // empty support
        q(&[10, 11], &[1.5, -0.5]),     // outside (0, 1]
        q(&[10, 11], &[0.5, 0.2]),      // sum != 1
        q(&[10, 10], &[0.5, 0.5]),      // duplicate id
        q(&[12], &[1.0]),               // draft token 10 not in support
        q(&[10, 11], &[f32::NAN, 0.5]), // NaN
        // More entries than the protocol's cap, each valid on its own (a q that is "almost
        // uniform" over a huge support).
        {
            let n = edgespec_proto::domain::MAX_DIST_SUPPORT as u32 + 1;
            let ids: Vec<u32> = (10..10 + n).collect();
            q(&ids, &vec![1.0 / n as f32; n as usize])
        },
    ];
    for c in cases {
        let mut m = item();
        m.sampling = sampled();
        m.draft_probs = vec![c.clone(), q(&[11], &[1.0])];
        let e = Block::try_from(m).unwrap_err();
        assert!(
            matches!(e, ProtocolError::BadDistribution { position: 0, .. }),
            "{c:?}: {e}"
        );
    }
}

#[test]
fn gamma_zero_block_is_valid() {
    let mut m = item();
    m.draft_tokens.clear();
    let b = Block::try_from(m).unwrap();
    assert!(b.draft_tokens.is_empty());
}

#[test]
fn empty_batch_and_duplicate_sessions_are_rejected() {
    let empty = pb::VerifyBatchRequest {
        batch_id: 1,
        coordinator_id: "test-coordinator".into(),
        fingerprint: "f".into(),
        items: vec![],
    };
    assert!(matches!(
        batch_from_pb(empty).unwrap_err(),
        ProtocolError::Empty(_)
    ));
    let dup = pb::VerifyBatchRequest {
        batch_id: 1,
        coordinator_id: "test-coordinator".into(),
        fingerprint: "f".into(),
        items: vec![item(), item()],
    };
    assert!(batch_from_pb(dup)
        .unwrap_err()
        .to_string()
        .contains("at most once"));
}

#[test]
fn empty_draft_message_is_rejected() {
    let e = DraftMessage::try_from(pb::DraftMessage { kind: None }).unwrap_err();
    assert!(matches!(e, ProtocolError::Empty(_)));
}

#[test]
fn draft_block_round_trips_through_the_stream_message() {
    let block = pb::DraftBlock {
        session_id: 9,
        round: 1,
        committed_len: 2,
        history: vec![5, 6],
        draft_tokens: vec![7],
        draft_probs: vec![],
        sampling: greedy(),
        max_new_tokens: 100,
        client_send_unix_ns: 123,
        draft_s_per_token: 0.03,
        last_round_trip_ns: 0,
        drafted_ahead: false,
        method: pb::DraftMethod::Hybrid as i32,
        model_s_per_token: 0.01,
        model_token_mask: 0,
    };
    let msg = pb::DraftMessage {
        kind: Some(pb::draft_message::Kind::Block(block.clone())),
    };
    let d = DraftMessage::try_from(msg.clone()).unwrap();
    let DraftMessage::Block(ref b) = d else {
        panic!("not a block")
    };
    assert_eq!(b.block.history.as_deref(), Some(&[5, 6][..]));
    assert_eq!(b.model_s_per_token, 0.01);
    assert_eq!(pb::DraftMessage::from(d), msg);
    let mut neg = block.clone();
    neg.draft_s_per_token = -1.0;
    assert!(DraftBlock::try_from(neg).is_err());
    for bad in [-1.0, f32::NAN, f32::INFINITY] {
        let mut m = block.clone();
        m.model_s_per_token = bad;
        let e = DraftBlock::try_from(m).unwrap_err();
        assert!(e.to_string().contains("model_s_per_token"), "{e}");
    }
    // The model-token mask: kept on a hybrid block, bits only below the draft tokens, and only
    // on hybrid blocks.
    let mut mixed = block.clone();
    mixed.draft_tokens = vec![7, 8, 9];
    mixed.model_token_mask = 0b101;
    assert_eq!(
        DraftBlock::try_from(mixed.clone())
            .unwrap()
            .model_token_mask,
        0b101
    );
    let mut beyond = mixed.clone();
    beyond.model_token_mask = 0b1000;
    let e = DraftBlock::try_from(beyond).unwrap_err();
    assert!(e.to_string().contains("model_token_mask"), "{e}");
    let mut not_hybrid = mixed;
    not_hybrid.method = pb::DraftMethod::Model as i32;
    let e = DraftBlock::try_from(not_hybrid).unwrap_err();
    assert!(e.to_string().contains("hybrid"), "{e}");
}

#[test]
fn unknown_error_code_is_rejected() {
    let e = SessionError::try_from(pb::SessionError {
        session_id: 1,
        round: 0,
        code: 99,
        message: String::new(),
    })
    .unwrap_err();
    assert_eq!(
        e,
        ProtocolError::UnknownEnum {
            field: "code",
            value: 99
        }
    );
    let ok = SessionError::try_from(pb::SessionError {
        session_id: 1,
        round: 0,
        code: pb::ErrorCode::ResyncNeeded as i32,
        message: "gone".into(),
    })
    .unwrap();
    assert_eq!(ok.code, ErrorCode::ResyncNeeded);
}

#[test]
fn a_verdicts_next_method_round_trips_and_unspecified_reads_as_none() {
    let wire = pb::Verdict {
        session_id: 1,
        round: 2,
        accepted: 0,
        next_token: 7,
        committed_len: 3,
        next_gamma: 4,
        next_method: pb::DraftMethod::Lookup as i32,
        ..Default::default()
    };
    let v = edgespec_proto::domain::Verdict::try_from(wire.clone()).unwrap();
    assert_eq!(
        v.next_method,
        Some(edgespec_proto::domain::DraftMethod::Lookup)
    );
    assert_eq!(pb::Verdict::from(v).next_method, wire.next_method);
    let older = pb::Verdict {
        next_method: pb::DraftMethod::Unspecified as i32,
        ..wire
    };
    let v = edgespec_proto::domain::Verdict::try_from(older).unwrap();
    assert_eq!(v.next_method, None);
    assert_eq!(
        pb::Verdict::from(v).next_method,
        pb::DraftMethod::Unspecified as i32
    );
}
