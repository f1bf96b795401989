//! Where a new (or moving) session goes: a pure function over a snapshot of the candidate
//! nodes. Prefer the `onprem` pool; burst to `cloud` when the on-prem pool's predicted queue
//! delay or utilisation passes the policy's thresholds; spread by load within a pool.

use crate::registry::Pool;
use std::time::Duration;

/// One schedulable node (up, active, matching fingerprint) as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Node id.
    pub id: String,
    /// Pool.
    pub pool: Pool,
    /// Sessions placed on it.
    pub sessions: usize,
    /// Sessions it may hold (its capacity, capped by admission limits).
    pub capacity: usize,
    /// Predicted wait of a new block before its forward starts.
    pub predicted_delay: Duration,
}

impl Candidate {
    fn has_room(&self) -> bool {
        self.sessions < self.capacity
    }

    fn utilisation(&self) -> f64 {
        self.sessions as f64 / self.capacity.max(1) as f64
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
    let sessions: usize = onprem.iter().map(|c| c.sessions).sum();
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
/// draining session leaves).
pub fn place(candidates: &[Candidate], burst: &BurstPolicy, avoid: Option<&str>) -> Placement {
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
            capacity,
            predicted_delay: Duration::from_millis(delay_ms),
        }
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
