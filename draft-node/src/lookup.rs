//! Prompt lookup: model-free drafting from the session's own context. The last n tokens of the
//! context (committed tokens and the drafts so far) are looked up among earlier positions of the
//! committed tokens (prompt and output), longest n first and the most recent occurrence first,
//! and the tokens that followed that occurrence are proposed.
//!
//! The index is incremental: for every n in `min_n..=max_n` a hash map from an n-gram to the
//! position right after its latest occurrence that has a following token. Committing a token
//! adds one entry per n (O(max_n²) hashing); a lookup is one probe per n plus the copy. Its
//! size is bounded by the session's context (at most `max_n − min_n + 1` entries per token).
//! Hash collisions are checked against the tokens, so a collision is a missed match, never a
//! wrong one.

use std::collections::HashMap;

/// The lookup index over one session's committed tokens.
#[derive(Debug, Clone)]
pub(crate) struct LookupIndex {
    min_n: usize,
    max_n: usize,
    tokens: Vec<u32>,
    /// `maps[n - min_n]`: hash of an n-gram → position right after its latest occurrence
    /// (the position of the token that followed it).
    maps: Vec<HashMap<u64, usize>>,
}

impl LookupIndex {
    /// An empty index matching n-grams of `min_n..=max_n` tokens (`1 <= min_n <= max_n`).
    pub fn new(min_n: usize, max_n: usize) -> Self {
        let min_n = min_n.max(1);
        let max_n = max_n.max(min_n);
        LookupIndex {
            min_n,
            max_n,
            tokens: Vec::new(),
            maps: vec![HashMap::new(); max_n - min_n + 1],
        }
    }

    /// The indexed tokens.
    #[cfg(test)]
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Appends committed tokens.
    pub fn extend(&mut self, tokens: &[u32]) {
        for &t in tokens {
            // Every n-gram ending just before `t` now has a continuation: `t`, at position `i`.
            let i = self.tokens.len();
            for n in self.min_n..=self.max_n.min(i) {
                let key = hash(&self.tokens[i - n..i]);
                self.maps[n - self.min_n].insert(key, i);
            }
            self.tokens.push(t);
        }
    }

    /// Up to `want` tokens that may follow the context `tokens() ++ drafts`: the continuation
    /// of the latest earlier occurrence of its longest matching suffix (n from `max_n` down to
    /// `min_n`). Empty when no suffix occurs earlier. A continuation that reaches the end of the
    /// context goes on with its own tokens (the context repeats with that period).
    pub fn propose(&self, drafts: &[u32], want: usize) -> Vec<u32> {
        if want == 0 {
            return Vec::new();
        }
        let len = self.tokens.len() + drafts.len();
        let at = |i: usize| -> u32 {
            if i < self.tokens.len() {
                self.tokens[i]
            } else {
                drafts[i - self.tokens.len()]
            }
        };
        for n in (self.min_n..=self.max_n.min(len)).rev() {
            let suffix: Vec<u32> = (len - n..len).map(at).collect();
            let Some(&p) = self.maps[n - self.min_n].get(&hash(&suffix)) else {
                continue;
            };
            // `p` is a position of the committed tokens after an n-gram: check it is ours.
            if self.tokens[p - n..p] != suffix[..] {
                continue;
            }
            let mut out: Vec<u32> = Vec::with_capacity(want);
            for k in 0..want {
                // p + k < len + k: either context or a token proposed just before.
                let i = p + k;
                out.push(if i < len { at(i) } else { out[i - len] });
            }
            return out;
        }
        Vec::new()
    }
}

/// FNV-1a over the tokens' bytes, then a final mix (keys of one map are n-grams of one length).
pub(crate) fn hash(tokens: &[u32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &t in tokens {
        for b in t.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h ^ (h >> 29)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(min_n: usize, max_n: usize, tokens: &[u32]) -> LookupIndex {
        let mut ix = LookupIndex::new(min_n, max_n);
        ix.extend(tokens);
        ix
    }

    #[test]
    fn the_longest_match_wins() {
        // Suffix [2, 3]: after the bigram [2, 3] came 7 (position 2); after the unigram [3] the
        // latest occurrence is followed by 9 (position 6). The bigram is preferred.
        let ix = index(1, 3, &[2, 3, 7, 8, 1, 3, 9, 5, 2, 3]);
        assert_eq!(ix.propose(&[], 2), vec![7, 8]);
        // With only unigrams, the latest occurrence of [3] wins.
        let ix = index(1, 1, &[2, 3, 7, 8, 1, 3, 9, 5, 2, 3]);
        assert_eq!(ix.propose(&[], 2), vec![9, 5]);
    }

    #[test]
    fn the_most_recent_occurrence_wins() {
        let ix = index(2, 2, &[1, 2, 10, 1, 2, 20, 0, 1, 2]);
        assert_eq!(ix.propose(&[], 1), vec![20]);
    }

    #[test]
    fn the_continuation_is_bounded_by_want() {
        let ix = index(2, 4, &[5, 6, 7, 8, 9, 10, 11, 5, 6]);
        assert_eq!(ix.propose(&[], 3), vec![7, 8, 9]);
        assert_eq!(ix.propose(&[], 1), vec![7]);
        assert!(ix.propose(&[], 0).is_empty());
    }

    #[test]
    fn no_match_proposes_nothing() {
        let ix = index(2, 4, &[1, 2, 3, 4, 5, 6]);
        assert!(ix.propose(&[], 4).is_empty(), "no earlier [5, 6]");
        assert!(
            LookupIndex::new(1, 3).propose(&[], 4).is_empty(),
            "empty context"
        );
        // Shorter than min_n: nothing to match.
        let ix = index(3, 4, &[1, 2]);
        assert!(ix.propose(&[], 4).is_empty());
        // A unigram that only occurs as the last token has no earlier occurrence.
        let ix = index(1, 1, &[1, 2, 3]);
        assert!(ix.propose(&[], 4).is_empty());
    }

    #[test]
    fn a_continuation_that_reaches_the_end_of_the_context_repeats_it() {
        // [a b c a b]: [a b] matched at 0, followed by "c a b" (the end of the context), then
        // by the proposal itself: period 3.
        let ix = index(2, 2, &[1, 2, 3, 1, 2]);
        assert_eq!(ix.propose(&[], 3), vec![3, 1, 2]);
        assert_eq!(ix.propose(&[], 7), vec![3, 1, 2, 3, 1, 2, 3]);
        // A run of one token proposes more of it.
        let ix = index(1, 2, &[4, 4]);
        assert_eq!(ix.propose(&[], 3), vec![4, 4, 4]);
    }

    #[test]
    fn drafts_extend_the_context_but_only_committed_tokens_are_indexed() {
        let ix = index(2, 3, &[1, 2, 3, 4, 9, 1]);
        assert!(
            ix.propose(&[], 2).is_empty(),
            "[9 1] and [1] alone: no bigram match"
        );
        // With the draft 2 the suffix is [9 1 2] → [1 2] at 0 matches; continue 3 4 9 ...
        assert_eq!(ix.propose(&[2], 3), vec![3, 4, 9]);
        // ... and the continuation may run through the drafts: [3 4] is followed by 9, 1, 2.
        assert_eq!(ix.propose(&[2, 3, 4], 4), vec![9, 1, 2, 3]);
    }

    #[test]
    fn extending_in_pieces_equals_indexing_at_once() {
        let all: Vec<u32> = (0..200).map(|i| (i * 7 % 13) as u32).collect();
        let whole = index(1, 4, &all);
        let mut pieces = LookupIndex::new(1, 4);
        for chunk in all.chunks(3) {
            pieces.extend(chunk);
        }
        assert_eq!(pieces.tokens(), whole.tokens());
        for d in [&[][..], &[5], &[5, 12]] {
            assert_eq!(pieces.propose(d, 6), whole.propose(d, 6));
        }
        assert_eq!(
            pieces.propose(&[], 6).len(),
            6,
            "periodic input always matches"
        );
    }
}
