//! The limits on what berth asks of one upstream: a request rate (a token
//! bucket), a cap on requests in flight, and a bounded queue in front of
//! both. A request that finds the queue full, or waits longer than the
//! queue timeout, is refused, so a burst of cold pulls cannot spend an
//! upstream's rate limit or pile up without bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Limiter {
    slots: Arc<Semaphore>,
    bucket: Mutex<Bucket>,
    rate: f64,
    waiting: AtomicUsize,
    queue: usize,
    queue_timeout: Duration,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Why a request was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    QueueFull,
    QueueTimeout,
}

/// Held while a request to the upstream is in flight.
pub struct Permit {
    _slot: OwnedSemaphorePermit,
}

/// Decrements the waiting count however the wait ends (cancelled included).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Limiter {
    pub fn new(rate: f64, concurrency: usize, queue: usize, queue_timeout: Duration) -> Limiter {
        // A burst of one second's worth, at least one request.
        let burst = rate.max(1.0);
        Limiter {
            slots: Arc::new(Semaphore::new(concurrency.max(1))),
            bucket: Mutex::new(Bucket {
                tokens: burst,
                at: Instant::now(),
            }),
            rate,
            waiting: AtomicUsize::new(0),
            queue,
            queue_timeout,
        }
    }

    /// Waits for a slot and a token.
    pub async fn acquire(&self) -> Result<Permit, Refused> {
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.queue {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(Refused::QueueFull);
        }
        let _waiting = Waiting(&self.waiting);
        let wait = async {
            let slot = self.slots.clone().acquire_owned().await.ok()?;
            loop {
                match self.take_token() {
                    None => return Some(Permit { _slot: slot }),
                    Some(delay) => tokio::time::sleep(delay).await,
                }
            }
        };
        match tokio::time::timeout(self.queue_timeout, wait).await {
            Ok(Some(p)) => Ok(p),
            _ => Err(Refused::QueueTimeout),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take_token(&self) -> Option<Duration> {
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let burst = self.rate.max(1.0);
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - b.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_is_kept_over_time() {
        let l = Limiter::new(10.0, 100, 1000, Duration::from_secs(60));
        let start = tokio::time::Instant::now();
        for _ in 0..30 {
            drop(l.acquire().await.unwrap());
        }
        // 10 from the burst, then 20 at 10/s.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(1900) && took <= Duration::from_millis(2100),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_queue_and_timeout() {
        let l = Arc::new(Limiter::new(1000.0, 1, 1, Duration::from_secs(1)));
        let held = l.acquire().await.unwrap();
        // One may wait; the next is refused at once.
        let l2 = l.clone();
        let waiter = tokio::spawn(async move { l2.acquire().await.map(|_| ()) });
        tokio::task::yield_now().await;
        assert_eq!(l.acquire().await.err(), Some(Refused::QueueFull));
        // The waiter times out while the slot stays held.
        assert_eq!(waiter.await.unwrap(), Err(Refused::QueueTimeout));
        drop(held);
        assert!(l.acquire().await.is_ok());
    }
}
