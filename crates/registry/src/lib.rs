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
}

impl Registry {
    pub fn new(blobs: Arc<dyn BlobStore>, meta: Arc<dyn MetadataStore>, config: RegistryConfig) -> Registry {
        Registry {
            blobs,
            meta,
            cache: cache::ManifestCache::new(config.manifest_cache_bytes),
            config,
            uploads: uploads::Sessions::default(),
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
