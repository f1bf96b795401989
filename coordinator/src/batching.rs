//! Per-verify-node batching queue and its admission check: blocks from every session on every
//! draft stream gather here until the batching window of the oldest one passes or the token
//! budget is reached, then leave as one `Verify` call. Synchronous and clock-free.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// When a queue may send a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Longest wait of the oldest block.
    pub window: Duration,
    /// Token budget of one batch.
    pub max_tokens: usize,
    /// Batches in flight at once per node.
    pub max_inflight: usize,
}

#[derive(Debug)]
struct Queued<T> {
    item: T,
    tokens: usize,
    enqueued: Instant,
}

/// One node's queue; `T` is whatever the caller routes verdicts with.
#[derive(Debug)]
pub struct NodeQueue<T> {
    pending: VecDeque<Queued<T>>,
    pending_tokens: usize,
    inflight_tokens: usize,
    inflight_batches: usize,
}

impl<T> Default for NodeQueue<T> {
    fn default() -> Self {
        Self {
            pending: VecDeque::new(),
            pending_tokens: 0,
            inflight_tokens: 0,
            inflight_batches: 0,
        }
    }
}

/// A batch taken from a queue.
#[derive(Debug)]
pub struct Taken<T> {
    /// Items, oldest first.
    pub items: Vec<T>,
    /// Their tokens.
    pub tokens: usize,
    /// How long each item waited in the queue.
    pub waited: Vec<Duration>,
}

impl<T> NodeQueue<T> {
    /// Whether a block of `tokens` fits under `max_queued` tokens (queued + in flight). An idle
    /// node always admits, so a single long prompt is never refused forever.
    pub fn admits(&self, tokens: usize, max_queued: usize) -> bool {
        let load = self.pending_tokens + self.inflight_tokens;
        load == 0 || load + tokens <= max_queued
    }

    /// Adds a block.
    pub fn push(&mut self, item: T, tokens: usize, now: Instant) {
        self.pending_tokens += tokens;
        self.pending.push_back(Queued {
            item,
            tokens,
            enqueued: now,
        });
    }

    /// Whether a batch should leave now.
    pub fn due(&self, now: Instant, p: &BatchPolicy) -> bool {
        match self.pending.front() {
            Some(first) if self.inflight_batches < p.max_inflight => {
                self.pending_tokens >= p.max_tokens || now >= first.enqueued + p.window
            }
            _ => false,
        }
    }

    /// When the next batch becomes due by its window (`None`: nothing pending or no slot).
    pub fn deadline(&self, p: &BatchPolicy) -> Option<Instant> {
        if self.inflight_batches >= p.max_inflight {
            return None;
        }
        self.pending.front().map(|f| f.enqueued + p.window)
    }

    /// Takes up to `max_tokens` tokens of blocks (at least one block) as an in-flight batch.
    pub fn take(&mut self, now: Instant, max_tokens: usize) -> Taken<T> {
        let mut out = Taken {
            items: Vec::new(),
            tokens: 0,
            waited: Vec::new(),
        };
        while let Some(front) = self.pending.front() {
            if !out.items.is_empty() && out.tokens + front.tokens > max_tokens {
                break;
            }
            let q = self.pending.pop_front().expect("front exists");
            out.tokens += q.tokens;
            out.waited.push(now.saturating_duration_since(q.enqueued));
            out.items.push(q.item);
        }
        self.pending_tokens -= out.tokens;
        if !out.items.is_empty() {
            self.inflight_batches += 1;
            self.inflight_tokens += out.tokens;
        }
        out
    }

    /// A batch of `tokens` tokens came back (or failed).
    pub fn finish(&mut self, tokens: usize) {
        self.inflight_batches = self.inflight_batches.saturating_sub(1);
        self.inflight_tokens = self.inflight_tokens.saturating_sub(tokens);
    }

    /// Removes every pending block (the node went down).
    pub fn drain_pending(&mut self) -> Vec<T> {
        self.pending_tokens = 0;
        self.pending.drain(..).map(|q| q.item).collect()
    }

    /// Removes pending blocks matching `pred`.
    pub fn remove_where(&mut self, mut pred: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut removed = Vec::new();
        let mut kept = VecDeque::with_capacity(self.pending.len());
        for q in self.pending.drain(..) {
            if pred(&q.item) {
                self.pending_tokens -= q.tokens;
                removed.push(q.item);
            } else {
                kept.push_back(q);
            }
        }
        self.pending = kept;
        removed
    }

    /// Tokens queued, not yet sent.
    pub fn pending_tokens(&self) -> usize {
        self.pending_tokens
    }

    /// Tokens in flight.
    pub fn inflight_tokens(&self) -> usize {
        self.inflight_tokens
    }

    /// Batches in flight.
    pub fn inflight_batches(&self) -> usize {
        self.inflight_batches
    }

    /// Blocks queued.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: BatchPolicy = BatchPolicy {
        window: Duration::from_millis(2),
        max_tokens: 10,
        max_inflight: 1,
    };

    #[test]
    fn window_gathers_then_releases() {
        let t0 = Instant::now();
        let mut q = NodeQueue::default();
        q.push("a", 3, t0);
        q.push("b", 3, t0 + Duration::from_millis(1));
        assert!(!q.due(t0 + Duration::from_millis(1), &P));
        assert_eq!(q.deadline(&P), Some(t0 + Duration::from_millis(2)));
        assert!(q.due(t0 + Duration::from_millis(2), &P));
        let b = q.take(t0 + Duration::from_millis(2), P.max_tokens);
        assert_eq!(b.items, vec!["a", "b"]);
        assert_eq!(b.tokens, 6);
        assert_eq!(
            b.waited,
            vec![Duration::from_millis(2), Duration::from_millis(1)]
        );
        assert_eq!(q.inflight_tokens(), 6);
    }

    #[test]
    fn token_budget_sends_early_and_splits() {
        let t0 = Instant::now();
        let mut q = NodeQueue::default();
        for (i, t) in [4, 4, 4].into_iter().enumerate() {
            q.push(i, t, t0);
        }
        assert!(q.due(t0, &P), "12 tokens >= budget 10");
        let b = q.take(t0, P.max_tokens);
        assert_eq!(b.items, vec![0, 1]);
        assert_eq!(q.pending_tokens(), 4);
        // One slot in flight: the rest waits for it even past its window.
        assert!(!q.due(t0 + Duration::from_secs(1), &P));
        assert_eq!(q.deadline(&P), None);
        q.finish(8);
        assert!(q.due(t0 + Duration::from_secs(1), &P));
        // An oversized block still goes, alone.
        let mut q = NodeQueue::default();
        q.push("big", 50, t0);
        q.push("small", 1, t0);
        assert_eq!(q.take(t0, 10).items, vec!["big"]);
    }

    #[test]
    fn admission_bounds_queued_tokens_but_admits_into_idle_node() {
        let t0 = Instant::now();
        let mut q = NodeQueue::default();
        assert!(q.admits(1000, 100));
        q.push(1, 60, t0);
        assert!(q.admits(40, 100));
        assert!(!q.admits(41, 100));
        let b = q.take(t0, 100);
        assert!(!q.admits(41, 100), "in-flight tokens count too");
        q.finish(b.tokens);
        assert!(q.admits(41, 100));
    }

    #[test]
    fn remove_and_drain() {
        let t0 = Instant::now();
        let mut q = NodeQueue::default();
        q.push(1, 2, t0);
        q.push(2, 3, t0);
        q.push(3, 4, t0);
        assert_eq!(q.remove_where(|x| *x == 2), vec![2]);
        assert_eq!(q.pending_tokens(), 6);
        assert_eq!(q.drain_pending(), vec![1, 3]);
        assert_eq!(q.pending_tokens(), 0);
    }
}
