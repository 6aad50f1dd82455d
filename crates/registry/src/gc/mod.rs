//! Online garbage collection: it runs while the registry serves.
//!
//! One run has three phases, each marking from a fresh metadata snapshot:
//! 1. upload sessions started longer ago than `upload_ttl` are removed;
//! 2. in the projects that opted in, untagged manifests are removed (see
//!    `mark::untagged_manifests` for what is kept);
//! 3. blobs and blob-store files that no manifest references are removed,
//!    with their links.
//!
//! Why it is safe against concurrent pushes:
//! - the grace window: anything committed, linked or referenced within
//!   `grace` is never a candidate (layers arrive before their manifest);
//! - every removal is a metadata transaction that re-checks the digest's
//!   touch (`metadata::SweepGuard`), so a push that referenced it after the
//!   snapshot wins;
//! - the removal transaction claims the digests whose bytes it deletes, and
//!   releases them once they are deleted; a push reads the store's byte
//!   fence before writing bytes, and its metadata commit is refused if a
//!   claim came after that fence or is not released (`metadata::Admission`).
//!   So the sweep never deletes bytes a push has written but not yet
//!   recorded, with no lock shared by the two: they may run on two nodes.
//!   A run first finishes the claims of a run that died between its sweep and
//!   the deletion.
//!
//! It is throttled: removals go in small batches, and after each batch it
//! rests for at least `pause`, and long enough that its work takes at most
//! `duty` of the wall time. So serving keeps the store's single writer, the
//! disk and the cores most of the time, whatever a batch costs on this
//! machine. (In `berth serve` it also runs at idle CPU priority.)

use std::collections::HashSet;
use std::time::{Duration, Instant};

use metadata::{ManifestSweep, SweepGuard};
use oci::Digest;

use crate::{now, Registry, Result};

pub mod mark;

#[derive(Debug, Clone, PartialEq)]
pub struct GcOptions {
    /// Anything committed, linked or referenced within this window is kept.
    pub grace: Duration,
    /// Upload sessions started longer ago than this are abandoned.
    pub upload_ttl: Duration,
    /// Projects whose untagged manifests are removed; `*` means every project.
    pub untagged_projects: Vec<String>,
    /// Report what would be removed, remove nothing.
    pub dry_run: bool,
    /// Removals per metadata transaction.
    pub batch: usize,
    /// Least pause between batches, to leave the store to serving.
    pub pause: Duration,
    /// Most share of wall time spent working, in (0, 1]: after a batch that
    /// took `t`, GC rests at least `t * (1 - duty) / duty`.
    pub duty: f64,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: Duration::from_secs(3600),
            upload_ttl: Duration::from_secs(24 * 3600),
            untagged_projects: Vec::new(),
            dry_run: false,
            // Measured (docs/BENCHMARKS.md): with these, pulls' p99 while GC
            // runs stays within 10 % of an idle registry's, and GC still
            // frees 100 to 200 objects a second on a busy 2-core machine.
            batch: 8,
            pause: Duration::from_millis(20),
            duty: 0.1,
        }
    }
}

impl GcOptions {
    fn prunes(&self, project: &str) -> bool {
        self.untagged_projects.iter().any(|p| p == "*" || p == project)
    }
}

/// What a run removed (or, in a dry run, would remove).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub dry_run: bool,
    pub uploads: u64,
    pub upload_bytes: u64,
    pub manifests: u64,
    /// Blob-store objects: layers, configs, and the bytes of removed manifests.
    pub blobs: u64,
    pub blob_bytes: u64,
    /// Repository links removed with their blobs.
    pub links: u64,
}

impl GcReport {
    pub fn bytes_freed(&self) -> u64 {
        self.upload_bytes + self.blob_bytes
    }

    pub fn objects_freed(&self) -> u64 {
        self.uploads + self.manifests + self.blobs
    }
}

impl std::fmt::Display for GcReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.dry_run { "would free" } else { "freed" };
        write!(
            f,
            "{verb} {} bytes in {} objects: {} blobs ({} bytes, {} links), {} untagged manifests, {} abandoned uploads ({} bytes)",
            self.bytes_freed(),
            self.objects_freed(),
            self.blobs,
            self.blob_bytes,
            self.links,
            self.manifests,
            self.uploads,
            self.upload_bytes
        )
    }
}

impl Registry {
    /// One garbage collection run. Safe while the registry serves.
    pub async fn gc(&self, opts: &GcOptions) -> Result<GcReport> {
        let batch = opts.batch.max(1);
        let mut report = GcReport {
            dry_run: opts.dry_run,
            ..GcReport::default()
        };
        let start = now();
        let cutoff = grace_cutoff(opts.grace);

        self.finish_claims().await?;

        // 1. Abandoned uploads.
        let snap = self.meta.gc_snapshot().await?;
        let abandoned = mark::abandoned_uploads(&snap, start.saturating_sub(opts.upload_ttl.as_secs()));
        for chunk in abandoned.chunks(batch) {
            let work = Instant::now();
            for id in chunk {
                let freed = if opts.dry_run {
                    self.blobs.upload_size(id).await?
                } else {
                    self.upload_expire(id).await?
                };
                if let Some(bytes) = freed {
                    report.uploads += 1;
                    report.upload_bytes += bytes;
                }
            }
            gc_pause(opts, work.elapsed()).await;
        }

        // 2. Untagged manifests.
        let untagged = if opts.untagged_projects.is_empty() {
            Vec::new()
        } else {
            mark::untagged_manifests(&snap, |p| opts.prunes(p), cutoff)
        };
        let guard = SweepGuard { seq: snap.seq, cutoff };
        if opts.dry_run {
            report.manifests = untagged.len() as u64;
            let removed: HashSet<_> = untagged
                .iter()
                .map(|m| (m.repo.to_string(), m.digest.clone()))
                .collect();
            let stored = storage::list_all(self.blobs.as_ref()).await?;
            for (_, size) in mark::unreferenced_blobs(&snap, &removed, &stored, cutoff) {
                report.blobs += 1;
                report.blob_bytes += size;
            }
            return Ok(report);
        }
        for chunk in untagged.chunks(batch) {
            let work = Instant::now();
            report.manifests += self.sweep_manifests(chunk, guard).await?;
            gc_pause(opts, work.elapsed()).await;
        }

        // 3. Unreferenced blobs, marked from a snapshot taken after phase 2.
        self.sweep_blobs(None, opts, cutoff, &mut report).await?;
        tracing::info!(%report, "garbage collection finished");
        Ok(report)
    }

    /// Phase 3 alone, limited to `only`: frees the bytes of blobs the
    /// pull-through cache evicted, once nothing references them and the
    /// grace window has passed (a push may be about to reference them).
    pub async fn gc_blobs(&self, only: &HashSet<Digest>, opts: &GcOptions) -> Result<GcReport> {
        let mut report = GcReport::default();
        let cutoff = grace_cutoff(opts.grace);
        self.sweep_blobs(Some(only), opts, cutoff, &mut report).await?;
        Ok(report)
    }

    async fn sweep_blobs(
        &self,
        only: Option<&HashSet<Digest>>,
        opts: &GcOptions,
        cutoff: u64,
        report: &mut GcReport,
    ) -> Result<()> {
        let batch = opts.batch.max(1);
        let snap = self.meta.gc_snapshot().await?;
        let stored = storage::list_all(self.blobs.as_ref()).await?;
        let guard = SweepGuard { seq: snap.seq, cutoff };
        let mut candidates = mark::unreferenced_blobs(&snap, &HashSet::new(), &stored, cutoff);
        if let Some(only) = only {
            candidates.retain(|(d, _)| only.contains(d));
        }
        for chunk in candidates.chunks(batch) {
            let work = Instant::now();
            let digests: Vec<Digest> = chunk.iter().map(|(d, _)| d.clone()).collect();
            let swept = self.meta.sweep_blobs(&digests, guard).await?;
            let deleted = self.delete_claimed(swept.iter().map(|s| &s.digest)).await?;
            for s in swept.iter().filter(|s| deleted.contains(&s.digest)) {
                let size = chunk.iter().find(|(d, _)| *d == s.digest).map(|(_, n)| *n);
                report.blobs += 1;
                report.blob_bytes += size.or(s.size).unwrap_or(0);
                report.links += s.links as u64;
            }
            gc_pause(opts, work.elapsed()).await;
        }
        Ok(())
    }

    /// The byte fence for writing `digest` (see `metadata::Admission`). While
    /// GC is deleting the digest's bytes, waits for it to finish (a batch
    /// takes milliseconds), so the bytes about to be written come after the
    /// deletion.
    pub(crate) async fn byte_fence(&self, digest: &Digest) -> Result<u64> {
        let mut waited = Duration::ZERO;
        loop {
            match self.meta.byte_fence(digest).await {
                Err(metadata::MetaError::Conflict(metadata::Conflict::Fenced(_))) if waited < FENCE_WAIT => {
                    tokio::time::sleep(FENCE_POLL).await;
                    waited += FENCE_POLL;
                }
                other => return Ok(other?),
            }
        }
    }

    /// Deletes the bytes of digests a sweep claimed, then releases the
    /// claims. The metadata no longer knows these blobs, so deleting their
    /// bytes cannot break a reader. Returns those whose bytes are gone; a
    /// failure leaves an orphan file that the next run removes.
    pub(crate) async fn delete_claimed<'a>(
        &self,
        claimed: impl Iterator<Item = &'a Digest>,
    ) -> Result<HashSet<Digest>> {
        let mut claims = Vec::new();
        let mut deleted = HashSet::new();
        for d in claimed {
            match self.blobs.delete(d).await {
                Ok(()) => {
                    deleted.insert(d.clone());
                }
                Err(e) => {
                    tracing::warn!(digest = %d, error = %e, "could not delete an unreferenced blob; the next GC run retries")
                }
            }
            claims.push(d.clone());
        }
        if !claims.is_empty() {
            self.meta.release_claims(&claims).await?;
        }
        Ok(deleted)
    }

    /// Deletes the bytes of claims a run that died left unreleased (pushes
    /// of those digests are refused until then), and forgets claims released
    /// long before any push still in flight read its fence.
    async fn finish_claims(&self) -> Result<()> {
        let forget_before = now().saturating_sub(CLAIM_MEMORY.as_secs());
        let unreleased = self.meta.unreleased_claims(forget_before).await?;
        if !unreleased.is_empty() {
            tracing::info!(
                count = unreleased.len(),
                "finishing the deletions of a garbage collection run that stopped"
            );
            self.delete_claimed(unreleased.iter()).await?;
        }
        Ok(())
    }

    /// One transaction per batch: a store that syncs every commit pays
    /// one sync per batch, not per manifest.
    async fn sweep_manifests(&self, chunk: &[ManifestSweep], guard: SweepGuard) -> Result<u64> {
        let removed = self.meta.sweep_manifests(chunk, guard).await?;
        let mut n = 0;
        for (m, size) in chunk.iter().zip(removed) {
            if size.is_some() {
                // A cached copy must not outlive the manifest.
                self.manifests_changed(&m.repo);
                tracing::debug!(repo = %m.repo, digest = %m.digest, "removed an untagged manifest");
                n += 1;
            }
        }
        Ok(n)
    }
}

/// How long a writer waits for GC to finish deleting a digest's bytes
/// before it gives up (`503`, push again), and how often it looks.
const FENCE_WAIT: Duration = Duration::from_secs(2);
const FENCE_POLL: Duration = Duration::from_millis(10);

/// How long a released claim is remembered: longer than any push takes
/// from reading the byte fence to its metadata commit.
const CLAIM_MEMORY: Duration = Duration::from_secs(3600);

/// The latest touch time (whole seconds, as stored) that may be removed:
/// a touch stored as `t` happened in `[t, t + 1)`, so only `t + 1 <= now -
/// grace` is surely older than `grace`. Comparing `t` with `now - grace`
/// in whole seconds left a grace of up to a second short.
fn grace_cutoff(grace: Duration) -> u64 {
    if grace.is_zero() {
        // No window: only the sequence number protects concurrent pushes.
        return u64::MAX;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.saturating_sub(grace).as_secs().saturating_sub(1)
}

/// How long to rest after a batch that took `work`.
fn rest_after(opts: &GcOptions, work: Duration) -> Duration {
    let duty = if opts.duty.is_finite() {
        opts.duty.clamp(0.01, 1.0)
    } else {
        1.0
    };
    opts.pause.max(work.mul_f64((1.0 - duty) / duty))
}

async fn gc_pause(opts: &GcOptions, work: Duration) {
    let rest = rest_after(opts, work);
    if rest.is_zero() {
        tokio::task::yield_now().await;
    } else {
        tokio::time::sleep(rest).await;
    }
}

#[cfg(test)]
pub(crate) mod tests;

#[cfg(test)]
mod throttle_tests {
    use super::*;

    #[test]
    fn rest_keeps_work_to_its_duty_share() {
        let ms = Duration::from_millis;
        let opts = |pause, duty| GcOptions {
            pause: ms(pause),
            duty,
            ..GcOptions::default()
        };
        // 20 %: a 10 ms batch rests 40 ms; the pause is a floor.
        assert_eq!(rest_after(&opts(20, 0.2), ms(10)), ms(40));
        assert_eq!(rest_after(&opts(20, 0.2), ms(1)), ms(20));
        // 100 %: only the pause.
        assert_eq!(rest_after(&opts(0, 1.0), ms(10)), ms(0));
        // Nonsense is clamped, not a panic or an endless rest.
        assert_eq!(rest_after(&opts(0, 0.0), ms(1)), ms(99));
        assert_eq!(rest_after(&opts(0, f64::NAN), ms(10)), ms(0));
    }
}
