//! Health and readiness.
//!
//! Checks run in the background, never in a request: `/healthz` only reads
//! the last results, so a probe storm cannot load the stores. Each
//! dependency turns unhealthy after `failure_threshold` consecutive failed
//! checks and healthy again after one success, so one slow fsync does not
//! page anyone, and a recovery is seen at once.
//!
//! Dependencies (the names are the keys of `/healthz`'s `dependencies`):
//! - `database`: the metadata store answers a read ("connected");
//! - `cache`: the blob store, where every layer nodes pull is kept, takes a
//!   small write, reads it back intact and deletes it ("available");
//! - `disk`: the data directory's filesystem has at least the configured
//!   free space ("ok", else "low");
//! - `uploads`: the blob store is below the disk watermark, so pushes are
//!   accepted ("accepted", else "refused"); not fatal, since pulls go on;
//! - `upstream:<name>` for each pull-through upstream (checked by the
//!   `proxy` crate): its `/v2/` answers ("reachable"); reported but not
//!   fatal, since serving from the cache goes on without it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use metadata::MetadataStore;
use oci::Digest;
use serde_json::{json, Map, Value};
use storage::BlobStore;

use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// Time between two rounds of checks.
    pub interval: Duration,
    /// Consecutive failed checks after which a dependency is unhealthy.
    pub failure_threshold: u32,
    /// Below this many available bytes the disk check fails, and `/readyz`
    /// fails at once (a full disk corrupts nothing, but every push fails).
    pub min_free_disk: u64,
    /// The registry's disk watermark (percent): at or above it, uploads are
    /// refused, and `uploads` says so.
    pub disk_watermark: f64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_secs(10),
            failure_threshold: 3,
            min_free_disk: 1 << 30,
            disk_watermark: 95.0,
        }
    }
}

struct Dependency {
    name: String,
    /// Whether its failure makes berth unhealthy (upstreams do not).
    fatal: bool,
    ok_word: &'static str,
    fail_word: &'static str,
    consecutive_failures: u32,
    healthy: bool,
}

#[derive(Default)]
struct State {
    deps: Vec<Dependency>,
    last_check: Option<SystemTime>,
    /// The last disk check, for readiness (which does not wait for the
    /// threshold: a full disk should take a node out of rotation now).
    disk_low: bool,
}

pub struct Health {
    threshold: u32,
    started: AtomicBool,
    draining: AtomicBool,
    /// Guarded by a plain mutex, held only to copy or update a few fields,
    /// never across an await.
    state: Mutex<State>,
}

/// Why `/readyz` fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    Starting,
    Draining,
    OutOfDisk,
    Unhealthy,
}

impl NotReady {
    pub fn as_str(self) -> &'static str {
        match self {
            NotReady::Starting => "starting",
            NotReady::Draining => "draining",
            NotReady::OutOfDisk => "out of disk",
            NotReady::Unhealthy => "unhealthy",
        }
    }
}

impl Health {
    pub fn new(failure_threshold: u32) -> Health {
        Health {
            threshold: failure_threshold.max(1),
            started: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one check of a dependency. `fatal` dependencies decide the
    /// overall status; the others are only reported.
    pub fn record(
        &self,
        metrics: &Metrics,
        name: &str,
        fatal: bool,
        words: (&'static str, &'static str),
        result: Result<(), String>,
    ) {
        let mut st = self.lock();
        let idx = match st.deps.iter().position(|d| d.name == name) {
            Some(i) => i,
            None => {
                st.deps.push(Dependency {
                    name: name.to_string(),
                    fatal,
                    ok_word: words.0,
                    fail_word: words.1,
                    consecutive_failures: 0,
                    healthy: true,
                });
                st.deps.len() - 1
            }
        };
        let threshold = self.threshold;
        let d = &mut st.deps[idx];
        match &result {
            Ok(()) => {
                if !d.healthy {
                    tracing::info!(dependency = name, "dependency is healthy again");
                }
                d.consecutive_failures = 0;
                d.healthy = true;
            }
            Err(e) => {
                d.consecutive_failures += 1;
                if d.healthy && d.consecutive_failures >= threshold {
                    d.healthy = false;
                    tracing::error!(dependency = name, error = %e, failures = d.consecutive_failures, "dependency is unhealthy");
                } else {
                    tracing::warn!(dependency = name, error = %e, failures = d.consecutive_failures, "health check failed");
                }
            }
        }
        metrics.health(name, d.healthy, result.is_err());
    }

    fn finish_round(&self, disk_low: bool) {
        let mut st = self.lock();
        st.last_check = Some(SystemTime::now());
        st.disk_low = disk_low;
        drop(st);
        self.started.store(true, Ordering::Release);
    }

    /// Marks berth as shutting down: `/readyz` fails from now on.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether every fatal dependency is healthy (false before the first
    /// round of checks).
    pub fn is_healthy(&self) -> bool {
        self.started.load(Ordering::Acquire) && self.lock().deps.iter().all(|d| d.healthy || !d.fatal)
    }

    /// The `/healthz` body and whether berth is healthy:
    /// `{"status":"healthy","image_version":"…","last_check":"<RFC 3339>",
    ///   "dependencies":{"database":"connected","cache":"available",…}}`.
    pub fn report(&self) -> (bool, Value) {
        let st = self.lock();
        let healthy = self.started.load(Ordering::Acquire) && st.deps.iter().all(|d| d.healthy || !d.fatal);
        let deps: Map<String, Value> = st
            .deps
            .iter()
            .map(|d| {
                let word = if d.healthy { d.ok_word } else { d.fail_word };
                (d.name.clone(), Value::from(word))
            })
            .collect();
        let status = match (st.last_check, healthy) {
            (None, _) => "starting",
            (Some(_), true) => "healthy",
            (Some(_), false) => "unhealthy",
        };
        let body = json!({
            "status": status,
            "image_version": env!("CARGO_PKG_VERSION"),
            "last_check": st.last_check.map(crate::time::rfc3339),
            "dependencies": deps,
        });
        (healthy, body)
    }

    /// `Ok` when berth should receive traffic.
    pub fn readiness(&self) -> Result<(), NotReady> {
        if self.draining.load(Ordering::Acquire) {
            return Err(NotReady::Draining);
        }
        if !self.started.load(Ordering::Acquire) {
            return Err(NotReady::Starting);
        }
        if self.lock().disk_low {
            return Err(NotReady::OutOfDisk);
        }
        if !self.is_healthy() {
            return Err(NotReady::Unhealthy);
        }
        Ok(())
    }
}

/// What the background checks look at.
pub struct Checks {
    pub blobs: Arc<dyn BlobStore>,
    pub meta: Arc<dyn MetadataStore>,
    pub data_dir: PathBuf,
    pub config: HealthConfig,
}

/// A bound on each probe, so a hung store fails its check instead of
/// stalling every later round.
fn probe_timeout(cfg: &HealthConfig) -> Duration {
    cfg.interval.clamp(Duration::from_millis(200), Duration::from_secs(5))
}

async fn bounded<F: std::future::Future<Output = Result<(), String>>>(t: Duration, f: F) -> Result<(), String> {
    match tokio::time::timeout(t, f).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", t.as_millis())),
    }
}

async fn probe_database(meta: &dyn MetadataStore) -> Result<(), String> {
    meta.list_repos(None, 1).await.map(|_| ()).map_err(|e| e.to_string())
}

/// Writes a unique small blob, reads it back, compares, deletes it. The
/// content is unique per probe, so it can never be a blob a client pushed.
async fn probe_blob_store(blobs: &dyn BlobStore) -> Result<(), String> {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let content = Bytes::from(format!(
        "berth health probe pid={} t={nanos} n={}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let digest = Digest::sha256(&content);
    blobs
        .put(&digest, content.clone())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let read = async {
        let mut stream = blobs.get(&digest, None).await.map_err(|e| format!("read: {e}"))?;
        let mut got = Vec::with_capacity(content.len());
        while let Some(chunk) = stream.next().await {
            got.extend_from_slice(&chunk.map_err(|e| format!("read: {e}"))?);
        }
        if got != content {
            return Err("read back different bytes than written".to_string());
        }
        Ok(())
    }
    .await;
    let deleted = blobs.delete(&digest).await.map_err(|e| format!("delete: {e}"));
    read.and(deleted)
}

/// The blob store's usage, or `None` when it cannot tell or does not
/// answer in time (then the guard does not apply either).
async fn bounded_usage(t: Duration, blobs: &dyn BlobStore) -> Option<storage::DiskUsage> {
    tokio::time::timeout(t, blobs.disk_usage()).await.ok()?.ok()?
}

/// One round of checks; updates `health` and the storage and disk metrics.
pub async fn check_once(checks: &Checks, health: &Health, metrics: &Metrics) {
    let t = probe_timeout(&checks.config);
    let db = bounded(t, probe_database(checks.meta.as_ref())).await;
    health.record(metrics, "database", true, ("connected", "disconnected"), db);
    let cache = bounded(t, probe_blob_store(checks.blobs.as_ref())).await;
    health.record(metrics, "cache", true, ("available", "unavailable"), cache);
    let disk = crate::disk::usage(&checks.data_dir);
    let disk_result = match &disk {
        Ok(d) => {
            metrics.set_disk(d);
            if d.available < checks.config.min_free_disk {
                Err(format!(
                    "{} bytes available on {}, below the {}-byte minimum; free space or raise the volume size",
                    d.available,
                    checks.data_dir.display(),
                    checks.config.min_free_disk
                ))
            } else {
                Ok(())
            }
        }
        Err(e) => Err(format!("cannot stat {}: {e}", checks.data_dir.display())),
    };
    let disk_low = disk_result.is_err();
    health.record(metrics, "disk", true, ("ok", "low"), disk_result);
    // What the upload guard decides, from the blob store's own usage (the
    // guard's source), so a reader such as `berth diagnose` can tell why a
    // push was refused without pushing.
    let uploads = match bounded_usage(t, checks.blobs.as_ref()).await {
        Some(u) => u.refuses_uploads(checks.config.disk_watermark).map_or(Ok(()), Err),
        None => Ok(()),
    };
    health.record(metrics, "uploads", false, ("accepted", "refused"), uploads);
    // Store counts walk tables: done here, in the background, not per scrape.
    match tokio::time::timeout(t, checks.meta.stats()).await {
        Ok(Ok(s)) => metrics.set_store_stats(&s),
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot read storage statistics"),
        Err(_) => tracing::warn!("reading storage statistics timed out"),
    }
    health.finish_round(disk_low);
}

/// Runs the checks forever, one round per interval.
pub async fn run(checks: Checks, health: Arc<Health>, metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(checks.config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        check_once(&checks, &health, &metrics).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checks(dir: &std::path::Path, blobs: storage::FsBlobStore, min_free_disk: u64) -> Checks {
        let meta = metadata::RedbMetadata::open(&dir.join("meta.redb")).unwrap();
        Checks {
            blobs: Arc::new(blobs),
            meta: Arc::new(meta),
            data_dir: dir.to_path_buf(),
            config: HealthConfig {
                interval: Duration::from_millis(200),
                failure_threshold: 3,
                min_free_disk,
                disk_watermark: 100.0,
            },
        }
    }

    #[tokio::test]
    async fn unhealthy_after_threshold_failures_and_healthy_after_one_success() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = storage::FsBlobStore::open(dir.path()).await.unwrap();
        let c = checks(dir.path(), blobs, 0);
        let (h, m) = (Health::new(3), Metrics::new());
        assert_eq!(h.readiness(), Err(NotReady::Starting));
        assert_eq!(h.report().1["status"], "starting");
        check_once(&c, &h, &m).await;
        let (ok, body) = h.report();
        assert!(ok, "{body}");
        assert_eq!(body["dependencies"]["cache"], "available");
        assert_eq!(body["dependencies"]["database"], "connected");
        assert_eq!(body["dependencies"]["disk"], "ok");
        assert_eq!(h.readiness(), Ok(()));
        // Break the blob store in a way that holds even for root: uploads/,
        // where writes are staged, becomes a file.
        let uploads = dir.path().join("uploads");
        std::fs::remove_dir_all(&uploads).unwrap();
        std::fs::write(&uploads, b"not a directory").unwrap();
        for round in 1..=2 {
            check_once(&c, &h, &m).await;
            assert!(h.report().0, "still healthy after {round} failure(s)");
        }
        check_once(&c, &h, &m).await;
        let (ok, body) = h.report();
        assert!(!ok);
        assert_eq!(body["status"], "unhealthy");
        assert_eq!(body["dependencies"]["cache"], "unavailable");
        assert_eq!(h.readiness(), Err(NotReady::Unhealthy));
        assert!(m.encode(false).contains("berth_health_status{dependency=\"cache\"} 0"));
        std::fs::remove_file(&uploads).unwrap();
        std::fs::create_dir(&uploads).unwrap();
        check_once(&c, &h, &m).await;
        assert!(h.report().0, "one success is enough to recover");
        h.set_draining();
        assert_eq!(h.readiness(), Err(NotReady::Draining));
    }

    #[tokio::test]
    async fn low_disk_fails_readiness_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = storage::FsBlobStore::open(dir.path()).await.unwrap();
        let c = checks(dir.path(), blobs, u64::MAX);
        let (h, m) = (Health::new(3), Metrics::new());
        check_once(&c, &h, &m).await;
        assert!(h.report().0, "one low-disk check is below the threshold");
        assert_eq!(h.readiness(), Err(NotReady::OutOfDisk));
        check_once(&c, &h, &m).await;
        check_once(&c, &h, &m).await;
        assert_eq!(h.report().1["dependencies"]["disk"], "low");
    }
}
