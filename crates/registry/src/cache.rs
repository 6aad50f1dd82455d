//! Hot manifests in memory: tag → digest, and (repo, digest) → bytes, so a
//! pull of a hot image touches neither the metadata store nor the disk.
//!
//! Correctness rules (a tag move or delete is visible as soon as the write
//! returns):
//! - every manifest write (put, delete by digest or by tag) drops the
//!   repository's entries after the metadata commit;
//! - a reader that missed records the generation before reading the store,
//!   and inserts only if no write happened meanwhile. Without that, a read
//!   racing a write could put the old value back after the write dropped it.
//!
//! With a store other nodes write (`MetadataStore::shared`), their writes
//! arrive through the store's change feed (`Registry` is its
//! `ChangeSink`), which drops the repository's entries the same way. A
//! notification can be late or lost, so the cache answers only within
//! `FRESH_FOR` of the feed's last proof that it had heard every change
//! committed before a moment (`caught_up`): a hit is never older than that
//! bound, whatever happened to the feed, and a hit costs no round trip.
//! Without such a proof (the feed is down) every read goes to the store.
//!
//! The bound is on manifest bytes; when it is exceeded, whole repositories
//! are dropped, oldest first (FIFO: cheap, and hot repositories come back
//! on their next read).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use foldhash::HashMap;
use oci::{Digest, RepoName, Tag};

/// A manifest as served.
#[derive(Debug)]
pub struct Cached {
    pub media_type: String,
    pub bytes: Bytes,
}

#[derive(Default)]
struct Repo {
    tags: HashMap<Tag, Digest>,
    manifests: HashMap<Digest, Arc<Cached>>,
    bytes: usize,
}

#[derive(Default)]
struct Inner {
    generation: u64,
    repos: HashMap<RepoName, Repo>,
    /// Insertion order of `repos`, for eviction. May name repositories
    /// already dropped; those are skipped.
    order: VecDeque<RepoName>,
    bytes: usize,
}

pub struct ManifestCache {
    inner: Mutex<Inner>,
    max_bytes: usize,
    /// With a shared store: until when hits may be served.
    fresh: Option<Freshness>,
}

/// How long after the change feed's last proof (`caught_up`) the cache of a
/// shared store may answer: the most a hit can lag a write another node
/// acknowledged. The feed proves itself every `CHANGES_CONFIRMED_EVERY`,
/// so a feed working normally keeps the cache on all the time.
pub const FRESH_FOR: Duration = Duration::from_secs(2);

/// The deadline of hits, as nanoseconds after `base` (0: none).
struct Freshness {
    base: Instant,
    until: AtomicU64,
}

impl Freshness {
    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Manifests larger than this are not cached: they are rare, and would
/// crowd out many small ones.
pub(crate) const MAX_ENTRY: usize = 256 * 1024;
/// Bookkeeping charged per entry on top of its bytes.
const OVERHEAD: usize = 256;

impl ManifestCache {
    /// `shared`: other nodes write the store; hits are then served only
    /// while the change feed keeps proving it is caught up.
    pub fn new(max_bytes: usize, shared: bool) -> ManifestCache {
        ManifestCache {
            inner: Mutex::new(Inner::default()),
            max_bytes,
            fresh: shared.then(|| Freshness {
                base: Instant::now(),
                until: AtomicU64::new(0),
            }),
        }
    }

    /// Whether hits may be served now (always, with a store only this
    /// process writes).
    pub fn fresh(&self) -> bool {
        match &self.fresh {
            None => true,
            Some(f) => f.now() < f.until.load(Ordering::Acquire),
        }
    }

    /// The change feed heard every change committed before `at`.
    pub fn caught_up(&self, at: Instant) {
        if let Some(f) = &self.fresh {
            let deadline = (at + FRESH_FOR).saturating_duration_since(f.base);
            f.until
                .fetch_max(u64::try_from(deadline.as_nanos()).unwrap_or(u64::MAX), Ordering::AcqRel);
        }
    }

    /// Whether the feed proved it heard every change committed before `t`.
    #[cfg(test)]
    pub(crate) fn caught_up_after(&self, t: Instant) -> bool {
        self.fresh.as_ref().is_some_and(|f| {
            let after = (t + FRESH_FOR).saturating_duration_since(f.base);
            u128::from(f.until.load(Ordering::Acquire)) > after.as_nanos()
        })
    }

    /// Changes may have been missed: drops everything, and serves nothing
    /// until the next `caught_up`.
    pub fn reset(&self) {
        if let Some(f) = &self.fresh {
            f.until.store(0, Ordering::Release);
        }
        let mut inner = self.lock();
        inner.generation += 1;
        inner.repos.clear();
        inner.order.clear();
        inner.bytes = 0;
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take this before reading the store; pass it to `insert`.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    pub fn tag(&self, repo: &RepoName, tag: &Tag) -> Option<Digest> {
        if !self.fresh() {
            return None;
        }
        self.lock().repos.get(repo)?.tags.get(tag).cloned()
    }

    pub fn manifest(&self, repo: &RepoName, digest: &Digest) -> Option<Arc<Cached>> {
        if !self.fresh() {
            return None;
        }
        self.lock().repos.get(repo)?.manifests.get(digest).cloned()
    }

    /// Records what was read from the store at `generation`, unless a write
    /// has happened since.
    pub fn insert(&self, generation: u64, repo: &RepoName, tag: Option<&Tag>, digest: &Digest, m: Arc<Cached>) {
        if self.max_bytes == 0 || m.bytes.len() > MAX_ENTRY {
            return;
        }
        let mut inner = self.lock();
        if inner.generation != generation {
            return;
        }
        let cost = m.bytes.len() + OVERHEAD;
        let fresh = !inner.repos.contains_key(repo);
        if fresh {
            inner.order.push_back(repo.clone());
        }
        let entry = inner.repos.entry(repo.clone()).or_default();
        let mut added = 0;
        if !entry.manifests.contains_key(digest) {
            entry.manifests.insert(digest.clone(), m);
            entry.bytes += cost;
            added += cost;
        }
        if let Some(t) = tag {
            if entry.tags.insert(t.clone(), digest.clone()).is_none() {
                entry.bytes += OVERHEAD;
                added += OVERHEAD;
            }
        }
        inner.bytes += added;
        while inner.bytes > self.max_bytes {
            let Some(old) = inner.order.pop_front() else { break };
            if let Some(r) = inner.repos.remove(&old) {
                inner.bytes -= r.bytes;
            }
        }
    }

    /// Drops everything cached for `repo`; call after every manifest write.
    pub fn invalidate(&self, repo: &RepoName) {
        let mut inner = self.lock();
        inner.generation += 1;
        if let Some(r) = inner.repos.remove(repo) {
            inner.bytes -= r.bytes;
        }
        // `order` keeps the name; eviction skips names no longer present,
        // and a re-inserted repository gets a new place at the back.
        if inner.order.len() > 2 * inner.repos.len() + 64 {
            let Inner { order, repos, .. } = &mut *inner;
            order.retain(|r| repos.contains_key(r));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(body: &[u8]) -> Arc<Cached> {
        Arc::new(Cached {
            media_type: oci::media::OCI_MANIFEST.into(),
            bytes: Bytes::copy_from_slice(body),
        })
    }

    fn names() -> (RepoName, Tag, Digest) {
        ("a/b".parse().unwrap(), "v1".parse().unwrap(), Digest::sha256(b"m1"))
    }

    #[test]
    fn hit_after_insert_and_miss_after_invalidate() {
        let c = ManifestCache::new(1 << 20, false);
        let (repo, tag, d) = names();
        let g = c.generation();
        c.insert(g, &repo, Some(&tag), &d, m(b"m1"));
        assert_eq!(c.tag(&repo, &tag), Some(d.clone()));
        assert_eq!(&c.manifest(&repo, &d).unwrap().bytes[..], b"m1");
        c.invalidate(&repo);
        assert_eq!(c.tag(&repo, &tag), None);
        assert!(c.manifest(&repo, &d).is_none());
    }

    #[test]
    fn a_read_that_raced_a_write_is_not_cached() {
        let c = ManifestCache::new(1 << 20, false);
        let (repo, tag, d) = names();
        let before = c.generation();
        // A write commits and invalidates while the reader is in the store.
        c.invalidate(&repo);
        c.insert(before, &repo, Some(&tag), &d, m(b"stale"));
        assert_eq!(c.tag(&repo, &tag), None);
    }

    /// With a shared store nothing is served before the feed's first
    /// proof, within `FRESH_FOR` of the last one, or after a reset.
    #[test]
    fn a_shared_store_s_cache_answers_only_while_the_feed_proves_itself() {
        let c = ManifestCache::new(1 << 20, true);
        let (repo, tag, d) = names();
        c.insert(c.generation(), &repo, Some(&tag), &d, m(b"m1"));
        assert_eq!(c.tag(&repo, &tag), None, "no proof yet");
        c.caught_up(Instant::now());
        assert_eq!(c.tag(&repo, &tag), Some(d.clone()));
        assert!(c.manifest(&repo, &d).is_some());
        // A proof older than the bound is no proof.
        let c2 = ManifestCache::new(1 << 20, true);
        c2.insert(c2.generation(), &repo, Some(&tag), &d, m(b"m1"));
        c2.caught_up(Instant::now().checked_sub(FRESH_FOR).unwrap_or_else(Instant::now));
        assert_eq!(c2.tag(&repo, &tag), None);
        // A reset forgets, and needs a new proof.
        c.reset();
        assert_eq!(c.tag(&repo, &tag), None);
        c.insert(c.generation(), &repo, Some(&tag), &d, m(b"m1"));
        assert_eq!(c.tag(&repo, &tag), None);
        c.caught_up(Instant::now());
        assert_eq!(c.tag(&repo, &tag), Some(d));
    }

    #[test]
    fn stays_within_its_bound() {
        let c = ManifestCache::new(10 * (1000 + 2 * OVERHEAD), false);
        for i in 0..100 {
            let repo: RepoName = format!("r{i}").parse().unwrap();
            let d = Digest::sha256(format!("{i}").as_bytes());
            c.insert(c.generation(), &repo, Some(&"t".parse().unwrap()), &d, m(&[0u8; 1000]));
            assert!(c.lock().bytes <= c.max_bytes);
        }
        let last: RepoName = "r99".parse().unwrap();
        assert!(c.tag(&last, &"t".parse().unwrap()).is_some());
        assert!(c.tag(&"r0".parse().unwrap(), &"t".parse().unwrap()).is_none());
        // Too large to cache at all.
        let repo: RepoName = "big".parse().unwrap();
        let d = Digest::sha256(b"big");
        c.insert(c.generation(), &repo, None, &d, m(&vec![0u8; MAX_ENTRY + 1]));
        assert!(c.manifest(&repo, &d).is_none());
    }
}
