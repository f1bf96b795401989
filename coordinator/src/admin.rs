//! The admin HTTP edge (axum): `/admin/v1/*` behind a bearer token, plus unauthenticated
//! `/readyz` and the runtime's shared `/healthz` and `/metrics` (`edgespec_runtime::ops`).
//! Error → HTTP status mapping lives here only.

use crate::actor::{Handle, Ready};
use crate::policy::PolicyPatch;
use crate::registry::NodeAction;
use crate::Error;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use edgespec_runtime::ops::{self, Exposition};
use serde_json::json;
use std::sync::Arc;

#[derive(Clone)]
struct AdminState {
    handle: Handle,
    ready: Ready,
    token: Arc<str>,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = match &self {
            Error::Policy(_) | Error::DraftProtocol(_) | Error::Protocol(_) => {
                StatusCode::BAD_REQUEST
            }
            Error::UnknownVerifier(_) => StatusCode::NOT_FOUND,
            Error::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            "internal error".to_string()
        } else {
            self.to_string()
        };
        (status, Json(json!({ "error": message }))).into_response()
    }
}

/// The router; `/metrics` shows `metrics`.
pub fn router(handle: Handle, ready: Ready, metrics: Exposition, token: String) -> Router {
    let state = AdminState {
        handle,
        ready,
        token: token.into(),
    };
    let admin = Router::new()
        .route("/admin/v1/nodes", get(nodes))
        .route("/admin/v1/sessions", get(sessions))
        .route("/admin/v1/policy", get(get_policy).put(put_policy))
        .route("/admin/v1/verifiers/{id}/{action}", post(node_action))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/readyz", get(readyz))
        .merge(admin)
        .with_state(state)
        .merge(ops::routes(metrics))
}

/// Constant-time comparison, so response timing does not leak the token's prefix.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    given
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

async fn require_token(State(s): State<AdminState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if !s.token.is_empty() && token_matches(t.as_bytes(), s.token.as_bytes()) => {
            next.run(req).await
        }
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({ "error": "missing or wrong bearer token" })),
        )
            .into_response(),
    }
}

async fn readyz(State(s): State<AdminState>) -> Response {
    let up = *s.ready.borrow();
    if up > 0 {
        (StatusCode::OK, format!("ready: {up} verify node(s) up\n")).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no verify node is up\n",
        )
            .into_response()
    }
}

async fn nodes(State(s): State<AdminState>) -> Result<Response, Error> {
    Ok(Json(s.handle.nodes().await?).into_response())
}

async fn sessions(State(s): State<AdminState>) -> Result<Response, Error> {
    let sessions = s.handle.sessions().await?;
    Ok(Json(json!({ "count": sessions.len(), "sessions": sessions })).into_response())
}

async fn get_policy(State(s): State<AdminState>) -> Result<Response, Error> {
    Ok(Json(s.handle.policy().await?).into_response())
}

async fn put_policy(
    State(s): State<AdminState>,
    body: axum::body::Bytes,
) -> Result<Response, Error> {
    // Parsed by hand so a bad body is a 400 that names the field, in our error format.
    let patch: PolicyPatch = serde_json::from_slice(&body).map_err(|e| {
        Error::Policy(crate::policy::PolicyError {
            field: "body",
            reason: e.to_string(),
        })
    })?;
    Ok(Json(s.handle.set_policy(patch).await?).into_response())
}

async fn node_action(
    State(s): State<AdminState>,
    Path((id, action)): Path<(String, String)>,
) -> Result<Response, Error> {
    let action = match action.as_str() {
        "drain" => NodeAction::Drain,
        "cordon" => NodeAction::Cordon,
        "uncordon" => NodeAction::Uncordon,
        _ => return Ok((StatusCode::NOT_FOUND, Json(json!({ "error": format!("unknown action `{action}`; use drain, cordon or uncordon") }))).into_response()),
    };
    let state = s.handle.node_action(id.clone(), action).await?;
    Ok(Json(json!({ "id": id, "admin": state })).into_response())
}
