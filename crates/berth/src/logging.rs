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

use serde_json::{Map, Value};
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
        registry.with(EcsJson).init();
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

/// The fields of a span, kept in its extensions.
struct SpanFields(Map<String, Value>);

struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, f: &Field, v: &str) {
        self.0.insert(f.name().to_string(), Value::from(v));
    }
    fn record_u64(&mut self, f: &Field, v: u64) {
        self.0.insert(f.name().to_string(), Value::from(v));
    }
    fn record_i64(&mut self, f: &Field, v: i64) {
        self.0.insert(f.name().to_string(), Value::from(v));
    }
    fn record_bool(&mut self, f: &Field, v: bool) {
        self.0.insert(f.name().to_string(), Value::from(v));
    }
    fn record_f64(&mut self, f: &Field, v: f64) {
        self.0.insert(f.name().to_string(), Value::from(v));
    }
    fn record_error(&mut self, f: &Field, v: &(dyn std::error::Error + 'static)) {
        self.0.insert(f.name().to_string(), Value::from(v.to_string()));
    }
    fn record_debug(&mut self, f: &Field, v: &dyn fmt::Debug) {
        self.0.insert(f.name().to_string(), Value::from(format!("{v:?}")));
    }
}

/// The JSON layer. Each line is built whole and written with one call, so
/// lines from different threads never interleave.
struct EcsJson;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for EcsJson {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut map = Map::new();
        attrs.record(&mut Fields(&mut map));
        span.extensions_mut().insert(SpanFields(map));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        if let Some(f) = ext.get_mut::<SpanFields>() {
            values.record(&mut Fields(&mut f.0));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut line = Map::new();
        line.insert(
            "@timestamp".into(),
            Value::from(observe::time::rfc3339(std::time::SystemTime::now())),
        );
        let meta = event.metadata();
        line.insert(
            "log.level".into(),
            Value::from(meta.level().as_str().to_ascii_lowercase()),
        );
        line.insert("log.logger".into(), Value::from(meta.target()));
        let mut fields = Map::new();
        event.record(&mut Fields(&mut fields));
        line.insert(
            "message".into(),
            fields.remove("message").unwrap_or_else(|| Value::from("")),
        );
        line.extend(fields);
        // Innermost span first, so its fields win over outer ones.
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope {
                if let Some(f) = span.extensions().get::<SpanFields>() {
                    for (k, v) in &f.0 {
                        line.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                }
            }
        }
        let mut buf = Value::Object(line).to_string();
        buf.push('\n');
        let _ = std::io::stderr().lock().write_all(buf.as_bytes());
    }
}
