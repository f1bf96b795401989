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
}

impl Verifier {
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
                health: Health::Up,
                admin,
                last_seen: now,
                reported: info.load,
                cost,
                generation: self.generations,
                self_drained: false,
            },
        );
        Ok(Registered { was_known })
    }

    /// A heartbeat. Unknown and down nodes are told to register again.
    pub fn heartbeat(&mut self, node_id: &str, load: Option<Load>, now: Instant) -> HeartbeatAck {
        match self.nodes.get_mut(node_id) {
            Some(n) if n.health == Health::Up => {
                n.last_seen = now;
                if let Some(l) = load {
                    n.reported = l;
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

    /// Marks down every up node not seen for `timeout`; returns their ids.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> Vec<String> {
        let mut downed = Vec::new();
        for n in self.nodes.values_mut() {
            if n.health == Health::Up && now.saturating_duration_since(n.last_seen) > timeout {
                n.health = Health::Down;
                downed.push(n.id.clone());
            }
        }
        downed
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
