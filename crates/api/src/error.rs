//! `ApiError`: a `RegistryError` rendered as the spec's JSON error body with
//! the code's status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use oci::ErrorCode;
use registry::RegistryError;

#[derive(Debug)]
pub struct ApiError {
    pub error: RegistryError,
    /// Extra headers, e.g. `Content-Range` on a 416.
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        RegistryError::new(code, message).into()
    }

    pub fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> ApiError {
        self.headers.push((name, value));
        self
    }
}

impl From<RegistryError> for ApiError {
    fn from(error: RegistryError) -> Self {
        ApiError {
            error,
            headers: Vec::new(),
        }
    }
}

impl From<oci::NameError> for ApiError {
    fn from(e: oci::NameError) -> Self {
        RegistryError::from(e).into()
    }
}

impl From<oci::DigestError> for ApiError {
    fn from(e: oci::DigestError) -> Self {
        RegistryError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = &self.error;
        let status = StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::json!({
            "errors": [{
                "code": e.code.as_str(),
                "message": e.message,
                "detail": e.detail,
            }]
        });
        let mut resp = (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
        for (k, v) in self.headers {
            resp.headers_mut().insert(k, v);
        }
        // For the telemetry layer: failures are classified by OCI code.
        resp.extensions_mut().insert(e.code);
        resp
    }
}

pub type ApiResult = Result<Response, ApiError>;
