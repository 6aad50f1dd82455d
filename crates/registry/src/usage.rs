//! Storage use per project and repository, and what deduplication saves,
//! computed from a metadata snapshot (no I/O on the bytes).
//!
//! A repository uses the blobs it links (layers and configs, whether or not
//! a manifest references them yet) plus its manifests. A project uses each
//! of its blobs once, however many of its repositories link it. `logical` is
//! the sum over repositories, as if nothing were shared; `stored` counts
//! every blob and manifest once; `saved` is the difference.

use std::collections::{BTreeMap, HashMap, HashSet};

use metadata::GcSnapshot;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes per repository.
    pub repos: BTreeMap<String, u64>,
    /// Bytes per project, each blob counted once within the project.
    pub projects: BTreeMap<String, u64>,
    pub logical: u64,
    pub stored: u64,
}

impl Usage {
    /// Bytes deduplication saves: `logical - stored`.
    pub fn saved(&self) -> u64 {
        self.logical.saturating_sub(self.stored)
    }
}

fn project(repo: &str) -> &str {
    repo.split('/').next().unwrap_or(repo)
}

pub fn usage(snap: &GcSnapshot) -> Usage {
    let sizes: HashMap<&str, u64> = snap.blobs.iter().map(|(d, s)| (d.as_str(), *s)).collect();
    let mut u = Usage::default();
    // Per repository and per project: the set of (digest, size) it holds.
    let mut repo_items: BTreeMap<&str, HashMap<&str, u64>> = BTreeMap::new();
    for (repo, d) in &snap.links {
        let size = sizes.get(d.as_str()).copied().unwrap_or(0);
        repo_items.entry(repo).or_default().insert(d.as_str(), size);
    }
    for m in &snap.manifests {
        repo_items
            .entry(&m.repo)
            .or_default()
            .insert(m.digest.as_str(), m.record.size);
    }
    let mut project_items: BTreeMap<&str, HashMap<&str, u64>> = BTreeMap::new();
    let mut everything: HashMap<&str, u64> = HashMap::new();
    for (repo, items) in &repo_items {
        let total: u64 = items.values().sum();
        u.repos.insert(repo.to_string(), total);
        u.logical += total;
        let p = project_items.entry(project(repo)).or_default();
        for (d, s) in items {
            p.insert(d, *s);
            everything.insert(d, *s);
        }
    }
    for (p, items) in project_items {
        u.projects.insert(p.to_string(), items.values().sum());
    }
    // Blobs no repository links still take space until GC removes them.
    let linked: HashSet<&str> = everything.keys().copied().collect();
    let unlinked: u64 = snap
        .blobs
        .iter()
        .filter(|(d, _)| !linked.contains(d.as_str()))
        .map(|(_, s)| *s)
        .sum();
    u.stored = everything.values().sum::<u64>() + unlinked;
    u.logical += unlinked;
    u
}

impl crate::Registry {
    /// Storage use, from a metadata snapshot.
    pub async fn usage(&self) -> crate::Result<Usage> {
        Ok(usage(&self.meta.gc_snapshot().await?))
    }
}
