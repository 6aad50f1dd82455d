//! Failed-login limiting: after `max_failures` failures within `window`, a
//! key (an account at one client address, or a client address) is refused
//! for `window` from the failure that locked it. `Auth` keys it by the pair
//! and by the address, never by the account alone, so nobody can lock an
//! account out for everyone else.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Entry {
    failures: u32,
    /// When the current counting window started.
    since: Instant,
    /// Refused until then.
    locked_until: Option<Instant>,
}

pub struct Limiter {
    max_failures: u32,
    window: Duration,
    entries: Mutex<HashMap<String, Entry>>,
}

/// Entries kept before expired ones are dropped, so a flood of distinct
/// keys cannot grow the map without bound.
const PRUNE_ABOVE: usize = 100_000;

impl Limiter {
    pub fn new(max_failures: u32, window: Duration) -> Limiter {
        Limiter {
            max_failures,
            window,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn max_failures(&self) -> u32 {
        self.max_failures
    }

    /// How long `key` stays locked out, if it is.
    pub fn locked(&self, key: &str) -> Option<Duration> {
        let map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let until = map.get(key)?.locked_until?;
        until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
    }

    /// Counts a failure; returns the lockout's length if this failure
    /// started one.
    pub fn record_failure(&self, key: &str) -> Option<Duration> {
        let now = Instant::now();
        let mut map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > PRUNE_ABOVE {
            let window = self.window;
            map.retain(|_, e| e.locked_until.is_some_and(|u| u > now) || now.duration_since(e.since) < window);
        }
        let e = map.entry(key.to_string()).or_insert(Entry {
            failures: 0,
            since: now,
            locked_until: None,
        });
        let expired = e
            .locked_until
            .map_or(now.duration_since(e.since) >= self.window, |u| u <= now);
        if expired {
            *e = Entry {
                failures: 0,
                since: now,
                locked_until: None,
            };
        }
        e.failures += 1;
        if e.failures >= self.max_failures && e.locked_until.is_none() {
            e.locked_until = Some(now + self.window);
            return Some(self.window);
        }
        None
    }

    pub fn record_success(&self, key: &str) {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_after_max_failures_for_the_window() {
        let l = Limiter::new(3, Duration::from_secs(60));
        assert_eq!(l.record_failure("u"), None);
        assert_eq!(l.record_failure("u"), None);
        assert_eq!(l.locked("u"), None);
        assert_eq!(l.record_failure("u"), Some(Duration::from_secs(60)));
        let left = l.locked("u").unwrap();
        assert!(left > Duration::from_secs(59) && left <= Duration::from_secs(60));
        assert_eq!(l.locked("v"), None);
        // Failures while locked do not start another lockout.
        assert_eq!(l.record_failure("u"), None);
        l.record_success("u");
        assert_eq!(l.locked("u"), None);
        let short = Limiter::new(1, Duration::from_millis(1));
        assert!(short.record_failure("x").is_some());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(short.locked("x"), None);
        // After the lockout a new count starts.
        assert!(short.record_failure("x").is_some());
    }
}
