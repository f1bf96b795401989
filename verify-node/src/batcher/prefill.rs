//! Chunked prefill: an open or resync whose forward is longer than the per-forward prefill budget
//! (`batching.max_prefill_tokens`) is not run as one forward — a 16k-token prompt would hold the
//! model thread for longer than the coordinator waits for any batch, starving every other session
//! on the node and getting the node declared dead. The batcher keeps such a block here and feeds
//! its history to the session's KV cache a chunk per forward, next to the other sessions'
//! verification rows; only the final piece carries the draft tokens and yields the verdict.
//!
//! Chunking does not change any logit: a position's logits depend only on the tokens before it
//! (the cache) and the model computes each row the same however rows are batched.

use edgespec_model::SeqRequest;

use crate::sessions::Planned;

/// A long open being prefilled over several forwards.
#[derive(Debug)]
pub(super) struct Prefill {
    /// Which held request and which of its blocks waits for this verdict.
    pub held: u64,
    pub slot: usize,
    /// The block with its whole forward (`seq.start == 0`).
    pub planned: Planned,
    /// Tokens of `planned.seq.tokens` already in the session's cache.
    pub done: usize,
}

/// The next piece of a prefill given `budget` tokens of this forward.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Piece {
    /// Cache `tokens[start..end]`; no logits needed.
    Chunk { start: usize, end: usize },
    /// The rest, `tokens[start..]`, with the draft tokens: it yields the verdict.
    Final { start: usize },
}

impl Prefill {
    /// The next piece within `budget` tokens, if one fits. The final piece always keeps at
    /// least the γ + 1 positions whose logits the verdict needs.
    pub fn next_piece(&self, budget: usize) -> Option<Piece> {
        next_piece(
            self.planned.seq.tokens.len(),
            self.done,
            self.planned.seq.logits_for_last,
            budget,
        )
    }

    /// The model request for `piece`.
    pub fn request(&self, piece: &Piece) -> SeqRequest {
        let seq = &self.planned.seq;
        match *piece {
            Piece::Chunk { start, end } => SeqRequest {
                session: seq.session,
                start,
                tokens: seq.tokens[start..end].to_vec(),
                // The model returns at least one row; it is not used.
                logits_for_last: 1,
            },
            Piece::Final { start } => SeqRequest {
                session: seq.session,
                start,
                tokens: seq.tokens[start..].to_vec(),
                logits_for_last: seq.logits_for_last,
            },
        }
    }
}

/// See [`Prefill::next_piece`]: `total` tokens to forward, `done` already cached, `tail` trailing
/// positions that need logits.
pub(super) fn next_piece(total: usize, done: usize, tail: usize, budget: usize) -> Option<Piece> {
    let left = total - done;
    if left <= budget {
        return (left > 0).then_some(Piece::Final { start: done });
    }
    // Never leave fewer than `tail` tokens for the final piece.
    let take = budget.min(left.saturating_sub(tail));
    (take > 0).then_some(Piece::Chunk {
        start: done,
        end: done + take,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks a prefill with a fixed budget and returns its pieces as (start, end, final).
    fn walk(total: usize, tail: usize, budget: usize) -> Vec<(usize, usize, bool)> {
        let mut done = 0;
        let mut out = Vec::new();
        while let Some(p) = next_piece(total, done, tail, budget) {
            match p {
                Piece::Chunk { start, end } => {
                    out.push((start, end, false));
                    done = end;
                }
                Piece::Final { start } => {
                    out.push((start, total, true));
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn pieces_cover_the_forward_once_within_the_budget_and_end_with_the_logit_rows() {
        for total in 1..200 {
            for tail in 1..=5.min(total) {
                for budget in tail..40 {
                    let pieces = walk(total, tail, budget);
                    let mut next = 0;
                    for (k, &(start, end, last)) in pieces.iter().enumerate() {
                        assert_eq!(start, next, "gap or overlap: {pieces:?}");
                        assert!(end - start <= budget && end > start, "{pieces:?}");
                        assert_eq!(last, k + 1 == pieces.len(), "{pieces:?}");
                        next = end;
                    }
                    assert_eq!(next, total);
                    let (s, e, _) = pieces[pieces.len() - 1];
                    assert!(e - s >= tail, "final piece too short: {pieces:?}");
                }
            }
        }
    }

    #[test]
    fn a_short_forward_is_one_final_piece_and_a_small_budget_waits() {
        assert_eq!(walk(10, 3, 10), vec![(0, 10, true)]);
        assert_eq!(
            walk(1030, 5, 512),
            vec![(0, 512, false), (512, 1024, false), (1024, 1030, true)]
        );
        // 2 tokens left of the budget cannot hold a final piece needing 3 rows, nor a chunk that
        // would leave fewer than 3.
        assert_eq!(next_piece(10, 7, 3, 2), None);
    }
}
