//! The pull-through cache's metrics, per upstream. Upstream names come from
//! the configuration, so the label stays low-cardinality. The counters of an
//! upstream are created once (`ProxyMetrics::upstream`), so the request path
//! records with an atomic add.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    upstream: String,
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    upstream: String,
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    upstream: String,
    reason: &'static str,
}

#[derive(Debug, Default)]
pub struct ProxyMetrics {
    requests: Family<ResultLabels, Counter>,
    errors: Family<KindLabels, Counter>,
    upstream_bytes: Family<UpstreamLabels, Counter>,
    served_bytes: Family<UpstreamLabels, Counter>,
    evictions: Family<ReasonLabels, Counter>,
    evicted_bytes: Family<ReasonLabels, Counter>,
    cached_bytes: Family<UpstreamLabels, Gauge>,
}

/// One upstream's counters.
#[derive(Debug, Clone)]
pub struct UpstreamMetrics {
    name: String,
    errors: Family<KindLabels, Counter>,
    evictions: Family<ReasonLabels, Counter>,
    evicted_bytes: Family<ReasonLabels, Counter>,
    /// Manifests and blobs served from the cache without asking upstream
    /// for content (a tag revalidated by HEAD is a hit).
    pub hits: Counter,
    /// Fetched from upstream.
    pub misses: Counter,
    /// Served from the cache because the upstream could not answer.
    pub stale: Counter,
    pub upstream_bytes: Counter,
    pub served_bytes: Counter,
    pub cached_bytes: Gauge,
}

impl UpstreamMetrics {
    /// An upstream request failed; `kind` as `UpstreamError::kind`.
    pub fn error(&self, kind: &'static str) {
        self.errors
            .get_or_create(&KindLabels {
                upstream: self.name.clone(),
                kind,
            })
            .inc();
    }

    /// `reason` is `ttl` or `size`.
    pub fn evicted(&self, reason: &'static str, objects: u64, bytes: u64) {
        let l = ReasonLabels {
            upstream: self.name.clone(),
            reason,
        };
        self.evictions.get_or_create(&l).inc_by(objects);
        self.evicted_bytes.get_or_create(&l).inc_by(bytes);
    }
}

impl ProxyMetrics {
    pub(crate) fn register(r: &mut Registry) -> ProxyMetrics {
        let m = ProxyMetrics::default();
        r.register(
            "berth_proxy_requests",
            "Pull-through cache lookups by upstream and result (hit, miss, stale)",
            m.requests.clone(),
        );
        r.register(
            "berth_proxy_upstream_errors",
            "Failed upstream requests by upstream and kind (connect, timeout, not_found, rate_limited, server_error, \
             client_error, auth, digest, body, too_large, limited)",
            m.errors.clone(),
        );
        r.register(
            "berth_proxy_upstream_bytes",
            "Bytes received from upstreams",
            m.upstream_bytes.clone(),
        );
        r.register(
            "berth_proxy_served_bytes",
            "Blob bytes served from the cache (hits only)",
            m.served_bytes.clone(),
        );
        r.register(
            "berth_proxy_evictions",
            "Cached manifests and blobs evicted, by reason (ttl, size)",
            m.evictions.clone(),
        );
        r.register(
            "berth_proxy_evicted_bytes",
            "Bytes of evicted cache content, by reason (ttl, size)",
            m.evicted_bytes.clone(),
        );
        r.register(
            "berth_proxy_cached_bytes",
            "Bytes an upstream's cache holds, as of the last eviction pass",
            m.cached_bytes.clone(),
        );
        m
    }

    /// The counters of upstream `name`, created so they show from the start.
    pub fn upstream(&self, name: &str) -> UpstreamMetrics {
        let result = |result| {
            self.requests.get_or_create_owned(&ResultLabels {
                upstream: name.to_string(),
                result,
            })
        };
        let u = UpstreamLabels {
            upstream: name.to_string(),
        };
        UpstreamMetrics {
            name: name.to_string(),
            errors: self.errors.clone(),
            evictions: self.evictions.clone(),
            evicted_bytes: self.evicted_bytes.clone(),
            hits: result("hit"),
            misses: result("miss"),
            stale: result("stale"),
            upstream_bytes: self.upstream_bytes.get_or_create_owned(&u),
            served_bytes: self.served_bytes.get_or_create_owned(&u),
            cached_bytes: self.cached_bytes.get_or_create_owned(&u),
        }
    }
}
