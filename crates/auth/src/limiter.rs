//! Failed-login limiting: after `max_failures` failures within `window`, a
//! user name or client address is refused until the window has passed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Limiter {
    max_failures: u32,
    window: Duration,
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

impl Limiter {
    pub fn new(max_failures: u32, window: Duration) -> Limiter {
        Limiter {
            max_failures,
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `key` is currently locked out.
    pub fn blocked(&self, key: &str) -> bool {
        let map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(key) {
            Some((n, since)) => *n >= self.max_failures && since.elapsed() < self.window,
            None => false,
        }
    }

    pub fn record_failure(&self, key: &str) {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        // Bound memory under a flood of distinct keys: drop expired entries.
        if map.len() > 100_000 {
            let window = self.window;
            map.retain(|_, (_, since)| since.elapsed() < window);
        }
        let e = map.entry(key.to_string()).or_insert((0, Instant::now()));
        if e.1.elapsed() >= self.window {
            *e = (0, Instant::now());
        }
        e.0 += 1;
    }

    pub fn record_success(&self, key: &str) {
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_after_max_failures() {
        let l = Limiter::new(3, Duration::from_secs(60));
        for _ in 0..2 {
            l.record_failure("u");
        }
        assert!(!l.blocked("u"));
        l.record_failure("u");
        assert!(l.blocked("u"));
        assert!(!l.blocked("v"));
        l.record_success("u");
        assert!(!l.blocked("u"));
        let short = Limiter::new(1, Duration::from_millis(1));
        short.record_failure("x");
        std::thread::sleep(Duration::from_millis(5));
        assert!(!short.blocked("x"));
    }
}
