//! Every metric the draft node exports, in one place (`edgespec_draft_*`; counters get the
//! `_total` suffix from the encoder). Labels are low-cardinality: never a session id or text.

use std::sync::Arc;
use std::time::Duration;

use edgespec_runtime::ops::{Exposition, Families};
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use edgespec_specdec::DraftMethod;

type Labels = Vec<(&'static str, &'static str)>;
type KindLabel = Vec<(&'static str, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn gamma_histogram() -> Histogram {
    // γ of 0, 1, 2, 4, … 64 (the protocol's ceiling).
    Histogram::new([0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])
}

/// Draft tokens sent, accepted and verdicts applied, broken down by one label.
struct RoundCounts<L> {
    drafted: Family<L, Counter>,
    accepted: Family<L, Counter>,
    rounds: Family<L, Counter>,
}

impl<L> RoundCounts<L>
where
    L: prometheus_client::encoding::EncodeLabelSet
        + Clone
        + std::hash::Hash
        + Eq
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    /// Registers `{p}{by}_drafted_tokens`, `…_accepted_tokens` and `…_rounds`, each help text
    /// ending in `what` (", by …").
    fn register(r: &mut Registry, p: &str, by: &str, what: &str) -> Self {
        let c = RoundCounts {
            drafted: Family::default(),
            accepted: Family::default(),
            rounds: Family::default(),
        };
        r.register(
            format!("{p}{by}_drafted_tokens"),
            format!("Draft tokens sent for verification{what}"),
            c.drafted.clone(),
        );
        r.register(
            format!("{p}{by}_accepted_tokens"),
            format!("Draft tokens accepted{what}"),
            c.accepted.clone(),
        );
        r.register(
            format!("{p}{by}_rounds"),
            format!("Verdicts applied{what}"),
            c.rounds.clone(),
        );
        c
    }

    /// Creates `label`'s series at zero (for a closed label set that dashboards see from the
    /// start).
    fn declare(&self, label: &L) {
        self.drafted.get_or_create(label).inc_by(0);
        self.accepted.get_or_create(label).inc_by(0);
        self.rounds.get_or_create(label).inc_by(0);
    }

    fn count(&self, label: &L, drafted: usize, accepted: usize) {
        self.drafted.get_or_create(label).inc_by(drafted as u64);
        self.accepted.get_or_create(label).inc_by(accepted as u64);
        self.rounds.get_or_create(label).inc();
    }
}

/// The `kind` label of a request that names no prompt kind.
pub const UNLABELLED: &str = "unlabelled";
/// The `kind` label of a request that names a kind the node does not list.
pub const OTHER_KIND: &str = "other";

/// Cheaply cloneable metric handles.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

struct Inner {
    registry: Registry,
    /// Families owned elsewhere, shown after ours (the runtime's TLS certificate gauge).
    extra: Exposition,
    requests: Family<Labels, Counter>,
    drafted: Counter,
    accepted: Counter,
    rounds: Counter,
    emitted: Counter,
    resyncs: Counter,
    retries: Counter,
    reconnects: Counter,
    pipeline_kept: Counter,
    pipeline_dropped: Counter,
    active: Gauge,
    connected: Gauge,
    round_trip: Histogram,
    draft_forward: Histogram,
    draft_batch: Histogram,
    /// The prompt kinds clients may name (`metrics.prompt_kinds`); anything else is "other".
    kinds: Vec<String>,
    by_kind: RoundCounts<KindLabel>,
    /// By drafting method (`method` label: model, lookup or hybrid).
    by_method: RoundCounts<Labels>,
    gamma_by_method: HistogramFamily,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        Self::with_extra(Exposition::new())
    }

    /// Registers every metric; [`Metrics::render`] appends `extra` after them.
    pub fn with_extra(extra: Exposition) -> Self {
        Self::with_kinds(extra, Vec::new())
    }

    /// [`Metrics::with_extra`], labelling speculation by the listed prompt kinds.
    pub fn with_kinds(extra: Exposition, kinds: Vec<String>) -> Self {
        let mut r = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        let (drafted, accepted, rounds, emitted) = (
            Counter::default(),
            Counter::default(),
            Counter::default(),
            Counter::default(),
        );
        let (resyncs, retries, reconnects) =
            (Counter::default(), Counter::default(), Counter::default());
        let (pipeline_kept, pipeline_dropped) = (Counter::default(), Counter::default());
        let (active, connected) = (Gauge::default(), Gauge::default());
        let round_trip = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let draft_forward = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let draft_batch = Histogram::new(exponential_buckets(1.0, 2.0, 8));
        let p = "edgespec_draft_";
        r.register(
            format!("{p}requests"),
            "HTTP generation requests by endpoint and outcome",
            requests.clone(),
        );
        r.register(
            format!("{p}drafted_tokens"),
            "Draft tokens sent for verification",
            drafted.clone(),
        );
        r.register(
            format!("{p}accepted_tokens"),
            "Draft tokens accepted by the target",
            accepted.clone(),
        );
        r.register(
            format!("{p}rounds"),
            "Verdicts applied (one target forward each)",
            rounds.clone(),
        );
        let by_kind =
            RoundCounts::register(&mut r, p, "kind", ", by the prompt kind the client named");
        let by_method = RoundCounts::register(&mut r, p, "method", ", by drafting method");
        // Every method from the start: the label set is closed, and dashboards see zeros.
        for m in DraftMethod::ALL {
            by_method.declare(&vec![("method", m.label())]);
        }
        let gamma_by_method: HistogramFamily = Family::new_with_constructor(gamma_histogram);
        r.register(
            format!("{p}method_gamma"),
            "Draft tokens per block as sent (lookup may send fewer than granted), by drafting method",
            gamma_by_method.clone(),
        );
        r.register(
            format!("{p}emitted_tokens"),
            "Tokens committed to clients",
            emitted.clone(),
        );
        r.register(
            format!("{p}resyncs"),
            "Blocks resent with full history",
            resyncs.clone(),
        );
        r.register(
            format!("{p}retries"),
            "Blocks resent after OVERLOADED/UNAVAILABLE",
            retries.clone(),
        );
        r.register(
            format!("{p}reconnects"),
            "Coordinator stream (re)connections",
            reconnects.clone(),
        );
        r.register(
            format!("{p}pipeline_kept"),
            "Pipelined blocks kept after a verdict",
            pipeline_kept.clone(),
        );
        r.register(
            format!("{p}pipeline_dropped"),
            "Pipelined blocks dropped after a verdict",
            pipeline_dropped.clone(),
        );
        r.register(
            format!("{p}active_sessions"),
            "Generations in progress",
            active.clone(),
        );
        r.register(
            format!("{p}coordinator_connected"),
            "1 while the coordinator stream is up",
            connected.clone(),
        );
        r.register(
            format!("{p}round_trip_seconds"),
            "Block send to verdict",
            round_trip.clone(),
        );
        r.register(
            format!("{p}forward_seconds"),
            "Duration of one batched draft forward",
            draft_forward.clone(),
        );
        r.register(
            format!("{p}forward_sessions"),
            "Sessions per batched draft forward",
            draft_batch.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry: r,
                extra,
                requests,
                drafted,
                accepted,
                rounds,
                emitted,
                resyncs,
                retries,
                reconnects,
                pipeline_kept,
                pipeline_dropped,
                active,
                connected,
                round_trip,
                draft_forward,
                draft_batch,
                kinds,
                by_kind,
                by_method,
                gamma_by_method,
            }),
        }
    }

    /// The `kind` label for a request's `prompt_kind`: the kind when the node lists it,
    /// [`OTHER_KIND`] when not, [`UNLABELLED`] when the request names none (so clients cannot
    /// grow the label set).
    pub fn kind_label(&self, requested: Option<&str>) -> String {
        match requested {
            None => UNLABELLED.to_string(),
            Some(k) if self.inner.kinds.iter().any(|x| x == k) => k.to_string(),
            Some(_) => OTHER_KIND.to_string(),
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode_registry(&mut out, &self.inner.registry);
        let _ = self.inner.extra.encode_families(&mut out);
        let _ = encode_eof(&mut out);
        out
    }

    /// One finished HTTP request (`outcome` is `ok` or an error class).
    pub fn request(&self, endpoint: &'static str, outcome: &'static str) {
        self.inner
            .requests
            .get_or_create(&vec![("endpoint", endpoint), ("outcome", outcome)])
            .inc();
    }

    /// One verdict applied to a request of prompt kind `kind` ([`Metrics::kind_label`]) drafted
    /// by `method`.
    pub fn round(
        &self,
        kind: &str,
        method: DraftMethod,
        drafted: usize,
        accepted: usize,
        round_trip: Duration,
    ) {
        self.inner.drafted.inc_by(drafted as u64);
        self.inner.accepted.inc_by(accepted as u64);
        self.inner.rounds.inc();
        let i = &self.inner;
        i.by_kind
            .count(&vec![("kind", kind.to_string())], drafted, accepted);
        let label = vec![("method", method.label())];
        i.by_method.count(&label, drafted, accepted);
        i.gamma_by_method
            .get_or_create(&label)
            .observe(drafted as f64);
        self.inner.round_trip.observe(round_trip.as_secs_f64());
    }

    /// Tokens committed to a client.
    pub fn emitted(&self, n: usize) {
        self.inner.emitted.inc_by(n as u64);
    }

    /// A block resent with history.
    pub fn resync(&self) {
        self.inner.resyncs.inc();
    }

    /// A block resent after a refusal.
    pub fn retry(&self) {
        self.inner.retries.inc();
    }

    /// Pipelined work kept (`true`) or dropped.
    pub fn pipeline(&self, kept: bool) {
        if kept {
            self.inner.pipeline_kept.inc();
        } else {
            self.inner.pipeline_dropped.inc();
        }
    }

    /// Coordinator link up/down.
    pub fn connected(&self, up: bool) {
        self.inner.connected.set(i64::from(up));
        if up {
            self.inner.reconnects.inc();
        }
    }

    /// A session started (+1) or ended (-1).
    pub fn active(&self, delta: i64) {
        self.inner.active.inc_by(delta);
    }

    /// One batched draft forward.
    pub fn observe_draft_forward(&self, took: Duration, sessions: usize) {
        self.inner.draft_forward.observe(took.as_secs_f64());
        self.inner.draft_batch.observe(sessions as f64);
    }
}
