//! One HTTP/1.1 connection, owned by one worker. hyper's connection API is
//! used directly (no pool, no redirects): the hot loop pays only for the
//! request itself, and `--connections` is exactly the number of sockets.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{AUTHORIZATION, HOST, USER_AGENT};
use http::request::Builder;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use oci::Hasher;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::auth::Scope;
use crate::outcome::Failure;
use crate::target::Target;

pub type Body = Full<Bytes>;

const UA: &str = concat!("berth-bench/", env!("CARGO_PKG_VERSION"));

/// Error bodies and JSON documents are read up to this size.
pub const SMALL_BODY: usize = 8 << 20;

pub struct Conn {
    target: Arc<Target>,
    sender: Option<SendRequest<Body>>,
}

impl Conn {
    pub fn new(target: Arc<Target>) -> Conn {
        Conn { target, sender: None }
    }

    /// Drops the connection; the next request opens a new one.
    pub fn reset(&mut self) {
        self.sender = None;
    }

    /// A request builder with the Host, User-Agent and Authorization headers.
    pub async fn request(&self, method: Method, path: &str, scope: Scope<'_>) -> Result<Builder, Failure> {
        let mut b = self.bare_request(method, path);
        if let Some(h) = self.target.auth.header(scope).await? {
            b = b.header(AUTHORIZATION, h);
        }
        Ok(b)
    }

    /// A request builder without credentials (for the token endpoint).
    pub fn bare_request(&self, method: Method, path: &str) -> Builder {
        Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.target.host.clone())
            .header(USER_AGENT, UA)
    }

    async fn connect(&self) -> Result<SendRequest<Body>, Failure> {
        let tcp = TcpStream::connect(&self.target.addrs[..])
            .await
            .map_err(|e| Failure::transport("connect", e))?;
        // Requests are small and latency matters more than packet count.
        let _ = tcp.set_nodelay(true);
        match &self.target.tls {
            None => handshake(tcp).await,
            Some(tls) => {
                let stream = tls
                    .connector
                    .connect(tls.server_name.clone(), tcp)
                    .await
                    .map_err(|e| Failure::transport("tls", e))?;
                handshake(stream).await
            }
        }
    }

    /// Sends a request, connecting first if needed. A request that never
    /// left because the server had closed the idle connection is retried
    /// once on a new connection, as every HTTP client does.
    pub async fn send(&mut self, mut req: Request<Body>) -> Result<Response<Incoming>, Failure> {
        for attempt in 0..2 {
            if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
                self.sender = Some(self.connect().await?);
            }
            let sender = self.sender.as_mut().expect("connected above");
            if sender.ready().await.is_err() {
                self.sender = None;
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => {
                    self.sender = None;
                    match e.take_message() {
                        Some(r) if attempt == 0 => req = r,
                        _ => return Err(Failure::transport("http", e.into_error())),
                    }
                }
            }
        }
        Err(Failure::other(
            "http: the server closed the connection twice before the request was sent",
        ))
    }
}

async fn handshake<I>(io: I) -> Result<SendRequest<Body>, Failure>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| Failure::transport("handshake", e))?;
    tokio::spawn(async move {
        // Ends when the server closes or the sender is dropped; either is
        // seen by the next `send`.
        let _ = conn.await;
    });
    Ok(sender)
}

/// Attaches a body (possibly empty) to a request.
pub fn with_body(b: Builder, body: Bytes) -> Result<Request<Body>, Failure> {
    b.body(Full::new(body))
        .map_err(|e| Failure::other(format!("cannot build request: {e}")))
}

/// Passes a response whose status is expected; any other becomes a failure
/// carrying the status and the OCI error code of the body.
pub async fn check(resp: Response<Incoming>, expected: &[u16]) -> Result<Response<Incoming>, Failure> {
    let status = resp.status().as_u16();
    if expected.contains(&status) {
        return Ok(resp);
    }
    let body = read_all(resp.into_body(), 64 << 10).await.unwrap_or_default();
    Err(Failure::status(status, error_code(&body)))
}

/// The first OCI error code of an error body, or "" when there is none.
pub fn error_code(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_string))
        .unwrap_or_default()
}

pub async fn read_all(body: Incoming, limit: usize) -> Result<Bytes, Failure> {
    Limited::new(body, limit)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| Failure::transport("body", e))
}

/// Reads a body to its end, counting and optionally hashing it, without
/// keeping it.
pub async fn drain(mut body: Incoming, mut hasher: Option<&mut Hasher>) -> Result<u64, Failure> {
    let mut n = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Failure::transport("body", e))?;
        if let Ok(data) = frame.into_data() {
            n += data.len() as u64;
            if let Some(h) = hasher.as_mut() {
                h.update(&data);
            }
        }
    }
    Ok(n)
}

/// The path and query of a `Location`, which may be absolute or relative.
pub fn location_path(location: &str) -> String {
    match location.split_once("://") {
        Some((_, rest)) => match rest.find('/') {
            Some(i) => rest[i..].to_string(),
            None => "/".to_string(),
        },
        None => location.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_and_locations() {
        assert_eq!(
            error_code(br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"x"}]}"#),
            "MANIFEST_UNKNOWN"
        );
        assert_eq!(error_code(b"<html>"), "");
        assert_eq!(location_path("/v2/a/blobs/uploads/1?x=y"), "/v2/a/blobs/uploads/1?x=y");
        assert_eq!(
            location_path("http://127.0.0.1:5000/v2/a/blobs/uploads/1?_state=z"),
            "/v2/a/blobs/uploads/1?_state=z"
        );
    }
}
