//! Blob reads and deletes, always through the repository's link.

use std::ops::Range;

use oci::{Digest, ErrorCode, RepoName};
use std::sync::Arc;

use storage::{BlobStore, ByteStream};

use crate::{Registry, RegistryError, Result};

fn blob_unknown(d: &Digest) -> RegistryError {
    RegistryError::new(ErrorCode::BlobUnknown, "blob unknown to this repository").with_detail(d.to_string())
}

impl Registry {
    /// The size of a blob the repository links to.
    pub async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<u64> {
        self.meta
            .linked_blob(repo, digest)
            .await?
            .ok_or_else(|| blob_unknown(digest))
    }

    /// Opens a blob the repository links to. Reading is a second step, so
    /// the caller can check a byte range against the size first.
    pub async fn blob_open(&self, repo: &RepoName, digest: &Digest) -> Result<OpenBlob> {
        let size = self.blob_size(repo, digest).await?;
        Ok(OpenBlob {
            repo: repo.clone(),
            digest: digest.clone(),
            size,
            blobs: self.blobs.clone(),
        })
    }

    /// Removes the blob from the repository. The bytes stay while other
    /// repositories link them; garbage collection reclaims unreferenced ones.
    pub async fn blob_delete(&self, repo: &RepoName, digest: &Digest) -> Result<()> {
        let events = self.change_events(|| {
            vec![(
                crate::events::EventKind::Delete,
                crate::events::EventData {
                    repository: repo.to_string(),
                    digest: Some(digest.to_string()),
                    ..Default::default()
                },
            )]
        });
        let n = events.len();
        if !self.meta.unlink_blob(repo, digest, events).await? {
            return Err(blob_unknown(digest));
        }
        // A blob can be a signature's payload: decisions taken with it
        // (`write_generation`) must be taken again.
        self.cache.invalidate(repo);
        self.events_committed(n);
        Ok(())
    }
}

/// A blob a repository may read; made only by `Registry::blob_open`.
pub struct OpenBlob {
    repo: RepoName,
    digest: Digest,
    pub size: u64,
    blobs: Arc<dyn BlobStore>,
}

impl OpenBlob {
    /// The blob's bytes, or `range` of them (end exclusive, within `size`).
    pub async fn read(self, range: Option<Range<u64>>) -> Result<ByteStream> {
        self.open(range, false).await
    }

    /// `read`, for bytes the caller only writes to a plain socket and never
    /// looks at (see `storage::SocketReads`).
    pub async fn read_for_socket(self, range: Option<Range<u64>>) -> Result<ByteStream> {
        self.open(range, true).await
    }

    async fn open(self, range: Option<Range<u64>>, for_socket: bool) -> Result<ByteStream> {
        let got = match self.blobs.socket_reads().filter(|_| for_socket) {
            Some(reads) => reads.get_for_socket(&self.digest, range).await,
            None => self.blobs.get(&self.digest, range).await,
        };
        match got {
            Ok(s) => Ok(s),
            Err(storage::StorageError::NotFound) => {
                // Linked in metadata but gone from storage: report it as the
                // corruption it is, and tell the operator what to run.
                tracing::error!(repo = %self.repo, digest = %self.digest, "blob is linked but missing from storage; run `berth fsck`");
                Err(blob_unknown(&self.digest))
            }
            Err(e) => Err(e.into()),
        }
    }
}
