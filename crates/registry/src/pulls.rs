//! Last-pull times of tags, for retention's `pulled-within-days`. A pull
//! only updates an in-memory map (no I/O on the request path); the map is
//! written to the metadata store in one transaction by `flush_pulls`, which
//! the serve schedule and retention call. Pulls since the last flush are
//! lost if the process dies, which at worst makes retention see a pull as
//! older than it was.

use std::sync::Mutex;

use foldhash::HashMap;
use oci::{Reference, RepoName};

use crate::{now, Registry, Result};

/// repo -> tag -> last pull (seconds). Nested so that noting a pull of a tag
/// already in the map looks it up by `&str` and allocates nothing: this runs
/// on every manifest GET and HEAD.
type Pending = HashMap<String, HashMap<String, u64>>;

#[derive(Default)]
pub(crate) struct PullLog {
    pending: Mutex<Pending>,
}

impl PullLog {
    pub(crate) fn note(&self, repo: &RepoName, reference: &Reference) {
        if let Reference::Tag(t) = reference {
            let t_now = now();
            let mut m = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            match m.get_mut(repo.as_str()).and_then(|tags| tags.get_mut(t.as_str())) {
                Some(last) => *last = t_now,
                None => {
                    m.entry(repo.to_string()).or_default().insert(t.to_string(), t_now);
                }
            }
        }
    }

    fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn put_back(&self, pulls: Pending) {
        let mut m = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for (repo, tags) in pulls {
            let entry = m.entry(repo).or_default();
            for (tag, t) in tags {
                let e = entry.entry(tag).or_insert(t);
                *e = (*e).max(t);
            }
        }
    }
}

impl Registry {
    /// Writes the pulls noted since the last flush. Returns how many.
    pub async fn flush_pulls(&self) -> Result<usize> {
        let pending = self.pulls.take();
        if pending.is_empty() {
            return Ok(0);
        }
        let batch: Vec<(String, String, u64)> = pending
            .iter()
            .flat_map(|(r, tags)| tags.iter().map(move |(t, time)| (r.clone(), t.clone(), *time)))
            .collect();
        if let Err(e) = self.meta.record_pulls(&batch).await {
            // Keep them for the next flush.
            self.pulls.put_back(pending);
            return Err(e.into());
        }
        Ok(batch.len())
    }
}
