//! Chunked prefill (`batching.max_prefill_tokens`): an open or resync longer than the budget is
//! prefilled over several forwards and gives exactly the verdicts a one-shot prefill gives,
//! alone or next to other sessions' rounds.

mod common;

use common::*;
use edgespec_proto::pb;

const GAMMA: usize = 4;

/// Drafts that depend only on the committed tokens (some right, mostly wrong).
fn cheap_drafts(committed: &[u32], vocab: usize) -> Vec<u32> {
    let last = *committed.last().unwrap() as usize;
    (0..GAMMA)
        .map(|i| ((last * 31 + committed.len() * 7 + i) % vocab) as u32)
        .collect()
}

/// Opens `session` with `prompt`, runs `rounds` rounds, then resyncs it (the whole history
/// again) and runs `rounds` more. Returns the committed tokens.
async fn run(node: &Node, session: u64, prompt: &[u32], rounds: usize) -> Vec<u32> {
    let vocab = node.vocab_size;
    let mut committed = prompt.to_vec();
    for r in 0..2 * rounds {
        let d = cheap_drafts(&committed, vocab);
        let with_history = r == 0 || r == rounds;
        let history: &[u32] = if with_history { &committed } else { &[] };
        let it = item(session, committed.len(), history, &d);
        let resp = node.verify(vec![it]).await;
        let o = outcome(&resp.results[0]);
        committed.extend_from_slice(&d[..o.accepted as usize]);
        committed.push(o.next_token);
        assert_eq!(o.committed_len as usize, committed.len());
    }
    committed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_prefill_gives_the_verdicts_of_a_one_shot_prefill() {
    let m = tiny_model();
    let vocab = m.spec.vocab_size();
    let one_shot = Node::start(settings(&m.path)).await;
    let long = prompt(7, 300, vocab);
    let short = prompt(8, 9, vocab);
    let expected_long = run(&one_shot, 1, &long, 6).await;
    let expected_short = run(&one_shot, 2, &short, 6).await;
    one_shot.stop().await.unwrap();

    let mut s = settings(&m.path);
    s.batching.max_prefill_tokens = s.sessions.max_block_tokens + 1;
    let chunked = Node::start(s).await;
    // The long open is prefilled over about 18 forwards while the short session's rounds run.
    let (got_long, got_short) = tokio::join!(run(&chunked, 1, &long, 6), async {
        tokio::task::yield_now().await;
        run(&chunked, 2, &short, 6).await
    });
    assert_eq!(got_long, expected_long);
    assert_eq!(got_short, expected_short);

    // A greedy walk from a long prompt equals target-only greedy decoding.
    let mut reference = m.load();
    let p = prompt(9, 120, vocab);
    let walk = greedy_continuation(reference.as_mut(), 99, &p, 24, &[]).unwrap();
    let full: Vec<u32> = p.iter().chain(&walk).copied().collect();
    let (got, _) = speculate(&chunked, 3, &p, 16, GREEDY, |c, _| {
        full[c.len()..c.len() + GAMMA].to_vec()
    })
    .await;
    assert_eq!(got, walk[..16]);
    chunked.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_open_in_a_batch_with_others_answers_every_block() {
    let m = tiny_model();
    let vocab = m.spec.vocab_size();
    let mut s = settings(&m.path);
    s.batching.max_prefill_tokens = 32;
    let node = Node::start(s).await;
    let items: Vec<pb::VerifyItem> = [(1u64, 200usize), (2, 5), (3, 70)]
        .iter()
        .map(|&(id, n)| {
            let p = prompt(id, n, vocab);
            item(id, p.len(), &p, &cheap_drafts(&p, vocab))
        })
        .collect();
    let resp = node.verify(items).await;
    assert_eq!(resp.results.len(), 3);
    for (r, (id, n)) in resp.results.iter().zip([(1u64, 200u32), (2, 5), (3, 70)]) {
        assert_eq!(r.session_id, id);
        let o = outcome(r);
        assert!(o.committed_len > n && o.committed_len <= n + 1 + GAMMA as u32);
    }
    node.stop().await.unwrap();
}
