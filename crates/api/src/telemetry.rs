//! Per-request telemetry: a request id on every response and every log line
//! of the request, with the W3C trace it belongs to (`observe::trace`), the
//! request metrics, and the access log (one line per request, at info level).
//!
//! This runs for every request, so it stays cheap: the route kind comes from
//! a scan of the path's last segments (no parsing, no allocation), metrics
//! are array slots or one family lookup, and response bodies of known size
//! are counted from their size instead of being wrapped.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use observe::{FailureReason, Method, Metrics, RouteKind, TraceContext};
use prometheus_client::metrics::counter::Counter;
use tracing::Instrument;

pub const REQUEST_ID: &str = "x-request-id";

#[derive(Clone)]
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    /// Whether to write the access log line (benchmarks may turn it off).
    pub access_log: bool,
}

/// Wraps `router` (the registry routes, and the ops routes when they share
/// the listener) with request ids, metrics and the access log.
pub fn layer(router: Router, t: Telemetry) -> Router {
    router.layer(axum::middleware::from_fn_with_state(t, track))
}

/// An incoming `X-Request-Id` is kept when it is short and plain (so it is
/// safe in logs and headers); otherwise berth makes one.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(REQUEST_ID) {
        let b = v.as_bytes();
        if (1..=128).contains(&b.len())
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
        {
            return v.clone();
        }
    }
    new_request_id()
}

/// 32 hex digits: a random per-process prefix and a counter. Unique within
/// the process, and across processes with overwhelming probability.
fn new_request_id() -> HeaderValue {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        h.write_u32(std::process::id());
        h.finish()
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Every request without an id of its own makes one: hex by hand, not
    // through `format!`.
    let value = (u128::from(prefix) << 64) | u128::from(n);
    let mut hex = [0u8; 32];
    for (i, c) in hex.iter_mut().enumerate() {
        *c = b"0123456789abcdef"[(value >> (124 - 4 * i)) as usize & 0xf];
    }
    HeaderValue::from_bytes(&hex).expect("hex is a valid header value")
}

/// Whether a request is a pull or a push, for the pull and push metrics.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Transfer {
    Pull,
    Push,
    /// A mount attempt: a push when it mounts (201) or fails, nothing when
    /// berth answers "upload instead" (202), since the upload is counted.
    Mount,
    None,
}

fn transfer(method: Method, route: RouteKind, query: Option<&str>) -> Transfer {
    match (route, method) {
        (RouteKind::Manifest | RouteKind::Blob, Method::Get | Method::Head) => Transfer::Pull,
        (RouteKind::Manifest, Method::Put) | (RouteKind::Upload, Method::Put) => Transfer::Push,
        (RouteKind::Upload, Method::Post) => {
            let q = query.unwrap_or("");
            if q.contains("mount=") {
                Transfer::Mount
            } else if q.contains("digest=") {
                Transfer::Push
            } else {
                Transfer::None
            }
        }
        _ => Transfer::None,
    }
}

async fn track(State(t): State<Telemetry>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = Method::from_http(req.method().as_str());
    let route = crate::route::kind(req.uri().path());
    let transfer = transfer(method, route, req.uri().query());
    let id = request_id(req.headers());
    let id_str = id.to_str().unwrap_or("");
    // The caller's W3C trace, or a new one: in every log line of the
    // request, and on what the request makes berth ask of others.
    let trace = TraceContext::for_request(req.headers().get("traceparent").map(HeaderValue::as_bytes));
    // `user.name` is filled in by authentication, when it knows the user.
    let span = tracing::info_span!(
        "request",
        "trace.id" = trace.trace_hex(),
        "span.id" = trace.span_hex(),
        "http.request.id" = id_str,
        "user.name" = tracing::field::Empty
    );
    let uri = t.access_log.then(|| req.uri().clone());
    let client_ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.ip());
    let req = req.map(|b| counted(b, || t.metrics.bytes_in(route)));

    let mut resp = trace.scope(next.run(req).instrument(span.clone())).await;

    let status = resp.status().as_u16();
    let elapsed = start.elapsed();
    t.metrics.request(method, route, status, elapsed.as_secs_f64());
    let failure = (status >= 400).then(|| FailureReason::classify(status, resp.extensions().get().copied()));
    match transfer {
        Transfer::Pull => t.metrics.pull(failure),
        Transfer::Push => t.metrics.push(failure),
        Transfer::Mount if status != 202 => t.metrics.push(failure),
        _ => {}
    }
    if let Some(uri) = uri {
        let _enter = span.enter();
        let (path, query) = (uri.path(), uri.query());
        let nanos = elapsed.as_nanos() as u64;
        let mut ip_buf = [0u8; 48];
        let ip = client_ip.map(|a| ip_text(a, &mut ip_buf));
        tracing::info!(
            http.request.method = method.as_str(),
            url.path = path,
            url.query = query,
            http.response.status_code = status,
            event.duration = nanos,
            client.ip = ip,
            "request"
        );
    }
    resp.headers_mut().insert(REQUEST_ID, id);
    resp.map(|b| counted(b, || t.metrics.bytes_out(route)))
}

/// The client's address as text, by hand for IPv4: `Display` of the
/// address took 3 % of a manifest HEAD's instructions.
fn ip_text(ip: std::net::IpAddr, buf: &mut [u8; 48]) -> &str {
    let n = match ip {
        std::net::IpAddr::V4(v4) => {
            let mut n = 0;
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                if o >= 100 {
                    buf[n] = b'0' + o / 100;
                    n += 1;
                }
                if o >= 10 {
                    buf[n] = b'0' + o / 10 % 10;
                    n += 1;
                }
                buf[n] = b'0' + o % 10;
                n += 1;
            }
            n
        }
        // At most 45 characters.
        std::net::IpAddr::V6(_) => {
            let mut c = std::io::Cursor::new(&mut buf[..]);
            let _ = std::io::Write::write_fmt(&mut c, format_args!("{ip}"));
            c.position() as usize
        }
    };
    std::str::from_utf8(&buf[..n]).unwrap_or("")
}

/// Counts a body's bytes: at once when its size is known (the common case,
/// no wrapper), else frame by frame as it streams (blobs, uploads), so an
/// aborted transfer counts what was actually moved.
fn counted(body: Body, counter: impl FnOnce() -> Counter) -> Body {
    match body.size_hint().exact() {
        Some(0) => body,
        Some(n) => {
            counter().inc_by(n);
            body
        }
        None => Body::new(Counted {
            inner: body,
            counter: counter(),
        }),
    }
}

struct Counted {
    inner: Body,
    counter: Counter,
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &poll {
            if let Some(data) = frame.data_ref() {
                self.counter.inc_by(data.len() as u64);
            }
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        let mut h = HeaderMap::new();
        let a = request_id(&h);
        let b = request_id(&h);
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        h.insert(REQUEST_ID, HeaderValue::from_static("ci-job-42.step:3"));
        assert_eq!(request_id(&h), "ci-job-42.step:3");
        h.insert(REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(request_id(&h), "has space");
        h.insert(REQUEST_ID, HeaderValue::from_str(&"x".repeat(129)).unwrap());
        assert_eq!(request_id(&h).len(), 32);
        // A prefix, then the counter: consecutive ids differ by one.
        let (a, b) = (new_request_id(), new_request_id());
        let hex = |v: &HeaderValue| u128::from_str_radix(v.to_str().unwrap(), 16).unwrap();
        assert_eq!(a.to_str().unwrap()[..16], b.to_str().unwrap()[..16]);
        assert_eq!(hex(&b), hex(&a) + 1);
    }

    #[test]
    fn ip_text_is_display() {
        for ip in [
            "127.0.0.1",
            "0.0.0.0",
            "10.20.100.255",
            "9.99.199.200",
            "::1",
            "2001:db8::8a2e:370:7334",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip, &mut [0; 48]), ip.to_string());
        }
    }

    #[test]
    fn transfers() {
        use Method::*;
        assert!(transfer(Get, RouteKind::Manifest, None) == Transfer::Pull);
        assert!(transfer(Head, RouteKind::Blob, None) == Transfer::Pull);
        assert!(transfer(Put, RouteKind::Manifest, None) == Transfer::Push);
        assert!(transfer(Post, RouteKind::Upload, Some("digest=sha256:x")) == Transfer::Push);
        assert!(transfer(Post, RouteKind::Upload, Some("mount=sha256:x&from=a")) == Transfer::Mount);
        assert!(transfer(Post, RouteKind::Upload, None) == Transfer::None);
        assert!(transfer(Patch, RouteKind::Upload, None) == Transfer::None);
        assert!(transfer(Get, RouteKind::Catalog, None) == Transfer::None);
    }
}
