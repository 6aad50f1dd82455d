//! Local filesystem backend.
//!
//! Layout under the root:
//! - `blobs/<algorithm>/<first two hex>/<hex>`: committed blobs;
//! - `uploads/<upload id>`: uploads in progress;
//! - `uploads/.put-<random>`: content being written by `put`.
//!
//! Paths are built only from validated `Digest` and `UploadId` values.
//! Commits are write, fsync file, rename, fsync directory, so a crash at any
//! point leaves either no blob or the whole blob.

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use oci::{Digest, UploadId};
use tokio::fs::{self, File, OpenOptions};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio_util::io::ReaderStream;

use crate::{BlobStore, ByteStream, DiskUsage, Result, StorageError};

/// Read buffer for streaming blobs out: large, to cut syscalls per byte.
const READ_BUF: usize = 256 * 1024;

pub struct FsBlobStore {
    root: PathBuf,
    tmp_counter: AtomicU64,
}

impl FsBlobStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub async fn open(root: impl Into<PathBuf>) -> io::Result<FsBlobStore> {
        let root = root.into();
        fs::create_dir_all(root.join("blobs")).await?;
        fs::create_dir_all(root.join("uploads")).await?;
        // Leftovers of `put` interrupted by a crash are garbage by construction.
        let mut dir = fs::read_dir(root.join("uploads")).await?;
        while let Some(e) = dir.next_entry().await? {
            if e.file_name().to_string_lossy().starts_with(".put-") {
                let _ = fs::remove_file(e.path()).await;
            }
        }
        Ok(FsBlobStore {
            root,
            tmp_counter: AtomicU64::new(0),
        })
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root
            .join("blobs")
            .join(d.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    fn upload_path(&self, id: &UploadId) -> PathBuf {
        self.root.join("uploads").join(id.as_str())
    }

    /// Moves a synced file into place as blob `d` and syncs the directory so
    /// the rename itself survives a crash.
    async fn publish(&self, src: &Path, d: &Digest) -> io::Result<()> {
        let dst = self.blob_path(d);
        let dir = dst.parent().expect("blob path has a parent");
        fs::create_dir_all(dir).await?;
        fs::rename(src, &dst).await?;
        sync_dir(dir).await
    }
}

/// Space used and available to unprivileged writers, as `df` counts them:
/// blocks reserved for root are neither, so `used_percent` matches `df`'s
/// Use% column.
fn statvfs(path: &Path) -> io::Result<DiskUsage> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    let used = (st.f_blocks as u64).saturating_sub(st.f_bfree as u64) * frsize;
    let available = st.f_bavail as u64 * frsize;
    Ok(DiskUsage {
        total: used + available,
        available,
    })
}

async fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).await?.sync_all().await
}

fn not_found_as_none<T>(r: io::Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn io_to_storage(e: io::Error) -> StorageError {
    if e.kind() == io::ErrorKind::NotFound {
        StorageError::NotFound
    } else {
        StorageError::Io(e)
    }
}

#[async_trait]
impl BlobStore for FsBlobStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        Ok(not_found_as_none(fs::metadata(self.blob_path(digest)).await)?.map(|m| m.len()))
    }

    async fn get(&self, digest: &Digest, range: Option<Range<u64>>) -> Result<ByteStream> {
        let mut file = File::open(self.blob_path(digest)).await.map_err(io_to_storage)?;
        Ok(match range {
            None => Box::pin(ReaderStream::with_capacity(file, READ_BUF)),
            Some(r) => {
                file.seek(io::SeekFrom::Start(r.start)).await?;
                let len = r.end.saturating_sub(r.start);
                Box::pin(ReaderStream::with_capacity(file.take(len), READ_BUF))
            }
        })
    }

    async fn put(&self, digest: &Digest, data: Bytes) -> Result<()> {
        if self.stat(digest).await?.is_some() {
            return Ok(());
        }
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join("uploads")
            .join(format!(".put-{}-{n}", std::process::id()));
        let result = async {
            let mut f = File::create(&tmp).await?;
            f.write_all(&data).await?;
            f.sync_all().await?;
            drop(f);
            self.publish(&tmp, digest).await
        }
        .await;
        if result.is_err() {
            let _ = fs::remove_file(&tmp).await;
        }
        Ok(result?)
    }

    async fn delete(&self, digest: &Digest) -> Result<()> {
        match fs::remove_file(self.blob_path(digest)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    async fn list(&self) -> Result<Vec<(Digest, u64)>> {
        let mut out = Vec::new();
        let Some(mut algs) = not_found_as_none(fs::read_dir(self.root.join("blobs")).await)? else {
            return Ok(out);
        };
        while let Some(alg) = algs.next_entry().await? {
            let Some(mut prefixes) = not_found_as_none(fs::read_dir(alg.path()).await)? else {
                continue;
            };
            while let Some(prefix) = prefixes.next_entry().await? {
                let Some(mut files) = not_found_as_none(fs::read_dir(prefix.path()).await)? else {
                    continue;
                };
                while let Some(f) = files.next_entry().await? {
                    let name = format!(
                        "{}:{}",
                        alg.file_name().to_string_lossy(),
                        f.file_name().to_string_lossy()
                    );
                    // Only names a commit could have made are blobs; anything
                    // else was put there by hand and is not ours to touch.
                    let Ok(digest) = name.parse::<Digest>() else {
                        tracing::warn!(path = %f.path().display(), "ignoring a file that is not a blob");
                        continue;
                    };
                    if let Some(m) = not_found_as_none(f.metadata().await)? {
                        out.push((digest, m.len()));
                    }
                }
            }
        }
        Ok(out)
    }

    async fn upload_create(&self, id: &UploadId) -> Result<()> {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.upload_path(id))
            .await?;
        Ok(())
    }

    async fn upload_append(&self, id: &UploadId, mut data: ByteStream) -> Result<u64> {
        let mut f = OpenOptions::new()
            .append(true)
            .open(self.upload_path(id))
            .await
            .map_err(io_to_storage)?;
        let mut size = f.metadata().await?.len();
        while let Some(chunk) = data.next().await {
            let chunk = chunk?;
            f.write_all(&chunk).await?;
            size += chunk.len() as u64;
        }
        f.flush().await?;
        Ok(size)
    }

    async fn upload_size(&self, id: &UploadId) -> Result<Option<u64>> {
        Ok(not_found_as_none(fs::metadata(self.upload_path(id)).await)?.map(|m| m.len()))
    }

    async fn upload_read(&self, id: &UploadId) -> Result<ByteStream> {
        let f = File::open(self.upload_path(id)).await.map_err(io_to_storage)?;
        Ok(Box::pin(ReaderStream::with_capacity(f, READ_BUF)))
    }

    async fn upload_read_at(&self, id: &UploadId, offset: u64) -> Result<ByteStream> {
        let mut f = File::open(self.upload_path(id)).await.map_err(io_to_storage)?;
        f.seek(io::SeekFrom::Start(offset)).await?;
        Ok(Box::pin(ReaderStream::with_capacity(f, READ_BUF)))
    }

    async fn upload_commit(&self, id: &UploadId, digest: &Digest) -> Result<u64> {
        let path = self.upload_path(id);
        let f = File::open(&path).await.map_err(io_to_storage)?;
        let size = f.metadata().await?.len();
        f.sync_all().await?;
        drop(f);
        self.publish(&path, digest).await?;
        Ok(size)
    }

    async fn disk_usage(&self) -> Result<Option<DiskUsage>> {
        let root = self.root.clone();
        let usage = tokio::task::spawn_blocking(move || statvfs(&root))
            .await
            .map_err(io::Error::other)??;
        Ok(Some(usage))
    }

    async fn upload_delete(&self, id: &UploadId) -> Result<()> {
        match fs::remove_file(self.upload_path(id)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fs_backend_passes_the_shared_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).await.unwrap();
        crate::testsuite::run_all(&store).await;
    }

    #[tokio::test]
    async fn the_filesystem_reports_its_usage() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).await.unwrap();
        assert!(store.disk_usage().await.unwrap().is_some());
    }

    #[tokio::test]
    async fn interrupted_puts_are_cleaned_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let _ = FsBlobStore::open(dir.path()).await.unwrap();
        std::fs::write(dir.path().join("uploads/.put-1-1"), b"partial").unwrap();
        let _ = FsBlobStore::open(dir.path()).await.unwrap();
        assert!(!dir.path().join("uploads/.put-1-1").exists());
    }
}
