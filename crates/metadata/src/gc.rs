//! What garbage collection reads from and asks of the metadata store.
//!
//! GC marks from one consistent snapshot (`GcSnapshot`) and then removes
//! things one small transaction at a time. Every write that makes a blob or a
//! manifest referenced (a blob commit, a link, a manifest put) "touches" the
//! digests involved: it records the time and a store-wide sequence number.
//! A removal transaction refuses anything touched after the snapshot's
//! sequence number or within the grace window, so a concurrent push always
//! wins against the collector.

use oci::{Digest, RepoName, UploadId};

use crate::{ManifestRecord, UploadRecord};

/// When a digest was last committed, linked or referenced by a manifest put.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Touch {
    /// Seconds since the Unix epoch.
    pub time: u64,
    /// The store-wide touch sequence number of that write.
    pub seq: u64,
}

/// A manifest as GC sees it.
#[derive(Debug, Clone)]
pub struct GcManifest {
    pub repo: String,
    pub digest: Digest,
    pub record: ManifestRecord,
}

/// Everything GC marks from, read in one snapshot.
#[derive(Debug, Clone, Default)]
pub struct GcSnapshot {
    /// The touch sequence number at the snapshot: anything touched later is
    /// not the snapshot's to judge.
    pub seq: u64,
    /// Every committed blob with its size.
    pub blobs: Vec<(Digest, u64)>,
    /// Every (repository, blob) link.
    pub links: Vec<(String, Digest)>,
    pub manifests: Vec<GcManifest>,
    /// Every (repository, tag, manifest digest).
    pub tags: Vec<(String, String, Digest)>,
    pub uploads: Vec<(UploadId, UploadRecord)>,
    /// Last touch of every digest that has one (blobs and manifests).
    pub touched: Vec<(Digest, Touch)>,
    /// Last recorded pull of each (repository, tag), seconds since the epoch.
    pub pulls: Vec<(String, String, u64)>,
}

/// The limits a removal transaction checks before removing anything.
#[derive(Debug, Clone, Copy)]
pub struct SweepGuard {
    /// Refuse anything touched with a sequence number above this.
    pub seq: u64,
    /// Refuse anything touched after this time (seconds since the epoch):
    /// `now - grace`.
    pub cutoff: u64,
}

impl SweepGuard {
    /// Whether a digest with this last touch may be removed.
    pub fn allows(&self, touch: Option<Touch>) -> bool {
        match touch {
            None => true,
            Some(t) => t.seq <= self.seq && t.time <= self.cutoff,
        }
    }
}

/// A blob the sweep removed from metadata; the caller deletes its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweptBlob {
    pub digest: Digest,
    /// The recorded size, if there was a blob record (orphan files have none).
    pub size: Option<u64>,
    /// How many repository links went with it.
    pub links: usize,
}

/// A manifest to remove if it is still untagged and unreferenced.
#[derive(Debug, Clone)]
pub struct ManifestSweep {
    pub repo: RepoName,
    pub digest: Digest,
}
