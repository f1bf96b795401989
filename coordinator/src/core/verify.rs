//! Verify side of the state: registration, heartbeats, sending batches, routing results back as
//! verdicts (with the next γ) and failover.

use super::{Core, Inflight, Item, Launch, Out};
use crate::placement::{self, Placement};
use crate::registry::{AdminState, Health, NodeAction};
use crate::Error;
use edgespec_proto::domain::{
    BatchReply, CoordinatorMessage, ErrorCode, HeartbeatAck, ItemResult, Load, NodeInfo, Outcome,
    Registration, Timings, Verdict, VerifyBatch,
};
use edgespec_proto::ProtocolError;
use edgespec_specdec::{DraftMethod, PoolContext};
use std::time::Instant;

impl Core {
    /// A verify node registers.
    pub fn register(&mut self, info: &NodeInfo, now: Instant) -> Result<Registration, Error> {
        let r = self.registry.register(info, now)?;
        tracing::info!(
            node = %info.node_id, pool = info.pool.as_str(), capacity = info.capacity_sessions,
            reregistered = r.was_known, "verify node registered"
        );
        // A re-registered node may have lost its state: everything placed there resyncs.
        if r.was_known {
            let placed: Vec<u64> = self
                .sessions
                .iter()
                .filter(|(_, s)| s.node.as_deref() == Some(info.node_id.as_str()))
                .map(|(g, _)| *g)
                .collect();
            for g in placed {
                if let Some(s) = self.sessions.get_mut(&g) {
                    s.synced = false;
                }
            }
        }
        self.update_gauges();
        Ok(Registration {
            coordinator_id: self.id.clone(),
            heartbeat_interval: self.settings.registry.heartbeat_interval,
        })
    }

    /// A verify node's heartbeat. `draining`: the node is stopping and asks to be drained
    /// (its sessions move away at their next blocks), as an operator's drain would.
    pub fn heartbeat(
        &mut self,
        node_id: &str,
        load: Option<Load>,
        draining: bool,
        now: Instant,
    ) -> HeartbeatAck {
        let r = self.registry.heartbeat(node_id, load, now);
        if r.known && draining {
            // An operator's drain or cordon stays the operator's (and outlives a restart).
            if let Some(v) = self.registry.get_mut(node_id) {
                if v.admin == AdminState::Active {
                    v.admin = AdminState::Draining;
                    v.self_drained = true;
                    tracing::info!(node = node_id, "verify node is stopping: draining it");
                    self.update_gauges();
                }
            }
        }
        r
    }

    /// Drain / cordon / uncordon.
    pub fn node_action(&mut self, node_id: &str, action: NodeAction) -> Result<AdminState, Error> {
        let state = self.registry.apply(node_id, action)?;
        tracing::info!(node = node_id, ?state, "operator changed verify node state");
        self.update_gauges();
        Ok(state)
    }

    /// Sends every batch that is due.
    pub fn flush(&mut self, now: Instant, out: &mut Out) {
        let p = self.batch_policy();
        let fleet = self
            .registry
            .fleet_fingerprint()
            .unwrap_or_default()
            .to_string();
        let due: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, q)| q.due(now, &p))
            .map(|(n, _)| n.clone())
            .collect();
        for node in due {
            let Some(v) = self.registry.get(&node) else {
                continue;
            };
            if v.health != Health::Up {
                continue;
            }
            let (addr, generation) = (v.addr.clone(), v.generation);
            let q = self.queues.get_mut(&node).expect("due queue exists");
            while q.due(now, &p) {
                let taken = q.take(now, p.max_tokens);
                for w in &taken.waited {
                    self.metrics.queue_delay_seconds.observe(w.as_secs_f64());
                }
                self.metrics
                    .batch_sessions
                    .observe(taken.items.len() as f64);
                self.metrics.batch_tokens.observe(taken.tokens as f64);
                let batch_id = self.next_batch;
                self.next_batch += 1;
                let request = VerifyBatch {
                    batch_id,
                    coordinator_id: self.id.clone(),
                    fingerprint: fleet.clone(),
                    items: taken.items.iter().map(|i| Ok(i.block.clone())).collect(),
                };
                tracing::debug!(node = %node, batch_id, sessions = taken.items.len(), tokens = taken.tokens, "sending batch");
                self.inflight.insert(
                    batch_id,
                    Inflight {
                        node: node.clone(),
                        generation,
                        tokens: taken.tokens,
                        items: taken.items,
                        sent_at: now,
                    },
                );
                out.launches.push(Launch {
                    batch_id,
                    node_id: node.clone(),
                    addr: addr.clone(),
                    request,
                });
            }
        }
    }

    /// A Verify call returned (`Err`: transport failure or timeout, described).
    pub fn batch_done(
        &mut self,
        batch_id: u64,
        result: Result<BatchReply, String>,
        now: Instant,
        out: &mut Out,
    ) {
        let Some(b) = self.inflight.remove(&batch_id) else {
            return;
        };
        if let Some(q) = self.queues.get_mut(&b.node) {
            q.finish(b.tokens);
        }
        self.metrics
            .verify_call_seconds
            .observe(now.saturating_duration_since(b.sent_at).as_secs_f64());
        let resp = match result {
            Ok(r) => r,
            Err(why) => {
                self.metrics.verify_failures.inc();
                // A failure of a previous registration of the node says nothing about the new one.
                let same = self
                    .registry
                    .get(&b.node)
                    .is_some_and(|v| v.generation == b.generation);
                // Still heartbeating, yet no progress since the call left: the node is stuck, not
                // gone. Quarantined, it stays known (no re-registration, no fresh work) until its
                // progress moves; marked down, it would register again and take new work.
                let stuck = self.registry.get(&b.node).is_some_and(|v| {
                    v.last_seen > b.sent_at && v.progress_at <= b.sent_at && v.health == Health::Up
                });
                if same && stuck {
                    self.registry.quarantine(&b.node);
                    tracing::warn!(node = %b.node, reason = %why, "verify node alive but stuck: quarantined; its sessions will resync");
                    self.evacuate(&b.node, out);
                } else if same {
                    self.node_down(&b.node, &why, out);
                }
                for item in b.items {
                    self.answer_resync(
                        item,
                        "verify node failed; resend the block with history",
                        out,
                    );
                }
                self.flush(now, out);
                return;
            }
        };
        self.registry.batch_answered(&b.node, resp.load, now);
        // A resync prefill is compute-bound (tens of ms per token on a CPU) while a verify block
        // is memory-bound (nearly flat in its length); one straight line through both would
        // price every drafted token like a prompt token, so prefill forwards are not fitted.
        let fit = !b.items.iter().any(|i| i.block.history.is_some());
        let mut seen = Vec::new();
        let mut results = resp.results.into_iter();
        for item in b.items {
            let r = results
                .next()
                .filter(|r| r.as_ref().map_or(true, |r| r.session_id == item.global));
            if let Some(Ok(ItemResult { timings: t, .. })) = &r {
                let key = (t.forward_ns, t.batch_tokens);
                if fit && t.batch_tokens > 0 && !seen.contains(&key) {
                    seen.push(key);
                    if let Some(v) = self.registry.get_mut(&b.node) {
                        v.cost
                            .observe(t.batch_tokens as usize, t.forward_ns as f64 * 1e-9);
                    }
                }
            }
            self.route_result(&b.node, item, r, now, out);
        }
        self.flush(now, out);
    }

    /// Answers one block of a returned batch: a verdict with the next γ, or the error the
    /// draft node gets instead.
    fn route_result(
        &mut self,
        node: &str,
        item: Item,
        result: Option<Result<ItemResult, ProtocolError>>,
        now: Instant,
        out: &mut Out,
    ) {
        let Some(s) = self.sessions.get_mut(&item.global) else {
            return; // closed while in flight
        };
        s.busy = false;
        let (stream, draft_id, round) = (s.stream, s.draft_id, item.block.round);
        let (outcome, timings) = match read_result(node, &item, result) {
            Ok(r) => r,
            Err((ErrorCode::Overloaded, message)) if item.block.history.is_some() => {
                return self.refused_by_node(node, item, message, now, out);
            }
            Err((code, message)) => {
                if code == ErrorCode::ResyncNeeded {
                    s.synced = false;
                }
                return self.session_error(out, stream, (draft_id, round), code, message);
            }
        };
        let drafted = item.block.draft_tokens.len();
        self.record_round(
            item.global,
            (drafted, item.model_token_mask),
            outcome.accepted,
            now,
        );
        let remaining = item
            .max_new_tokens
            .saturating_sub(outcome.accepted as u32 + 1);
        let (gamma, next_method) = self.next_plan(item.global, node, remaining);
        if let Some(link) = self.streams.get_mut(&stream) {
            link.granted_gamma = link.granted_gamma.max(gamma as usize);
        }
        let s = self.sessions.get_mut(&item.global).expect("session exists");
        s.gamma = gamma;
        s.g.set_next_source(next_method);
        let in_coordinator = now.saturating_duration_since(item.received).as_nanos() as u64;
        s.last_server_ns = in_coordinator.max(1);
        let method = s.g.method();
        if method == DraftMethod::Hybrid {
            tracing::debug!(
                session = item.global,
                accepted = outcome.accepted,
                drafted,
                gamma,
                next = %next_method,
                alpha = s.g.alpha(),
                model_alpha = s.g.model_alpha(),
                lookup_alpha = s.g.lookup_alpha(),
                "hybrid plan"
            );
        }
        self.metrics.gamma_sent(method, gamma);
        if let Some(link) = self.streams.get_mut(&stream) {
            link.by_method[method.index()].gamma_sum += u64::from(gamma);
        }
        let verdict = Verdict {
            session_id: draft_id,
            round,
            accepted: outcome.accepted,
            next_token: outcome.next_token,
            committed_len: outcome.committed_len,
            next_gamma: gamma,
            client_send_unix_ns: item.client_send_unix_ns,
            coordinator_ns: in_coordinator.saturating_sub(timings.total_ns),
            verify: timings,
            verifier_id: node.to_string(),
            next_method: (method == DraftMethod::Hybrid).then_some(next_method),
        };
        out.messages
            .push((stream, CoordinatorMessage::Verdict(verdict)));
    }

    /// A node refused to take a session (OVERLOADED: it is the authority on its capacity, which
    /// other coordinators share). The session leaves it; its block goes to another node with room
    /// by every count, once, or the refusal goes to the draft node (a session that never had a
    /// round is dropped, as any refused open).
    fn refused_by_node(
        &mut self,
        node: &str,
        mut item: Item,
        message: String,
        now: Instant,
        out: &mut Out,
    ) {
        let global = item.global;
        self.assign(global, None);
        let elsewhere = if item.replaced {
            Placement::Full
        } else {
            placement::place_with_room(&self.candidates(), &self.burst_policy(), Some(node))
        };
        if let Placement::Node(other) = elsewhere {
            tracing::info!(session = global, from = node, to = %other, "verify node refused the session: placing it elsewhere");
            self.assign(global, Some(other.clone()));
            let s = self.sessions.get_mut(&global).expect("session exists");
            s.busy = true;
            s.synced = true;
            item.replaced = true;
            let tokens = item.block.forward_tokens();
            self.queues
                .entry(other)
                .or_default()
                .push(item, tokens, now);
            return;
        }
        let s = &self.sessions[&global];
        let (stream, draft_id, fresh) = (s.stream, s.draft_id, s.g.rounds() == 0);
        if fresh {
            self.drop_session(global, out);
        }
        let message = format!("verify node {node} refused the session: {message}");
        self.session_error(
            out,
            stream,
            (draft_id, item.block.round),
            ErrorCode::Overloaded,
            message,
        );
    }

    /// Counts a verified round of `drafted` tokens (and which of them a hybrid block's model
    /// drafted): the session's γ controller state, its stats, its stream's stats for its drafting
    /// method, the metrics and the fleet's acceptance (also by method).
    fn record_round(
        &mut self,
        global: u64,
        (drafted, model_mask): (usize, u64),
        accepted: usize,
        now: Instant,
    ) {
        let now_s = self.secs(now);
        let Some(s) = self.sessions.get_mut(&global) else {
            return;
        };
        // `s.gamma` is still the γ granted for this block (the next one is planned after).
        let granted = s.gamma as usize;
        self.gamma
            .on_verdict(&mut s.g, granted, drafted, accepted, model_mask, now_s);
        s.drafted += drafted as u64;
        s.accepted += accepted as u64;
        let method = s.g.method();
        if let Some(link) = self.streams.get_mut(&s.stream) {
            let m = &mut link.by_method[method.index()];
            m.rounds += 1;
            m.drafted += drafted as u64;
            m.accepted += accepted as u64;
        }
        self.metrics.round(method, drafted, accepted);
        if drafted > 0 {
            // Positions the target really tested: the accepted ones plus the first rejection.
            let tested = if accepted < drafted {
                accepted + 1
            } else {
                drafted
            };
            let rate = accepted as f64 / tested as f64;
            self.fleet_alpha
                .observe_weighted(rate, tested as f64, now_s);
            self.method_alpha[method.index()].observe_weighted(rate, tested as f64, now_s);
        }
    }

    /// The controller's γ and drafting method for a session's next block on `node`.
    fn next_plan(&self, global: u64, node: &str, remaining: u32) -> (u32, DraftMethod) {
        let Some(s) = self.sessions.get(&global) else {
            return (0, DraftMethod::Model);
        };
        let Some(link) = self.streams.get(&s.stream) else {
            return (0, s.g.method());
        };
        let v = self.registry.get(node);
        // The node's busy time that this session itself causes is not load against it: only the
        // other sessions' share prices γ up (a single stream keeps its node busy by itself).
        let on_node = self
            .node_sessions
            .get(node)
            .copied()
            .unwrap_or(0)
            .max(v.map_or(0, |v| v.reported.active_sessions as usize))
            .max(1) as f64;
        let utilisation =
            v.map_or(0.0, |v| f64::from(v.reported.busy_fraction)) * (1.0 - 1.0 / on_node);
        let cost = v.map(|v| v.verify_cost()).unwrap_or_default();
        let pool = PoolContext {
            queue_s: self.predicted_delay(node).as_secs_f64()
                + self.policy.batch_window.as_secs_f64() / 2.0,
            verify: cost.marginal(utilisation),
        };
        let (gamma, method) = self.gamma.plan_next(&link.side, &s.g, pool, remaining);
        (gamma as u32, method)
    }
}

/// What a verify node's result for `item` says: the checked outcome and timings, or the code and
/// message the draft node gets instead (a missing, unreadable or inconsistent result makes the
/// session resync; the node's own per-session error is passed on).
fn read_result(
    node: &str,
    item: &Item,
    result: Option<Result<ItemResult, ProtocolError>>,
) -> Result<(Outcome, Timings), (ErrorCode, String)> {
    let resync = |why: &str| (ErrorCode::ResyncNeeded, why.to_string());
    let r = match result {
        None => {
            return Err(resync(
                "the verify node returned no result for the block; resend it with history",
            ))
        }
        Some(Err(e)) => {
            tracing::warn!(node, error = %e, "verify node returned an unreadable result");
            return Err(resync(
                "the verify node returned an unreadable result; resend the block with history",
            ));
        }
        Some(Ok(r)) => r,
    };
    let outcome = r.result.map_err(|e| (e.code, e.message))?;
    if let Err(e) = outcome.check_against(&item.block) {
        tracing::warn!(node, error = %e, "verify node returned an inconsistent outcome");
        return Err(resync(
            "the verify node returned an inconsistent verdict; resend the block with history",
        ));
    }
    Ok((outcome, r.timings))
}
