//! The token endpoint of the Docker registry token spec: `GET /token` with
//! basic credentials (or none, for public pulls), and the OAuth2 `POST
//! /token` forms (password and refresh_token grants) that docker and
//! containerd use.

use auth::scope::{self, Access};
use auth::{Auth, AuthError, Principal};
use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use oci::ErrorCode;
use serde_json::json;

use crate::access::{auth_error, basic_credentials};
use crate::error::{ApiError, ApiResult};
use crate::request::Query;

fn check_service(auth: &Auth, q: &Query) -> Result<(), ApiError> {
    match q.get("service") {
        Some(s) if s != auth.config().service => Err(ApiError::new(
            ErrorCode::Denied,
            format!(
                "this token service issues tokens for {:?}, not {s:?}",
                auth.config().service
            ),
        )),
        _ => Ok(()),
    }
}

fn login_error(auth: &Auth, e: AuthError) -> ApiError {
    let mut err = auth_error(auth, e, None);
    // Ask for basic credentials here, not for a bearer token.
    err.headers.retain(|(k, _)| k != header::WWW_AUTHENTICATE);
    err.with_header(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"berth token service\""),
    )
}

fn token_response(auth: &Auth, who: &Principal, granted: Vec<Access>, refresh: Option<String>) -> Response {
    let scope = granted.iter().map(Access::to_scope).collect::<Vec<_>>().join(" ");
    let (token, ttl) = auth.issue_access(who, granted);
    let mut body = json!({
        "token": token,
        "access_token": token,
        "expires_in": ttl,
        "issued_at": observe::time::rfc3339(std::time::SystemTime::now()),
        "scope": scope,
    });
    if let Some(r) = refresh {
        body["refresh_token"] = json!(r);
    }
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response()
}

/// GET /token
pub async fn get(auth: &Auth, q: &Query, headers: &HeaderMap, client: &str) -> ApiResult {
    check_service(auth, q)?;
    let who = match basic_credentials(headers) {
        Some((u, p)) => auth.login(&u, &p, client).await.map_err(|e| login_error(auth, e))?,
        None => Principal::Anonymous,
    };
    let requested = scope::parse_all(q.all("scope"));
    let granted = auth.grant(&who, &requested).await;
    let refresh =
        (q.get("offline_token") == Some("true") && who != Principal::Anonymous).then(|| auth.issue_refresh(&who));
    Ok(token_response(auth, &who, granted, refresh))
}

/// POST /token (application/x-www-form-urlencoded)
pub async fn post(auth: &Auth, headers: &HeaderMap, body: Body, client: &str) -> ApiResult {
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map_err(|_| ApiError::new(ErrorCode::SizeInvalid, "token request body too large"))?;
    let form = Query::parse(std::str::from_utf8(&bytes).ok());
    check_service(auth, &form)?;
    let requested = scope::parse_all(form.all("scope"));
    let (who, refresh) = match form.get("grant_type") {
        Some("password") => {
            let (u, p) = match (form.get("username"), form.get("password")) {
                (Some(u), Some(p)) => (u.to_string(), p.to_string()),
                _ => basic_credentials(headers).ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::Unauthorized,
                        "the password grant needs username and password",
                    )
                })?,
            };
            let who = auth.login(&u, &p, client).await.map_err(|e| login_error(auth, e))?;
            let refresh = (form.get("access_type") == Some("offline")).then(|| auth.issue_refresh(&who));
            (who, refresh)
        }
        Some("refresh_token") => {
            let t = form
                .get("refresh_token")
                .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "the refresh_token grant needs refresh_token"))?;
            let who = auth.verify_refresh(t).await.map_err(|e| login_error(auth, e))?;
            (who, Some(t.to_string()))
        }
        other => {
            return Err(ApiError::new(
                ErrorCode::Unsupported,
                format!("grant_type {other:?} is not supported: use password or refresh_token"),
            ))
        }
    };
    let granted = auth.grant(&who, &requested).await;
    Ok(token_response(auth, &who, granted, refresh))
}
