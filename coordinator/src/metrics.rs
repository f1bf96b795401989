//! Every Prometheus metric of the coordinator, in one place. Names are
//! `edgespec_coordinator_<what>_<unit>`; counters get `_total` from the encoder; labels are
//! low-cardinality (pool, error code, draft node, drafting method), never a session id.
//!
//! Acceptance and γ come twice: fleet totals without labels (`rounds`, `drafted_tokens`,
//! `accepted_tokens`, `acceptance_rate`, `gamma`, as before methods existed, so existing
//! queries and tests keep reading one series) and the same broken down by drafting method under
//! `method_*` with a `method` label (`model`, `lookup`, `hybrid`: the counters' and the
//! histogram's children exist from the start, so the label set is fixed at three; the decayed
//! `method_acceptance_rate` appears once its method has verified a drafted token).

use edgespec_specdec::DraftMethod;
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

/// Label of per-drafting-method metrics: one of [`DraftMethod::ALL`]'s labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    /// "model", "lookup" or "hybrid".
    pub method: String,
}

impl MethodLabel {
    fn of(method: DraftMethod) -> Self {
        Self {
            method: method.label().into(),
        }
    }
}

type FloatGauge = Gauge<f64, AtomicU64>;
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn gamma_histogram() -> Histogram {
    Histogram::new([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0, 32.0])
}

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
    /// Verified rounds by drafting method.
    pub method_rounds: Family<MethodLabel, Counter>,
    /// Draft tokens sent to verification by drafting method.
    pub method_drafted_tokens: Family<MethodLabel, Counter>,
    /// Draft tokens accepted by drafting method.
    pub method_accepted_tokens: Family<MethodLabel, Counter>,
    /// Decayed per-token acceptance by drafting method (a child once the method has data).
    pub method_acceptance_rate: Family<MethodLabel, FloatGauge>,
    /// γ sent back in verdicts by the session's drafting method.
    pub method_gamma: HistogramFamily<MethodLabel>,
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
            gamma: gamma_histogram(),
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
            method_rounds: Family::default(),
            method_drafted_tokens: Family::default(),
            method_accepted_tokens: Family::default(),
            method_acceptance_rate: Family::default(),
            method_gamma: Family::new_with_constructor(gamma_histogram),
        };
        for method in DraftMethod::ALL {
            let label = MethodLabel::of(method);
            let _ = m.method_rounds.get_or_create(&label);
            let _ = m.method_drafted_tokens.get_or_create(&label);
            let _ = m.method_accepted_tokens.get_or_create(&label);
            let _ = m.method_gamma.get_or_create(&label);
        }
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
        r.register(
            "method_rounds",
            "Verified rounds by drafting method",
            m.method_rounds.clone(),
        );
        r.register(
            "method_drafted_tokens",
            "Draft tokens sent to verification by drafting method",
            m.method_drafted_tokens.clone(),
        );
        r.register(
            "method_accepted_tokens",
            "Draft tokens accepted by drafting method",
            m.method_accepted_tokens.clone(),
        );
        r.register(
            "method_acceptance_rate",
            "Decayed per-token acceptance rate by drafting method",
            m.method_acceptance_rate.clone(),
        );
        r.register(
            "method_gamma",
            "Candidate length sent in verdicts by the session's drafting method",
            m.method_gamma.clone(),
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

    /// Counts a verified round of a `method` session, fleet-wide and by method.
    pub fn round(&self, method: DraftMethod, drafted: usize, accepted: usize) {
        let label = MethodLabel::of(method);
        self.rounds.inc();
        self.drafted_tokens.inc_by(drafted as u64);
        self.accepted_tokens.inc_by(accepted as u64);
        self.method_rounds.get_or_create(&label).inc();
        self.method_drafted_tokens
            .get_or_create(&label)
            .inc_by(drafted as u64);
        self.method_accepted_tokens
            .get_or_create(&label)
            .inc_by(accepted as u64);
    }

    /// Records the γ sent back to a `method` session, fleet-wide and by method.
    pub fn gamma_sent(&self, method: DraftMethod, gamma: u32) {
        self.gamma.observe(f64::from(gamma));
        self.method_gamma
            .get_or_create(&MethodLabel::of(method))
            .observe(f64::from(gamma));
    }

    /// Publishes a method's decayed acceptance.
    pub fn set_method_acceptance(&self, method: DraftMethod, rate: f64) {
        self.method_acceptance_rate
            .get_or_create(&MethodLabel::of(method))
            .set(rate);
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

    #[test]
    fn acceptance_and_gamma_are_counted_fleet_wide_and_by_method() {
        let m = Metrics::new();
        let text = m.encode();
        for method in ["model", "lookup", "hybrid"] {
            let series =
                format!("edgespec_coordinator_method_rounds_total{{method=\"{method}\"}} 0");
            assert!(text.contains(&series), "{text}");
        }
        m.round(DraftMethod::Lookup, 4, 3);
        m.gamma_sent(DraftMethod::Lookup, 6);
        let text = m.encode();
        for line in [
            "edgespec_coordinator_rounds_total 1",
            "edgespec_coordinator_drafted_tokens_total 4",
            "edgespec_coordinator_accepted_tokens_total 3",
            "edgespec_coordinator_method_rounds_total{method=\"lookup\"} 1",
            "edgespec_coordinator_method_drafted_tokens_total{method=\"lookup\"} 4",
            "edgespec_coordinator_method_accepted_tokens_total{method=\"lookup\"} 3",
            "edgespec_coordinator_method_rounds_total{method=\"model\"} 0",
            "edgespec_coordinator_method_gamma_sum{method=\"lookup\"} 6.0",
            "edgespec_coordinator_method_gamma_count{method=\"model\"} 0",
            "edgespec_coordinator_gamma_sum 6.0",
        ] {
            assert!(text.contains(line), "no {line}:\n{text}");
        }
    }
}
