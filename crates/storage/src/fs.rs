//! Local filesystem backend.
//!
//! Layout under the root:
//! - `blobs/<algorithm>/<first two hex>/<hex>`: committed blobs;
//! - `uploads/<upload id>`: uploads in progress;
//! - `uploads/.put-<random>`: content being written by `put`;
//! - `uploads/.trash-<random>`: a committed upload whose content was already
//!   a blob, being removed.
//!
//! Paths are built only from validated `Digest` and `UploadId` values.
//! Commits are write, fsync file, rename, fsync directory, so a crash at any
//! point leaves either no blob or the whole blob.
//!
//! Appends are a pipeline: the caller's task receives chunks and gathers them
//! into batches of 1 MiB; a worker on tokio's blocking pool writes them
//! through `std::fs` and, when the caller wants the bytes hashed, another
//! hashes the same batches (the buffers are shared, not copied). So receiving,
//! writing and hashing run in parallel, a few batches apart at most, and a
//! worker that has waited 10 ms for a batch ends, so a slow client holds no
//! thread. An append that fits in one batch takes one trip to the blocking
//! pool instead. On Linux, whole batches at an aligned end of
//! file are written with `O_DIRECT` (no copy into the page cache, and a big
//! push does not evict the cache of the blobs being pulled); a writer that
//! fell behind takes the batches waiting for it in one vectored write, since
//! the device does more with one large write than with several small ones
//! (1 GiB push: 880–910 MB/s instead of 790–810 here); the rest goes
//! through the page cache, whose write-back large appends start as they go
//! (`sync_file_range`). Either way the commit's fsync has little left to wait
//! for, and it is still what makes the bytes durable.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Buf, Bytes, BytesMut};
use futures_util::StreamExt;
use oci::{Digest, Hasher, UploadId};
use tokio::fs::{self, File, OpenOptions};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio_util::io::ReaderStream;

use crate::{BlobStore, ByteStream, DiskUsage, Result, SocketReads, StorageError};

/// Read buffer for streaming blobs out: large, to cut syscalls per byte.
const READ_BUF: usize = 256 * 1024;
/// `get_for_socket` maps reads of at least this many bytes (smaller ones
/// cost less as one read than as a map and an unmap).
#[cfg(target_os = "linux")]
const MAP_MIN: u64 = 1 << 20;
/// Bytes mapped at once by `get_for_socket`: each window is brought into
/// the page cache on the blocking pool (see `map_window`), so the socket
/// write does not wait for the disk on an async worker.
#[cfg(target_os = "linux")]
const MAP_WINDOW: u64 = 8 << 20;

/// An append gathers the chunks it receives into batches of this many bytes,
/// each handed to the writer (and the hasher) at once. An append holds at
/// most about `SERIAL_HELD + 2` of them.
const BATCH_BYTES: usize = 1 << 20;
/// Buffers an append keeps for reuse.
const SPARE_BATCHES: usize = SERIAL_HELD + 2;
/// After this many bytes written through the page cache, an append asks the
/// kernel to start writing them to the disk.
const WRITEBACK_BYTES: u64 = 8 << 20;
/// Alignment of address, length and file offset that direct I/O needs: the
/// logical block size of nearly every device, or a multiple of it.
const DIRECT_ALIGN: usize = 4096;
const _: () = assert!(DIRECT_ALIGN.is_power_of_two());

/// Whether `n` (a length, an offset or an address) suits direct I/O.
fn direct_aligned(n: u64) -> bool {
    n & (DIRECT_ALIGN as u64 - 1) == 0
}

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
        // Leftovers of `put` interrupted by a crash, and committed uploads
        // not removed yet, are garbage by construction.
        let mut dir = fs::read_dir(root.join("uploads")).await?;
        while let Some(e) = dir.next_entry().await? {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".put-") || name.starts_with(".trash-") {
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

    /// A fresh name under `uploads/` for a file of ours: `<prefix>-<pid>-<n>`.
    fn tmp_path(&self, prefix: &str) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("uploads")
            .join(format!("{prefix}-{}-{n}", std::process::id()))
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

/// `publish` for blocking code: rename `src` (synced) to `dst`, then sync
/// the directory so the rename survives a crash.
fn publish_blocking(src: &Path, dst: &Path) -> io::Result<()> {
    let dir = dst.parent().expect("blob path has a parent");
    std::fs::create_dir_all(dir)?;
    std::fs::rename(src, dst)?;
    std::fs::File::open(dir)?.sync_all()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(io::Error::other)?
}

/// Gathers the received chunks of an append into contiguous batches of
/// `BATCH_BYTES`, in buffers it reuses once the writer and the hasher are
/// done with them. Copying a chunk costs less than keeping it: a kept chunk
/// pins the server's read buffer, which then allocates (and faults in) fresh
/// memory for every read.
struct Batcher {
    data: ByteStream,
    /// Set once `data` is exhausted, so it is never polled again.
    ended: bool,
    /// What did not fit in the previous batch.
    carry: Option<Bytes>,
    /// Batches handed out, oldest first, to reuse when no longer shared.
    sent: VecDeque<Bytes>,
}

impl Batcher {
    fn new(data: ByteStream) -> Batcher {
        Batcher {
            data,
            ended: false,
            carry: None,
            sent: VecDeque::new(),
        }
    }

    fn buffer(&mut self) -> BytesMut {
        if let Some(oldest) = self.sent.pop_front() {
            match oldest.try_into_mut() {
                Ok(mut b) => {
                    b.clear();
                    return b;
                }
                Err(still_shared) => self.sent.push_front(still_shared),
            }
        }
        aligned_buffer()
    }

    /// The next `BATCH_BYTES` of the stream (less at its end; empty once it
    /// has ended). Waiting for a whole batch rather than passing on what is
    /// there keeps the hand-offs to the writer and the hasher (a trip to the
    /// blocking pool each) at one per batch instead of one per received chunk.
    async fn next(&mut self) -> io::Result<Bytes> {
        let mut buf = self.buffer();
        loop {
            let chunk = match self.carry.take() {
                Some(c) => c,
                None if self.ended => break,
                None => match self.data.next().await {
                    Some(chunk) => chunk.map_err(crate::input_error)?,
                    None => {
                        self.ended = true;
                        break;
                    }
                },
            };
            let room = BATCH_BYTES - buf.len();
            if chunk.len() > room {
                buf.extend_from_slice(&chunk[..room]);
                self.carry = Some(chunk.slice(room..));
            } else {
                buf.extend_from_slice(&chunk);
            }
            if buf.len() == BATCH_BYTES {
                break;
            }
        }
        let batch = buf.freeze();
        self.sent.push_back(batch.clone());
        if self.sent.len() > SPARE_BATCHES {
            self.sent.pop_front();
        }
        Ok(batch)
    }

    fn ended(&self) -> bool {
        self.ended && self.carry.is_none()
    }
}

fn open_append(path: &Path) -> io::Result<std::fs::File> {
    std::fs::OpenOptions::new().append(true).open(path)
}

/// Starts the write-back of `len` bytes at `offset` without waiting for it.
/// Only a head start for the commit's fsync, so errors are ignored.
#[cfg(target_os = "linux")]
fn start_writeback(f: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; the call reads no memory of ours.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_: &std::fs::File, _: u64, _: u64) {}

/// An empty buffer of at least `BATCH_BYTES` whose start is aligned for
/// direct I/O. The alignment survives reuse (`Batcher::buffer`).
fn aligned_buffer() -> BytesMut {
    let mut b = BytesMut::with_capacity(BATCH_BYTES + DIRECT_ALIGN);
    let pad = b.as_ptr().align_offset(DIRECT_ALIGN);
    b.resize(pad, 0);
    b.advance(pad);
    b
}

/// A second descriptor of the upload opened with `O_DIRECT`, when the
/// file system allows it: whole aligned batches then go from our buffer to
/// the device without a copy into the page cache (and without evicting the
/// cache of the blobs being pulled).
#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_: &Path) -> Option<std::fs::File> {
    None
}

/// Writes the leading `batches` whose address and length suit `O_DIRECT`,
/// all in one vectored write when the device is behind and several are
/// queued: one large write keeps the device busier than a few small ones.
/// Returns how many whole batches were written; the caller writes the rest
/// through the page cache and stops using direct I/O (the end of the file is
/// then no longer aligned, or the file system refused).
fn write_direct(d: &mut std::fs::File, batches: &[Bytes]) -> io::Result<usize> {
    let suits = |b: &Bytes| direct_aligned(b.len() as u64) && direct_aligned(b.as_ptr() as usize as u64);
    let count = batches.iter().take_while(|b| suits(b)).count();
    let mut slices: Vec<io::IoSlice<'_>> = batches[..count].iter().map(|b| io::IoSlice::new(b)).collect();
    let mut rest = &mut slices[..];
    let mut written = 0;
    while !rest.is_empty() {
        match d.write_vectored(rest) {
            Ok(0) => break,
            Ok(n) => {
                written += n;
                io::IoSlice::advance_slices(&mut rest, n);
            }
            // Refused before anything was written: alignment or support.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    // A short direct write ends at an aligned length (or the device would
    // have refused it), so the file's end stays aligned; what is left of a
    // batch it cut goes through the page cache with the rest.
    Ok(written)
}

/// The upload file as an append writes it. While the file's end stays
/// aligned, whole batches go with direct I/O; anything else goes through the
/// page cache, with its write-back started every `WRITEBACK_BYTES`.
struct Writer {
    f: std::fs::File,
    direct: Option<std::fs::File>,
    size: u64,
    /// Start of what went through the page cache without its write-back
    /// started yet.
    pending_from: u64,
}

impl Writer {
    fn open(path: &Path) -> io::Result<Writer> {
        let f = open_append(path)?;
        let size = f.metadata()?.len();
        let direct = if direct_aligned(size) { open_direct(path) } else { None };
        Ok(Writer {
            f,
            direct,
            size,
            pending_from: size,
        })
    }

    fn write(&mut self, batches: &[Bytes]) -> io::Result<()> {
        let total: usize = batches.iter().map(Bytes::len).sum();
        let mut skip = 0;
        if let Some(d) = self.direct.as_mut() {
            skip = write_direct(d, batches)?;
            self.size += skip as u64;
            self.pending_from = self.size;
            if skip < total {
                self.direct = None;
            }
        }
        for b in batches {
            let cut = skip.min(b.len());
            skip -= cut;
            let rest = &b[cut..];
            if rest.is_empty() {
                continue;
            }
            self.f.write_all(rest)?;
            self.size += rest.len() as u64;
            if self.size - self.pending_from >= WRITEBACK_BYTES {
                start_writeback(&self.f, self.pending_from, self.size - self.pending_from);
                self.pending_from = self.size;
            }
        }
        Ok(())
    }
}

impl FsBlobStore {
    /// `upload_append`, hashing the appended bytes into `hasher` if given.
    async fn append(&self, id: &UploadId, data: ByteStream, hasher: Option<Hasher>) -> Result<(u64, Option<Hasher>)> {
        let path = self.upload_path(id);
        let mut batches = Batcher::new(data);
        let first = batches.next().await?;
        if batches.ended() {
            // All of it fits in one batch (small blobs, manifests, many
            // PATCHes): one trip to the blocking pool.
            return blocking(move || {
                let mut f = open_append(&path).map_err(io_to_storage)?;
                let size = f.metadata()?.len();
                f.write_all(&first)?;
                let hasher = hasher.map(|mut h| {
                    h.update(&first);
                    h
                });
                Ok((size + first.len() as u64, hasher))
            })
            .await;
        }
        // A pipeline: the batches are written and hashed in order, by one
        // `Serial` worker each, while this task receives the next ones.
        let writer = blocking(move || Writer::open(&path).map_err(io_to_storage)).await?;
        let writer = Serial::new(writer, |w: &mut Writer, b: &[Bytes]| w.write(b));
        let hashing = hasher.map(|h| {
            Serial::new(h, |h: &mut Hasher, batches: &[Bytes]| {
                batches.iter().for_each(|b| h.update(b));
                Ok(())
            })
        });
        let mut batch = first;
        let fed: io::Result<()> = async {
            loop {
                if let Some(h) = &hashing {
                    h.push(batch.clone()).await?;
                }
                writer.push(batch).await?;
                if batches.ended() {
                    return Ok(());
                }
                batch = batches.next().await?;
            }
        }
        .await;
        // Whatever happened, no write of this append may outlive it: the
        // next append, or the commit, must find the file as it will stay.
        let hasher = match hashing {
            Some(h) => Some(h.finish().await),
            None => None,
        };
        let writer = writer.finish().await.map_err(io_to_storage)?;
        fed?;
        let hasher = hasher.transpose()?;
        Ok((writer.size, hasher))
    }
}

/// Applies `work` to the batches pushed to it, in order, on tokio's blocking
/// pool: one task runs while batches come and ends when none has come for
/// `SERIAL_LINGER`, so an append whose client is slow holds no thread while
/// it waits. The worker takes up to `SERIAL_TAKE` waiting batches at a time
/// (so a writer that fell behind catches up with one large write), and at
/// most `SERIAL_HELD` batches are waiting or in work; `push` waits for room.
struct Serial<S: Send + 'static> {
    shared: Arc<SerialShared<S>>,
}

struct SerialShared<S> {
    inner: std::sync::Mutex<SerialInner<S>>,
    /// Signalled whenever a batch is done or the worker stops.
    progress: tokio::sync::Notify,
    /// Signalled when a batch is queued, for a worker waiting for one.
    queued: std::sync::Condvar,
    work: fn(&mut S, &[Bytes]) -> io::Result<()>,
}

struct SerialInner<S> {
    queue: VecDeque<Bytes>,
    /// Batches the worker has taken and not finished.
    working: usize,
    /// The state, when no worker holds it.
    idle: Option<S>,
    /// Set when `work` failed: the state is gone with it.
    broken: bool,
    /// The error, until someone returns it.
    error: Option<io::Error>,
    /// No more batches will come: a worker ends as soon as the queue is empty.
    closing: bool,
}

/// An append dropped before it finished (its request was cancelled) leaves
/// no queued batch behind: only those in progress, if any, are still written.
impl<S: Send + 'static> Drop for Serial<S> {
    fn drop(&mut self) {
        let mut inner = Self::lock(&self.shared);
        inner.queue.clear();
        inner.closing = true;
        drop(inner);
        self.shared.queued.notify_one();
    }
}

/// Batches waiting for one `Serial` worker or in its work.
const SERIAL_HELD: usize = 8;
/// Batches a `Serial` worker takes at once: half of what it may hold, so
/// the next ones are received while it works.
const SERIAL_TAKE: usize = SERIAL_HELD / 2;
/// How long a `Serial` worker waits for the next batch before it ends: longer
/// than batches take to arrive at network speed, so a fast upload keeps its
/// threads, and short enough that a slow one holds none.
const SERIAL_LINGER: std::time::Duration = std::time::Duration::from_millis(10);

impl<S: Send + 'static> Serial<S> {
    fn new(state: S, work: fn(&mut S, &[Bytes]) -> io::Result<()>) -> Serial<S> {
        Serial {
            shared: Arc::new(SerialShared {
                inner: std::sync::Mutex::new(SerialInner {
                    queue: VecDeque::new(),
                    working: 0,
                    idle: Some(state),
                    broken: false,
                    error: None,
                    closing: false,
                }),
                progress: tokio::sync::Notify::new(),
                queued: std::sync::Condvar::new(),
                work,
            }),
        }
    }

    fn lock(shared: &SerialShared<S>) -> std::sync::MutexGuard<'_, SerialInner<S>> {
        shared.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `ready` holds for the inner state, then runs `then` on it
    /// (under the lock).
    async fn wait<T>(&self, ready: impl Fn(&SerialInner<S>) -> bool, then: impl FnOnce(&mut SerialInner<S>) -> T) -> T {
        loop {
            let progress = self.shared.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            {
                let mut inner = Self::lock(&self.shared);
                if ready(&inner) {
                    return then(&mut inner);
                }
            }
            progress.await;
        }
    }

    async fn push(&self, batch: Bytes) -> io::Result<()> {
        let start = self
            .wait(
                |i| i.broken || i.queue.len() + i.working < SERIAL_HELD,
                |i| {
                    if i.broken {
                        return Err(Self::error(i));
                    }
                    i.queue.push_back(batch);
                    Ok(i.idle.take())
                },
            )
            .await?;
        match start {
            Some(state) => {
                let shared = self.shared.clone();
                tokio::task::spawn_blocking(move || Self::run(&shared, state));
            }
            None => self.shared.queued.notify_one(),
        }
        Ok(())
    }

    /// The worker: takes batches until none comes for `SERIAL_LINGER`, then
    /// parks the state and ends.
    fn run(shared: &SerialShared<S>, mut state: S) {
        let mut batches = Vec::with_capacity(SERIAL_TAKE);
        loop {
            {
                let mut inner = Self::lock(shared);
                loop {
                    if !inner.queue.is_empty() {
                        let n = inner.queue.len().min(SERIAL_TAKE);
                        batches.extend(inner.queue.drain(..n));
                        inner.working = n;
                        break;
                    }
                    if inner.closing {
                        inner.idle = Some(state);
                        drop(inner);
                        shared.progress.notify_waiters();
                        return;
                    }
                    let (guard, wait) = shared
                        .queued
                        .wait_timeout(inner, SERIAL_LINGER)
                        .unwrap_or_else(|e| e.into_inner());
                    inner = guard;
                    if wait.timed_out() && inner.queue.is_empty() {
                        inner.idle = Some(state);
                        drop(inner);
                        shared.progress.notify_waiters();
                        return;
                    }
                }
            }
            // A panic in `work` would leave the state with no owner: `finish`
            // would wait forever. Treat it as an error instead.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (shared.work)(&mut state, &batches)))
                .unwrap_or_else(|_| Err(io::Error::other("an upload worker panicked")));
            // Released before they count as done, so the receiver can reuse them.
            batches.clear();
            Self::lock(shared).working = 0;
            if let Err(e) = r {
                let mut inner = Self::lock(shared);
                inner.broken = true;
                inner.error = Some(e);
                inner.queue.clear();
                drop(inner);
                shared.progress.notify_waiters();
                return;
            }
            shared.progress.notify_waiters();
        }
    }

    /// Waits for every batch pushed, and returns the state.
    async fn finish(self) -> io::Result<S> {
        Self::lock(&self.shared).closing = true;
        self.shared.queued.notify_one();
        self.wait(
            |i| i.broken || (i.queue.is_empty() && i.idle.is_some()),
            |i| match i.idle.take() {
                Some(state) if !i.broken => Ok(state),
                _ => Err(Self::error(i)),
            },
        )
        .await
    }

    fn error(i: &mut SerialInner<S>) -> io::Error {
        i.error
            .take()
            .unwrap_or_else(|| io::Error::other("an earlier write or hash of this upload failed"))
    }
}

/// Bytes of a file mapped read-only into memory, unmapped when the last
/// `Bytes` made from it goes.
#[cfg(target_os = "linux")]
struct Mapped {
    ptr: std::ptr::NonNull<libc::c_void>,
    len: usize,
    /// Bytes before the first one asked for (a mapping starts on a page).
    skip: usize,
}

// SAFETY: a read-only mapping, never written, unmapped only on drop.
#[cfg(target_os = "linux")]
unsafe impl Send for Mapped {}
#[cfg(target_os = "linux")]
unsafe impl Sync for Mapped {}

#[cfg(target_os = "linux")]
impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `len` bytes are mapped at `ptr` until drop, and `skip < len`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<u8>().add(self.skip), self.len - self.skip) }
    }
}

#[cfg(target_os = "linux")]
impl Drop for Mapped {
    fn drop(&mut self) {
        // Out of the registry first: no one may look the range up once it
        // can be mapped again.
        let start = self.ptr.as_ptr() as usize;
        lock_windows().remove(&start);
        LIVE_WINDOWS.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: the mapping made by `map_window`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr(), self.len) };
    }
}

/// A live mapped window: where its bytes are in which file.
#[cfg(target_os = "linux")]
struct Window {
    len: usize,
    file: Arc<std::fs::File>,
    /// The file offset of the window's first byte.
    offset: u64,
}

/// Live mapped windows by start address, so a plain socket's writer can send
/// their bytes from the file itself (`file_region`) instead of copying them.
#[cfg(target_os = "linux")]
static WINDOWS: std::sync::Mutex<std::collections::BTreeMap<usize, Window>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());
/// How many windows are live: when none, `file_region` takes no lock.
#[cfg(target_os = "linux")]
static LIVE_WINDOWS: AtomicU64 = AtomicU64::new(0);

#[cfg(target_os = "linux")]
fn lock_windows() -> std::sync::MutexGuard<'static, std::collections::BTreeMap<usize, Window>> {
    WINDOWS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Slices shorter than this are not looked up by `file_region`: small
/// responses never take the registry's lock.
#[cfg(target_os = "linux")]
pub const FILE_REGION_MIN: usize = 64 * 1024;

/// If `bytes` (at least `FILE_REGION_MIN` long) lie in a live window that
/// `get_for_socket` made, the file holding them, their offset in it, and how
/// many of them, from the first, are in that window. A socket writer may
/// then send them with `sendfile`, which reads the page cache directly: the
/// window's own pages are never touched. Only valid while the `Bytes`
/// holding `bytes` is alive, which a writer given them ensures.
#[cfg(target_os = "linux")]
pub fn file_region(bytes: &[u8]) -> Option<(Arc<std::fs::File>, u64, usize)> {
    if bytes.len() < FILE_REGION_MIN || LIVE_WINDOWS.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let at = bytes.as_ptr() as usize;
    let windows = lock_windows();
    let (&start, w) = windows.range(..=at).next_back()?;
    let into = at - start;
    (into < w.len).then(|| (w.file.clone(), w.offset + into as u64, bytes.len().min(w.len - into)))
}

/// Maps `n` bytes of `file` at `offset` (`n > 0`). The bytes are in the page
/// cache when this returns, read from the disk here if they were not, so the
/// socket write that sends them does not wait for the disk on an async
/// worker. Blob files are never written after their commit, so the bytes
/// cannot change under the mapping; a file unlinked meanwhile (garbage
/// collection) stays readable through it.
#[cfg(target_os = "linux")]
fn map_window(file: &Arc<std::fs::File>, offset: u64, n: u64) -> io::Result<Bytes> {
    use std::os::fd::AsRawFd;
    // SAFETY: sysconf has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let start = offset - offset % page;
    let skip = usize::try_from(offset - start).map_err(io::Error::other)?;
    let len = usize::try_from(n).map_err(io::Error::other)? + skip;
    let file_offset = libc::off_t::try_from(start).map_err(io::Error::other)?;
    let map = |flags| {
        // SAFETY: a new read-only shared mapping of an open descriptor; no
        // memory of ours is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | flags,
                file.as_raw_fd(),
                file_offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            Err(io::Error::last_os_error())
        } else {
            Ok(ptr)
        }
    };
    // `sendfile` reads the page cache, never this mapping, so the mapping
    // needs page tables only if the bytes must first come from the disk:
    // filling them for 8 MiB that are already cached, then tearing them down,
    // was 12 % of berth's CPU samples while serving a cached blob; asking the
    // page cache (`mincore`) is 2 %.
    let mut ptr = map(0)?;
    if !resident(ptr, len, page) {
        // SAFETY: the mapping just made, unmapped once.
        unsafe { libc::munmap(ptr, len) };
        ptr = map(libc::MAP_POPULATE)?;
    }
    let ptr = std::ptr::NonNull::new(ptr).ok_or_else(|| io::Error::other("mmap returned null"))?;
    lock_windows().insert(
        ptr.as_ptr() as usize,
        Window {
            len,
            file: file.clone(),
            offset: start,
        },
    );
    LIVE_WINDOWS.fetch_add(1, Ordering::Relaxed);
    Ok(Bytes::from_owner(Mapped { ptr, len, skip }))
}

/// Whether every page of the `len` bytes mapped at `ptr` is in the page cache.
/// An error counts as "no": the caller then reads them in.
#[cfg(target_os = "linux")]
fn resident(ptr: *mut libc::c_void, len: usize, page: u64) -> bool {
    let pages = len.div_ceil(usize::try_from(page).unwrap_or(4096));
    let mut vec = vec![0u8; pages];
    // SAFETY: `ptr` starts a mapping of `len` bytes, and `vec` has one byte
    // per page of it.
    let r = unsafe { libc::mincore(ptr, len, vec.as_mut_ptr()) };
    r == 0 && vec.iter().all(|v| v & 1 == 1)
}

/// The bytes of an open blob file, or `range` of them, read in `READ_BUF`
/// pieces.
async fn read_stream(mut file: File, range: Option<Range<u64>>) -> Result<ByteStream> {
    Ok(match range {
        None => Box::pin(ReaderStream::with_capacity(file, READ_BUF)),
        Some(r) => {
            file.seek(io::SeekFrom::Start(r.start)).await?;
            let len = r.end.saturating_sub(r.start);
            Box::pin(ReaderStream::with_capacity(file.take(len), READ_BUF))
        }
    })
}

/// The names in `dir`, sorted; none when it does not exist.
fn sorted_names(dir: &Path) -> Result<Vec<String>> {
    let Some(entries) = not_found_as_none(std::fs::read_dir(dir))? else {
        return Ok(Vec::new());
    };
    let mut names = Vec::new();
    for e in entries {
        names.push(e?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// A page of `BlobStore::list_page` from `blobs/<algorithm>/<2 hex>/<hex>`.
/// Directory and file names sort as the digests' text does, so a page
/// starts by skipping whole directories before `after` and reads one
/// directory of a few thousand names at most to find its place.
fn list_page(root: &Path, after: Option<&str>, limit: usize) -> Result<Vec<(Digest, u64)>> {
    let mut out = Vec::new();
    let (after_alg, after_hex) = after.and_then(|a| a.split_once(':')).unzip();
    for alg in sorted_names(root)? {
        if after_alg.is_some_and(|a| alg.as_str() < a) {
            continue;
        }
        let same_alg = after_alg == Some(alg.as_str());
        for prefix in sorted_names(&root.join(&alg))? {
            if same_alg && after_hex.is_some_and(|h| h.get(..2).is_some_and(|p| prefix.as_str() < p)) {
                continue;
            }
            let dir = root.join(&alg).join(&prefix);
            for file in sorted_names(&dir)? {
                let name = format!("{alg}:{file}");
                if after.is_some_and(|a| name.as_str() <= a) {
                    continue;
                }
                // Only names a commit could have made are blobs; anything
                // else was put there by hand and is not ours to touch.
                let Ok(digest) = name.parse::<Digest>() else {
                    tracing::warn!(path = %dir.join(&file).display(), "ignoring a file that is not a blob");
                    continue;
                };
                if let Some(m) = not_found_as_none(std::fs::metadata(dir.join(&file)))? {
                    if out.len() == limit {
                        return Ok(out);
                    }
                    out.push((digest, m.len()));
                }
            }
        }
    }
    Ok(out)
}

fn not_found_as_none<T>(r: io::Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn io_to_storage(e: io::Error) -> StorageError {
    match StorageError::from(e) {
        StorageError::Io(e) if e.kind() == io::ErrorKind::NotFound => StorageError::NotFound,
        other => other,
    }
}

/// The fs backend's reads for plain sockets (see `SocketReads`).
#[cfg(target_os = "linux")]
#[async_trait]
impl SocketReads for FsBlobStore {
    /// Large reads go out as windows of the file mapped into memory. Written
    /// to a socket as they are, they are copied once, from the page cache,
    /// where a read copies into a buffer first and the write again; sent by
    /// a writer that looks them up (`file_region`, berth's plain-TCP
    /// stream), they are not copied at all. 1 GiB blob GET, 4 connections:
    /// 3.0–3.2 GB/s read, 5.1–5.5 mapped, 5.6–5.9 sent; nginx 5.0–6.9.
    async fn get_for_socket(&self, digest: &Digest, range: Option<Range<u64>>) -> Result<ByteStream> {
        let path = self.blob_path(digest);
        let file = blocking(move || {
            let f = std::fs::File::open(path).map_err(io_to_storage)?;
            let len = f.metadata()?.len();
            Ok((f, len))
        })
        .await;
        let (file, len) = file?;
        let span = range.unwrap_or(0..len);
        if span.end.saturating_sub(span.start) < MAP_MIN || span.end > len {
            // Small, or past the end of a file shorter than its record: read
            // the way `get` does, from the file already open.
            return read_stream(File::from_std(file), Some(span)).await;
        }
        let file = Arc::new(file);
        let windows = futures_util::stream::unfold(span, move |at| {
            let file = file.clone();
            async move {
                if at.start >= at.end {
                    return None;
                }
                let n = (at.end - at.start).min(MAP_WINDOW);
                let start = at.start;
                let window = tokio::task::spawn_blocking(move || map_window(&file, start, n))
                    .await
                    .map_err(io::Error::other)
                    .and_then(|w| w);
                Some((window, at.start + n..at.end))
            }
        });
        Ok(Box::pin(windows))
    }
}

#[async_trait]
impl BlobStore for FsBlobStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        Ok(not_found_as_none(fs::metadata(self.blob_path(digest)).await)?.map(|m| m.len()))
    }

    async fn get(&self, digest: &Digest, range: Option<Range<u64>>) -> Result<ByteStream> {
        let file = File::open(self.blob_path(digest)).await.map_err(io_to_storage)?;
        read_stream(file, range).await
    }

    #[cfg(target_os = "linux")]
    fn socket_reads(&self) -> Option<&dyn SocketReads> {
        Some(self)
    }

    async fn put(&self, digest: &Digest, data: Bytes) -> Result<()> {
        if self.stat(digest).await?.is_some() {
            return Ok(());
        }
        let tmp = self.tmp_path(".put");
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

    async fn list_page(&self, after: Option<&Digest>, limit: usize) -> Result<Vec<(Digest, u64)>> {
        let root = self.root.join("blobs");
        let after = after.map(Digest::to_string);
        blocking(move || list_page(&root, after.as_deref(), limit)).await
    }

    async fn upload_create(&self, id: &UploadId) -> Result<()> {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.upload_path(id))
            .await?;
        Ok(())
    }

    async fn upload_append(&self, id: &UploadId, data: ByteStream) -> Result<u64> {
        Ok(self.append(id, data, None).await?.0)
    }

    async fn upload_append_hashing(&self, id: &UploadId, data: ByteStream, hasher: Hasher) -> Result<(u64, Hasher)> {
        match self.append(id, data, Some(hasher)).await? {
            (size, Some(hasher)) => Ok((size, hasher)),
            (_, None) => Err(io::Error::other("an append lost its hasher").into()),
        }
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
        let (src, dst) = (self.upload_path(id), self.blob_path(digest));
        let trash = self.tmp_path(".trash");
        let trash2 = trash.clone();
        let (size, already) = blocking(move || {
            let f = std::fs::File::open(&src).map_err(io_to_storage)?;
            let size = f.metadata()?.len();
            // The same content is already a blob (a layer pushed again):
            // keep it rather than replace it, which would free its blocks
            // while the client waits. Its bytes were synced before it was
            // renamed into place; syncing the directory makes sure that
            // rename is durable too, even if a concurrent commit made it a
            // moment ago.
            if std::fs::metadata(&dst).is_ok_and(|m| m.is_file() && m.len() == size) {
                let dir = dst.parent().expect("blob path has a parent");
                std::fs::File::open(dir)?.sync_all()?;
                std::fs::rename(&src, &trash)?;
                return Ok((size, true));
            }
            f.sync_all()?;
            drop(f);
            publish_blocking(&src, &dst)?;
            Ok((size, false))
        })
        .await?;
        if already {
            // The upload is gone (renamed aside); removing a large file takes a
            // while, so it is not awaited. After a crash, `open` removes it.
            tokio::task::spawn_blocking(move || {
                if let Err(e) = std::fs::remove_file(&trash2) {
                    tracing::warn!(path = %trash2.display(), error = %e, "could not remove a committed upload");
                }
            });
        }
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

    /// Two stores on one directory, as two berth nodes on a shared volume.
    #[tokio::test]
    async fn two_handles_share_uploads() {
        let dir = tempfile::tempdir().unwrap();
        let a = FsBlobStore::open(dir.path()).await.unwrap();
        let b = FsBlobStore::open(dir.path()).await.unwrap();
        crate::testsuite::shared_uploads(&a, &b).await;
    }

    /// The filesystem backend without its own `upload_append_hashing`, so
    /// the suite checks the trait's default too.
    struct DefaultHashing(FsBlobStore);

    #[async_trait]
    impl BlobStore for DefaultHashing {
        async fn stat(&self, d: &Digest) -> Result<Option<u64>> {
            self.0.stat(d).await
        }
        async fn get(&self, d: &Digest, range: Option<Range<u64>>) -> Result<ByteStream> {
            self.0.get(d, range).await
        }
        async fn put(&self, d: &Digest, data: Bytes) -> Result<()> {
            self.0.put(d, data).await
        }
        async fn delete(&self, d: &Digest) -> Result<()> {
            self.0.delete(d).await
        }
        async fn list_page(&self, after: Option<&Digest>, limit: usize) -> Result<Vec<(Digest, u64)>> {
            self.0.list_page(after, limit).await
        }
        async fn upload_create(&self, id: &UploadId) -> Result<()> {
            self.0.upload_create(id).await
        }
        async fn upload_append(&self, id: &UploadId, data: ByteStream) -> Result<u64> {
            self.0.upload_append(id, data).await
        }
        async fn upload_size(&self, id: &UploadId) -> Result<Option<u64>> {
            self.0.upload_size(id).await
        }
        async fn upload_read(&self, id: &UploadId) -> Result<ByteStream> {
            self.0.upload_read(id).await
        }
        async fn upload_commit(&self, id: &UploadId, d: &Digest) -> Result<u64> {
            self.0.upload_commit(id, d).await
        }
        async fn upload_delete(&self, id: &UploadId) -> Result<()> {
            self.0.upload_delete(id).await
        }
    }

    #[tokio::test]
    async fn the_default_hashing_append_passes_the_shared_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = DefaultHashing(FsBlobStore::open(dir.path()).await.unwrap());
        crate::testsuite::run_all(&store).await;
    }

    /// A client that pauses longer than a worker waits: the workers end
    /// and start again between batches, and nothing is lost or reordered.
    #[tokio::test]
    async fn a_slow_client_appends_and_hashes_in_order() {
        let data: Vec<u8> = (0..(3 << 20) + 100u32).map(|i| (i % 251) as u8).collect();
        let parts: Vec<Bytes> = data.chunks(700_000).map(Bytes::copy_from_slice).collect();
        let slow: ByteStream = Box::pin(futures_util::stream::iter(parts).then(|p| async move {
            tokio::time::sleep(SERIAL_LINGER * 3).await;
            Ok(p)
        }));
        appends_in_order(slow, &data).await;
    }

    /// Appends `stream` (the bytes of `data`) to a new upload while hashing,
    /// and checks the size, the hash and the bytes read back.
    async fn appends_in_order(stream: ByteStream, data: &[u8]) {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).await.unwrap();
        let id: UploadId = "up".parse().unwrap();
        store.upload_create(&id).await.unwrap();
        let (n, hasher) = store
            .upload_append_hashing(&id, stream, oci::Algorithm::Sha256.hasher())
            .await
            .unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(hasher.finish(), Digest::sha256(data));
        assert!(collect(store.upload_read(&id).await.unwrap()).await == data);
    }

    async fn collect(mut s: ByteStream) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c.unwrap());
        }
        out
    }

    /// Mapped reads give the bytes `get` gives: whole, across windows, from
    /// an offset inside a page, and small ranges (which are not mapped).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn reads_for_a_socket_are_the_bytes_of_get() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).await.unwrap();
        let data: Vec<u8> = (0..MAP_WINDOW as usize * 2 + 12_345).map(|i| (i % 249) as u8).collect();
        let digest = Digest::sha256(&data);
        store.put(&digest, Bytes::from(data.clone())).await.unwrap();
        let len = data.len() as u64;
        for range in [
            None,
            Some(0..len),
            Some(4097..len - 3),
            Some(MAP_WINDOW - 1..MAP_WINDOW + MAP_MIN + 1),
            Some(10..2000),
            Some(5..5),
        ] {
            let want = match &range {
                Some(r) => data[r.start as usize..r.end as usize].to_vec(),
                None => data.clone(),
            };
            let got = collect(store.get_for_socket(&digest, range.clone()).await.unwrap()).await;
            assert!(got == want, "range {range:?}");
        }
    }

    /// A file of `len` bytes, and a window of `n` of them at `offset`.
    #[cfg(target_os = "linux")]
    fn mapped(len: usize, offset: u64, n: u64) -> (tempfile::TempDir, std::path::PathBuf, Bytes) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, vec![7u8; len]).unwrap();
        let file = Arc::new(std::fs::File::open(&path).unwrap());
        let window = map_window(&file, offset, n).unwrap();
        (dir, path, window)
    }

    /// A window is in the page cache when `map_window` returns, whether or
    /// not it was before (where the file system can drop clean pages).
    #[cfg(target_os = "linux")]
    #[test]
    fn a_window_is_cached_when_mapped() {
        use std::os::fd::AsRawFd;
        // SAFETY: sysconf has no preconditions.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, vec![7u8; 2 << 20]).unwrap();
        let file = Arc::new(std::fs::File::open(&path).unwrap());
        file.sync_all().unwrap();
        // SAFETY: advice on an open descriptor.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let cold = {
            // SAFETY: a read-only mapping of an open descriptor, unmapped below.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    2 << 20,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED);
            let cold = !resident(ptr, 2 << 20, page);
            // SAFETY: the mapping just made.
            unsafe { libc::munmap(ptr, 2 << 20) };
            cold
        };
        if !cold {
            eprintln!("this file system keeps clean pages: only the cached case is checked");
        }
        for (offset, n) in [(0, 2 << 20), (4_196, 1 << 20)] {
            let window = map_window(&file, offset, n).unwrap();
            let skip = (offset % page) as usize;
            let start = window.as_ptr() as usize - skip;
            assert!(
                resident(start as *mut libc::c_void, n as usize + skip, page),
                "window at {offset}"
            );
            assert!(window.iter().all(|&b| b == 7));
        }
    }

    /// A window's bytes are found in the registry, at their file offset,
    /// until the window goes; anything else is not.
    #[cfg(target_os = "linux")]
    #[test]
    fn mapped_bytes_name_their_file_region() {
        let (_dir, _, window) = mapped(3 << 20, 4_196, 2 << 20);
        let (_, offset, n) = file_region(&window).unwrap();
        assert_eq!((offset, n), (4_196, 2 << 20));
        let (_, offset, n) = file_region(&window[70_000..]).unwrap();
        assert_eq!((offset, n), (74_196, (2 << 20) - 70_000));
        assert!(file_region(&window[..1000]).is_none(), "short slices are not looked up");
        let other = vec![0u8; 1 << 20];
        assert!(file_region(&other).is_none());
        let copy = window.clone();
        drop(window);
        assert!(file_region(&copy).is_some(), "alive while any Bytes holds it");
        let at = copy.as_ptr() as usize;
        drop(copy);
        // The mapping began 100 bytes earlier, on the page holding 4,196.
        assert!(lock_windows().get(&(at - 100)).is_none(), "gone with the last Bytes");
    }

    /// What mapped reads rely on: a page that can no longer be read (here the
    /// file was truncated under the mapping) fails the socket write with an
    /// error. The test must not touch those bytes itself: that would be the
    /// fatal signal.
    #[cfg(target_os = "linux")]
    #[test]
    fn an_unreadable_mapped_page_is_a_write_error() {
        use std::os::unix::net::UnixStream;
        let (_dir, path, window) = mapped(1 << 20, 0, 1 << 20);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        let (mut tx, _rx) = UnixStream::pair().unwrap();
        tx.set_nonblocking(true).unwrap();
        let r = tx.write(&window);
        assert_eq!(r.map_err(|e| e.raw_os_error()), Err(Some(libc::EFAULT)));
    }

    /// A client faster than the disk: the workers take several batches at a
    /// time, and the file and the hash still hold every byte in order.
    #[tokio::test]
    async fn a_fast_client_appends_and_hashes_in_order() {
        let data: Vec<u8> = (0..(12 << 20) + 123u32).map(|i| (i % 253) as u8).collect();
        let parts: Vec<io::Result<Bytes>> = data.chunks(64 << 10).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        appends_in_order(Box::pin(futures_util::stream::iter(parts)), &data).await;
    }

    /// Batches taken together: the aligned ones at the front go in one
    /// direct write, an unaligned one ends direct I/O, and the bytes land in
    /// order whatever path each took.
    #[test]
    fn a_writer_writes_taken_batches_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("up");
        std::fs::write(&path, b"").unwrap();
        let batch = |seed: u8, len: usize| -> Bytes {
            let mut b = aligned_buffer();
            b.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
            b.freeze()
        };
        let first = [
            batch(1, BATCH_BYTES),
            batch(2, BATCH_BYTES),
            batch(3, 1000),
            batch(4, BATCH_BYTES),
        ];
        let then = [batch(5, BATCH_BYTES), batch(6, 10)];
        let mut w = Writer::open(&path).unwrap();
        w.write(&first).unwrap();
        assert!(w.direct.is_none(), "an unaligned end of file ends direct I/O");
        w.write(&then).unwrap();
        let want: Vec<u8> = first.iter().chain(&then).flat_map(|b| b.iter().copied()).collect();
        assert_eq!(w.size, want.len() as u64);
        assert!(std::fs::read(&path).unwrap() == want);
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
        std::fs::write(dir.path().join("uploads/.trash-1-2"), b"committed").unwrap();
        let _ = FsBlobStore::open(dir.path()).await.unwrap();
        assert!(!dir.path().join("uploads/.put-1-1").exists());
        assert!(!dir.path().join("uploads/.trash-1-2").exists());
    }
}
