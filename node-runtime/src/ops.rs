//! The operations endpoints every node serves the same way: `/metrics` (OpenMetrics text),
//! `/healthz` (the process answers) and `/readyz` (it can do its job), with axum on a pre-bound
//! listener.
//!
//! A node's `/metrics` is an [`Exposition`]: its own prometheus-client registry plus the
//! families the runtime owns (the TLS certificate expiry), encoded one after the other with a
//! single `# EOF`.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Content type of `/metrics`.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A set of metric families that can be written into an exposition (without the `# EOF`).
pub trait Families: Send + Sync + 'static {
    /// Appends the families in OpenMetrics text.
    fn encode_families(&self, out: &mut String) -> fmt::Result;
}

impl Families for Registry {
    fn encode_families(&self, out: &mut String) -> fmt::Result {
        encode_registry(out, self)
    }
}

impl<T: Families + ?Sized> Families for Arc<T> {
    fn encode_families(&self, out: &mut String) -> fmt::Result {
        (**self).encode_families(out)
    }
}

/// Families from an encoder that writes a whole exposition, `# EOF` included: a node's metrics
/// struct that keeps its registry to itself and offers only its text.
pub struct Encoded<F>(pub F);

impl<F: Fn() -> String + Send + Sync + 'static> Families for Encoded<F> {
    fn encode_families(&self, out: &mut String) -> fmt::Result {
        let text = (self.0)();
        out.push_str(text.strip_suffix("# EOF\n").unwrap_or(&text));
        Ok(())
    }
}

/// What one `/metrics` shows: families from several owners, in order. Cheap to clone.
#[derive(Clone, Default)]
pub struct Exposition {
    parts: Vec<Arc<dyn Families>>,
}

impl fmt::Debug for Exposition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Exposition({} parts)", self.parts.len())
    }
}

impl Exposition {
    /// No families yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `part` after the families already there.
    pub fn with(mut self, part: impl Families) -> Self {
        self.parts.push(Arc::new(part));
        self
    }

    /// The whole exposition, ending in `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = self.encode_families(&mut out);
        let _ = encode_eof(&mut out);
        out
    }

    /// The `/metrics` response.
    pub fn response(&self) -> Response {
        (
            [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
            self.encode(),
        )
            .into_response()
    }
}

impl Families for Exposition {
    fn encode_families(&self, out: &mut String) -> fmt::Result {
        self.parts.iter().try_for_each(|p| p.encode_families(out))
    }
}

/// Whether a node can do its job now: `Ok(what it has)` or `Err(what it lacks)`, each one line
/// for the probe's body.
pub type Readiness = Result<String, String>;

/// The node's readiness check, called on every `/readyz`.
pub type ReadyCheck = Arc<dyn Fn() -> Readiness + Send + Sync>;

/// `/metrics` and `/healthz` (always `200 ok` while the process serves). For a node whose
/// `/readyz` needs state of its own router (the coordinator's admin API).
pub fn routes<S: Clone + Send + Sync + 'static>(exposition: Exposition) -> Router<S> {
    Router::new()
        .route(
            "/metrics",
            get(move || async move { exposition.response() }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
}

/// `/metrics`, `/healthz` and `/readyz` (200 with the check's text when ready, else 503).
pub fn router(exposition: Exposition, ready: ReadyCheck) -> Router {
    routes(exposition).route(
        "/readyz",
        get(move || async move {
            match ready() {
                Ok(what) => (StatusCode::OK, format!("ready: {what}\n")),
                Err(why) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
            }
        }),
    )
}

/// Serves [`router`] on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    exposition: Exposition,
    ready: ReadyCheck,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(exposition, ready))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn serves_every_part_once_with_one_eof_and_probes_follow_the_check() {
        let mut node = Registry::with_prefix("edgespec_test");
        let requests = Counter::<u64>::default();
        node.register("requests", "Requests", requests.clone());
        let mut runtime = Registry::default();
        let expiry = Gauge::<i64>::default();
        runtime.register("edgespec_other_seconds", "Other", expiry.clone());
        requests.inc_by(3);
        expiry.set(42);
        let node = Arc::new(node);
        let encoded = {
            let node = node.clone();
            Encoded(move || {
                let mut text = String::new();
                prometheus_client::encoding::text::encode(&mut text, &node).unwrap();
                text
            })
        };
        let exposition = Exposition::new().with(encoded).with(runtime);
        let ready = Arc::new(AtomicBool::new(false));
        let check = {
            let ready = ready.clone();
            Arc::new(move || {
                if ready.load(Ordering::SeqCst) {
                    Ok("1 thing up".to_string())
                } else {
                    Err("nothing up".to_string())
                }
            })
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            exposition,
            check,
            stop.clone().cancelled_owned(),
        ));
        let http = reqwest::Client::new();
        let get = |path: &str| http.get(format!("http://{addr}{path}")).send();

        let metrics = get("/metrics").await.unwrap();
        assert_eq!(
            metrics.headers()[header::CONTENT_TYPE],
            OPENMETRICS_CONTENT_TYPE
        );
        let text = metrics.text().await.unwrap();
        assert!(text.contains("edgespec_test_requests_total 3"), "{text}");
        assert!(text.contains("edgespec_other_seconds 42"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");

        assert_eq!(get("/healthz").await.unwrap().status(), StatusCode::OK);
        let not_ready = get("/readyz").await.unwrap();
        assert_eq!(not_ready.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(not_ready.text().await.unwrap().contains("nothing up"));
        ready.store(true, Ordering::SeqCst);
        let now_ready = get("/readyz").await.unwrap();
        assert_eq!(now_ready.status(), StatusCode::OK);
        assert!(now_ready.text().await.unwrap().contains("1 thing up"));

        stop.cancel();
        server.await.unwrap().unwrap();
    }
}
