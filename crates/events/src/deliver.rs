//! The delivery loop of one endpoint, and the outbox pruner.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metadata::{DeadLetter, Lease, MetadataStore, OutboxEvent};
use observe::Metrics;
use registry::events::EventKind;
use tokio::sync::watch;

use crate::endpoint::Endpoint;

/// Events read from the outbox at a time.
const PAGE: usize = 64;
/// How often an idle deliverer looks at the outbox even without a wake-up
/// (events written by a previous run, a missed notification).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How often the pruner runs.
const PRUNE_EVERY: Duration = Duration::from_secs(10);
/// With metadata shared by several nodes, one node at a time delivers to an
/// endpoint (two would deliver its events twice and out of order): the one
/// holding the endpoint's lease, which lasts `LEASE_TTL` unrenewed and is
/// renewed every `LEASE_RENEW`; the others ask again every `LEASE_POLL`,
/// so a dead node's endpoints are taken over within `LEASE_TTL` plus that.
const LEASE_TTL: Duration = Duration::from_secs(30);
const LEASE_RENEW: Duration = Duration::from_secs(10);
const LEASE_POLL: Duration = Duration::from_secs(5);

/// Starts one delivery task per endpoint and the pruner. `committed` is
/// updated by the recorder after each outbox write; `node` names this
/// process in the endpoints' leases.
pub fn start(
    meta: Arc<dyn MetadataStore>,
    endpoints: Vec<Endpoint>,
    metrics: Arc<Metrics>,
    committed: watch::Receiver<u64>,
    node: &str,
) -> Result<(), String> {
    let names: Vec<String> = endpoints.iter().map(|e| e.name.clone()).collect();
    for ep in endpoints {
        let client = reqwest::Client::builder()
            .timeout(ep.timeout)
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("webhook {:?}: cannot build an HTTP client: {e}", ep.name))?;
        tokio::spawn(run_endpoint(
            meta.clone(),
            ep,
            client,
            metrics.clone(),
            committed.clone(),
            node.to_string(),
        ));
    }
    tokio::spawn(prune(meta, names));
    Ok(())
}

/// Retries a metadata call until it works: the outbox is the source of
/// truth, so delivery can only wait for it.
async fn retry<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = metadata::Result<T>>,
{
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                tracing::warn!(error = %metadata::error_chain(&e), "event delivery: {what} failed; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Waits until this node holds `lease`.
async fn take_lease(meta: &dyn MetadataStore, lease: &str, node: &str) {
    let mut said = false;
    loop {
        match meta.take_lease(lease, node, LEASE_TTL).await {
            Ok(Lease::Held) => return,
            Ok(Lease::Busy { holder }) if !said => {
                tracing::info!(lease, holder = %holder, "another node delivers this webhook's events; standing by");
                said = true;
            }
            Ok(Lease::Busy { .. }) => {}
            Err(e) => {
                tracing::warn!(lease, error = %metadata::error_chain(&e), "event delivery: taking the endpoint's lease failed; retrying")
            }
        }
        tokio::time::sleep(LEASE_POLL).await;
    }
}

/// Renews `lease` until another node has it; returns that node.
async fn keep_lease(meta: &dyn MetadataStore, lease: &str, node: &str) -> String {
    loop {
        tokio::time::sleep(LEASE_RENEW).await;
        match meta.take_lease(lease, node, LEASE_TTL).await {
            Ok(Lease::Held) => {}
            Ok(Lease::Busy { holder }) => return holder,
            // Still ours until it expires; nobody can take it meanwhile.
            Err(e) => {
                tracing::warn!(lease, error = %metadata::error_chain(&e), "event delivery: renewing the endpoint's lease failed")
            }
        }
    }
}

/// Delivers `ep`'s events while this node holds its lease, forever.
async fn run_endpoint(
    meta: Arc<dyn MetadataStore>,
    ep: Endpoint,
    client: reqwest::Client,
    metrics: Arc<Metrics>,
    mut committed: watch::Receiver<u64>,
    node: String,
) {
    let lease = format!("webhook:{}", ep.name);
    loop {
        take_lease(meta.as_ref(), &lease, &node).await;
        // An event cut short here was not acknowledged: the cursor has not
        // moved past it, and the new holder delivers it again.
        let holder = tokio::select! {
            never = deliver_all(meta.as_ref(), &ep, &client, &metrics, &mut committed) => match never {},
            holder = keep_lease(meta.as_ref(), &lease, &node) => holder,
        };
        tracing::warn!(endpoint = %ep.name, holder = %holder, "another node took over this webhook's delivery");
    }
}

async fn deliver_all(
    meta: &dyn MetadataStore,
    ep: &Endpoint,
    client: &reqwest::Client,
    metrics: &Metrics,
    committed: &mut watch::Receiver<u64>,
) -> std::convert::Infallible {
    let name = ep.name.clone();
    loop {
        let cursor = retry("reading the cursor", || meta.outbox_cursor(&name)).await;
        let last = retry("reading the outbox", || meta.outbox_last_seq()).await;
        metrics.set_events_pending(&name, last.saturating_sub(cursor));
        let page = retry("reading the outbox", || meta.outbox_read(cursor, PAGE)).await;
        if page.is_empty() {
            // Wait for the recorder, but not forever: a missed wake-up
            // (or an event another node recorded) must not strand events.
            let _ = tokio::time::timeout(IDLE_POLL, committed.changed()).await;
            continue;
        }
        // Events this endpoint does not want are done with at once; the
        // cursor catches up with them before the next delivery.
        let mut skipped = None;
        for ev in page {
            if !wanted(ep, &ev) {
                skipped = Some(ev.seq);
                continue;
            }
            let dead = deliver(meta, ep, client, metrics, &ev).await.err();
            retry("moving the cursor", || meta.outbox_advance(&name, ev.seq, dead.clone())).await;
            skipped = None;
        }
        if let Some(seq) = skipped {
            retry("moving the cursor", || meta.outbox_advance(&name, seq, None)).await;
        }
    }
}

fn wanted(ep: &Endpoint, ev: &OutboxEvent) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&ev.payload) else {
        tracing::error!(seq = ev.seq, "outbox event is not JSON; skipping it");
        return false;
    };
    let kind = v["type"].as_str().and_then(EventKind::parse);
    let repo = v["data"]["repository"].as_str().unwrap_or("");
    kind.is_some_and(|k| ep.wants(k, repo))
}

/// POSTs one event until it is accepted (2xx) or the attempts run out, in
/// which case the dead letter to record is returned.
async fn deliver(
    meta: &dyn MetadataStore,
    ep: &Endpoint,
    client: &reqwest::Client,
    metrics: &Metrics,
    ev: &OutboxEvent,
) -> Result<(), DeadLetter> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut req = client
            .post(&ep.url)
            .header("content-type", "application/cloudevents+json; charset=utf-8")
            .body(ev.payload.clone());
        for (k, v) in &ep.headers {
            req = req.header(k, v);
        }
        let error = match req.send().await {
            Ok(r) if r.status().is_success() => {
                metrics.delivery(&ep.name, "delivered");
                return Ok(());
            }
            Ok(r) => format!("HTTP {}", r.status()),
            Err(e) => format!("{e}"),
        };
        if attempt >= ep.max_attempts {
            metrics.delivery(&ep.name, "dead_lettered");
            tracing::error!(endpoint = %ep.name, seq = ev.seq, attempts = attempt, error = %error,
                "webhook gave up on an event; it is kept as a dead letter");
            return Err(DeadLetter {
                endpoint: ep.name.clone(),
                seq: ev.seq,
                payload: String::from_utf8_lossy(&ev.payload).into_owned(),
                attempts: attempt,
                error,
                time: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            });
        }
        metrics.delivery(&ep.name, "failed");
        // Keep the backlog gauge current while this event blocks the queue.
        if let Ok(last) = meta.outbox_last_seq().await {
            metrics.set_events_pending(&ep.name, last.saturating_sub(ev.seq - 1));
        }
        let wait = ep.backoff(attempt);
        tracing::warn!(endpoint = %ep.name, seq = ev.seq, attempt, error = %error,
            retry_in_ms = wait.as_millis() as u64, "webhook delivery failed; retrying");
        tokio::time::sleep(wait).await;
    }
}

/// Removes events every configured endpoint is done with. With no
/// endpoints, nothing will read the outbox, so everything goes.
async fn prune(meta: Arc<dyn MetadataStore>, endpoints: Vec<String>) {
    loop {
        let mut upto = retry("reading the outbox", || meta.outbox_last_seq()).await;
        for name in &endpoints {
            upto = upto.min(retry("reading a cursor", || meta.outbox_cursor(name)).await);
        }
        match meta.outbox_prune(upto).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(events = n, "pruned delivered events from the outbox"),
            Err(e) => tracing::warn!(error = %metadata::error_chain(&e), "cannot prune the outbox; will retry"),
        }
        tokio::time::sleep(PRUNE_EVERY).await;
    }
}
