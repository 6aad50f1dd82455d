//! Pushes of images sharing layers, deletes and GC runs at once, each loop
//! bounded by a count. GC runs back to back with a one-second grace window
//! (touch times have one-second resolution, so that is the shortest real
//! window): a push slower than that may be refused because GC took a layer
//! between its upload and the manifest, or a layer upload or the manifest
//! put may get `503` because GC was deleting that very digest as it was
//! written; the client pushes again. Every
//! acknowledged and not deleted image must pull completely afterwards, and
//! after a last run the store must hold nothing more.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oci::{Digest, ErrorCode, Reference, RepoName};

use super::{env, manifest, now_opts, pull, repo, stored, tag};
use crate::gc::GcOptions;
use crate::Registry;

const PUSHERS: usize = 4;
const ROUNDS: usize = 12;
const ATTEMPTS: usize = 8;

fn layer(n: usize) -> Vec<u8> {
    // 64 KiB, distinct per n.
    (0..64 * 1024).map(|i| (i as u8) ^ (n as u8).wrapping_mul(31)).collect()
}

/// Pushes an image, as a client would: upload the blobs, put the manifest,
/// and start over if the manifest is refused because a blob went missing.
async fn push_until_acknowledged(reg: &Registry, r: &RepoName, cfg: &[u8], layers: &[Vec<u8>], t: &str) -> Digest {
    let refs: Vec<&[u8]> = layers.iter().map(Vec::as_slice).collect();
    for _ in 0..ATTEMPTS {
        if !(upload_or_retry(reg, r, cfg).await && all(reg, r, &refs).await) {
            continue;
        }
        let body = manifest(cfg, &refs);
        match reg
            .manifest_put(r, &Reference::Tag(tag(t)), Some(oci::media::OCI_MANIFEST), body, vec![])
            .await
        {
            Ok(put) => return put.digest,
            // A layer went missing, or GC was removing one of them (or
            // the manifest's own bytes) as the put recorded it: `503`,
            // nothing stored, and the client pushes again.
            Err(e) if matches!(e.code, ErrorCode::ManifestBlobUnknown | ErrorCode::Unavailable) => continue,
            Err(e) => panic!("push of {r}:{t} failed: {e}"),
        }
    }
    panic!("push of {r}:{t} was refused {ATTEMPTS} times in a row");
}

/// Uploads every layer; false if one must be pushed again.
async fn all(reg: &Registry, r: &RepoName, layers: &[&[u8]]) -> bool {
    for l in layers {
        if !upload_or_retry(reg, r, l).await {
            return false;
        }
    }
    true
}

/// Uploads a blob; false when the registry answers `503` because GC took
/// the digest as it was written (the client pushes it again).
async fn upload_or_retry(reg: &Registry, r: &RepoName, data: &[u8]) -> bool {
    let d = Digest::sha256(data);
    let id = reg.upload_start(r, None, oci::Algorithm::Sha256).await.unwrap();
    let body: storage::ByteStream = Box::pin(futures_util::stream::iter(vec![Ok(bytes::Bytes::copy_from_slice(
        data,
    ))]));
    match reg.upload_finish(r, &id, None, None, &d, Some(body)).await {
        Ok(_) => true,
        Err(e) if e.code == ErrorCode::Unavailable => false,
        Err(e) => panic!("upload of {d} to {r} failed: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushes_deletes_and_gc_at_once_lose_nothing_acknowledged() {
    let e = env().await;
    let pool: Arc<Vec<Vec<u8>>> = Arc::new((0..6).map(layer).collect());
    let live: Arc<Mutex<BTreeSet<(String, Digest)>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));

    let mut pushers = Vec::new();
    for p in 0..PUSHERS {
        let (reg, pool, live) = (e.reg.clone(), pool.clone(), live.clone());
        pushers.push(tokio::spawn(async move {
            let r = repo(&format!("c/r{p}"));
            let mut mine = Vec::new();
            for i in 0..ROUNDS {
                let layers = vec![
                    pool[(p + i) % pool.len()].clone(),
                    pool[(p * 3 + i * 5) % pool.len()].clone(),
                ];
                let cfg = format!("config {p} {i}").into_bytes();
                let m = push_until_acknowledged(&reg, &r, &cfg, &layers, &format!("t{i}")).await;
                live.lock().unwrap().insert((r.to_string(), m.clone()));
                mine.push(m);
                if i % 3 == 2 {
                    let gone = mine.remove(0);
                    // Remove from the expectations first: once the delete
                    // starts, the image may be gone.
                    live.lock().unwrap().remove(&(r.to_string(), gone.clone()));
                    reg.manifest_delete(&r, &Reference::Digest(gone)).await.unwrap();
                }
            }
        }));
    }
    let gc = {
        let (reg, done) = (e.reg.clone(), done.clone());
        tokio::spawn(async move {
            let mut runs = 0;
            let opts = GcOptions {
                grace: Duration::from_secs(1),
                pause: Duration::from_millis(1),
                ..now_opts()
            };
            while !done.load(Ordering::SeqCst) && runs < 2000 {
                reg.gc(&opts).await.unwrap();
                runs += 1;
            }
            runs
        })
    };
    for p in pushers {
        p.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let runs = gc.await.unwrap();
    assert!(runs > 0);

    e.reg.gc(&now_opts()).await.unwrap();
    let live = live.lock().unwrap().clone();
    assert_eq!(live.len(), PUSHERS * (ROUNDS - ROUNDS / 3));
    let mut referenced = BTreeSet::new();
    for (r, m) in &live {
        pull(&e.reg, &repo(r), m).await.unwrap();
        referenced.insert(m.clone());
    }
    // Nothing unreferenced is left: every stored object is a live manifest
    // or one of its blobs.
    let snap = e.meta.as_ref();
    for (r, m) in &live {
        let rec = metadata::MetadataStore::get_manifest(snap, &repo(r), m)
            .await
            .unwrap()
            .unwrap();
        referenced.extend(rec.blobs.iter().map(|d| d.parse::<Digest>().unwrap()));
    }
    assert_eq!(stored(&e.blobs).await, referenced);
    let fsck = e.reg.fsck(false, &|_, _| {}).await.unwrap();
    assert!(fsck.findings.is_empty(), "{:?}", fsck.findings);
    assert_eq!(fsck.blobs_checked, referenced.len() as u64);
}
