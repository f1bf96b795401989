//! Draft-stream side of the state: hello, blocks (open / resync / round), closes, probes and
//! disconnects.

use super::{Core, DraftLink, Item, Out, Session, StreamId};
use crate::placement::Placement;
use crate::registry::AdminState;
use crate::Error;
use edgespec_proto::domain::{
    CoordinatorMessage, DraftBlock, DraftMessage, ErrorCode, Hello, Probe, ProbeReply, Welcome,
};
use edgespec_specdec::{BlockArrival, DraftCaps, DraftSide, SessionGamma};
use std::collections::{HashMap, HashSet};
use std::time::Instant;

impl Core {
    /// A draft node opened its stream. Refused on a model mismatch with the verify fleet.
    pub fn hello(&mut self, hello: &Hello, now: Instant) -> Result<(StreamId, Welcome), Error> {
        let fleet = self
            .registry
            .fleet_fingerprint()
            .unwrap_or_default()
            .to_string();
        if !fleet.is_empty() && fleet != hello.fingerprint {
            return Err(Error::DraftMismatch {
                draft: hello.fingerprint.clone(),
                fleet,
            });
        }
        let id = self.next_stream;
        self.next_stream += 1;
        let side = DraftSide::new(
            self.link_config(),
            DraftCaps {
                draft_s_per_token: hello.draft_s_per_token,
                pipelined: hello.pipelined,
                max_gamma: hello.max_gamma as usize,
                method: hello.method,
            },
        );
        let (initial_gamma, max_gamma) = (
            self.gamma.start_gamma(&side) as u32,
            self.gamma.max_gamma(&side) as u32,
        );
        self.streams.insert(
            id,
            DraftLink {
                node_id: hello.node_id.clone(),
                fingerprint: hello.fingerprint.clone(),
                model_name: hello.model_name.clone(),
                side,
                by_method: Default::default(),
                granted_gamma: initial_gamma as usize,
                sessions: HashSet::new(),
                next_probe_at: now,
                probe_seq: 0,
                probes: HashMap::new(),
            },
        );
        self.metrics.draft_streams.set(self.streams.len() as i64);
        tracing::info!(
            stream = id, draft_node = %hello.node_id, pipelined = hello.pipelined,
            method = %hello.method, "draft node connected"
        );
        Ok((
            id,
            Welcome {
                coordinator_id: self.id.clone(),
                fleet_fingerprint: fleet,
                initial_gamma,
                max_gamma,
                speculation_enabled: self.policy.speculation_enabled,
            },
        ))
    }

    /// A validated message on an open stream.
    pub fn draft_message(
        &mut self,
        stream: StreamId,
        msg: DraftMessage,
        now: Instant,
        out: &mut Out,
    ) {
        match msg {
            DraftMessage::Block(b) => self.on_block(stream, b, now, out),
            DraftMessage::Close { session_id } => {
                if let Some(g) = self.by_key.get(&(stream, session_id)).copied() {
                    self.drop_session(g, out);
                }
            }
            DraftMessage::ProbeReply(r) => self.on_probe_reply(stream, r, now),
            DraftMessage::Hello(_) => {
                tracing::debug!(stream, "ignoring a second DraftHello on the stream");
            }
        }
    }

    /// A message that failed validation: answer its session (if any) with INVALID_ARGUMENT.
    pub fn invalid_message(
        &mut self,
        stream: StreamId,
        session_round: (u64, u64),
        why: String,
        out: &mut Out,
    ) {
        self.session_error(out, stream, session_round, ErrorCode::InvalidArgument, why);
    }

    /// The stream ended: its sessions are released everywhere.
    pub fn disconnect(&mut self, stream: StreamId, out: &mut Out) {
        let Some(link) = self.streams.get(&stream) else {
            return;
        };
        let ids: Vec<u64> = link
            .sessions
            .iter()
            .filter_map(|d| self.by_key.get(&(stream, *d)).copied())
            .collect();
        tracing::info!(stream, draft_node = %link.node_id, sessions = ids.len(), "draft node disconnected");
        for g in ids {
            self.drop_session(g, out);
        }
        if let Some(link) = self.streams.remove(&stream) {
            // Another stream of the same node (a reconnect) keeps publishing its link.
            if !self.streams.values().any(|l| l.node_id == link.node_id) {
                self.metrics.remove_link(&link.node_id);
            }
        }
        self.metrics.draft_streams.set(self.streams.len() as i64);
    }

    /// A block: check the stream against the fleet, find or open its session, let the γ
    /// controller see its timing, place the session and queue the block for its node.
    fn on_block(&mut self, stream: StreamId, db: DraftBlock, now: Instant, out: &mut Out) {
        let sid = (db.block.session_id, db.block.round);
        if !self.streams.contains_key(&stream) {
            return; // the stream ended meanwhile
        }
        if let Err((code, msg)) = self.check_fleet(stream, &db) {
            return self.session_error(out, stream, sid, code, msg);
        }
        let Some(global) = self.session_for(stream, &db, out) else {
            return;
        };
        if self.sessions[&global].busy {
            let msg = "a block of this session is already queued or in flight";
            return self.session_error(out, stream, sid, ErrorCode::InvalidArgument, msg);
        }
        self.observe_arrival(stream, global, &db, now);
        if !self.ensure_placed(global, sid, stream, out) {
            return;
        }
        self.enqueue(stream, global, db, now, out);
    }

    /// Whether the stream's block can be served at all: it drafts no more than the coordinator
    /// allowed, a verify node is up and runs the stream's model (the fleet may have been empty
    /// when the stream said hello).
    fn check_fleet(
        &mut self,
        stream: StreamId,
        db: &DraftBlock,
    ) -> Result<(), (ErrorCode, String)> {
        let Some(link) = self.streams.get_mut(&stream) else {
            return Err((ErrorCode::Internal, "unknown draft stream".into()));
        };
        // The block's cost is its own method's (a request may override the node's default).
        link.side
            .report_draft_cost(db.method, f64::from(db.draft_s_per_token));
        // The model's own cost, which prices a hybrid session's model fallback.
        if db.model_s_per_token > 0.0 {
            link.side.report_draft_cost(
                edgespec_specdec::DraftMethod::Model,
                f64::from(db.model_s_per_token),
            );
        }
        if self.registry.up_count() == 0 {
            let msg = "no verify node is available; retry later";
            return Err((ErrorCode::Unavailable, msg.into()));
        }
        let gamma = db.block.draft_tokens.len();
        let allowed = link.granted_gamma.max(self.gamma.max_gamma(&link.side));
        if gamma > allowed {
            let msg = format!(
                "the block drafts {gamma} tokens; the coordinator allows this draft node at most \
                 {allowed}"
            );
            return Err((ErrorCode::InvalidArgument, msg));
        }
        let fleet = self.registry.fleet_fingerprint().unwrap_or_default();
        if link.fingerprint != fleet {
            let msg = format!(
                "model mismatch: this draft node's model differs from the verify fleet's ({fleet})"
            );
            return Err((ErrorCode::ModelMismatch, msg));
        }
        Ok(())
    }

    /// The block's session: the known one, or a new one when the block carries its history
    /// (`None`: the block was answered with an error).
    fn session_for(&mut self, stream: StreamId, db: &DraftBlock, out: &mut Out) -> Option<u64> {
        if let Some(g) = self.by_key.get(&(stream, db.block.session_id)) {
            return Some(*g);
        }
        if db.block.history.is_none() {
            let sid = (db.block.session_id, db.block.round);
            let msg = "session unknown to the coordinator; resend the block with its history";
            self.session_error(out, stream, sid, ErrorCode::ResyncNeeded, msg);
            return None;
        }
        self.open_session(stream, db, out)
    }

    /// Feeds the block's timing and size to the γ controller.
    fn observe_arrival(&mut self, stream: StreamId, global: u64, db: &DraftBlock, now: Instant) {
        let now_s = self.secs(now);
        let (Some(link), Some(s)) = (
            self.streams.get_mut(&stream),
            self.sessions.get_mut(&global),
        ) else {
            return;
        };
        let arrival = BlockArrival {
            now_s,
            method: db.method,
            gamma: db.block.draft_tokens.len(),
            q_entries: db.block.draft_probs.iter().map(|q| q.ids.len()).sum(),
            drafted_ahead: db.drafted_ahead,
            last_round_trip_s: db.last_round_trip_ns as f64 * 1e-9,
            last_server_s: std::mem::take(&mut s.last_server_ns) as f64 * 1e-9,
        };
        self.gamma.on_block(&mut link.side, &mut s.g, arrival);
    }

    /// Queues the block of a placed session for its node (admission by the node's queued-token
    /// limit) and sends the batch if it is due.
    fn enqueue(
        &mut self,
        stream: StreamId,
        global: u64,
        db: DraftBlock,
        now: Instant,
        out: &mut Out,
    ) {
        let sid = (db.block.session_id, db.block.round);
        let s = &self.sessions[&global];
        if db.block.history.is_none() && !s.synced {
            let msg = "the session moved to another verify node; resend the block with its history";
            return self.session_error(out, stream, sid, ErrorCode::ResyncNeeded, msg);
        }
        let node = s.node.clone().expect("placed");
        let tokens = db.block.forward_tokens();
        let max_queued = self.settings.admission.max_queued_tokens_per_node;
        let admits = self
            .queues
            .get(&node)
            .is_none_or(|q| q.admits(tokens, max_queued));
        if !admits {
            if s.g.rounds() == 0 && !s.synced {
                self.drop_session(global, out);
            }
            let msg = format!("verify node {node} is at its queued-token limit; retry later");
            return self.session_error(out, stream, sid, ErrorCode::Overloaded, msg);
        }
        let s = self.sessions.get_mut(&global).expect("session exists");
        s.busy = true;
        if db.block.history.is_some() {
            s.synced = true;
        }
        let mut block = db.block;
        block.session_id = global;
        let p = self.batch_policy();
        let queue = self.queues.entry(node).or_default();
        queue.push(
            Item {
                global,
                block,
                received: now,
                max_new_tokens: db.max_new_tokens,
                client_send_unix_ns: db.client_send_unix_ns,
                model_token_mask: db.model_token_mask,
                replaced: false,
            },
            tokens,
            now,
        );
        if queue.due(now, &p) {
            self.flush(now, out);
        }
    }

    /// Creates a session for a block with history and places it; `None` if refused.
    fn open_session(&mut self, stream: StreamId, db: &DraftBlock, out: &mut Out) -> Option<u64> {
        let sid = (db.block.session_id, db.block.round);
        if self.sessions.len() >= self.settings.admission.max_sessions_total {
            let msg = "the coordinator is at its session limit; retry later";
            self.session_error(out, stream, sid, ErrorCode::Overloaded, msg);
            return None;
        }
        let global = self.next_global;
        self.next_global += 1;
        let gamma = self
            .streams
            .get(&stream)
            .map_or(0, |l| self.gamma.start_gamma(&l.side)) as u32;
        self.sessions.insert(
            global,
            Session {
                stream,
                draft_id: db.block.session_id,
                node: None,
                synced: false,
                busy: false,
                gamma,
                // The first block's method; a later block naming another switches the session
                // (the controller's `on_block`: the latest method wins).
                g: SessionGamma::new(self.acceptance_prior(), db.method),
                drafted: 0,
                accepted: 0,
                last_server_ns: 0,
            },
        );
        self.by_key.insert((stream, db.block.session_id), global);
        if let Some(l) = self.streams.get_mut(&stream) {
            l.sessions.insert(db.block.session_id);
        }
        Some(global)
    }

    /// Places an unplaced session, or moves one off a draining node when another node can take
    /// it. Answers the block and returns false when no node can take the session.
    fn ensure_placed(
        &mut self,
        global: u64,
        sid: (u64, u64),
        stream: StreamId,
        out: &mut Out,
    ) -> bool {
        let current = self.sessions[&global].node.clone();
        let draining = current
            .as_deref()
            .and_then(|n| self.registry.get(n))
            .is_some_and(|v| v.admin == AdminState::Draining);
        if current.is_some() && !draining {
            return true;
        }
        let decision = self.place(current.as_deref());
        match (decision, current) {
            (Placement::Node(n), old) => {
                if let Some(old) = old {
                    if self.sessions[&global].synced {
                        self.release_on(&old, vec![global], out);
                    }
                    tracing::info!(session = global, from = %old, to = %n, "moving session off a draining node");
                }
                self.assign(global, Some(n));
                true
            }
            // A draining node keeps its sessions while nothing else can take them.
            (_, Some(_)) => true,
            (Placement::Full, None) => {
                if self.sessions[&global].g.rounds() == 0 {
                    self.drop_session(global, out);
                }
                let msg = "every verify node is at its session capacity; retry later";
                self.session_error(out, stream, sid, ErrorCode::Overloaded, msg);
                false
            }
            (Placement::NoNode, None) => {
                if self.sessions[&global].g.rounds() == 0 {
                    self.drop_session(global, out);
                }
                let msg = "no verify node can take the session right now; retry later";
                self.session_error(out, stream, sid, ErrorCode::Unavailable, msg);
                false
            }
        }
    }

    pub(super) fn send_probes(&mut self, now: Instant, out: &mut Out) {
        let l = self.settings.link;
        for (id, link) in &mut self.streams {
            // Probes never answered (a stuck peer) must not pile up.
            link.probes.retain(|_, (sent, _)| {
                now.saturating_duration_since(*sent) < l.probe_interval * 10
            });
            // One probe at a time: a peer that does not answer (it stopped reading) gets no
            // more, so it cannot make the coordinator buffer 64 KiB probes for it.
            if now < link.next_probe_at || !link.probes.is_empty() {
                continue;
            }
            link.probe_seq += 1;
            link.next_probe_at = now + l.probe_interval;
            let padded =
                l.padded_probe_every > 0 && link.probe_seq % u64::from(l.padded_probe_every) == 0;
            let padding = if padded {
                // Not zeros: a compressing link (or proxy) must not shrink a bandwidth probe.
                (0..l.probe_padding_bytes)
                    .map(|i| (i % 251) as u8 + 1)
                    .collect()
            } else {
                Vec::new()
            };
            link.probes.insert(link.probe_seq, (now, padding.len()));
            out.messages.push((
                *id,
                CoordinatorMessage::Probe(Probe {
                    probe_id: link.probe_seq,
                    padding,
                }),
            ));
        }
    }

    fn on_probe_reply(&mut self, stream: StreamId, r: ProbeReply, now: Instant) {
        let now_s = self.secs(now);
        let Some(link) = self.streams.get_mut(&stream) else {
            return;
        };
        let Some((sent, padding)) = link.probes.remove(&r.probe_id) else {
            return;
        };
        let elapsed = now.saturating_duration_since(sent).as_secs_f64();
        if padding == 0 {
            link.side.observe_probe(elapsed, now_s);
        } else {
            link.side
                .observe_padded_probe(padding as u64, elapsed, now_s);
        }
    }
}
