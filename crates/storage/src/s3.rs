//! S3 backend (feature `s3`): blobs and uploads as objects in a bucket of
//! any S3-compatible store, through `object_store`, so berth nodes keep no
//! state of their own and any node can serve any blob or continue any
//! upload.
//!
//! Layout under the optional key prefix:
//! - `blobs/<algorithm>/<hex>`: committed blobs;
//! - `uploads/<upload id>/<start offset, 20 digits>-<writer, 16 hex>`: the
//!   parts of an upload in progress, one object per append, named by the
//!   offset it starts at and a number its writer drew, so no two appends
//!   ever write one key; `uploads/<upload id>/<20 zeros>`: the empty object
//!   `upload_create` writes (an upload exists while it has an object).
//!
//! Keys are built only from validated `Digest` and `UploadId` values.
//!
//! Every object appears whole or not at all: an append streams into one new
//! part with a multipart put (or one put when it fits in one part), which
//! the store makes visible only on completion; a failed append aborts it and
//! leaves the parts that were there. So an upload is always whole parts, and
//! its size is the sum of their sizes: all its state is in the bucket, and a
//! node that did not see the earlier appends continues it (the registry
//! re-hashes it through `upload_read` when it holds no hash state). A commit
//! streams the parts in order into one multipart put of the blob's key (or
//! copies a single part on the server), so a blob is visible only when it is
//! complete, and then deletes the parts. S3 acknowledges a write only once
//! it is durable, so there is nothing to sync.
//!
//! The caller verified the upload's digest, on one node, before the commit;
//! a client that breaks the protocol's order can still append through
//! another node meanwhile. Parts are never replaced (their keys are
//! unique), so two appends at one offset show as an overlap, which fails
//! every read of the upload, and a part added after the check makes the
//! commit stream, which hashes what it writes and completes the blob only
//! if it has the digest: the bytes under a digest are always the digest's.
//!
//! Memory stays bounded whatever the size of an append or a commit: a part
//! is `PART_BYTES`, with at most `PARTS_IN_FLIGHT` of them being sent while
//! the next fills.
//!
//! Multipart uploads that a crash leaves incomplete are invisible and hold
//! no key, but the store keeps their parts until they are aborted: give the
//! bucket a lifecycle rule that aborts incomplete multipart uploads after a
//! day (`AbortIncompleteMultipartUpload`).
//!
//! There is no disk to watch (`disk_usage` is `None`), so the disk-watermark
//! guard does not apply to this backend.

use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt,
    PutPayload, RetryConfig,
};
use oci::{Algorithm, Digest, UploadId};
use tokio::task::JoinSet;

use crate::{input_error, BlobStore, ByteStream, Result, StorageError};

/// Bytes per part of a multipart put (S3 needs at least 5 MiB for every
/// part but the last).
const PART_BYTES: usize = 8 << 20;
/// Parts of one put being sent at once while the next one fills, so the
/// input and the store's network overlap.
const PARTS_IN_FLIGHT: usize = 2;
/// Largest object S3 copies in one request (`CopyObject`); a single-part
/// upload larger than this is committed by streaming it instead.
const COPY_MAX: u64 = 5 << 30;
/// S3 returns at most this many keys per list request.
const LIST_MAX: usize = 1000;
/// Digits of a part's start offset in its key: `u64::MAX` has 20.
const OFFSET_DIGITS: usize = 20;
/// Hex digits of the writer's number in a part's key.
const WRITER_DIGITS: usize = 16;

/// A request making no progress (nothing received) for this long fails.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Whole-request limit of the calls that move no blob data (head, list,
/// delete, a manifest's put, starting and completing multipart puts).
/// Requests that stream a blob or a part have only `READ_TIMEOUT`: a pull
/// lasts as long as the client takes to read it.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

/// Every algorithm, in the order of its name (the order of digest texts).
/// `algorithms_are_listed_in_digest_order` keeps it complete and sorted.
const ALGORITHMS: [Algorithm; 2] = [Algorithm::Sha256, Algorithm::Sha512];

/// Where the bucket is and who berth is there.
#[derive(Clone)]
pub struct S3Options {
    pub bucket: String,
    /// Key prefix of everything berth stores, without leading or trailing
    /// `/`; empty for the bucket's root.
    pub prefix: String,
    /// `http(s)://host:port` of an S3-compatible server (path-style
    /// requests; plain HTTP allowed since it was asked for explicitly);
    /// `None` for AWS itself (virtual-hosted requests, HTTPS only).
    pub endpoint: Option<String>,
    pub region: String,
    pub credentials: S3Credentials,
}

#[derive(Clone)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    /// For temporary credentials.
    pub session_token: Option<String>,
}

/// The secret never appears in a log or an error.
impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &self.session_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("credentials", &self.credentials)
            .finish()
    }
}

impl S3Options {
    /// The server, for messages: the endpoint, or AWS's in the region.
    pub fn server(&self) -> String {
        match &self.endpoint {
            Some(e) => e.clone(),
            None => format!("AWS S3 ({})", self.region),
        }
    }
}

/// Why the store could not be opened: each says what is wrong, the caller
/// adds what to do.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("invalid S3 settings")]
    Settings(#[source] object_store::Error),
    #[error("bucket {bucket:?} does not exist on {server}")]
    NoSuchBucket { bucket: String, server: String },
    #[error("{server} refused berth's credentials (access key id {access_key_id:?}) for bucket {bucket:?}")]
    Refused {
        bucket: String,
        server: String,
        access_key_id: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot use bucket {bucket:?} on {server}")]
    Unavailable {
        bucket: String,
        server: String,
        #[source]
        source: object_store::Error,
    },
}

pub struct S3BlobStore {
    /// For requests that move blob data (see `CONTROL_TIMEOUT`).
    data: Arc<AmazonS3>,
    /// For the others.
    control: Arc<AmazonS3>,
    /// `""` or `"<prefix>/"`.
    prefix: String,
}

impl std::fmt::Debug for S3BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3BlobStore({}, prefix {:?})", self.control, self.prefix)
    }
}

fn client(opts: &S3Options, timeout: Option<Duration>) -> Result<AmazonS3, object_store::Error> {
    let mut client = ClientOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_read_timeout(READ_TIMEOUT)
        .with_allow_http(opts.endpoint.as_deref().is_some_and(|e| e.starts_with("http://")));
    client = match timeout {
        Some(t) => client.with_timeout(t),
        None => client.with_timeout_disabled(),
    };
    // object_store retries what is safe to repeat (every request berth
    // makes writes a key whose content is fixed by its name, or reads)
    // on 5xx answers, lost connections and timeouts.
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: 5,
        retry_timeout: Duration::from_secs(60),
    };
    let mut b = AmazonS3Builder::new()
        .with_bucket_name(&opts.bucket)
        .with_region(&opts.region)
        .with_access_key_id(&opts.credentials.access_key_id)
        .with_secret_access_key(&opts.credentials.secret_access_key)
        .with_client_options(client)
        .with_retry(retry);
    if let Some(token) = &opts.credentials.session_token {
        b = b.with_token(token);
    }
    b = match &opts.endpoint {
        Some(endpoint) => b.with_endpoint(endpoint).with_virtual_hosted_style_request(false),
        // A bucket name with dots cannot be a host name under AWS's
        // certificate.
        None => b.with_virtual_hosted_style_request(!opts.bucket.contains('.')),
    };
    b.build()
}

impl S3BlobStore {
    /// Connects and checks, with one request, that the bucket exists and
    /// takes the credentials.
    pub async fn open(opts: S3Options) -> Result<S3BlobStore, OpenError> {
        let prefix = opts.prefix.trim_matches('/');
        if !prefix.is_empty() {
            Path::parse(prefix).map_err(|e| OpenError::Settings(e.into()))?;
        }
        let store = S3BlobStore {
            data: Arc::new(client(&opts, None).map_err(OpenError::Settings)?),
            control: Arc::new(client(&opts, Some(CONTROL_TIMEOUT)).map_err(OpenError::Settings)?),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
        };
        // A GET of a key that is never written: 404 `NoSuchKey` is a
        // bucket that works (a HEAD's 404 has no body to tell it from
        // `NoSuchBucket`); anything else says what does not.
        let probe = Path::from(format!("{}berth-open-probe", store.prefix));
        match store.control.get(&probe).await {
            Ok(_) => Ok(store),
            Err(e @ object_store::Error::NotFound { .. }) if mentions(&e, "NoSuchBucket") => {
                Err(OpenError::NoSuchBucket {
                    bucket: opts.bucket.clone(),
                    server: opts.server(),
                })
            }
            Err(object_store::Error::NotFound { .. }) => Ok(store),
            Err(e) => Err(open_error(&opts, e)),
        }
    }

    fn blob_key(&self, d: &Digest) -> Path {
        Path::from(format!("{}blobs/{}/{}", self.prefix, d.algorithm().as_str(), d.hex()))
    }

    fn upload_dir(&self, id: &UploadId) -> Path {
        Path::from(format!("{}uploads/{}", self.prefix, id.as_str()))
    }

    /// The empty object that makes an upload exist.
    fn upload_marker(&self, id: &UploadId) -> Path {
        Path::from(format!(
            "{}uploads/{}/{:0width$}",
            self.prefix,
            id.as_str(),
            0,
            width = OFFSET_DIGITS
        ))
    }

    /// A new part's key: no other writer draws the same number.
    fn part_key(&self, id: &UploadId, offset: u64) -> Path {
        Path::from(format!(
            "{}uploads/{}/{offset:0width$}-{:0hex$x}",
            self.prefix,
            id.as_str(),
            writer_number(),
            width = OFFSET_DIGITS,
            hex = WRITER_DIGITS
        ))
    }

    /// The upload's objects, parts in order; empty when there is no such
    /// upload. The parts with bytes must cover the upload from 0 without a
    /// gap or an overlap, which appends at the upload's size keep; two
    /// nodes appending to one upload at once (a client breaking the
    /// protocol's order) break that, and then reading the upload fails
    /// rather than return other bytes.
    async fn parts(&self, id: &UploadId) -> Result<Vec<Part>> {
        let dir = self.upload_dir(id);
        let listed: Vec<ObjectMeta> = self.control.list(Some(&dir)).try_collect().await.map_err(store_error)?;
        let mut parts: Vec<Part> = listed
            .into_iter()
            .filter_map(|m| {
                let offset = m.location.filename().and_then(part_offset);
                if offset.is_none() {
                    tracing::warn!(key = %m.location, "ignoring an object in an upload that is not a part");
                }
                Some(Part {
                    offset: offset?,
                    size: m.size,
                    key: m.location,
                })
            })
            .collect();
        parts.sort_by_key(|p| (p.offset, p.size));
        let mut end = 0;
        for p in parts.iter().filter(|p| p.size > 0) {
            if p.offset != end {
                return Err(StorageError::Io(io::Error::other(format!(
                    "upload {id}: part {} starts at {}, where the parts before it end at {end}; \
                     the upload was appended to by two writers at once, cancel it and upload again",
                    p.key, p.offset
                ))));
            }
            end += p.size;
        }
        Ok(parts)
    }

    /// Writes `data` as object `key`, which appears whole when this returns
    /// and not at all if it fails. Nothing is written for an empty stream.
    /// `mark` is applied to the errors of `data`. With `verify`, the object
    /// appears only if `data` has that digest. Returns the bytes written.
    async fn write_object(
        &self,
        key: &Path,
        mut data: ByteStream,
        mark: fn(io::Error) -> io::Error,
        verify: Option<&Digest>,
    ) -> Result<u64> {
        let mut writer = PartWriter::default();
        let mut hasher = verify.map(|d| d.algorithm().hasher());
        let mut cur = BytesMut::new();
        // A full part is sent only once more data follows it, so a stream
        // of one part or less is one plain put.
        let mut full: Option<Bytes> = None;
        loop {
            let mut chunk = match data.next().await {
                Some(Ok(c)) => c,
                Some(Err(e)) => return Err(writer.fail(mark(e).into()).await),
                None => break,
            };
            if let Some(h) = hasher.as_mut() {
                h.update(&chunk);
            }
            while chunk.has_remaining() {
                if let Some(part) = full.take() {
                    if let Err(e) = writer.send(&self.data, key, part).await {
                        return Err(writer.fail(e).await);
                    }
                }
                if cur.is_empty() && writer.started() {
                    cur.reserve(PART_BYTES);
                }
                let n = chunk.len().min(PART_BYTES - cur.len());
                cur.extend_from_slice(&chunk[..n]);
                chunk.advance(n);
                if cur.len() == PART_BYTES {
                    full = Some(cur.split().freeze());
                }
            }
        }
        let last = full.unwrap_or_else(|| cur.freeze());
        let size = writer.sent + last.len() as u64;
        if let (Some(h), Some(want)) = (hasher, verify) {
            let got = h.finish();
            if got != *want {
                let e = io::Error::other(format!(
                    "the upload's parts now hash to {got}, not the {want} verified; \
                     it was appended to during its commit"
                ));
                return Err(writer.fail(StorageError::Io(e)).await);
            }
        }
        if !writer.started() {
            if !last.is_empty() {
                self.data.put(key, PutPayload::from(last)).await.map_err(store_error)?;
            }
            return Ok(size);
        }
        if let Err(e) = writer.finish(&self.data, key, last).await {
            return Err(writer.fail(e).await);
        }
        Ok(size)
    }

    /// Reads `parts` from `offset` (which is in them, or at their end) on.
    fn read_parts(&self, parts: Vec<Part>, offset: u64) -> ByteStream {
        let store = self.data.clone();
        let reads = parts
            .into_iter()
            .filter(move |p| p.size > 0 && p.offset + p.size > offset)
            .map(move |p| {
                let from = offset.saturating_sub(p.offset);
                (p, from)
            });
        let stream = futures_util::stream::iter(reads)
            .then(move |(p, from)| {
                let store = store.clone();
                async move {
                    let range = (from > 0).then_some(GetRange::Offset(from));
                    let got = store
                        .get_opts(&p.key, GetOptions::new().with_range(range))
                        .await
                        .map_err(io_error)?;
                    Ok::<_, io::Error>(got.into_stream().map_err(io_error))
                }
            })
            .try_flatten();
        Box::pin(stream)
    }

    /// Deletes `keys`; a key already gone is not an error.
    async fn delete_keys(&self, keys: Vec<Path>) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let keys = futures_util::stream::iter(keys.into_iter().map(Ok)).boxed();
        let results: Vec<object_store::Result<Path>> = self.control.delete_stream(keys).collect().await;
        for r in results {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_error(e)),
            }
        }
        Ok(())
    }

    /// One page of `alg`'s blobs from S3, after `after` (a key).
    async fn list_algorithm(
        &self,
        alg: Algorithm,
        after: Option<String>,
        limit: usize,
        out: &mut Vec<(Digest, u64)>,
    ) -> Result<()> {
        let dir = format!("{}blobs/{}/", self.prefix, alg.as_str());
        let mut opts = PaginatedListOptions {
            offset: after,
            ..PaginatedListOptions::default()
        };
        let mut last: Option<String> = None;
        while out.len() < limit {
            opts.max_keys = Some((limit - out.len()).min(LIST_MAX));
            let page = self
                .control
                .list_paginated(Some(&dir), opts.clone())
                .await
                .map_err(store_error)?;
            for m in page.result.objects {
                let key = m.location.as_ref().to_string();
                // S3 lists keys in ascending order; the pages rely on it.
                if last.as_ref().is_some_and(|l| *l >= key) {
                    return Err(StorageError::Io(io::Error::other(format!(
                        "the object store listed {key} after {}; it does not list keys in order",
                        last.unwrap_or_default()
                    ))));
                }
                let hex = key.strip_prefix(&dir).unwrap_or_default();
                match format!("{}:{hex}", alg.as_str()).parse::<Digest>() {
                    Ok(d) if out.len() < limit => out.push((d, m.size)),
                    Ok(_) => {}
                    // Only keys a commit could have made are blobs;
                    // anything else is not ours to touch.
                    Err(_) => tracing::warn!(key = %key, "ignoring an object that is not a blob"),
                }
                last = Some(key);
            }
            match page.page_token {
                Some(token) => opts.page_token = Some(token),
                None => break,
            }
        }
        Ok(())
    }
}

/// A part of an upload: the object `key` holds bytes `offset..offset+size`.
#[derive(Debug)]
struct Part {
    offset: u64,
    size: u64,
    key: Path,
}

/// Where the upload's parts end: its size.
fn end(parts: &[Part]) -> u64 {
    parts.iter().map(|p| p.offset + p.size).max().unwrap_or(0)
}

/// The start offset in a part's name (`upload_marker`'s or `part_key`'s).
fn part_offset(name: &str) -> Option<u64> {
    let (offset, writer) = match name.split_once('-') {
        Some((o, w)) => (o, Some(w)),
        None => (name, None),
    };
    let digits = offset.len() == OFFSET_DIGITS && offset.bytes().all(|b| b.is_ascii_digit());
    let writer_ok = writer.is_none_or(|w| w.len() == WRITER_DIGITS && w.bytes().all(|b| b.is_ascii_hexdigit()));
    (digits && writer_ok).then(|| offset.parse().ok()).flatten()
}

/// A number for a part's key that no other writer of the bucket draws: a
/// random per-process key (std's hasher seeds) over the time and a count.
fn writer_number() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static SEED: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let mut h = SEED
        .get_or_init(std::collections::hash_map::RandomState::new)
        .build_hasher();
    h.write_u64(COUNT.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// The multipart put of one object, started at its first part.
#[derive(Default)]
struct PartWriter {
    upload: Option<Box<dyn MultipartUpload>>,
    in_flight: JoinSet<object_store::Result<()>>,
    /// Bytes handed to parts so far.
    sent: u64,
}

impl PartWriter {
    fn started(&self) -> bool {
        self.upload.is_some()
    }

    /// Sends `part` (starting the put if needed), after waiting for an
    /// earlier part when `PARTS_IN_FLIGHT` are out.
    async fn send(&mut self, store: &AmazonS3, key: &Path, part: Bytes) -> Result<()> {
        if self.upload.is_none() {
            self.upload = Some(store.put_multipart(key).await.map_err(store_error)?);
        }
        while self.in_flight.len() >= PARTS_IN_FLIGHT {
            self.join_one().await?;
        }
        self.sent += part.len() as u64;
        let upload = self
            .upload
            .as_mut()
            .ok_or_else(|| io::Error::other("multipart put not started"))?;
        self.in_flight.spawn(upload.put_part(PutPayload::from(part)));
        Ok(())
    }

    async fn join_one(&mut self) -> Result<()> {
        match self.in_flight.join_next().await {
            Some(Ok(Ok(()))) | None => Ok(()),
            Some(Ok(Err(e))) => Err(store_error(e)),
            Some(Err(e)) => Err(StorageError::Io(io::Error::other(e))),
        }
    }

    /// Sends the last part and completes the put: the object appears.
    async fn finish(&mut self, store: &AmazonS3, key: &Path, last: Bytes) -> Result<()> {
        if !last.is_empty() {
            self.send(store, key, last).await?;
        }
        while !self.in_flight.is_empty() {
            self.join_one().await?;
        }
        let upload = self
            .upload
            .as_mut()
            .ok_or_else(|| io::Error::other("multipart put not started"))?;
        upload.complete().await.map_err(store_error)?;
        self.upload = None;
        Ok(())
    }

    /// Abandons the put (its parts are freed; nothing appears) and returns
    /// `error`.
    async fn fail(&mut self, error: StorageError) -> StorageError {
        self.in_flight.abort_all();
        while self.in_flight.join_next().await.is_some() {}
        if let Some(mut upload) = self.upload.take() {
            if let Err(e) = upload.abort().await {
                tracing::debug!(error = %e, "could not abort a multipart put; the bucket's lifecycle rule removes it");
            }
        }
        error
    }
}

/// Whether the error's text, sources included, contains `what` (an S3 error
/// code, which object_store keeps only in the response body it quotes).
fn mentions(e: &(dyn std::error::Error + 'static), what: &str) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.to_string().contains(what) {
            return true;
        }
        next = e.source();
    }
    false
}

fn open_error(opts: &S3Options, e: object_store::Error) -> OpenError {
    let (bucket, server) = (opts.bucket.clone(), opts.server());
    let refused = matches!(
        e,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
    ) || ["InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"]
        .iter()
        .any(|code| mentions(&e, code));
    if refused {
        OpenError::Refused {
            bucket,
            server,
            access_key_id: opts.credentials.access_key_id.clone(),
            source: e,
        }
    } else if mentions(&e, "NoSuchBucket") {
        OpenError::NoSuchBucket { bucket, server }
    } else {
        OpenError::Unavailable {
            bucket,
            server,
            source: e,
        }
    }
}

fn io_error(e: object_store::Error) -> io::Error {
    let kind = match &e {
        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            io::ErrorKind::PermissionDenied
        }
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

fn store_error(e: object_store::Error) -> StorageError {
    match e {
        object_store::Error::NotFound { .. } => StorageError::NotFound,
        e => StorageError::Io(io_error(e)),
    }
}

/// The caller's stream of bytes to store failed.
fn mark_input(e: io::Error) -> io::Error {
    input_error(e)
}

/// Bytes read back from the store that fail are the store's failure.
fn mark_store(e: io::Error) -> io::Error {
    e
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        match self.control.head(&self.blob_key(digest)).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_error(e)),
        }
    }

    async fn get(&self, digest: &Digest, range: Option<Range<u64>>) -> Result<ByteStream> {
        let range = match range {
            Some(r) if r.is_empty() => {
                // Nothing to read, but a missing blob is still missing.
                self.stat(digest).await?.ok_or(StorageError::NotFound)?;
                return Ok(Box::pin(futures_util::stream::empty()));
            }
            r => r.map(GetRange::Bounded),
        };
        let got = self
            .data
            .get_opts(&self.blob_key(digest), GetOptions::new().with_range(range))
            .await
            .map_err(store_error)?;
        Ok(Box::pin(got.into_stream().map_err(io_error)))
    }

    async fn put(&self, digest: &Digest, data: Bytes) -> Result<()> {
        self.control
            .put(&self.blob_key(digest), PutPayload::from(data))
            .await
            .map_err(store_error)?;
        Ok(())
    }

    async fn delete(&self, digest: &Digest) -> Result<()> {
        match self.control.delete(&self.blob_key(digest)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_error(e)),
        }
    }

    async fn list_page(&self, after: Option<&Digest>, limit: usize) -> Result<Vec<(Digest, u64)>> {
        let mut out = Vec::new();
        for alg in ALGORITHMS {
            if out.len() >= limit {
                break;
            }
            let from = match after {
                Some(a) if a.algorithm().as_str() > alg.as_str() => continue,
                Some(a) if a.algorithm() == alg => Some(self.blob_key(a).as_ref().to_string()),
                _ => None,
            };
            self.list_algorithm(alg, from, limit, &mut out).await?;
        }
        Ok(out)
    }

    async fn upload_create(&self, id: &UploadId) -> Result<()> {
        self.control
            .put(&self.upload_marker(id), PutPayload::new())
            .await
            .map_err(store_error)?;
        Ok(())
    }

    async fn upload_append(&self, id: &UploadId, data: ByteStream) -> Result<u64> {
        let parts = self.parts(id).await?;
        if parts.is_empty() {
            return Err(StorageError::NotFound);
        }
        let start = end(&parts);
        let written = self
            .write_object(&self.part_key(id, start), data, mark_input, None)
            .await?;
        Ok(start + written)
    }

    async fn upload_size(&self, id: &UploadId) -> Result<Option<u64>> {
        let parts = self.parts(id).await?;
        Ok((!parts.is_empty()).then(|| end(&parts)))
    }

    async fn upload_read(&self, id: &UploadId) -> Result<ByteStream> {
        self.upload_read_at(id, 0).await
    }

    async fn upload_read_at(&self, id: &UploadId, offset: u64) -> Result<ByteStream> {
        let parts = self.parts(id).await?;
        if parts.is_empty() {
            return Err(StorageError::NotFound);
        }
        Ok(self.read_parts(parts, offset))
    }

    async fn upload_commit(&self, id: &UploadId, digest: &Digest) -> Result<u64> {
        let parts = self.parts(id).await?;
        if parts.is_empty() {
            return Err(StorageError::NotFound);
        }
        let size = end(&parts);
        let blob = self.blob_key(digest);
        // The same content is already a blob (a layer pushed again): keep
        // it; it was whole when it appeared.
        let present = match self.control.head(&blob).await {
            Ok(m) => m.size == size,
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => return Err(store_error(e)),
        };
        if !present {
            let data: Vec<&Part> = parts.iter().filter(|p| p.size > 0).collect();
            match data.as_slice() {
                [] if *digest == digest.algorithm().hasher().finish() => {
                    self.control.put(&blob, PutPayload::new()).await.map_err(store_error)?;
                }
                [] => {
                    return Err(StorageError::Io(io::Error::other(format!(
                        "upload {id} lost its bytes before its commit (it holds none, and {digest} is not the empty digest)"
                    ))));
                }
                // The one part at 0 is what the caller verified: a part
                // appended since would be a second one (see the module's
                // doc).
                [one] if one.offset == 0 && one.size <= COPY_MAX => {
                    self.data.copy(&one.key, &blob).await.map_err(store_error)?;
                }
                _ => {
                    self.write_object(&blob, self.read_parts(parts_of(&parts), 0), mark_store, Some(digest))
                        .await?;
                }
            }
        }
        // The blob is complete; parts left behind by a failure here are
        // only space (the fs backend likewise removes its committed upload
        // after the response).
        if let Err(e) = self.delete_keys(parts.into_iter().map(|p| p.key).collect()).await {
            tracing::warn!(upload = %id, error = %e, "could not remove the parts of a committed upload");
        }
        Ok(size)
    }

    async fn upload_delete(&self, id: &UploadId) -> Result<()> {
        let dir = self.upload_dir(id);
        let keys: Vec<Path> = self
            .control
            .list(Some(&dir))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(store_error)?;
        self.delete_keys(keys).await
    }
}

/// A copy of the parts' list, for a read that outlives the borrow.
fn parts_of(parts: &[Part]) -> Vec<Part> {
    parts
        .iter()
        .map(|p| Part {
            offset: p.offset,
            size: p.size,
            key: p.key.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seaweedfs::TestS3;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn s3_backend_passes_the_shared_suite() {
        let Some(s3) = TestS3::start().await else { return };
        let store = S3BlobStore::open(s3.options("suite")).await.unwrap();
        crate::testsuite::run_all(&store).await;
        // Another node on the same bucket and prefix.
        let other = S3BlobStore::open(s3.options("suite")).await.unwrap();
        crate::testsuite::shared_uploads(&store, &other).await;
        // A store under another prefix of the bucket sees none of it.
        let beside = S3BlobStore::open(s3.options("other/prefix")).await.unwrap();
        let d = Digest::sha256(b"only under suite/");
        store.put(&d, Bytes::from_static(b"only under suite/")).await.unwrap();
        assert_eq!(beside.stat(&d).await.unwrap(), None);
        assert_eq!(crate::list_all(&beside).await.unwrap(), vec![]);
        // And the bucket's root is not a prefix of everything.
        let root = S3BlobStore::open(s3.options("")).await.unwrap();
        assert_eq!(root.stat(&d).await.unwrap(), None);
        crate::testsuite::run_all(&root).await;
    }

    fn id(s: &str) -> UploadId {
        s.parse().unwrap()
    }

    async fn read(s: ByteStream) -> Vec<u8> {
        s.try_fold(Vec::new(), |mut v, b| async move {
            v.extend_from_slice(&b);
            Ok(v)
        })
        .await
        .unwrap()
    }

    /// A part appended after the caller verified the digest (another node,
    /// a client breaking the order) is never committed under it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_writes_only_bytes_of_the_digest() {
        let Some(s3) = TestS3::start().await else { return };
        let store = S3BlobStore::open(s3.options("")).await.unwrap();
        let verified = vec![7u8; 1000];
        let d = Digest::sha256(&verified);
        let u = id("late-part");
        store.upload_create(&u).await.unwrap();
        let one = |b: Vec<u8>| -> ByteStream { Box::pin(futures_util::stream::iter([Ok(Bytes::from(b))])) };
        store.upload_append(&u, one(verified.clone())).await.unwrap();
        store.upload_append(&u, one(b"appended late".to_vec())).await.unwrap();
        let err = store.upload_commit(&u, &d).await.unwrap_err();
        assert!(err.to_string().contains("hash to"), "{err}");
        assert_eq!(store.stat(&d).await.unwrap(), None);
        assert_eq!(store.upload_size(&u).await.unwrap(), Some(1013), "the upload is kept");

        // Two appends at one offset (two nodes at once) are an overlap,
        // which every read of the upload refuses.
        let u2 = id("two-writers");
        store.upload_create(&u2).await.unwrap();
        for b in [b"first".to_vec(), b"other".to_vec()] {
            store
                .data
                .put(&store.part_key(&u2, 0), PutPayload::from(b))
                .await
                .unwrap();
        }
        let err = store.upload_size(&u2).await.unwrap_err();
        assert!(err.to_string().contains("two writers"), "{err}");
        store.upload_delete(&u2).await.unwrap();
        assert_eq!(store.upload_size(&u2).await.unwrap(), None);

        // A single part is copied on the server, and is the bytes verified.
        let u3 = id("one-part");
        store.upload_create(&u3).await.unwrap();
        store.upload_append(&u3, one(verified.clone())).await.unwrap();
        assert_eq!(store.upload_commit(&u3, &d).await.unwrap(), 1000);
        assert_eq!(read(store.get(&d, None).await.unwrap()).await, verified);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_says_what_is_wrong() {
        let Some(s3) = TestS3::start().await else { return };
        let mut missing = s3.options("");
        missing.bucket = "no-such-bucket".into();
        match S3BlobStore::open(missing).await {
            Err(OpenError::NoSuchBucket { bucket, .. }) => assert_eq!(bucket, "no-such-bucket"),
            other => panic!("a missing bucket must be NoSuchBucket, got {other:?}"),
        }
        let mut wrong = s3.options("");
        wrong.credentials.secret_access_key = "not-the-secret".into();
        match S3BlobStore::open(wrong).await {
            Err(e @ OpenError::Refused { .. }) => {
                let shown = format!("{e} {e:?}");
                assert!(!shown.contains("not-the-secret"), "{shown}");
            }
            other => panic!("a wrong secret must be Refused, got {other:?}"),
        }
        let mut unknown = s3.options("");
        unknown.credentials.access_key_id = "nobody".into();
        assert!(matches!(
            S3BlobStore::open(unknown).await,
            Err(OpenError::Refused { .. })
        ));
    }

    #[test]
    fn algorithms_are_listed_in_digest_order() {
        // A new algorithm fails to compile here until it is in ALGORITHMS.
        fn listed(a: Algorithm) -> bool {
            match a {
                Algorithm::Sha256 | Algorithm::Sha512 => ALGORITHMS.contains(&a),
            }
        }
        assert!(ALGORITHMS.iter().all(|a| listed(*a)));
        assert!(ALGORITHMS.windows(2).all(|w| w[0].as_str() < w[1].as_str()));
        // Within an algorithm, keys end in hex of one length, so key order
        // is digest order.
    }

    #[test]
    fn part_keys_sort_by_offset() {
        let k = |o: u64| format!("{o:0width$}", width = OFFSET_DIGITS);
        assert_eq!(k(u64::MAX).len(), OFFSET_DIGITS);
        assert!(k(9) < k(10) && k(10) < k(u64::MAX));
    }

    #[test]
    fn credentials_are_never_printed() {
        let o = S3Options {
            bucket: "b".into(),
            prefix: String::new(),
            endpoint: None,
            region: "us-east-1".into(),
            credentials: S3Credentials {
                access_key_id: "AKIDEXAMPLE".into(),
                secret_access_key: "wJalrXUtnFEMI".into(),
                session_token: Some("FwoGZXIvYXdzE".into()),
            },
        };
        let shown = format!("{o:?}");
        assert!(shown.contains("AKIDEXAMPLE"), "{shown}");
        assert!(
            !shown.contains("wJalrXUtnFEMI") && !shown.contains("FwoGZXIvYXdzE"),
            "{shown}"
        );
    }
}
