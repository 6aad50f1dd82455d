//! Last-pull times of tags, for retention's `pulled-within-days`. A pull
//! only updates an in-memory map (no I/O on the request path); the map is
//! written to the metadata store in one transaction by `flush_pulls`, which
//! the serve schedule and retention call. Pulls since the last flush are
//! lost if the process dies, which at worst makes retention see a pull as
//! older than it was.

use std::collections::HashMap;
use std::sync::Mutex;

use oci::{Reference, RepoName};

use crate::{now, Registry, Result};

#[derive(Default)]
pub(crate) struct PullLog {
    pending: Mutex<HashMap<(String, String), u64>>,
}

impl PullLog {
    pub(crate) fn note(&self, repo: &RepoName, reference: &Reference) {
        if let Reference::Tag(t) = reference {
            let mut m = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            m.insert((repo.to_string(), t.to_string()), now());
        }
    }

    fn take(&self) -> HashMap<(String, String), u64> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn put_back(&self, pulls: HashMap<(String, String), u64>) {
        let mut m = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for (k, t) in pulls {
            let e = m.entry(k).or_insert(t);
            *e = (*e).max(t);
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
            .map(|((r, t), time)| (r.clone(), t.clone(), *time))
            .collect();
        if let Err(e) = self.meta.record_pulls(&batch).await {
            // Keep them for the next flush.
            self.pulls.put_back(pending);
            return Err(e.into());
        }
        Ok(batch.len())
    }
}
