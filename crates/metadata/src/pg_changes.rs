//! The change feed of a PostgreSQL store: how one node's caches learn of
//! the manifest and tag writes of every node, with no query on the read
//! path.
//!
//! Every write that changes a repository's manifests or tags sends
//! `NOTIFY berth_changes, '<repo>'` in its own transaction, so the
//! notification exists if and only if the write committed. Each node keeps
//! one connection of its own (not pooled) that LISTENs, and passes every
//! notification to its `ChangeSink`.
//!
//! A notification can be lost with the connection, and a connection can die
//! silently. So every `CHANGES_CONFIRMED_EVERY` the follower notifies a
//! channel only it listens to and waits for that notification to come back.
//! PostgreSQL queues the notifications of all channels in one queue, in the
//! order the transactions reached commit, and a listener reads that queue in
//! order: when the ping comes back, every change committed before it was
//! sent has been read. So `caught_up(sent)` is a proof, not a guess, and a
//! cache that trusts itself only for a short time after the last proof is
//! never stale by more than that time, whatever happened to the connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::{AsyncMessage, NoTls, Notification};

use crate::{ChangeSink, CHANGES_CONFIRMED_EVERY};

/// The channel of manifest and tag changes; the payload is the repository.
pub(crate) const CHANNEL: &str = "berth_changes";

/// How long a ping may take before the connection is given up on.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before connecting again after the feed was lost, doubled after
/// each failed attempt up to `MAX_RECONNECT`.
const RECONNECT: Duration = Duration::from_secs(1);
const MAX_RECONNECT: Duration = Duration::from_secs(16);

/// Announces, in the caller's transaction, that `repo`'s manifests or tags
/// change; listeners hear it when (and only if) the transaction commits.
pub(crate) async fn notify(tx: &deadpool_postgres::Transaction<'_>, repo: &str) -> Result<(), tokio_postgres::Error> {
    crate::pg_store::x(tx, "SELECT pg_notify('berth_changes', $1)", &[&repo])
        .await
        .map(|_| ())
}

/// Why the feed stopped (it is then started again).
#[derive(Debug, thiserror::Error)]
enum FeedError {
    #[error("the notification connection failed")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("the notification connection closed")]
    Closed,
    #[error("a ping did not come back within {0:?}")]
    Timeout(Duration),
}

/// Follows the feed until the process ends, reconnecting after each loss
/// (at once, then less and less often while PostgreSQL stays away).
pub(crate) async fn follow(config: &tokio_postgres::Config, sink: Arc<dyn ChangeSink>) {
    let mut pause = RECONNECT;
    loop {
        let started = Instant::now();
        let e = follow_once(config, sink.as_ref()).await;
        sink.reset();
        if started.elapsed() > MAX_RECONNECT {
            pause = RECONNECT;
        }
        tracing::warn!(
            error = %crate::error_chain(&e),
            retry_in_ms = pause.as_millis() as u64,
            "lost the PostgreSQL change feed: caches of manifests and tags are off until it is back"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_RECONNECT);
    }
}

/// Stops the task that drives a connection when the feed ends.
struct Abort(tokio::task::JoinHandle<()>);

impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn follow_once(config: &tokio_postgres::Config, sink: &dyn ChangeSink) -> FeedError {
    match run(config, sink).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

async fn run(config: &tokio_postgres::Config, sink: &dyn ChangeSink) -> Result<std::convert::Infallible, FeedError> {
    let (client, mut conn) = config.connect(NoTls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Notification>();
    let _driver = Abort(tokio::spawn(async move {
        // Ends when the connection does; dropping `tx` tells the feed.
        while let Some(Ok(msg)) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = msg {
                if tx.send(n).is_err() {
                    break;
                }
            }
        }
    }));
    let ping_channel = format!("berth_ping_{}", uuid::Uuid::new_v4().simple());
    client
        .batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {ping_channel}"))
        .await?;
    // Whatever the caches hold was read before LISTEN took effect: changes
    // made since may never be notified.
    sink.reset();
    tracing::info!("following the PostgreSQL change feed");
    let mut n: u64 = 0;
    loop {
        n += 1;
        let payload = n.to_string();
        let sent = Instant::now();
        let deadline = tokio::time::Instant::from_std(sent + PING_TIMEOUT);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&ping_channel, &payload];
        tokio::time::timeout_at(deadline, client.execute("SELECT pg_notify($1, $2)", &params))
            .await
            .map_err(|_| FeedError::Timeout(PING_TIMEOUT))??;
        // Changes queued before the ping arrive before it.
        loop {
            let note = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .map_err(|_| FeedError::Timeout(PING_TIMEOUT))?
                .ok_or(FeedError::Closed)?;
            if note.channel() == ping_channel {
                if note.payload() == payload {
                    break;
                }
            } else {
                sink.changed(note.payload());
            }
        }
        sink.caught_up(sent);
        let next = tokio::time::Instant::from_std(sent + CHANGES_CONFIRMED_EVERY);
        while let Ok(note) = tokio::time::timeout_at(next, rx.recv()).await {
            let note = note.ok_or(FeedError::Closed)?;
            if note.channel() == CHANNEL {
                sink.changed(note.payload());
            }
        }
    }
}
