//! Blob and upload endpoints.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use oci::{Algorithm, Digest, ErrorCode, RepoName, UploadId};
use registry::Registry;

use crate::error::{ApiError, ApiResult};
use crate::request::{body_stream, byte_range, chunk_range, content_length, Query};
use crate::{hv, Ctx};

/// A blob GET or HEAD. `plain_socket`: the response goes out over plain
/// HTTP/1 (see `Ctx::plain_socket`), so the bytes may be mapped file pages.
pub async fn get(
    reg: &Registry,
    name: &RepoName,
    d: &Digest,
    headers: &HeaderMap,
    with_body: bool,
    plain_socket: bool,
) -> ApiResult {
    let blob = reg.blob_open(name, d).await?;
    let size = blob.size;
    send(d, Some(size), headers, with_body, |range| {
        read(blob, range, plain_socket)
    })
    .await
}

/// Opens a blob's bytes for a response; see `Ctx::plain_socket`.
pub async fn read(
    blob: registry::OpenBlob,
    range: Option<std::ops::Range<u64>>,
    plain_socket: bool,
) -> registry::Result<storage::ByteStream> {
    match plain_socket {
        true => blob.read_for_socket(range).await,
        false => blob.read(range).await,
    }
}

/// The response for a blob GET or HEAD of `size` bytes (unknown only for a
/// blob still arriving from an upstream without a length: then `Range` is
/// ignored). `read` opens the bytes of a range, or all of them.
pub async fn send<F, Fut>(d: &Digest, size: Option<u64>, headers: &HeaderMap, with_body: bool, read: F) -> ApiResult
where
    F: FnOnce(Option<std::ops::Range<u64>>) -> Fut,
    Fut: std::future::Future<Output = registry::Result<storage::ByteStream>>,
{
    let range = match size {
        Some(size) => byte_range(headers, size)?,
        None => None,
    };
    let mut resp = if with_body {
        Response::new(Body::from_stream(read(range.clone()).await?))
    } else {
        Response::new(Body::empty())
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert("docker-content-digest", hv(d.as_str()));
    h.insert(header::ETAG, hv(format!("\"{d}\"")));
    match (range, size) {
        (Some(r), Some(size)) => {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            let h = resp.headers_mut();
            h.insert(header::CONTENT_LENGTH, hv((r.end - r.start).to_string()));
            h.insert(
                header::CONTENT_RANGE,
                hv(format!("bytes {}-{}/{size}", r.start, r.end - 1)),
            );
        }
        (_, Some(size)) => {
            resp.headers_mut().insert(header::CONTENT_LENGTH, hv(size.to_string()));
        }
        (_, None) => {}
    }
    Ok(resp)
}

pub async fn delete(ctx: &Ctx<'_>, name: &RepoName, d: &Digest) -> ApiResult {
    ctx.reg().blob_delete(name, d).await?;
    ctx.audit("delete", &format!("{name}@{d}"), "ok", "blob");
    Ok(StatusCode::ACCEPTED.into_response())
}

fn upload_location(name: &RepoName, id: &UploadId) -> String {
    format!("/v2/{name}/blobs/uploads/{id}")
}

/// The `Range` of an upload holding `size` bytes (`0-0` when empty, as
/// clients expect).
fn upload_range(size: u64) -> String {
    if size == 0 {
        "0-0".to_string()
    } else {
        format!("0-{}", size - 1)
    }
}

/// 202 with the headers that tell a client where an upload stands.
fn upload_progress(status: StatusCode, name: &RepoName, id: &UploadId, size: u64) -> Response {
    (
        status,
        [
            (header::LOCATION, hv(upload_location(name, id))),
            (header::RANGE, hv(upload_range(size))),
            (header::HeaderName::from_static("docker-upload-uuid"), hv(id.as_str())),
            (header::CONTENT_LENGTH, HeaderValue::from_static("0")),
        ],
    )
        .into_response()
}

/// `upload_progress` for the start and the status of an upload, which also
/// say which hash it was started with (berth's `Digest-Algorithm` header).
fn upload_state(status: StatusCode, name: &RepoName, id: &UploadId, p: registry::uploads::UploadProgress) -> Response {
    let mut resp = upload_progress(status, name, id, p.size);
    resp.headers_mut().insert(
        header::HeaderName::from_static("digest-algorithm"),
        hv(p.algorithm.as_str()),
    );
    resp
}

/// 201 for a blob now in the repository.
fn blob_created(name: &RepoName, d: &Digest) -> Response {
    (
        StatusCode::CREATED,
        [
            (header::LOCATION, hv(format!("/v2/{name}/blobs/{d}"))),
            (header::HeaderName::from_static("docker-content-digest"), hv(d.as_str())),
            (header::CONTENT_LENGTH, HeaderValue::from_static("0")),
        ],
    )
        .into_response()
}

fn digest_param(q: &Query) -> Result<Option<Digest>, ApiError> {
    Ok(q.get("digest").map(str::parse).transpose()?)
}

/// POST `/blobs/uploads/`: a mount (`?mount=`), a monolithic upload
/// (`?digest=` with the body), or the start of an upload session.
pub async fn start(ctx: &Ctx<'_>, name: &RepoName, q: &Query, body: Body) -> ApiResult {
    let (reg, owner) = (ctx.reg(), ctx.caller.owner());
    // `?digest-algorithm=`: the hash of a session (sha256 by default).
    let alg: Option<Algorithm> = q.get("digest-algorithm").map(str::parse).transpose()?;
    if let Some(mount) = q.get("mount") {
        let d: Digest = mount.parse()?;
        // A `from` that is invalid, or that the caller may not pull, cannot
        // be mounted from: the client uploads instead, as the spec says, and
        // learns nothing about the source.
        let from = match q.get("from").map(|f| f.parse::<RepoName>()) {
            Some(Ok(from)) if crate::access::can_pull(ctx.auth(), &ctx.caller, from.as_str()).await => Some(Some(from)),
            Some(_) => None,
            None => Some(None),
        };
        let mounted = match from {
            Some(Some(from)) => reg.mount(name, &d, Some(&from)).await?,
            // Without `from`, only without access control: with it, the
            // blob could come from a repository the caller may not read.
            Some(None) if ctx.auth().is_none() => reg.mount(name, &d, None).await?,
            _ => None,
        };
        if mounted.is_some() {
            return Ok(blob_created(name, &d));
        }
    } else if let Some(d) = digest_param(q)? {
        if let Some(alg) = alg.filter(|a| *a != d.algorithm()) {
            return Err(ApiError::new(
                ErrorCode::DigestInvalid,
                format!(
                    "digest-algorithm={} but the digest is {d}; give one algorithm",
                    alg.as_str()
                ),
            ));
        }
        let id = reg.upload_start(name, owner, d.algorithm()).await?;
        let result = reg
            .upload_finish(
                name,
                &id,
                owner,
                None,
                &d,
                Some(body_stream(body, ctx.app.body_idle_timeout)),
            )
            .await;
        if result.is_err() {
            let _ = reg.upload_cancel(name, &id, owner).await;
        }
        result?;
        return Ok(blob_created(name, &d));
    }
    let algorithm = alg.unwrap_or(Algorithm::Sha256);
    let id = reg.upload_start(name, owner, algorithm).await?;
    let started = registry::uploads::UploadProgress { size: 0, algorithm };
    Ok(upload_state(StatusCode::ACCEPTED, name, &id, started))
}

pub async fn status(reg: &Registry, name: &RepoName, id: &UploadId, owner: Option<&str>) -> ApiResult {
    let progress = reg.upload_status(name, id, owner).await?;
    Ok(upload_state(StatusCode::NO_CONTENT, name, id, progress))
}

/// PATCH: a chunk (with `Content-Range`) or a stream (without).
pub async fn patch(
    ctx: &Ctx<'_>,
    name: &RepoName,
    id: &UploadId,
    owner: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult {
    let start = chunk_start(headers)?;
    let size = append_chunk(ctx, name, id, owner, start, body).await?;
    Ok(upload_progress(StatusCode::ACCEPTED, name, id, size))
}

/// The first byte of a chunk's `Content-Range`, checked against its
/// `Content-Length`; `None` for a chunk sent without `Content-Range`.
fn chunk_start(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let range = chunk_range(headers)?;
    if let (Some((a, b)), Some(len)) = (range, content_length(headers)) {
        if b - a + 1 != len {
            return Err(ApiError::new(
                ErrorCode::RangeInvalid,
                format!(
                    "Content-Range {a}-{b} covers {} bytes but Content-Length is {len}",
                    b - a + 1
                ),
            ));
        }
    }
    Ok(range.map(|(a, _)| a))
}

/// Appends a chunk (PATCH). A chunk that does not start at the upload's
/// offset is refused with 416 (`resumable`); the upload is left as it was.
async fn append_chunk(
    ctx: &Ctx<'_>,
    name: &RepoName,
    id: &UploadId,
    owner: Option<&str>,
    start: Option<u64>,
    body: Body,
) -> Result<u64, ApiError> {
    let reg = ctx.reg();
    match reg
        .upload_append(name, id, owner, start, body_stream(body, ctx.app.body_idle_timeout))
        .await
    {
        Ok(size) => Ok(size),
        Err(e) => Err(resumable(reg, name, id, owner, e.into()).await),
    }
}

/// A 416 gets the upload's `Location` and `Range`, as a status GET would
/// give them, so the client can resume from there.
async fn resumable(reg: &Registry, name: &RepoName, id: &UploadId, owner: Option<&str>, err: ApiError) -> ApiError {
    if err.error.code != ErrorCode::RangeInvalid {
        return err;
    }
    let err = err.with_header(header::LOCATION, hv(upload_location(name, id)));
    match reg.upload_status(name, id, owner).await {
        Ok(p) => err.with_header(header::RANGE, hv(upload_range(p.size))),
        Err(_) => err,
    }
}

/// PUT `?digest=`: the optional last chunk (with or without
/// `Content-Range`), then verify and commit.
pub async fn finish(
    ctx: &Ctx<'_>,
    name: &RepoName,
    id: &UploadId,
    owner: Option<&str>,
    q: &Query,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult {
    let Some(d) = digest_param(q)? else {
        return Err(ApiError::new(
            ErrorCode::DigestInvalid,
            "completing an upload needs ?digest=<algorithm>:<hex> of the whole blob",
        ));
    };
    let start = chunk_start(headers)?;
    let has_body = start.is_some()
        || content_length(headers).is_some_and(|n| n > 0)
        || headers.contains_key(header::TRANSFER_ENCODING);
    let last = has_body.then(|| body_stream(body, ctx.app.body_idle_timeout));
    let reg = ctx.reg();
    match reg.upload_finish(name, id, owner, start, &d, last).await {
        Ok(_) => Ok(blob_created(name, &d)),
        Err(e) => Err(resumable(reg, name, id, owner, e.into()).await),
    }
}

pub async fn cancel(reg: &Registry, name: &RepoName, id: &UploadId, owner: Option<&str>) -> ApiResult {
    reg.upload_cancel(name, id, owner).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
