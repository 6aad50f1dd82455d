//! Blob uploads: sessions, chunks, mounts and the verified commit.
//!
//! Bytes are hashed (sha256, or the algorithm the upload was started with)
//! while they stream to the backend
//! (`BlobStore::upload_append_hashing`, which hashes beside the write). The
//! hash state (`oci::Hasher`, which counts the bytes it has seen) lives in
//! memory, taken out of its slot for each append and put back only when the
//! append succeeded whole, so it never counts bytes that are not stored;
//! whenever its count disagrees with the upload's real size (after a
//! restart, a failed append, or a sha512 digest) it is not used, and the
//! commit re-reads the upload and hashes it again, so a commit is always
//! verified against what is stored.
//!
//! With a shared store any node may continue an upload another started:
//! - each append and the commit hold the upload's write lease in the store
//!   (`MetadataStore::lease_upload`), renewed while a long chunk streams, so
//!   appends from two nodes are serialized; one that finds another node's
//!   lease waits `BUSY_WAIT` for it, then is refused with `RANGE_INVALID`
//!   (the client asks for the offset and continues from there);
//! - releasing the lease saves the hash state with the upload
//!   (`release_upload`), so the next node continues the hash instead of
//!   reading the upload back. A saved state that counts fewer bytes than
//!   the upload holds (its node died after appending) is brought up to date
//!   from the stored bytes, which an append never changes.
//!
//! The lease cannot stop a node that stalls for longer than its TTL in the
//! middle of writing a chunk (the storage has no fencing): if another node
//! appends meanwhile, the upload's bytes are wrong, and the commit's digest
//! check refuses them. Nothing unverified is ever committed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use metadata::{Conflict, LeasedUpload, MetaError, Missing, UploadRecord};
use oci::{Algorithm, Digest, ErrorCode, Hasher, RepoName, UploadId};
use storage::ByteStream;

use crate::{now, Registry, RegistryError, Result};

/// How long an upload's write lease lasts unrenewed: how long the upload is
/// stuck when the node writing to it dies.
const LEASE_TTL: Duration = Duration::from_secs(15);
/// How often a long append renews it.
const LEASE_RENEW: Duration = Duration::from_secs(5);
/// How long a request waits for another node's append to the same upload.
const BUSY_WAIT: Duration = Duration::from_secs(2);
const BUSY_POLL: Duration = Duration::from_millis(20);

/// One upload's in-memory state.
struct Slot {
    /// Serializes appends and the commit of one upload in this process,
    /// and holds the upload's hash state: `None` once it is lost (out of
    /// step with the bytes stored).
    state: tokio::sync::Mutex<Option<Hasher>>,
}

#[derive(Default)]
pub(crate) struct Sessions {
    slots: Mutex<HashMap<UploadId, Arc<Slot>>>,
}

impl Sessions {
    /// The slot of a new upload, hashing with `alg` from its first byte.
    fn start(&self, id: &UploadId, alg: Algorithm) {
        let slot = Arc::new(Slot {
            state: tokio::sync::Mutex::new(Some(alg.hasher())),
        });
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), slot);
    }

    /// The upload's slot. One made here (the upload was started before a
    /// restart, or on another node) has no hash state: the saved one, if
    /// any, is used, else the commit reads the upload back.
    fn slot(&self, id: &UploadId) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .entry(id.clone())
            .or_insert_with(|| {
                Arc::new(Slot {
                    state: tokio::sync::Mutex::new(None),
                })
            })
            .clone()
    }

    fn remove(&self, id: &UploadId) {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

/// What an upload holds so far, for its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadProgress {
    pub size: u64,
    /// The hash the upload was started with (`?digest-algorithm=`).
    pub algorithm: Algorithm,
}

/// A chunk's `Content-Range` start must be the upload's size.
fn check_start(start: Option<u64>, size: u64) -> Result<()> {
    match start {
        Some(start) if start != size => Err(RegistryError::new(
            ErrorCode::RangeInvalid,
            format!(
                "chunk starts at byte {start}, but the upload has {size} bytes; send the next chunk from byte {size}"
            ),
        )),
        _ => Ok(()),
    }
}

fn upload_unknown(id: &UploadId) -> RegistryError {
    RegistryError::new(
        ErrorCode::BlobUploadUnknown,
        "upload unknown: it was cancelled, completed, or never started; start a new upload with POST",
    )
    .with_detail(id.to_string())
}

fn upload_busy(id: &UploadId) -> RegistryError {
    RegistryError::new(
        ErrorCode::RangeInvalid,
        "another request is writing to this upload; ask for its offset (GET the upload) and continue from there",
    )
    .with_detail(id.to_string())
}

/// The hash state, if it has seen exactly the upload's `size` bytes.
fn in_step(state: &Option<Hasher>, size: u64) -> Option<&Hasher> {
    state.as_ref().filter(|h| h.len() == size)
}

fn algorithm_of(rec: &UploadRecord) -> Algorithm {
    rec.algorithm
        .as_deref()
        .and_then(|a| a.parse().ok())
        .unwrap_or(Algorithm::Sha256)
}

/// An upload this node writes to: its record and size, under its lease.
struct Held {
    size: u64,
    algorithm: Algorithm,
    /// The hash state the last append saved (shared stores only).
    saved: Option<Vec<u8>>,
}

impl Registry {
    /// Takes upload `id`'s write lease, waiting up to `BUSY_WAIT` for
    /// another node's, and checks that it is an upload of `repo` by
    /// `owner`. Anything else is "unknown", so ids do not leak.
    async fn hold(&self, repo: &RepoName, id: &UploadId, owner: Option<&str>) -> Result<Held> {
        let mut waited = Duration::ZERO;
        let leased = loop {
            match self.meta.lease_upload(id, &self.node, LEASE_TTL).await {
                Err(MetaError::Conflict(Conflict::UploadBusy(_))) if waited < BUSY_WAIT => {
                    tokio::time::sleep(BUSY_POLL).await;
                    waited += BUSY_POLL;
                }
                Err(MetaError::Conflict(Conflict::UploadBusy(_))) => return Err(upload_busy(id)),
                other => break other?,
            }
        };
        let found = match leased {
            Some(LeasedUpload { record, hash_state })
                if record.repo == repo.as_str() && record.owner.as_deref() == owner =>
            {
                match self.blobs.upload_size(id).await {
                    Ok(Some(size)) => Some(Held {
                        size,
                        algorithm: algorithm_of(&record),
                        saved: hash_state,
                    }),
                    Ok(None) => None,
                    Err(e) => {
                        self.unhold(id, None).await;
                        return Err(e.into());
                    }
                }
            }
            _ => None,
        };
        match found {
            Some(held) => Ok(held),
            None => {
                self.unhold(id, None).await;
                // Drop any in-memory slot a request for this id created.
                self.uploads.remove(id);
                Err(upload_unknown(id))
            }
        }
    }

    /// Releases the write lease of upload `id`, saving `state` for the next
    /// node (shared stores only; a store only this process writes keeps
    /// neither).
    async fn unhold(&self, id: &UploadId, state: Option<&Hasher>) {
        if !self.shared {
            return;
        }
        let saved = state.map(Hasher::save);
        if let Err(e) = self.meta.release_upload(id, &self.node, saved.as_deref()).await {
            tracing::warn!(upload = %id, error = %metadata::error_chain(&e), "could not release an upload's lease; it expires by itself");
        }
    }

    /// The hash state to continue upload `id` of `size` bytes with: this
    /// node's own if it is in step, else the one the last append saved,
    /// brought up to date from the stored bytes if it counts fewer; `None`
    /// when neither can be had (the commit then reads the upload back).
    async fn resume_hash(&self, id: &UploadId, mine: Option<Hasher>, held: &Held) -> Option<Hasher> {
        let in_step = |h: &Hasher| h.algorithm() == held.algorithm && h.len() <= held.size;
        if let Some(h) = mine.filter(|h| in_step(h) && h.len() == held.size) {
            return Some(h);
        }
        let saved = held.saved.as_deref().and_then(|s| Hasher::resume(s).ok());
        let mut h = match saved.filter(in_step) {
            Some(h) => h,
            None if held.size == 0 => return Some(held.algorithm.hasher()),
            None => return None,
        };
        if h.len() < held.size {
            // Bytes appended after the state was saved: the stored bytes
            // before them never change, so hashing the rest is enough.
            let mut stream = self.blobs.upload_read_at(id, h.len()).await.ok()?;
            while let Some(chunk) = stream.next().await {
                h.update(&chunk.ok()?);
            }
        }
        (h.len() == held.size).then_some(h)
    }

    /// Appends `data` to upload `id`, hashing it with `hasher` if there is
    /// one (in step with the upload's bytes). `state` gets the hash state
    /// only if the whole append succeeded. With a shared store the lease is
    /// renewed while the bytes stream; if another node took it meanwhile,
    /// the append stops.
    async fn append(
        &self,
        id: &UploadId,
        state: &mut Option<Hasher>,
        hasher: Option<Hasher>,
        data: ByteStream,
    ) -> Result<u64> {
        *state = None;
        let work = async {
            match hasher {
                Some(h) => self
                    .blobs
                    .upload_append_hashing(id, data, h)
                    .await
                    .map(|(n, h)| (n, Some(h))),
                None => self.blobs.upload_append(id, data).await.map(|n| (n, None)),
            }
        };
        let appended = if self.shared {
            self.renewing_upload(id, work).await?
        } else {
            work.await
        };
        match appended {
            Ok((n, h)) => {
                *state = h.filter(|h| h.len() == n);
                Ok(n)
            }
            Err(storage::StorageError::NotFound) => Err(upload_unknown(id)),
            Err(e) => Err(e.into()),
        }
    }

    /// Runs `work` while renewing upload `id`'s lease every `LEASE_RENEW`.
    async fn renewing_upload<T>(&self, id: &UploadId, work: impl std::future::Future<Output = T>) -> Result<T> {
        tokio::pin!(work);
        let mut tick = tokio::time::interval(LEASE_RENEW);
        tick.tick().await;
        loop {
            tokio::select! {
                out = &mut work => return Ok(out),
                _ = tick.tick() => match self.meta.lease_upload(id, &self.node, LEASE_TTL).await {
                    Ok(Some(_)) => {}
                    Ok(None) => return Err(upload_unknown(id)),
                    Err(MetaError::Conflict(Conflict::UploadBusy(_))) => {
                        tracing::warn!(upload = %id, "another node took over this upload while a chunk streamed; stopped");
                        return Err(upload_busy(id));
                    }
                    // Still ours until it expires; nobody can take it while
                    // the store is away.
                    Err(e) => tracing::warn!(upload = %id, error = %metadata::error_chain(&e), "could not renew an upload's lease"),
                },
            }
        }
    }
}

impl Registry {
    /// Starts an upload session in `repo`, owned by `owner` (the caller's
    /// identity, when there is access control): only the same owner can
    /// continue, complete or cancel it. Its bytes are hashed with `alg` as
    /// they arrive (`?digest-algorithm=`); a commit by another algorithm's
    /// digest still works, by reading the upload back.
    pub async fn upload_start(&self, repo: &RepoName, owner: Option<&str>, alg: Algorithm) -> Result<UploadId> {
        self.check_disk_watermark().await?;
        let id: UploadId = uuid::Uuid::new_v4()
            .to_string()
            .parse()
            .map_err(|e| RegistryError::internal("creating an upload id", e))?;
        self.blobs.upload_create(&id).await?;
        let rec = UploadRecord {
            repo: repo.to_string(),
            owner: owner.map(str::to_string),
            created: now(),
            algorithm: (alg != Algorithm::Sha256).then(|| alg.as_str().to_string()),
        };
        if let Err(e) = self.meta.put_upload(&id, &rec).await {
            let _ = self.blobs.upload_delete(&id).await;
            return Err(e.into());
        }
        self.uploads.start(&id, alg);
        Ok(id)
    }

    /// The disk-watermark guard: refuses new uploads when the volume is too
    /// full, so the metadata store and in-flight uploads keep room to
    /// finish. Pulls never pass here.
    async fn check_disk_watermark(&self) -> Result<()> {
        let limit = self.config.disk_watermark;
        if limit >= 100.0 {
            return Ok(());
        }
        let Some(usage) = self.blobs.disk_usage().await? else {
            return Ok(());
        };
        match usage.refuses_uploads(limit) {
            Some(why) => Err(RegistryError::new(ErrorCode::Denied, why)),
            None => Ok(()),
        }
    }

    /// Checks that `id` is an upload of `repo` opened by `owner`, and
    /// returns its size and algorithm. Anything else is "unknown", so ids do
    /// not leak.
    pub async fn upload_status(&self, repo: &RepoName, id: &UploadId, owner: Option<&str>) -> Result<UploadProgress> {
        let found = match self.meta.get_upload(id).await? {
            Some(rec) if rec.repo == repo.as_str() && rec.owner.as_deref() == owner => {
                self.blobs.upload_size(id).await?.map(|size| UploadProgress {
                    size,
                    algorithm: algorithm_of(&rec),
                })
            }
            _ => None,
        };
        found.ok_or_else(|| upload_unknown(id))
    }

    /// Appends a chunk. With `start`, the chunk must begin exactly at the
    /// upload's current size (`Content-Range`), else `RANGE_INVALID`.
    /// Returns the new size.
    pub async fn upload_append(
        &self,
        repo: &RepoName,
        id: &UploadId,
        owner: Option<&str>,
        start: Option<u64>,
        data: ByteStream,
    ) -> Result<u64> {
        let slot = self.uploads.slot(id);
        let mut state = slot.state.lock().await;
        let held = self.hold(repo, id, owner).await?;
        let appended = async {
            check_start(start, held.size)?;
            let hasher = self.resume_hash(id, state.take(), &held).await;
            self.append(id, &mut state, hasher, data).await
        }
        .await;
        // Saved only when it is this append's: a failed one leaves the
        // state saved before, which the next node brings up to date.
        let fresh = appended.as_ref().ok().and_then(|n| in_step(&state, *n));
        self.unhold(id, fresh).await;
        appended
    }

    /// Completes an upload: appends the last chunk, verifies the digest,
    /// commits the blob and links it into `repo`. On a digest mismatch the
    /// upload is discarded and nothing is stored. With `start` (the last
    /// chunk's `Content-Range`), the chunk must begin at the upload's size,
    /// checked under the same lock as the commit, so a concurrent PATCH
    /// cannot slip between the check and the digest.
    pub async fn upload_finish(
        &self,
        repo: &RepoName,
        id: &UploadId,
        owner: Option<&str>,
        start: Option<u64>,
        digest: &Digest,
        last_chunk: Option<ByteStream>,
    ) -> Result<u64> {
        let slot = self.uploads.slot(id);
        let mut state = slot.state.lock().await;
        let held = self.hold(repo, id, owner).await?;
        let verified = async {
            check_start(start, held.size)?;
            let mut size = held.size;
            let hasher = self.resume_hash(id, state.take(), &held).await;
            match last_chunk {
                Some(data) => size = self.append(id, &mut state, hasher, data).await?,
                None => *state = hasher,
            }
            let actual = self.upload_digest(id, state.as_ref(), size, digest.algorithm()).await?;
            Ok((actual, size))
        }
        .await;
        let (actual, size) = match verified {
            Ok(v) => v,
            Err(e) => {
                self.unhold(id, None).await;
                return Err(e);
            }
        };
        if actual != *digest {
            self.discard(id).await;
            return Err(RegistryError::new(
                ErrorCode::DigestInvalid,
                format!("uploaded content has digest {actual}, not the {digest} given; the upload was discarded, push the blob again"),
            )
            .with_detail(digest.to_string()));
        }
        // Over quota: nothing is stored, the upload is gone.
        let mut admission = match self.quota_admit(repo, digest, size).await {
            Ok(a) => a,
            Err(e) => {
                self.discard(id).await;
                return Err(e);
            }
        };
        // Read before the bytes land under their digest: the record is
        // refused if GC claimed the digest since (see `gc`).
        admission.fence = match self.byte_fence(digest).await {
            Ok(f) => Some(f),
            Err(e) => {
                self.unhold(id, in_step(&state, size)).await;
                return Err(e);
            }
        };
        let size = match self.blobs.upload_commit(id, digest).await {
            Ok(n) => n,
            Err(e) => {
                self.unhold(id, in_step(&state, size)).await;
                return Err(match e {
                    storage::StorageError::NotFound => upload_unknown(id),
                    e => e.into(),
                });
            }
        };
        let recorded = self.meta.add_blob(repo, digest, size, admission).await;
        // The commit consumed the upload, whether or not the store took it.
        self.meta.delete_upload(id).await?;
        self.uploads.remove(id);
        match recorded {
            Ok(()) => Ok(size),
            // Refused (another push took the project over its quota since
            // the check above): the bytes are unreferenced and GC removes them.
            Err(e) => Err(crate::quota::refused(repo, e)),
        }
    }

    /// The digest (by the upload's algorithm) of what it holds now, from the streaming
    /// hash, if it is in step with the stored bytes (no I/O beyond a stat).
    /// The pull-through cache uses it to release a blob's last bytes to
    /// clients before the commit has synced them.
    pub async fn upload_hashed(&self, id: &UploadId) -> Option<Digest> {
        let slot = self.uploads.slot(id);
        let state = slot.state.lock().await;
        let size = self.blobs.upload_size(id).await.ok()??;
        let h = state.as_ref()?;
        (h.len() == size).then(|| h.clone().finish())
    }

    /// The digest of the upload's `size` bytes: from the streaming hash when
    /// it is in step, else by reading the upload back.
    async fn upload_digest(&self, id: &UploadId, state: Option<&Hasher>, size: u64, alg: Algorithm) -> Result<Digest> {
        if let Some(h) = state {
            if h.len() == size && h.algorithm() == alg {
                return Ok(h.clone().finish());
            }
        }
        let mut hasher = alg.hasher();
        let mut stream = self.blobs.upload_read(id).await?;
        while let Some(chunk) = stream.next().await {
            hasher.update(&chunk.map_err(storage::StorageError::from)?);
        }
        Ok(hasher.finish())
    }

    async fn discard(&self, id: &UploadId) {
        if let Err(e) = self.blobs.upload_delete(id).await {
            tracing::warn!(upload = %id, error = %e, "could not remove a discarded upload");
        }
        if let Err(e) = self.meta.delete_upload(id).await {
            tracing::warn!(upload = %id, error = %metadata::error_chain(&e), "could not remove a discarded upload record");
        }
        self.uploads.remove(id);
    }

    /// Removes an abandoned upload session (GC). Returns its size, or `None`
    /// if it was completed or cancelled meanwhile, or is being written to
    /// (on any node). Takes the upload's lock and lease, so it never
    /// removes an upload under an append in flight.
    pub(crate) async fn upload_expire(&self, id: &UploadId) -> Result<Option<u64>> {
        let slot = self.uploads.slot(id);
        let _guard = slot.state.lock().await;
        let leased = match self.meta.lease_upload(id, &self.node, LEASE_TTL).await {
            Err(MetaError::Conflict(Conflict::UploadBusy(_))) => return Ok(None),
            other => other?,
        };
        if leased.is_none() {
            self.uploads.remove(id);
            return Ok(None);
        }
        let size = self.blobs.upload_size(id).await?.unwrap_or(0);
        self.discard(id).await;
        Ok(Some(size))
    }

    /// Cancels an upload of `repo`.
    pub async fn upload_cancel(&self, repo: &RepoName, id: &UploadId, owner: Option<&str>) -> Result<()> {
        let slot = self.uploads.slot(id);
        let _guard = slot.state.lock().await;
        self.hold(repo, id, owner).await?;
        self.discard(id).await;
        Ok(())
    }

    /// A cross-repository mount. With `from`, the blob must be linked into
    /// `from`; without it, any committed blob can be mounted. Returns the
    /// blob's size, or `None` when it cannot be mounted (the client then
    /// uploads it).
    pub async fn mount(&self, repo: &RepoName, digest: &Digest, from: Option<&RepoName>) -> Result<Option<u64>> {
        if let Some(size) = self.meta.linked_blob(repo, digest).await? {
            return Ok(Some(size));
        }
        let size = match from {
            Some(from) => self.meta.linked_blob(from, digest).await?,
            None => self.meta.blob_size(digest).await?,
        };
        let Some(size) = size else { return Ok(None) };
        let admission = self.quota_admit(repo, digest, size).await?;
        let events = self.change_events(|| {
            vec![(
                crate::events::EventKind::Mount,
                crate::events::EventData {
                    repository: repo.to_string(),
                    digest: Some(digest.to_string()),
                    size: Some(size),
                    from: from.map(RepoName::to_string),
                    ..Default::default()
                },
            )]
        });
        let n = events.len();
        match self.meta.link_blob(repo, digest, admission, events).await {
            Ok(()) => {
                self.events_committed(n);
                Ok(Some(size))
            }
            Err(MetaError::NotFound(Missing::Blob(_))) => Ok(None),
            Err(e) => Err(crate::quota::refused(repo, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Range;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use bytes::Bytes;
    use futures_util::StreamExt;
    use oci::{Algorithm, Digest, ErrorCode, Hasher, Reference, UploadId};
    use storage::{BlobStore, ByteStream, FsBlobStore, StorageError};

    use crate::gc::tests::{env, pull, push, repo};
    use crate::{Registry, RegistryConfig};

    /// A blob store whose next hashing append hashes everything it is sent
    /// and then fails without storing any of it, as a disk error after the
    /// hasher ran ahead would.
    struct FailAfterHashing {
        inner: FsBlobStore,
        fail_next: AtomicBool,
    }

    #[async_trait::async_trait]
    impl BlobStore for FailAfterHashing {
        async fn stat(&self, d: &Digest) -> storage::Result<Option<u64>> {
            self.inner.stat(d).await
        }
        async fn get(&self, d: &Digest, range: Option<Range<u64>>) -> storage::Result<ByteStream> {
            self.inner.get(d, range).await
        }
        async fn put(&self, d: &Digest, data: Bytes) -> storage::Result<()> {
            self.inner.put(d, data).await
        }
        async fn delete(&self, d: &Digest) -> storage::Result<()> {
            self.inner.delete(d).await
        }
        async fn list_page(&self, after: Option<&Digest>, limit: usize) -> storage::Result<Vec<(Digest, u64)>> {
            self.inner.list_page(after, limit).await
        }
        async fn upload_create(&self, id: &UploadId) -> storage::Result<()> {
            self.inner.upload_create(id).await
        }
        async fn upload_append(&self, id: &UploadId, data: ByteStream) -> storage::Result<u64> {
            self.inner.upload_append(id, data).await
        }
        async fn upload_append_hashing(
            &self,
            id: &UploadId,
            mut data: ByteStream,
            mut hasher: Hasher,
        ) -> storage::Result<(u64, Hasher)> {
            if !self.fail_next.swap(false, Ordering::SeqCst) {
                return self.inner.upload_append_hashing(id, data, hasher).await;
            }
            while let Some(chunk) = data.next().await {
                hasher.update(&chunk?);
            }
            Err(StorageError::Io(std::io::Error::other("disk on fire")))
        }
        async fn upload_size(&self, id: &UploadId) -> storage::Result<Option<u64>> {
            self.inner.upload_size(id).await
        }
        async fn upload_read(&self, id: &UploadId) -> storage::Result<ByteStream> {
            self.inner.upload_read(id).await
        }
        async fn upload_commit(&self, id: &UploadId, d: &Digest) -> storage::Result<u64> {
            self.inner.upload_commit(id, d).await
        }
        async fn upload_delete(&self, id: &UploadId) -> storage::Result<()> {
            self.inner.upload_delete(id).await
        }
    }

    fn body(b: &'static [u8]) -> ByteStream {
        Box::pin(futures_util::stream::iter(vec![Ok(Bytes::from_static(b))]))
    }

    /// After an append that failed, the hash state is not trusted again,
    /// even when a later append brings the upload to the size it counted:
    /// the commit hashes what is stored, so the bytes the failed append
    /// hashed cannot be committed under their digest.
    #[tokio::test]
    async fn a_failed_append_never_leaves_a_hash_the_commit_trusts() {
        let e = env().await;
        let dir = tempfile::tempdir().unwrap();
        let blobs = Arc::new(FailAfterHashing {
            inner: FsBlobStore::open(dir.path()).await.unwrap(),
            fail_next: AtomicBool::new(false),
        });
        let reg = Registry::new(blobs.clone(), e.meta.clone(), RegistryConfig::default());
        let r = repo("p/a");
        let (sent, stored) = (b"evil-bytes", b"other-data");
        let id = reg.upload_start(&r, None, Algorithm::Sha256).await.unwrap();
        blobs.fail_next.store(true, Ordering::SeqCst);
        assert!(reg.upload_append(&r, &id, None, None, body(sent)).await.is_err());
        assert_eq!(reg.upload_status(&r, &id, None).await.unwrap().size, 0);
        assert_eq!(
            reg.upload_append(&r, &id, None, Some(0), body(stored)).await.unwrap(),
            10
        );
        let err = reg
            .upload_finish(&r, &id, None, None, &Digest::sha256(sent), None)
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::DigestInvalid);

        // And an upload whose appends all succeed commits from the hash.
        let id = reg.upload_start(&r, None, Algorithm::Sha256).await.unwrap();
        reg.upload_append(&r, &id, None, Some(0), body(b"abc")).await.unwrap();
        reg.upload_finish(&r, &id, None, None, &Digest::sha256(b"abcdef"), Some(body(b"def")))
            .await
            .unwrap();
        assert_eq!(blobs.stat(&Digest::sha256(b"abcdef")).await.unwrap(), Some(6));
    }

    /// A closing chunk is checked against the offset under the commit's
    /// lock: a wrong start is refused and leaves the upload whole, so a
    /// concurrent PATCH can never make the commit hash other bytes.
    #[tokio::test]
    async fn a_closing_chunk_at_the_wrong_offset_leaves_the_upload_as_it_was() {
        let e = env().await;
        let r = repo("p/a");
        let id = e.reg.upload_start(&r, None, Algorithm::Sha512).await.unwrap();
        e.reg.upload_append(&r, &id, None, Some(0), body(b"abc")).await.unwrap();
        let d = {
            let mut h = Algorithm::Sha512.hasher();
            h.update(b"abcdef");
            h.finish()
        };
        let err = e
            .reg
            .upload_finish(&r, &id, None, Some(2), &d, Some(body(b"def")))
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::RangeInvalid);
        let p = e.reg.upload_status(&r, &id, None).await.unwrap();
        assert_eq!((p.size, p.algorithm), (3, Algorithm::Sha512));
        e.reg
            .upload_finish(&r, &id, None, Some(3), &d, Some(body(b"def")))
            .await
            .unwrap();
        assert_eq!(e.blobs.stat(&d).await.unwrap(), Some(6));
    }

    #[tokio::test]
    async fn above_the_disk_watermark_uploads_are_refused_and_pulls_work() {
        let e = env().await;
        let r = repo("p/a");
        let m = push(&e.reg, &r, b"cfg", &[b"layer"], Some("v1")).await;
        // The same stores, with a watermark any real volume is at or above.
        let full = Registry::new(
            e.blobs.clone(),
            e.meta.clone(),
            RegistryConfig {
                disk_watermark: 0.0,
                ..RegistryConfig::default()
            },
        );
        let err = full.upload_start(&r, None, Algorithm::Sha256).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Denied);
        assert!(
            err.message.starts_with("storage is ") && err.message.contains("% full, at or above the 0% watermark"),
            "{}",
            err.message
        );
        assert!(err.message.ends_with("pulls still work"));
        pull(&full, &r, &m).await.unwrap();
        assert!(full
            .manifest_get(&r, &Reference::Tag("v1".parse().unwrap()), true)
            .await
            .is_ok());
        // 100 turns the guard off.
        let off = Registry::new(
            e.blobs.clone(),
            e.meta.clone(),
            RegistryConfig {
                disk_watermark: 100.0,
                ..RegistryConfig::default()
            },
        );
        assert!(Arc::new(off).upload_start(&r, None, Algorithm::Sha256).await.is_ok());
    }
}
