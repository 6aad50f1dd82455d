//! The operations endpoints: `/healthz`, `/livez`, `/readyz` and
//! `/metrics`. They read state the background checks and the request
//! telemetry keep; none of them touches a store.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use observe::metrics::{OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE};
use observe::{Health, Metrics};

#[derive(Clone)]
pub struct Ops {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

pub fn router(ops: Ops) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(ops)
}

fn no_store(status: StatusCode, content_type: &'static str, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// 200 when every dependency is healthy, 503 otherwise; the body always has
/// the operations guide's shape.
async fn healthz(State(ops): State<Ops>) -> Response {
    let (healthy, body) = ops.health.report();
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    no_store(status, "application/json", body.to_string())
}

/// The process answers: nothing more (a liveness probe that checked
/// dependencies would restart berth for a database outage).
async fn livez() -> Response {
    no_store(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into())
}

async fn readyz(State(ops): State<Ops>) -> Response {
    match ops.health.readiness() {
        Ok(()) => no_store(StatusCode::OK, "text/plain; charset=utf-8", "ready\n".into()),
        Err(why) => no_store(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            format!("not ready: {}\n", why.as_str()),
        ),
    }
}

async fn metrics(State(ops): State<Ops>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    let content_type = if openmetrics {
        OPENMETRICS_CONTENT_TYPE
    } else {
        PROMETHEUS_CONTENT_TYPE
    };
    no_store(StatusCode::OK, content_type, ops.metrics.encode(openmetrics))
}
