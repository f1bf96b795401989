//! The OpenAI-compatible HTTP API (axum): `/v1/completions`, `/v1/chat/completions` (JSON or SSE),
//! `/v1/models`, plus `/healthz` (admitting requests), `/readyz` (connected: route traffic here)
//! and `/metrics`.
//!
//! A generation request is read (at most `limits.max_body_bytes`: 413 beyond), parsed and checked
//! on the async worker — as cheap as reading it — and only then waits, at most
//! `limits.admission_wait`, for one of the node's generation slots (429 with `Retry-After`
//! otherwise). Tokenising, the expensive part, happens once admitted, on a blocking thread.

mod error;
mod openai;
mod respond;

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

pub use error::ApiError;
use openai::{ChatRequest, CompletionRequest};
use respond::Kind;

use crate::node::Node;

#[derive(Clone)]
struct AppState {
    node: Node,
    created: u64,
}

/// The HTTP router over `node`.
pub fn router(node: Node) -> Router {
    let limit = node.limits().max_body_bytes;
    let state = AppState {
        node,
        created: unix_secs(),
    };
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        let status = r.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "The request body is too large.".to_string()
        } else {
            format!("The request body could not be read: {r}")
        };
        ApiError::with_status(status, "invalid_request_error", message)
    })
}

async fn completions(State(s): State<AppState>, raw: Result<Bytes, BytesRejection>) -> Response {
    let checked = body(raw)
        .and_then(|b| openai::parse::<CompletionRequest>(&b))
        .and_then(|r| r.check(&s.node));
    respond::generate(&s.node, Kind::Completion, checked).await
}

async fn chat_completions(
    State(s): State<AppState>,
    raw: Result<Bytes, BytesRejection>,
) -> Response {
    let checked = body(raw)
        .and_then(|b| openai::parse::<ChatRequest>(&b))
        .and_then(|r| r.check(&s.node));
    respond::generate(&s.node, Kind::Chat, checked).await
}

async fn models(State(s): State<AppState>) -> Response {
    Json(json!({
        "object": "list",
        "data": [{
            "id": s.node.served_name(),
            "object": "model",
            "created": s.created,
            "owned_by": "edgespec",
            "max_model_len": s.node.model_info().max_context,
        }],
    }))
    .into_response()
}

async fn healthz(State(s): State<AppState>) -> Response {
    match s.node.readiness() {
        Ok(()) => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "reason": e.to_string()})),
        )
            .into_response(),
    }
}

/// 200 only while the coordinator stream is up: 503, with the reason, while the node connects
/// (it serves from the start and retries for as long as it runs), reconnects or is refused.
async fn readyz(State(s): State<AppState>) -> Response {
    match s.node.ready() {
        Ok(()) => (StatusCode::OK, Json(json!({"status": "ready"}))).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "reason": reason})),
        )
            .into_response(),
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.node.metrics().render(),
    )
        .into_response()
}

async fn not_found() -> Response {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "Unknown endpoint.".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("unknown_url"),
        retry_after: None,
    }
    .into_response()
}

pub(crate) fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
