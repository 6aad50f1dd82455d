//! GC against a real fs blob store and redb metadata store: what goes, what
//! stays, the grace window, dry runs, untagged manifests, abandoned uploads;
//! a model-based property test of the decision; and pushes, deletes and GC
//! runs at once.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use metadata::{MetadataStore, RedbMetadata};
use oci::{Digest, Reference, RepoName, Tag};
use storage::{BlobStore, FsBlobStore};

use super::{GcOptions, GcReport};
use crate::{Registry, RegistryConfig};

mod concurrency;
mod model;

pub(crate) struct Env {
    pub reg: Arc<Registry>,
    pub blobs: Arc<FsBlobStore>,
    pub meta: Arc<RedbMetadata>,
    _dir: tempfile::TempDir,
}

impl Env {
    /// The data directory, to damage it on purpose.
    pub fn root(&self) -> &std::path::Path {
        self._dir.path()
    }
}

pub(crate) async fn env() -> Env {
    env_with(RegistryConfig::default()).await
}

pub(crate) async fn env_with(config: RegistryConfig) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let blobs = Arc::new(FsBlobStore::open(dir.path()).await.unwrap());
    let meta = Arc::new(RedbMetadata::open(&dir.path().join("meta.redb")).unwrap());
    let reg = Arc::new(Registry::new(blobs.clone(), meta.clone(), config));
    Env {
        reg,
        blobs,
        meta,
        _dir: dir,
    }
}

pub(crate) fn repo(s: &str) -> RepoName {
    s.parse().unwrap()
}

pub(crate) fn tag(s: &str) -> Tag {
    s.parse().unwrap()
}

/// Options for tests: no grace, no pauses, tiny batches (so batching runs).
pub(crate) fn now_opts() -> GcOptions {
    GcOptions {
        grace: Duration::ZERO,
        upload_ttl: Duration::from_secs(3600),
        untagged_projects: vec![],
        dry_run: false,
        batch: 2,
        pause: Duration::ZERO,
        duty: 1.0,
    }
}

pub(crate) async fn upload(reg: &Registry, r: &RepoName, data: &[u8]) -> Digest {
    let d = Digest::sha256(data);
    let id = reg.upload_start(r, None, oci::Algorithm::Sha256).await.unwrap();
    let body: storage::ByteStream = Box::pin(futures_util::stream::iter(vec![Ok(Bytes::copy_from_slice(data))]));
    reg.upload_finish(r, &id, None, None, &d, Some(body)).await.unwrap();
    d
}

/// An OCI image manifest for `config` and `layers` (already uploaded).
pub(crate) fn manifest(config: &[u8], layers: &[&[u8]]) -> Bytes {
    let desc = |mt: &str, b: &[u8]| serde_json::json!({"mediaType": mt, "digest": Digest::sha256(b).to_string(), "size": b.len()});
    let layers: Vec<_> = layers
        .iter()
        .map(|l| desc("application/vnd.oci.image.layer.v1.tar", l))
        .collect();
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::media::OCI_MANIFEST,
        "config": desc("application/vnd.oci.image.config.v1+json", config),
        "layers": layers,
    });
    Bytes::from(serde_json::to_vec(&m).unwrap())
}

/// Uploads the blobs and puts the manifest, by tag or by digest.
pub(crate) async fn push(reg: &Registry, r: &RepoName, config: &[u8], layers: &[&[u8]], t: Option<&str>) -> Digest {
    upload(reg, r, config).await;
    for l in layers {
        upload(reg, r, l).await;
    }
    let body = manifest(config, layers);
    let reference = match t {
        Some(t) => Reference::Tag(tag(t)),
        None => Reference::Digest(Digest::sha256(&body)),
    };
    reg.manifest_put(r, &reference, Some(oci::media::OCI_MANIFEST), body, vec![])
        .await
        .unwrap()
        .digest
}

/// Pulls manifest `m` of `r` and every blob it references, verifying every
/// digest. Returns what failed, if anything.
pub(crate) async fn pull(reg: &Registry, r: &RepoName, m: &Digest) -> Result<(), String> {
    let body = reg
        .manifest_get(r, &Reference::Digest(m.clone()), true)
        .await
        .map_err(|e| format!("manifest {m} of {r}: {e}"))?;
    let bytes = body.bytes.unwrap_or_default();
    if !m.verify(&bytes) {
        return Err(format!("manifest {m} of {r}: wrong bytes"));
    }
    let parsed = oci::Manifest::parse(&bytes, Some(&body.media_type)).map_err(|e| e.to_string())?;
    for d in parsed.required_blobs() {
        let open = reg
            .blob_open(r, &d.digest)
            .await
            .map_err(|e| format!("blob {} of {r}: {e}", d.digest))?;
        let mut s = open.read(None).await.map_err(|e| format!("blob {}: {e}", d.digest))?;
        let mut h = d.digest.algorithm().hasher();
        while let Some(c) = s.next().await {
            h.update(&c.map_err(|e| e.to_string())?);
        }
        if h.finish() != d.digest {
            return Err(format!("blob {} of {r}: wrong bytes", d.digest));
        }
    }
    Ok(())
}

pub(crate) async fn stored(blobs: &FsBlobStore) -> BTreeSet<Digest> {
    storage::list_all(blobs)
        .await
        .unwrap()
        .into_iter()
        .map(|(d, _)| d)
        .collect()
}

#[tokio::test]
async fn deleted_images_and_loose_layers_go_shared_layers_stay() {
    let e = env().await;
    let (a, b) = (repo("p/a"), repo("p/b"));
    let m1 = push(&e.reg, &a, b"cfg1", &[b"shared", b"only-1"], Some("v1")).await;
    let m2 = push(&e.reg, &b, b"cfg2", &[b"shared"], Some("v1")).await;
    let loose = upload(&e.reg, &a, b"loose layer").await;
    e.reg.manifest_delete(&a, &Reference::Digest(m1.clone())).await.unwrap();

    let report = e.reg.gc(&now_opts()).await.unwrap();
    // cfg1, only-1, the manifest's own bytes, the loose layer.
    assert_eq!(report.blobs, 4, "{report}");
    let freed = 4 + 6 + manifest(b"cfg1", &[b"shared", b"only-1"]).len() as u64 + 11;
    assert_eq!(report.blob_bytes, freed);
    assert_eq!(report.links, 3, "cfg1, only-1 and the loose layer were linked into p/a");
    pull(&e.reg, &b, &m2).await.unwrap();
    // The shared layer keeps its link in p/a too: links of a live blob stay.
    assert!(e.reg.blob_size(&a, &Digest::sha256(b"shared")).await.is_ok());
    assert!(e.reg.blob_size(&a, &loose).await.is_err());
    let want: BTreeSet<Digest> = [m2, Digest::sha256(b"cfg2"), Digest::sha256(b"shared")].into();
    assert_eq!(stored(&e.blobs).await, want);
    // A second run finds nothing.
    assert_eq!(e.reg.gc(&now_opts()).await.unwrap().objects_freed(), 0);
}

#[tokio::test]
async fn nothing_within_the_grace_window_is_collected() {
    let e = env().await;
    let a = repo("p/a");
    let m = push(&e.reg, &a, b"cfg", &[b"layer"], Some("v1")).await;
    upload(&e.reg, &a, b"pushed, manifest not yet").await;
    e.reg.manifest_delete(&a, &Reference::Digest(m)).await.unwrap();
    let before = stored(&e.blobs).await;
    let graced = GcOptions {
        grace: Duration::from_secs(3600),
        ..now_opts()
    };
    assert_eq!(e.reg.gc(&graced).await.unwrap(), GcReport::default());
    assert_eq!(stored(&e.blobs).await, before);
    // Without the window, the config, the layer, the manifest's bytes and
    // the loose layer go.
    let report = e.reg.gc(&now_opts()).await.unwrap();
    assert_eq!(report.blobs, 4);
    assert!(stored(&e.blobs).await.is_empty());
}

/// Sleeps until the wall clock is `frac` of the way into a second.
async fn until_offset(frac: f64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let into = now.subsec_nanos() as f64 / 1e9;
    let wait = (frac - into).rem_euclid(1.0);
    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
}

#[tokio::test]
async fn the_grace_window_is_never_short_whatever_the_offset_in_the_second() {
    let e = env().await;
    let a = repo("p/a");
    let graced = GcOptions {
        grace: Duration::from_secs(1),
        ..now_opts()
    };
    // A loose blob uploaded at each offset, and GC run 0.9 s later (within
    // the 1 s grace): it stays (the earlier ones, older than the grace by
    // then, may go). Whole seconds used to let it go.
    for (i, offset) in [0.05, 0.5, 0.9].into_iter().enumerate() {
        until_offset(offset).await;
        let d = upload(&e.reg, &a, format!("loose {i}").as_bytes()).await;
        tokio::time::sleep(Duration::from_millis(900)).await;
        e.reg.gc(&graced).await.unwrap();
        assert!(
            stored(&e.blobs).await.contains(&d),
            "uploaded at +{offset} s, collected 0.9 s later"
        );
    }
    // The window is not stretched for ever: 2 s after the last upload
    // (a second of storage granularity) everything goes.
    tokio::time::sleep(Duration::from_millis(1150)).await;
    assert!(e.reg.gc(&graced).await.unwrap().blobs >= 1);
    assert!(stored(&e.blobs).await.is_empty());
}

#[tokio::test]
async fn a_mount_restarts_the_grace_window() {
    let e = env().await;
    let (a, b) = (repo("p/a"), repo("p/b"));
    let d = upload(&e.reg, &a, b"layer").await;
    // Even with no grace at all, a link made after the snapshot would win;
    // here the mount comes first, and a 1 h grace keeps the blob.
    assert_eq!(e.reg.mount(&b, &d, Some(&a)).await.unwrap(), Some(5));
    let graced = GcOptions {
        grace: Duration::from_secs(3600),
        ..now_opts()
    };
    assert_eq!(e.reg.gc(&graced).await.unwrap().blobs, 0);
    assert!(e.reg.blob_size(&b, &d).await.is_ok());
}

#[tokio::test]
async fn dry_run_reports_and_removes_nothing() {
    let e = env().await;
    let a = repo("q/a");
    push(&e.reg, &a, b"cfg", &[b"layer"], None).await;
    upload(&e.reg, &a, b"loose").await;
    let before = stored(&e.blobs).await;
    let dry = GcOptions {
        dry_run: true,
        untagged_projects: vec!["q".into()],
        ..now_opts()
    };
    let planned = e.reg.gc(&dry).await.unwrap();
    assert!(planned.dry_run);
    assert_eq!((planned.manifests, planned.blobs), (1, 4), "{planned}");
    assert_eq!(stored(&e.blobs).await, before);
    let real = e.reg.gc(&GcOptions { dry_run: false, ..dry }).await.unwrap();
    assert_eq!(
        (real.manifests, real.blobs, real.blob_bytes),
        (1, 4, planned.blob_bytes)
    );
}

#[tokio::test]
async fn untagged_manifests_go_only_where_asked_and_referrers_keep_them() {
    let e = env().await;
    let (kept, pruned) = (repo("keep/app"), repo("prune/app"));
    let k = push(&e.reg, &kept, b"cfg-k", &[b"l"], None).await;
    let tagged = push(&e.reg, &pruned, b"cfg-t", &[b"l"], Some("v1")).await;
    let untagged = push(&e.reg, &pruned, b"cfg-u", &[b"l"], None).await;
    // An untagged image with a signature attached: both stay.
    let signed = push(&e.reg, &pruned, b"cfg-s", &[b"l"], None).await;
    upload(&e.reg, &pruned, b"sig-cfg").await;
    let body = manifest(b"cfg-s", &[b"l"]);
    let sig: serde_json::Value = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::media::OCI_MANIFEST,
        "artifactType": "application/x-signature",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": Digest::sha256(b"sig-cfg").to_string(), "size": 7},
        "layers": [],
        "subject": {"mediaType": oci::media::OCI_MANIFEST, "digest": signed.to_string(), "size": body.len()},
    });
    let sig = Bytes::from(serde_json::to_vec(&sig).unwrap());
    let sig_d = Digest::sha256(&sig);
    e.reg
        .manifest_put(
            &pruned,
            &Reference::Digest(sig_d.clone()),
            Some(oci::media::OCI_MANIFEST),
            sig,
            vec![],
        )
        .await
        .unwrap();

    let opts = GcOptions {
        untagged_projects: vec!["prune".into()],
        ..now_opts()
    };
    let report = e.reg.gc(&opts).await.unwrap();
    assert_eq!(report.manifests, 1, "{report}");
    assert_eq!(report.blobs, 2, "the untagged manifest's bytes and its config");
    for (r, m) in [(&kept, &k), (&pruned, &tagged), (&pruned, &signed), (&pruned, &sig_d)] {
        pull(&e.reg, r, m).await.unwrap();
    }
    assert!(pull(&e.reg, &pruned, &untagged).await.is_err());
}

#[tokio::test]
async fn abandoned_uploads_go_live_ones_stay() {
    let e = env().await;
    let a = repo("p/a");
    let id = e.reg.upload_start(&a, None, oci::Algorithm::Sha256).await.unwrap();
    let chunk: storage::ByteStream = Box::pin(futures_util::stream::iter(vec![Ok(Bytes::from_static(b"12345"))]));
    e.reg.upload_append(&a, &id, None, None, chunk).await.unwrap();
    // Started just now: an hour's time to live keeps it.
    assert_eq!(e.reg.gc(&now_opts()).await.unwrap().uploads, 0);
    assert_eq!(e.reg.upload_status(&a, &id, None).await.unwrap().size, 5);
    let expire_now = GcOptions {
        upload_ttl: Duration::ZERO,
        ..now_opts()
    };
    let report = e.reg.gc(&expire_now).await.unwrap();
    assert_eq!((report.uploads, report.upload_bytes), (1, 5));
    assert!(e.reg.upload_status(&a, &id, None).await.is_err());
    assert!(e.meta.get_upload(&id).await.unwrap().is_none());
}

#[tokio::test]
async fn orphan_files_go() {
    let e = env().await;
    // Bytes with no record: a commit that crashed before its metadata.
    let d = Digest::sha256(b"orphan");
    e.blobs.put(&d, Bytes::from_static(b"orphan")).await.unwrap();
    let report = e.reg.gc(&now_opts()).await.unwrap();
    assert_eq!((report.blobs, report.blob_bytes, report.links), (1, 6, 0));
    assert!(stored(&e.blobs).await.is_empty());
}

/// A collector that died between its sweep and deleting the bytes leaves
/// the digest claimed: a push of it is refused (it could be recorded just
/// before the bytes go) until the next run finishes the deletion.
#[tokio::test]
async fn claims_a_dead_run_left_refuse_pushes_until_the_next_run() {
    let e = env().await;
    let r = repo("p/claimed");
    let d = upload(&e.reg, &r, b"claimed").await;
    let snap = e.meta.gc_snapshot().await.unwrap();
    let guard = metadata::SweepGuard {
        seq: snap.seq,
        cutoff: u64::MAX,
    };
    // The dead run: its sweep committed, its deletion never happened.
    assert_eq!(
        e.meta.sweep_blobs(std::slice::from_ref(&d), guard).await.unwrap().len(),
        1
    );
    let id = e.reg.upload_start(&r, None, oci::Algorithm::Sha256).await.unwrap();
    let body: storage::ByteStream = Box::pin(futures_util::stream::iter(vec![Ok(Bytes::from_static(b"claimed"))]));
    let err = e
        .reg
        .upload_finish(&r, &id, None, None, &d, Some(body))
        .await
        .unwrap_err();
    assert_eq!(err.code, oci::ErrorCode::Unavailable, "{err:?}");
    assert!(err.message.contains("push it again"), "{}", err.message);
    assert_eq!(e.meta.linked_blob(&r, &d).await.unwrap(), None);
    // The next run deletes the bytes and releases the claim; then a push works.
    e.reg.gc(&now_opts()).await.unwrap();
    assert!(stored(&e.blobs).await.is_empty());
    assert_eq!(upload(&e.reg, &r, b"claimed").await, d);
    assert_eq!(e.meta.linked_blob(&r, &d).await.unwrap(), Some(7));
}
