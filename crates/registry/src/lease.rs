//! Work that one node at a time may do among the nodes of a shared store
//! (GC with retention): it runs while this node holds a lease in the
//! metadata store, renewed as it goes, and expiring if the node dies.

use std::future::Future;
use std::time::Duration;

use metadata::Lease;
use oci::ErrorCode;

use crate::{Registry, RegistryError, Result};

/// The lease of garbage collection and scheduled retention.
pub const GC: &str = "gc";

/// How long a lease lasts without renewal: how long the nodes wait for one
/// whose holder died.
pub const TTL: Duration = Duration::from_secs(30);
/// How often a holder renews, well within `TTL`.
const RENEW: Duration = Duration::from_secs(10);

/// What `Registry::exclusively` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Exclusive<T> {
    /// It ran `work`, holding the lease.
    Ran(T),
    /// Another node holds the lease; nothing ran.
    Busy { holder: String },
}

impl Registry {
    /// Runs `work` while this node holds lease `name` (renewing it every
    /// `RENEW`), then releases it. If another node holds the lease, nothing
    /// runs. If the lease is lost on the way (this node stalled past `TTL`
    /// and another took it), `work` is dropped and an error returned.
    pub async fn exclusively<T>(&self, name: &str, work: impl Future<Output = Result<T>>) -> Result<Exclusive<T>> {
        if let Lease::Busy { holder } = self.meta.take_lease(name, &self.node, TTL).await? {
            return Ok(Exclusive::Busy { holder });
        }
        let out = self.renewing(name, work).await;
        if let Err(e) = self.meta.release_lease(name, &self.node).await {
            tracing::warn!(lease = name, error = %metadata::error_chain(&e), "could not release a lease; it expires by itself");
        }
        out.map(Exclusive::Ran)
    }

    async fn renewing<T>(&self, name: &str, work: impl Future<Output = Result<T>>) -> Result<T> {
        tokio::pin!(work);
        let mut tick = tokio::time::interval(RENEW);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = tick.tick() => match self.meta.take_lease(name, &self.node, TTL).await {
                    Ok(Lease::Held) => {}
                    Ok(Lease::Busy { holder }) => {
                        return Err(RegistryError::new(
                            ErrorCode::Unavailable,
                            format!("lost lease {name} to node {holder}; stopped"),
                        ))
                    }
                    // The store is away: the lease is still ours until it
                    // expires, and nobody else can take it meanwhile.
                    Err(e) => tracing::warn!(lease = name, error = %metadata::error_chain(&e), "could not renew a lease"),
                },
            }
        }
    }

    /// Gives up lease `name` if this node holds it (at shutdown, so the
    /// other nodes need not wait for it to expire).
    pub async fn release_lease(&self, name: &str) {
        if let Err(e) = self.meta.release_lease(name, &self.node).await {
            tracing::warn!(lease = name, error = %metadata::error_chain(&e), "could not release a lease; it expires by itself");
        }
    }
}
