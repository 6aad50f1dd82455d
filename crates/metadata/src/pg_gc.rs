//! The PostgreSQL side of garbage collection, with redb's guard semantics
//! (`redb_gc`) on a store many nodes write at once.
//!
//! The touch "sequence number" is the writing transaction's id
//! (`pg_current_xact_id()`, 64 bits, never reused), not a counter row: a
//! counter would make every write wait for every other. Transaction ids
//! are handed out in start order, not commit order, so the numbers GC
//! compares with are taken from PostgreSQL's snapshots, which say what is
//! finished:
//! - `GcSnapshot::seq` is the snapshot's `xmin - 1`: every transaction with
//!   an id up to it had finished when the snapshot was taken, so its writes
//!   are in the snapshot. A touch above it may not be, and is refused (a
//!   write that finished just before the snapshot but after an older,
//!   still-open transaction began is refused too: it is only kept for the
//!   next run);
//! - `byte_fence` is `xmax - 1` of the statement's snapshot: every id a
//!   transaction gets after that is above it, so a claim or release made
//!   after the fence was read is above the fence, as with redb's counter.
//!
//! A long-open transaction anywhere in the cluster holds `xmin` back, so GC
//! then removes less (never more) until it ends.

use std::collections::HashMap;

use oci::Digest;
use tokio_postgres::Row;

use crate::gc::{GcManifest, GcSnapshot, ManifestSweep, SweepGuard, SweptBlob, Touch};
use crate::pg_store::{be, digest_key, in_tx, int, lock, parse_digest, q, q1, uint, x, PostgresMetadata, TxFail};
use crate::{Conflict, Result};

/// The writing transaction's id as a BIGINT.
const XID: &str = "pg_current_xact_id()::text::bigint";
/// Seconds since the epoch, on the database's clock (one clock for every node).
const NOW: &str = "floor(extract(epoch from now()))::bigint";

/// Records, in the caller's transaction, that `digests` were just
/// committed, linked or referenced.
pub(crate) async fn touch(
    tx: &deadpool_postgres::Transaction<'_>,
    digests: &[&str],
) -> Result<(), tokio_postgres::Error> {
    let sql = format!(
        "INSERT INTO gc_touched (digest, time, seq) \
         SELECT DISTINCT d, {NOW}, {XID} FROM unnest($1::text[]) AS d \
         ON CONFLICT (digest) DO UPDATE SET time = EXCLUDED.time, seq = EXCLUDED.seq"
    );
    x(tx, &sql, &[&digests]).await.map(|_| ())
}

fn touch_of(r: &Row, time: usize) -> Touch {
    Touch {
        time: uint(r.get(time)),
        seq: uint(r.get(time + 1)),
    }
}

/// Refuses, in the caller's transaction (which holds the digest's lock), to
/// record `digest`'s bytes if a sweep claimed them after `fence` was read
/// or is still deleting them; forgets a claim released before the fence.
pub(crate) async fn check_fence(
    tx: &deadpool_postgres::Transaction<'_>,
    digest: &Digest,
    fence: u64,
) -> Result<(), TxFail> {
    let d = digest.as_str();
    let claim = q1(tx, "SELECT seq, released FROM gc_claims WHERE digest = $1", &[&d]).await?;
    match claim.map(|r| (uint(r.get(0)), uint(r.get(1)))) {
        None => Ok(()),
        Some((seq, released)) if released != 0 && seq <= fence => {
            x(tx, "DELETE FROM gc_claims WHERE digest = $1", &[&d]).await?;
            Ok(())
        }
        Some(_) => Err(Conflict::Fenced(digest.clone()).into()),
    }
}

const PROJECT_ITEMS: &str = "SELECT COALESCE(sum(size), 0)::bigint, COALESCE(bool_or(digest = $4), false) FROM ( \
       SELECT DISTINCT ON (digest) digest, size FROM ( \
         SELECT digest, size, 0 AS pri FROM links WHERE repo = $1 OR (repo >= $2 AND repo < $3) \
         UNION ALL \
         SELECT digest, size, 1 AS pri FROM manifests WHERE repo = $1 OR (repo >= $2 AND repo < $3) \
       ) AS i ORDER BY digest, pri DESC \
     ) AS d";

/// The bounds of a project's repositories: `project` itself and
/// `project/...` (`/` + 1 is `0`, in the "C" collation of the keys).
fn project_bounds(project: &str) -> (String, String) {
    (format!("{project}/"), format!("{project}0"))
}

fn usage_of(row: Option<Row>) -> (u64, bool) {
    row.map(|r| (uint(r.get(0)), r.get(1))).unwrap_or((0, false))
}

/// Bytes `project` holds (every linked blob and every manifest once, by
/// digest), and whether it holds `digest`, in the caller's transaction.
pub(crate) async fn project_usage_in(
    tx: &deadpool_postgres::Transaction<'_>,
    project: &str,
    digest: &str,
) -> Result<(u64, bool), tokio_postgres::Error> {
    let (lo, hi) = project_bounds(project);
    Ok(usage_of(q1(tx, PROJECT_ITEMS, &[&project, &lo, &hi, &digest]).await?))
}

pub(crate) async fn project_usage(store: &PostgresMetadata, project: &str, digest: &str) -> Result<(u64, bool)> {
    let (lo, hi) = project_bounds(project);
    Ok(usage_of(
        store.row(PROJECT_ITEMS, &[&project, &lo, &hi, &digest]).await?,
    ))
}

pub(crate) async fn byte_fence(store: &PostgresMetadata, digest: &Digest) -> Result<u64> {
    // One statement, one snapshot: the claim is read as of the fence.
    let row = store
        .row(
            "SELECT (SELECT released FROM gc_claims WHERE digest = $1), \
             pg_snapshot_xmax(pg_current_snapshot())::text::bigint - 1",
            &[&digest.as_str()],
        )
        .await?
        .ok_or_else(|| be(std::io::Error::other("no row")))?;
    if row.get::<_, Option<i64>>(0) == Some(0) {
        return Err(Conflict::Fenced(digest.clone()).into());
    }
    Ok(uint(row.get(1)))
}

pub(crate) async fn release_claims(store: &PostgresMetadata, digests: &[Digest]) -> Result<()> {
    let ds: Vec<&str> = digests.iter().map(Digest::as_str).collect();
    // Released under this transaction's id: a writer that read the fence
    // before (while the bytes were being deleted) is still refused.
    let sql = format!(
        "UPDATE gc_claims SET seq = {XID}, released = GREATEST({NOW}, 1) \
         WHERE digest = ANY($1) AND released = 0"
    );
    in_tx!(store, |tx| {
        x(tx, &sql, &[&ds]).await?;
    })
}

pub(crate) async fn unreleased_claims(store: &PostgresMetadata, released_before: u64) -> Result<Vec<Digest>> {
    let before = int(released_before);
    in_tx!(store, |tx| {
        let rows = q(
            tx,
            "SELECT digest FROM gc_claims WHERE released = 0 ORDER BY digest",
            &[],
        )
        .await?;
        x(
            tx,
            "DELETE FROM gc_claims WHERE released <> 0 AND released < $1",
            &[&before],
        )
        .await?;
        rows.iter()
            .map(|r| parse_digest(r.get(0)))
            .collect::<Result<Vec<Digest>>>()?
    })
}

pub(crate) async fn record_pulls(store: &PostgresMetadata, pulls: &[(String, String, u64)]) -> Result<()> {
    // One row per key (a statement may not update a row twice).
    let mut latest: HashMap<(&str, &str), u64> = HashMap::new();
    for (repo, tag, time) in pulls {
        let t = latest.entry((repo.as_str(), tag.as_str())).or_insert(0);
        *t = (*t).max(*time);
    }
    let repos: Vec<&str> = latest.keys().map(|k| k.0).collect();
    let tags: Vec<&str> = latest.keys().map(|k| k.1).collect();
    let times: Vec<i64> = latest.values().map(|t| int(*t)).collect();
    in_tx!(store, |tx| {
        x(
            tx,
            "INSERT INTO tag_pulls (repo, tag, time) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]) \
             ON CONFLICT (repo, tag) DO UPDATE SET time = GREATEST(tag_pulls.time, EXCLUDED.time)",
            &[&repos, &tags, &times],
        )
        .await?;
    })
}

/// Everything GC marks from, in one REPEATABLE READ snapshot.
pub(crate) async fn snapshot(store: &PostgresMetadata) -> Result<GcSnapshot> {
    let mut client = store.pool.get().await.map_err(crate::pg_store::pool_err)?;
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(crate::pg_store::pg_err)?;
    let snap = read_snapshot(&tx).await;
    let _ = tx.rollback().await;
    snap
}

async fn read_snapshot(tx: &deadpool_postgres::Transaction<'_>) -> Result<GcSnapshot> {
    let all = |sql: &'static str| async move { q(tx, sql, &[]).await.map_err(crate::pg_store::pg_err) };
    let seq: i64 = all("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint - 1").await?[0].get(0);
    let mut snap = GcSnapshot {
        seq: uint(seq),
        ..GcSnapshot::default()
    };
    for r in all("SELECT digest, size FROM blobs").await? {
        snap.blobs.push((parse_digest(r.get(0))?, uint(r.get(1))));
    }
    for r in all("SELECT repo, digest FROM links").await? {
        snap.links.push((r.get(0), parse_digest(r.get(1))?));
    }
    for r in all("SELECT repo, digest, record FROM manifests").await? {
        snap.manifests.push(GcManifest {
            repo: r.get(0),
            digest: parse_digest(r.get(1))?,
            record: serde_json::from_slice(r.get::<_, &[u8]>(2)).map_err(be)?,
        });
    }
    for r in all("SELECT repo, tag, digest FROM tags").await? {
        snap.tags.push((r.get(0), r.get(1), parse_digest(r.get(2))?));
    }
    for r in all("SELECT id, record FROM uploads").await? {
        snap.uploads.push((
            r.get::<_, &str>(0).parse().map_err(be)?,
            serde_json::from_slice(r.get::<_, &[u8]>(1)).map_err(be)?,
        ));
    }
    for r in all("SELECT repo, tag, time FROM tag_pulls").await? {
        snap.pulls.push((r.get(0), r.get(1), uint(r.get(2))));
    }
    for r in all("SELECT digest, time, seq FROM gc_touched").await? {
        snap.touched.push((parse_digest(r.get(0))?, touch_of(&r, 1)));
    }
    Ok(snap)
}

pub(crate) async fn sweep_blobs(
    store: &PostgresMetadata,
    candidates: &[Digest],
    guard: SweepGuard,
) -> Result<Vec<SweptBlob>> {
    let mut seen = std::collections::HashSet::new();
    let candidates: Vec<&Digest> = candidates.iter().filter(|d| seen.insert(d.as_str())).collect();
    let names: Vec<&str> = candidates.iter().map(|d| d.as_str()).collect();
    let claim = format!(
        "INSERT INTO gc_claims (digest, seq, released) SELECT d, {XID}, 0 FROM unnest($1::text[]) AS d \
         ON CONFLICT (digest) DO UPDATE SET seq = EXCLUDED.seq, released = 0"
    );
    in_tx!(store, |tx| {
        // Writers of these digests wait, then see the removal or are fenced.
        lock(tx, names.iter().map(|d| digest_key(d)).collect()).await?;
        let touches: HashMap<String, Touch> = q(
            tx,
            "SELECT digest, time, seq FROM gc_touched WHERE digest = ANY($1)",
            &[&names],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), touch_of(r, 1)))
        .collect();
        // The proof that a blob is still unreferenced: every write that
        // references one touches it, under the lock this sweep holds.
        let allowed: Vec<&str> = names
            .iter()
            .copied()
            .filter(|d| guard.allows(touches.get(*d).copied()))
            .collect();
        if allowed.is_empty() {
            return Ok(Vec::new());
        }
        let sizes: HashMap<String, u64> = q(
            tx,
            "DELETE FROM blobs WHERE digest = ANY($1) RETURNING digest, size",
            &[&allowed],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), uint(r.get(1))))
        .collect();
        x(tx, "DELETE FROM gc_touched WHERE digest = ANY($1)", &[&allowed]).await?;
        x(tx, &claim, &[&allowed]).await?;
        let mut links: HashMap<String, usize> = HashMap::new();
        for r in q(
            tx,
            "DELETE FROM links WHERE digest = ANY($1) RETURNING digest",
            &[&allowed],
        )
        .await?
        {
            *links.entry(r.get(0)).or_default() += 1;
        }
        candidates
            .iter()
            .filter(|d| allowed.contains(&d.as_str()))
            .map(|d| SweptBlob {
                digest: (*d).clone(),
                size: sizes.get(d.as_str()).copied(),
                links: links.get(d.as_str()).copied().unwrap_or(0),
            })
            .collect::<Vec<SweptBlob>>()
    })
}

/// Removes each untagged, unreferenced manifest the guard allows, in one
/// transaction, in order (an index before its children).
pub(crate) async fn sweep_manifests(
    store: &PostgresMetadata,
    ms: &[ManifestSweep],
    guard: SweepGuard,
) -> Result<Vec<Option<u64>>> {
    in_tx!(store, |tx| {
        // A put that tags, references or re-touches one of them holds the
        // same lock.
        lock(tx, ms.iter().map(|m| digest_key(m.digest.as_str())).collect()).await?;
        let mut out = Vec::with_capacity(ms.len());
        for m in ms {
            out.push(sweep_one(tx, m, guard).await?);
        }
        out
    })
}

async fn sweep_one(
    tx: &deadpool_postgres::Transaction<'_>,
    m: &ManifestSweep,
    guard: SweepGuard,
) -> Result<Option<u64>, TxFail> {
    let (r, d) = (m.repo.as_str(), m.digest.as_str());
    let touched = q1(tx, "SELECT time, seq FROM gc_touched WHERE digest = $1", &[&d]).await?;
    if !guard.allows(touched.map(|row| touch_of(&row, 0))) {
        return Ok(None);
    }
    // Kept if tagged, a subject of a referrer, or a child of an index.
    let held = q1(
        tx,
        "SELECT EXISTS (SELECT 1 FROM tags WHERE repo = $1 AND digest = $2) \
             OR EXISTS (SELECT 1 FROM referrers WHERE repo = $1 AND subject = $2) \
             OR EXISTS (SELECT 1 FROM manifest_children WHERE repo = $1 AND child = $2)",
        &[&r, &d],
    )
    .await?
    .map(|row| row.get::<_, bool>(0))
    .unwrap_or(true);
    if held {
        return Ok(None);
    }
    let Some(row) = q1(
        tx,
        "DELETE FROM manifests WHERE repo = $1 AND digest = $2 RETURNING record",
        &[&r, &d],
    )
    .await?
    else {
        return Ok(None);
    };
    let record: crate::ManifestRecord = serde_json::from_slice(row.get::<_, &[u8]>(0)).map_err(be)?;
    x(
        tx,
        "DELETE FROM manifest_children WHERE repo = $1 AND parent = $2",
        &[&r, &d],
    )
    .await?;
    if let Some(subject) = &record.subject {
        x(
            tx,
            "DELETE FROM referrers WHERE repo = $1 AND subject = $2 AND digest = $3",
            &[&r, subject, &d],
        )
        .await?;
    }
    crate::pg_changes::notify(tx, r).await?;
    Ok(Some(record.size))
}
