//! Logs: JSON lines with Elastic Common Schema field names for machines,
//! or tracing's human format for a terminal.
//!
//! A JSON line has `@timestamp`, `log.level`, `log.logger`, `message`, the
//! event's own fields (their names are already ECS: `http.request.method`,
//! `url.path`, `http.response.status_code`, `event.duration`, `client.ip`),
//! and the fields of the spans it happened in: every line logged while
//! serving a request carries that request's `trace.id` (its request id) and,
//! once authentication knows it, `user.name`.

use std::fmt;
use std::io::{IsTerminal, Write};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON otherwise.
    #[default]
    Auto,
    Json,
    Human,
}

pub fn init(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry
            .with(EcsJson {
                out: Box::new(to_stderr),
            })
            .init();
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .init();
    }
}

/// A span's fields, each value already encoded as JSON, kept in its
/// extensions.
struct SpanFields(Vec<(&'static str, String)>);

/// Encodes field values as JSON text, into the buffer `S` gives for each
/// field (or nowhere, when it gives none). Every line of every request passes
/// through here, so values are encoded straight into their text: no
/// intermediate JSON tree, no per-field map.
struct Encode<S>(S);

/// Where `Encode` puts a field's value.
trait FieldSink {
    /// The buffer to append the value of `f` to, or `None` to skip it.
    fn begin(&mut self, f: &Field) -> Option<&mut String>;
}

impl<S: FieldSink> Encode<S> {
    fn put(&mut self, f: &Field, encode: impl FnOnce(&mut String)) {
        if let Some(out) = self.0.begin(f) {
            encode(out);
        }
    }
}

impl<S: FieldSink> Visit for Encode<S> {
    fn record_str(&mut self, f: &Field, v: &str) {
        self.put(f, |out| json_str(out, v));
    }
    fn record_u64(&mut self, f: &Field, v: u64) {
        self.put(f, |out| {
            let _ = fmt::Write::write_fmt(out, format_args!("{v}"));
        });
    }
    fn record_i64(&mut self, f: &Field, v: i64) {
        self.put(f, |out| {
            let _ = fmt::Write::write_fmt(out, format_args!("{v}"));
        });
    }
    fn record_bool(&mut self, f: &Field, v: bool) {
        self.put(f, |out| out.push_str(if v { "true" } else { "false" }));
    }
    fn record_f64(&mut self, f: &Field, v: f64) {
        self.put(f, |out| {
            if v.is_finite() {
                let _ = fmt::Write::write_fmt(out, format_args!("{v}"));
            } else {
                out.push_str("null");
            }
        });
    }
    fn record_error(&mut self, f: &Field, v: &(dyn std::error::Error + 'static)) {
        self.put(f, |out| json_display(out, v));
    }
    fn record_debug(&mut self, f: &Field, v: &dyn fmt::Debug) {
        self.put(f, |out| {
            out.push('"');
            let _ = fmt::Write::write_fmt(&mut Escaping(out), format_args!("{v:?}"));
            out.push('"');
        });
    }
}

/// A span's fields: a later record of a field replaces the earlier one.
impl FieldSink for &mut Vec<(&'static str, String)> {
    fn begin(&mut self, f: &Field) -> Option<&mut String> {
        let i = match self.iter().position(|(k, _)| *k == f.name()) {
            Some(i) => {
                self[i].1.clear();
                i
            }
            None => {
                self.push((f.name(), String::new()));
                self.len() - 1
            }
        };
        Some(&mut self[i].1)
    }
}

/// The message of an event, written into the line as it is encoded.
struct Message<'a> {
    line: &'a mut String,
    found: bool,
}

impl FieldSink for Message<'_> {
    fn begin(&mut self, f: &Field) -> Option<&mut String> {
        (f.name() == "message" && !std::mem::replace(&mut self.found, true)).then_some(&mut *self.line)
    }
}

/// An event's other fields, written into the line as `,"name":value`,
/// each name once.
struct LineFields<'a> {
    line: &'a mut String,
    written: &'a mut Vec<&'static str>,
}

impl FieldSink for LineFields<'_> {
    fn begin(&mut self, f: &Field) -> Option<&mut String> {
        start_field(self.line, self.written, f.name()).then_some(&mut *self.line)
    }
}

/// Appends `v` as a JSON string.
fn json_str(out: &mut String, v: &str) {
    out.push('"');
    escape_into(out, v);
    out.push('"');
}

fn json_display(out: &mut String, v: &dyn fmt::Display) {
    out.push('"');
    let _ = fmt::Write::write_fmt(&mut Escaping(out), format_args!("{v}"));
    out.push('"');
}

/// Escapes what JSON requires inside a string: quotes, backslashes and
/// control characters.
fn escape_into(out: &mut String, v: &str) {
    let bytes = v.as_bytes();
    // Most text needs no escape: skip it eight bytes at a time.
    let plain = bytes
        .chunks_exact(8)
        .take_while(|w| !word_needs_escape(u64::from_ne_bytes((*w).try_into().expect("8 bytes"))))
        .count()
        * 8;
    let mut start = 0;
    for (i, &c) in bytes.iter().enumerate().skip(plain) {
        let esc = match c {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        // Every byte matched is ASCII, so `i` is a char boundary.
        out.push_str(&v[start..i]);
        if esc.is_empty() {
            let _ = fmt::Write::write_fmt(out, format_args!("\\u{c:04x}"));
        } else {
            out.push_str(esc);
        }
        start = i + 1;
    }
    out.push_str(&v[start..]);
}

/// Whether any of the eight bytes in `w` is a quote, a backslash or a
/// control character (below 0x20). The classic "has a byte less than n"
/// bit trick; a byte of 0x80 or above never matches.
fn word_needs_escape(w: u64) -> bool {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = ONES * 0x80;
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH;
    (below(w, 0x20) | below(w ^ (ONES * u64::from(b'"')), 1) | below(w ^ (ONES * u64::from(b'\\')), 1)) != 0
}

/// A `fmt::Write` that escapes as it appends, so `Debug` and `Display`
/// output goes into the line without a copy.
struct Escaping<'a>(&'a mut String);

impl fmt::Write for Escaping<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escape_into(self.0, s);
        Ok(())
    }
}

/// The JSON layer; `out` takes each finished line (stderr in berth).
struct EcsJson {
    out: LineOut,
}

/// Takes a finished line and its level.
type LineOut = Box<dyn Fn(&[u8], tracing::Level) + Send + Sync>;

fn to_stderr(line: &[u8], level: tracing::Level) {
    let batched = BATCH
        .try_with(|cell| match cell.borrow_mut().as_mut() {
            Some(batch) => {
                batch.push(line, level);
                true
            }
            None => false,
        })
        .unwrap_or(false);
    if !batched {
        write_stderr(line);
    }
}

fn write_stderr(bytes: &[u8]) {
    let _ = std::io::stderr().lock().write_all(bytes);
}

// The serving runtime's workers write their lines in batches. One write per
// line cost a syscall per request and, with two workers, contention for
// stderr's lock: a futex round trip for two requests in three under load
// (20-30 % of a manifest HEAD's CPU went to the access log). Other threads
// (the blocking pool, maintenance, main) write each line at once.
thread_local! {
    static BATCH: std::cell::RefCell<Option<Batch>> = const { std::cell::RefCell::new(None) };
}

/// A batch is written when it holds `BATCH_BYTES`, when its oldest line is
/// `BATCH_AGE` old as another comes, before a warning or an error (so those
/// reach the log at once, after what came before them), when the worker
/// goes idle (`on_worker_park`) and when the thread ends. So lines wait only
/// while their worker stays busy, and a crash loses at most that.
const BATCH_BYTES: usize = 32 * 1024;
const BATCH_AGE: std::time::Duration = std::time::Duration::from_millis(100);

struct Batch {
    buf: Vec<u8>,
    /// When the oldest line in `buf` came.
    since: Option<std::time::Instant>,
    sink: fn(&[u8]),
}

impl Batch {
    fn new(sink: fn(&[u8])) -> Batch {
        Batch {
            buf: Vec::with_capacity(BATCH_BYTES),
            since: None,
            sink,
        }
    }

    fn push(&mut self, line: &[u8], level: tracing::Level) {
        self.buf.extend_from_slice(line);
        let now = std::time::Instant::now();
        let since = *self.since.get_or_insert(now);
        // More verbose levels compare greater: WARN and ERROR are urgent.
        if level <= tracing::Level::WARN || self.buf.len() >= BATCH_BYTES || now - since >= BATCH_AGE {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if !self.buf.is_empty() {
            (self.sink)(&self.buf);
            self.buf.clear();
        }
        self.since = None;
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The serving runtime's park hook: only its workers park, so the first
/// call makes this thread batch its lines, and every call writes them.
pub fn on_worker_park() {
    let _ = BATCH.try_with(|cell| {
        let mut batch = cell.borrow_mut();
        match batch.as_mut() {
            Some(b) => b.flush(),
            None => *batch = Some(Batch::new(write_stderr)),
        }
    });
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for EcsJson {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Vec::new();
        attrs.record(&mut Encode(&mut fields));
        span.extensions_mut().insert(SpanFields(fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        if let Some(f) = ext.get_mut::<SpanFields>() {
            values.record(&mut Encode(&mut f.0));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        thread_local! {
            static LINE: std::cell::RefCell<(String, Vec<&'static str>)> =
                const { std::cell::RefCell::new((String::new(), Vec::new())) };
        }
        LINE.with_borrow_mut(|(line, written)| {
            line.clear();
            line.push_str("{\"@timestamp\":\"");
            observe::time::rfc3339_into(line, std::time::SystemTime::now());
            let meta = event.metadata();
            line.push_str("\",\"log.level\":\"");
            line.push_str(level_name(meta.level()));
            line.push_str("\",\"log.logger\":");
            json_str(line, meta.target());
            line.push_str(",\"message\":");
            let mut message = Encode(Message { line, found: false });
            event.record(&mut message);
            if !message.0.found {
                line.push_str("\"\"");
            }
            // The first field of a name wins: the line's own, then the
            // event's, then the spans', innermost first.
            written.clear();
            written.extend_from_slice(&RESERVED);
            event.record(&mut Encode(LineFields { line, written }));
            if let Some(scope) = ctx.event_scope(event) {
                for span in scope {
                    if let Some(f) = span.extensions().get::<SpanFields>() {
                        for (k, v) in &f.0 {
                            field(line, written, k, v);
                        }
                    }
                }
            }
            line.push_str("}\n");
            (self.out)(line.as_bytes(), *meta.level());
        });
    }
}

/// Names the line itself sets; a field of the same name is dropped.
const RESERVED: [&str; 4] = ["@timestamp", "log.level", "log.logger", "message"];

/// Appends `"k":v` unless a field named `k` is already in the line.
fn field(line: &mut String, written: &mut Vec<&'static str>, k: &'static str, v: &str) {
    if start_field(line, written, k) {
        line.push_str(v);
    }
}

/// Appends `,"k":`, for a value to follow, unless a field named `k` is
/// already in the line; whether it did.
fn start_field(line: &mut String, written: &mut Vec<&'static str>, k: &'static str) -> bool {
    if written.contains(&k) {
        return false;
    }
    written.push(k);
    line.push(',');
    json_str(line, k);
    line.push(':');
    true
}

fn level_name(l: &tracing::Level) -> &'static str {
    match *l {
        tracing::Level::ERROR => "error",
        tracing::Level::WARN => "warn",
        tracing::Level::INFO => "info",
        tracing::Level::DEBUG => "debug",
        tracing::Level::TRACE => "trace",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_word_check_finds_exactly_the_bytes_to_escape() {
        for fill in [b'a', 0x7f, 0x80, 0xff, b' '] {
            assert!(!word_needs_escape(u64::from_ne_bytes([fill; 8])));
            for byte in 0..=255u8 {
                for at in 0..8 {
                    let mut w = [fill; 8];
                    w[at] = byte;
                    let want = byte < 0x20 || byte == b'"' || byte == b'\\';
                    assert_eq!(word_needs_escape(u64::from_ne_bytes(w)), want, "{byte:#x} at {at}");
                }
            }
        }
    }

    #[test]
    fn escaping_makes_valid_json_strings() {
        for s in [
            "plain",
            "quote \" and \\ backslash",
            "nl\ncr\rtab\t",
            "\u{1}\u{1f}ctl",
            "ünï ✓",
            "",
        ] {
            let mut out = String::new();
            json_str(&mut out, s);
            let back: String = serde_json::from_str(&out).unwrap();
            assert_eq!(back, s, "{out}");
        }
        // Every ASCII character, and multi-byte ones around them.
        let all: String = (0u8..0x80).map(char::from).chain("é✓𝄞".chars()).collect();
        let mut out = String::new();
        json_str(&mut out, &all);
        assert_eq!(serde_json::from_str::<String>(&out).unwrap(), all);
        // Each special byte at each place in and after the words skipped.
        for special in (0u8..0x20).chain([b'"', b'\\']) {
            for at in 0..20 {
                let mut s: Vec<u8> = "abcdefghijklmnopqrstu✓".bytes().collect();
                s[at] = special;
                let s = String::from_utf8(s).unwrap();
                let mut out = String::new();
                json_str(&mut out, &s);
                assert_eq!(serde_json::from_str::<String>(&out).unwrap(), s, "{out}");
            }
        }
    }

    thread_local! {
        static WRITTEN: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    fn record(bytes: &[u8]) {
        WRITTEN.with_borrow_mut(|w| w.push(bytes.to_vec()));
    }

    fn writes() -> Vec<Vec<u8>> {
        WRITTEN.with_borrow_mut(std::mem::take)
    }

    #[test]
    fn a_batch_writes_when_full_before_a_warning_and_when_dropped() {
        use tracing::Level;
        let mut b = Batch::new(record);
        b.push(b"a\n", Level::INFO);
        b.push(b"b\n", Level::DEBUG);
        assert!(writes().is_empty(), "info and debug lines wait");
        b.push(b"w\n", Level::WARN);
        assert_eq!(
            writes(),
            [b"a\nb\nw\n".to_vec()],
            "a warning takes the waiting lines with it"
        );
        b.push(b"e\n", Level::ERROR);
        assert_eq!(writes(), [b"e\n".to_vec()]);
        let long = vec![b'x'; BATCH_BYTES / 2];
        b.push(&long, Level::INFO);
        assert!(writes().is_empty());
        b.push(&long, Level::INFO);
        assert_eq!(writes().concat().len(), BATCH_BYTES, "a full batch is written");
        b.push(b"c\n", Level::INFO);
        b.flush();
        assert_eq!(writes(), [b"c\n".to_vec()], "the park hook's flush");
        b.flush();
        assert!(writes().is_empty(), "nothing to write, no empty write");
        b.push(b"d\n", Level::INFO);
        drop(b);
        assert_eq!(
            writes(),
            [b"d\n".to_vec()],
            "what is left is written when the thread ends"
        );
    }

    #[test]
    fn an_old_line_goes_out_with_the_next() {
        let mut b = Batch::new(record);
        b.push(b"old\n", tracing::Level::INFO);
        b.since = Some(std::time::Instant::now() - BATCH_AGE);
        b.push(b"new\n", tracing::Level::INFO);
        assert_eq!(writes(), [b"old\nnew\n".to_vec()]);
    }

    /// What the JSON layer writes while `f` runs.
    fn capture(f: impl FnOnce()) -> String {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::SubscriberExt;
        let lines = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = lines.clone();
        let layer = EcsJson {
            out: Box::new(move |l, _| sink.lock().unwrap().extend_from_slice(l)),
        };
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), f);
        let out = lines.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_line_without_a_message_keeps_its_own_names() {
        let out = capture(|| tracing::info!(log.level = "forged", count = 3u64));
        let v: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(v["message"], "");
        assert_eq!(v["log.level"], "info");
        assert_eq!(v["count"], 3);
        assert_eq!(out.matches("log.level").count(), 1, "{out}");
    }

    #[test]
    fn a_line_is_one_json_object_with_the_span_fields() {
        let out = capture(|| {
            let span = tracing::info_span!("request", "trace.id" = "t-1", "user.name" = tracing::field::Empty);
            span.record("user.name", "alice");
            let _in = span.enter();
            let inner = tracing::info_span!("inner", "trace.id" = "t-inner");
            let _inner = inner.enter();
            tracing::warn!(url.path = "/v2/a\"b", http.response.status_code = 404u64, ratio = 0.5, ok = false,
                err = ?"x\ny", "no \"such\" thing");
        });
        assert!(out.ends_with('\n') && out.lines().count() == 1, "{out}");
        let v: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(v["log.level"], "warn");
        assert_eq!(v["message"], "no \"such\" thing");
        assert_eq!(v["url.path"], "/v2/a\"b");
        assert_eq!(v["http.response.status_code"], 404);
        assert_eq!(v["ratio"], 0.5);
        assert_eq!(v["ok"], false);
        assert_eq!(v["err"], "\"x\\ny\"");
        // The innermost span wins; outer fields still appear.
        assert_eq!(v["trace.id"], "t-inner");
        assert_eq!(v["user.name"], "alice");
        assert!(v["@timestamp"].as_str().unwrap().ends_with('Z'));
        assert_eq!(v["log.logger"], module_path!());
    }
}
