//! The metadata store: repositories, tags, manifests, repository-to-blob
//! links, the referrers index and upload sessions. Every operation that must
//! be atomic (a manifest with its tags, references and referrers entry) is
//! one call, so every backend can make it one transaction.
//!
//! Invariants kept by every backend:
//! - a repository can read a blob only through a link (`link_blob`);
//! - a manifest is stored only if every blob it requires is linked into its
//!   repository and every child manifest it requires is in the repository;
//! - a tag always points at a manifest of its repository;
//! - outbox sequence numbers only grow and are never reused, even after
//!   pruning, so a delivery cursor can never skip or repeat an event.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use oci::{Descriptor, Digest, RepoName, Tag, UploadId};
use serde::{Deserialize, Serialize};

pub mod gc;
pub mod identity;
pub mod identity_testsuite;
#[cfg(feature = "postgres")]
mod pg_changes;
#[cfg(feature = "postgres")]
pub mod pg_cluster;
#[cfg(feature = "postgres")]
mod pg_gc;
#[cfg(feature = "postgres")]
mod pg_identity;
#[cfg(feature = "postgres")]
pub mod pg_schema;
#[cfg(feature = "postgres")]
pub mod pg_store;
mod redb_gc;
mod redb_identity;
pub mod redb_store;
pub mod testsuite;

pub use gc::{GcManifest, GcSnapshot, ManifestSweep, SweepGuard, SweptBlob, Touch};
pub use identity::{IdentityStore, Project, Robot, RobotGrant, Role, User, UserChange};
#[cfg(feature = "postgres")]
pub use pg_store::PostgresMetadata;
pub use redb_store::RedbMetadata;

/// What a metadata call can fail with. Callers decide by the variant; the
/// backend's own text is in `source()`, for the log, never for a client.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// What the operation needs is not in the store; nothing was written.
    #[error(transparent)]
    NotFound(#[from] Missing),
    /// A condition the write checks in its own transaction did not hold;
    /// nothing was written.
    #[error(transparent)]
    Conflict(#[from] Conflict),
    /// The backend failed in a way that may pass (a lost connection, a
    /// serialization failure, a timeout): the same call may succeed if made
    /// again. Nothing was written.
    #[error("the metadata store is unavailable")]
    Retryable(#[source] BackendError),
    /// The backend failed.
    #[error("the metadata store failed")]
    Backend(#[source] BackendError),
}

/// A backend's own error.
pub type BackendError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a call needed and the store did not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Missing {
    /// A manifest names a blob or child manifest its repository lacks.
    #[error("referenced content {0} is not in the repository")]
    Reference(Digest),
    /// `link_blob` of a blob that is not committed.
    #[error("blob {0} is not stored")]
    Blob(Digest),
}

/// An error with its sources, `outer: inner: innermost`, for a log line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

/// Why a conditional write refused: what another writer (another request,
/// another node, GC) changed first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    /// The project does not hold the digest yet, and `size` more bytes would
    /// take it over its quota.
    #[error("the project uses {used} of {limit} bytes and this needs {size} more")]
    OverQuota { used: u64, limit: u64, size: u64 },
    /// A fixed tag (`NewManifest::fixed_tags`) points at another manifest.
    #[error("tag {tag} points at {current}")]
    TagMoved { tag: Tag, current: Digest },
    /// A tag outside `delete_manifest`'s allowed set points at the manifest.
    #[error("tag {0} points at the manifest")]
    TagAdded(Tag),
    /// GC claimed the digest's bytes for deletion after the writer's
    /// `byte_fence`: the bytes it wrote may be gone; write them again.
    #[error("garbage collection is removing {0}")]
    Fenced(Digest),
    /// Another node holds the upload's write lease (`lease_upload`).
    #[error("another node is writing to upload {0}")]
    UploadBusy(UploadId),
}

/// What `MetadataStore::take_lease` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// The caller holds the lease now.
    Held,
    /// Another holder's lease has not expired.
    Busy { holder: String },
}

/// An upload session's record, with the hash state the last append saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedUpload {
    pub record: UploadRecord,
    /// `oci::Hasher::save` of a hash of the upload's first bytes (how many,
    /// the state says), saved by `release_upload`.
    pub hash_state: Option<Vec<u8>>,
}

/// How often a shared store's change feed confirms that it is caught up
/// (`ChangeSink::caught_up`); a cache may trust it for a few times this.
pub const CHANGES_CONFIRMED_EVERY: Duration = Duration::from_millis(500);

/// What a node's caches hear of the manifest and tag changes every node
/// makes to a shared store (`MetadataStore::follow_changes`).
pub trait ChangeSink: Send + Sync {
    /// A manifest or tag of `repo` was written or removed, on any node.
    fn changed(&self, repo: &str);
    /// Every change committed before `at` has been passed to `changed`.
    fn caught_up(&self, at: Instant);
    /// Changes may have been missed (the feed starts, or was lost): forget
    /// everything, and trust nothing until the next `caught_up`.
    fn reset(&self);
}

/// What a write that records new content checks in its own transaction, so
/// that no process-local lock is needed to keep the check true until the
/// write (two nodes on one store check and write atomically).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Admission {
    /// The storage quota of the repository's project, in bytes. Unless the
    /// project already holds the digest, the write fails with
    /// `Conflict::OverQuota` when the project's usage plus the new bytes
    /// would exceed it.
    pub quota: Option<u64>,
    /// `MetadataStore::byte_fence`, read before the bytes this write records
    /// were written: the write fails with `Conflict::Fenced` if GC claimed
    /// the digest for deletion since, or is still deleting it.
    pub fence: Option<u64>,
}

pub type Result<T, E = MetaError> = std::result::Result<T, E>;

/// What the store keeps about a manifest. The bytes live in the blob store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    pub media_type: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Digests of the blobs (config, layers) this manifest references.
    pub blobs: Vec<String>,
    /// Digests of the child manifests of an index.
    pub children: Vec<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// The upstream a pull-through cache fetched it from. Its blobs arrive
    /// only when a client asks for them, so missing ones are expected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_from: Option<String>,
}

/// The part of a `ManifestRecord` a manifest GET or HEAD needs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ManifestHead {
    pub media_type: String,
    pub size: u64,
}

/// A manifest to store, with what must already be present for it.
#[derive(Debug, Clone)]
pub struct NewManifest {
    pub digest: Digest,
    pub record: ManifestRecord,
    /// Blobs that must be linked into the repository.
    pub required_blobs: Vec<Digest>,
    /// Child manifests that must be in the repository.
    pub required_manifests: Vec<Digest>,
    /// Tags to point at the manifest, in the same transaction.
    pub tags: Vec<Tag>,
    /// Those of `tags` that may be created but never moved (immutable): if
    /// one points at another manifest, the put fails with
    /// `Conflict::TagMoved`.
    pub fixed_tags: Vec<Tag>,
    pub admission: Admission,
    /// Events to append to the outbox in the same transaction.
    pub events: Events,
}

/// Event payloads a change appends to the outbox in its own transaction,
/// in order, if it changes anything: what a writer acknowledges is never
/// missing from the outbox, even after a crash.
pub type Events = Vec<Vec<u8>>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadRecord {
    pub repo: String,
    /// The identity that opened the upload; only it may continue it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// The hash the client asked for (`?digest-algorithm=`); `None` is sha256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
}

/// Counts of what the store holds, for the storage metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub repositories: u64,
    pub manifests: u64,
    pub tags: u64,
    /// Distinct committed blobs, and their total size in bytes.
    pub blobs: u64,
    pub blob_bytes: u64,
    pub uploads: u64,
}

/// An event in the durable outbox: an opaque payload (the registry writes
/// CloudEvents JSON) under a sequence number that only grows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// An event an endpoint gave up on, kept for an operator to inspect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub endpoint: String,
    pub seq: u64,
    /// The event, as it was in the outbox (UTF-8 JSON).
    pub payload: String,
    pub attempts: u32,
    pub error: String,
    /// Seconds since the Unix epoch.
    pub time: u64,
}

#[async_trait]
pub trait MetadataStore: Send + Sync + 'static {
    /// Whether other processes (other berth nodes) may write this store
    /// while this one does. Then caches of its manifests and tags must
    /// follow `follow_changes`, and the leases below exclude other nodes.
    /// A store one process opens exclusively (redb) is not shared: its own
    /// writes are the only ones, and its in-process locks are enough.
    fn shared(&self) -> bool {
        false
    }

    /// Tells `sink` of every manifest and tag change any node commits,
    /// until the process ends. A store that is not shared returns at once.
    async fn follow_changes(&self, sink: Arc<dyn ChangeSink>) {
        let _ = sink;
    }

    /// Takes lease `name` for `holder` until `ttl` from now (or renews it),
    /// unless another holder's has not expired. The expiry is on the store's
    /// clock, so a node that dies loses the lease after `ttl`. A store that
    /// is not shared has no other node to exclude, and grants every lease.
    async fn take_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<Lease> {
        let _ = (name, holder, ttl);
        Ok(Lease::Held)
    }

    /// Gives up `holder`'s lease `name`, if it holds it.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        let _ = (name, holder);
        Ok(())
    }

    /// Upload `id`'s record and saved hash state, with its write lease
    /// taken (or renewed) for `holder` until `ttl` from now; `None` if there
    /// is no such upload. Fails with `Conflict::UploadBusy` while another
    /// holder's lease has not expired. A store that is not shared keeps no
    /// lease (the caller's in-process lock serializes its writers) and no
    /// hash state (the process keeps its own).
    async fn lease_upload(&self, id: &UploadId, holder: &str, ttl: Duration) -> Result<Option<LeasedUpload>> {
        let _ = (holder, ttl);
        Ok(self.get_upload(id).await?.map(|record| LeasedUpload {
            record,
            hash_state: None,
        }))
    }

    /// Ends `holder`'s lease of upload `id` and, with `hash_state`, saves
    /// it for whoever appends next. Does nothing if `holder` lost the lease
    /// meanwhile. Returns whether it held it.
    async fn release_upload(&self, id: &UploadId, holder: &str, hash_state: Option<&[u8]>) -> Result<bool> {
        let _ = (id, holder, hash_state);
        Ok(true)
    }

    /// Records that blob `digest` of `size` bytes is committed in the blob
    /// store, and links it into `repo`, if `admission` allows. Idempotent.
    async fn add_blob(&self, repo: &RepoName, digest: &Digest, size: u64, admission: Admission) -> Result<()>;

    /// The size of a committed blob, whatever repository links it.
    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>>;

    /// Links a committed blob into `repo` (a cross-repo mount), if
    /// `admission` allows. Fails with `Missing::Blob` if the blob is not
    /// committed. Idempotent.
    async fn link_blob(&self, repo: &RepoName, digest: &Digest, admission: Admission, events: Events) -> Result<()>;

    /// The blob's size if it is linked into `repo`.
    async fn linked_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>>;

    /// Removes the link, and appends `events` if there was one. Returns
    /// whether there was one.
    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest, events: Events) -> Result<bool>;

    /// Stores a manifest, its tags and its referrers entry atomically.
    async fn put_manifest(&self, repo: &RepoName, m: NewManifest) -> Result<()>;

    async fn get_manifest(&self, repo: &RepoName, digest: &Digest) -> Result<Option<ManifestRecord>>;

    /// What serving a manifest needs, without the annotations and
    /// references its record may carry: a GET of a 4 MiB manifest must not
    /// decode 4 MiB of annotations per request.
    async fn manifest_head(&self, repo: &RepoName, digest: &Digest) -> Result<Option<ManifestHead>>;

    async fn resolve_tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>>;

    /// Deletes a manifest, every tag pointing at it and its referrers entry.
    /// With `allowed_tags`, only if every tag pointing at it is one of them
    /// (else `Conflict::TagAdded`): the caller checked those. Appends
    /// `events` if it existed. Returns whether it existed.
    async fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        allowed_tags: Option<&[Tag]>,
        events: Events,
    ) -> Result<bool>;

    /// Deletes one tag, and appends `events` if it existed. Returns whether
    /// it existed.
    async fn delete_tag(&self, repo: &RepoName, tag: &Tag, events: Events) -> Result<bool>;

    /// Whether the repository holds at least one manifest.
    async fn repo_exists(&self, repo: &RepoName) -> Result<bool>;

    /// Up to `n` tags of `repo` in lexical order, strictly after `last`.
    async fn list_tags(&self, repo: &RepoName, last: Option<&str>, n: usize) -> Result<Vec<String>>;

    /// Up to `n` repositories in lexical order, strictly after `last`.
    async fn list_repos(&self, last: Option<&str>, n: usize) -> Result<Vec<String>>;

    /// Descriptors of the manifests in `repo` whose subject is `subject`.
    async fn referrers(&self, repo: &RepoName, subject: &Digest) -> Result<Vec<Descriptor>>;

    async fn put_upload(&self, id: &UploadId, rec: &UploadRecord) -> Result<()>;
    async fn get_upload(&self, id: &UploadId) -> Result<Option<UploadRecord>>;
    async fn delete_upload(&self, id: &UploadId) -> Result<()>;

    /// Counts of repositories, manifests, tags, blobs (and their bytes) and
    /// uploads. May walk the blob table: call it from background work, not
    /// per request.
    async fn stats(&self) -> Result<StoreStats>;

    /// Appends events to the outbox in one transaction, in order, and
    /// returns the sequence number of the last one (the current last
    /// sequence number if `payloads` is empty).
    async fn outbox_append(&self, payloads: Vec<Vec<u8>>) -> Result<u64>;

    /// Up to `n` events with a sequence number above `after`, in order.
    async fn outbox_read(&self, after: u64, n: usize) -> Result<Vec<OutboxEvent>>;

    /// The sequence number of the last event ever appended (0 if none).
    async fn outbox_last_seq(&self) -> Result<u64>;

    /// The last sequence number `endpoint` is done with (delivered, skipped
    /// by its filter, or dead-lettered); 0 for a new endpoint.
    async fn outbox_cursor(&self, endpoint: &str) -> Result<u64>;

    /// Moves `endpoint`'s cursor forward to `seq` (never back) and records
    /// `dead`, if any, in the same transaction.
    async fn outbox_advance(&self, endpoint: &str, seq: u64, dead: Option<DeadLetter>) -> Result<()>;

    /// Removes events with a sequence number up to `seq`. Returns how many.
    async fn outbox_prune(&self, seq: u64) -> Result<u64>;

    /// The dead letters of `endpoint`, oldest first.
    async fn dead_letters(&self, endpoint: &str) -> Result<Vec<DeadLetter>>;
    /// Everything garbage collection marks from, in one consistent snapshot.
    async fn gc_snapshot(&self) -> Result<GcSnapshot>;

    /// Removes, in one transaction, each blob of `candidates` that `guard`
    /// allows: its blob record, its links and its touch; and claims its
    /// bytes for deletion (see `byte_fence`). Candidates that are not
    /// allowed (touched since the snapshot or within the grace window) are
    /// left alone. A candidate with no blob record (an orphan file) is
    /// returned with `size: None` when allowed. Returns what was removed; the
    /// caller then deletes those bytes and calls `release_claims`.
    async fn sweep_blobs(&self, candidates: &[Digest], guard: SweepGuard) -> Result<Vec<SweptBlob>>;

    /// The fence a writer reads before writing the bytes of `digest` it
    /// will record (`Admission::fence`). The fence is how GC and writers on
    /// any node agree without a lock: a write recording a digest claimed by
    /// a sweep after the fence was read, or still being deleted, fails with
    /// `Conflict::Fenced`. Fails so itself while a claim of `digest` is not
    /// released (wait, and read it again).
    async fn byte_fence(&self, digest: &Digest) -> Result<u64>;

    /// Marks the claims of `digests` done: their bytes are deleted, so bytes
    /// written from now on are safe. Need not be durable at once: a release
    /// lost in a crash leaves the claim for `unreleased_claims`.
    async fn release_claims(&self, digests: &[Digest]) -> Result<()>;

    /// Claims never released (a collector died between its sweep and the
    /// deletion): the caller deletes their bytes and releases them. Also
    /// forgets claims released before `released_before` (seconds since the
    /// epoch): no writer still holds a fence that old.
    async fn unreleased_claims(&self, released_before: u64) -> Result<Vec<Digest>>;

    /// Removes an untagged manifest, in one transaction, only if `guard`
    /// allows its touch, no tag points at it, nothing in its repository names
    /// it as a subject, and no manifest of its repository lists it as a
    /// child. Returns its size if it was removed.
    async fn sweep_manifest(&self, m: &ManifestSweep, guard: SweepGuard) -> Result<Option<u64>> {
        Ok(self
            .sweep_manifests(std::slice::from_ref(m), guard)
            .await?
            .pop()
            .flatten())
    }

    /// `sweep_manifest` for each of `ms`, in order, in one transaction (an
    /// index before its children: removing it can free them). Returns, for
    /// each, its size if it was removed.
    async fn sweep_manifests(&self, ms: &[ManifestSweep], guard: SweepGuard) -> Result<Vec<Option<u64>>>;

    /// Bytes project `project` holds: every blob linked by any of its
    /// repositories once, plus every manifest once (by digest).
    async fn project_usage(&self, project: &str) -> Result<u64>;

    /// Whether a repository of `project` links `digest` or holds it as a
    /// manifest (then adding it elsewhere in the project costs nothing).
    async fn project_holds(&self, project: &str, digest: &Digest) -> Result<bool>;

    /// Records pulls of (repository, tag) at a time (seconds since the
    /// epoch), batched by the caller off the request path. A time older
    /// than the one recorded does not replace it.
    async fn record_pulls(&self, pulls: &[(String, String, u64)]) -> Result<()>;
}
