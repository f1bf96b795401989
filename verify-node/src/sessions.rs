//! Per-session state of the verify node and the checks that decide, before any forward, what a
//! block will do. Plain synchronous state; the batcher task owns it.
//!
//! KV convention (shared with the draft node): the model's cache of a session holds every
//! committed token except the last one. A round with committed length n, last committed token
//! c_n and drafts d_1..d_γ runs `start: n-1, tokens: [c_n, d_1..d_γ]` and needs the γ+1 logit
//! rows; an open or resync runs `start: 0, tokens: history ++ drafts`. After the verdict
//! (a accepted, next token x) the cache is truncated to n+a and x is the new uncached last token.
//!
//! Tenancy: a session id on the wire is chosen by one coordinator process and means nothing to
//! another, so the table is keyed by [`SessionKey`] — the caller's certificate identity, the
//! coordinator's per-process instance id and the wire id — and every key gets its own node-local
//! [`SessionId`] for the model's KV caches. Two coordinators (or one restarted) that use the same
//! wire id never share or release each other's state.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgespec_model::{SeqRequest, SessionId};
use edgespec_proto::domain::{Block, ErrorCode, SessionError};

/// Limits every block is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Logit row length of the target model; every token id must be below it.
    pub vocab_size: usize,
    /// Longest sequence a session's cache may hold.
    pub max_context: usize,
    /// Most draft tokens in one block.
    pub max_block_tokens: usize,
    /// Sessions held at once.
    pub capacity: usize,
    /// A session without a round for this long may be evicted for a new one; one active more
    /// recently is never evicted to admit another (the new one is refused instead).
    pub evict_idle_after: Duration,
}

/// Whose sessions these are: the calling coordinator as authenticated (its certificate's
/// identity; empty in plaintext mode) and the instance id it sends (new at every start).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner(Arc<OwnerId>);

#[derive(Debug, PartialEq, Eq, Hash)]
struct OwnerId {
    /// The caller's certificate identity (`spiffe://…/coordinator/<id>`), or empty.
    peer: String,
    /// The coordinator process's instance id.
    instance: String,
}

impl Owner {
    /// An owner from its parts: the caller's certificate identity (empty in plaintext mode)
    /// and the coordinator's instance id.
    pub fn new(peer: &str, instance: &str) -> Self {
        Owner(Arc::new(OwnerId {
            peer: peer.to_string(),
            instance: instance.to_string(),
        }))
    }
}

/// One session as its owner names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    /// The owner.
    pub owner: Owner,
    /// The owner's session id (the wire's `session_id`).
    pub id: u64,
}

/// What the node knows about one session between rounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Whose session it is.
    pub key: SessionKey,
    /// Committed tokens (prompt + accepted output).
    pub committed_len: usize,
    /// The last committed token: the one token not in the KV cache.
    pub last_token: u32,
    /// LRU clock value of the last round that touched it.
    last_used: u64,
    /// When its last round was recorded.
    last_active: Instant,
}

/// A block that passed every check, with the forward it needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// The session as its owner names it.
    pub key: SessionKey,
    /// The node-local id of its KV cache (`seq.session`).
    pub local: SessionId,
    /// The block (its `session_id` is the owner's wire id).
    pub block: Block,
    /// Its part of the batched forward (`logits_for_last == γ + 1`).
    pub seq: SeqRequest,
}

impl Planned {
    /// True when the block (re)builds the session from its history.
    pub fn is_open(&self) -> bool {
        self.block.history.is_some()
    }
}

/// KV memory as the batcher last measured it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvUse {
    /// Bytes held now.
    pub bytes: u64,
    /// The budget.
    pub budget: u64,
    /// Measured bytes per cached token (≤ 0: not measured yet; the budget is then not
    /// enforced).
    pub bytes_per_token: f64,
}

/// Why a new session was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot is held by a session active within `evict_idle_after` (or in the batch).
    Capacity,
    /// Its KV would exceed the budget and nothing idle is left to evict.
    KvBudget,
}

/// What [`Sessions::make_room`] decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Room {
    /// Long-idle sessions to evict, in order.
    pub evict: Vec<SessionId>,
    /// Opens of new sessions refused (index among the planned blocks, reason), in index order.
    pub refused: Vec<(usize, Refusal)>,
    /// The batch's sessions already held here exceed the KV budget even with every long-idle
    /// session evicted and every new one refused.
    pub over_budget: bool,
}

/// The table of live sessions with an LRU order.
#[derive(Debug)]
pub struct Sessions {
    limits: Limits,
    map: HashMap<SessionId, Session>,
    ids: HashMap<SessionKey, SessionId>,
    next_local: SessionId,
    clock: u64,
}

impl Sessions {
    /// An empty table.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            map: HashMap::new(),
            ids: HashMap::new(),
            next_local: 0,
            clock: 0,
        }
    }

    /// The limits blocks are checked against.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no session is live.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The session's state, if live (by node-local id).
    pub fn get(&self, id: SessionId) -> Option<&Session> {
        self.map.get(&id)
    }

    /// The node-local id of a live session.
    pub fn local_id(&self, key: &SessionKey) -> Option<SessionId> {
        self.ids.get(key).copied()
    }

    /// The node-local id of `key`: its live session's, or a fresh one never used before (the
    /// session is recorded only by [`Sessions::commit`]).
    pub fn resolve(&mut self, key: &SessionKey) -> SessionId {
        if let Some(&id) = self.ids.get(key) {
            return id;
        }
        self.next_local += 1;
        self.next_local
    }

    /// Live sessions of one owner (all owners: [`Sessions::len`]).
    pub fn owned_by(&self, owner: &Owner) -> usize {
        self.ids.keys().filter(|k| &k.owner == owner).count()
    }

    /// Sessions that had a round within `evict_idle_after` of `now`: the ones a new session may
    /// not displace.
    pub fn recent(&self, now: Instant) -> usize {
        self.map
            .values()
            .filter(|s| !self.long_idle(s, now))
            .count()
    }

    fn long_idle(&self, s: &Session, now: Instant) -> bool {
        now.saturating_duration_since(s.last_active) >= self.limits.evict_idle_after
    }

    /// Tokens held in KV caches across all sessions (committed minus the uncached last one).
    pub fn cached_tokens(&self) -> usize {
        self.map.values().map(|s| s.committed_len - 1).sum()
    }

    /// Checks `block` of session `key` (node-local id `local`, from [`Sessions::resolve`])
    /// against the limits and the session's state and returns the forward it needs. Changes
    /// nothing: a rejected block leaves the session as it was.
    pub fn plan(
        &self,
        key: SessionKey,
        local: SessionId,
        block: Block,
    ) -> Result<Planned, SessionError> {
        let seq = self
            .check(&block)
            .and_then(|()| self.forward_request(local, &block))
            .map_err(|(code, message)| SessionError {
                session_id: block.session_id,
                round: block.round,
                code,
                message,
            })?;
        Ok(Planned {
            key,
            local,
            block,
            seq,
        })
    }

    /// The checks that need only the limits: block length, vocabulary, draft distributions (the
    /// full check the acceptance rule relies on, so a bad q is refused before the forward) and
    /// the context window.
    fn check(&self, block: &Block) -> Result<(), (ErrorCode, String)> {
        let l = self.limits;
        let gamma = block.draft_tokens.len();
        let n = block.committed_len;
        let invalid = |msg: String| Err((ErrorCode::InvalidArgument, msg));
        if gamma > l.max_block_tokens {
            return invalid(format!(
                "the block has {gamma} draft tokens; this node accepts at most {}",
                l.max_block_tokens
            ));
        }
        let out_of_vocab = |field: &str, tokens: &[u32]| {
            tokens
                .iter()
                .position(|&t| t as usize >= l.vocab_size)
                .map(|i| {
                    // The id itself is not echoed: errors may be logged, token ids are content.
                    format!(
                        "{field}[{i}] is outside the vocabulary (size {})",
                        l.vocab_size
                    )
                })
        };
        if let Some(msg) = out_of_vocab("draft_tokens", &block.draft_tokens) {
            return invalid(msg);
        }
        for (i, q) in block.draft_probs.iter().enumerate() {
            if let Err(e) = q.validate(l.vocab_size) {
                return invalid(format!("draft_probs[{i}]: {e}"));
            }
        }
        if let Some(msg) = block
            .history
            .as_deref()
            .and_then(|h| out_of_vocab("history", h))
        {
            return invalid(msg);
        }
        // The forward leaves n - 1 + γ + 1 tokens in the cache.
        if n + gamma > l.max_context {
            return Err((
                ErrorCode::ContextOverflow,
                format!(
                    "{n} committed plus {gamma} draft tokens exceed the context window of {}",
                    l.max_context
                ),
            ));
        }
        Ok(())
    }

    /// The block's part of the batched forward: its whole history on an open or resync, else
    /// the session's last committed token (which must be where the block says it is) plus the
    /// draft tokens.
    fn forward_request(
        &self,
        local: SessionId,
        block: &Block,
    ) -> Result<SeqRequest, (ErrorCode, String)> {
        let gamma = block.draft_tokens.len();
        let n = block.committed_len;
        if let Some(history) = &block.history {
            let mut tokens = Vec::with_capacity(n + gamma);
            tokens.extend_from_slice(history);
            tokens.extend_from_slice(&block.draft_tokens);
            return Ok(SeqRequest {
                session: local,
                start: 0,
                tokens,
                logits_for_last: gamma + 1,
            });
        }
        let Some(s) = self.map.get(&local) else {
            return Err((
                ErrorCode::ResyncNeeded,
                "this verify node holds no state for the session; resend the block with the \
                 full history"
                    .into(),
            ));
        };
        if s.committed_len != n {
            // The session's own length is not echoed: errors tell a caller what was wrong with
            // its request, never another party's state.
            return Err((
                ErrorCode::InvalidArgument,
                format!(
                    "committed_len {n} does not match the session's state on this node; resend \
                     the block with the full history"
                ),
            ));
        }
        let mut tokens = Vec::with_capacity(gamma + 1);
        tokens.push(s.last_token);
        tokens.extend_from_slice(&block.draft_tokens);
        Ok(SeqRequest {
            session: local,
            start: n - 1,
            tokens,
            logits_for_last: gamma + 1,
        })
    }

    /// Records a round's result: session `key` (node-local `id`) now has `committed_len`
    /// tokens ending in `last_token`, and is the most recently used (active now).
    pub fn commit(
        &mut self,
        key: &SessionKey,
        id: SessionId,
        committed_len: usize,
        last_token: u32,
    ) {
        self.commit_at(key, id, committed_len, last_token, Instant::now());
    }

    /// [`Sessions::commit`] with the round's time given.
    pub fn commit_at(
        &mut self,
        key: &SessionKey,
        id: SessionId,
        committed_len: usize,
        last_token: u32,
        now: Instant,
    ) {
        self.clock += 1;
        if let Some(old) = self.ids.insert(key.clone(), id) {
            if old != id {
                self.map.remove(&old);
            }
        }
        self.map.insert(
            id,
            Session {
                key: key.clone(),
                committed_len,
                last_token,
                last_used: self.clock,
                last_active: now,
            },
        );
    }

    /// Forgets a session (by node-local id).
    pub fn remove(&mut self, id: SessionId) -> Option<Session> {
        let s = self.map.remove(&id)?;
        self.ids.remove(&s.key);
        Some(s)
    }

    /// Decides, at `now`, how the `planned` blocks fit the session capacity and the KV budget:
    /// which long-idle sessions (no round for `evict_idle_after`, least recently used first,
    /// never one in `pinned`, the sessions of the batch being served) to evict, and which opens
    /// of new sessions to refuse. A session active more recently is never evicted to admit
    /// another: the node is the authority on its capacity and says no rather than thrash.
    /// Sessions it already holds are never refused. Changes nothing; the caller evicts.
    pub fn make_room<'a>(
        &self,
        planned: impl IntoIterator<Item = &'a Planned>,
        pinned: &HashSet<SessionId>,
        kv: KvUse,
        now: Instant,
    ) -> Room {
        let planned: Vec<&Planned> = planned.into_iter().collect();
        let mut room = Room::default();
        let mut gone = HashSet::new();
        let mut kv_bytes = kv.bytes;
        let evict_one = |room: &mut Room, gone: &mut HashSet<SessionId>, kv_bytes: &mut u64| {
            let (id, s) = self.lru_where(|id, s| {
                !pinned.contains(id) && !gone.contains(id) && self.long_idle(s, now)
            })?;
            gone.insert(id);
            room.evict.push(id);
            // The KV estimate follows the evictions until the next measurement.
            let freed = (s.committed_len - 1) as f64 * kv.bytes_per_token;
            *kv_bytes = kv_bytes.saturating_sub(freed as u64);
            Some(())
        };
        let is_new = |p: &Planned| !self.map.contains_key(&p.local);
        let mut admitted = Vec::new();
        for (k, p) in planned.iter().enumerate() {
            if !is_new(p) {
                continue;
            }
            if self.map.len() - gone.len() + admitted.len() >= self.limits.capacity
                && evict_one(&mut room, &mut gone, &mut kv_bytes).is_none()
            {
                room.refused.push((k, Refusal::Capacity));
                continue;
            }
            admitted.push(k);
        }
        if kv.bytes_per_token <= 0.0 {
            return room;
        }
        let rows = |k: usize| planned[k].seq.tokens.len() as f64 * kv.bytes_per_token;
        let mut new_bytes: f64 = planned
            .iter()
            .enumerate()
            .filter(|(k, p)| !is_new(p) || admitted.contains(k))
            .map(|(k, _)| rows(k))
            .sum();
        while kv_bytes as f64 + new_bytes > kv.budget as f64 {
            if evict_one(&mut room, &mut gone, &mut kv_bytes).is_some() {
                continue;
            }
            // Nothing idle is left: the newest opens give way, the sessions held stay.
            let Some(k) = admitted.pop() else {
                room.over_budget = true;
                break;
            };
            new_bytes -= rows(k);
            room.refused.push((k, Refusal::KvBudget));
        }
        room.refused.sort_by_key(|(k, _)| *k);
        room
    }

    /// The least recently used session not in `pinned` (the sessions of the batch being
    /// served), if any.
    pub fn lru_idle(&self, pinned: &HashSet<SessionId>) -> Option<SessionId> {
        self.lru_where(|id, _| !pinned.contains(id))
            .map(|(id, _)| id)
    }

    /// The least recently used session that `eligible` accepts.
    fn lru_where(
        &self,
        eligible: impl Fn(&SessionId, &Session) -> bool,
    ) -> Option<(SessionId, &Session)> {
        self.map
            .iter()
            .filter(|(id, s)| eligible(id, s))
            .min_by_key(|(_, s)| s.last_used)
            .map(|(id, s)| (*id, s))
    }
}

#[cfg(test)]
mod tests {
    use edgespec_specdec::{SamplingParams, SparseDist};

    use super::*;

    const LIMITS: Limits = Limits {
        vocab_size: 100,
        max_context: 32,
        max_block_tokens: 4,
        capacity: 8,
        evict_idle_after: Duration::from_secs(60),
    };

    fn block(id: u64, n: usize, history: Option<Vec<u32>>, drafts: Vec<u32>) -> Block {
        Block {
            session_id: id,
            round: 7,
            committed_len: n,
            history,
            draft_tokens: drafts,
            draft_probs: vec![],
            sampling: SamplingParams::GREEDY,
        }
    }

    fn code(r: Result<Planned, SessionError>) -> ErrorCode {
        r.unwrap_err().code
    }

    fn key_of(owner: &str, id: u64) -> SessionKey {
        SessionKey {
            owner: Owner::new("", owner),
            id,
        }
    }

    /// Plans `b` for coordinator instance "a".
    fn plan(s: &mut Sessions, b: Block) -> Result<Planned, SessionError> {
        let key = key_of("a", b.session_id);
        let local = s.resolve(&key);
        s.plan(key, local, b)
    }

    fn commit(s: &mut Sessions, id: u64, n: usize, last: u32) -> SessionId {
        let key = key_of("a", id);
        let local = s.resolve(&key);
        s.commit(&key, local, n, last);
        local
    }

    #[test]
    fn open_and_continue_follow_the_kv_convention() {
        let mut s = Sessions::new(LIMITS);
        let p = plan(&mut s, block(1, 3, Some(vec![5, 6, 7]), vec![8, 9])).unwrap();
        assert_eq!(p.seq.start, 0);
        assert_eq!(p.seq.tokens, vec![5, 6, 7, 8, 9]);
        assert_eq!(p.seq.logits_for_last, 3);
        s.commit(&p.key, p.local, 5, 42);
        let p = plan(&mut s, block(1, 5, None, vec![1])).unwrap();
        assert_eq!(p.seq.start, 4);
        assert_eq!(p.seq.tokens, vec![42, 1]);
        assert_eq!(p.seq.logits_for_last, 2);
        assert_eq!(s.cached_tokens(), 4);
    }

    #[test]
    fn bad_blocks_are_rejected_without_state_change() {
        let mut s = Sessions::new(LIMITS);
        let local = commit(&mut s, 1, 3, 7);
        let before = s.get(local).unwrap().clone();
        assert_eq!(
            code(plan(&mut s, block(2, 3, None, vec![]))),
            ErrorCode::ResyncNeeded
        );
        assert_eq!(
            code(plan(&mut s, block(1, 4, None, vec![]))),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            code(plan(&mut s, block(1, 3, None, vec![100]))),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            code(plan(&mut s, block(1, 3, None, vec![1, 2, 3, 4, 5]))),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            code(plan(&mut s, block(1, 3, Some(vec![1, 200, 3]), vec![]))),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            code(plan(&mut s, block(1, 30, Some(vec![1; 30]), vec![1, 2, 3]))),
            ErrorCode::ContextOverflow
        );
        let mut b = block(1, 3, None, vec![1]);
        b.sampling.temperature = 1.0;
        b.draft_probs = vec![SparseDist {
            ids: vec![1, 150],
            probs: vec![0.5, 0.5],
        }];
        assert_eq!(code(plan(&mut s, b)), ErrorCode::InvalidArgument);
        assert_eq!(*s.get(1).unwrap(), before);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn lru_skips_pinned_sessions() {
        let mut s = Sessions::new(LIMITS);
        let one = commit(&mut s, 1, 2, 0);
        let two = commit(&mut s, 2, 2, 0);
        let three = commit(&mut s, 3, 2, 0);
        commit(&mut s, 1, 3, 0); // 1 is now the most recent
        assert_eq!(s.lru_idle(&HashSet::new()), Some(two));
        assert_eq!(s.lru_idle(&HashSet::from([two])), Some(three));
        assert_eq!(s.lru_idle(&HashSet::from([one, two, three])), None);
    }

    #[test]
    fn make_room_evicts_idle_sessions_for_capacity_and_kv_and_refuses_when_all_are_busy() {
        let mut s = Sessions::new(LIMITS);
        let locals: Vec<SessionId> = (1..=8).map(|id| commit(&mut s, id, 5, 0)).collect();
        let open = plan(&mut s, block(9, 3, Some(vec![1, 2, 3]), vec![4])).unwrap();
        let cont = plan(&mut s, block(2, 5, None, vec![4])).unwrap();
        let no_kv = KvUse {
            bytes: 0,
            budget: 0,
            bytes_per_token: 0.0,
        };
        // A minute later every session is long idle.
        let later = Instant::now() + LIMITS.evict_idle_after;
        // Full table: the open takes the least recently used idle slot; a continuation needs none.
        let pinned = HashSet::from([locals[1]]);
        let room = s.make_room([&cont, &open], &pinned, no_kv, later);
        assert_eq!(room.evict, vec![locals[0]]);
        assert!(room.refused.is_empty() && !room.over_budget);
        assert_eq!(s.len(), 8, "deciding changes nothing");
        // Every session busy: the open is refused, nothing is evicted.
        let all: HashSet<SessionId> = locals.iter().copied().collect();
        let room = s.make_room([&cont, &open], &all, no_kv, later);
        assert_eq!(
            room,
            Room {
                evict: vec![],
                refused: vec![(1, Refusal::Capacity)],
                over_budget: false
            }
        );
        // KV: 8 sessions × 4 cached tokens × 10 B = 320 B; the continuation adds 2 rows (20 B).
        // A 290 B budget needs 50 B back: two idle sessions of 40 B (the least recent first).
        let kv = KvUse {
            bytes: 320,
            budget: 290,
            bytes_per_token: 10.0,
        };
        let room = s.make_room([&cont], &pinned, kv, later);
        assert_eq!(room.evict, vec![locals[0], locals[2]]);
        assert!(!room.over_budget);
        let room = s.make_room([&cont], &all, kv, later);
        assert!(room.evict.is_empty() && room.over_budget);
    }

    #[test]
    fn make_room_refuses_new_sessions_instead_of_evicting_recently_active_ones() {
        let mut s = Sessions::new(LIMITS);
        let t0 = Instant::now();
        let key = |id| key_of("a", id);
        for id in 1..=8 {
            let local = s.resolve(&key(id));
            // Session 1 had its last round long ago; the others just now.
            let at = if id == 1 {
                t0
            } else {
                t0 + LIMITS.evict_idle_after
            };
            s.commit_at(&key(id), local, 5, 0, at);
        }
        let now = t0 + LIMITS.evict_idle_after + Duration::from_secs(1);
        assert_eq!(s.recent(now), 7);
        let open =
            |s: &mut Sessions, id| plan(s, block(id, 3, Some(vec![1, 2, 3]), vec![4])).unwrap();
        let (nine, ten) = (open(&mut s, 9), open(&mut s, 10));
        let cont = plan(&mut s, block(2, 5, None, vec![4])).unwrap();
        let no_kv = KvUse {
            bytes: 0,
            budget: 0,
            bytes_per_token: 0.0,
        };
        // The long-idle session 1 makes room for one open; the next is refused, nothing recent
        // is evicted.
        let room = s.make_room([&cont, &nine, &ten], &HashSet::new(), no_kv, now);
        assert_eq!(room.evict, vec![s.local_id(&key(1)).unwrap()]);
        assert_eq!(room.refused, vec![(2, Refusal::Capacity)]);
        // KV: 8 × 4 tokens × 10 B = 320 B held; a 340 B budget. The continuation (2 rows) fits,
        // the open's 4 rows do not once session 1's 40 B are freed… 320 − 40 + 20 + 40 = 340:
        // it fits exactly; with a 330 B budget it is refused for KV and the continuation stays.
        let kv = |budget| KvUse {
            bytes: 320,
            budget,
            bytes_per_token: 10.0,
        };
        let room = s.make_room([&cont, &nine], &HashSet::new(), kv(340), now);
        assert!(room.refused.is_empty() && !room.over_budget, "{room:?}");
        let room = s.make_room([&cont, &nine], &HashSet::new(), kv(330), now);
        assert_eq!(room.refused, vec![(1, Refusal::KvBudget)]);
        assert!(!room.over_budget);
        // Held sessions are never refused: over budget on their own is only reported.
        let room = s.make_room([&cont], &HashSet::new(), kv(100), now);
        assert!(room.refused.is_empty() && room.over_budget);
    }

    #[test]
    fn equal_wire_ids_of_different_owners_are_different_sessions() {
        let mut s = Sessions::new(LIMITS);
        let a = key_of("coordinator-a", 1);
        let b = key_of("coordinator-b", 1);
        let la = s.resolve(&a);
        s.commit(&a, la, 3, 7);
        let lb = s.resolve(&b);
        assert_ne!(la, lb, "two owners' session 1 share a KV cache");
        // Without history, b's session 1 is unknown here even though a's exists.
        assert_eq!(
            code(s.plan(b.clone(), lb, block(1, 3, None, vec![]))),
            ErrorCode::ResyncNeeded
        );
        s.commit(&b, lb, 3, 9);
        assert_eq!(s.len(), 2);
        assert_eq!(s.owned_by(&a.owner), 1);
        // Releasing b's session leaves a's alone.
        s.remove(s.local_id(&b).unwrap());
        assert_eq!(s.local_id(&a), Some(la));
        assert_eq!(s.get(la).unwrap().last_token, 7);
        // The wrong-length error does not echo the session's state.
        let err = s
            .plan(a.clone(), la, block(1, 4, None, vec![]))
            .unwrap_err();
        assert!(!err.message.contains('3'), "{}", err.message);
    }
}
