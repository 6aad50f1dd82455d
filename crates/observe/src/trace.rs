//! W3C Trace Context (`traceparent`): the trace a request belongs to, taken
//! from the caller or started here, kept for the request's task so that
//! what berth asks of others on its behalf (the pull-through cache's
//! upstream) carries the same trace.
//!
//! The header is `version-traceid-parentid-flags` in lowercase hex
//! (`00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`). An invalid
//! one is ignored and a new trace is started, as the recommendation says: a
//! malformed header from a client must never break a pull.

use std::fmt;

/// The trace a request belongs to and its own span in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// This process's span: the parent of any request made on its behalf.
    pub span_id: [u8; 8],
    /// The caller's span, when the trace came with the request.
    pub parent_id: Option<[u8; 8]>,
    /// Trace flags; bit 0 is "sampled".
    pub flags: u8,
}

tokio::task_local! {
    static CURRENT: TraceContext;
}

impl TraceContext {
    /// The context of a request with this `traceparent` header (if any): a
    /// new span in the caller's trace, or a new trace when the header is
    /// missing or invalid.
    pub fn for_request(traceparent: Option<&[u8]>) -> TraceContext {
        match traceparent.and_then(parse) {
            Some(p) => TraceContext {
                trace_id: p.trace_id,
                span_id: random_span_id(),
                parent_id: Some(p.parent_id),
                flags: p.flags,
            },
            None => TraceContext {
                trace_id: random_trace_id(),
                span_id: random_span_id(),
                parent_id: None,
                flags: 0,
            },
        }
    }

    /// The `traceparent` header for a request made from this span.
    pub fn header(&self) -> String {
        format!("00-{}-{}-{:02x}", hex(&self.trace_id), hex(&self.span_id), self.flags)
    }

    pub fn trace_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub fn span_hex(&self) -> String {
        hex(&self.span_id)
    }

    /// Runs `f` with this context as the task's current one.
    pub async fn scope<F: std::future::Future>(self, f: F) -> F::Output {
        CURRENT.scope(self, f).await
    }

    /// The context of the request this task serves, if any.
    pub fn current() -> Option<TraceContext> {
        CURRENT.try_with(|c| *c).ok()
    }

    /// `f` with the current context, for a task spawned on the request's
    /// behalf (a cache fill): what it asks of others joins the same trace.
    pub fn carry<F: std::future::Future>(f: F) -> impl std::future::Future<Output = F::Output> {
        let current = Self::current();
        async move {
            match current {
                Some(c) => c.scope(f).await,
                None => f.await,
            }
        }
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.header())
    }
}

/// What a valid `traceparent` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

/// Parses a `traceparent` value. Version 00 is exactly 55 characters; a
/// later version may append fields after a `-`, which are ignored; version
/// ff, upper-case hex, and all-zero ids are invalid.
pub fn parse(value: &[u8]) -> Option<Parent> {
    let v = std::str::from_utf8(value).ok()?.trim_matches([' ', '\t']);
    if v.len() < 55 || !v.is_char_boundary(55) {
        return None;
    }
    let (head, rest) = v.split_at(55);
    let mut parts = head.split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let version = unhex::<1>(version)?[0];
    if version == 0xff
        || (version == 0 && !rest.is_empty())
        || (version != 0 && !(rest.is_empty() || rest.starts_with('-')))
    {
        return None;
    }
    let trace_id = unhex::<16>(trace)?;
    let parent_id = unhex::<8>(parent)?;
    let flags = unhex::<1>(flags)?[0];
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some(Parent {
        trace_id,
        parent_id,
        flags,
    })
}

/// `N` bytes from exactly `2N` lowercase hex digits.
fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Random ids from the OS; never all zeros (which would be invalid).
fn random_trace_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    while id == [0; 16] {
        fill(&mut id);
    }
    id
}

fn random_span_id() -> [u8; 8] {
    let mut id = [0u8; 8];
    while id == [0; 8] {
        fill(&mut id);
    }
    id
}

fn fill(buf: &mut [u8]) {
    if getrandom::fill(buf).is_err() {
        // No OS randomness (not seen on Linux): ids from the clock and a
        // counter, unique enough to correlate logs.
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(1);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let x = (t ^ N.fetch_add(1, Ordering::Relaxed).rotate_left(32)).to_le_bytes();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = x[i % 8] ^ (i as u8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_specs_example() {
        let p = parse(GOOD.as_bytes()).unwrap();
        assert_eq!(hex(&p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&p.parent_id), "00f067aa0ba902b7");
        assert_eq!(p.flags, 1);
    }

    #[test]
    fn refuses_what_the_spec_calls_invalid() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(parse(bad.as_bytes()), None, "{bad}");
        }
        // A later version may carry more fields.
        assert!(parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes").is_some());
        // Multi-byte text never panics at the cut.
        assert_eq!(
            parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b€-01".as_bytes()),
            None
        );
    }

    #[test]
    fn a_request_joins_the_callers_trace_with_a_span_of_its_own() {
        let c = TraceContext::for_request(Some(GOOD.as_bytes()));
        assert_eq!(c.trace_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.parent_id.map(|p| hex(&p)).as_deref(), Some("00f067aa0ba902b7"));
        assert_ne!(c.span_hex(), "00f067aa0ba902b7");
        let h = c.header();
        assert_eq!(parse(h.as_bytes()).map(|p| p.trace_id), Some(c.trace_id));
        // Without one (or with a bad one), a new trace.
        let (a, b) = (
            TraceContext::for_request(None),
            TraceContext::for_request(Some(b"junk")),
        );
        assert_ne!(a.trace_id, b.trace_id);
        assert_eq!(a.parent_id, None);
    }

    #[test]
    fn arbitrary_input_never_panics() {
        let mut x: u64 = 7;
        for len in 0..120 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    b"0123456789abcdef-Zz\xe2"[(x % 20) as usize]
                })
                .collect();
            let _ = parse(&bytes);
        }
    }

    #[tokio::test]
    async fn the_context_is_the_tasks() {
        assert_eq!(TraceContext::current(), None);
        let c = TraceContext::for_request(None);
        let seen = c.scope(async { TraceContext::current() }).await;
        assert_eq!(seen, Some(c));
        // A spawned task sees it only when it is carried.
        let (carried, lost) = c
            .scope(async {
                let carried = tokio::spawn(TraceContext::carry(async { TraceContext::current() }));
                let lost = tokio::spawn(async { TraceContext::current() });
                (carried.await.unwrap(), lost.await.unwrap())
            })
            .await;
        assert_eq!((carried, lost), (Some(c), None));
    }
}
