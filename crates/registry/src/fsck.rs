//! `fsck`: checks that the bytes and the metadata agree. Every blob in the
//! store is re-hashed and its size compared with its record; the metadata is
//! checked for dangling references (tags to missing manifests, manifests to
//! blobs they no longer have, links and records of missing bytes). With
//! `repair`, it fixes what it can without losing anything that was
//! readable: it drops links and records of missing or corrupt bytes (so a
//! client pushes them again instead of being told they exist) and tags of
//! missing manifests. A manifest missing a blob is reported, never removed:
//! only its owner can tell whether to push the blob again or delete it.
//!
//! Repairs assume nothing pushes meanwhile: `berth fsck` runs on a stopped
//! registry's data directory.

use std::collections::{BTreeMap, HashMap, HashSet};

use futures_util::StreamExt;
use metadata::SweepGuard;
use oci::{Digest, Reference, RepoName, Tag};

use crate::{Registry, Result};

/// One inconsistency.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Finding {
    /// The bytes under `digest` do not hash to it, or differ from the record's size.
    BlobCorrupt { digest: Digest, reason: String },
    /// Metadata records a blob whose bytes are gone.
    BlobMissing { digest: Digest },
    /// A repository links a blob that is not stored.
    LinkToMissingBlob { repo: String, digest: Digest },
    /// A tag points at a manifest its repository does not have.
    TagToMissingManifest { repo: String, tag: String, digest: Digest },
    /// A manifest references a blob its repository cannot read.
    ManifestMissingBlob {
        repo: String,
        manifest: Digest,
        blob: Digest,
    },
    /// A manifest is recorded but its bytes are gone.
    ManifestBytesMissing { repo: String, digest: Digest },
    /// A manifest is recorded but its stored bytes are not the ones pushed
    /// (`reason` as for `BlobCorrupt`: what they hash to, or why unreadable).
    ManifestBytesCorrupt {
        repo: String,
        digest: Digest,
        reason: String,
    },
}

impl Finding {
    /// Whether `repair` fixes it.
    pub fn repairable(&self) -> bool {
        !matches!(
            self,
            Finding::ManifestMissingBlob { .. }
                | Finding::ManifestBytesMissing { .. }
                | Finding::ManifestBytesCorrupt { .. }
        )
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::BlobCorrupt { digest, reason } => write!(f, "blob {digest} is corrupt: {reason}"),
            Finding::BlobMissing { digest } => write!(f, "blob {digest} is recorded but its bytes are missing"),
            Finding::LinkToMissingBlob { repo, digest } => {
                write!(f, "repository {repo} links blob {digest}, which is not stored")
            }
            Finding::TagToMissingManifest { repo, tag, digest } => {
                write!(f, "tag {repo}:{tag} points at manifest {digest}, which is not in the repository")
            }
            Finding::ManifestMissingBlob { repo, manifest, blob } => write!(
                f,
                "manifest {manifest} of {repo} references blob {blob}, which the repository cannot read; push the blob again or delete the manifest"
            ),
            Finding::ManifestBytesMissing { repo, digest } => write!(
                f,
                "manifest {digest} of {repo} is recorded but its bytes are missing; push it again or delete it"
            ),
            Finding::ManifestBytesCorrupt { repo, digest, reason } => write!(
                f,
                "manifest {digest} of {repo} is corrupt: expected digest {digest}, {reason}; push it again or delete it"
            ),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FsckReport {
    pub blobs_checked: u64,
    pub bytes_checked: u64,
    pub findings: Vec<Finding>,
    /// Findings fixed by `repair`.
    pub repaired: u64,
}

impl Registry {
    /// Checks every blob and the metadata; with `repair`, fixes what is safe.
    /// `progress(done, total)` is called after each blob is verified.
    pub async fn fsck(&self, repair: bool, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<FsckReport> {
        let snap = self.meta.gc_snapshot().await?;
        let stored = storage::list_all(self.blobs.as_ref()).await?;
        let mut report = FsckReport::default();
        let total = stored.len() as u64;
        let records: BTreeMap<&Digest, u64> = snap.blobs.iter().map(|(d, s)| (d, *s)).collect();
        // Bytes that are present and verified.
        let mut good: HashSet<Digest> = HashSet::new();
        let mut bad: Vec<Digest> = Vec::new();
        // Why each present but bad blob is bad, for the manifests stored in it.
        let mut corrupt: HashMap<Digest, String> = HashMap::new();
        for (digest, size) in &stored {
            let mut hasher = digest.algorithm().hasher();
            let mut read = 0u64;
            let mut stream = self.blobs.get(digest, None).await?;
            let mut failed = None;
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(c) => {
                        hasher.update(&c);
                        read += c.len() as u64;
                    }
                    Err(e) => {
                        failed = Some(format!("unreadable: {e}"));
                        break;
                    }
                }
            }
            report.blobs_checked += 1;
            report.bytes_checked += read;
            let reason = failed
                .or_else(|| {
                    let actual = hasher.finish();
                    (actual != *digest).then(|| format!("its bytes hash to {actual}"))
                })
                .or_else(|| match records.get(digest) {
                    Some(&rec) if rec != *size => Some(format!("{size} bytes stored, {rec} recorded")),
                    _ => None,
                });
            match reason {
                Some(reason) => {
                    report.findings.push(Finding::BlobCorrupt {
                        digest: digest.clone(),
                        reason: reason.clone(),
                    });
                    corrupt.insert(digest.clone(), reason);
                    bad.push(digest.clone());
                }
                None => {
                    good.insert(digest.clone());
                }
            }
            progress(report.blobs_checked, total);
        }
        let present: HashSet<&Digest> = stored.iter().map(|(d, _)| d).collect();
        for (d, _) in &snap.blobs {
            if !present.contains(d) {
                report.findings.push(Finding::BlobMissing { digest: d.clone() });
                bad.push(d.clone());
            }
        }
        let mut dead_links = Vec::new();
        for (repo, d) in &snap.links {
            if !present.contains(d) || !records.contains_key(d) {
                report.findings.push(Finding::LinkToMissingBlob {
                    repo: repo.clone(),
                    digest: d.clone(),
                });
                dead_links.push((repo.clone(), d.clone()));
            }
        }
        let manifests: HashSet<(&str, &Digest)> = snap.manifests.iter().map(|m| (m.repo.as_str(), &m.digest)).collect();
        let links: HashSet<(&str, &str)> = snap.links.iter().map(|(r, d)| (r.as_str(), d.as_str())).collect();
        let mut dead_tags = Vec::new();
        for (repo, tag, d) in &snap.tags {
            if !manifests.contains(&(repo.as_str(), d)) {
                report.findings.push(Finding::TagToMissingManifest {
                    repo: repo.clone(),
                    tag: tag.clone(),
                    digest: d.clone(),
                });
                dead_tags.push((repo.clone(), tag.clone()));
            }
        }
        for m in &snap.manifests {
            if let Some(reason) = corrupt.get(&m.digest) {
                report.findings.push(Finding::ManifestBytesCorrupt {
                    repo: m.repo.clone(),
                    digest: m.digest.clone(),
                    reason: reason.clone(),
                });
            } else if !good.contains(&m.digest) {
                report.findings.push(Finding::ManifestBytesMissing {
                    repo: m.repo.clone(),
                    digest: m.digest.clone(),
                });
            }
            // A cached manifest's blobs arrive only when a client asks.
            let lazy = m.record.cached_from.is_some();
            for b in m.record.blobs.iter().filter(|_| !lazy) {
                let readable = links.contains(&(m.repo.as_str(), b.as_str()))
                    && b.parse::<Digest>().is_ok_and(|d| good.contains(&d));
                if !readable {
                    if let Ok(blob) = b.parse() {
                        report.findings.push(Finding::ManifestMissingBlob {
                            repo: m.repo.clone(),
                            manifest: m.digest.clone(),
                            blob,
                        });
                    }
                }
            }
        }
        report.findings.sort();
        report.findings.dedup();
        if repair {
            report.repaired = self.fsck_repair(&bad, &dead_links, &dead_tags).await?;
        }
        Ok(report)
    }

    async fn fsck_repair(&self, bad: &[Digest], links: &[(String, Digest)], tags: &[(String, String)]) -> Result<u64> {
        let mut repaired = 0;
        // Records, links and bytes of missing or corrupt blobs go together,
        // so a client's next push uploads them again.
        let everything = SweepGuard {
            seq: u64::MAX,
            cutoff: u64::MAX,
        };
        for chunk in bad.chunks(64) {
            let swept = self.meta.sweep_blobs(chunk, everything).await?;
            repaired += self.delete_claimed(swept.iter().map(|s| &s.digest)).await?.len() as u64;
        }
        for (repo, d) in links {
            if let Ok(repo) = repo.parse::<RepoName>() {
                if self.meta.unlink_blob(&repo, d, vec![]).await? {
                    repaired += 1;
                }
            }
        }
        for (repo, tag) in tags {
            if let (Ok(repo), Ok(tag)) = (repo.parse::<RepoName>(), tag.parse::<Tag>()) {
                if self.manifest_delete(&repo, &Reference::Tag(tag)).await.is_ok() {
                    repaired += 1;
                }
            }
        }
        Ok(repaired)
    }
}

#[cfg(test)]
mod tests {
    use oci::Reference;

    use crate::gc::tests::{env, pull, push, repo, upload};

    fn no_progress(_: u64, _: u64) {}

    #[tokio::test]
    async fn finds_corrupt_and_missing_blobs_and_repairs_what_is_safe() {
        let e = env().await;
        let (a, b) = (repo("p/a"), repo("p/b"));
        let m = push(&e.reg, &a, b"cfg", &[b"layer"], Some("v1")).await;
        assert_eq!(
            e.reg.mount(&b, &oci::Digest::sha256(b"cfg"), Some(&a)).await.unwrap(),
            Some(3)
        );
        let clean = e.reg.fsck(false, &no_progress).await.unwrap();
        assert!(clean.findings.is_empty(), "{:?}", clean.findings);
        assert_eq!(clean.blobs_checked, 3);

        let (cfg, layer) = (oci::Digest::sha256(b"cfg"), oci::Digest::sha256(b"layer"));
        let path = |d: &oci::Digest| e.root().join("blobs/sha256").join(&d.hex()[..2]).join(d.hex());
        std::fs::write(path(&layer), b"LAYER").unwrap();
        std::fs::remove_file(path(&cfg)).unwrap();
        let found = e.reg.fsck(false, &no_progress).await.unwrap();
        let text: Vec<String> = found.findings.iter().map(|f| f.to_string()).collect();
        assert_eq!(found.findings.len(), 6, "{text:#?}");
        assert!(text
            .iter()
            .any(|t| t.contains(&format!("blob {layer} is corrupt: its bytes hash to"))));
        assert!(text
            .iter()
            .any(|t| t == &format!("blob {cfg} is recorded but its bytes are missing")));
        assert!(text
            .iter()
            .any(|t| t.contains(&format!("repository p/b links blob {cfg}"))));
        assert!(text
            .iter()
            .any(|t| t.contains(&format!("repository p/a links blob {cfg}"))));
        assert_eq!(
            text.iter()
                .filter(|t| t.contains(&format!("manifest {m} of p/a references blob")))
                .count(),
            2
        );

        let fixed = e.reg.fsck(true, &no_progress).await.unwrap();
        assert_eq!(fixed.repaired, 2, "the corrupt and the missing blob, with their links");
        let after = e.reg.fsck(false, &no_progress).await.unwrap();
        assert!(after.findings.iter().all(|f| !f.repairable()), "{:?}", after.findings);
        assert_eq!(after.findings.len(), 2);
        // The client pushes the blobs again; everything is whole.
        upload(&e.reg, &a, b"cfg").await;
        upload(&e.reg, &a, b"layer").await;
        assert!(e.reg.fsck(false, &no_progress).await.unwrap().findings.is_empty());
        pull(&e.reg, &a, &m).await.unwrap();
        assert!(e.reg.manifest_get(&a, &Reference::Digest(m), false).await.is_ok());
    }

    #[tokio::test]
    async fn usage_counts_shared_layers_once_per_project() {
        let e = env().await;
        let big = vec![7u8; 1000];
        let m1 = manifest_len(b"c1", &big);
        push(&e.reg, &repo("p/a"), b"c1", &[&big], Some("v1")).await;
        push(&e.reg, &repo("p/b"), b"c2", &[&big], Some("v1")).await;
        push(&e.reg, &repo("q/c"), b"c3", &[&big], Some("v1")).await;
        let u = e.reg.usage().await.unwrap();
        let m2 = manifest_len(b"c2", &big);
        let m3 = manifest_len(b"c3", &big);
        assert_eq!(u.repos["p/a"], 2 + 1000 + m1);
        assert_eq!(u.repos["p/b"], 2 + 1000 + m2);
        assert_eq!(
            u.projects["p"],
            2 + 2 + 1000 + m1 + m2,
            "the shared layer counts once in p"
        );
        assert_eq!(u.projects["q"], 2 + 1000 + m3);
        assert_eq!(u.stored, 6 + 1000 + m1 + m2 + m3);
        assert_eq!(u.saved(), 2000);
    }

    fn manifest_len(cfg: &[u8], layer: &[u8]) -> u64 {
        crate::gc::tests::manifest(cfg, &[layer]).len() as u64
    }
}
