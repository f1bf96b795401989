//! The node-wide suffix cache: the token sequences (prompt and output) of recently finished
//! sessions, bounded in total tokens with FIFO eviction, indexed like a session's own lookup
//! index. Lookup and hybrid sessions consult it when their own context has no match, so a
//! request similar to an earlier one (a template, a retry, a recurring answer) drafts from that
//! answer.
//!
//! It shares one session's text with another's drafts. Output stays exactly the target's
//! (drafts are verified), but a client can see from the `edgespec` statistics of its response
//! whether its context had a continuation in the cache: a node with a cache must serve one
//! tenant only. Off by default (`drafting.lookup.cache_tokens = 0`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::lookup::hash;

/// Cached sequences and their n-gram index (a mutex: inserted once per session, looked up in
/// microseconds, never held across an await).
#[derive(Debug)]
pub(crate) struct SuffixCache {
    inner: Mutex<State>,
}

#[derive(Debug)]
struct State {
    capacity: usize,
    min_n: usize,
    max_n: usize,
    /// Sequences, oldest first, with consecutive ids.
    seqs: VecDeque<Vec<u32>>,
    /// Id of `seqs[0]`.
    first_id: u64,
    /// Tokens held.
    total: usize,
    /// `maps[n - min_n]`: n-gram hash → (sequence id, position after its latest occurrence).
    maps: Vec<HashMap<u64, (u64, usize)>>,
}

impl SuffixCache {
    /// A cache of at most `capacity` tokens matching n-grams of `min_n..=max_n` tokens.
    pub fn new(capacity: usize, min_n: usize, max_n: usize) -> Self {
        let min_n = min_n.max(1);
        let max_n = max_n.max(min_n);
        SuffixCache {
            inner: Mutex::new(State {
                capacity,
                min_n,
                max_n,
                seqs: VecDeque::new(),
                first_id: 0,
                total: 0,
                maps: vec![HashMap::new(); max_n - min_n + 1],
            }),
        }
    }

    /// Adds a finished session's tokens (their last `capacity` if longer), evicting the oldest
    /// sequences until it fits.
    pub fn insert(&self, tokens: &[u32]) {
        let mut s = self.lock();
        let tokens = &tokens[tokens.len().saturating_sub(s.capacity)..];
        if tokens.len() <= s.min_n {
            return;
        }
        while s.total + tokens.len() > s.capacity {
            s.evict_oldest();
        }
        let id = s.first_id + s.seqs.len() as u64;
        for i in 1..tokens.len() {
            for n in s.min_n..=s.max_n.min(i) {
                let key = hash(&tokens[i - n..i]);
                let min_n = s.min_n;
                s.maps[n - min_n].insert(key, (id, i));
            }
        }
        s.total += tokens.len();
        s.seqs.push_back(tokens.to_vec());
    }

    /// Up to `want` tokens that followed the latest cached occurrence of the longest suffix of
    /// `context` (its last `max_n` tokens suffice) that occurs; empty when none does. The
    /// continuation ends where its cached sequence ends.
    pub fn propose(&self, context: &[u32], want: usize) -> Vec<u32> {
        if want == 0 {
            return Vec::new();
        }
        let s = self.lock();
        for n in (s.min_n..=s.max_n.min(context.len())).rev() {
            let suffix = &context[context.len() - n..];
            let Some(&(id, p)) = s.maps[n - s.min_n].get(&hash(suffix)) else {
                continue;
            };
            let Some(seq) = id
                .checked_sub(s.first_id)
                .and_then(|i| s.seqs.get(i as usize))
            else {
                continue;
            };
            if seq[p - n..p] != *suffix {
                continue;
            }
            return seq[p..(p + want).min(seq.len())].to_vec();
        }
        Vec::new()
    }

    /// Tokens held.
    #[cfg(test)]
    fn total(&self) -> usize {
        self.lock().total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the index inconsistent with the sequences
        // in a way lookups trust (every hit is checked against the tokens).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn evict_oldest(&mut self) {
        let Some(seq) = self.seqs.pop_front() else {
            return;
        };
        let id = self.first_id;
        self.first_id += 1;
        self.total -= seq.len();
        for i in 1..seq.len() {
            for n in self.min_n..=self.max_n.min(i) {
                let map = &mut self.maps[n - self.min_n];
                let key = hash(&seq[i - n..i]);
                // Only entries that still point here: a later sequence may have taken the key.
                if map.get(&key) == Some(&(id, i)) {
                    map.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_sequence_continues_a_matching_context() {
        let c = SuffixCache::new(100, 2, 3);
        c.insert(&[1, 2, 3, 4, 5, 6]);
        assert_eq!(c.propose(&[9, 9, 2, 3], 2), vec![4, 5]);
        assert_eq!(
            c.propose(&[2, 3], 10),
            vec![4, 5, 6],
            "ends with its sequence"
        );
        assert!(
            c.propose(&[9, 3], 2).is_empty(),
            "no bigram match, unigrams off"
        );
        assert!(c.propose(&[5, 6], 2).is_empty(), "nothing followed it");
        assert!(c.propose(&[2, 3], 0).is_empty());
    }

    #[test]
    fn the_longest_match_then_the_latest_sequence_wins() {
        let c = SuffixCache::new(100, 1, 3);
        c.insert(&[7, 2, 3, 40]);
        c.insert(&[8, 3, 50]);
        assert_eq!(
            c.propose(&[7, 2, 3], 1),
            vec![40],
            "the trigram beats the later unigram"
        );
        assert_eq!(c.propose(&[3], 1), vec![50], "the latest occurrence");
        c.insert(&[1, 7, 2, 3, 60]);
        assert_eq!(c.propose(&[7, 2, 3], 1), vec![60]);
    }

    #[test]
    fn the_oldest_sequences_are_evicted_to_stay_within_capacity() {
        let c = SuffixCache::new(10, 2, 2);
        c.insert(&[1, 2, 3, 4]);
        c.insert(&[5, 6, 7, 8]);
        assert_eq!(c.total(), 8);
        c.insert(&[9, 10, 11]);
        assert_eq!(c.total(), 7, "the first sequence went");
        assert!(c.propose(&[1, 2], 1).is_empty());
        assert_eq!(c.propose(&[5, 6], 1), vec![7]);
        assert_eq!(c.propose(&[9, 10], 1), vec![11]);
        // A key shared with an evicted sequence keeps pointing at the live one.
        let c = SuffixCache::new(8, 2, 2);
        c.insert(&[1, 2, 3, 4]);
        c.insert(&[1, 2, 9, 4]);
        c.insert(&[5, 6, 7]);
        assert_eq!(c.propose(&[1, 2], 1), vec![9]);
        // Longer than the whole cache: its last `capacity` tokens.
        let c = SuffixCache::new(4, 1, 1);
        c.insert(&[1, 2, 3, 4, 5, 6]);
        assert_eq!(c.total(), 4);
        assert!(c.propose(&[1], 1).is_empty());
        assert_eq!(c.propose(&[4], 3), vec![5, 6]);
    }

    #[test]
    fn a_zero_capacity_cache_holds_nothing() {
        let c = SuffixCache::new(0, 1, 2);
        c.insert(&[1, 2, 3]);
        assert_eq!(c.total(), 0);
        assert!(c.propose(&[1], 2).is_empty());
    }
}
