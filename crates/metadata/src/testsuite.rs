//! The shared test suite every `MetadataStore` backend must pass. Backends
//! call `run_all` from their own tests with a fresh, empty store.

use oci::{Digest, RepoName, Tag, UploadId};

use std::time::Duration;

use crate::{
    Admission, Conflict, DeadLetter, Lease, ManifestRecord, ManifestSweep, MetaError, MetadataStore, Missing,
    NewManifest, SweepGuard, UploadRecord,
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
        fixed_tags: vec![],
        admission: FREE,
        events: vec![],
    }
}

/// No quota, no fence.
const FREE: Admission = Admission {
    quota: None,
    fence: None,
};

pub async fn run_all(store: &dyn MetadataStore) {
    blobs_and_links(store).await;
    manifests_tags_and_repos(store).await;
    manifest_requires_linked_blobs(store).await;
    referrers_index(store).await;
    pagination(store).await;
    uploads(store).await;
    leases(store).await;
    stats(store).await;
    outbox(store).await;
    gc_sweeps(store).await;
    project_usage(store).await;
    quota_is_checked_in_the_write(store).await;
    fixed_tags_have_one_winner(store).await;
    delete_refuses_tags_it_was_not_told(store).await;
    gc_claims_fence_writers(store).await;
    changes_append_their_events(store).await;
    pulls(store).await;
}

pub async fn blobs_and_links(store: &dyn MetadataStore) {
    let (a, b) = (repo("links/a"), repo("links/b"));
    let d = Digest::sha256(b"blob-1");
    assert_eq!(store.blob_size(&d).await.unwrap(), None);
    assert!(matches!(
        store.link_blob(&a, &d, FREE, vec![]).await,
        Err(MetaError::NotFound(Missing::Blob(_)))
    ));
    store.add_blob(&a, &d, 6, FREE).await.unwrap();
    store.add_blob(&a, &d, 6, FREE).await.unwrap();
    assert_eq!(store.blob_size(&d).await.unwrap(), Some(6));
    assert_eq!(store.linked_blob(&a, &d).await.unwrap(), Some(6));
    // Another repository cannot read it until it is linked (mounted).
    assert_eq!(store.linked_blob(&b, &d).await.unwrap(), None);
    store.link_blob(&b, &d, FREE, vec![]).await.unwrap();
    assert_eq!(store.linked_blob(&b, &d).await.unwrap(), Some(6));
    assert!(store.unlink_blob(&b, &d, vec![]).await.unwrap());
    assert!(!store.unlink_blob(&b, &d, vec![]).await.unwrap());
    assert_eq!(store.linked_blob(&b, &d).await.unwrap(), None);
    assert_eq!(store.linked_blob(&a, &d).await.unwrap(), Some(6));
}

pub async fn manifests_tags_and_repos(store: &dyn MetadataStore) {
    let r = repo("mt/app");
    let layer = Digest::sha256(b"mt-layer");
    store.add_blob(&r, &layer, 8, FREE).await.unwrap();
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
    assert!(store.delete_tag(&r, &tag("v1"), vec![]).await.unwrap());
    assert!(!store.delete_tag(&r, &tag("v1"), vec![]).await.unwrap());
    assert!(store.get_manifest(&r, &m1).await.unwrap().is_some());
    // Deleting a manifest removes the tags that point at it.
    assert!(store.delete_manifest(&r, &m2, None, vec![]).await.unwrap());
    assert!(!store.delete_manifest(&r, &m2, None, vec![]).await.unwrap());
    assert_eq!(store.resolve_tag(&r, &tag("latest")).await.unwrap(), None);
    assert!(store.repo_exists(&r).await.unwrap());
    assert!(store.delete_manifest(&r, &m1, None, vec![]).await.unwrap());
    assert!(!store.repo_exists(&r).await.unwrap());
    assert!(store.list_tags(&r, None, 100).await.unwrap().is_empty());
}

pub async fn manifest_requires_linked_blobs(store: &dyn MetadataStore) {
    let (r, other) = (repo("req/app"), repo("req/other"));
    let layer = Digest::sha256(b"req-layer");
    let m = Digest::sha256(b"req-m");
    // The blob exists, but only in another repository.
    store.add_blob(&other, &layer, 9, FREE).await.unwrap();
    let err = store.put_manifest(&r, new_manifest(&m, &[&layer], &["v1"], None)).await;
    assert!(matches!(err, Err(MetaError::NotFound(Missing::Reference(d))) if d == layer));
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
        Err(MetaError::NotFound(Missing::Reference(_)))
    ));
}

pub async fn referrers_index(store: &dyn MetadataStore) {
    let r = repo("ref/app");
    let cfg = Digest::sha256(b"ref-cfg");
    store.add_blob(&r, &cfg, 2, FREE).await.unwrap();
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
    store.delete_manifest(&r, &sig, None, vec![]).await.unwrap();
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
        store.add_blob(&r, &cfg, 2, FREE).await.unwrap();
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
        algorithm: Some("sha512".into()),
    };
    store.put_upload(&id, &rec).await.unwrap();
    assert_eq!(store.get_upload(&id).await.unwrap(), Some(rec));
    store.delete_upload(&id).await.unwrap();
    assert_eq!(store.get_upload(&id).await.unwrap(), None);
}

/// Leases exclude other holders until released or expired; a store that is
/// not shared grants every one (there is no other node), and keeps no
/// upload hash state.
pub async fn leases(store: &dyn MetadataStore) {
    let long = Duration::from_secs(60);
    assert_eq!(store.take_lease("gc", "a", long).await.unwrap(), Lease::Held);
    assert_eq!(store.take_lease("gc", "a", long).await.unwrap(), Lease::Held, "renewed");
    if store.shared() {
        let busy = Lease::Busy { holder: "a".into() };
        assert_eq!(store.take_lease("gc", "b", long).await.unwrap(), busy);
        // Only the holder releases.
        store.release_lease("gc", "b").await.unwrap();
        assert_eq!(store.take_lease("gc", "b", long).await.unwrap(), busy);
        // Another name is another lease.
        assert_eq!(store.take_lease("other", "b", long).await.unwrap(), Lease::Held);
    }
    store.release_lease("gc", "a").await.unwrap();
    assert_eq!(store.take_lease("gc", "b", long).await.unwrap(), Lease::Held);
    store.release_lease("gc", "b").await.unwrap();
    // A lease its holder stopped renewing (it died) goes to the next asker.
    assert_eq!(
        store.take_lease("short", "a", Duration::from_millis(1)).await.unwrap(),
        Lease::Held
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(store.take_lease("short", "b", long).await.unwrap(), Lease::Held);

    let id: UploadId = "0b7f6f1e-leased".parse().unwrap();
    assert_eq!(store.lease_upload(&id, "a", long).await.unwrap(), None);
    let rec = UploadRecord {
        repo: "up/app".into(),
        owner: None,
        created: 42,
        algorithm: None,
    };
    store.put_upload(&id, &rec).await.unwrap();
    let leased = store.lease_upload(&id, "a", long).await.unwrap().expect("leased");
    assert_eq!((leased.record, leased.hash_state), (rec.clone(), None));
    if store.shared() {
        let busy = store.lease_upload(&id, "b", long).await.unwrap_err();
        assert!(
            matches!(busy, MetaError::Conflict(Conflict::UploadBusy(ref i)) if *i == id),
            "{busy:?}"
        );
        assert!(!store.release_upload(&id, "b", Some(b"not b's")).await.unwrap());
        assert!(store.release_upload(&id, "a", Some(b"state 1")).await.unwrap());
        let next = store.lease_upload(&id, "b", long).await.unwrap().expect("free again");
        assert_eq!(next.hash_state.as_deref(), Some(&b"state 1"[..]));
        // Released without a state: the saved one stays for the next.
        assert!(store.release_upload(&id, "b", None).await.unwrap());
        let again = store.lease_upload(&id, "a", Duration::from_millis(1)).await.unwrap();
        assert_eq!(again.and_then(|l| l.hash_state).as_deref(), Some(&b"state 1"[..]));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(store.lease_upload(&id, "b", long).await.unwrap().is_some(), "expired");
    } else {
        assert!(store.release_upload(&id, "a", Some(b"state")).await.unwrap());
    }
    store.delete_upload(&id).await.unwrap();
    assert_eq!(store.lease_upload(&id, "a", long).await.unwrap(), None);
}

pub async fn stats(store: &dyn MetadataStore) {
    let before = store.stats().await.unwrap();
    let r = repo("stats/app");
    let (a, b) = (Digest::sha256(b"stats-a"), Digest::sha256(b"stats-b"));
    store.add_blob(&r, &a, 10, FREE).await.unwrap();
    store.add_blob(&r, &b, 32, FREE).await.unwrap();
    // Linking the same blob elsewhere stores nothing new.
    store.link_blob(&repo("stats/other"), &a, FREE, vec![]).await.unwrap();
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
        algorithm: None,
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
    store.add_blob(&r, &kept, 7, FREE).await.unwrap();
    store.add_blob(&r, &loose, 8, FREE).await.unwrap();
    store.link_blob(&repo("gc/other"), &loose, FREE, vec![]).await.unwrap();
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
    store.link_blob(&repo("gc/third"), &loose, FREE, vec![]).await.unwrap();
    assert!(store
        .sweep_blobs(std::slice::from_ref(&loose), guard_at(snap.seq))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.blob_size(&loose).await.unwrap(), Some(8));
    // An unlinked repository is not counted again; the others all go.
    let fourth = repo("gc/fourth");
    store.link_blob(&fourth, &loose, FREE, vec![]).await.unwrap();
    assert!(store.unlink_blob(&fourth, &loose, vec![]).await.unwrap());
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
    assert_eq!(store.linked_blob(&repo("gc/third"), &loose).await.unwrap(), None);
    // A blob committed again later starts with only its new link.
    store.add_blob(&fourth, &loose, 8, FREE).await.unwrap();
    let snap = store.gc_snapshot().await.unwrap();
    assert!(!snap.links.contains(&("gc/other".to_string(), loose.clone())));
    let swept = store
        .sweep_blobs(std::slice::from_ref(&loose), guard_at(snap.seq))
        .await
        .unwrap();
    assert_eq!(swept[0].links, 1);
    assert!(matches!(
        store.link_blob(&r, &loose, FREE, vec![]).await,
        Err(MetaError::NotFound(Missing::Blob(_)))
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
    store.delete_tag(&r, &tag("v1"), vec![]).await.unwrap();
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
    store.add_blob(&a, &shared, 1000, FREE).await.unwrap();
    store.add_blob(&b, &own, 10, FREE).await.unwrap();
    store.link_blob(&b, &shared, FREE, vec![]).await.unwrap();
    // A neighbour whose name sorts between `quota` and `quota/`.
    store.link_blob(&other, &shared, FREE, vec![]).await.unwrap();
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

/// Four writers at once, each of 400 new bytes, under a quota of 1,000: two
/// are admitted whichever order the store runs them in, never three.
pub async fn quota_is_checked_in_the_write(store: &dyn MetadataStore) {
    let r = repo("qtx/app");
    let quota = Admission {
        quota: Some(1_000),
        fence: None,
    };
    let d: Vec<Digest> = (0..4).map(|i| Digest::sha256(format!("qtx-{i}").as_bytes())).collect();
    let other = repo("qtx/other");
    let (a, b, c, e) = tokio::join!(
        store.add_blob(&r, &d[0], 400, quota),
        store.add_blob(&r, &d[1], 400, quota),
        store.add_blob(&other, &d[2], 400, quota),
        store.add_blob(&r, &d[3], 400, quota),
    );
    let results = [a, b, c, e];
    let admitted = results.iter().filter(|x| x.is_ok()).count();
    assert_eq!(admitted, 2, "{results:?}");
    for x in results.iter().filter(|x| x.is_err()) {
        assert!(
            matches!(
                x,
                Err(MetaError::Conflict(Conflict::OverQuota {
                    used: 800,
                    limit: 1_000,
                    size: 400
                }))
            ),
            "{x:?}"
        );
    }
    assert_eq!(store.project_usage("qtx").await.unwrap(), 800);
    // What the project holds is free to add again, and to link elsewhere in it.
    let held = d.iter().zip(&results).find(|(_, x)| x.is_ok()).unwrap().0;
    store.add_blob(&r, held, 400, quota).await.unwrap();
    store.link_blob(&repo("qtx/third"), held, quota, vec![]).await.unwrap();
    // A mount of a blob stored elsewhere counts too.
    let outside = Digest::sha256(b"qtx-outside");
    store.add_blob(&repo("free/x"), &outside, 300, FREE).await.unwrap();
    assert!(matches!(
        store.link_blob(&r, &outside, quota, vec![]).await,
        Err(MetaError::Conflict(Conflict::OverQuota { .. }))
    ));
    assert_eq!(store.linked_blob(&r, &outside).await.unwrap(), None);
    // A manifest's own bytes count.
    let m = Digest::sha256(b"qtx-m");
    let mut nm = new_manifest(&m, &[held], &["v1"], None);
    nm.record.size = 201;
    nm.admission = quota;
    assert!(matches!(
        store.put_manifest(&r, nm.clone()).await,
        Err(MetaError::Conflict(Conflict::OverQuota { size: 201, .. }))
    ));
    assert_eq!(store.get_manifest(&r, &m).await.unwrap(), None);
    assert_eq!(store.resolve_tag(&r, &tag("v1")).await.unwrap(), None);
    nm.record.size = 200;
    store.put_manifest(&r, nm).await.unwrap();
    assert_eq!(store.project_usage("qtx").await.unwrap(), 1_000);
}

/// Two puts of different manifests racing for one new fixed tag: one wins,
/// the other fails with a conflict and leaves nothing behind.
pub async fn fixed_tags_have_one_winner(store: &dyn MetadataStore) {
    let r = repo("fixed/app");
    let layer = Digest::sha256(b"fixed-layer");
    store.add_blob(&r, &layer, 5, FREE).await.unwrap();
    let (m1, m2) = (Digest::sha256(b"fixed-m1"), Digest::sha256(b"fixed-m2"));
    let fixed = |d: &Digest| {
        let mut nm = new_manifest(d, &[&layer], &["v1", "latest"], None);
        nm.fixed_tags = vec![tag("v1")];
        nm
    };
    let (a, b) = tokio::join!(store.put_manifest(&r, fixed(&m1)), store.put_manifest(&r, fixed(&m2)));
    let (winner, loser, err) = match (a, b) {
        (Ok(()), Err(e)) => (&m1, &m2, e),
        (Err(e), Ok(())) => (&m2, &m1, e),
        other => panic!("exactly one put must win: {other:?}"),
    };
    match err {
        MetaError::Conflict(Conflict::TagMoved { tag: t, current }) => {
            assert_eq!((t.as_str(), &current), ("v1", winner));
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(store.resolve_tag(&r, &tag("v1")).await.unwrap().as_ref(), Some(winner));
    // The loser's transaction moved nothing, not even its mutable tag.
    assert_eq!(
        store.resolve_tag(&r, &tag("latest")).await.unwrap().as_ref(),
        Some(winner)
    );
    assert_eq!(store.get_manifest(&r, loser).await.unwrap(), None);
    // Putting the same manifest under its fixed tag again is fine.
    store.put_manifest(&r, fixed(winner)).await.unwrap();
}

/// `delete_manifest` with the tags the caller checked refuses when another
/// tag came to point at the manifest meanwhile.
pub async fn delete_refuses_tags_it_was_not_told(store: &dyn MetadataStore) {
    let r = repo("deltags/app");
    let m = Digest::sha256(b"deltags-m");
    store
        .put_manifest(&r, new_manifest(&m, &[], &["a"], None))
        .await
        .unwrap();
    // Another writer tags it after the caller looked.
    store
        .put_manifest(&r, new_manifest(&m, &[], &["b"], None))
        .await
        .unwrap();
    assert!(matches!(
        store.delete_manifest(&r, &m, Some(&[tag("a")]), vec![]).await,
        Err(MetaError::Conflict(Conflict::TagAdded(t))) if t.as_str() == "b"
    ));
    assert!(store.get_manifest(&r, &m).await.unwrap().is_some());
    assert!(store
        .delete_manifest(&r, &m, Some(&[tag("a"), tag("b")]), vec![])
        .await
        .unwrap());
    assert_eq!(store.resolve_tag(&r, &tag("b")).await.unwrap(), None);
}

/// A sweep's claim fences writers of the digest: one that read the fence
/// before the claim, or while its bytes are being deleted, is refused; one
/// that read it after the release records.
pub async fn gc_claims_fence_writers(store: &dyn MetadataStore) {
    let r = repo("fence/app");
    let d = Digest::sha256(b"fence-blob");
    store.add_blob(&r, &d, 4, FREE).await.unwrap();
    let fenced = |fence: u64| Admission {
        quota: None,
        fence: Some(fence),
    };
    let before = store.byte_fence(&d).await.unwrap();
    let snap = store.gc_snapshot().await.unwrap();
    assert_eq!(
        store
            .sweep_blobs(std::slice::from_ref(&d), guard_at(snap.seq))
            .await
            .unwrap()
            .len(),
        1
    );
    let refused = |x: crate::Result<()>| matches!(x, Err(MetaError::Conflict(Conflict::Fenced(ref f))) if *f == d);
    // While the claim is not released, the digest has no fence to read; other
    // digests do, and it is past the claim.
    assert!(refused(store.byte_fence(&d).await.map(|_| ())));
    let during = store.byte_fence(&Digest::sha256(b"fence-other")).await.unwrap();
    assert!(during > before);
    assert!(refused(store.add_blob(&r, &d, 4, fenced(before)).await));
    assert!(refused(store.add_blob(&r, &d, 4, fenced(during)).await));
    let mut nm = new_manifest(&d, &[], &[], None);
    nm.admission = fenced(during);
    assert!(refused(store.put_manifest(&r, nm.clone()).await));
    assert_eq!(store.blob_size(&d).await.unwrap(), None);
    // A collector that died before releasing leaves the claim for the next.
    // (Earlier sweeps of the suite left theirs too.)
    let unreleased = store.unreleased_claims(0).await.unwrap();
    assert!(unreleased.contains(&d), "{unreleased:?}");
    store.release_claims(&unreleased).await.unwrap();
    assert!(store.unreleased_claims(0).await.unwrap().is_empty());
    // Bytes written before the deletion ended may be gone: still refused.
    assert!(refused(store.add_blob(&r, &d, 4, fenced(during)).await));
    let after = store.byte_fence(&d).await.unwrap();
    store.add_blob(&r, &d, 4, fenced(after)).await.unwrap();
    nm.admission = fenced(after);
    store.put_manifest(&r, nm).await.unwrap();
    assert_eq!(store.blob_size(&d).await.unwrap(), Some(4));
    // Released claims are forgotten once old enough.
    let e = Digest::sha256(b"fence-orphan");
    let snap = store.gc_snapshot().await.unwrap();
    store
        .sweep_blobs(std::slice::from_ref(&e), guard_at(snap.seq))
        .await
        .unwrap();
    store.release_claims(std::slice::from_ref(&e)).await.unwrap();
    assert!(store.unreleased_claims(u64::MAX).await.unwrap().is_empty());
    store.add_blob(&r, &e, 1, fenced(before)).await.unwrap();
}

/// A change appends its events in its own transaction: all of them when it
/// changes something, none when it does not or is refused.
pub async fn changes_append_their_events(store: &dyn MetadataStore) {
    let r = repo("outbox-tx/app");
    let ev = |s: &str| vec![s.as_bytes().to_vec()];
    let start = store.outbox_last_seq().await.unwrap();
    let layer = Digest::sha256(b"outbox-tx-layer");
    store.add_blob(&r, &layer, 3, FREE).await.unwrap();
    let m = Digest::sha256(b"outbox-tx-m");
    let mut nm = new_manifest(&m, &[&layer], &["v1"], None);
    nm.events = vec![b"push".to_vec(), b"tag".to_vec()];
    store.put_manifest(&r, nm.clone()).await.unwrap();
    store
        .link_blob(&repo("outbox-tx/b"), &layer, FREE, ev("mount"))
        .await
        .unwrap();
    assert!(store
        .unlink_blob(&repo("outbox-tx/b"), &layer, ev("unlink"))
        .await
        .unwrap());
    assert!(!store
        .unlink_blob(&repo("outbox-tx/b"), &layer, ev("no-unlink"))
        .await
        .unwrap());
    assert!(store.delete_tag(&r, &tag("v1"), ev("untag")).await.unwrap());
    assert!(!store.delete_tag(&r, &tag("v1"), ev("no-untag")).await.unwrap());
    // Refused: a missing blob, a fixed tag moved.
    let mut missing = new_manifest(&Digest::sha256(b"outbox-tx-x"), &[&Digest::sha256(b"nope")], &[], None);
    missing.events = ev("refused");
    assert!(store.put_manifest(&r, missing).await.is_err());
    let mut fixed = new_manifest(&Digest::sha256(b"outbox-tx-y"), &[&layer], &["v2"], None);
    fixed.fixed_tags = vec![tag("v2")];
    store.put_manifest(&r, fixed.clone()).await.unwrap();
    let mut moved = new_manifest(&m, &[&layer], &["v2"], None);
    moved.fixed_tags = vec![tag("v2")];
    moved.events = ev("moved");
    assert!(store.put_manifest(&r, moved).await.is_err());
    assert!(store.delete_manifest(&r, &m, None, ev("delete")).await.unwrap());
    assert!(!store.delete_manifest(&r, &m, None, ev("no-delete")).await.unwrap());
    let got: Vec<String> = store
        .outbox_read(start, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| String::from_utf8(e.payload).unwrap())
        .collect();
    assert_eq!(got, ["push", "tag", "mount", "unlink", "untag", "delete"]);
    assert_eq!(store.outbox_last_seq().await.unwrap(), start + 6);
}
