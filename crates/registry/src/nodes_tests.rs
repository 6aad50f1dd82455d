//! Two nodes (two `Registry` values with their own stores and caches) on
//! one PostgreSQL database and one blob directory: what one node writes,
//! the other serves without a stale cache; an upload continues on any node
//! without being hashed again; appends from two nodes never interleave;
//! one node at a time holds the GC lease.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use metadata::pg_cluster::TestCluster;
use metadata::PostgresMetadata;
use oci::{Algorithm, Digest, ErrorCode, Hasher, Reference, UploadId};
use storage::{BlobStore, ByteStream, FsBlobStore};

use crate::gc::tests::{push, repo, tag};
use crate::lease::Exclusive;
use crate::{Registry, RegistryConfig};

/// The fs store, counting the upload bytes read back (to hash them).
struct Counting {
    inner: FsBlobStore,
    read_back: AtomicU64,
}

#[async_trait::async_trait]
impl BlobStore for Counting {
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
        data: ByteStream,
        h: Hasher,
    ) -> storage::Result<(u64, Hasher)> {
        self.inner.upload_append_hashing(id, data, h).await
    }
    async fn upload_size(&self, id: &UploadId) -> storage::Result<Option<u64>> {
        self.inner.upload_size(id).await
    }
    async fn upload_read(&self, id: &UploadId) -> storage::Result<ByteStream> {
        self.upload_read_at(id, 0).await
    }
    async fn upload_read_at(&self, id: &UploadId, offset: u64) -> storage::Result<ByteStream> {
        let size = self.inner.upload_size(id).await?.unwrap_or(0);
        self.read_back.fetch_add(size.saturating_sub(offset), Ordering::SeqCst);
        self.inner.upload_read_at(id, offset).await
    }
    async fn upload_commit(&self, id: &UploadId, d: &Digest) -> storage::Result<u64> {
        self.inner.upload_commit(id, d).await
    }
    async fn upload_delete(&self, id: &UploadId) -> storage::Result<()> {
        self.inner.upload_delete(id).await
    }
}

struct Node {
    reg: Arc<Registry>,
    blobs: Arc<Counting>,
}

struct Nodes {
    a: Node,
    b: Node,
    _feeds: Vec<Abort>,
    _dir: tempfile::TempDir,
    _cluster: TestCluster,
}

struct Abort(tokio::task::JoinHandle<()>);

impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Two nodes following the change feed, each with a cache whose first
/// proof of being caught up has come. `None` without PostgreSQL.
async fn nodes(db: &str) -> Option<Nodes> {
    let cluster = TestCluster::start()?;
    let url = cluster.create_database(db).await;
    let dir = tempfile::tempdir().unwrap();
    let mut feeds = Vec::new();
    let node = || {
        let (url, root) = (url.clone(), dir.path().to_path_buf());
        async move {
            let blobs = Arc::new(Counting {
                inner: FsBlobStore::open(&root).await.unwrap(),
                read_back: AtomicU64::new(0),
            });
            let meta = Arc::new(PostgresMetadata::connect(&url).await.unwrap());
            let reg = Arc::new(Registry::new(blobs.clone(), meta, RegistryConfig::default()));
            Node { reg, blobs }
        }
    };
    let (a, b) = (node().await, node().await);
    for n in [&a, &b] {
        feeds.push(Abort(tokio::spawn(n.reg.clone().follow_changes())));
    }
    let started = Instant::now();
    for n in [&a, &b] {
        caught_up(&n.reg, started).await;
    }
    Some(Nodes {
        a,
        b,
        _feeds: feeds,
        _dir: dir,
        _cluster: cluster,
    })
}

/// Waits (boundedly) until `reg`'s change feed proves it heard every change
/// committed before `t`.
async fn caught_up(reg: &Registry, t: Instant) {
    for _ in 0..400 {
        if reg.cache.caught_up_after(t) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the change feed never caught up");
}

async fn digest_of(reg: &Registry, r: &oci::RepoName, t: &str) -> Result<Digest, ErrorCode> {
    reg.manifest_get(r, &Reference::Tag(tag(t)), true)
        .await
        .map(|m| m.digest)
        .map_err(|e| e.code)
}

/// Node B serves a tag and a catalog from its cache; node A moves the tag,
/// deletes the manifest, adds a repository. Once B's feed has caught up
/// with the moment A's write returned, B answers with A's change: its cache
/// is never stale past that, with no store read on a hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_node_is_never_served_stale_by_another() {
    let Some(n) = nodes("cache").await else { return };
    let r = repo("p/app");
    let m1 = push(&n.a.reg, &r, b"cfg1", &[b"layer1"], Some("t")).await;
    // Else the push's own notification could drop what B caches next.
    caught_up(&n.b.reg, Instant::now()).await;
    assert_eq!(digest_of(&n.b.reg, &r, "t").await, Ok(m1.clone()));
    assert_eq!(n.b.reg.catalog(None, None).await.unwrap().items, ["p/app"]);
    // Cached on B now (a second read is a hit).
    assert_eq!(n.b.reg.cache.tag(&r, &tag("t")), Some(m1.clone()));

    let m2 = push(&n.a.reg, &r, b"cfg2", &[b"layer2"], Some("t")).await;
    caught_up(&n.b.reg, Instant::now()).await;
    assert_eq!(digest_of(&n.b.reg, &r, "t").await, Ok(m2.clone()));

    n.a.reg
        .manifest_delete(&r, &Reference::Digest(m2.clone()))
        .await
        .unwrap();
    caught_up(&n.b.reg, Instant::now()).await;
    assert_eq!(digest_of(&n.b.reg, &r, "t").await, Err(ErrorCode::ManifestUnknown));
    let by_digest = n.b.reg.manifest_get(&r, &Reference::Digest(m2), true).await;
    assert_eq!(
        by_digest.map(|m| m.digest).map_err(|e| e.code),
        Err(ErrorCode::ManifestUnknown)
    );

    push(&n.a.reg, &repo("p/other"), b"cfg3", &[b"layer3"], Some("v1")).await;
    caught_up(&n.b.reg, Instant::now()).await;
    assert_eq!(n.b.reg.catalog(None, None).await.unwrap().items, ["p/app", "p/other"]);
}

fn body(b: Vec<u8>) -> ByteStream {
    Box::pin(futures_util::stream::iter(vec![Ok(Bytes::from(b))]))
}

/// POST on A, PATCH on B, PATCH on A, PUT with the last chunk on B, for
/// both algorithms: the right blob, and not one byte hashed twice (each
/// node continues the hash the other saved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_continues_on_any_node_without_hashing_it_again() {
    let Some(n) = nodes("uploads").await else { return };
    let r = repo("p/app");
    for alg in [Algorithm::Sha256, Algorithm::Sha512] {
        let chunks: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 100_000 + usize::from(i)]).collect();
        let mut h = alg.hasher();
        chunks.iter().for_each(|c| h.update(c));
        let d = h.finish();
        let id = n.a.reg.upload_start(&r, None, alg).await.unwrap();
        let mut at = 0;
        for (reg, c) in [(&n.b.reg, &chunks[0]), (&n.a.reg, &chunks[1])] {
            at = reg
                .upload_append(&r, &id, None, Some(at), body(c.clone()))
                .await
                .unwrap();
        }
        n.b.reg
            .upload_finish(&r, &id, None, Some(at), &d, Some(body(chunks[2].clone())))
            .await
            .unwrap();
        assert!(n.a.reg.blob_open(&r, &d).await.is_ok(), "{alg:?}");
    }
    assert_eq!(n.a.blobs.read_back.load(Ordering::SeqCst), 0);
    assert_eq!(n.b.blobs.read_back.load(Ordering::SeqCst), 0);

    // A node that died after appending, before saving the hash: the next
    // one hashes only the bytes after the saved state.
    let id = n.a.reg.upload_start(&r, None, Algorithm::Sha256).await.unwrap();
    n.a.reg
        .upload_append(&r, &id, None, Some(0), body(vec![1; 5000]))
        .await
        .unwrap();
    n.a.blobs.inner.upload_append(&id, body(vec![2; 300])).await.unwrap();
    let d = Digest::sha256(&[vec![1; 5000], vec![2; 300], vec![3; 700]].concat());
    n.b.reg
        .upload_finish(&r, &id, None, Some(5300), &d, Some(body(vec![3; 700])))
        .await
        .unwrap();
    assert_eq!(n.b.blobs.read_back.load(Ordering::SeqCst), 300);
}

/// While node A streams a chunk into an upload, node B's PATCH of the same
/// upload waits, then is refused with RANGE_INVALID; A's chunk lands whole
/// and the upload commits to exactly A's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_from_two_nodes_to_one_upload_never_interleave() {
    let Some(n) = nodes("busy").await else { return };
    let r = repo("p/app");
    let id = n.a.reg.upload_start(&r, None, Algorithm::Sha256).await.unwrap();
    // One chunk in flight at most: once the second is taken, A's append has
    // read the first, so it is under way (and holds the lease).
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(1);
    let slow: ByteStream = Box::pin(tokio_stream_of(rx));
    let writer = tokio::spawn({
        let (reg, r, id) = (n.a.reg.clone(), r.clone(), id.clone());
        async move { reg.upload_append(&r, &id, None, Some(0), slow).await }
    });
    tx.send(Ok(Bytes::from(vec![b'a'; 3000]))).await.unwrap();
    tx.send(Ok(Bytes::from(vec![b'a'; 1000]))).await.unwrap();
    // A streamed PATCH (no Content-Range) would append wherever the upload
    // ends: without the lease it would write beside A's.
    let err =
        n.b.reg
            .upload_append(&r, &id, None, None, body(vec![b'b'; 1000]))
            .await
            .unwrap_err();
    assert_eq!(err.code, ErrorCode::RangeInvalid, "{}", err.message);
    tx.send(Ok(Bytes::from(vec![b'a'; 1000]))).await.unwrap();
    drop(tx);
    assert_eq!(writer.await.unwrap().unwrap(), 5000);
    let d = Digest::sha256(&[b'a'; 5000]);
    n.b.reg
        .upload_finish(&r, &id, None, Some(5000), &d, None)
        .await
        .unwrap();
    assert_eq!(n.b.blobs.stat(&d).await.unwrap(), Some(5000));
}

fn tokio_stream_of(
    mut rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// One node at a time runs what the GC lease guards; the other is told who
/// holds it, and gets it once it is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_at_a_time_holds_the_gc_lease() {
    let Some(n) = nodes("lease").await else { return };
    let (release, held) = tokio::sync::oneshot::channel::<()>();
    let (started, running) = tokio::sync::oneshot::channel::<()>();
    let a = tokio::spawn({
        let reg = n.a.reg.clone();
        async move {
            reg.exclusively(crate::lease::GC, async {
                let _ = started.send(());
                let _ = held.await;
                Ok(1)
            })
            .await
        }
    });
    running.await.unwrap();
    let busy = n.b.reg.exclusively(crate::lease::GC, async { Ok(2) }).await.unwrap();
    assert_eq!(
        busy,
        Exclusive::Busy {
            holder: n.a.reg.node_id().to_string()
        }
    );
    release.send(()).unwrap();
    assert_eq!(a.await.unwrap().unwrap(), Exclusive::Ran(1));
    let ran = n.b.reg.exclusively(crate::lease::GC, async { Ok(2) }).await.unwrap();
    assert_eq!(ran, Exclusive::Ran(2));
}
