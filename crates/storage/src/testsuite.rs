//! The shared test suite every `BlobStore` backend must pass. Backends call
//! `run_all` from their own tests with a fresh, empty store.

use bytes::Bytes;
use futures_util::{stream, StreamExt};
use oci::{Algorithm, Digest, UploadId};

use crate::{BlobStore, ByteStream, StorageError};

async fn collect(mut s: ByteStream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.expect("stream chunk"));
    }
    out
}

fn chunks(parts: &[&'static [u8]]) -> ByteStream {
    let v: Vec<std::io::Result<Bytes>> = parts.iter().map(|p| Ok(Bytes::from_static(p))).collect();
    Box::pin(stream::iter(v))
}

fn upload_id(n: u32) -> UploadId {
    format!("suite-{n}").parse().expect("valid id")
}

pub async fn run_all(store: &dyn BlobStore) {
    put_get_stat_delete(store).await;
    ranged_reads(store).await;
    upload_lifecycle(store).await;
    upload_read_while_growing(store).await;
    hashing_appends(store).await;
    large_appends(store).await;
    many_part_uploads(store).await;
    failed_appends(store).await;
    missing_things(store).await;
    listing(store).await;
    listing_pages(store).await;
    disk_usage(store).await;
}

pub async fn put_get_stat_delete(store: &dyn BlobStore) {
    let data = Bytes::from_static(b"hello blob");
    let d = Digest::sha256(&data);
    assert_eq!(store.stat(&d).await.unwrap(), None);
    store.put(&d, data.clone()).await.unwrap();
    // Idempotent: content addressing makes a second put a no-op.
    store.put(&d, data.clone()).await.unwrap();
    assert_eq!(store.stat(&d).await.unwrap(), Some(data.len() as u64));
    assert_eq!(collect(store.get(&d, None).await.unwrap()).await, data);
    store.delete(&d).await.unwrap();
    assert_eq!(store.stat(&d).await.unwrap(), None);
    store.delete(&d).await.unwrap();
}

pub async fn ranged_reads(store: &dyn BlobStore) {
    let data: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
    let d = Digest::sha256(&data);
    store.put(&d, Bytes::from(data.clone())).await.unwrap();
    for r in [0..1, 0..(1 << 20), 1000..70_000, (1 << 20) - 1..(1 << 20)] {
        let got = collect(store.get(&d, Some(r.clone())).await.unwrap()).await;
        assert_eq!(got, &data[r.start as usize..r.end as usize], "range {r:?}");
    }
    store.delete(&d).await.unwrap();
}

pub async fn upload_lifecycle(store: &dyn BlobStore) {
    let id = upload_id(1);
    store.upload_create(&id).await.unwrap();
    assert_eq!(store.upload_size(&id).await.unwrap(), Some(0));
    assert_eq!(store.upload_append(&id, chunks(&[b"abc", b"def"])).await.unwrap(), 6);
    assert_eq!(store.upload_append(&id, chunks(&[b"ghi"])).await.unwrap(), 9);
    assert_eq!(store.upload_size(&id).await.unwrap(), Some(9));
    assert_eq!(collect(store.upload_read(&id).await.unwrap()).await, b"abcdefghi");
    let d = Digest::sha256(b"abcdefghi");
    assert_eq!(store.upload_commit(&id, &d).await.unwrap(), 9);
    assert_eq!(store.upload_size(&id).await.unwrap(), None);
    assert_eq!(store.stat(&d).await.unwrap(), Some(9));
    assert_eq!(collect(store.get(&d, None).await.unwrap()).await, b"abcdefghi");

    // Committing the same content again (a concurrent push of the same layer)
    // keeps one blob with the same bytes.
    let id2 = upload_id(2);
    store.upload_create(&id2).await.unwrap();
    store.upload_append(&id2, chunks(&[b"abcdefghi"])).await.unwrap();
    assert_eq!(store.upload_commit(&id2, &d).await.unwrap(), 9);
    assert_eq!(store.upload_size(&id2).await.unwrap(), None);
    assert_eq!(collect(store.get(&d, None).await.unwrap()).await, b"abcdefghi");

    // A cancelled upload leaves nothing.
    let id3 = upload_id(3);
    store.upload_create(&id3).await.unwrap();
    store.upload_append(&id3, chunks(&[b"xyz"])).await.unwrap();
    store.upload_delete(&id3).await.unwrap();
    assert_eq!(store.upload_size(&id3).await.unwrap(), None);
    store.upload_delete(&id3).await.unwrap();
    store.delete(&d).await.unwrap();
}

/// The pull-through cache streams an upload to clients while it grows.
pub async fn upload_read_while_growing(store: &dyn BlobStore) {
    let id = upload_id(7);
    store.upload_create(&id).await.unwrap();
    store.upload_append(&id, chunks(&[b"abc", b"def"])).await.unwrap();
    assert_eq!(collect(store.upload_read_at(&id, 4).await.unwrap()).await, b"ef");
    assert_eq!(collect(store.upload_read_at(&id, 6).await.unwrap()).await, b"");
    store.upload_append(&id, chunks(&[b"ghi"])).await.unwrap();
    assert_eq!(collect(store.upload_read_at(&id, 5).await.unwrap()).await, b"fghi");
    assert_eq!(collect(store.upload_read_at(&id, 0).await.unwrap()).await, b"abcdefghi");
    store.upload_delete(&id).await.unwrap();
    assert!(matches!(
        store.upload_read_at(&id, 0).await,
        Err(StorageError::NotFound)
    ));
}

/// `n` bytes of a pattern that does not repeat on any power-of-two period,
/// so a chunk written twice, dropped or out of place changes the digest.
fn pattern(n: usize) -> Vec<u8> {
    (0..n as u64)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// A stream of `data` in chunks of `sizes`, cycled.
fn chunked(data: &[u8], sizes: &[usize]) -> ByteStream {
    let mut parts = Vec::new();
    let mut at = 0;
    for size in sizes.iter().cycle() {
        if at >= data.len() {
            break;
        }
        let end = (at + size).min(data.len());
        parts.push(Ok(Bytes::copy_from_slice(&data[at..end])));
        at = end;
    }
    Box::pin(stream::iter(parts))
}

pub async fn hashing_appends(store: &dyn BlobStore) {
    let id = upload_id(30);
    store.upload_create(&id).await.unwrap();
    let hasher = Algorithm::Sha256.hasher();
    let (n, hasher) = store
        .upload_append_hashing(&id, chunks(&[b"abc", b"", b"def"]), hasher)
        .await
        .unwrap();
    assert_eq!(n, 6);
    // The hasher saw the bytes appended, and goes on with the next append.
    let (n, hasher) = store
        .upload_append_hashing(&id, chunks(&[b"ghi"]), hasher)
        .await
        .unwrap();
    assert_eq!(n, 9);
    assert_eq!(hasher.finish(), Digest::sha256(b"abcdefghi"));
    // An empty append leaves the size and the hash alone.
    let (n, hasher) = store
        .upload_append_hashing(&id, chunks(&[]), Algorithm::Sha512.hasher())
        .await
        .unwrap();
    assert_eq!(n, 9);
    assert_eq!(hasher.finish(), Algorithm::Sha512.hasher().finish());
    assert_eq!(collect(store.upload_read(&id).await.unwrap()).await, b"abcdefghi");
    store.upload_delete(&id).await.unwrap();
}

/// Appends of several MiB in chunks of odd sizes, so a backend that batches
/// or pipelines its writes crosses its batch boundaries, with and without a
/// hasher; the bytes stored, the sizes and the hash must all agree.
pub async fn large_appends(store: &dyn BlobStore) {
    let data = pattern((5 << 20) + 12_345);
    let (a, b) = data.split_at((3 << 20) + 7);
    let id = upload_id(31);
    store.upload_create(&id).await.unwrap();
    let (n, hasher) = store
        .upload_append_hashing(
            &id,
            chunked(a, &[65_536, 1, 300_000, 4_097]),
            Algorithm::Sha256.hasher(),
        )
        .await
        .unwrap();
    assert_eq!(n, a.len() as u64);
    let (n, hasher) = store
        .upload_append_hashing(&id, chunked(b, &[2 << 20, 5]), hasher)
        .await
        .unwrap();
    assert_eq!(n, data.len() as u64);
    let d = Digest::sha256(&data);
    assert_eq!(hasher.finish(), d);
    assert_eq!(store.upload_append(&id, chunked(&[], &[1])).await.unwrap(), n);
    assert_eq!(collect(store.upload_read(&id).await.unwrap()).await, data);

    let id2 = upload_id(32);
    store.upload_create(&id2).await.unwrap();
    assert_eq!(
        store
            .upload_append(&id2, chunked(&data, &[8_192, 1_000_003]))
            .await
            .unwrap(),
        data.len() as u64
    );
    assert_eq!(collect(store.upload_read(&id2).await.unwrap()).await, data);
    assert_eq!(store.upload_commit(&id2, &d).await.unwrap(), data.len() as u64);
    assert_eq!(collect(store.get(&d, None).await.unwrap()).await, data);
    store.upload_delete(&id).await.unwrap();
    store.delete(&d).await.unwrap();
}

/// Appends and a commit larger than a backend's unit of writing (the S3
/// backend's 8 MiB parts): an append of several units, appends that end
/// mid-unit, reads from offsets inside and at the edges of appends, and a
/// commit of an upload of several appends, then the same content committed
/// again.
pub async fn many_part_uploads(store: &dyn BlobStore) {
    let data = pattern((17 << 20) + 3);
    let cuts = [0, (9 << 20) + 1, (9 << 20) + 2, data.len()];
    let id = upload_id(33);
    store.upload_create(&id).await.unwrap();
    for w in cuts.windows(2) {
        let n = store
            .upload_append(&id, chunked(&data[w[0]..w[1]], &[1 << 20, 65_537, 3]))
            .await
            .unwrap();
        assert_eq!(n, w[1] as u64);
    }
    assert_eq!(store.upload_size(&id).await.unwrap(), Some(data.len() as u64));
    for at in [
        0,
        1,
        (8 << 20) + 5,
        (9 << 20) + 1,
        (9 << 20) + 2,
        data.len() - 1,
        data.len(),
    ] {
        let got = collect(store.upload_read_at(&id, at as u64).await.unwrap()).await;
        assert!(got == data[at..], "upload read from {at}: {} bytes", got.len());
    }
    let d = Digest::sha256(&data);
    assert_eq!(store.upload_commit(&id, &d).await.unwrap(), data.len() as u64);
    assert_eq!(store.upload_size(&id).await.unwrap(), None);
    assert_eq!(store.stat(&d).await.unwrap(), Some(data.len() as u64));
    assert!(collect(store.get(&d, None).await.unwrap()).await == data);
    let r = (8 << 20) - 3..(9 << 20) + 7;
    let got = collect(store.get(&d, Some(r.start as u64..r.end as u64)).await.unwrap()).await;
    assert!(got == data[r], "range across a part boundary");

    // The same layer pushed again, in one append this time.
    let id2 = upload_id(34);
    store.upload_create(&id2).await.unwrap();
    store.upload_append(&id2, chunked(&data, &[3 << 20])).await.unwrap();
    assert_eq!(store.upload_commit(&id2, &d).await.unwrap(), data.len() as u64);
    assert_eq!(store.upload_size(&id2).await.unwrap(), None);
    assert!(collect(store.get(&d, None).await.unwrap()).await == data);
    store.delete(&d).await.unwrap();
}

/// Two handles on one storage (two berth nodes on one bucket, or on one
/// shared directory): an upload one started and appended to, the other
/// continues, reads back, and commits; each sees the other's blobs and
/// deletions. The upload's bytes all live in the store, so a node that saw
/// none of the appends reads and hashes them from there.
pub async fn shared_uploads(a: &dyn BlobStore, b: &dyn BlobStore) {
    let data = pattern((9 << 20) + 77);
    let (first, rest) = data.split_at((4 << 20) + 1);
    let id = upload_id(50);
    a.upload_create(&id).await.unwrap();
    assert_eq!(
        a.upload_append(&id, chunked(first, &[65_536])).await.unwrap(),
        first.len() as u64
    );
    assert_eq!(b.upload_size(&id).await.unwrap(), Some(first.len() as u64));
    assert_eq!(
        b.upload_append(&id, chunked(rest, &[1 << 20])).await.unwrap(),
        data.len() as u64
    );
    assert_eq!(a.upload_size(&id).await.unwrap(), Some(data.len() as u64));
    let mut hasher = Algorithm::Sha256.hasher();
    hasher.update(&collect(a.upload_read(&id).await.unwrap()).await);
    let d = hasher.finish();
    assert_eq!(d, Digest::sha256(&data));
    assert_eq!(a.upload_commit(&id, &d).await.unwrap(), data.len() as u64);
    assert_eq!(b.upload_size(&id).await.unwrap(), None);
    assert_eq!(b.stat(&d).await.unwrap(), Some(data.len() as u64));
    assert!(collect(b.get(&d, None).await.unwrap()).await == data);
    b.delete(&d).await.unwrap();
    assert_eq!(a.stat(&d).await.unwrap(), None);

    // A cancel through one handle is seen by the other.
    let id2 = upload_id(51);
    b.upload_create(&id2).await.unwrap();
    a.upload_append(&id2, chunks(&[b"abc"])).await.unwrap();
    b.upload_delete(&id2).await.unwrap();
    assert_eq!(a.upload_size(&id2).await.unwrap(), None);
    assert!(matches!(
        a.upload_append(&id2, chunks(&[b"x"])).await,
        Err(StorageError::NotFound)
    ));
}

/// A stream that fails (a client that went away) fails the append; what was
/// stored is a prefix of what was sent, and `upload_size` says how much;
/// an append after it goes on from there. Cuts inside a first small batch,
/// after a few MiB, and after more than one of the S3 backend's 8 MiB parts.
pub async fn failed_appends(store: &dyn BlobStore) {
    let data = pattern(10 << 20);
    for (n, cut) in [(40, 1000), (41, (2 << 20) + 3), (42, (9 << 20) + 5)] {
        let id = upload_id(n);
        store.upload_create(&id).await.unwrap();
        let parts: Vec<std::io::Result<Bytes>> = vec![
            Ok(Bytes::copy_from_slice(&data[..cut])),
            Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "client went away")),
            Ok(Bytes::copy_from_slice(&data[cut..])),
        ];
        let err = store
            .upload_append_hashing(&id, Box::pin(stream::iter(parts)), Algorithm::Sha256.hasher())
            .await;
        // The input failed, not the store: the caller must be able to tell.
        match err {
            Err(StorageError::Input(e)) => assert_eq!(e.kind(), std::io::ErrorKind::TimedOut),
            Err(other) => panic!("an append of a failed stream must fail with StorageError::Input, got {other:?}"),
            Ok((n, _)) => panic!("an append of a failed stream must fail, but it stored {n} bytes"),
        }
        let size = store.upload_size(&id).await.unwrap().unwrap() as usize;
        assert!(size <= cut, "{size} bytes stored of {cut} sent");
        assert!(collect(store.upload_read(&id).await.unwrap()).await == data[..size]);
        // The client resumes from what was stored.
        let n = store
            .upload_append(&id, chunked(&data[size..], &[1 << 20]))
            .await
            .unwrap();
        assert_eq!(n, data.len() as u64);
        assert!(collect(store.upload_read(&id).await.unwrap()).await == data);
        store.upload_delete(&id).await.unwrap();
    }
}

pub async fn missing_things(store: &dyn BlobStore) {
    let d = Digest::sha256(b"never stored");
    assert!(matches!(store.get(&d, None).await, Err(StorageError::NotFound)));
    let id = upload_id(9);
    assert_eq!(store.upload_size(&id).await.unwrap(), None);
    assert!(matches!(
        store.upload_append(&id, chunks(&[b"x"])).await,
        Err(StorageError::NotFound)
    ));
    assert!(matches!(
        store
            .upload_append_hashing(&id, chunked(&pattern(3 << 20), &[65_536]), Algorithm::Sha256.hasher())
            .await,
        Err(StorageError::NotFound)
    ));
    assert!(matches!(store.upload_read(&id).await, Err(StorageError::NotFound)));
    assert!(matches!(
        store.upload_commit(&id, &d).await,
        Err(StorageError::NotFound)
    ));
}

pub async fn listing(store: &dyn BlobStore) {
    let before = crate::list_all(store).await.unwrap();
    let (a, b) = (Bytes::from_static(b"list-a"), Bytes::from_static(b"list-bb"));
    let (da, db) = (Digest::sha256(&a), Digest::sha256(&b));
    store.put(&da, a).await.unwrap();
    store.put(&db, b).await.unwrap();
    // An upload in progress is not a blob.
    let id = upload_id(20);
    store.upload_create(&id).await.unwrap();
    let mut got = crate::list_all(store).await.unwrap();
    got.retain(|x| !before.contains(x));
    got.sort();
    let mut want = vec![(da.clone(), 6), (db.clone(), 7)];
    want.sort();
    assert_eq!(got, want);
    store.delete(&da).await.unwrap();
    store.delete(&db).await.unwrap();
    store.upload_delete(&id).await.unwrap();
    let mut after = crate::list_all(store).await.unwrap();
    let mut before = before;
    after.sort();
    before.sort();
    assert_eq!(after, before);
}

/// Pages follow the digests' order, start after the one given, and never
/// repeat or skip a blob, across algorithms and directories.
pub async fn listing_pages(store: &dyn BlobStore) {
    let before = crate::list_all(store).await.unwrap();
    let mut mine: Vec<Digest> = Vec::new();
    for i in 0..40u32 {
        let data = Bytes::from(format!("page-{i}"));
        let d = if i % 4 == 0 {
            let mut h = Algorithm::Sha512.hasher();
            h.update(&data);
            h.finish()
        } else {
            Digest::sha256(&data)
        };
        store.put(&d, data).await.unwrap();
        mine.push(d);
    }
    let mut all: Vec<(Digest, u64)> = Vec::new();
    loop {
        let page = store.list_page(all.last().map(|(d, _)| d), 7).await.unwrap();
        assert!(page.len() <= 7);
        let n = page.len();
        all.extend(page);
        if n < 7 {
            break;
        }
    }
    let texts: Vec<String> = all.iter().map(|(d, _)| d.to_string()).collect();
    let mut sorted = texts.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(texts, sorted, "pages in digest order, none repeated");
    assert_eq!(all.len(), before.len() + mine.len());
    for d in &mine {
        assert!(all.iter().any(|(x, _)| x == d), "{d} listed");
    }
    // A page starts strictly after the digest given, even one not stored.
    let probe = Digest::sha256(b"not stored: somewhere in the middle");
    let page = store.list_page(Some(&probe), 1000).await.unwrap();
    assert!(page.iter().all(|(d, _)| d.as_str() > probe.as_str()));
    assert_eq!(store.list_page(None, 0).await.unwrap(), vec![]);
    for d in &mine {
        store.delete(d).await.unwrap();
    }
}

pub async fn disk_usage(store: &dyn BlobStore) {
    // A backend may not know; if it does, the numbers must be coherent.
    if let Some(u) = store.disk_usage().await.unwrap() {
        assert!(u.total > 0 && u.available <= u.total, "{u:?}");
        let p = u.used_percent();
        assert!((0.0..=100.0).contains(&p), "{p}");
    }
}
