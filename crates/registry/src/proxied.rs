//! What the pull-through cache asks of the service. The cache (crate
//! `proxy`) decides what to fetch and when; everything it stores goes
//! through here, so a cached manifest or blob keeps the invariants of a
//! pushed one: bytes durable before the metadata commit, digests verified,
//! GC fenced. What differs: a cached manifest does not require its blobs
//! (they arrive when a client asks for them), and a blob can be read while
//! it is still arriving.

use bytes::Bytes;
use metadata::NewManifest;
use oci::{Digest, ErrorCode, Reference, RepoName, Tag, UploadId};
use storage::ByteStream;

use crate::manifests::{describe, Described};
use crate::{Registry, RegistryError, Result};

/// The owner of the upload sessions cache fills write into: no client can
/// continue or complete them.
pub const FILL_OWNER: &str = "berth:pull-through-cache";

impl Registry {
    /// Stores a manifest that `upstream` served for `digest` in a cache
    /// repository, and points `tag` at it. The content must hash to
    /// `digest`. Its blobs and child manifests are recorded (so GC keeps
    /// those that arrive) but not required.
    pub async fn manifest_fill(
        &self,
        repo: &RepoName,
        digest: &Digest,
        media_type: Option<&str>,
        body: Bytes,
        tag: Option<&Tag>,
        upstream: &str,
    ) -> Result<()> {
        self.check_manifest_body(&body, &Reference::Digest(digest.clone()))?;
        let Described { mut record, .. } = describe(&body, media_type)?;
        record.cached_from = Some(upstream.to_string());
        let new = NewManifest {
            digest: digest.clone(),
            record,
            required_blobs: vec![],
            required_manifests: vec![],
            tags: tag.into_iter().cloned().collect(),
            fixed_tags: vec![],
            admission: metadata::Admission::default(),
            events: vec![],
        };
        let stored = self.store_manifest(repo, body, new).await;
        self.manifests_changed(repo);
        Ok(stored??)
    }

    /// Bytes of an upload from `offset` to its current end. The cache
    /// streams a blob to clients from here while it is still arriving.
    pub async fn upload_read_from(&self, id: &UploadId, offset: u64) -> Result<ByteStream> {
        match self.blobs.upload_read_at(id, offset).await {
            Ok(s) => Ok(s),
            Err(storage::StorageError::NotFound) => Err(RegistryError::new(
                ErrorCode::BlobUploadUnknown,
                "the upload being filled from upstream is gone",
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// Links a blob that is already stored into a cache repository (the
    /// upstream confirmed the repository has it), without fetching it again.
    /// Returns false when the blob is not stored (any more).
    pub async fn cache_link(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        match self
            .meta
            .link_blob(repo, digest, metadata::Admission::default(), vec![])
            .await
        {
            Ok(()) => Ok(true),
            Err(metadata::MetaError::NotFound(metadata::Missing::Blob(_))) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Evicts from a cache repository: removes the manifests (with their
    /// tags) and the blob links. The bytes go once nothing references them
    /// and the GC grace window has passed (`gc_blobs`).
    pub async fn cache_evict(&self, repo: &RepoName, manifests: &[Digest], blobs: &[Digest]) -> Result<()> {
        let result = async {
            for d in manifests {
                self.meta.delete_manifest(repo, d, None, vec![]).await?;
            }
            for d in blobs {
                self.meta.unlink_blob(repo, d, vec![]).await?;
            }
            Ok::<(), metadata::MetaError>(())
        }
        .await;
        // After the commits, and even on error: the store may have changed.
        self.manifests_changed(repo);
        Ok(result?)
    }

    /// The size of a stored blob, whatever repository links it.
    pub async fn stored_blob_size(&self, digest: &Digest) -> Result<Option<u64>> {
        Ok(self.meta.blob_size(digest).await?)
    }

    /// When a manifest of `repo` was stored (seconds since the epoch).
    pub async fn manifest_stored_at(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>> {
        Ok(self.meta.get_manifest(repo, digest).await?.map(|r| r.created))
    }

    /// What eviction plans from: the same consistent snapshot GC marks from.
    pub async fn cache_snapshot(&self) -> Result<metadata::GcSnapshot> {
        Ok(self.meta.gc_snapshot().await?)
    }
}
