//! Registry events (push, pull, delete, mount, tag) as CloudEvents 1.0
//! JSON, written to the durable outbox in the metadata store.
//!
//! A change's events (push, delete, mount, tag) are appended to the outbox
//! by the metadata transaction that makes the change (`metadata::Events`),
//! so a change is never committed without its events, even across a crash,
//! and costs no commit of its own. Pulls change nothing: a writer task
//! appends them in batches (group commit), behind the request, since pulls
//! are the hot path; they are dropped (and counted) when its queue is full,
//! never blocking a pull. Delivery to webhooks is another
//! crate's job (`events`); nothing here does network I/O.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use metadata::MetadataStore;
use observe::metrics::EventRecorderCounters;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Push,
    Pull,
    Delete,
    Mount,
    Tag,
}

impl EventKind {
    pub const ALL: [EventKind; 5] = [
        EventKind::Push,
        EventKind::Pull,
        EventKind::Delete,
        EventKind::Mount,
        EventKind::Tag,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Push => "push",
            EventKind::Pull => "pull",
            EventKind::Delete => "delete",
            EventKind::Mount => "mount",
            EventKind::Tag => "tag",
        }
    }

    /// The CloudEvents `type`.
    pub fn cloud_type(self) -> &'static str {
        match self {
            EventKind::Push => "io.berth.push",
            EventKind::Pull => "io.berth.pull",
            EventKind::Delete => "io.berth.delete",
            EventKind::Mount => "io.berth.mount",
            EventKind::Tag => "io.berth.tag",
        }
    }

    /// From a short name (`push`) or a CloudEvents type (`io.berth.push`).
    pub fn parse(s: &str) -> Option<EventKind> {
        let short = s.strip_prefix("io.berth.").unwrap_or(s);
        EventKind::ALL.into_iter().find(|k| k.as_str() == short)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of event kinds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventKinds(u8);

impl EventKinds {
    pub fn all() -> EventKinds {
        EventKinds(EventKind::ALL.iter().fold(0, |b, k| b | k.bit()))
    }

    pub fn insert(&mut self, k: EventKind) {
        self.0 |= k.bit();
    }

    pub fn contains(self, k: EventKind) -> bool {
        self.0 & k.bit() != 0
    }

    pub fn union(self, other: EventKinds) -> EventKinds {
        EventKinds(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// What happened, to whom.
#[derive(Debug, Clone, Default)]
pub struct EventData {
    pub repository: String,
    pub digest: Option<String>,
    pub tag: Option<String>,
    pub media_type: Option<String>,
    pub size: Option<u64>,
    /// The source repository of a mount.
    pub from: Option<String>,
}

/// The CloudEvents 1.0 structured-mode JSON of one event.
pub fn cloud_event(kind: EventKind, source: &str, data: &EventData) -> Value {
    let subject = match (&data.tag, &data.digest) {
        (Some(t), _) => format!("{}:{t}", data.repository),
        (None, Some(d)) => format!("{}@{d}", data.repository),
        (None, None) => data.repository.clone(),
    };
    let mut d = json!({ "repository": data.repository });
    for (k, v) in [
        ("digest", data.digest.as_ref()),
        ("tag", data.tag.as_ref()),
        ("mediaType", data.media_type.as_ref()),
        ("from", data.from.as_ref()),
    ] {
        if let Some(v) = v {
            d[k] = Value::from(v.as_str());
        }
    }
    if let Some(n) = data.size {
        d["size"] = Value::from(n);
    }
    json!({
        "specversion": "1.0",
        "id": uuid::Uuid::new_v4().to_string(),
        "source": source,
        "type": kind.cloud_type(),
        "time": observe::time::rfc3339(SystemTime::now()),
        "subject": subject,
        "datacontenttype": "application/json",
        "data": d,
    })
}

/// Records events into the outbox; cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    /// Pull events for the writer task.
    tx: mpsc::Sender<Vec<u8>>,
    kinds: EventKinds,
    source: Arc<str>,
    counters: Arc<EventRecorderCounters>,
    /// Told of every outbox commit, so deliverers wake at once.
    committed: Arc<watch::Sender<u64>>,
}

/// Most pull events one outbox transaction takes.
const BATCH: usize = 512;
/// Pull events queued for the writer; beyond this, they are dropped.
const QUEUE: usize = 8192;

impl Recorder {
    /// Starts the outbox writer. Only `kinds` are recorded (the kinds some
    /// webhook wants). `committed` is told the last sequence number written,
    /// so deliverers wake at once.
    pub fn start(
        meta: Arc<dyn MetadataStore>,
        kinds: EventKinds,
        source: &str,
        counters: Arc<EventRecorderCounters>,
        committed: watch::Sender<u64>,
    ) -> Recorder {
        let (tx, rx) = mpsc::channel(QUEUE);
        let committed = Arc::new(committed);
        tokio::spawn(write_outbox(meta, rx, counters.clone(), committed.clone()));
        Recorder {
            tx,
            kinds,
            source: source.into(),
            counters,
            committed,
        }
    }

    pub fn wants(&self, kind: EventKind) -> bool {
        self.kinds.contains(kind)
    }

    /// The outbox payloads of the changes this recorder wants, for the
    /// metadata transaction that makes them.
    pub fn payloads(&self, events: Vec<(EventKind, EventData)>) -> metadata::Events {
        events
            .into_iter()
            .filter(|(k, _)| self.wants(*k))
            .map(|(kind, data)| cloud_event(kind, &self.source, &data).to_string().into_bytes())
            .collect()
    }

    /// After a metadata commit appended `n` change events: counts them and
    /// wakes the deliverers.
    pub fn committed(&self, n: usize) {
        if n > 0 {
            self.counters.recorded.fetch_add(n as u64, Ordering::Relaxed);
            self.committed.send_modify(|_| {});
        }
    }

    /// Records a pull without waiting; drops it if the queue is full.
    pub fn pull(&self, data: EventData) {
        if !self.wants(EventKind::Pull) {
            return;
        }
        let payload = cloud_event(EventKind::Pull, &self.source, &data)
            .to_string()
            .into_bytes();
        if self.tx.try_send(payload).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn write_outbox(
    meta: Arc<dyn MetadataStore>,
    mut rx: mpsc::Receiver<Vec<u8>>,
    counters: Arc<EventRecorderCounters>,
    committed: Arc<watch::Sender<u64>>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let n = batch.len() as u64;
        match meta.outbox_append(std::mem::take(&mut batch)).await {
            Ok(last) => {
                counters.recorded.fetch_add(n, Ordering::Relaxed);
                committed.send_replace(last);
            }
            Err(e) => {
                counters.lost.fetch_add(n, Ordering::Relaxed);
                tracing::error!(error = %metadata::error_chain(&e), events = n, "cannot write events to the outbox; they are lost");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_cloud_events() {
        assert_eq!(EventKind::parse("push"), Some(EventKind::Push));
        assert_eq!(EventKind::parse("io.berth.tag"), Some(EventKind::Tag));
        assert_eq!(EventKind::parse("pushed"), None);
        let mut k = EventKinds::default();
        assert!(k.is_empty());
        k.insert(EventKind::Mount);
        assert!(k.contains(EventKind::Mount) && !k.contains(EventKind::Pull));
        assert!(EventKinds::all().contains(EventKind::Pull));
        let e = cloud_event(
            EventKind::Push,
            "/berth/node-1",
            &EventData {
                repository: "team/app".into(),
                digest: Some("sha256:ab".into()),
                tag: Some("v1".into()),
                ..Default::default()
            },
        );
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["type"], "io.berth.push");
        assert_eq!(e["subject"], "team/app:v1");
        assert_eq!(e["data"]["digest"], "sha256:ab");
        assert!(e["data"].get("size").is_none());
        assert_eq!(e["time"].as_str().unwrap().len(), 24);
    }

    #[tokio::test]
    async fn pulls_are_written_behind_and_changes_go_with_their_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let meta: Arc<dyn MetadataStore> = Arc::new(metadata::RedbMetadata::open(&dir.path().join("m")).unwrap());
        let (tx, mut rx) = watch::channel(0);
        let mut kinds = EventKinds::default();
        kinds.insert(EventKind::Push);
        kinds.insert(EventKind::Pull);
        let counters = Arc::new(EventRecorderCounters::default());
        let r = Recorder::start(meta.clone(), kinds, "/berth/test", counters.clone(), tx);
        let data = |repo: &str| EventData {
            repository: repo.into(),
            ..Default::default()
        };
        // Not wanted: no payload.
        let payloads = r.payloads(vec![(EventKind::Push, data("r0")), (EventKind::Delete, data("r1"))]);
        assert_eq!(payloads.len(), 1);
        meta.outbox_append(payloads).await.unwrap();
        rx.mark_unchanged();
        r.committed(1);
        assert!(rx.has_changed().unwrap(), "deliverers are woken");
        r.pull(data("r2"));
        for _ in 0..100 {
            if meta.outbox_last_seq().await.unwrap() == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let got = meta.outbox_read(0, 10).await.unwrap();
        let seen: Vec<(String, String)> = got
            .iter()
            .map(|e| {
                let v: Value = serde_json::from_slice(&e.payload).unwrap();
                (v["type"].to_string(), v["data"]["repository"].to_string())
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("\"io.berth.push\"".to_string(), "\"r0\"".to_string()),
                ("\"io.berth.pull\"".to_string(), "\"r2\"".to_string())
            ]
        );
        assert_eq!(*rx.borrow(), 2);
        assert_eq!(counters.recorded.load(Ordering::Relaxed), 2);
    }
}
