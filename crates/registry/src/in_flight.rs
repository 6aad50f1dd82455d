//! Manifest bodies being served right now, one buffer per (repository,
//! digest) however many requests send it, including manifests too large
//! for the hot cache or with the cache turned off.
//!
//! Without it, every GET of an uncached manifest read its own copy: 256
//! connections fetching a 4 MiB manifest held a gigabyte. Now the first
//! request reads the bytes once; every request that arrives while any
//! response still holds them (in the socket's queue, however slow the
//! reader) gets the same `Bytes`. An entry lives exactly as long as a body
//! or a loader holds it: the map keeps only weak references.

use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use foldhash::HashMap;
use oci::{Digest, RepoName};
use tokio::sync::OnceCell;

/// Dead entries are swept when the map has grown past this many, or past
/// twice what the last sweep left (so sweeps stay amortised O(1) per insert
/// however many manifests are being served at once).
const SWEEP_AT: usize = 64;

#[derive(Default)]
pub(crate) struct InFlight {
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    map: HashMap<(RepoName, Digest), Weak<Slot>>,
    /// The map's size at which the next sweep runs.
    sweep_at: usize,
}

/// One manifest's bytes, read at most once while anyone holds the slot.
#[derive(Default)]
pub(crate) struct Slot(OnceCell<Bytes>);

/// What a shared body owns: the slot, so the entry stays findable.
struct Held(Arc<Slot>);

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        self.0 .0.get().map(|b| &b[..]).unwrap_or_default()
    }
}

impl InFlight {
    /// The live slot for (`repo`, `digest`), or a new one.
    pub(crate) fn slot(&self, repo: &RepoName, digest: &Digest) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let key = (repo.clone(), digest.clone());
        if let Some(live) = slots.map.get(&key).and_then(Weak::upgrade) {
            return live;
        }
        if slots.map.len() >= slots.sweep_at.max(SWEEP_AT) {
            slots.map.retain(|_, w| w.strong_count() > 0);
            slots.sweep_at = 2 * slots.map.len();
        }
        let slot = Arc::new(Slot::default());
        slots.map.insert(key, Arc::downgrade(&slot));
        slot
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.map.values().filter(|w| w.strong_count() > 0).count()
    }
}

impl Slot {
    /// The bytes, read by `load` if no one has yet; concurrent callers wait
    /// for the one load. A failed load is retried by the next caller.
    pub(crate) async fn get_or_load<E, F>(self: &Arc<Self>, load: impl FnOnce() -> F) -> Result<Bytes, E>
    where
        F: std::future::Future<Output = Result<Bytes, E>>,
    {
        self.0.get_or_try_init(load).await?;
        Ok(Bytes::from_owner(Held(self.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn key() -> (RepoName, Digest) {
        ("a/b".parse().unwrap(), Digest::sha256(b"m"))
    }

    #[test]
    fn dead_entries_are_swept_and_live_ones_kept() {
        let f = InFlight::default();
        let repo: RepoName = "a/b".parse().unwrap();
        let live: Vec<_> = (0..100u32)
            .map(|i| f.slot(&repo, &Digest::sha256(&i.to_be_bytes())))
            .collect();
        for i in 100..10_000u32 {
            drop(f.slot(&repo, &Digest::sha256(&i.to_be_bytes())));
        }
        let map_len = f.slots.lock().unwrap().map.len();
        // 100 live slots, and dead ones up to twice that before a sweep.
        assert!(map_len <= 2 * 100 + 1, "{map_len} entries kept");
        assert_eq!(f.len(), 100);
        drop(live);
    }

    #[tokio::test]
    async fn one_load_while_a_body_lives_and_none_kept_after() {
        let f = InFlight::default();
        let (repo, d) = key();
        let loads = AtomicUsize::new(0);
        let load = || async {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>(Bytes::from(vec![7u8; 1 << 20]))
        };
        let a = f.slot(&repo, &d).get_or_load(load).await.unwrap();
        let b = f.slot(&repo, &d).get_or_load(load).await.unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        // The same memory, not a copy.
        assert_eq!(a.as_ptr(), b.as_ptr());
        assert_eq!(f.len(), 1);
        drop((a, b));
        assert_eq!(f.len(), 0);
        let _c = f.slot(&repo, &d).get_or_load(load).await.unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_load_is_retried() {
        let f = InFlight::default();
        let (repo, d) = key();
        let slot = f.slot(&repo, &d);
        assert!(slot.get_or_load(|| async { Err::<Bytes, _>("disk") }).await.is_err());
        let b = slot
            .get_or_load(|| async { Ok::<_, &str>(Bytes::from_static(b"ok")) })
            .await;
        assert_eq!(&b.unwrap()[..], b"ok");
    }
}
