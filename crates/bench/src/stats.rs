//! Per-worker counters and latency histogram, merged at the end, so the hot
//! loop shares nothing but one progress counter.

use std::collections::HashMap;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::outcome::{Failure, Outcome};

pub struct Stats {
    /// Latency of every completed operation, successful or not, in µs.
    pub latency: Histogram<u64>,
    pub ok: u64,
    pub failed: u64,
    pub bytes: u64,
    pub http_requests: u64,
    pub errors: HashMap<Failure, u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            // 1 µs to 1 h at 3 significant digits: about 1% error.
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            ok: 0,
            failed: 0,
            bytes: 0,
            http_requests: 0,
            errors: HashMap::new(),
        }
    }
}

impl Stats {
    pub fn record(&mut self, latency: Duration, outcome: &Outcome) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
        self.latency.saturating_record(us);
        match outcome {
            Ok(done) => {
                self.ok += 1;
                self.bytes += done.bytes;
                self.http_requests += u64::from(done.requests);
            }
            Err(f) => {
                self.failed += 1;
                self.http_requests += 1;
                *self.errors.entry(f.clone()).or_default() += 1;
            }
        }
    }

    pub fn merge(&mut self, other: Stats) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        self.ok += other.ok;
        self.failed += other.failed;
        self.bytes += other.bytes;
        self.http_requests += other.http_requests;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }

    pub fn total(&self) -> u64 {
        self.ok + self.failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Done;

    #[test]
    fn record_and_merge() {
        let mut a = Stats::default();
        a.record(Duration::from_millis(2), &Ok(Done::one(100)));
        let mut b = Stats::default();
        b.record(Duration::from_millis(4), &Err(Failure::status(404, "MANIFEST_UNKNOWN")));
        b.record(Duration::from_millis(6), &Err(Failure::status(404, "MANIFEST_UNKNOWN")));
        a.merge(b);
        assert_eq!((a.ok, a.failed, a.bytes, a.total()), (1, 2, 100, 3));
        assert_eq!(a.errors[&Failure::status(404, "MANIFEST_UNKNOWN")], 2);
        assert_eq!(a.latency.len(), 3);
        assert!(a.latency.max() >= 5_990 && a.latency.max() <= 6_010);
    }
}
