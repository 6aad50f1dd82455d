//! Blob uploads: sessions, chunks, mounts and the verified commit.
//!
//! Bytes are hashed (sha256, or the algorithm the upload was started with)
//! while they stream to the backend
//! (`BlobStore::upload_append_hashing`, which hashes beside the write). The
//! hash state lives in memory beside a count of the bytes it has seen. It is
//! taken out of its slot for each append and put back only when the append
//! succeeded whole, so it never counts bytes that are not stored; whenever the
//! count disagrees with the upload's real size (after a restart, a failed
//! append, or a sha512 digest) the commit re-reads the upload and hashes it
//! again, so a commit is always verified against what is stored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use metadata::{MetaError, Missing, UploadRecord};
use oci::{Algorithm, Digest, ErrorCode, Hasher, RepoName, UploadId};
use storage::ByteStream;

use crate::{now, Registry, RegistryError, Result};

struct HashState {
    hasher: Hasher,
    /// Bytes fed to `hasher`, from the start of the upload.
    hashed: u64,
}

/// One upload's in-memory state.
struct Slot {
    /// Serializes appends and the commit of one upload, and holds the
    /// upload's hash state: `None` once it is lost (out of step with the
    /// bytes stored), for good.
    state: tokio::sync::Mutex<Option<HashState>>,
}

#[derive(Default)]
pub(crate) struct Sessions {
    slots: Mutex<HashMap<UploadId, Arc<Slot>>>,
}

impl Sessions {
    /// The slot of a new upload, hashing with `alg` from its first byte.
    fn start(&self, id: &UploadId, alg: Algorithm) {
        let slot = Arc::new(Slot {
            state: tokio::sync::Mutex::new(Some(HashState {
                hasher: alg.hasher(),
                hashed: 0,
            })),
        });
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), slot);
    }

    /// The upload's slot. One made here (the upload was started before a
    /// restart, or on another node) hashes sha256 from byte 0: if the upload
    /// already holds bytes, or its digest is another algorithm's, the commit
    /// finds the state out of step and reads the upload back instead.
    fn slot(&self, id: &UploadId) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .entry(id.clone())
            .or_insert_with(|| {
                Arc::new(Slot {
                    state: tokio::sync::Mutex::new(Some(HashState {
                        hasher: Algorithm::Sha256.hasher(),
                        hashed: 0,
                    })),
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

impl Registry {
    /// Appends `data` to upload `id` of `size` bytes, hashing it when the hash
    /// state is in step with those bytes. The state goes back into `state`
    /// only if the whole append succeeded.
    async fn append(
        &self,
        id: &UploadId,
        state: &mut Option<HashState>,
        size: u64,
        data: ByteStream,
    ) -> storage::Result<u64> {
        match state.take().filter(|h| h.hashed == size) {
            Some(h) => {
                let (n, hasher) = self.blobs.upload_append_hashing(id, data, h.hasher).await?;
                *state = Some(HashState { hasher, hashed: n });
                Ok(n)
            }
            None => self.blobs.upload_append(id, data).await,
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
        let (rec, size) = self.upload_checked(repo, id, owner).await?;
        let algorithm = rec
            .algorithm
            .as_deref()
            .and_then(|a| a.parse().ok())
            .unwrap_or(Algorithm::Sha256);
        Ok(UploadProgress { size, algorithm })
    }

    /// The upload's record and size, if it is `repo`'s and `owner`'s.
    async fn upload_checked(&self, repo: &RepoName, id: &UploadId, owner: Option<&str>) -> Result<(UploadRecord, u64)> {
        let found = match self.meta.get_upload(id).await? {
            Some(rec) if rec.repo == repo.as_str() && rec.owner.as_deref() == owner => {
                self.blobs.upload_size(id).await?.map(|size| (rec, size))
            }
            _ => None,
        };
        found.ok_or_else(|| {
            // Drop any in-memory slot a request for this id created.
            self.uploads.remove(id);
            upload_unknown(id)
        })
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
        let (_, size) = self.upload_checked(repo, id, owner).await?;
        check_start(start, size)?;
        match self.append(id, &mut state, size, data).await {
            Ok(n) => Ok(n),
            Err(storage::StorageError::NotFound) => Err(upload_unknown(id)),
            Err(e) => Err(e.into()),
        }
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
        let (_, mut size) = self.upload_checked(repo, id, owner).await?;
        check_start(start, size)?;
        if let Some(data) = last_chunk {
            size = match self.append(id, &mut state, size, data).await {
                Ok(n) => n,
                Err(storage::StorageError::NotFound) => return Err(upload_unknown(id)),
                Err(e) => return Err(e.into()),
            };
        }
        let actual = self.upload_digest(id, state.as_ref(), size, digest.algorithm()).await?;
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
        admission.fence = Some(self.byte_fence(digest).await?);
        let size = match self.blobs.upload_commit(id, digest).await {
            Ok(n) => n,
            Err(storage::StorageError::NotFound) => return Err(upload_unknown(id)),
            Err(e) => return Err(e.into()),
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
        (h.hashed == size).then(|| h.hasher.clone().finish())
    }

    /// The digest of the upload's `size` bytes: from the streaming hash when
    /// it is in step, else by reading the upload back.
    async fn upload_digest(
        &self,
        id: &UploadId,
        state: Option<&HashState>,
        size: u64,
        alg: Algorithm,
    ) -> Result<Digest> {
        if let Some(h) = state {
            if h.hashed == size && h.hasher.algorithm() == alg {
                return Ok(h.hasher.clone().finish());
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
    /// if it was completed or cancelled meanwhile. Takes the upload's lock,
    /// so it never removes an upload under an append in flight.
    pub(crate) async fn upload_expire(&self, id: &UploadId) -> Result<Option<u64>> {
        let slot = self.uploads.slot(id);
        let _guard = slot.state.lock().await;
        if self.meta.get_upload(id).await?.is_none() {
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
        self.upload_checked(repo, id, owner).await?;
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
