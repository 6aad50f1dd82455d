//! The push side of the protocol: blob uploads (monolithic POST+PUT, or
//! chunked POST, PATCH..., PUT) and manifest PUT. POST+PUT rather than a
//! single POST with `?digest=`, because distribution does not support the
//! latter.

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION};
use http::{Method, Response};
use hyper::body::Incoming;
use oci::Digest;

use crate::auth::Scope;
use crate::conn::{self, Conn};
use crate::outcome::{Done, Failure, Outcome};

fn location(resp: &Response<Incoming>) -> Result<String, Failure> {
    resp.headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(conn::location_path)
        .ok_or_else(|| Failure::other("upload: the response has no Location header"))
}

fn with_digest(path: &str, digest: &Digest) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}digest={digest}")
}

/// Sends `body` to `path` and expects one of `expected`; returns the response
/// with its body read.
async fn send(
    c: &mut Conn,
    method: Method,
    path: &str,
    repo: &str,
    body: Bytes,
    range: Option<(u64, u64)>,
    expected: &[u16],
) -> Result<Response<Incoming>, Failure> {
    let mut b = c
        .request(method, path, Scope::Push(repo))
        .await?
        .header(CONTENT_LENGTH, body.len());
    if !body.is_empty() {
        b = b.header(CONTENT_TYPE, "application/octet-stream");
    }
    if let Some((start, end)) = range {
        b = b.header(CONTENT_RANGE, format!("{start}-{end}"));
    }
    conn::check(c.send(conn::with_body(b, body)?).await?, expected).await
}

/// Uploads `data` (whose digest is `digest`) into `repo`.
pub async fn blob(c: &mut Conn, repo: &str, data: &Bytes, digest: &Digest, chunk: Option<u64>) -> Outcome {
    let start_path = format!("/v2/{repo}/blobs/uploads/");
    let resp = send(c, Method::POST, &start_path, repo, Bytes::new(), None, &[202]).await?;
    let mut loc = location(&resp)?;
    conn::drain(resp.into_body(), None).await?;
    let mut requests = 1;
    let last = match chunk {
        None => data.clone(),
        Some(size) => {
            let size = size as usize;
            let mut offset = 0;
            while offset < data.len() {
                let end = (offset + size).min(data.len());
                let range = Some((offset as u64, end as u64 - 1));
                let part = data.slice(offset..end);
                let resp = send(c, Method::PATCH, &loc, repo, part, range, &[202]).await?;
                loc = location(&resp)?;
                conn::drain(resp.into_body(), None).await?;
                requests += 1;
                offset = end;
            }
            Bytes::new()
        }
    };
    let resp = send(c, Method::PUT, &with_digest(&loc, digest), repo, last, None, &[201]).await?;
    conn::drain(resp.into_body(), None).await?;
    Ok(Done {
        bytes: data.len() as u64,
        requests: requests + 1,
    })
}

/// PUTs a manifest under `reference` (a tag or its digest).
pub async fn manifest(c: &mut Conn, repo: &str, reference: &str, media_type: &str, body: Bytes) -> Outcome {
    let path = format!("/v2/{repo}/manifests/{reference}");
    let n = body.len() as u64;
    let b = c
        .request(Method::PUT, &path, Scope::Push(repo))
        .await?
        .header(CONTENT_TYPE, media_type)
        .header(CONTENT_LENGTH, body.len());
    let resp = conn::check(c.send(conn::with_body(b, body)?).await?, &[201]).await?;
    conn::drain(resp.into_body(), None).await?;
    Ok(Done::one(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_goes_into_the_query() {
        let d = Digest::sha256(b"x");
        assert_eq!(
            with_digest("/v2/a/blobs/uploads/1", &d),
            format!("/v2/a/blobs/uploads/1?digest={d}")
        );
        assert_eq!(with_digest("/u?_state=s", &d), format!("/u?_state=s&digest={d}"));
    }
}
