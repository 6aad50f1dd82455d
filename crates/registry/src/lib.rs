//! The registry service: push, pull, mount, referrers and delete, over a
//! `BlobStore` and a `MetadataStore`. No HTTP here: the API layer parses
//! requests into validated OCI types and calls these functions.
//!
//! Invariants:
//! - a blob becomes readable by a repository only after its bytes are
//!   committed in the blob store and its digest verified (`uploads`);
//! - a manifest becomes visible only after its bytes are durable and every
//!   blob and child it requires is present (`manifests`);
//! - a cached manifest or tag is never served after a write to its
//!   repository has returned (`cache`).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use metadata::MetadataStore;
use storage::BlobStore;

pub mod blobs;
pub mod cache;
pub mod error;
pub mod events;
pub mod fsck;
pub mod gc;
pub mod immutable;
mod in_flight;
pub mod lease;
pub mod listing;
pub mod manifests;
#[cfg(all(test, feature = "postgres"))]
mod nodes_tests;
pub mod proxied;
mod pulls;
pub mod quota;
pub mod retention;
pub mod signatures;
pub mod uploads;
pub mod usage;

pub use blobs::OpenBlob;
pub use error::{RegistryError, Result};
pub use fsck::{Finding, FsckReport};
pub use gc::{GcOptions, GcReport};
pub use immutable::TagRule;
pub use manifests::{ManifestBody, PutManifest};
pub use retention::RetentionRule;
pub use usage::Usage;

#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Accept indexes whose child manifests are not in the repository.
    pub sparse_index: bool,
    /// Largest manifest accepted, in bytes.
    pub max_manifest_size: usize,
    /// Memory for hot manifests, in bytes; 0 turns the cache off.
    pub manifest_cache_bytes: usize,
    /// Tags that, once they exist, cannot be moved or deleted.
    pub immutable_tags: Vec<TagRule>,
    /// New uploads are refused while the blob storage's volume is at least
    /// this full (percent); 100 turns the guard off.
    pub disk_watermark: f64,
    /// Storage quota per project, in bytes; projects not named have none.
    pub quotas: std::collections::BTreeMap<String, u64>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            sparse_index: false,
            max_manifest_size: oci::manifest::MAX_MANIFEST_SIZE,
            manifest_cache_bytes: 64 << 20,
            immutable_tags: Vec::new(),
            disk_watermark: 95.0,
            quotas: std::collections::BTreeMap::new(),
        }
    }
}

pub struct Registry {
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetadataStore>,
    config: RegistryConfig,
    /// Whether other nodes write the metadata store (`MetadataStore::shared`).
    shared: bool,
    /// This process among the nodes: the holder of its leases.
    node: String,
    uploads: uploads::Sessions,
    cache: cache::ManifestCache,
    /// Uncached manifest bodies being sent: one buffer per manifest.
    in_flight: in_flight::InFlight,
    /// First catalog pages (see `listing`).
    catalog_cache: listing::CatalogCache,
    events: Option<events::Recorder>,
    /// Tag pulls not yet written to the metadata store (see `pulls`).
    pulls: pulls::PullLog,
}

impl Registry {
    pub fn new(blobs: Arc<dyn BlobStore>, meta: Arc<dyn MetadataStore>, config: RegistryConfig) -> Registry {
        let shared = meta.shared();
        Registry {
            blobs,
            meta,
            shared,
            node: uuid::Uuid::new_v4().to_string(),
            cache: cache::ManifestCache::new(config.manifest_cache_bytes, shared),
            in_flight: in_flight::InFlight::default(),
            catalog_cache: listing::CatalogCache::default(),
            config,
            uploads: uploads::Sessions::default(),
            pulls: pulls::PullLog::default(),
            events: None,
        }
    }

    /// Drops what the caches hold that a manifest or tag write to `repo` may
    /// have changed: the repository's manifests and tags, and the catalog
    /// pages (the write may have created or removed the repository). Call it
    /// after the metadata commit, and on error too.
    pub(crate) fn manifests_changed(&self, repo: &oci::RepoName) {
        self.cache.invalidate(repo);
        self.catalog_cache.invalidate();
    }

    /// Follows the changes other nodes make to a shared store, until the
    /// process ends, so the caches drop what they change (see `cache`).
    /// Until it runs, a shared store's caches serve nothing. Returns at
    /// once for a store only this process writes.
    pub async fn follow_changes(self: Arc<Self>) {
        let meta = self.meta.clone();
        meta.follow_changes(self).await;
    }

    /// This node's name in the leases it takes (unique per process).
    pub fn node_id(&self) -> &str {
        &self.node
    }

    /// Records push, pull, delete, mount and tag events with `recorder`.
    pub fn with_events(mut self, recorder: events::Recorder) -> Registry {
        self.events = Some(recorder);
        self
    }

    /// The outbox payloads of change events, for the metadata call that
    /// makes the change (empty when no events are recorded). `make` runs
    /// only when events are recorded at all.
    pub(crate) fn change_events(
        &self,
        make: impl FnOnce() -> Vec<(events::EventKind, events::EventData)>,
    ) -> metadata::Events {
        match &self.events {
            Some(r) => r.payloads(make()),
            None => Vec::new(),
        }
    }

    /// After a metadata commit appended `n` change events.
    pub(crate) fn events_committed(&self, n: usize) {
        if let Some(r) = &self.events {
            r.committed(n);
        }
    }

    /// Records a pull without waiting for it.
    pub(crate) fn pull_event(&self, make: impl FnOnce() -> events::EventData) {
        if let Some(r) = self.events.as_ref().filter(|r| r.wants(events::EventKind::Pull)) {
            r.pull(make());
        }
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }
}

/// The change feed of a shared store: another node's write, or a gap in
/// what was heard.
impl metadata::ChangeSink for Registry {
    fn changed(&self, repo: &str) {
        match repo.parse::<oci::RepoName>() {
            Ok(r) => self.manifests_changed(&r),
            // Only berth writes the feed; anything else is dropped whole.
            Err(_) => self.reset(),
        }
    }

    fn caught_up(&self, at: std::time::Instant) {
        self.cache.caught_up(at);
    }

    fn reset(&self) {
        self.cache.reset();
        self.catalog_cache.invalidate();
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
