//! Where a new (or moving) session goes: a pure function over a snapshot of the candidate
//! nodes. Prefer the `onprem` pool; burst to `cloud` when the on-prem pool's predicted queue
//! delay or utilisation passes the policy's thresholds; spread by load within a pool.
//!
//! A node's load is the larger of this coordinator's own count and what the node reports for
//! all coordinators (its recently active sessions, its KV against the budget), so replicas that
//! share a node do not overcommit it. The report may be stale (a node reports after its work),
//! so when no node has room by it, a node with room by this coordinator's own count is still
//! tried: the node itself decides, and refuses with OVERLOADED what it cannot hold.

use crate::registry::Pool;
use std::time::Duration;

/// One schedulable node (up, active, matching fingerprint) as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Node id.
    pub id: String,
    /// Pool.
    pub pool: Pool,
    /// Sessions this coordinator placed on it.
    pub sessions: usize,
    /// Recently active sessions the node reports, every coordinator's together.
    pub reported_sessions: usize,
    /// The node reports its KV at or over its budget.
    pub kv_full: bool,
    /// Sessions it may hold (its capacity, capped by admission limits).
    pub capacity: usize,
    /// Predicted wait of a new block before its forward starts.
    pub predicted_delay: Duration,
}

impl Candidate {
    /// Sessions on the node as far as this coordinator knows.
    fn load(&self) -> usize {
        self.sessions.max(self.reported_sessions)
    }

    fn has_room(&self) -> bool {
        self.load() < self.capacity && !self.kv_full
    }

    /// Room by this coordinator's own count only (the node decides).
    fn may_try(&self) -> bool {
        self.sessions < self.capacity
    }

    fn utilisation(&self) -> f64 {
        let kv = if self.kv_full { 1.0 } else { 0.0 };
        (self.load() as f64 / self.capacity.max(1) as f64).max(kv)
    }
}

/// Burst thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BurstPolicy {
    /// Predicted on-prem queue delay that triggers a burst.
    pub queue_delay: Duration,
    /// On-prem utilisation that triggers a burst.
    pub utilization: f64,
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Place on this node.
    Node(String),
    /// Nodes exist but all are full: overload.
    Full,
    /// No schedulable node at all.
    NoNode,
}

/// Whether the on-prem pool is past a burst threshold (or has no room left).
pub fn onprem_saturated(candidates: &[Candidate], burst: &BurstPolicy) -> bool {
    let onprem: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.pool == Pool::Onprem)
        .collect();
    if onprem.is_empty() {
        return true;
    }
    let sessions: usize = onprem.iter().map(|c| c.load()).sum();
    let capacity: usize = onprem.iter().map(|c| c.capacity).sum();
    let utilisation = sessions as f64 / capacity.max(1) as f64;
    let best_delay = onprem
        .iter()
        .filter(|c| c.has_room())
        .map(|c| c.predicted_delay)
        .min();
    match best_delay {
        None => true,
        Some(d) => d > burst.queue_delay || utilisation >= burst.utilization,
    }
}

/// Picks a node for a new session among `candidates` (excluding `avoid`, e.g. the node a
/// draining session leaves): one with room by every count, else one with room by this
/// coordinator's own count (on-prem first), which then decides itself.
pub fn place(candidates: &[Candidate], burst: &BurstPolicy, avoid: Option<&str>) -> Placement {
    match place_with_room(candidates, burst, avoid) {
        Placement::Full => {}
        decided => return decided,
    }
    candidates
        .iter()
        .filter(|c| Some(c.id.as_str()) != avoid && c.may_try())
        .min_by(|a, b| {
            (a.pool != Pool::Onprem, a.sessions, &a.id).cmp(&(
                b.pool != Pool::Onprem,
                b.sessions,
                &b.id,
            ))
        })
        .map_or(Placement::Full, |c| Placement::Node(c.id.clone()))
}

/// Like [`place`], but only on a node with room by the node's own report too.
pub fn place_with_room(
    candidates: &[Candidate],
    burst: &BurstPolicy,
    avoid: Option<&str>,
) -> Placement {
    let usable: Vec<Candidate> = candidates
        .iter()
        .filter(|c| Some(c.id.as_str()) != avoid)
        .cloned()
        .collect();
    if usable.is_empty() {
        return Placement::NoNode;
    }
    let cloud_room = usable.iter().any(|c| c.pool == Pool::Cloud && c.has_room());
    let pool = if cloud_room && onprem_saturated(&usable, burst) {
        Pool::Cloud
    } else {
        Pool::Onprem
    };
    let delay_scale = burst.queue_delay.as_secs_f64().max(1e-3);
    let score = |c: &Candidate| c.utilisation() + c.predicted_delay.as_secs_f64() / delay_scale;
    usable
        .iter()
        .filter(|c| c.pool == pool && c.has_room())
        .min_by(|a, b| score(a).total_cmp(&score(b)).then_with(|| a.id.cmp(&b.id)))
        .map_or(Placement::Full, |c| Placement::Node(c.id.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(id: &str, pool: Pool, sessions: usize, capacity: usize, delay_ms: u64) -> Candidate {
        Candidate {
            id: id.into(),
            pool,
            sessions,
            reported_sessions: 0,
            kv_full: false,
            capacity,
            predicted_delay: Duration::from_millis(delay_ms),
        }
    }

    #[test]
    fn the_nodes_own_report_counts_and_a_stale_report_still_lets_the_node_decide() {
        // Another coordinator filled onprem-1: its report says so, our own count does not.
        let mut full = cand("onprem-1", Pool::Onprem, 0, 4, 0);
        full.reported_sessions = 4;
        let mut kv = cand("onprem-2", Pool::Onprem, 0, 4, 0);
        kv.kv_full = true;
        let cloud = cand("cloud-1", Pool::Cloud, 1, 4, 0);
        let c = [full.clone(), kv.clone(), cloud];
        assert_eq!(place(&c, &BURST, None), Placement::Node("cloud-1".into()));
        assert_eq!(
            place_with_room(&[full.clone(), kv.clone()], &BURST, None),
            Placement::Full
        );
        // Nothing has room by the reports: the least loaded by our own count is tried.
        full.sessions = 1;
        assert_eq!(
            place(&[full.clone(), kv], &BURST, None),
            Placement::Node("onprem-2".into())
        );
        full.sessions = 4;
        assert_eq!(place(&[full], &BURST, None), Placement::Full);
    }

    const BURST: BurstPolicy = BurstPolicy {
        queue_delay: Duration::from_millis(50),
        utilization: 0.8,
    };

    #[test]
    fn prefers_onprem_and_spreads_by_load() {
        let c = [
            cand("cloud-1", Pool::Cloud, 0, 10, 0),
            cand("onprem-1", Pool::Onprem, 3, 10, 0),
            cand("onprem-2", Pool::Onprem, 1, 10, 0),
        ];
        assert_eq!(place(&c, &BURST, None), Placement::Node("onprem-2".into()));
        assert_eq!(
            place(&c, &BURST, Some("onprem-2")),
            Placement::Node("onprem-1".into())
        );
    }

    #[test]
    fn bursts_to_cloud_on_delay_or_utilisation() {
        let by_delay = [
            cand("cloud-1", Pool::Cloud, 5, 10, 0),
            cand("onprem-1", Pool::Onprem, 1, 10, 80),
        ];
        assert_eq!(
            place(&by_delay, &BURST, None),
            Placement::Node("cloud-1".into())
        );
        let by_util = [
            cand("cloud-1", Pool::Cloud, 0, 10, 0),
            cand("onprem-1", Pool::Onprem, 8, 10, 0),
        ];
        assert_eq!(
            place(&by_util, &BURST, None),
            Placement::Node("cloud-1".into())
        );
        let below = [
            cand("cloud-1", Pool::Cloud, 0, 10, 0),
            cand("onprem-1", Pool::Onprem, 7, 10, 10),
        ];
        assert_eq!(
            place(&below, &BURST, None),
            Placement::Node("onprem-1".into())
        );
    }

    #[test]
    fn saturated_onprem_without_cloud_still_places_onprem_until_full() {
        let c = [cand("onprem-1", Pool::Onprem, 9, 10, 500)];
        assert_eq!(place(&c, &BURST, None), Placement::Node("onprem-1".into()));
        let full = [cand("onprem-1", Pool::Onprem, 10, 10, 0)];
        assert_eq!(place(&full, &BURST, None), Placement::Full);
        let both_full = [
            cand("onprem-1", Pool::Onprem, 10, 10, 0),
            cand("cloud-1", Pool::Cloud, 4, 4, 0),
        ];
        assert_eq!(place(&both_full, &BURST, None), Placement::Full);
        assert_eq!(place(&[], &BURST, None), Placement::NoNode);
        assert_eq!(place(&c, &BURST, Some("onprem-1")), Placement::NoNode);
    }

    #[test]
    fn cloud_only_fleet_uses_cloud() {
        let c = [cand("cloud-1", Pool::Cloud, 0, 10, 0)];
        assert_eq!(place(&c, &BURST, None), Placement::Node("cloud-1".into()));
    }
}
