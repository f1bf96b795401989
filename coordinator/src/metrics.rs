//! Every Prometheus metric of the coordinator, in one place. Names are
//! `edgespec_coordinator_<what>_<unit>`; counters get `_total` from the encoder; labels are
//! low-cardinality (pool, error code), never a session id.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// Label of per-pool metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    /// "onprem" or "cloud".
    pub pool: String,
}

/// Label of per-error-code metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// Error code, e.g. "resync_needed".
    pub code: String,
}

/// Label of per-draft-node metrics (one series per connected draft node; removed when it
/// disconnects, so the cardinality is the fleet's size).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DraftNodeLabel {
    /// The draft node's id.
    pub draft_node: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Handles of all metrics (cheap to clone).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Verified rounds.
    pub rounds: Counter,
    /// Draft tokens sent to verification.
    pub drafted_tokens: Counter,
    /// Draft tokens accepted.
    pub accepted_tokens: Counter,
    /// Fleet-wide acceptance rate over the last rounds (decayed), in [0, 1].
    pub acceptance_rate: FloatGauge,
    /// Sessions per Verify call.
    pub batch_sessions: Histogram,
    /// Tokens per Verify call.
    pub batch_tokens: Histogram,
    /// Time a block waited in the coordinator before its batch was sent.
    pub queue_delay_seconds: Histogram,
    /// Duration of Verify calls as seen by the coordinator.
    pub verify_call_seconds: Histogram,
    /// γ sent back in verdicts.
    pub gamma: Histogram,
    /// Failed Verify calls (transport error or timeout).
    pub verify_failures: Counter,
    /// Per-session errors sent to draft nodes, by code.
    pub session_errors: Family<CodeLabel, Counter>,
    /// Open sessions per pool (unplaced sessions under "none").
    pub pool_sessions: Family<PoolLabel, Gauge>,
    /// Session capacity of schedulable nodes per pool.
    pub pool_capacity: Family<PoolLabel, Gauge>,
    /// Tokens queued or in flight per pool.
    pub pool_queued_tokens: Family<PoolLabel, Gauge>,
    /// Verify nodes up per pool.
    pub pool_verifiers_up: Family<PoolLabel, Gauge>,
    /// Desired number of cloud verify nodes (autoscaler signal).
    pub cloud_demand: Gauge,
    /// Connected draft streams.
    pub draft_streams: Gauge,
    /// The γ controller's RTT estimate per draft node's link.
    pub link_rtt_seconds: Family<DraftNodeLabel, FloatGauge>,
    /// The γ controller's bandwidth estimate per draft node's link.
    pub link_bandwidth: Family<DraftNodeLabel, FloatGauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("edgespec_coordinator");
        let m = Self {
            registry: Arc::new(Registry::default()),
            rounds: Counter::default(),
            drafted_tokens: Counter::default(),
            accepted_tokens: Counter::default(),
            acceptance_rate: FloatGauge::default(),
            batch_sessions: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            batch_tokens: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            queue_delay_seconds: Histogram::new(exponential_buckets(50e-6, 2.0, 16)),
            verify_call_seconds: Histogram::new(exponential_buckets(100e-6, 2.0, 18)),
            gamma: Histogram::new([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0, 32.0]),
            verify_failures: Counter::default(),
            session_errors: Family::default(),
            pool_sessions: Family::default(),
            pool_capacity: Family::default(),
            pool_queued_tokens: Family::default(),
            pool_verifiers_up: Family::default(),
            cloud_demand: Gauge::default(),
            draft_streams: Gauge::default(),
            link_rtt_seconds: Family::default(),
            link_bandwidth: Family::default(),
        };
        r.register("rounds", "Verified rounds", m.rounds.clone());
        r.register(
            "drafted_tokens",
            "Draft tokens sent to verification",
            m.drafted_tokens.clone(),
        );
        r.register(
            "accepted_tokens",
            "Draft tokens accepted",
            m.accepted_tokens.clone(),
        );
        r.register(
            "acceptance_rate",
            "Fleet-wide decayed per-token acceptance rate",
            m.acceptance_rate.clone(),
        );
        r.register(
            "batch_sessions",
            "Sessions per Verify call",
            m.batch_sessions.clone(),
        );
        r.register(
            "batch_tokens",
            "Tokens per Verify call",
            m.batch_tokens.clone(),
        );
        r.register(
            "queue_delay_seconds",
            "Time a block waited in the coordinator before its batch was sent",
            m.queue_delay_seconds.clone(),
        );
        r.register(
            "verify_call_seconds",
            "Duration of Verify calls as seen by the coordinator",
            m.verify_call_seconds.clone(),
        );
        r.register(
            "gamma",
            "Candidate length sent in verdicts",
            m.gamma.clone(),
        );
        r.register(
            "verify_failures",
            "Verify calls that failed (transport error or timeout)",
            m.verify_failures.clone(),
        );
        r.register(
            "session_errors",
            "Per-session errors sent to draft nodes",
            m.session_errors.clone(),
        );
        r.register(
            "pool_sessions",
            "Open sessions per pool",
            m.pool_sessions.clone(),
        );
        r.register(
            "pool_capacity_sessions",
            "Session capacity of schedulable verify nodes per pool",
            m.pool_capacity.clone(),
        );
        r.register(
            "pool_queued_tokens",
            "Tokens queued or in flight per pool",
            m.pool_queued_tokens.clone(),
        );
        r.register(
            "pool_verifiers_up",
            "Verify nodes up per pool",
            m.pool_verifiers_up.clone(),
        );
        r.register(
            "cloud_demand",
            "Desired number of cloud verify nodes for the current load (autoscaler signal)",
            m.cloud_demand.clone(),
        );
        r.register(
            "draft_streams",
            "Connected draft streams",
            m.draft_streams.clone(),
        );
        r.register(
            "link_rtt_seconds",
            "Round-trip time of each draft node's link, as the γ controller estimates it",
            m.link_rtt_seconds.clone(),
        );
        r.register(
            "link_bandwidth_bytes_per_second",
            "Bandwidth of each draft node's link, as the γ controller estimates it",
            m.link_bandwidth.clone(),
        );
        Self {
            registry: Arc::new(r),
            ..m
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry)
            .expect("writing to a String cannot fail");
        s
    }

    /// Publishes a draft node's link estimates.
    pub fn set_link(&self, draft_node: &str, rtt_s: f64, bandwidth_bytes_per_s: f64) {
        let label = DraftNodeLabel {
            draft_node: draft_node.to_string(),
        };
        self.link_rtt_seconds.get_or_create(&label).set(rtt_s);
        self.link_bandwidth
            .get_or_create(&label)
            .set(bandwidth_bytes_per_s);
    }

    /// Drops a disconnected draft node's link series.
    pub fn remove_link(&self, draft_node: &str) {
        let label = DraftNodeLabel {
            draft_node: draft_node.to_string(),
        };
        self.link_rtt_seconds.remove(&label);
        self.link_bandwidth.remove(&label);
    }

    /// Counts a per-session error.
    pub fn session_error(&self, code: edgespec_proto::domain::ErrorCode) {
        let code = code.label();
        self.session_errors
            .get_or_create(&CodeLabel { code: code.into() })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_series_come_and_go_with_their_draft_node() {
        let m = Metrics::new();
        m.set_link("edge-a", 0.05, 2.5e6);
        let text = m.encode();
        assert!(
            text.contains("edgespec_coordinator_link_rtt_seconds{draft_node=\"edge-a\"} 0.05"),
            "{text}"
        );
        assert!(
            text.contains(
                "edgespec_coordinator_link_bandwidth_bytes_per_second{draft_node=\"edge-a\"} 2500000"
            ),
            "{text}"
        );
        m.remove_link("edge-a");
        assert!(!m.encode().contains("edge-a"));
    }
}
