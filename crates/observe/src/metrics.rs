//! Every metric berth exports, in one registry.
//!
//! The request path is hot (tens of thousands of requests per second), so
//! per-route metrics are created once, up front, in arrays indexed by
//! `RouteKind`: recording one is an array index and an atomic add, with no
//! label building, no allocation and no lock. Only the request counter
//! (method × route × status) goes through a label family, whose lookup is a
//! hash of three small integers under a read lock.
//!
//! Labels stay low-cardinality: no repository, tag or digest, ever.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::process::ProcessCollector;

/// What an HTTP request addresses, for labels. Fixed and small on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteKind {
    /// `/v2/`: the API version check.
    Base,
    Manifest,
    Blob,
    Upload,
    Catalog,
    Tags,
    Referrers,
    Token,
    /// `/healthz`, `/livez`, `/readyz`, `/metrics`.
    Ops,
    /// Anything else (answered 404).
    Other,
}

impl RouteKind {
    pub const ALL: [RouteKind; 10] = [
        RouteKind::Base,
        RouteKind::Manifest,
        RouteKind::Blob,
        RouteKind::Upload,
        RouteKind::Catalog,
        RouteKind::Tags,
        RouteKind::Referrers,
        RouteKind::Token,
        RouteKind::Ops,
        RouteKind::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Base => "base",
            RouteKind::Manifest => "manifest",
            RouteKind::Blob => "blob",
            RouteKind::Upload => "upload",
            RouteKind::Catalog => "catalog",
            RouteKind::Tags => "tags",
            RouteKind::Referrers => "referrers",
            RouteKind::Token => "token",
            RouteKind::Ops => "ops",
            RouteKind::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The HTTP method, as a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Get,
    Head,
    Put,
    Post,
    Patch,
    Delete,
    Options,
    Other,
}

impl Method {
    pub fn from_http(m: &str) -> Method {
        match m {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "PUT" => Method::Put,
            "POST" => Method::Post,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            "OPTIONS" => Method::Options,
            _ => Method::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Put => "PUT",
            Method::Post => "POST",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
            Method::Options => "OPTIONS",
            Method::Other => "other",
        }
    }
}

/// Why a pull or push failed. The alert rules and the operations guide use
/// these names; `internal` covers berth's own 5xx errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    NotFound,
    Denied,
    Timeout,
    Upstream,
    Quota,
    Invalid,
    Internal,
}

impl FailureReason {
    pub const ALL: [FailureReason; 7] = [
        FailureReason::NotFound,
        FailureReason::Denied,
        FailureReason::Timeout,
        FailureReason::Upstream,
        FailureReason::Quota,
        FailureReason::Invalid,
        FailureReason::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::NotFound => "not_found",
            FailureReason::Denied => "denied",
            FailureReason::Timeout => "timeout",
            FailureReason::Upstream => "upstream",
            FailureReason::Quota => "quota",
            FailureReason::Invalid => "invalid",
            FailureReason::Internal => "internal",
        }
    }

    /// The reason for a failed response: from the OCI error code when the
    /// response carries one, else from the status.
    pub fn classify(status: u16, code: Option<oci::ErrorCode>) -> FailureReason {
        use oci::ErrorCode as C;
        match code {
            Some(C::BlobUnknown | C::BlobUploadUnknown | C::ManifestUnknown | C::NameUnknown | C::NotFound) => {
                return FailureReason::NotFound
            }
            Some(C::Unauthorized | C::Denied) => return FailureReason::Denied,
            Some(C::TooManyRequests) => return FailureReason::Quota,
            Some(C::Unavailable) => return FailureReason::Upstream,
            Some(C::Internal) => return FailureReason::Internal,
            _ => {}
        }
        match status {
            404 => FailureReason::NotFound,
            401 | 403 => FailureReason::Denied,
            408 | 504 => FailureReason::Timeout,
            502 | 503 => FailureReason::Upstream,
            429 | 507 => FailureReason::Quota,
            400..=499 => FailureReason::Invalid,
            _ => FailureReason::Internal,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

macro_rules! label_value {
    ($t:ty) => {
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    };
}
label_value!(RouteKind);
label_value!(Method);
label_value!(FailureReason);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    method: Method,
    route: RouteKind,
    status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    route: RouteKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: FailureReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct DependencyLabels {
    pub dependency: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SignatureLabels {
    result: &'static str,
    mode: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DeliveryLabels {
    endpoint: String,
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

/// Latency buckets, in seconds: from a cached manifest (sub-millisecond) to
/// a large blob (tens of seconds).
const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Counters kept as plain atomics by a lower layer (the registry's event
/// recorder) and exported as Prometheus counters at scrape time.
#[derive(Debug, Default)]
pub struct EventRecorderCounters {
    /// Events written to the outbox.
    pub recorded: AtomicU64,
    /// Pull events dropped because the recording queue was full.
    pub dropped: AtomicU64,
    /// Events that could not be written to the outbox (a metadata error).
    pub lost: AtomicU64,
}

#[derive(Debug)]
struct RecorderCollector(Arc<EventRecorderCounters>);

/// Access-control counters, kept by `auth` as plain atomics.
#[derive(Debug, Default)]
pub struct AuthCounters {
    /// Password or robot-secret verifications (argon2 runs), including the
    /// one against a dummy hash for unknown accounts.
    pub password_verifications: AtomicU64,
    /// Times an (account, address) pair or an address was locked out after
    /// too many failed logins.
    pub lockouts: AtomicU64,
}

#[derive(Debug)]
struct AuthCollector(Arc<AuthCounters>);

impl Collector for AuthCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, v) in [
            (
                "berth_password_verifications",
                "Password and robot-secret verifications (argon2), unknown accounts included",
                &self.0.password_verifications,
            ),
            (
                "berth_login_lockouts",
                "Lockouts of an (account, client address) pair or a client address after failed logins",
                &self.0.lockouts,
            ),
        ] {
            let counter = ConstCounter::new(v.load(Ordering::Relaxed));
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        Ok(())
    }
}

impl Collector for RecorderCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.0;
        for (name, help, v) in [
            (
                "berth_events_recorded",
                "Events written to the durable outbox",
                &c.recorded,
            ),
            (
                "berth_events_dropped",
                "Pull events dropped because the recording queue was full (pushes and deletes are never dropped)",
                &c.dropped,
            ),
            (
                "berth_events_lost",
                "Events that could not be written to the outbox because the metadata store failed",
                &c.lost,
            ),
        ] {
            let counter = ConstCounter::new(v.load(Ordering::Relaxed));
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        Ok(())
    }
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Vec<Histogram>,
    bytes_in: Vec<Counter>,
    bytes_out: Vec<Counter>,
    pulls: Counter,
    pull_failures: Vec<Counter>,
    pushes: Counter,
    push_failures: Vec<Counter>,
    storage_objects: Family<KindLabels, Gauge>,
    storage_bytes: Gauge,
    uploads_in_flight: Gauge,
    disk_used: Gauge,
    disk_available: Gauge,
    disk_size: Gauge,
    health_status: Family<DependencyLabels, Gauge>,
    health_failures: Family<DependencyLabels, Counter>,
    signature_decisions: Family<SignatureLabels, Counter>,
    events_pending: Family<EndpointLabels, Gauge>,
    deliveries: Family<DeliveryLabels, Counter>,
    pub recorder: Arc<EventRecorderCounters>,
    pub auth: Arc<AuthCounters>,
    pub proxy: crate::proxy_metrics::ProxyMetrics,
    pub connections: ConnectionMetrics,
}

/// What the server's accept loop and connection streams count.
#[derive(Clone, Default)]
pub struct ConnectionMetrics {
    open: Gauge,
    refused: Counter,
    write_timeouts: Counter,
}

impl ConnectionMetrics {
    fn register(r: &mut Registry) -> ConnectionMetrics {
        let c = ConnectionMetrics::default();
        r.register("berth_connections_open", "Client connections open now", c.open.clone());
        r.register(
            "berth_connections_refused",
            "Client connections closed at accept because --max-connections were open",
            c.refused.clone(),
        );
        r.register(
            "berth_connection_write_timeouts",
            "Client connections closed because the client read nothing for --client-timeout",
            c.write_timeouts.clone(),
        );
        c
    }

    pub fn opened(&self) {
        self.open.inc();
    }

    pub fn closed(&self) {
        self.open.dec();
    }

    pub fn refused(&self) {
        self.refused.inc();
    }

    pub fn write_timed_out(&self) {
        self.write_timeouts.inc();
    }

    pub fn write_timeouts(&self) -> u64 {
        self.write_timeouts.get()
    }
}

/// Creates one counter per route kind, registered as one family.
fn per_route(registry: &mut Registry, name: &str, help: &str) -> Vec<Counter> {
    let family = Family::<RouteLabels, Counter>::default();
    let out = RouteKind::ALL
        .iter()
        .map(|&route| family.get_or_create_owned(&RouteLabels { route }))
        .collect();
    registry.register(name, help, family);
    out
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        r.register(
            "berth_http_requests",
            "HTTP requests by method, route kind and status code",
            requests.clone(),
        );
        let latency: Vec<Histogram> = {
            let family: Family<RouteLabels, Histogram, fn() -> Histogram> =
                Family::new_with_constructor(latency_histogram);
            let out = RouteKind::ALL
                .iter()
                .map(|&route| family.get_or_create_owned(&RouteLabels { route }))
                .collect();
            r.register(
                "berth_http_request_duration_seconds",
                "Time from receiving a request to sending the response head, by route kind",
                family,
            );
            out
        };
        let bytes_in = per_route(
            &mut r,
            "berth_http_received_bytes",
            "Request body bytes received, by route kind",
        );
        let bytes_out = per_route(
            &mut r,
            "berth_http_sent_bytes",
            "Response body bytes sent, by route kind",
        );
        let pulls = Counter::default();
        r.register(
            "berth_pulls",
            "Pull attempts: GET or HEAD of a manifest or blob, successful or not",
            pulls.clone(),
        );
        let reasons = |r: &mut Registry, name: &str, help: &str| -> Vec<Counter> {
            let family = Family::<ReasonLabels, Counter>::default();
            let out = FailureReason::ALL
                .iter()
                .map(|&reason| family.get_or_create_owned(&ReasonLabels { reason }))
                .collect();
            r.register(name, help, family);
            out
        };
        let pull_failures = reasons(
            &mut r,
            "berth_pull_failures",
            "Failed pulls by reason (not_found, denied, timeout, upstream, quota, invalid, internal)",
        );
        let pushes = Counter::default();
        r.register(
            "berth_pushes",
            "Push attempts: manifest PUT, and blob upload completions and mounts",
            pushes.clone(),
        );
        let push_failures = reasons(&mut r, "berth_push_failures", "Failed pushes by reason.");
        let storage_objects = Family::<KindLabels, Gauge>::default();
        r.register(
            "berth_storage_objects",
            "Objects in the metadata store by kind (repository, manifest, tag, blob, upload)",
            storage_objects.clone(),
        );
        let storage_bytes = Gauge::default();
        r.register(
            "berth_storage_blob_bytes",
            "Bytes of committed blobs, each counted once however many repositories link it",
            storage_bytes.clone(),
        );
        let uploads_in_flight = Gauge::default();
        r.register(
            "berth_uploads_in_flight",
            "Upload sessions started and not yet completed or cancelled",
            uploads_in_flight.clone(),
        );
        let disk_used = Gauge::default();
        r.register(
            "berth_disk_used_bytes",
            "Bytes used on the filesystem holding the data directory",
            disk_used.clone(),
        );
        let disk_available = Gauge::default();
        r.register(
            "berth_disk_available_bytes",
            "Bytes available to berth on the filesystem holding the data directory",
            disk_available.clone(),
        );
        let disk_size = Gauge::default();
        r.register(
            "berth_disk_size_bytes",
            "Size of the filesystem holding the data directory",
            disk_size.clone(),
        );
        let health_status = Family::<DependencyLabels, Gauge>::default();
        r.register(
            "berth_health_status",
            "1 while a dependency is healthy, 0 after it failed the configured number of consecutive checks",
            health_status.clone(),
        );
        let health_failures = Family::<DependencyLabels, Counter>::default();
        r.register(
            "berth_health_check_failures",
            "Failed health checks by dependency",
            health_failures.clone(),
        );
        let signature_decisions = Family::<SignatureLabels, Counter>::default();
        r.register(
            "berth_signature_decisions",
            "Signature policy decisions taken (not served from the decision cache), by result \
             (signed, allow_listed, unsigned, untrusted, digest_mismatch, threshold, malformed) and mode (enforce, warn)",
            signature_decisions.clone(),
        );
        let events_pending = Family::<EndpointLabels, Gauge>::default();
        r.register(
            "berth_events_pending",
            "Outbox events a webhook endpoint has not yet delivered, skipped or dead-lettered",
            events_pending.clone(),
        );
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        r.register(
            "berth_event_deliveries",
            "Webhook delivery attempts by endpoint and result (delivered, failed, dead_lettered)",
            deliveries.clone(),
        );
        let recorder = Arc::new(EventRecorderCounters::default());
        r.register_collector(Box::new(RecorderCollector(recorder.clone())));
        let auth = Arc::new(AuthCounters::default());
        r.register_collector(Box::new(AuthCollector(auth.clone())));
        r.register(
            "berth_build",
            "The running berth version",
            Info::new(VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        r.register_collector(Box::new(ProcessCollector));
        let proxy = crate::proxy_metrics::ProxyMetrics::register(&mut r);
        let connections = ConnectionMetrics::register(&mut r);
        Metrics {
            registry: r,
            requests,
            latency,
            bytes_in,
            bytes_out,
            pulls,
            pull_failures,
            pushes,
            push_failures,
            storage_objects,
            storage_bytes,
            uploads_in_flight,
            disk_used,
            disk_available,
            disk_size,
            health_status,
            health_failures,
            signature_decisions,
            events_pending,
            deliveries,
            recorder,
            auth,
            proxy,
            connections,
        }
    }

    /// Records one finished request (its response head is ready).
    pub fn request(&self, method: Method, route: RouteKind, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels { method, route, status })
            .inc();
        self.latency[route.index()].observe(seconds);
    }

    /// The counter of request body bytes for `route`, for a body wrapper.
    pub fn bytes_in(&self, route: RouteKind) -> Counter {
        self.bytes_in[route.index()].clone()
    }

    /// The counter of response body bytes for `route`, for a body wrapper.
    pub fn bytes_out(&self, route: RouteKind) -> Counter {
        self.bytes_out[route.index()].clone()
    }

    pub fn pull(&self, failure: Option<FailureReason>) {
        self.pulls.inc();
        if let Some(r) = failure {
            self.pull_failures[r.index()].inc();
        }
    }

    pub fn push(&self, failure: Option<FailureReason>) {
        self.pushes.inc();
        if let Some(r) = failure {
            self.push_failures[r.index()].inc();
        }
    }

    pub fn set_store_stats(&self, s: &metadata::StoreStats) {
        for (kind, n) in [
            ("repository", s.repositories),
            ("manifest", s.manifests),
            ("tag", s.tags),
            ("blob", s.blobs),
            ("upload", s.uploads),
        ] {
            self.storage_objects.get_or_create(&KindLabels { kind }).set(gauge(n));
        }
        self.storage_bytes.set(gauge(s.blob_bytes));
        self.uploads_in_flight.set(gauge(s.uploads));
    }

    pub fn set_disk(&self, d: &crate::disk::DiskUsage) {
        self.disk_used.set(gauge(d.used));
        self.disk_available.set(gauge(d.available));
        self.disk_size.set(gauge(d.size));
    }

    /// One signature policy decision (`signature::Verdict::result`).
    pub fn signature_decision(&self, result: &'static str, enforce: bool) {
        let mode = if enforce { "enforce" } else { "warn" };
        self.signature_decisions
            .get_or_create(&SignatureLabels { result, mode })
            .inc();
    }

    pub(crate) fn health(&self, dependency: &str, healthy: bool, failed_now: bool) {
        let labels = DependencyLabels {
            dependency: dependency.to_string(),
        };
        self.health_status.get_or_create(&labels).set(healthy as i64);
        let failures = self.health_failures.get_or_create(&labels);
        if failed_now {
            failures.inc();
        }
    }

    pub fn set_events_pending(&self, endpoint: &str, pending: u64) {
        self.events_pending
            .get_or_create(&EndpointLabels {
                endpoint: endpoint.to_string(),
            })
            .set(gauge(pending));
    }

    /// Counts a delivery attempt: `result` is `delivered`, `failed` (will be
    /// retried) or `dead_lettered`.
    pub fn delivery(&self, endpoint: &str, result: &'static str) {
        self.deliveries
            .get_or_create(&DeliveryLabels {
                endpoint: endpoint.to_string(),
                result,
            })
            .inc();
    }

    /// The exposition: OpenMetrics when the scraper asks for it, else the
    /// classic Prometheus text format (what `promtool check metrics` and
    /// older scrapers read).
    pub fn encode(&self, openmetrics: bool) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let result = if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const PROMETHEUS_CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_documented_families_and_no_high_cardinality_labels() {
        let m = Metrics::new();
        m.request(Method::Get, RouteKind::Manifest, 200, 0.002);
        m.pull(Some(FailureReason::NotFound));
        m.push(None);
        m.bytes_out(RouteKind::Blob).inc_by(10);
        let text = m.encode(false);
        for want in [
            "berth_http_requests_total{method=\"GET\",route=\"manifest\",status=\"200\"} 1",
            "berth_http_request_duration_seconds_bucket{route=\"manifest\",le=\"0.0025\"} 1",
            "berth_http_sent_bytes_total{route=\"blob\"} 10",
            "berth_pulls_total 1",
            "berth_pull_failures_total{reason=\"not_found\"} 1",
            "berth_pull_failures_total{reason=\"quota\"} 0",
            "berth_pushes_total 1",
            "berth_build_info{version=",
            "process_resident_memory_bytes",
            "berth_events_dropped_total 0",
        ] {
            assert!(text.contains(want), "missing {want} in:\n{text}");
        }
        assert!(m.encode(true).ends_with("# EOF\n"));
    }

    #[test]
    fn failure_reasons() {
        use oci::ErrorCode as C;
        let r = FailureReason::classify;
        assert_eq!(r(404, Some(C::ManifestUnknown)), FailureReason::NotFound);
        assert_eq!(r(403, Some(C::Denied)), FailureReason::Denied);
        assert_eq!(r(401, None), FailureReason::Denied);
        assert_eq!(r(400, Some(C::DigestInvalid)), FailureReason::Invalid);
        assert_eq!(r(504, None), FailureReason::Timeout);
        assert_eq!(r(502, None), FailureReason::Upstream);
        assert_eq!(r(429, Some(C::TooManyRequests)), FailureReason::Quota);
        assert_eq!(r(500, Some(C::Internal)), FailureReason::Internal);
    }
}
