//! Registry of verify nodes: registration, heartbeats, liveness, operator states and each node's
//! fitted verify-cost model. Soft state only; a restarted coordinator rebuilds it from the
//! nodes' re-registrations. Synchronous and clock-free (`now` is a parameter).

use crate::Error;
use edgespec_proto::domain::{HeartbeatAck, Load, NodeInfo};
use edgespec_specdec::{VerifyCost, VerifyCostModel};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub use edgespec_proto::domain::Pool;

/// Liveness of a verify node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Heartbeating and answering.
    Up,
    /// Missed heartbeats or failed a Verify call; must re-register to come back.
    Down,
    /// Heartbeating but stuck: work waited for `registry.stall_timeout` without progress. Takes
    /// no work; comes back up when its reported progress moves again.
    Quarantined,
}

/// Operator state of a verify node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Takes new sessions.
    Active,
    /// Takes no new sessions; existing ones stay.
    Cordoned,
    /// Takes no new sessions; existing ones move away at their next block when possible.
    Draining,
}

/// An operator action on a verify node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeAction {
    /// → [`AdminState::Draining`].
    Drain,
    /// → [`AdminState::Cordoned`].
    Cordon,
    /// → [`AdminState::Active`].
    Uncordon,
}

/// One verify node as the coordinator sees it.
#[derive(Debug, Clone)]
pub struct Verifier {
    /// Node id.
    pub id: String,
    /// Address the coordinator dials.
    pub addr: String,
    /// Pool.
    pub pool: Pool,
    /// Model fingerprint.
    pub fingerprint: String,
    /// Sessions the node can hold.
    pub capacity: usize,
    /// Most tokens the node runs in one forward (0: unknown).
    pub max_batch_tokens: usize,
    /// Device description.
    pub device: String,
    /// Liveness.
    pub health: Health,
    /// Operator state.
    pub admin: AdminState,
    /// Last registration or heartbeat.
    pub last_seen: Instant,
    /// Load as last reported by the node.
    pub reported: Load,
    /// Fitted forward cost.
    pub cost: VerifyCostModel,
    /// Registration generation: bumps on every (re-)registration so stale clients are replaced.
    pub generation: u64,
    /// The drain was the node's own (a `draining` heartbeat while it stopped), not an
    /// operator's: a later registration (the restarted process) makes it active again.
    pub self_drained: bool,
    /// When progress was last seen (an answered batch, or a changed `last_progress_unix_ms`),
    /// on this coordinator's clock.
    pub progress_at: Instant,
    /// Since when the node has reported queued tokens without progress (`None`: no queue).
    pub queued_since: Option<Instant>,
}

impl Verifier {
    /// Takes a load report received at `now`: a changed progress time is progress (only change
    /// counts, never the value against this clock). Returns true when it ended a quarantine.
    fn report(&mut self, load: Load, now: Instant) -> bool {
        let moved = load.last_progress_unix_ms != self.reported.last_progress_unix_ms;
        self.reported = load;
        if load.queued_tokens == 0 {
            self.queued_since = None;
        } else if self.queued_since.is_none() {
            self.queued_since = Some(now);
        }
        moved && self.progressed(now)
    }

    /// Progress seen at `now`; returns true when it ended a quarantine.
    fn progressed(&mut self, now: Instant) -> bool {
        self.progress_at = now;
        self.queued_since = self.queued_since.map(|_| now);
        let was = self.health == Health::Quarantined;
        if was {
            self.health = Health::Up;
        }
        was
    }

    /// Up and taking new sessions.
    pub fn schedulable(&self) -> bool {
        self.health == Health::Up && self.admin == AdminState::Active
    }

    /// The current verify-cost fit.
    pub fn verify_cost(&self) -> VerifyCost {
        self.cost.cost()
    }
}

/// What a registration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// True when the node was known before (a re-registration).
    pub was_known: bool,
}

/// All verify nodes.
#[derive(Debug, Default)]
pub struct Registry {
    nodes: BTreeMap<String, Verifier>,
    generations: u64,
}

impl Registry {
    /// Fingerprint of the verify fleet: that of the up nodes, else of any registered node;
    /// `None` before the first registration.
    pub fn fleet_fingerprint(&self) -> Option<&str> {
        self.nodes
            .values()
            .find(|n| n.health == Health::Up)
            .or_else(|| self.nodes.values().next())
            .map(|n| n.fingerprint.as_str())
    }

    /// Registers (or re-registers) a node (already validated at the edge). A node whose
    /// fingerprint differs from the fleet's is refused (unless it is the only node,
    /// re-registering with a new model).
    pub fn register(&mut self, info: &NodeInfo, now: Instant) -> Result<Registered, Error> {
        let others_fp = self
            .nodes
            .values()
            .filter(|n| n.id != info.node_id)
            .find(|n| n.health == Health::Up)
            .or_else(|| self.nodes.values().find(|n| n.id != info.node_id))
            .map(|n| n.fingerprint.clone());
        if let Some(fleet) = others_fp {
            if fleet != info.fingerprint {
                return Err(Error::VerifierMismatch {
                    node: info.node_id.clone(),
                    got: info.fingerprint.clone(),
                    fleet,
                });
            }
        }
        self.generations += 1;
        let previous = self.nodes.remove(&info.node_id);
        let was_known = previous.is_some();
        // A re-registering node keeps its operator state and its cost fit (same hardware).
        // A node that drained itself to stop comes back active when it registers again.
        // A quarantined node stays so until its progress moves (re-registering is no progress).
        // A mark of 0 is a process that never finished a forward: possibly a restarted one.
        let stuck = previous.as_ref().is_some_and(|p| {
            p.health == Health::Quarantined
                && p.reported.last_progress_unix_ms != 0
                && p.reported.last_progress_unix_ms == info.load.last_progress_unix_ms
        });
        let progress_at = previous.as_ref().map_or(now, |p| p.progress_at);
        let (admin, cost) = previous
            .map(|p| {
                let admin = if p.self_drained {
                    AdminState::Active
                } else {
                    p.admin
                };
                (admin, p.cost)
            })
            .unwrap_or((AdminState::Active, VerifyCostModel::default()));
        self.nodes.insert(
            info.node_id.clone(),
            Verifier {
                id: info.node_id.clone(),
                addr: info.advertise_addr.clone(),
                pool: info.pool,
                fingerprint: info.fingerprint.clone(),
                capacity: info.capacity_sessions as usize,
                max_batch_tokens: info.max_batch_tokens as usize,
                device: info.device.clone(),
                health: if stuck {
                    Health::Quarantined
                } else {
                    Health::Up
                },
                admin,
                last_seen: now,
                reported: info.load,
                cost,
                generation: self.generations,
                self_drained: false,
                progress_at: if stuck { progress_at } else { now },
                queued_since: None,
            },
        );
        Ok(Registered { was_known })
    }

    /// A heartbeat. Unknown and down nodes are told to register again; a quarantined node
    /// stays known (it is alive) and leaves quarantine when its progress moves.
    pub fn heartbeat(&mut self, node_id: &str, load: Option<Load>, now: Instant) -> HeartbeatAck {
        match self.nodes.get_mut(node_id) {
            Some(n) if n.health != Health::Down => {
                n.last_seen = now;
                if let Some(l) = load {
                    if n.report(l, now) {
                        tracing::info!(node = node_id, "verify node progresses again: back up");
                    }
                }
                HeartbeatAck {
                    known: true,
                    cordoned: n.admin != AdminState::Active,
                }
            }
            Some(n) => HeartbeatAck {
                known: false,
                cordoned: n.admin != AdminState::Active,
            },
            None => HeartbeatAck {
                known: false,
                cordoned: false,
            },
        }
    }

    /// The load a node sent with a batch's answer at `now` (the batch was answered: progress).
    pub fn batch_answered(&mut self, node_id: &str, load: Option<Load>, now: Instant) {
        if let Some(n) = self.nodes.get_mut(node_id) {
            if let Some(l) = load {
                n.report(l, now);
            }
            if n.progressed(now) {
                tracing::info!(node = node_id, "verify node answers again: back up");
            }
        }
    }

    /// Quarantines every up node whose work has waited longer than `timeout` since the later
    /// of its start and the node's last progress; returns their ids. A node's work starts at
    /// the oldest of its reported queue (first heartbeat that showed one) and `inflight(id)`,
    /// this coordinator's oldest batch in flight to it.
    pub fn quarantine_stalled(
        &mut self,
        now: Instant,
        timeout: Duration,
        inflight: impl Fn(&str) -> Option<Instant>,
    ) -> Vec<String> {
        let mut stalled = Vec::new();
        for n in self.nodes.values_mut() {
            if n.health != Health::Up {
                continue;
            }
            let work = match (n.queued_since, inflight(&n.id)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let Some(work) = work else { continue };
            if now.saturating_duration_since(work.max(n.progress_at)) > timeout {
                n.health = Health::Quarantined;
                stalled.push(n.id.clone());
            }
        }
        stalled
    }

    /// Forgets every down node not seen for `after`; returns their ids.
    pub fn forget(&mut self, now: Instant, after: Duration) -> Vec<String> {
        let gone: Vec<String> = self
            .nodes
            .values()
            .filter(|n| {
                n.health == Health::Down && now.saturating_duration_since(n.last_seen) > after
            })
            .map(|n| n.id.clone())
            .collect();
        for id in &gone {
            self.nodes.remove(id);
        }
        gone
    }

    /// Marks down every up (or quarantined) node not seen for `timeout`; returns the ids of
    /// those that were up.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> Vec<String> {
        let mut downed = Vec::new();
        for n in self.nodes.values_mut() {
            if n.health == Health::Quarantined
                && now.saturating_duration_since(n.last_seen) > timeout
            {
                n.health = Health::Down;
            }
            if n.health == Health::Up && now.saturating_duration_since(n.last_seen) > timeout {
                n.health = Health::Down;
                downed.push(n.id.clone());
            }
        }
        downed
    }

    /// Quarantines an up node (alive but stuck). Returns true if it was up.
    pub fn quarantine(&mut self, node_id: &str) -> bool {
        match self.nodes.get_mut(node_id) {
            Some(n) if n.health == Health::Up => {
                n.health = Health::Quarantined;
                true
            }
            _ => false,
        }
    }

    /// Marks a node down (failed call). Returns true if it was up.
    pub fn mark_down(&mut self, node_id: &str) -> bool {
        match self.nodes.get_mut(node_id) {
            Some(n) if n.health == Health::Up => {
                n.health = Health::Down;
                true
            }
            _ => false,
        }
    }

    /// Applies an operator action.
    pub fn apply(&mut self, node_id: &str, action: NodeAction) -> Result<AdminState, Error> {
        let n = self
            .nodes
            .get_mut(node_id)
            .ok_or_else(|| Error::UnknownVerifier(node_id.to_string()))?;
        n.admin = match action {
            NodeAction::Drain => AdminState::Draining,
            NodeAction::Cordon => AdminState::Cordoned,
            NodeAction::Uncordon => AdminState::Active,
        };
        Ok(n.admin)
    }

    /// A node by id.
    pub fn get(&self, node_id: &str) -> Option<&Verifier> {
        self.nodes.get(node_id)
    }

    /// A node by id, mutably.
    pub fn get_mut(&mut self, node_id: &str) -> Option<&mut Verifier> {
        self.nodes.get_mut(node_id)
    }

    /// All nodes, by id.
    pub fn iter(&self) -> impl Iterator<Item = &Verifier> {
        self.nodes.values()
    }

    /// Nodes up.
    pub fn up_count(&self) -> usize {
        self.nodes
            .values()
            .filter(|n| n.health == Health::Up)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use edgespec_proto::pb;

    fn wire_info(id: &str, pool: &str, fp: &str) -> pb::NodeInfo {
        pb::NodeInfo {
            node_id: id.into(),
            advertise_addr: format!("http://{id}:1"),
            pool: pool.into(),
            fingerprint: fp.into(),
            capacity_sessions: 4,
            ..Default::default()
        }
    }

    pub(crate) fn info(id: &str, pool: &str, fp: &str) -> NodeInfo {
        NodeInfo::try_from(wire_info(id, pool, fp)).unwrap()
    }

    #[test]
    fn fingerprint_mismatch_is_refused_and_fleet_is_tracked() {
        let now = Instant::now();
        let mut r = Registry::default();
        assert_eq!(r.fleet_fingerprint(), None);
        r.register(&info("a", "onprem", "fp1"), now).unwrap();
        assert_eq!(r.fleet_fingerprint(), Some("fp1"));
        let err = r.register(&info("b", "cloud", "fp2"), now).unwrap_err();
        assert!(err.to_string().contains("fp2") && err.to_string().contains("fp1"));
        assert!(NodeInfo::try_from(wire_info("b", "edge", "fp1"))
            .unwrap_err()
            .to_string()
            .contains("pool"));
        assert!(
            !r.register(&info("b", "cloud", "fp1"), now)
                .unwrap()
                .was_known
        );
        assert!(
            r.register(&info("b", "cloud", "fp1"), now)
                .unwrap()
                .was_known
        );
    }

    #[test]
    fn missed_heartbeats_mark_down_and_down_nodes_must_reregister() {
        let t0 = Instant::now();
        let mut r = Registry::default();
        r.register(&info("a", "onprem", "fp"), t0).unwrap();
        let t1 = t0 + Duration::from_secs(2);
        assert!(r.heartbeat("a", None, t1).known);
        assert!(r
            .expire(t1 + Duration::from_secs(2), Duration::from_secs(3))
            .is_empty());
        assert_eq!(
            r.expire(t1 + Duration::from_secs(4), Duration::from_secs(3)),
            vec!["a"]
        );
        assert!(!r.heartbeat("a", None, t1).known);
        assert!(!r.heartbeat("zzz", None, t1).known);
        r.register(&info("a", "onprem", "fp"), t1).unwrap();
        assert_eq!(r.up_count(), 1);
    }

    fn load(progress: u64, queued: u32) -> Load {
        Load {
            last_progress_unix_ms: progress,
            queued_tokens: queued,
            ..Load::default()
        }
    }

    #[test]
    fn work_without_progress_quarantines_until_progress_moves() {
        let t0 = Instant::now();
        let s = |secs| t0 + Duration::from_secs(secs);
        let stall = Duration::from_secs(10);
        let mut r = Registry::default();
        r.register(&info("a", "onprem", "fp"), t0).unwrap();
        r.register(&info("b", "onprem", "fp"), t0).unwrap();
        let none = |_: &str| None;
        // Idle for long: no work, no stall. Queued work appears and progresses.
        assert!(r.heartbeat("a", Some(load(1, 0)), s(30)).known);
        assert!(r.quarantine_stalled(s(60), stall, none).is_empty());
        r.heartbeat("a", Some(load(1, 8)), s(61));
        r.heartbeat("a", Some(load(2, 8)), s(70));
        assert!(r.quarantine_stalled(s(75), stall, none).is_empty());
        // The queue stays, progress does not move: quarantined after the timeout.
        r.heartbeat("a", Some(load(2, 8)), s(80));
        assert!(r.quarantine_stalled(s(80), stall, none).is_empty());
        assert_eq!(r.quarantine_stalled(s(81), stall, none), vec!["a"]);
        assert!(!r.get("a").unwrap().schedulable());
        // Still heartbeating (known), re-registering does not lift it; progress does.
        assert!(r.heartbeat("a", Some(load(2, 8)), s(82)).known);
        let mut same = info("a", "onprem", "fp");
        same.load = load(2, 0);
        r.register(&same, s(83)).unwrap();
        assert_eq!(r.get("a").unwrap().health, Health::Quarantined);
        r.heartbeat("a", Some(load(3, 0)), s(84));
        assert_eq!(r.get("a").unwrap().health, Health::Up);
        // Our own batch in flight with no answer counts as work; an answered one is progress.
        let sent = s(85);
        assert!(r
            .quarantine_stalled(s(94), stall, |n| (n == "b").then_some(sent))
            .is_empty());
        r.batch_answered("b", None, s(94));
        assert!(r
            .quarantine_stalled(s(100), stall, |n| (n == "b").then_some(sent))
            .is_empty());
        assert_eq!(
            r.quarantine_stalled(s(105), stall, |n| (n == "b").then_some(sent)),
            vec!["b"]
        );
        r.batch_answered("b", None, s(106));
        assert_eq!(r.get("b").unwrap().health, Health::Up);
    }

    #[test]
    fn down_nodes_are_forgotten() {
        let t0 = Instant::now();
        let mut r = Registry::default();
        r.register(&info("a", "onprem", "fp"), t0).unwrap();
        r.register(&info("b", "onprem", "fp"), t0).unwrap();
        let later = t0 + Duration::from_secs(100);
        r.heartbeat("b", None, later);
        assert_eq!(r.expire(later, Duration::from_secs(3)), vec!["a"]);
        assert!(r.forget(later, Duration::from_secs(600)).is_empty());
        let much_later = t0 + Duration::from_secs(701);
        r.heartbeat("b", None, much_later);
        assert_eq!(r.forget(much_later, Duration::from_secs(600)), vec!["a"]);
        assert!(r.get("a").is_none() && r.get("b").is_some());
    }

    #[test]
    fn operator_states_survive_reregistration() {
        let now = Instant::now();
        let mut r = Registry::default();
        r.register(&info("a", "onprem", "fp"), now).unwrap();
        assert_eq!(
            r.apply("a", NodeAction::Cordon).unwrap(),
            AdminState::Cordoned
        );
        assert!(r.heartbeat("a", None, now).cordoned);
        r.register(&info("a", "onprem", "fp"), now).unwrap();
        assert!(!r.get("a").unwrap().schedulable());
        r.apply("a", NodeAction::Uncordon).unwrap();
        assert!(r.get("a").unwrap().schedulable());
        assert!(r.apply("nope", NodeAction::Drain).is_err());
    }
}
