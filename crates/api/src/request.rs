//! Reading requests: query parameters, ranges and bodies.

use std::future::Future;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap};
use futures_util::{Stream, StreamExt};
use oci::ErrorCode;
use storage::ByteStream;

use crate::error::ApiError;

/// Decoded query parameters, in order; a key may repeat (`?tag=a&tag=b`).
#[derive(Debug, Default)]
pub struct Query(Vec<(String, String)>);

impl Query {
    pub fn parse(raw: Option<&str>) -> Query {
        Query(
            form_urlencoded::parse(raw.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0.iter().filter(move |(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The page size `n`; a value that is not a number is a client error.
    pub fn n(&self) -> Result<Option<usize>, ApiError> {
        self.get("n")
            .map(|v| {
                v.parse::<usize>()
                    .map_err(|_| ApiError::new(ErrorCode::Unsupported, format!("n={v:?} is not a page size")))
            })
            .transpose()
    }
}

/// The request body as a stream of bytes for the blob store. A client that
/// sends nothing for `idle` fails the request, so a stalled (or slowloris)
/// upload cannot hold a worker and an upload lock forever.
pub fn body_stream(body: Body, idle: Duration) -> ByteStream {
    Box::pin(IdleBody {
        data: body.into_data_stream(),
        idle,
        timer: Box::pin(tokio::time::sleep(idle)),
        fresh: true,
        done: false,
    })
}

/// A body stream that fails after `idle` without data. The timer is armed
/// only when the body has to wait, and re-armed only after data came since,
/// so a fast upload costs no timer work per chunk.
struct IdleBody {
    data: axum::body::BodyDataStream,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// Data arrived since the timer was last armed.
    fresh: bool,
    done: bool,
}

impl Stream for IdleBody {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.data.poll_next_unpin(cx) {
            Poll::Ready(Some(item)) => {
                self.fresh = true;
                return Poll::Ready(Some(item.map_err(io::Error::other)));
            }
            Poll::Ready(None) => {
                self.done = true;
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        if self.fresh {
            self.fresh = false;
            let deadline = tokio::time::Instant::now() + self.idle;
            self.timer.as_mut().reset(deadline);
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.done = true;
                Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no request data for {} s", self.idle.as_secs()),
                ))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Resolves a `Range` header against a blob of `size` bytes. Forms other
/// than one `bytes=` range are ignored (the whole blob is served), as HTTP
/// allows; a range starting beyond the end, or ending before it starts, is
/// `RANGE_INVALID` (416) rather than the whole blob, so the client learns
/// that its request was wrong.
pub fn byte_range(headers: &HeaderMap, size: u64) -> Result<Option<Range<u64>>, ApiError> {
    let Some(spec) = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let unsatisfiable = |why: &str| {
        ApiError::new(
            ErrorCode::RangeInvalid,
            format!("range {spec:?} {why}; the blob has {size} bytes"),
        )
        .with_header(
            header::CONTENT_RANGE,
            format!("bytes */{size}").parse().expect("valid header"),
        )
    };
    let range = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let Ok(len) = suffix.parse::<u64>() else {
                return Ok(None);
            };
            if len == 0 || size == 0 {
                return Err(unsatisfiable("selects no bytes"));
            }
            size.saturating_sub(len)..size
        }
        (start, end) => {
            let Ok(start) = start.parse::<u64>() else {
                return Ok(None);
            };
            let end = if end.is_empty() {
                size.saturating_sub(1)
            } else {
                let Ok(end) = end.parse::<u64>() else {
                    return Ok(None);
                };
                if end < start {
                    return Err(unsatisfiable("ends before it starts"));
                }
                end.min(size.saturating_sub(1))
            };
            if start >= size {
                return Err(unsatisfiable("starts past the end"));
            }
            start..end + 1
        }
    };
    Ok(Some(range))
}

/// The `Content-Range` of an upload chunk, `<start>-<end>` (also accepted
/// with a `bytes` prefix). Returns the start and the inclusive end.
pub fn chunk_range(headers: &HeaderMap) -> Result<Option<(u64, u64)>, ApiError> {
    let Some(v) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::new(
            ErrorCode::RangeInvalid,
            "Content-Range must be <start>-<end>, the inclusive byte offsets of the chunk",
        )
    };
    let s = v.to_str().map_err(|_| bad())?.trim();
    let s = s
        .strip_prefix("bytes")
        .map(|s| s.trim_start_matches([' ', '=']))
        .unwrap_or(s);
    let s = s.split('/').next().unwrap_or(s);
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b) = (
        a.trim().parse::<u64>().map_err(|_| bad())?,
        b.trim().parse::<u64>().map_err(|_| bad())?,
    );
    if b < a {
        return Err(bad());
    }
    Ok(Some((a, b)))
}

pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(h: &str, size: u64) -> Result<Option<Range<u64>>, ErrorCode> {
        let mut headers = HeaderMap::new();
        headers.insert(header::RANGE, h.parse().unwrap());
        byte_range(&headers, size).map_err(|e| e.error.code)
    }

    #[test]
    fn ranges() {
        assert_eq!(range("bytes=0-0", 10), Ok(Some(0..1)));
        assert_eq!(range("bytes=2-5", 10), Ok(Some(2..6)));
        assert_eq!(range("bytes=2-", 10), Ok(Some(2..10)));
        assert_eq!(range("bytes=5-100", 10), Ok(Some(5..10)));
        assert_eq!(range("bytes=-3", 10), Ok(Some(7..10)));
        assert_eq!(range("bytes=-30", 10), Ok(Some(0..10)));
        assert_eq!(range("bytes=10-", 10), Err(ErrorCode::RangeInvalid));
        assert_eq!(range("bytes=10-20", 10), Err(ErrorCode::RangeInvalid));
        assert_eq!(range("bytes=0-1,3-4", 10), Ok(None));
        assert_eq!(range("items=0-1", 10), Ok(None));
        assert_eq!(range("bytes=5-2", 10), Err(ErrorCode::RangeInvalid));
        assert_eq!(range("bytes=x-2", 10), Ok(None));
    }

    #[test]
    fn chunk_ranges() {
        let cr = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_RANGE, v.parse().unwrap());
            chunk_range(&h).map_err(|e| e.error.code)
        };
        assert_eq!(cr("0-99"), Ok(Some((0, 99))));
        assert_eq!(cr("bytes 100-199/*"), Ok(Some((100, 199))));
        assert_eq!(cr("bytes=5-9"), Ok(Some((5, 9))));
        assert_eq!(cr("9-5"), Err(ErrorCode::RangeInvalid));
        assert_eq!(cr("abc"), Err(ErrorCode::RangeInvalid));
    }

    #[test]
    fn queries() {
        let q = Query::parse(Some("tag=a&tag=b%2Dc&n=5&ns=docker.io"));
        assert_eq!(q.all("tag").collect::<Vec<_>>(), vec!["a", "b-c"]);
        assert_eq!(q.n().unwrap(), Some(5));
        assert!(Query::parse(Some("n=x")).n().is_err());
    }
}

#[cfg(test)]
mod fuzz {
    use axum::http::{header, HeaderMap, HeaderValue};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn header_parsers_never_panic(v in "[ -~]{0,40}", size in any::<u64>()) {
            let mut h = HeaderMap::new();
            if let Ok(val) = HeaderValue::from_str(&v) {
                h.insert(header::RANGE, val.clone());
                h.insert(header::CONTENT_RANGE, val);
            }
            if let Ok(Some(r)) = super::byte_range(&h, size) {
                prop_assert!(r.start < r.end && r.end <= size);
            }
            let _ = super::chunk_range(&h);
            let _ = super::Query::parse(Some(&v)).n();
        }
    }
}
