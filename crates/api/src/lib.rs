//! The HTTP API of the OCI Distribution Spec. This is the only crate that
//! knows HTTP: it parses requests into validated OCI types, calls the
//! registry service, and renders results and errors as the spec says.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use oci::ErrorCode;
use registry::Registry;

mod blobs;
pub mod error;
mod lists;
mod manifests;
pub mod ops;
pub mod request;
pub mod route;
pub mod telemetry;

pub use error::{ApiError, ApiResult};
use request::Query;
use route::Route;

pub type AppState = Arc<Registry>;

/// The registry's HTTP routes.
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/v2", get(ping).head(ping))
        .route("/v2/", get(ping).head(ping))
        .route("/v2/{*rest}", any(dispatch))
        .fallback(not_found)
        .layer(axum::middleware::map_response(api_version_header))
        .with_state(registry)
}

async fn api_version_header(mut resp: Response) -> Response {
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    resp
}

async fn ping() -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], "{}").into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        "no such endpoint; registry endpoints are under /v2/",
    )
}

fn unsupported(method: &Method) -> ApiError {
    ApiError::new(
        ErrorCode::Unsupported,
        format!("method {method} is not supported on this endpoint"),
    )
}

async fn dispatch(State(reg): State<AppState>, req: Request<Body>) -> ApiResult {
    let (parts, body) = req.into_parts();
    let rest = parts.uri.path().strip_prefix("/v2/").unwrap_or("");
    let route = match route::parse(rest) {
        None => return Err(not_found().await),
        Some(r) => r?,
    };
    let q = Query::parse(parts.uri.query());
    let h = &parts.headers;
    let m = &parts.method;
    match route {
        Route::Catalog if m == Method::GET => lists::catalog(&reg, &q).await,
        Route::Tags(name) if m == Method::GET => lists::tags(&reg, &name, &q).await,
        Route::Referrers(name, d) if m == Method::GET => lists::referrers(&reg, &name, &d, &q).await,
        Route::Manifest(name, r) => match *m {
            Method::GET => manifests::get(&reg, &name, &r, true).await,
            Method::HEAD => manifests::get(&reg, &name, &r, false).await,
            Method::PUT => manifests::put(&reg, &name, &r, &q, h, body).await,
            Method::DELETE => manifests::delete(&reg, &name, &r).await,
            _ => Err(unsupported(m)),
        },
        Route::Blob(name, d) => match *m {
            Method::GET => blobs::get(&reg, &name, &d, h, true).await,
            Method::HEAD => blobs::get(&reg, &name, &d, h, false).await,
            Method::DELETE => blobs::delete(&reg, &name, &d).await,
            _ => Err(unsupported(m)),
        },
        Route::UploadStart(name) if m == Method::POST => blobs::start(&reg, &name, &q, h, body).await,
        Route::Upload(name, id) => match *m {
            Method::GET => blobs::status(&reg, &name, &id).await,
            Method::PATCH => blobs::patch(&reg, &name, &id, h, body).await,
            Method::PUT => blobs::finish(&reg, &name, &id, &q, h, body).await,
            Method::DELETE => blobs::cancel(&reg, &name, &id).await,
            _ => Err(unsupported(m)),
        },
        _ => Err(unsupported(m)),
    }
}
