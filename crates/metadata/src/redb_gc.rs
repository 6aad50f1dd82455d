//! The redb side of garbage collection: the touch table, the snapshot GC
//! marks from, and the removal transactions that re-check before removing.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use oci::Digest;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use crate::gc::{GcManifest, GcSnapshot, ManifestSweep, SweepGuard, SweptBlob, Touch};
use crate::redb_store::{be, remove_link, BLOBS, LINKS, LINKS_BY_DIGEST, MANIFESTS, REFERRERS, REPOS, TAGS, UPLOADS};
use crate::{Conflict, ManifestRecord, Result};

/// digest -> (time, seq) of the last write that committed, linked or
/// referenced it.
const TOUCHED: TableDefinition<&str, (u64, u64)> = TableDefinition::new("gc_touched");
/// Counters: `touch_seq`, the sequence number of the last touch.
const GC_STATE: TableDefinition<&str, u64> = TableDefinition::new("gc_state");
const SEQ_KEY: &str = "touch_seq";
/// (repo, tag) -> time of the last recorded pull, for retention.
const TAG_PULLS: TableDefinition<(&str, &str), u64> = TableDefinition::new("tag_pulls");
/// digest -> (seq, released): a sweep claimed the digest's bytes for
/// deletion; `released` is the time the bytes were deleted, 0 while they may
/// still be (see `byte_fence`). `seq` is the touch sequence number of the
/// claim, then of its release: only a writer whose fence is at least the
/// release's may record the digest.
const CLAIMS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("gc_claims");

pub(crate) fn create_tables(w: &WriteTransaction) -> Result<()> {
    w.open_table(TOUCHED).map_err(be)?;
    w.open_table(GC_STATE).map_err(be)?;
    w.open_table(TAG_PULLS).map_err(be)?;
    w.open_table(CLAIMS).map_err(be)?;
    Ok(())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A new touch sequence number, in the caller's write transaction.
fn next_seq(w: &WriteTransaction) -> Result<u64> {
    let mut state = w.open_table(GC_STATE).map_err(be)?;
    let seq = state.get(SEQ_KEY).map_err(be)?.map(|v| v.value()).unwrap_or(0) + 1;
    state.insert(SEQ_KEY, seq).map_err(be)?;
    Ok(seq)
}

/// Records, inside the caller's write transaction, that `digests` were just
/// committed, linked or referenced. One new sequence number per transaction.
pub(crate) fn touch<'a>(w: &WriteTransaction, digests: impl IntoIterator<Item = &'a str>) -> Result<()> {
    let seq = next_seq(w)?;
    let time = now();
    let mut t = w.open_table(TOUCHED).map_err(be)?;
    for d in digests {
        t.insert(d, (time, seq)).map_err(be)?;
    }
    Ok(())
}

fn touch_of(t: &impl ReadableTable<&'static str, (u64, u64)>, digest: &str) -> Result<Option<Touch>> {
    Ok(t.get(digest).map_err(be)?.map(|v| {
        let (time, seq) = v.value();
        Touch { time, seq }
    }))
}

/// The byte fence: the touch sequence number now (a claim made later has a
/// higher number), unless `digest` has a claim not yet released.
pub(crate) fn byte_fence(db: &Database, digest: &Digest) -> Result<u64> {
    let r = db.begin_read().map_err(be)?;
    if let Some((_, 0)) = r
        .open_table(CLAIMS)
        .map_err(be)?
        .get(digest.as_str())
        .map_err(be)?
        .map(|v| v.value())
    {
        return Err(Conflict::Fenced(digest.clone()).into());
    }
    let state = r.open_table(GC_STATE).map_err(be)?;
    Ok(state.get(SEQ_KEY).map_err(be)?.map(|v| v.value()).unwrap_or(0))
}

/// Refuses, inside the caller's write transaction, to record `digest`'s
/// bytes if a sweep claimed them after `fence` was read, or is still
/// deleting them. A claim released before the fence was read is one whose
/// deletion the new bytes came after: it is forgotten.
pub(crate) fn check_fence(w: &WriteTransaction, digest: &Digest, fence: u64) -> Result<()> {
    let mut claims = w.open_table(CLAIMS).map_err(be)?;
    let claim = claims.get(digest.as_str()).map_err(be)?.map(|v| v.value());
    match claim {
        None => Ok(()),
        Some((seq, released)) if released != 0 && seq <= fence => {
            claims.remove(digest.as_str()).map_err(be)?;
            Ok(())
        }
        Some(_) => Err(Conflict::Fenced(digest.clone()).into()),
    }
}

pub(crate) fn release_claims(db: &Database, digests: &[Digest]) -> Result<()> {
    let mut w = db.begin_write().map_err(be)?;
    // Not synced: the next synced commit (any push, the next batch) makes it
    // durable. A crash before that forgets the release, which only keeps
    // the claims pending (safe) until the next run redoes them; syncing here
    // would double what every sweep batch waits for.
    w.set_durability(redb::Durability::None).map_err(be)?;
    {
        // Released under a new number: a writer that read the fence before
        // this (while the bytes were being deleted) is still refused.
        let seq = next_seq(&w)?;
        let mut claims = w.open_table(CLAIMS).map_err(be)?;
        let time = now().max(1);
        for d in digests {
            let claim = claims.get(d.as_str()).map_err(be)?.map(|v| v.value());
            if let Some((_, 0)) = claim {
                claims.insert(d.as_str(), (seq, time)).map_err(be)?;
            }
        }
    }
    w.commit().map_err(be)
}

pub(crate) fn unreleased_claims(db: &Database, released_before: u64) -> Result<Vec<Digest>> {
    let w = db.begin_write().map_err(be)?;
    let mut pending = Vec::new();
    {
        let mut claims = w.open_table(CLAIMS).map_err(be)?;
        let mut forgotten = Vec::new();
        for item in claims.iter().map_err(be)? {
            let (k, v) = item.map_err(be)?;
            match v.value() {
                (_, 0) => pending.push(digest(k.value())?),
                (_, released) if released < released_before => forgotten.push(k.value().to_string()),
                _ => {}
            }
        }
        for d in forgotten {
            claims.remove(d.as_str()).map_err(be)?;
        }
    }
    w.commit().map_err(be)?;
    Ok(pending)
}

fn digest(s: &str) -> Result<Digest> {
    s.parse().map_err(be)
}

pub(crate) fn snapshot(db: &Database) -> Result<GcSnapshot> {
    let r = db.begin_read().map_err(be)?;
    let mut snap = GcSnapshot {
        seq: r
            .open_table(GC_STATE)
            .map_err(be)?
            .get(SEQ_KEY)
            .map_err(be)?
            .map(|v| v.value())
            .unwrap_or(0),
        ..GcSnapshot::default()
    };
    for item in r.open_table(BLOBS).map_err(be)?.iter().map_err(be)? {
        let (k, v) = item.map_err(be)?;
        snap.blobs.push((digest(k.value())?, v.value()));
    }
    for item in r.open_table(LINKS).map_err(be)?.iter().map_err(be)? {
        let (k, _) = item.map_err(be)?;
        let (repo, d) = k.value();
        snap.links.push((repo.to_string(), digest(d)?));
    }
    for item in r.open_table(MANIFESTS).map_err(be)?.iter().map_err(be)? {
        let (k, v) = item.map_err(be)?;
        let (repo, d) = k.value();
        snap.manifests.push(GcManifest {
            repo: repo.to_string(),
            digest: digest(d)?,
            record: serde_json::from_slice(v.value()).map_err(be)?,
        });
    }
    for item in r.open_table(TAGS).map_err(be)?.iter().map_err(be)? {
        let (k, v) = item.map_err(be)?;
        let (repo, tag) = k.value();
        snap.tags.push((repo.to_string(), tag.to_string(), digest(v.value())?));
    }
    for item in r.open_table(UPLOADS).map_err(be)?.iter().map_err(be)? {
        let (k, v) = item.map_err(be)?;
        snap.uploads.push((
            k.value().parse().map_err(be)?,
            serde_json::from_slice(v.value()).map_err(be)?,
        ));
    }
    for item in r.open_table(TAG_PULLS).map_err(be)?.iter().map_err(be)? {
        let (k, v) = item.map_err(be)?;
        let (repo, tag) = k.value();
        snap.pulls.push((repo.to_string(), tag.to_string(), v.value()));
    }
    for item in r.open_table(TOUCHED).map_err(be)?.iter().map_err(be)? {
        let (k, v) = item.map_err(be)?;
        let (time, seq) = v.value();
        snap.touched.push((digest(k.value())?, Touch { time, seq }));
    }
    Ok(snap)
}

pub(crate) fn record_pulls(db: &Database, pulls: &[(String, String, u64)]) -> Result<()> {
    let w = db.begin_write().map_err(be)?;
    {
        let mut t = w.open_table(TAG_PULLS).map_err(be)?;
        for (repo, tag, time) in pulls {
            let key = (repo.as_str(), tag.as_str());
            let old = t.get(key).map_err(be)?.map(|v| v.value()).unwrap_or(0);
            if *time > old {
                t.insert(key, *time).map_err(be)?;
            }
        }
    }
    w.commit().map_err(be)
}

pub(crate) fn sweep_blobs(db: &Database, candidates: &[Digest], guard: SweepGuard) -> Result<Vec<SweptBlob>> {
    let w = db.begin_write().map_err(be)?;
    let mut swept = Vec::new();
    {
        let mut touched = w.open_table(TOUCHED).map_err(be)?;
        let mut blobs = w.open_table(BLOBS).map_err(be)?;
        for d in candidates {
            // The proof that the blob is still unreferenced: every write
            // that references a blob touches it, so an untouched blob is
            // as unreferenced as it was in the snapshot.
            if !guard.allows(touch_of(&touched, d.as_str())?) {
                continue;
            }
            let size = blobs.remove(d.as_str()).map_err(be)?.map(|v| v.value());
            touched.remove(d.as_str()).map_err(be)?;
            swept.push(SweptBlob {
                digest: d.clone(),
                size,
                links: 0,
            });
        }
    }
    if swept.is_empty() {
        return Ok(swept);
    }
    // Writers that read the fence before this claim, or while it is not
    // released, cannot record these digests (`check_fence`).
    let seq = next_seq(&w)?;
    {
        let mut claims = w.open_table(CLAIMS).map_err(be)?;
        for s in &swept {
            claims.insert(s.digest.as_str(), (seq, 0)).map_err(be)?;
        }
    }
    // The links of each swept blob, from the index keyed by digest: the
    // cost is the links removed, not the size of the links table.
    for s in &mut swept {
        let d = s.digest.as_str();
        let repos: Vec<String> = {
            let index = w.open_table(LINKS_BY_DIGEST).map_err(be)?;
            let mut repos = Vec::new();
            for item in index.range((d, "")..).map_err(be)? {
                let (k, _) = item.map_err(be)?;
                let (kd, repo) = k.value();
                if kd != d {
                    break;
                }
                repos.push(repo.to_string());
            }
            repos
        };
        for repo in repos {
            if remove_link(&w, &repo, d)? {
                s.links += 1;
            }
        }
    }
    w.commit().map_err(be)?;
    Ok(swept)
}

/// Removes each untagged manifest the guard and the store allow, in one
/// transaction, in order (an index before its children, so a child the
/// index held is free by its turn). `None` for those left alone.
pub(crate) fn sweep_manifests(db: &Database, ms: &[ManifestSweep], guard: SweepGuard) -> Result<Vec<Option<u64>>> {
    let w = db.begin_write().map_err(be)?;
    let mut out = Vec::with_capacity(ms.len());
    {
        let touched = w.open_table(TOUCHED).map_err(be)?;
        let mut manifests = w.open_table(MANIFESTS).map_err(be)?;
        let tags = w.open_table(TAGS).map_err(be)?;
        let mut referrers = w.open_table(REFERRERS).map_err(be)?;
        let mut repos = w.open_table(REPOS).map_err(be)?;
        for m in ms {
            let (repo, d) = (m.repo.as_str(), m.digest.as_str());
            let size = 'one: {
                if !guard.allows(touch_of(&touched, d)?) {
                    break 'one None;
                }
                let record: ManifestRecord = match manifests.get((repo, d)).map_err(be)? {
                    Some(v) => serde_json::from_slice(v.value()).map_err(be)?,
                    None => break 'one None,
                };
                for item in tags.range((repo, "")..).map_err(be)? {
                    let (k, v) = item.map_err(be)?;
                    if k.value().0 != repo {
                        break;
                    }
                    if v.value() == d {
                        break 'one None;
                    }
                }
                if let Some(item) = referrers.range((repo, d, "")..).map_err(be)?.next() {
                    let (k, _) = item.map_err(be)?;
                    let (r, s, _) = k.value();
                    if r == repo && s == d {
                        break 'one None;
                    }
                }
                for item in manifests.range((repo, "")..).map_err(be)? {
                    let (k, v) = item.map_err(be)?;
                    if k.value().0 != repo {
                        break;
                    }
                    let other: ManifestRecord = serde_json::from_slice(v.value()).map_err(be)?;
                    if other.children.iter().any(|c| c == d) {
                        break 'one None;
                    }
                }
                manifests.remove((repo, d)).map_err(be)?;
                let n = repos.get(repo).map_err(be)?.map(|v| v.value()).unwrap_or(1);
                if n <= 1 {
                    repos.remove(repo).map_err(be)?;
                } else {
                    repos.insert(repo, n - 1).map_err(be)?;
                }
                if let Some(subject) = &record.subject {
                    referrers.remove((repo, subject.as_str(), d)).map_err(be)?;
                }
                Some(record.size)
            };
            out.push(size);
        }
    }
    w.commit().map_err(be)?;
    Ok(out)
}

/// Every digest project `project` holds (links and manifests of its
/// repositories: `project` itself and `project/...`) with its size.
pub(crate) fn project_items(db: &Database, project: &str) -> Result<HashMap<String, u64>> {
    let r = db.begin_read().map_err(be)?;
    let links = r.open_table(LINKS).map_err(be)?;
    let manifests = r.open_table(MANIFESTS).map_err(be)?;
    project_items_in(&links, &manifests, project)
}

fn project_items_in(
    links: &impl ReadableTable<(&'static str, &'static str), u64>,
    manifests: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    project: &str,
) -> Result<HashMap<String, u64>> {
    let prefix = format!("{project}/");
    // Keys are ordered by repository; every repository of the project sorts
    // from `project` up to `project/\u{10ffff}`, with other names between
    // (`project-x`) filtered out.
    let end = format!("{project}0");
    let mine = |repo: &str| repo == project || repo.starts_with(&prefix);
    let mut items = HashMap::new();
    for item in links.range((project, "")..(end.as_str(), "")).map_err(be)? {
        let (k, v) = item.map_err(be)?;
        let (repo, d) = k.value();
        if mine(repo) {
            items.insert(d.to_string(), v.value());
        }
    }
    for item in manifests.range((project, "")..(end.as_str(), "")).map_err(be)? {
        let (k, v) = item.map_err(be)?;
        let (repo, d) = k.value();
        if mine(repo) {
            let rec: ManifestRecord = serde_json::from_slice(v.value()).map_err(be)?;
            items.insert(d.to_string(), rec.size);
        }
    }
    Ok(items)
}

/// Refuses, inside the caller's write transaction, `size` more bytes of
/// `digest` in `project` when they would take it over `limit` (content the
/// project holds already is free).
pub(crate) fn check_quota(w: &WriteTransaction, project: &str, digest: &Digest, size: u64, limit: u64) -> Result<()> {
    let links = w.open_table(LINKS).map_err(be)?;
    let manifests = w.open_table(MANIFESTS).map_err(be)?;
    let items = project_items_in(&links, &manifests, project)?;
    if items.contains_key(digest.as_str()) {
        return Ok(());
    }
    let used: u64 = items.values().sum();
    if used.saturating_add(size) > limit {
        return Err(Conflict::OverQuota { used, limit, size }.into());
    }
    Ok(())
}
