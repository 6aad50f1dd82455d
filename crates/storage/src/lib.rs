//! The blob store: content-addressed bytes, and the upload files that become
//! blobs. It knows nothing of repositories, manifests or HTTP; which
//! repository may read which blob is the metadata store's business.
//!
//! Invariant: a blob is visible under its digest only after its bytes are
//! fully written and synced, and the caller has verified the digest.

use std::io;
use std::ops::Range;
use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::Stream;
use oci::{Digest, Hasher, UploadId};

pub mod fs;
#[cfg(feature = "s3")]
pub mod s3;
#[cfg(feature = "s3")]
pub mod seaweedfs;
pub mod testsuite;

pub use fs::FsBlobStore;
#[cfg(feature = "s3")]
pub use s3::S3BlobStore;

/// A stream of blob bytes.
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("blob or upload not found")]
    NotFound,
    /// The stream of data to store failed (for an upload, the client's
    /// request body: malformed, cut short or stalled). The store is fine;
    /// the caller decides whose fault it is.
    #[error("the data to store did not arrive")]
    Input(#[source] io::Error),
    #[error("storage I/O error: {0}")]
    Io(io::Error),
}

/// Marks an error of the stream a backend was given to store, so that it
/// arrives as `StorageError::Input` however it travels through the backend
/// (an `io::Error` converted with `?`). Every backend passes the errors of
/// its input stream through this.
pub fn input_error(e: io::Error) -> io::Error {
    io::Error::new(e.kind(), InputFailed(e))
}

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct InputFailed(io::Error);

impl From<io::Error> for StorageError {
    fn from(e: io::Error) -> Self {
        if !e.get_ref().is_some_and(|inner| inner.is::<InputFailed>()) {
            return StorageError::Io(e);
        }
        let kind = e.kind();
        match e.into_inner().map(|inner| inner.downcast::<InputFailed>()) {
            Some(Ok(marked)) => StorageError::Input(marked.0),
            // Not reached (checked above); an I/O error rather than a panic.
            Some(Err(other)) => StorageError::Io(io::Error::new(kind, other)),
            None => StorageError::Io(kind.into()),
        }
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// The size of a committed blob, or `None` if it is not stored.
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>>;

    /// The bytes of a committed blob, or of `range` of it (end exclusive,
    /// already checked against the size by the caller).
    async fn get(&self, digest: &Digest, range: Option<Range<u64>>) -> Result<ByteStream>;

    /// The backend's reads for plain sockets, if it has them. Only the fs
    /// backend does (its files can be mapped and sent with `sendfile`); for
    /// the others a caller uses `get`.
    fn socket_reads(&self) -> Option<&dyn SocketReads> {
        None
    }

    /// Stores small content in one call (manifests). The caller has verified
    /// that `data` hashes to `digest`. Durable when it returns.
    async fn put(&self, digest: &Digest, data: Bytes) -> Result<()>;

    /// Removes a committed blob. Removing a missing blob is not an error.
    async fn delete(&self, digest: &Digest) -> Result<()>;

    /// Up to `limit` committed blobs with their sizes, in the order of
    /// their digests' text, after `after` (exclusive); a page shorter than
    /// `limit` is the last. Garbage collection and `fsck` walk it to find
    /// bytes metadata does not know, a page at a time (an object store
    /// lists this way anyway), and nothing on a push or pull path lists.
    async fn list_page(&self, after: Option<&Digest>, limit: usize) -> Result<Vec<(Digest, u64)>>;

    /// Creates an empty upload.
    async fn upload_create(&self, id: &UploadId) -> Result<()>;

    /// Appends `data` to the upload and returns its new size. The caller
    /// serializes appends to one upload. On error, some prefix of `data` may
    /// have been written: `upload_size` tells the truth afterwards.
    async fn upload_append(&self, id: &UploadId, data: ByteStream) -> Result<u64>;

    /// Appends like `upload_append`, and feeds every appended byte to
    /// `hasher`, in order. The hasher comes back only when all of `data` was
    /// appended; on error it is gone, so a caller never holds a hash state
    /// that is out of step with the bytes stored. Backends override this to
    /// hash beside the write (the filesystem backend hashes each batch in one
    /// blocking task while another writes it); the default hashes each chunk
    /// as it passes.
    async fn upload_append_hashing(&self, id: &UploadId, data: ByteStream, hasher: Hasher) -> Result<(u64, Hasher)> {
        use futures_util::StreamExt;
        let state = std::sync::Arc::new(std::sync::Mutex::new(hasher));
        let feed = state.clone();
        let data: ByteStream = Box::pin(data.map(move |chunk| {
            if let Ok(bytes) = &chunk {
                feed.lock().unwrap_or_else(|e| e.into_inner()).update(bytes);
            }
            chunk
        }));
        let size = self.upload_append(id, data).await?;
        // `upload_append` dropped the stream, and with it the other handle.
        let hasher = std::sync::Arc::try_unwrap(state)
            .map_err(|_| io::Error::other("hash state still shared after the append"))?
            .into_inner()
            .unwrap_or_else(|e| e.into_inner());
        Ok((size, hasher))
    }

    /// The current size of an upload, or `None` if there is no such upload.
    async fn upload_size(&self, id: &UploadId) -> Result<Option<u64>>;

    /// Reads an upload back, to hash it when the in-memory hash state was lost
    /// (a restart, or another node continuing the upload).
    async fn upload_read(&self, id: &UploadId) -> Result<ByteStream>;

    /// Reads an upload from byte `offset` to its current end, while it may
    /// still grow: the pull-through cache streams a blob to waiting clients
    /// as it arrives. This default skips the prefix; backends that can seek
    /// should.
    async fn upload_read_at(&self, id: &UploadId, offset: u64) -> Result<ByteStream> {
        use futures_util::StreamExt;
        let mut skip = offset;
        let stream = self.upload_read(id).await?.filter_map(move |chunk| {
            let out = match chunk {
                Ok(b) if skip >= b.len() as u64 => {
                    skip -= b.len() as u64;
                    None
                }
                Ok(b) => {
                    let b = b.slice(skip as usize..);
                    skip = 0;
                    Some(Ok(b))
                }
                Err(e) => Some(Err(e)),
            };
            std::future::ready(out)
        });
        Ok(Box::pin(stream))
    }

    /// Makes the upload durable and visible as blob `digest`, which the
    /// caller has verified, and removes the upload. Returns the blob size.
    /// When `digest` is already stored (durably) with that size, a backend
    /// may keep it and discard the upload.
    async fn upload_commit(&self, id: &UploadId, digest: &Digest) -> Result<u64>;

    /// Removes an upload. Removing a missing upload is not an error.
    async fn upload_delete(&self, id: &UploadId) -> Result<()>;

    /// How full the storage is, for the disk-watermark guard; `None` when
    /// the backend cannot tell (then the guard does not apply).
    async fn disk_usage(&self) -> Result<Option<DiskUsage>> {
        Ok(None)
    }
}

/// Blobs per page when a caller walks `list_page` to the end.
pub const LIST_PAGE: usize = 1000;

/// Every committed blob with its size, in digest order, walked a page at a
/// time.
pub async fn list_all(store: &dyn BlobStore) -> Result<Vec<(Digest, u64)>> {
    let mut out: Vec<(Digest, u64)> = Vec::new();
    loop {
        let page = store.list_page(out.last().map(|(d, _)| d), LIST_PAGE).await?;
        let last = page.len() < LIST_PAGE;
        out.extend(page);
        if last {
            return Ok(out);
        }
    }
}

/// An optional capability of a backend (`BlobStore::socket_reads`): `get`,
/// for bytes that only the kernel will read. The caller writes them to a
/// plain socket and never looks at them (no TLS, no HTTP/2 framing, no
/// hashing), so the backend may hand out pages of a file mapped into memory
/// instead of copies: a failure to read such a page shows as an error of the
/// socket write, where a read by the process itself would be a fatal signal.
#[async_trait]
pub trait SocketReads: Send + Sync {
    async fn get_for_socket(&self, digest: &Digest, range: Option<Range<u64>>) -> Result<ByteStream>;
}

/// Space on the volume that holds the blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskUsage {
    /// Bytes used plus bytes available (without space reserved for root).
    pub total: u64,
    pub available: u64,
}

impl DiskUsage {
    /// Percentage used, 0 to 100.
    pub fn used_percent(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        100.0 * (self.total.saturating_sub(self.available)) as f64 / self.total as f64
    }

    /// Why new uploads are refused at the disk watermark `limit` (a
    /// percentage; 100 or more turns the guard off), or `None` when they
    /// are accepted. The upload guard and the health report both say this.
    pub fn refuses_uploads(&self, limit: f64) -> Option<String> {
        let used = self.used_percent();
        (limit < 100.0 && used >= limit).then(|| {
            format!(
                "storage is {used:.1}% full, at or above the {limit}% watermark: new uploads are refused until space is freed \
                 (delete images and run garbage collection, or raise --disk-watermark); pulls still work"
            )
        })
    }
}
