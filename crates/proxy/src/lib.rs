//! The pull-through cache: a berth project stands for an upstream registry.
//! A pull of `<project>/<repo>` is served from local storage when it can
//! be, and otherwise fetched from the upstream once, stored as a push
//! would be, and served. No HTTP server here: `api` routes requests in, and
//! this crate's only HTTP is its client of the upstream.
//!
//! Rules it keeps:
//! - one upstream request per (repository, object), however many clients
//!   ask at once (single-flight, `Flights` and `fill`);
//! - a tag is revalidated with HEAD, at most once per `revalidate`, and
//!   its manifest is fetched again only when the digest changed;
//! - content-addressed objects (blobs, manifests by digest) never need the
//!   upstream once cached; a tag is served stale while the upstream cannot
//!   answer, within `stale_for` of the upstream last confirming it;
//! - eviction (TTL from the last pull, LRU above the size cap) removes only
//!   cache repositories' manifests and links; GC frees bytes nothing else
//!   references.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use oci::{Digest, ErrorCode, Reference, RepoName, Tag};
use registry::{ManifestBody, OpenBlob, Registry, RegistryError};
use storage::ByteStream;
use tokio::sync::watch;

pub mod client;
pub mod config;
pub mod evict;
pub mod fill;
pub mod limit;

pub use client::UpstreamError;
pub use config::{validate_all, Upstream, UpstreamConfig};
use fill::{FillCtx, FillError, FillState};

type Key = (RepoName, String);

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Concurrent callers with the same key share one run of the work.
struct Flights<T: Clone> {
    running: Mutex<HashMap<Key, watch::Receiver<Option<T>>>>,
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    fn new() -> Self {
        Flights {
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Runs `work` (in its own task, so a caller that goes away does not
    /// cancel it for the others) unless a run for `key` is in flight, and
    /// returns its result; `None` if the task died.
    async fn run<F>(self: &Arc<Self>, key: Key, work: impl FnOnce() -> F) -> Option<T>
    where
        F: Future<Output = T> + Send + 'static,
    {
        let mut rx = {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            match running.get(&key) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    running.insert(key.clone(), rx.clone());
                    let fut = observe::TraceContext::carry(work());
                    let me = self.clone();
                    tokio::spawn(async move {
                        let v = fut.await;
                        me.running.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                        let _ = tx.send(Some(v));
                    });
                    rx
                }
            }
        };
        loop {
            if let Some(v) = rx.borrow_and_update().clone() {
                return Some(v);
            }
            if rx.changed().await.is_err() {
                return rx.borrow().clone();
            }
        }
    }
}

/// What the upstream said of a tag, and when.
#[derive(Clone)]
struct TagCheck {
    digest: Digest,
    checked: Instant,
    /// Seconds since the epoch of the last confirmation.
    confirmed: u64,
}

/// A manifest fetch or revalidation: whether content came from upstream.
type Fetched = Result<bool, FillError>;

/// One upstream's cache.
pub struct Cache {
    pub up: Upstream,
    client: Arc<client::Client>,
    metrics: observe::proxy_metrics::UpstreamMetrics,
    tags: Mutex<HashMap<(RepoName, Tag), TagCheck>>,
    /// Last pull of (repository, digest) seen by this process.
    access: Mutex<HashMap<(String, Digest), u64>>,
    /// Digests being served from a fill or filled now: never evicted.
    in_use: Mutex<HashMap<Digest, usize>>,
    manifests: Arc<Flights<Fetched>>,
    fills: Mutex<HashMap<(RepoName, Digest), watch::Receiver<FillState>>>,
    /// Evicted blobs whose bytes GC has not freed yet.
    evicted: Mutex<HashSet<Digest>>,
}

pub struct Proxy {
    reg: Arc<Registry>,
    caches: Vec<Arc<Cache>>,
}

/// A blob the cache serves.
pub enum CachedBlob {
    /// Stored and linked: served like any local blob.
    Local(OpenBlob),
    /// Arriving from the upstream now; `size` as announced (if it was).
    Filling {
        size: Option<u64>,
        reader: Box<dyn FnOnce(u64, Option<u64>) -> ByteStream + Send>,
    },
    /// HEAD of a blob not cached: the upstream's answer, nothing fetched.
    Remote { size: Option<u64> },
    /// Straight from the upstream, stored nowhere (storage is full).
    Direct(ByteStream),
}

/// Marks a digest in use while alive.
struct InUse {
    cache: Arc<Cache>,
    digest: Digest,
}

impl InUse {
    fn new(cache: &Arc<Cache>, digest: &Digest) -> InUse {
        *cache
            .in_use
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(digest.clone())
            .or_default() += 1;
        InUse {
            cache: cache.clone(),
            digest: digest.clone(),
        }
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        let mut m = self.cache.in_use.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.digest);
            }
        }
    }
}

/// The client's error for a failed fetch of `what`; `unknown` is the code
/// when the upstream does not have it.
fn upstream_failed(c: &Cache, what: &str, unknown: ErrorCode, e: &FillError) -> RegistryError {
    let up = &c.up;
    match e {
        FillError::Local(e) => e.clone(),
        FillError::Upstream(u) if u.is_not_found() => {
            RegistryError::new(unknown, format!("upstream {} ({}) has no {what}: {u}", up.name, up.url))
        }
        // A 4xx, so clients print the message (they hide 5xx bodies).
        FillError::Upstream(u @ UpstreamError::Auth(_)) => RegistryError::new(
            ErrorCode::Denied,
            format!("cannot fetch {what}: upstream {} ({}) {u}", up.name, up.url),
        ),
        FillError::Upstream(u @ (UpstreamError::QueueFull(_) | UpstreamError::QueueTimeout(_))) => {
            RegistryError::new(ErrorCode::TooManyRequests, format!("upstream {} {u}", up.name))
        }
        FillError::Upstream(u @ UpstreamError::Status { status: 429, .. }) => RegistryError::new(
            ErrorCode::TooManyRequests,
            format!(
                "upstream {} ({}) is rate-limiting us ({u}) and {what} is not cached; retry later",
                up.name, up.url
            ),
        ),
        FillError::Upstream(u) => RegistryError::new(
            ErrorCode::Unavailable,
            format!(
                "cannot fetch {what} from upstream {} ({}): it {u}{}",
                up.name,
                up.url,
                down_since(c)
            ),
        ),
    }
}

/// "; unreachable since <time> (<n> s)", when the upstream is not
/// answering: whether it is a blip or an outage is the operator's first
/// question.
fn down_since(c: &Cache) -> String {
    let Some(since) = c.client.down_since() else {
        return String::new();
    };
    let secs = since.elapsed().map_or(0, |d| d.as_secs());
    format!("; unreachable since {} ({secs} s)", observe::time::rfc3339(since))
}

impl Proxy {
    pub fn new(reg: Arc<Registry>, upstreams: &[Upstream], metrics: &observe::Metrics) -> Result<Proxy, String> {
        let caches = upstreams
            .iter()
            .map(|up| {
                Ok(Arc::new(Cache {
                    client: Arc::new(client::Client::new(up)?),
                    metrics: metrics.proxy.upstream(&up.name),
                    up: up.clone(),
                    tags: Mutex::new(HashMap::new()),
                    access: Mutex::new(HashMap::new()),
                    in_use: Mutex::new(HashMap::new()),
                    manifests: Arc::new(Flights::new()),
                    fills: Mutex::new(HashMap::new()),
                    evicted: Mutex::new(HashSet::new()),
                }))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Proxy { reg, caches })
    }

    /// The cache a repository belongs to, by its project.
    pub fn cache_of(&self, repo: &RepoName) -> Option<&Arc<Cache>> {
        let project = repo.project();
        // A bare project name is no repository of the upstream.
        if project.len() == repo.as_str().len() {
            return None;
        }
        self.caches.iter().find(|c| c.up.project == project)
    }

    /// containerd's mirror requests name the upstream registry in `?ns=`:
    /// `library/nginx?ns=docker.io` is `<project>/library/nginx` here.
    pub fn rewrite_ns(&self, repo: &RepoName, ns: &str) -> Option<RepoName> {
        let c = self.caches.iter().find(|c| c.up.namespace == ns)?;
        if repo.project() == c.up.project {
            return None;
        }
        format!("{}/{repo}", c.up.project).parse().ok()
    }

    /// Where a pull of a repository missing locally goes when an upstream
    /// is the mirror (Docker's `registry-mirrors`).
    pub fn mirror_of(&self, repo: &RepoName) -> Option<RepoName> {
        if self.cache_of(repo).is_some() {
            return None;
        }
        let c = self.caches.iter().find(|c| c.up.mirror)?;
        format!("{}/{repo}", c.up.project).parse().ok()
    }

    /// The error for any write to a cache project.
    pub fn read_only(&self, repo: &RepoName) -> Option<RegistryError> {
        let c = self.cache_of(repo)?;
        Some(RegistryError::new(
            ErrorCode::Unsupported,
            format!(
                "project {} is a pull-through cache of {} ({}): it is read-only; push to a project that is not a cache",
                c.up.project, c.up.name, c.up.url
            ),
        ))
    }

    fn upstream_repo(c: &Cache, repo: &RepoName) -> String {
        let rest = &repo.as_str()[c.up.project.len() + 1..];
        c.up.upstream_repo(rest)
    }

    fn noted(c: &Cache, repo: &RepoName, digest: &Digest) {
        c.access
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((repo.to_string(), digest.clone()), now());
    }

    /// A manifest of a cache repository (see the crate rules).
    pub async fn manifest(
        &self,
        c: &Arc<Cache>,
        repo: &RepoName,
        reference: &Reference,
        with_body: bool,
    ) -> Result<ManifestBody, RegistryError> {
        let local = match self.reg.manifest_get(repo, reference, with_body).await {
            Ok(m) => Some(m),
            Err(e) if e.code == ErrorCode::ManifestUnknown => None,
            Err(e) => return Err(e),
        };
        let fresh = match (reference, &local) {
            (Reference::Digest(_), Some(_)) => true,
            (Reference::Tag(t), Some(m)) => is_fresh(c, repo, t, Some(&m.digest)),
            (_, None) => false,
        };
        if let (true, Some(m)) = (fresh, &local) {
            c.metrics.hits.inc();
            Self::noted(c, repo, &m.digest);
            return Ok(m.clone());
        }
        let key = (repo.clone(), reference.to_string());
        let known = local.as_ref().map(|m| m.digest.clone());
        let work = {
            let (reg, c, repo, reference) = (self.reg.clone(), c.clone(), repo.clone(), reference.clone());
            move || async move { fetch_manifest(&reg, &c, &repo, &reference, known).await }
        };
        let outcome = c.manifests.run(key, work).await.unwrap_or_else(|| {
            Err(FillError::Local(RegistryError::new(
                ErrorCode::Internal,
                "fetching the manifest from upstream stopped unexpectedly; retry the pull",
            )))
        });
        match outcome {
            Ok(fetched) => {
                let m = self.reg.manifest_get(repo, reference, with_body).await?;
                if fetched { &c.metrics.misses } else { &c.metrics.hits }.inc();
                Self::noted(c, repo, &m.digest);
                Ok(m)
            }
            Err(FillError::Upstream(u)) if u.is_unavailable() => {
                let what = format!("manifest {repo}:{reference}");
                let Some(m) = local else {
                    return Err(upstream_failed(
                        c,
                        &what,
                        ErrorCode::ManifestUnknown,
                        &FillError::Upstream(u),
                    ));
                };
                // (A cached manifest by digest was served above: always fresh.)
                let Reference::Tag(t) = reference else { return Ok(m) };
                let confirmed = match c
                    .tags
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&(repo.clone(), t.clone()))
                {
                    Some(k) if k.digest == m.digest => Some(k.confirmed),
                    _ => None,
                };
                let confirmed = match confirmed {
                    Some(t) => t,
                    // Not confirmed since this process started: count from
                    // when it was stored.
                    None => self.reg.manifest_stored_at(repo, &m.digest).await?.unwrap_or(0),
                };
                let age = now().saturating_sub(confirmed);
                if age <= c.up.stale_for.as_secs() {
                    c.metrics.stale.inc();
                    tracing::warn!(upstream = %c.up.name, %repo, %reference, error = %u, age_secs = age,
                        "upstream unavailable; serving the cached manifest");
                    Self::noted(c, repo, &m.digest);
                    Ok(m)
                } else {
                    Err(RegistryError::new(
                        ErrorCode::Unavailable,
                        format!(
                            "cannot revalidate {what} with upstream {} ({}): it {u}{}; the cached copy was last confirmed {age} s ago, \
                             beyond the {} s staleness window (stale_for)",
                            c.up.name,
                            c.up.url,
                            down_since(c),
                            c.up.stale_for.as_secs()
                        ),
                    ))
                }
            }
            Err(e) => Err(upstream_failed(
                c,
                &format!("manifest {repo}:{reference}"),
                ErrorCode::ManifestUnknown,
                &e,
            )),
        }
    }

    /// A blob of a cache repository. `with_body` false (HEAD) never starts a
    /// download.
    pub async fn blob(
        &self,
        c: &Arc<Cache>,
        repo: &RepoName,
        digest: &Digest,
        with_body: bool,
    ) -> Result<CachedBlob, RegistryError> {
        match self.reg.blob_open(repo, digest).await {
            Ok(b) => {
                c.metrics.hits.inc();
                if with_body {
                    c.metrics.served_bytes.inc_by(b.size);
                }
                Self::noted(c, repo, digest);
                return Ok(CachedBlob::Local(b));
            }
            Err(e) if e.code == ErrorCode::BlobUnknown => {}
            Err(e) => return Err(e),
        }
        let up_repo = Self::upstream_repo(c, repo);
        let what = format!("blob {digest} of {repo}");
        // Stored for another repository: link it once the upstream confirms
        // this repository has it (a HEAD, no bytes).
        if self.reg.stored_blob_size(digest).await?.is_some() {
            match c.client.head_blob(&up_repo, digest).await {
                Ok(_) => {}
                Err(u) => {
                    c.metrics.error(u.kind());
                    return Err(upstream_failed(
                        c,
                        &what,
                        ErrorCode::BlobUnknown,
                        &FillError::Upstream(u),
                    ));
                }
            }
            if self.reg.cache_link(repo, digest).await? {
                c.metrics.hits.inc();
                Self::noted(c, repo, digest);
                return Ok(CachedBlob::Local(self.reg.blob_open(repo, digest).await?));
            }
        }
        if !with_body {
            return match c.client.head_blob(&up_repo, digest).await {
                Ok(size) => Ok(CachedBlob::Remote { size }),
                Err(u) => {
                    c.metrics.error(u.kind());
                    Err(upstream_failed(
                        c,
                        &what,
                        ErrorCode::BlobUnknown,
                        &FillError::Upstream(u),
                    ))
                }
            };
        }
        let mut rx = self.join_fill(c, repo, up_repo.clone(), digest);
        let in_use = InUse::new(c, digest);
        let size = match fill::started(&mut rx).await {
            Ok(size) => size,
            // Storage is above its watermark: no worse than going direct.
            Err(FillError::Local(e)) if e.code == ErrorCode::Denied => {
                tracing::warn!(upstream = %c.up.name, %repo, %digest, reason = %e.message,
                    "cannot cache; streaming the blob straight from upstream");
                let (resp, permit) = c.client.get_blob(&up_repo, digest).await.map_err(|u| {
                    c.metrics.error(u.kind());
                    upstream_failed(c, &what, ErrorCode::BlobUnknown, &FillError::Upstream(u))
                })?;
                c.metrics.misses.inc();
                return Ok(CachedBlob::Direct(fill::pass_through(resp, digest.clone(), permit)));
            }
            Err(e) => return Err(upstream_failed(c, &what, ErrorCode::BlobUnknown, &e)),
        };
        c.metrics.misses.inc();
        Self::noted(c, repo, digest);
        let (reg, repo, digest) = (self.reg.clone(), repo.clone(), digest.clone());
        Ok(CachedBlob::Filling {
            size,
            reader: Box::new(move |start, end| {
                let s = fill::follow(reg, repo, digest, rx, start, end);
                // Keep the digest marked in use while the client reads.
                Box::pin(futures_util::StreamExt::map(s, move |item| {
                    let _ = &in_use;
                    item
                }))
            }),
        })
    }

    /// Joins the fill of (repo, digest), starting it if none runs.
    fn join_fill(
        &self,
        c: &Arc<Cache>,
        repo: &RepoName,
        up_repo: String,
        digest: &Digest,
    ) -> watch::Receiver<FillState> {
        let mut fills = c.fills.lock().unwrap_or_else(|e| e.into_inner());
        let key = (repo.clone(), digest.clone());
        if let Some(rx) = fills.get(&key) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(FillState::default());
        fills.insert(key.clone(), rx.clone());
        let ctx = FillCtx {
            reg: self.reg.clone(),
            client: c.client.clone(),
            metrics: c.metrics.clone(),
        };
        let (c, repo, digest) = (c.clone(), repo.clone(), digest.clone());
        tokio::spawn(observe::TraceContext::carry(async move {
            let _in_use = InUse::new(&c, &digest);
            fill::run(ctx, repo, up_repo, digest, tx).await;
            // After the commit: a newcomer finds the blob linked.
            c.fills.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
        }));
        rx
    }
}

/// Whether the upstream confirmed the tag (at `digest`, if given) within
/// the revalidation interval.
fn is_fresh(c: &Cache, repo: &RepoName, tag: &Tag, digest: Option<&Digest>) -> bool {
    c.tags
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&(repo.clone(), tag.clone()))
        .is_some_and(|k| digest.is_none_or(|d| *d == k.digest) && k.checked.elapsed() < c.up.revalidate)
}

/// Revalidates a tag (HEAD) or fetches a manifest, storing what changed.
/// Returns whether content came from the upstream.
async fn fetch_manifest(
    reg: &Registry,
    c: &Cache,
    repo: &RepoName,
    reference: &Reference,
    known: Option<Digest>,
) -> Fetched {
    let up_repo = Proxy::upstream_repo(c, repo);
    let upstream = |e: UpstreamError| {
        c.metrics.error(e.kind());
        FillError::Upstream(e)
    };
    let max = reg.config().max_manifest_size;
    match reference {
        // A flight that ended just before this one began may have stored it.
        Reference::Digest(d) if reg.manifest_get(repo, reference, false).await.is_ok() => Ok(false),
        Reference::Tag(t) if is_fresh(c, repo, t, None) && reg.manifest_get(repo, reference, false).await.is_ok() => {
            Ok(false)
        }
        Reference::Digest(d) => {
            let (head, body) = c
                .client
                .get_manifest(&up_repo, d.as_str(), max)
                .await
                .map_err(upstream)?;
            c.metrics.upstream_bytes.inc_by(body.len() as u64);
            if !d.verify(&body) {
                return Err(upstream(UpstreamError::Digest {
                    expected: d.to_string(),
                    actual: Digest::sha256(&body).to_string(),
                }));
            }
            reg.manifest_fill(repo, d, head.media_type.as_deref(), body, None, &c.up.name)
                .await?;
            Ok(true)
        }
        Reference::Tag(t) => {
            let head = c.client.head_manifest(&up_repo, t.as_str()).await.map_err(upstream)?;
            let confirm = |d: &Digest| {
                c.tags.lock().unwrap_or_else(|e| e.into_inner()).insert(
                    (repo.clone(), t.clone()),
                    TagCheck {
                        digest: d.clone(),
                        checked: Instant::now(),
                        confirmed: now(),
                    },
                );
            };
            if let Some(d) = &head.digest {
                if known.as_ref() == Some(d) {
                    confirm(d);
                    return Ok(false);
                }
                // Already here by digest (a child fetched earlier): only the tag moves.
                if let Ok(m) = reg.manifest_get(repo, &Reference::Digest(d.clone()), true).await {
                    if let Some(bytes) = m.bytes {
                        reg.manifest_fill(repo, d, Some(&m.media_type), bytes, Some(t), &c.up.name)
                            .await?;
                        confirm(d);
                        return Ok(false);
                    }
                }
            }
            // GET by the digest HEAD gave, so what we store is what it named.
            let by = head.digest.as_ref().map_or_else(|| t.to_string(), Digest::to_string);
            let (got, body) = c.client.get_manifest(&up_repo, &by, max).await.map_err(upstream)?;
            c.metrics.upstream_bytes.inc_by(body.len() as u64);
            let digest = match head.digest.or(got.digest) {
                Some(d) if d.verify(&body) => d,
                Some(d) => {
                    return Err(upstream(UpstreamError::Digest {
                        expected: d.to_string(),
                        actual: Digest::sha256(&body).to_string(),
                    }))
                }
                None => Digest::sha256(&body),
            };
            reg.manifest_fill(repo, &digest, got.media_type.as_deref(), body, Some(t), &c.up.name)
                .await?;
            confirm(&digest);
            Ok(true)
        }
    }
}

/// Reports each upstream in `/healthz` as `upstream:<name>`, every
/// `interval`. Not fatal: berth serves what it has cached without it.
pub async fn run_health(
    proxy: Arc<Proxy>,
    health: Arc<observe::Health>,
    metrics: Arc<observe::Metrics>,
    interval: std::time::Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for c in &proxy.caches {
            let result = c.client.ping().await;
            health.record(
                &metrics,
                &format!("upstream:{}", c.up.name),
                false,
                ("reachable", "unreachable"),
                result,
            );
        }
    }
}

/// Eviction, forever: one pass per upstream every `evict_interval`.
pub async fn run_eviction(proxy: Arc<Proxy>, gc: registry::GcOptions) {
    let Some(every) = proxy.caches.iter().map(|c| c.up.evict_interval).min() else {
        return;
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: HashMap<String, Instant> = HashMap::new();
    loop {
        tick.tick().await;
        for c in &proxy.caches {
            if last.get(&c.up.name).is_some_and(|t| t.elapsed() < c.up.evict_interval) {
                continue;
            }
            last.insert(c.up.name.clone(), Instant::now());
            if let Err(e) = evict_pass(&proxy.reg, c, &gc).await {
                tracing::warn!(upstream = %c.up.name, error = %e.message, "cache eviction pass failed; the next pass retries");
            }
        }
    }
}

/// One eviction pass over one upstream's cache.
pub async fn evict_pass(reg: &Registry, c: &Cache, gc: &registry::GcOptions) -> Result<evict::Plan, RegistryError> {
    let snap = reg.cache_snapshot().await?;
    let access = c.access.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let in_use: HashSet<Digest> = c
        .in_use
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .cloned()
        .collect();
    let plan = evict::plan(
        &snap,
        &c.up.project,
        &access,
        &in_use,
        &evict::Limits {
            now: now(),
            ttl_secs: c.up.ttl.as_secs(),
            max_bytes: c.up.max_size,
            high: c.up.high_watermark,
            low: c.up.low_watermark,
        },
    );
    let mut by_repo: HashMap<&str, (Vec<Digest>, Vec<Digest>)> = HashMap::new();
    for (r, d) in &plan.manifests {
        by_repo.entry(r).or_default().0.push(d.clone());
    }
    for (r, d) in &plan.links {
        by_repo.entry(r).or_default().1.push(d.clone());
    }
    for (r, (manifests, blobs)) in &by_repo {
        let Ok(repo) = r.parse::<RepoName>() else { continue };
        reg.cache_evict(&repo, manifests, blobs).await?;
        let mut access = c.access.lock().unwrap_or_else(|e| e.into_inner());
        for d in manifests.iter().chain(blobs) {
            access.remove(&(r.to_string(), d.clone()));
        }
        c.tags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(tr, _), k| tr != &repo || !manifests.contains(&k.digest));
    }
    if plan.ttl_objects > 0 {
        c.metrics.evicted("ttl", plan.ttl_objects, plan.ttl_bytes);
    }
    if plan.size_objects > 0 {
        c.metrics.evicted("size", plan.size_objects, plan.size_bytes);
    }
    c.metrics
        .cached_bytes
        .set(i64::try_from(plan.bytes_after).unwrap_or(i64::MAX));
    if !by_repo.is_empty() {
        tracing::info!(upstream = %c.up.name, manifests = plan.manifests.len(), links = plan.links.len(),
            ttl_bytes = plan.ttl_bytes, size_bytes = plan.size_bytes, cached_bytes = plan.bytes_after, "evicted from the cache");
    }
    // Free the bytes of what was evicted, now or in a later pass (the GC
    // grace window keeps recently stored blobs a while).
    let stored: HashSet<&Digest> = snap.blobs.iter().map(|(d, _)| d).collect();
    let pending: HashSet<Digest> = {
        let mut ev = c.evicted.lock().unwrap_or_else(|e| e.into_inner());
        ev.retain(|d| stored.contains(d));
        ev.extend(plan.links.iter().map(|(_, d)| d.clone()));
        ev.extend(plan.manifests.iter().map(|(_, d)| d.clone()));
        ev.clone()
    };
    if !pending.is_empty() {
        let report = reg.gc_blobs(&pending, gc).await?;
        if report.blobs > 0 {
            tracing::info!(upstream = %c.up.name, %report, "freed evicted cache content");
        }
    }
    Ok(plan)
}
