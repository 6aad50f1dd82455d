//! Manifest endpoints.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use futures_util::StreamExt;
use oci::{ErrorCode, Reference, RepoName, Tag};

use crate::error::{ApiError, ApiResult};
use crate::request::{body_stream, Query};
use crate::{hv, Ctx};

pub async fn get(ctx: &Ctx<'_>, name: &RepoName, r: &Reference, with_body: bool) -> ApiResult {
    let m = ctx.reg().manifest_get(name, r, with_body).await?;
    crate::signed::check(ctx, name, r, &m).await?;
    Ok(send(ctx, name, r, m, with_body))
}

/// The response for a manifest GET or HEAD (local or from the cache).
pub fn send(ctx: &Ctx<'_>, name: &RepoName, r: &Reference, m: registry::ManifestBody, with_body: bool) -> Response {
    if with_body {
        ctx.audit("pull", &resource(name, r), "ok", m.digest.as_str());
    }
    let body = m.bytes.map(Body::from).unwrap_or_else(Body::empty);
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, hv(&m.media_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(m.size));
    h.insert("docker-content-digest", hv(m.digest.as_str()));
    let mut etag = String::with_capacity(m.digest.as_str().len() + 2);
    etag.push('"');
    etag.push_str(m.digest.as_str());
    etag.push('"');
    h.insert(header::ETAG, hv(etag));
    resp
}

/// `repo:tag` or `repo@digest`, for the audit log.
fn resource(name: &RepoName, r: &Reference) -> String {
    match r {
        Reference::Tag(t) => format!("{name}:{t}"),
        Reference::Digest(d) => format!("{name}@{d}"),
    }
}

pub async fn put(
    ctx: &Ctx<'_>,
    name: &RepoName,
    r: &Reference,
    q: &Query,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult {
    let reg = ctx.reg();
    let limit = reg.config().max_manifest_size;
    let too_large = || {
        ApiError::new(
            ErrorCode::SizeTooLarge,
            format!("manifest is larger than the {limit}-byte limit"),
        )
    };
    // Read up to the limit. Reading (rather than refusing on Content-Length
    // alone) lets the client send and see the 413 instead of a reset
    // connection. A body that is malformed, cut short or stalled is the
    // client's error (`RegistryError::body`), like an upload's.
    let mut stream = body_stream(body, ctx.app.body_idle_timeout);
    let mut bytes = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| registry::RegistryError::body(&e))?;
        if bytes.len() + chunk.len() > limit {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    let bytes = bytes.freeze();
    let tags = q.all("tag").map(|t| t.parse::<Tag>()).collect::<Result<Vec<_>, _>>()?;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    // The spec asks for one `OCI-Tag` per tag applied; `manifest_put` applies
    // all of them or fails, so the tags asked for are the tags applied.
    let mut applied: Vec<String> = Vec::new();
    for tag in tags.iter().map(Tag::to_string) {
        if !applied.contains(&tag) {
            applied.push(tag);
        }
    }
    let put = reg.manifest_put(name, r, content_type, bytes, tags).await?;
    ctx.audit("push", &resource(name, r), "ok", put.digest.as_str());
    let mut resp = (
        StatusCode::CREATED,
        [
            (header::LOCATION, hv(format!("/v2/{name}/manifests/{}", put.digest))),
            (header::CONTENT_LENGTH, HeaderValue::from_static("0")),
        ],
    )
        .into_response();
    resp.headers_mut()
        .insert("docker-content-digest", hv(put.digest.as_str()));
    if let Some(subject) = put.subject {
        resp.headers_mut().insert("oci-subject", hv(subject.as_str()));
    }
    for tag in applied {
        resp.headers_mut().append("oci-tag", hv(tag));
    }
    Ok(resp)
}

pub async fn delete(ctx: &Ctx<'_>, name: &RepoName, r: &Reference) -> ApiResult {
    ctx.reg().manifest_delete(name, r).await?;
    ctx.audit("delete", &resource(name, r), "ok", "");
    Ok(StatusCode::ACCEPTED.into_response())
}
