//! The GC decision, as pure functions of a metadata snapshot: which upload
//! sessions are abandoned, which untagged manifests may go, and which blobs
//! nothing references. No I/O here, so the decision is testable on its own;
//! the removal transactions re-check everything against the live store.

use std::collections::{HashMap, HashSet};

use metadata::{GcSnapshot, ManifestSweep, Touch};
use oci::{Digest, RepoName, UploadId};

/// Upload sessions started at or before `started_before` (seconds since the
/// epoch).
pub fn abandoned_uploads(snap: &GcSnapshot, started_before: u64) -> Vec<UploadId> {
    snap.uploads
        .iter()
        .filter(|(_, rec)| rec.created <= started_before)
        .map(|(id, _)| id.clone())
        .collect()
}

fn touches(snap: &GcSnapshot) -> HashMap<&Digest, Touch> {
    snap.touched.iter().map(|(d, t)| (d, *t)).collect()
}

/// Whether the snapshot already shows `d` touched after `cutoff`: then it is
/// within the grace window and not a candidate at all.
fn young(touched: &HashMap<&Digest, Touch>, d: &Digest, cutoff: u64) -> bool {
    touched.get(d).is_some_and(|t| t.time > cutoff)
}

/// Untagged manifests of the projects `prune_project` selects, in an order
/// in which they can be removed one at a time (an index before its
/// children). A manifest stays while:
/// - a tag points at it;
/// - a manifest of its repository lists it as a child;
/// - a manifest of its repository names it as its subject (it has
///   referrers: signatures, SBOMs);
/// - its own subject is in its repository (it is attached to an image that
///   stays, like a signature);
/// - it was touched after `cutoff`.
///
/// Removing an index can free its children, so this iterates to a fixpoint,
/// at most once per manifest.
pub fn untagged_manifests(snap: &GcSnapshot, prune_project: impl Fn(&str) -> bool, cutoff: u64) -> Vec<ManifestSweep> {
    let touched = touches(snap);
    let tagged: HashSet<(&str, &Digest)> = snap.tags.iter().map(|(r, _, d)| (r.as_str(), d)).collect();
    let mut removed: HashSet<(&str, &Digest)> = HashSet::new();
    let mut order = Vec::new();
    for _ in 0..=snap.manifests.len() {
        let alive: Vec<_> = snap
            .manifests
            .iter()
            .filter(|m| !removed.contains(&(m.repo.as_str(), &m.digest)))
            .collect();
        let present: HashSet<(&str, &str)> = alive.iter().map(|m| (m.repo.as_str(), m.digest.as_str())).collect();
        let mut held: HashSet<(&str, &str)> = HashSet::new();
        for m in &alive {
            for c in &m.record.children {
                held.insert((m.repo.as_str(), c.as_str()));
            }
            if let Some(s) = &m.record.subject {
                held.insert((m.repo.as_str(), s.as_str()));
            }
        }
        let mut progress = false;
        for m in &alive {
            let key = (m.repo.as_str(), m.digest.as_str());
            let attached = m
                .record
                .subject
                .as_deref()
                .is_some_and(|s| present.contains(&(m.repo.as_str(), s)));
            let project = m.repo.split('/').next().unwrap_or(&m.repo);
            if !prune_project(project)
                || tagged.contains(&(m.repo.as_str(), &m.digest))
                || held.contains(&key)
                || attached
                || young(&touched, &m.digest, cutoff)
            {
                continue;
            }
            let Ok(repo) = m.repo.parse::<RepoName>() else { continue };
            removed.insert((m.repo.as_str(), &m.digest));
            order.push(ManifestSweep {
                repo,
                digest: m.digest.clone(),
            });
            progress = true;
        }
        if !progress {
            break;
        }
    }
    order
}

/// Blobs, and files in the blob store, that no manifest references, except
/// those touched after `cutoff`. `removed` are manifests treated as already
/// gone (a dry run's untagged manifests). `stored` is the blob store's
/// listing; a file metadata does not know about is a candidate too (the
/// bytes of a deleted manifest, or a commit that crashed before its record).
/// Returns each candidate with its size in bytes.
pub fn unreferenced_blobs(
    snap: &GcSnapshot,
    removed: &HashSet<(String, Digest)>,
    stored: &[(Digest, u64)],
    cutoff: u64,
) -> Vec<(Digest, u64)> {
    let touched = touches(snap);
    let mut referenced: HashSet<&str> = HashSet::new();
    for m in &snap.manifests {
        if removed.contains(&(m.repo.clone(), m.digest.clone())) {
            continue;
        }
        referenced.insert(m.digest.as_str());
        referenced.extend(m.record.blobs.iter().map(String::as_str));
        referenced.extend(m.record.children.iter().map(String::as_str));
    }
    let mut sizes: HashMap<&Digest, u64> = snap.blobs.iter().map(|(d, s)| (d, *s)).collect();
    // The bytes on disk are what is freed; they win over the recorded size.
    for (d, s) in stored {
        sizes.insert(d, *s);
    }
    let mut out: Vec<(Digest, u64)> = sizes
        .into_iter()
        .filter(|(d, _)| !referenced.contains(d.as_str()) && !young(&touched, d, cutoff))
        .map(|(d, s)| (d.clone(), s))
        .collect();
    out.sort();
    out
}
