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
pub mod listing;
pub mod manifests;
pub mod uploads;

pub use blobs::OpenBlob;
pub use error::{RegistryError, Result};
pub use manifests::{ManifestBody, PutManifest};

#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Accept indexes whose child manifests are not in the repository.
    pub sparse_index: bool,
    /// Largest manifest accepted, in bytes.
    pub max_manifest_size: usize,
    /// Memory for hot manifests, in bytes; 0 turns the cache off.
    pub manifest_cache_bytes: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            sparse_index: false,
            max_manifest_size: oci::manifest::MAX_MANIFEST_SIZE,
            manifest_cache_bytes: 64 << 20,
        }
    }
}

pub struct Registry {
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetadataStore>,
    config: RegistryConfig,
    uploads: uploads::Sessions,
    cache: cache::ManifestCache,
    events: Option<events::Recorder>,
}

impl Registry {
    pub fn new(blobs: Arc<dyn BlobStore>, meta: Arc<dyn MetadataStore>, config: RegistryConfig) -> Registry {
        Registry {
            blobs,
            meta,
            cache: cache::ManifestCache::new(config.manifest_cache_bytes),
            config,
            uploads: uploads::Sessions::default(),
            events: None,
        }
    }

    /// Records push, pull, delete, mount and tag events with `recorder`.
    pub fn with_events(mut self, recorder: events::Recorder) -> Registry {
        self.events = Some(recorder);
        self
    }

    /// Records change events; returns once they are in the outbox. `make`
    /// runs only when events are recorded at all.
    pub(crate) async fn events(&self, make: impl FnOnce() -> Vec<(events::EventKind, events::EventData)>) {
        if let Some(r) = &self.events {
            r.changes(make()).await;
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

/// Seconds since the Unix epoch.
pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
