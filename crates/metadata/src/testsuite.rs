//! The shared test suite every `MetadataStore` backend must pass. Backends
//! call `run_all` from their own tests with a fresh, empty store.

use oci::{Digest, RepoName, Tag, UploadId};

use crate::{
    DeadLetter, ManifestRecord, ManifestSweep, MetaError, MetadataStore, NewManifest, SweepGuard, UploadRecord,
};

fn repo(s: &str) -> RepoName {
    s.parse().expect("valid repo")
}

fn tag(s: &str) -> Tag {
    s.parse().expect("valid tag")
}

fn record(blobs: &[&Digest], subject: Option<&Digest>) -> ManifestRecord {
    ManifestRecord {
        media_type: oci::media::OCI_MANIFEST.into(),
        size: 100,
        artifact_type: subject.map(|_| "application/x-sig".to_string()),
        subject: subject.map(|d| d.to_string()),
        annotations: None,
        blobs: blobs.iter().map(|d| d.to_string()).collect(),
        children: vec![],
        created: 1,
        cached_from: None,
    }
}

fn new_manifest(digest: &Digest, blobs: &[&Digest], tags: &[&str], subject: Option<&Digest>) -> NewManifest {
    NewManifest {
        digest: digest.clone(),
        record: record(blobs, subject),
        required_blobs: blobs.iter().map(|d| (*d).clone()).collect(),
        required_manifests: vec![],
        tags: tags.iter().map(|t| tag(t)).collect(),
    }
}

pub async fn run_all(store: &dyn MetadataStore) {
    blobs_and_links(store).await;
    manifests_tags_and_repos(store).await;
    manifest_requires_linked_blobs(store).await;
    referrers_index(store).await;
    pagination(store).await;
    uploads(store).await;
    stats(store).await;
    outbox(store).await;
    gc_sweeps(store).await;
    project_usage(store).await;
    pulls(store).await;
}

pub async fn blobs_and_links(store: &dyn MetadataStore) {
    let (a, b) = (repo("links/a"), repo("links/b"));
    let d = Digest::sha256(b"blob-1");
    assert_eq!(store.blob_size(&d).await.unwrap(), None);
    assert!(matches!(
        store.link_blob(&a, &d).await,
        Err(MetaError::BlobNotStored(_))
    ));
    store.add_blob(&a, &d, 6).await.unwrap();
    store.add_blob(&a, &d, 6).await.unwrap();
    assert_eq!(store.blob_size(&d).await.unwrap(), Some(6));
    assert_eq!(store.linked_blob(&a, &d).await.unwrap(), Some(6));
    // Another repository cannot read it until it is linked (mounted).
    assert_eq!(store.linked_blob(&b, &d).await.unwrap(), None);
    store.link_blob(&b, &d).await.unwrap();
    assert_eq!(store.linked_blob(&b, &d).await.unwrap(), Some(6));
    assert!(store.unlink_blob(&b, &d).await.unwrap());
    assert!(!store.unlink_blob(&b, &d).await.unwrap());
    assert_eq!(store.linked_blob(&b, &d).await.unwrap(), None);
    assert_eq!(store.linked_blob(&a, &d).await.unwrap(), Some(6));
}

pub async fn manifests_tags_and_repos(store: &dyn MetadataStore) {
    let r = repo("mt/app");
    let layer = Digest::sha256(b"mt-layer");
    store.add_blob(&r, &layer, 8).await.unwrap();
    let m1 = Digest::sha256(b"mt-m1");
    let m2 = Digest::sha256(b"mt-m2");
    assert!(!store.repo_exists(&r).await.unwrap());
    store
        .put_manifest(&r, new_manifest(&m1, &[&layer], &["v1", "latest"], None))
        .await
        .unwrap();
    assert!(store.repo_exists(&r).await.unwrap());
    assert_eq!(store.resolve_tag(&r, &tag("v1")).await.unwrap(), Some(m1.clone()));
    assert_eq!(
        store.get_manifest(&r, &m1).await.unwrap(),
        Some(record(&[&layer], None))
    );
    let full = record(&[&layer], None);
    assert_eq!(
        store.manifest_head(&r, &m1).await.unwrap(),
        Some(crate::ManifestHead {
            media_type: full.media_type,
            size: full.size
        })
    );
    // Moving a tag.
    store
        .put_manifest(&r, new_manifest(&m2, &[&layer], &["latest"], None))
        .await
        .unwrap();
    assert_eq!(store.resolve_tag(&r, &tag("latest")).await.unwrap(), Some(m2.clone()));
    assert_eq!(store.list_tags(&r, None, 100).await.unwrap(), vec!["latest", "v1"]);
    // Deleting a tag leaves the manifest.
    assert!(store.delete_tag(&r, &tag("v1")).await.unwrap());
    assert!(!store.delete_tag(&r, &tag("v1")).await.unwrap());
    assert!(store.get_manifest(&r, &m1).await.unwrap().is_some());
    // Deleting a manifest removes the tags that point at it.
    assert!(store.delete_manifest(&r, &m2).await.unwrap());
    assert!(!store.delete_manifest(&r, &m2).await.unwrap());
    assert_eq!(store.resolve_tag(&r, &tag("latest")).await.unwrap(), None);
    assert!(store.repo_exists(&r).await.unwrap());
    assert!(store.delete_manifest(&r, &m1).await.unwrap());
    assert!(!store.repo_exists(&r).await.unwrap());
    assert!(store.list_tags(&r, None, 100).await.unwrap().is_empty());
}

pub async fn manifest_requires_linked_blobs(store: &dyn MetadataStore) {
    let (r, other) = (repo("req/app"), repo("req/other"));
    let layer = Digest::sha256(b"req-layer");
    let m = Digest::sha256(b"req-m");
    // The blob exists, but only in another repository.
    store.add_blob(&other, &layer, 9).await.unwrap();
    let err = store.put_manifest(&r, new_manifest(&m, &[&layer], &["v1"], None)).await;
    assert!(matches!(err, Err(MetaError::MissingReference(d)) if d == layer));
    // Nothing partial: no manifest, no tag, no repository.
    assert_eq!(store.get_manifest(&r, &m).await.unwrap(), None);
    assert_eq!(store.resolve_tag(&r, &tag("v1")).await.unwrap(), None);
    assert!(!store.repo_exists(&r).await.unwrap());
    // An index requires its children in the same repository.
    let idx = Digest::sha256(b"req-index");
    let mut nm = new_manifest(&idx, &[], &[], None);
    nm.required_manifests = vec![m.clone()];
    assert!(matches!(
        store.put_manifest(&r, nm).await,
        Err(MetaError::MissingReference(_))
    ));
}

pub async fn referrers_index(store: &dyn MetadataStore) {
    let r = repo("ref/app");
    let cfg = Digest::sha256(b"ref-cfg");
    store.add_blob(&r, &cfg, 2).await.unwrap();
    let subject = Digest::sha256(b"ref-subject");
    store
        .put_manifest(&r, new_manifest(&subject, &[&cfg], &["v1"], None))
        .await
        .unwrap();
    let sig = Digest::sha256(b"ref-sig");
    let sbom = Digest::sha256(b"ref-sbom");
    store
        .put_manifest(&r, new_manifest(&sig, &[&cfg], &[], Some(&subject)))
        .await
        .unwrap();
    store
        .put_manifest(&r, new_manifest(&sbom, &[&cfg], &[], Some(&subject)))
        .await
        .unwrap();
    let mut got: Vec<Digest> = store
        .referrers(&r, &subject)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.digest)
        .collect();
    got.sort();
    let mut want = vec![sig.clone(), sbom.clone()];
    want.sort();
    assert_eq!(got, want);
    assert!(store.referrers(&repo("ref/other"), &subject).await.unwrap().is_empty());
    store.delete_manifest(&r, &sig).await.unwrap();
    let got: Vec<Digest> = store
        .referrers(&r, &subject)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.digest)
        .collect();
    assert_eq!(got, vec![sbom]);
}

pub async fn pagination(store: &dyn MetadataStore) {
    let cfg = Digest::sha256(b"page-cfg");
    for name in ["page/c", "page/a", "page/b"] {
        let r = repo(name);
        store.add_blob(&r, &cfg, 2).await.unwrap();
        let m = Digest::sha256(name.as_bytes());
        store
            .put_manifest(&r, new_manifest(&m, &[&cfg], &["t3", "t1", "t2"], None))
            .await
            .unwrap();
    }
    let all: Vec<String> = store.list_repos(None, 10_000).await.unwrap();
    let page: Vec<&String> = all.iter().filter(|r| r.starts_with("page/")).collect();
    assert_eq!(page, vec!["page/a", "page/b", "page/c"]);
    assert!(all.windows(2).all(|w| w[0] < w[1]), "catalog is sorted");
    assert_eq!(store.list_repos(Some("page/a"), 1).await.unwrap(), vec!["page/b"]);
    let r = repo("page/b");
    assert_eq!(store.list_tags(&r, None, 2).await.unwrap(), vec!["t1", "t2"]);
    assert_eq!(store.list_tags(&r, Some("t2"), 2).await.unwrap(), vec!["t3"]);
    assert!(store.list_tags(&r, Some("t3"), 2).await.unwrap().is_empty());
    assert!(store.list_tags(&r, None, 0).await.unwrap().is_empty());
}

pub async fn uploads(store: &dyn MetadataStore) {
    let id: UploadId = "0b7f6f1e-upload".parse().unwrap();
    assert_eq!(store.get_upload(&id).await.unwrap(), None);
    let rec = UploadRecord {
        repo: "up/app".into(),
        owner: Some("alice".into()),
        created: 42,
    };
    store.put_upload(&id, &rec).await.unwrap();
    assert_eq!(store.get_upload(&id).await.unwrap(), Some(rec));
    store.delete_upload(&id).await.unwrap();
    assert_eq!(store.get_upload(&id).await.unwrap(), None);
}

pub async fn stats(store: &dyn MetadataStore) {
    let before = store.stats().await.unwrap();
    let r = repo("stats/app");
    let (a, b) = (Digest::sha256(b"stats-a"), Digest::sha256(b"stats-b"));
    store.add_blob(&r, &a, 10).await.unwrap();
    store.add_blob(&r, &b, 32).await.unwrap();
    // Linking the same blob elsewhere stores nothing new.
    store.link_blob(&repo("stats/other"), &a).await.unwrap();
    let m = Digest::sha256(b"stats-m");
    store
        .put_manifest(&r, new_manifest(&m, &[&a, &b], &["v1", "v2"], None))
        .await
        .unwrap();
    let id: UploadId = "stats-upload".parse().unwrap();
    let rec = UploadRecord {
        repo: "stats/app".into(),
        owner: None,
        created: 1,
    };
    store.put_upload(&id, &rec).await.unwrap();
    let after = store.stats().await.unwrap();
    assert_eq!(after.blobs - before.blobs, 2);
    assert_eq!(after.blob_bytes - before.blob_bytes, 42);
    assert_eq!(after.repositories - before.repositories, 1);
    assert_eq!(after.manifests - before.manifests, 1);
    assert_eq!(after.tags - before.tags, 2);
    assert_eq!(after.uploads - before.uploads, 1);
    store.delete_upload(&id).await.unwrap();
    assert_eq!(store.stats().await.unwrap().uploads, before.uploads);
}

pub async fn outbox(store: &dyn MetadataStore) {
    let base = store.outbox_last_seq().await.unwrap();
    assert_eq!(store.outbox_append(vec![]).await.unwrap(), base);
    let last = store
        .outbox_append(vec![b"e1".to_vec(), b"e2".to_vec(), b"e3".to_vec()])
        .await
        .unwrap();
    assert_eq!(last, base + 3);
    assert_eq!(store.outbox_last_seq().await.unwrap(), last);
    // Read in order, in pages.
    let page = store.outbox_read(base, 2).await.unwrap();
    assert_eq!(
        page.iter().map(|e| (e.seq, e.payload.as_slice())).collect::<Vec<_>>(),
        vec![(base + 1, b"e1".as_slice()), (base + 2, b"e2".as_slice())]
    );
    let rest = store.outbox_read(base + 2, 10).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].payload, b"e3");
    // Cursors are per endpoint, start at 0, and never move back.
    assert_eq!(store.outbox_cursor("hook-a").await.unwrap(), 0);
    store.outbox_advance("hook-a", base + 2, None).await.unwrap();
    store.outbox_advance("hook-a", base + 1, None).await.unwrap();
    assert_eq!(store.outbox_cursor("hook-a").await.unwrap(), base + 2);
    assert_eq!(store.outbox_cursor("hook-b").await.unwrap(), 0);
    // A dead letter is recorded with the cursor move.
    let dead = DeadLetter {
        endpoint: "hook-a".into(),
        seq: base + 3,
        payload: "e3".into(),
        attempts: 5,
        error: "HTTP 500".into(),
        time: 7,
    };
    store
        .outbox_advance("hook-a", base + 3, Some(dead.clone()))
        .await
        .unwrap();
    assert_eq!(store.outbox_cursor("hook-a").await.unwrap(), base + 3);
    assert_eq!(store.dead_letters("hook-a").await.unwrap(), vec![dead]);
    assert!(store.dead_letters("hook-b").await.unwrap().is_empty());
    // Pruning removes events up to a sequence number; numbers are not reused.
    assert_eq!(store.outbox_prune(base + 2).await.unwrap(), 2);
    assert_eq!(store.outbox_read(base, 10).await.unwrap().len(), 1);
    assert_eq!(store.outbox_prune(last).await.unwrap(), 1);
    assert!(store.outbox_read(0, 10).await.unwrap().is_empty());
    assert_eq!(store.outbox_append(vec![b"e4".to_vec()]).await.unwrap(), last + 1);
    assert_eq!(store.outbox_read(last, 10).await.unwrap()[0].seq, last + 1);
    store.outbox_prune(last + 1).await.unwrap();
}

/// A guard that allows anything the snapshot saw, whatever its age.
fn guard_at(seq: u64) -> SweepGuard {
    SweepGuard { seq, cutoff: u64::MAX }
}

pub async fn gc_sweeps(store: &dyn MetadataStore) {
    let r = repo("gc/app");
    let (kept, loose) = (Digest::sha256(b"gc-kept"), Digest::sha256(b"gc-loose"));
    store.add_blob(&r, &kept, 7).await.unwrap();
    store.add_blob(&r, &loose, 8).await.unwrap();
    store.link_blob(&repo("gc/other"), &loose).await.unwrap();
    let m = Digest::sha256(b"gc-m");
    store
        .put_manifest(&r, new_manifest(&m, &[&kept], &["v1"], None))
        .await
        .unwrap();
    let snap = store.gc_snapshot().await.unwrap();
    assert!(snap.blobs.contains(&(loose.clone(), 8)));
    assert!(snap.links.contains(&("gc/other".to_string(), loose.clone())));
    assert!(snap.tags.contains(&("gc/app".to_string(), "v1".to_string(), m.clone())));
    assert!(snap.manifests.iter().any(|x| x.repo == "gc/app" && x.digest == m));
    let touched = |d: &Digest| snap.touched.iter().find(|(x, _)| x == d).map(|(_, t)| *t);
    let (t_loose, t_m) = (touched(&loose).unwrap(), touched(&m).unwrap());
    assert!(t_loose.seq < t_m.seq, "the manifest put touched after the blob commits");
    assert!(t_m.seq <= snap.seq);

    // Within the grace window nothing goes.
    let young = SweepGuard {
        seq: snap.seq,
        cutoff: t_loose.time.saturating_sub(1),
    };
    assert!(store
        .sweep_blobs(std::slice::from_ref(&loose), young)
        .await
        .unwrap()
        .is_empty());
    // A link made after the snapshot wins against the sweep.
    store.link_blob(&repo("gc/third"), &loose).await.unwrap();
    assert!(store
        .sweep_blobs(std::slice::from_ref(&loose), guard_at(snap.seq))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.blob_size(&loose).await.unwrap(), Some(8));
    // With a fresh snapshot it goes, with every link, in one transaction.
    let snap = store.gc_snapshot().await.unwrap();
    let swept = store
        .sweep_blobs(std::slice::from_ref(&loose), guard_at(snap.seq))
        .await
        .unwrap();
    assert_eq!(swept.len(), 1);
    assert_eq!((swept[0].size, swept[0].links), (Some(8), 3));
    assert_eq!(store.blob_size(&loose).await.unwrap(), None);
    assert_eq!(store.linked_blob(&repo("gc/other"), &loose).await.unwrap(), None);
    assert!(matches!(
        store.link_blob(&r, &loose).await,
        Err(MetaError::BlobNotStored(_))
    ));
    // A digest with no blob record (an orphan file) is reported without a size.
    let orphan = Digest::sha256(b"gc-orphan");
    let swept = store
        .sweep_blobs(std::slice::from_ref(&orphan), guard_at(snap.seq))
        .await
        .unwrap();
    assert_eq!(swept[0].size, None);

    // Untagged manifests: a tagged one stays; a subject or a child stays.
    let sweep = |d: &Digest| ManifestSweep {
        repo: r.clone(),
        digest: d.clone(),
    };
    assert_eq!(
        store.sweep_manifest(&sweep(&m), guard_at(snap.seq)).await.unwrap(),
        None
    );
    let sig = Digest::sha256(b"gc-sig");
    store
        .put_manifest(&r, new_manifest(&sig, &[&kept], &[], Some(&m)))
        .await
        .unwrap();
    store.delete_tag(&r, &tag("v1")).await.unwrap();
    let snap = store.gc_snapshot().await.unwrap();
    assert_eq!(
        store.sweep_manifest(&sweep(&m), guard_at(snap.seq)).await.unwrap(),
        None
    );
    let idx = Digest::sha256(b"gc-index");
    let mut nm = new_manifest(&idx, &[], &[], None);
    nm.required_manifests = vec![sig.clone()];
    nm.record.children = vec![sig.to_string()];
    store.put_manifest(&r, nm).await.unwrap();
    // Touched after this guard's snapshot: refused.
    assert_eq!(
        store.sweep_manifest(&sweep(&idx), guard_at(snap.seq)).await.unwrap(),
        None
    );
    let snap = store.gc_snapshot().await.unwrap();
    assert_eq!(
        store.sweep_manifest(&sweep(&sig), guard_at(snap.seq)).await.unwrap(),
        None,
        "a child stays"
    );
    // One batch, one transaction, in order: the index goes, which frees its
    // child (and the signature's referrers entry), which frees its subject.
    let batch = [sweep(&idx), sweep(&sig), sweep(&m), sweep(&m)];
    assert_eq!(
        store.sweep_manifests(&batch, guard_at(snap.seq)).await.unwrap(),
        vec![Some(100), Some(100), Some(100), None],
        "the last is already gone"
    );
    assert_eq!(store.get_manifest(&r, &idx).await.unwrap(), None);
    assert!(store.referrers(&r, &m).await.unwrap().is_empty());
    assert!(!store.repo_exists(&r).await.unwrap());
}

pub async fn project_usage(store: &dyn MetadataStore) {
    let (a, b, other) = (repo("quota/a"), repo("quota/b"), repo("quota-x/a"));
    let (shared, own) = (Digest::sha256(b"q-shared"), Digest::sha256(b"q-own"));
    assert_eq!(store.project_usage("quota").await.unwrap(), 0);
    store.add_blob(&a, &shared, 1000).await.unwrap();
    store.add_blob(&b, &own, 10).await.unwrap();
    store.link_blob(&b, &shared).await.unwrap();
    // A neighbour whose name sorts between `quota` and `quota/`.
    store.link_blob(&other, &shared).await.unwrap();
    let m = Digest::sha256(b"q-m");
    store
        .put_manifest(&a, new_manifest(&m, &[&shared], &["v1"], None))
        .await
        .unwrap();
    // The shared blob once, the own blob, the manifest (record size 100).
    assert_eq!(store.project_usage("quota").await.unwrap(), 1000 + 10 + 100);
    assert_eq!(store.project_usage("quota-x").await.unwrap(), 1000);
    assert!(store.project_holds("quota", &own).await.unwrap());
    assert!(store.project_holds("quota", &m).await.unwrap());
    assert!(!store.project_holds("quota-x", &own).await.unwrap());
}

pub async fn pulls(store: &dyn MetadataStore) {
    let p = |r: &str, t: &str, time: u64| (r.to_string(), t.to_string(), time);
    store
        .record_pulls(&[p("pull/a", "v1", 100), p("pull/a", "v2", 50)])
        .await
        .unwrap();
    // An older time does not replace a newer one.
    store
        .record_pulls(&[p("pull/a", "v1", 90), p("pull/a", "v2", 60)])
        .await
        .unwrap();
    let snap = store.gc_snapshot().await.unwrap();
    let mut got: Vec<_> = snap.pulls.into_iter().filter(|(r, _, _)| r == "pull/a").collect();
    got.sort();
    assert_eq!(got, vec![p("pull/a", "v1", 100), p("pull/a", "v2", 60)]);
}
