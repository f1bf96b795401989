//! The verify node's metrics, one closed set of names (`edgespec_verify_<what>_<unit>`;
//! prometheus-client adds `_total` to counters). Labels are low-cardinality: never a session id.
//! Acceptance counters follow vLLM's naming: drafted tokens, accepted tokens, rounds.

use prometheus_client::encoding::text::{encode, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Per-error-code label set.
pub type CodeLabel = Vec<(&'static str, &'static str)>;

/// Every metric of the verify node.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Batched forwards run (`edgespec_verify_forwards_total`).
    pub forwards: Counter,
    /// Rows (tokens) across those forwards (`edgespec_verify_forward_rows_total`).
    pub forward_rows: Counter,
    /// Forward durations (`edgespec_verify_forward_seconds`).
    pub forward_seconds: Histogram,
    /// Verdicts given (`edgespec_verify_rounds_total`).
    pub rounds: Counter,
    /// Draft tokens verified (`edgespec_verify_drafted_tokens_total`).
    pub drafted_tokens: Counter,
    /// Draft tokens accepted (`edgespec_verify_accepted_tokens_total`).
    pub accepted_tokens: Counter,
    /// Tokens committed by verdicts: accepted + one per round (`edgespec_verify_emitted_tokens_total`).
    pub emitted_tokens: Counter,
    /// Per-item errors by code (`edgespec_verify_session_errors_total{code}`).
    pub session_errors: Family<CodeLabel, Counter>,
    /// Idle sessions evicted for capacity or KV budget (`edgespec_verify_evictions_total`).
    pub evictions: Counter,
    /// Sessions with live KV state, every coordinator's (`edgespec_verify_sessions`).
    pub sessions: Gauge,
    /// Bytes held by KV caches (`edgespec_verify_kv_bytes`).
    pub kv_bytes: Gauge,
    /// The KV budget (`edgespec_verify_kv_budget_bytes`).
    pub kv_budget_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = |registry: &mut Registry, name: &str, help: &str, c: &Counter| {
            registry.register(name, help, c.clone());
        };
        let forwards = Counter::default();
        let forward_rows = Counter::default();
        let rounds = Counter::default();
        let drafted_tokens = Counter::default();
        let accepted_tokens = Counter::default();
        let emitted_tokens = Counter::default();
        let evictions = Counter::default();
        let session_errors = Family::<CodeLabel, Counter>::default();
        let forward_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let (sessions, kv_bytes, kv_budget_bytes) =
            (Gauge::default(), Gauge::default(), Gauge::default());
        registry.register(
            "edgespec_verify_sessions",
            "Sessions with live KV state (all coordinators')",
            sessions.clone(),
        );
        registry.register(
            "edgespec_verify_kv_bytes",
            "Bytes held by KV caches",
            kv_bytes.clone(),
        );
        registry.register(
            "edgespec_verify_kv_budget_bytes",
            "The KV memory budget",
            kv_budget_bytes.clone(),
        );
        m(
            &mut registry,
            "edgespec_verify_forwards",
            "Batched forwards run",
            &forwards,
        );
        m(
            &mut registry,
            "edgespec_verify_forward_rows",
            "Token rows across batched forwards",
            &forward_rows,
        );
        m(
            &mut registry,
            "edgespec_verify_rounds",
            "Verdicts given",
            &rounds,
        );
        m(
            &mut registry,
            "edgespec_verify_drafted_tokens",
            "Draft tokens verified",
            &drafted_tokens,
        );
        m(
            &mut registry,
            "edgespec_verify_accepted_tokens",
            "Draft tokens accepted",
            &accepted_tokens,
        );
        m(
            &mut registry,
            "edgespec_verify_emitted_tokens",
            "Tokens committed by verdicts (accepted plus one per round)",
            &emitted_tokens,
        );
        m(
            &mut registry,
            "edgespec_verify_evictions",
            "Idle sessions evicted for capacity or the KV budget",
            &evictions,
        );
        registry.register(
            "edgespec_verify_session_errors",
            "Per-session errors by code",
            session_errors.clone(),
        );
        registry.register(
            "edgespec_verify_forward_seconds",
            "Duration of batched forwards",
            forward_seconds.clone(),
        );
        Self {
            registry,
            forwards,
            forward_rows,
            forward_seconds,
            rounds,
            drafted_tokens,
            accepted_tokens,
            emitted_tokens,
            session_errors,
            evictions,
            sessions,
            kv_bytes,
            kv_budget_bytes,
        }
    }

    /// Publishes the load the node reports to coordinators.
    pub fn set_load(&self, load: &edgespec_proto::domain::Load) {
        self.sessions.set(i64::from(load.active_sessions));
        self.kv_bytes
            .set(i64::try_from(load.kv_bytes).unwrap_or(i64::MAX));
        self.kv_budget_bytes
            .set(i64::try_from(load.kv_budget_bytes).unwrap_or(i64::MAX));
    }

    /// Counts one per-item error.
    pub fn session_error(&self, code: &'static str) {
        self.session_errors
            .get_or_create(&vec![("code", code)])
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The node's families in its `/metrics` exposition (next to the runtime's TLS gauge).
impl edgespec_runtime::ops::Families for Metrics {
    fn encode_families(&self, out: &mut String) -> std::fmt::Result {
        encode_registry(out, &self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_convention() {
        let m = Metrics::new();
        m.forwards.inc();
        m.session_error("resync_needed");
        m.forward_seconds.observe(0.01);
        let text = m.encode();
        for name in [
            "edgespec_verify_forwards_total 1",
            "edgespec_verify_session_errors_total{code=\"resync_needed\"} 1",
            "edgespec_verify_forward_seconds_count 1",
            "edgespec_verify_accepted_tokens_total 0",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }

    #[test]
    fn the_reported_load_is_exported() {
        let m = Metrics::new();
        m.set_load(&edgespec_proto::domain::Load {
            active_sessions: 3,
            kv_bytes: 4096,
            kv_budget_bytes: 1 << 20,
            ..Default::default()
        });
        let text = m.encode();
        for line in [
            "edgespec_verify_sessions 3",
            "edgespec_verify_kv_bytes 4096",
            "edgespec_verify_kv_budget_bytes 1048576",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}
