//! Embedded backend on redb: one file, ACID transactions, durable commits.
//!
//! redb is synchronous, so every call runs on the blocking pool. Writes are
//! serialized by redb's single writer; reads run concurrently on snapshots.

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use oci::{Descriptor, Digest, RepoName, Tag, UploadId};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::{
    Admission, Conflict, DeadLetter, Events, ManifestHead, ManifestRecord, MetaError, MetadataStore, NewManifest,
    OutboxEvent, Result, StoreStats, UploadRecord,
};

/// digest -> size of every committed blob.
pub(crate) const BLOBS: TableDefinition<&str, u64> = TableDefinition::new("blobs");
/// (repo, digest) -> size: which repository may read which blob.
pub(crate) const LINKS: TableDefinition<(&str, &str), u64> = TableDefinition::new("links");
/// (digest, repo) -> (): the links again, keyed by blob, so GC finds the
/// links of a blob it removes without scanning every repository's. Written
/// in the same transaction as `LINKS`, always.
pub(crate) const LINKS_BY_DIGEST: TableDefinition<(&str, &str), ()> = TableDefinition::new("links_by_digest");
/// (repo, digest) -> ManifestRecord as JSON.
pub(crate) const MANIFESTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("manifests");
/// (repo, tag) -> manifest digest.
pub(crate) const TAGS: TableDefinition<(&str, &str), &str> = TableDefinition::new("tags");
/// repo -> number of manifests; a repository exists while this is positive.
pub(crate) const REPOS: TableDefinition<&str, u64> = TableDefinition::new("repos");
/// (repo, subject digest, referrer digest) -> Descriptor as JSON.
pub(crate) const REFERRERS: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("referrers");
/// upload id -> UploadRecord as JSON.
pub(crate) const UPLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("uploads");
/// sequence number -> event payload: the durable event outbox.
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// endpoint name -> last sequence number it is done with.
const OUTBOX_CURSORS: TableDefinition<&str, u64> = TableDefinition::new("outbox_cursors");
/// (endpoint, sequence number) -> DeadLetter as JSON.
const DEAD_LETTERS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("dead_letters");
/// name -> counter. `outbox_last` is the last sequence number handed out; it
/// outlives pruning, so numbers are never reused.
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const OUTBOX_LAST: &str = "outbox_last";

pub struct RedbMetadata {
    db: Arc<Database>,
    /// Where transactions run; `None`: on the caller's runtime.
    runtime: Option<tokio::runtime::Handle>,
}

/// redb has no transient failures: every error of it is `Backend`.
pub(crate) fn be(e: impl std::error::Error + Send + Sync + 'static) -> MetaError {
    MetaError::Backend(Box::new(e))
}

impl RedbMetadata {
    /// Opens (creating if needed) the database file at `path`.
    pub fn open(path: &Path) -> Result<RedbMetadata> {
        let db = Database::create(path).map_err(be)?;
        // Create every table up front, so read transactions never meet a
        // missing table.
        let w = db.begin_write().map_err(be)?;
        {
            w.open_table(BLOBS).map_err(be)?;
            w.open_table(LINKS).map_err(be)?;
            w.open_table(LINKS_BY_DIGEST).map_err(be)?;
            w.open_table(MANIFESTS).map_err(be)?;
            w.open_table(TAGS).map_err(be)?;
            w.open_table(REPOS).map_err(be)?;
            w.open_table(REFERRERS).map_err(be)?;
            w.open_table(UPLOADS).map_err(be)?;
            w.open_table(OUTBOX).map_err(be)?;
            w.open_table(OUTBOX_CURSORS).map_err(be)?;
            w.open_table(DEAD_LETTERS).map_err(be)?;
            w.open_table(COUNTERS).map_err(be)?;
        }
        crate::redb_identity::create_tables(&w)?;
        crate::redb_gc::create_tables(&w)?;
        index_links_by_digest(&w)?;
        w.commit().map_err(be)?;
        Ok(RedbMetadata {
            db: Arc::new(db),
            runtime: None,
        })
    }

    /// Runs every transaction on `rt`'s blocking pool, whichever runtime
    /// the caller is on. `berth serve` passes its serving runtime: then
    /// background work on the low-priority maintenance runtime never holds
    /// the single writer (which pushes wait for) at idle priority.
    pub fn on_runtime(mut self, rt: tokio::runtime::Handle) -> RedbMetadata {
        self.runtime = Some(rt);
        self
    }

    /// A manifest's stored record, decoded as `T` (the whole record or a part).
    async fn manifest_as<T>(&self, repo: &RepoName, digest: &Digest) -> Result<Option<T>>
    where
        T: serde::de::DeserializeOwned + Send + 'static,
    {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.run(move |db| {
            let r = db.begin_read().map_err(be)?;
            let t = r.open_table(MANIFESTS).map_err(be)?;
            match t.get((repo.as_str(), digest.as_str())).map_err(be)? {
                Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(be)?)),
                None => Ok(None),
            }
        })
        .await
    }

    pub(crate) async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T> + Send + 'static,
    {
        let db = self.db.clone();
        let task = move || f(&db);
        match &self.runtime {
            Some(rt) => rt.spawn_blocking(task).await,
            None => tokio::task::spawn_blocking(task).await,
        }
        .map_err(be)?
    }
}

/// Builds `LINKS_BY_DIGEST` from `LINKS` in a database written before the
/// index existed (every write since keeps both).
fn index_links_by_digest(w: &redb::WriteTransaction) -> Result<()> {
    let links = w.open_table(LINKS).map_err(be)?;
    let mut index = w.open_table(LINKS_BY_DIGEST).map_err(be)?;
    if !index.is_empty().map_err(be)? || links.is_empty().map_err(be)? {
        return Ok(());
    }
    for item in links.iter().map_err(be)? {
        let (k, _) = item.map_err(be)?;
        let (repo, d) = k.value();
        index.insert((d, repo), ()).map_err(be)?;
    }
    Ok(())
}

/// Links `digest` (of `size` bytes) into `repo`, in both link tables.
fn insert_link(w: &redb::WriteTransaction, repo: &str, digest: &str, size: u64) -> Result<()> {
    w.open_table(LINKS)
        .map_err(be)?
        .insert((repo, digest), size)
        .map_err(be)?;
    w.open_table(LINKS_BY_DIGEST)
        .map_err(be)?
        .insert((digest, repo), ())
        .map_err(be)?;
    Ok(())
}

/// Removes the link of `digest` into `repo` from both link tables. Returns
/// whether there was one.
pub(crate) fn remove_link(w: &redb::WriteTransaction, repo: &str, digest: &str) -> Result<bool> {
    w.open_table(LINKS_BY_DIGEST)
        .map_err(be)?
        .remove((digest, repo))
        .map_err(be)?;
    Ok(w.open_table(LINKS)
        .map_err(be)?
        .remove((repo, digest))
        .map_err(be)?
        .is_some())
}

/// Checks `admission` for `size` bytes of `digest` in `repo`, inside the
/// write transaction that records them.
fn admit(w: &redb::WriteTransaction, repo: &RepoName, digest: &Digest, size: u64, admission: Admission) -> Result<()> {
    if let Some(fence) = admission.fence {
        crate::redb_gc::check_fence(w, digest, fence)?;
    }
    if let Some(limit) = admission.quota {
        crate::redb_gc::check_quota(w, repo.project(), digest, size, limit)?;
    }
    Ok(())
}

/// Appends `payloads` to the outbox in the caller's write transaction.
/// Returns the sequence number of the last one (the current last if none).
fn append_outbox(w: &redb::WriteTransaction, payloads: &[Vec<u8>]) -> Result<u64> {
    let mut counters = w.open_table(COUNTERS).map_err(be)?;
    let mut last = counters.get(OUTBOX_LAST).map_err(be)?.map(|v| v.value()).unwrap_or(0);
    if payloads.is_empty() {
        return Ok(last);
    }
    let mut outbox = w.open_table(OUTBOX).map_err(be)?;
    for p in payloads {
        last += 1;
        outbox.insert(last, p.as_slice()).map_err(be)?;
    }
    counters.insert(OUTBOX_LAST, last).map_err(be)?;
    Ok(last)
}

fn parse_digest(s: &str) -> Result<Digest> {
    s.parse().map_err(be)
}

/// Keys of a table keyed by (repo, x), for one repo, strictly after `last`.
fn second_keys_after<V: redb::Value + 'static>(
    t: &impl ReadableTable<(&'static str, &'static str), V>,
    repo: &str,
    last: Option<&str>,
    n: usize,
) -> Result<Vec<String>> {
    let start = match last {
        Some(l) => Bound::Excluded((repo, l)),
        None => Bound::Included((repo, "")),
    };
    let mut out = Vec::new();
    for item in t.range::<(&str, &str)>((start, Bound::Unbounded)).map_err(be)? {
        if out.len() >= n {
            break;
        }
        let (k, _) = item.map_err(be)?;
        let (r, x) = k.value();
        if r != repo {
            break;
        }
        out.push(x.to_string());
    }
    Ok(out)
}

#[async_trait]
impl MetadataStore for RedbMetadata {
    async fn add_blob(&self, repo: &RepoName, digest: &Digest, size: u64, admission: Admission) -> Result<()> {
        let (name, d) = (repo.clone(), digest.clone());
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.run(move |db| {
            let w = db.begin_write().map_err(be)?;
            {
                admit(&w, &name, &d, size, admission)?;
                w.open_table(BLOBS)
                    .map_err(be)?
                    .insert(digest.as_str(), size)
                    .map_err(be)?;
                insert_link(&w, &repo, &digest, size)?;
                crate::redb_gc::touch(&w, [digest.as_str()])?;
            }
            w.commit().map_err(be)
        })
        .await
    }

    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>> {
        let digest = digest.to_string();
        self.run(move |db| {
            let r = db.begin_read().map_err(be)?;
            let t = r.open_table(BLOBS).map_err(be)?;
            Ok(t.get(digest.as_str()).map_err(be)?.map(|v| v.value()))
        })
        .await
    }

    async fn link_blob(&self, repo: &RepoName, digest: &Digest, admission: Admission, events: Events) -> Result<()> {
        let (name, repo, d) = (repo.clone(), repo.to_string(), digest.clone());
        self.run(move |db| {
            let w = db.begin_write().map_err(be)?;
            {
                let size = w
                    .open_table(BLOBS)
                    .map_err(be)?
                    .get(d.as_str())
                    .map_err(be)?
                    .map(|v| v.value());
                let Some(size) = size else {
                    return Err(crate::Missing::Blob(d).into());
                };
                admit(&w, &name, &d, size, admission)?;
                insert_link(&w, &repo, d.as_str(), size)?;
                crate::redb_gc::touch(&w, [d.as_str()])?;
                append_outbox(&w, &events)?;
            }
            w.commit().map_err(be)
        })
        .await
    }

    async fn linked_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.run(move |db| {
            let r = db.begin_read().map_err(be)?;
            let t = r.open_table(LINKS).map_err(be)?;
            Ok(t.get((repo.as_str(), digest.as_str())).map_err(be)?.map(|v| v.value()))
        })
        .await
    }

    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest, events: Events) -> Result<bool> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.run(move |db| {
            let w = db.begin_write().map_err(be)?;
            let existed = remove_link(&w, &repo, &digest)?;
            if !existed {
                return Ok(false);
            }
            append_outbox(&w, &events)?;
            w.commit().map_err(be)?;
            Ok(existed)
        })
        .await
    }

    async fn put_manifest(&self, repo: &RepoName, m: NewManifest) -> Result<()> {
        let (name, repo) = (repo.clone(), repo.to_string());
        self.run(move |db| {
            let w = db.begin_write().map_err(be)?;
            {
                admit(&w, &name, &m.digest, m.record.size, m.admission)?;
                let links = w.open_table(LINKS).map_err(be)?;
                for b in &m.required_blobs {
                    if links.get((repo.as_str(), b.as_str())).map_err(be)?.is_none() {
                        return Err(crate::Missing::Reference(b.clone()).into());
                    }
                }
                let mut manifests = w.open_table(MANIFESTS).map_err(be)?;
                for c in &m.required_manifests {
                    if manifests.get((repo.as_str(), c.as_str())).map_err(be)?.is_none() {
                        return Err(crate::Missing::Reference(c.clone()).into());
                    }
                }
                let json = serde_json::to_vec(&m.record).map_err(be)?;
                let existed = manifests
                    .insert((repo.as_str(), m.digest.as_str()), json.as_slice())
                    .map_err(be)?
                    .is_some();
                if !existed {
                    let mut repos = w.open_table(REPOS).map_err(be)?;
                    let n = repos.get(repo.as_str()).map_err(be)?.map(|v| v.value()).unwrap_or(0);
                    repos.insert(repo.as_str(), n + 1).map_err(be)?;
                }
                let mut tags = w.open_table(TAGS).map_err(be)?;
                for t in &m.tags {
                    let old = tags
                        .insert((repo.as_str(), t.as_str()), m.digest.as_str())
                        .map_err(be)?
                        .map(|v| v.value().to_string());
                    if let Some(old) = old.filter(|o| *o != m.digest.as_str() && m.fixed_tags.contains(t)) {
                        return Err(Conflict::TagMoved {
                            tag: t.clone(),
                            current: parse_digest(&old)?,
                        }
                        .into());
                    }
                }
                if let Some(subject) = &m.record.subject {
                    let desc = Descriptor {
                        media_type: m.record.media_type.clone(),
                        digest: m.digest.clone(),
                        size: m.record.size,
                        artifact_type: m.record.artifact_type.clone(),
                        annotations: m.record.annotations.clone(),
                        platform: None,
                        urls: None,
                    };
                    let json = serde_json::to_vec(&desc).map_err(be)?;
                    w.open_table(REFERRERS)
                        .map_err(be)?
                        .insert((repo.as_str(), subject.as_str(), m.digest.as_str()), json.as_slice())
                        .map_err(be)?;
                }
                // The manifest's own bytes, its blobs and its children are
                // referenced from now on: a collector's earlier snapshot must
                // not remove them.
                let referenced = std::iter::once(m.digest.as_str())
                    .chain(m.record.blobs.iter().map(String::as_str))
                    .chain(m.record.children.iter().map(String::as_str));
                crate::redb_gc::touch(&w, referenced)?;
                append_outbox(&w, &m.events)?;
            }
            w.commit().map_err(be)
        })
        .await
    }

    async fn get_manifest(&self, repo: &RepoName, digest: &Digest) -> Result<Option<ManifestRecord>> {
        self.manifest_as(repo, digest).await
    }

    async fn manifest_head(&self, repo: &RepoName, digest: &Digest) -> Result<Option<ManifestHead>> {
        // The fields `ManifestHead` lacks are skipped by the parser, not copied.
        self.manifest_as(repo, digest).await
    }

    async fn resolve_tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>> {
        let (repo, tag) = (repo.to_string(), tag.to_string());
        self.run(move |db| {
            let r = db.begin_read().map_err(be)?;
            let t = r.open_table(TAGS).map_err(be)?;
            t.get((repo.as_str(), tag.as_str()))
                .map_err(be)?
                .map(|v| parse_digest(v.value()))
                .transpose()
        })
        .await
    }

    async fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        allowed_tags: Option<&[Tag]>,
        events: Events,
    ) -> Result<bool> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        let allowed: Option<Vec<String>> = allowed_tags.map(|ts| ts.iter().map(Tag::to_string).collect());
        self.run(move |db| {
            let w = db.begin_write().map_err(be)?;
            {
                let mut manifests = w.open_table(MANIFESTS).map_err(be)?;
                let Some(old) = manifests.remove((repo.as_str(), digest.as_str())).map_err(be)? else {
                    return Ok(false);
                };
                let record: ManifestRecord = serde_json::from_slice(old.value()).map_err(be)?;
                drop(old);
                let mut repos = w.open_table(REPOS).map_err(be)?;
                let n = repos.get(repo.as_str()).map_err(be)?.map(|v| v.value()).unwrap_or(1);
                if n <= 1 {
                    repos.remove(repo.as_str()).map_err(be)?;
                } else {
                    repos.insert(repo.as_str(), n - 1).map_err(be)?;
                }
                // Tags pointing at the manifest go with it.
                let mut tags = w.open_table(TAGS).map_err(be)?;
                let mut doomed = Vec::new();
                for item in tags.range((repo.as_str(), "")..).map_err(be)? {
                    let (k, v) = item.map_err(be)?;
                    let (r, t) = k.value();
                    if r != repo {
                        break;
                    }
                    if v.value() == digest {
                        if allowed.as_ref().is_some_and(|a| !a.iter().any(|x| x == t)) {
                            return Err(Conflict::TagAdded(t.parse().map_err(be)?).into());
                        }
                        doomed.push(t.to_string());
                    }
                }
                for t in doomed {
                    tags.remove((repo.as_str(), t.as_str())).map_err(be)?;
                }
                if let Some(subject) = record.subject {
                    w.open_table(REFERRERS)
                        .map_err(be)?
                        .remove((repo.as_str(), subject.as_str(), digest.as_str()))
                        .map_err(be)?;
                }
                append_outbox(&w, &events)?;
            }
            w.commit().map_err(be)?;
            Ok(true)
        })
        .await
    }

    async fn delete_tag(&self, repo: &RepoName, tag: &Tag, events: Events) -> Result<bool> {
        let (repo, tag) = (repo.to_string(), tag.to_string());
        self.run(move |db| {
            let w = db.begin_write().map_err(be)?;
            let existed = w
                .open_table(TAGS)
                .map_err(be)?
                .remove((repo.as_str(), tag.as_str()))
                .map_err(be)?
                .is_some();
            if !existed {
                return Ok(false);
            }
            append_outbox(&w, &events)?;
            w.commit().map_err(be)?;
            Ok(existed)
        })
        .await
    }

    async fn repo_exists(&self, repo: &RepoName) -> Result<bool> {
        let repo = repo.to_string();
        self.run(move |db| {
            let r = db.begin_read().map_err(be)?;
            let t = r.open_table(REPOS).map_err(be)?;
            Ok(t.get(repo.as_str()).map_err(be)?.is_some())
        })
        .await
    }

    async fn list_tags(&self, repo: &RepoName, last: Option<&str>, n: usize) -> Result<Vec<String>> {
        let (repo, last) = (repo.to_string(), last.map(str::to_string));
        self.run(move |db| {
            let r = db.begin_read().map_err(be)?;
            let t = r.open_table(TAGS).map_err(be)?;
            second_keys_after(&t, &repo, last.as_deref(), n)
        })
        .await
    }

    async fn list_repos(&self, last: Option<&str>, n: usize) -> Result<Vec<String>> {
        let last = last.map(str::to_string);
        self.run(move |db| {
            let r = db.begin_read().map_err(be)?;
            let t = r.open_table(REPOS).map_err(be)?;
            let start = match &last {
                Some(l) => Bound::Excluded(l.as_str()),
                None => Bound::Unbounded,
            };
            let mut out = Vec::new();
            for item in t.range::<&str>((start, Bound::Unbounded)).map_err(be)? {
                if out.len() >= n {
                    break;
                }
                out.push(item.map_err(be)?.0.value().to_string());
            }
            Ok(out)
        })
        .await
    }

    async fn referrers(&self, repo: &RepoName, subject: &Digest) -> Result<Vec<Descriptor>> {
        let (repo, subject) = (repo.to_string(), subject.to_string());
        self.run(move |db| {
            let r = db.begin_read().map_err(be)?;
            let t = r.open_table(REFERRERS).map_err(be)?;
            let mut out = Vec::new();
            for item in t.range((repo.as_str(), subject.as_str(), "")..).map_err(be)? {
                let (k, v) = item.map_err(be)?;
                let (r, s, _) = k.value();
                if r != repo || s != subject {
                    break;
                }
                out.push(serde_json::from_slice(v.value()).map_err(be)?);
            }
            Ok(out)
        })
        .await
    }

    async fn put_upload(&self, id: &UploadId, rec: &UploadRecord) -> Result<()> {
        let id = id.to_string();
        let json = serde_json::to_vec(rec).map_err(be)?;
        self.run(move |db| {
            let w = db.begin_write().map_err(be)?;
            w.open_table(UPLOADS)
                .map_err(be)?
                .insert(id.as_str(), json.as_slice())
                .map_err(be)?;
            w.commit().map_err(be)
        })
        .await
    }

    async fn get_upload(&self, id: &UploadId) -> Result<Option<UploadRecord>> {
        let id = id.to_string();
        self.run(move |db| {
            let r = db.begin_read().map_err(be)?;
            let t = r.open_table(UPLOADS).map_err(be)?;
            match t.get(id.as_str()).map_err(be)? {
                Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(be)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn delete_upload(&self, id: &UploadId) -> Result<()> {
        let id = id.to_string();
        self.run(move |db| {
            let w = db.begin_write().map_err(be)?;
            w.open_table(UPLOADS).map_err(be)?.remove(id.as_str()).map_err(be)?;
            w.commit().map_err(be)
        })
        .await
    }

    async fn stats(&self) -> Result<StoreStats> {
        self.run(move |db| {
            let r = db.begin_read().map_err(be)?;
            let blobs = r.open_table(BLOBS).map_err(be)?;
            let mut blob_bytes = 0u64;
            for item in blobs.iter().map_err(be)? {
                blob_bytes += item.map_err(be)?.1.value();
            }
            Ok(StoreStats {
                repositories: r.open_table(REPOS).map_err(be)?.len().map_err(be)?,
                manifests: r.open_table(MANIFESTS).map_err(be)?.len().map_err(be)?,
                tags: r.open_table(TAGS).map_err(be)?.len().map_err(be)?,
                blobs: blobs.len().map_err(be)?,
                blob_bytes,
                uploads: r.open_table(UPLOADS).map_err(be)?.len().map_err(be)?,
            })
        })
        .await
    }

    async fn outbox_append(&self, payloads: Vec<Vec<u8>>) -> Result<u64> {
        self.run(move |db| {
            let w = db.begin_write().map_err(be)?;
            let last = append_outbox(&w, &payloads)?;
            w.commit().map_err(be)?;
            Ok(last)
        })
        .await
    }

    async fn outbox_read(&self, after: u64, n: usize) -> Result<Vec<OutboxEvent>> {
        self.run(move |db| {
            let r = db.begin_read().map_err(be)?;
            let t = r.open_table(OUTBOX).map_err(be)?;
            let mut out = Vec::new();
            for item in t.range((Bound::Excluded(after), Bound::Unbounded)).map_err(be)? {
                if out.len() >= n {
                    break;
                }
                let (k, v) = item.map_err(be)?;
                out.push(OutboxEvent {
                    seq: k.value(),
                    payload: v.value().to_vec(),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn outbox_last_seq(&self) -> Result<u64> {
        self.run(move |db| {
            let r = db.begin_read().map_err(be)?;
            let t = r.open_table(COUNTERS).map_err(be)?;
            Ok(t.get(OUTBOX_LAST).map_err(be)?.map(|v| v.value()).unwrap_or(0))
        })
        .await
    }

    async fn outbox_cursor(&self, endpoint: &str) -> Result<u64> {
        let endpoint = endpoint.to_string();
        self.run(move |db| {
            let r = db.begin_read().map_err(be)?;
            let t = r.open_table(OUTBOX_CURSORS).map_err(be)?;
            Ok(t.get(endpoint.as_str()).map_err(be)?.map(|v| v.value()).unwrap_or(0))
        })
        .await
    }

    async fn outbox_advance(&self, endpoint: &str, seq: u64, dead: Option<DeadLetter>) -> Result<()> {
        let endpoint = endpoint.to_string();
        let dead = dead
            .map(|d| serde_json::to_vec(&d).map(|j| (d.seq, j)))
            .transpose()
            .map_err(be)?;
        self.run(move |db| {
            let w = db.begin_write().map_err(be)?;
            {
                let mut cursors = w.open_table(OUTBOX_CURSORS).map_err(be)?;
                let old = cursors
                    .get(endpoint.as_str())
                    .map_err(be)?
                    .map(|v| v.value())
                    .unwrap_or(0);
                cursors.insert(endpoint.as_str(), old.max(seq)).map_err(be)?;
                if let Some((dseq, json)) = &dead {
                    w.open_table(DEAD_LETTERS)
                        .map_err(be)?
                        .insert((endpoint.as_str(), *dseq), json.as_slice())
                        .map_err(be)?;
                }
            }
            w.commit().map_err(be)
        })
        .await
    }

    async fn outbox_prune(&self, seq: u64) -> Result<u64> {
        self.run(move |db| {
            let w = db.begin_write().map_err(be)?;
            let removed = {
                let mut t = w.open_table(OUTBOX).map_err(be)?;
                let before = t.len().map_err(be)?;
                t.retain_in(..=seq, |_, _| false).map_err(be)?;
                before - t.len().map_err(be)?
            };
            w.commit().map_err(be)?;
            Ok(removed)
        })
        .await
    }

    async fn dead_letters(&self, endpoint: &str) -> Result<Vec<DeadLetter>> {
        let endpoint = endpoint.to_string();
        self.run(move |db| {
            let r = db.begin_read().map_err(be)?;
            let t = r.open_table(DEAD_LETTERS).map_err(be)?;
            let mut out = Vec::new();
            for item in t.range((endpoint.as_str(), 0u64)..).map_err(be)? {
                let (k, v) = item.map_err(be)?;
                if k.value().0 != endpoint {
                    break;
                }
                out.push(serde_json::from_slice(v.value()).map_err(be)?);
            }
            Ok(out)
        })
        .await
    }

    async fn project_usage(&self, project: &str) -> Result<u64> {
        let project = project.to_string();
        self.run(move |db| Ok(crate::redb_gc::project_items(db, &project)?.values().sum()))
            .await
    }

    async fn project_holds(&self, project: &str, digest: &Digest) -> Result<bool> {
        let (project, digest) = (project.to_string(), digest.to_string());
        self.run(move |db| Ok(crate::redb_gc::project_items(db, &project)?.contains_key(&digest)))
            .await
    }

    async fn record_pulls(&self, pulls: &[(String, String, u64)]) -> Result<()> {
        let pulls = pulls.to_vec();
        self.run(move |db| crate::redb_gc::record_pulls(db, &pulls)).await
    }

    async fn gc_snapshot(&self) -> Result<crate::GcSnapshot> {
        self.run(crate::redb_gc::snapshot).await
    }

    async fn sweep_blobs(&self, candidates: &[Digest], guard: crate::SweepGuard) -> Result<Vec<crate::SweptBlob>> {
        let candidates = candidates.to_vec();
        self.run(move |db| crate::redb_gc::sweep_blobs(db, &candidates, guard))
            .await
    }

    async fn byte_fence(&self, digest: &Digest) -> Result<u64> {
        let digest = digest.clone();
        self.run(move |db| crate::redb_gc::byte_fence(db, &digest)).await
    }

    async fn release_claims(&self, digests: &[Digest]) -> Result<()> {
        let digests = digests.to_vec();
        self.run(move |db| crate::redb_gc::release_claims(db, &digests)).await
    }

    async fn unreleased_claims(&self, released_before: u64) -> Result<Vec<Digest>> {
        self.run(move |db| crate::redb_gc::unreleased_claims(db, released_before))
            .await
    }

    async fn sweep_manifests(&self, ms: &[crate::ManifestSweep], guard: crate::SweepGuard) -> Result<Vec<Option<u64>>> {
        let ms = ms.to_vec();
        self.run(move |db| crate::redb_gc::sweep_manifests(db, &ms, guard))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transactions_run_on_the_runtime_given() {
        let dir = tempfile::tempdir().unwrap();
        let serving = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("serving")
            .build()
            .unwrap();
        let store = RedbMetadata::open(&dir.path().join("meta.redb"))
            .unwrap()
            .on_runtime(serving.handle().clone());
        let caller = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let thread = caller
            .block_on(store.run(|_| Ok(std::thread::current().name().map(String::from))))
            .unwrap();
        assert_eq!(thread.as_deref(), Some("serving"));
    }

    #[tokio::test]
    async fn redb_backend_passes_the_shared_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbMetadata::open(&dir.path().join("meta.redb")).unwrap();
        crate::testsuite::run_all(&store).await;
        crate::identity_testsuite::run_all(&store).await;
    }

    #[tokio::test]
    async fn a_database_from_before_the_link_index_gets_it_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let d = Digest::sha256(b"old");
        {
            // What an older berth wrote: blobs and links, no index.
            let db = Database::create(&path).unwrap();
            let w = db.begin_write().unwrap();
            w.open_table(BLOBS).unwrap().insert(d.as_str(), 3).unwrap();
            let mut links = w.open_table(LINKS).unwrap();
            links.insert(("old/a", d.as_str()), 3).unwrap();
            links.insert(("old/b", d.as_str()), 3).unwrap();
            drop(links);
            w.commit().unwrap();
        }
        let store = RedbMetadata::open(&path).unwrap();
        let snap = store.gc_snapshot().await.unwrap();
        let guard = crate::SweepGuard {
            seq: snap.seq,
            cutoff: u64::MAX,
        };
        let swept = store.sweep_blobs(std::slice::from_ref(&d), guard).await.unwrap();
        assert_eq!(swept[0].links, 2);
        let a: RepoName = "old/a".parse().unwrap();
        assert_eq!(store.linked_blob(&a, &d).await.unwrap(), None);
    }

    #[tokio::test]
    async fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let repo: RepoName = "a/b".parse().unwrap();
        let d = Digest::sha256(b"x");
        {
            let store = RedbMetadata::open(&path).unwrap();
            store.add_blob(&repo, &d, 1, Admission::default()).await.unwrap();
        }
        let store = RedbMetadata::open(&path).unwrap();
        assert_eq!(store.linked_blob(&repo, &d).await.unwrap(), Some(1));
    }
}
