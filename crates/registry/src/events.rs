//! Registry events (push, pull, delete, mount, tag) as CloudEvents 1.0
//! JSON, written to the durable outbox in the metadata store.
//!
//! Recording is batched: a writer task appends everything queued since its
//! last transaction in one transaction (group commit). A change (push,
//! delete, mount, tag) waits for that commit before its request returns, so
//! its event survives a crash from then on; a pull does not wait, since
//! pulls are the hot path. Pull events are dropped (and counted) when the
//! queue is full, never blocking a pull. Delivery to webhooks is another
//! crate's job (`events`); nothing here does network I/O.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use metadata::MetadataStore;
use observe::metrics::EventRecorderCounters;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};

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

struct Pending {
    payload: Vec<u8>,
    /// Signalled once the event is committed (or known lost).
    ack: Option<oneshot::Sender<()>>,
}

/// Records events into the outbox; cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Pending>,
    kinds: EventKinds,
    source: Arc<str>,
    counters: Arc<EventRecorderCounters>,
}

/// Most events one outbox transaction takes.
const BATCH: usize = 512;
/// Events queued for the writer; beyond this, changes wait and pulls drop.
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
        tokio::spawn(write_outbox(meta, rx, counters.clone(), committed));
        Recorder {
            tx,
            kinds,
            source: source.into(),
            counters,
        }
    }

    pub fn wants(&self, kind: EventKind) -> bool {
        self.kinds.contains(kind)
    }

    /// Records a change and returns once it is in the outbox.
    pub async fn change(&self, kind: EventKind, data: EventData) {
        self.changes(vec![(kind, data)]).await
    }

    /// Records changes, in order, and returns once all are in the outbox.
    /// The writer takes the queue in order, so the last commit covers all.
    pub async fn changes(&self, events: Vec<(EventKind, EventData)>) {
        let mut last = None;
        for (kind, data) in events.into_iter().filter(|(k, _)| self.wants(*k)) {
            let payload = cloud_event(kind, &self.source, &data).to_string().into_bytes();
            let (ack, done) = oneshot::channel();
            if self
                .tx
                .send(Pending {
                    payload,
                    ack: Some(ack),
                })
                .await
                .is_err()
            {
                self.counters.lost.fetch_add(1, Ordering::Relaxed);
                return;
            }
            last = Some(done);
        }
        if let Some(done) = last {
            let _ = done.await;
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
        if self.tx.try_send(Pending { payload, ack: None }).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn write_outbox(
    meta: Arc<dyn MetadataStore>,
    mut rx: mpsc::Receiver<Pending>,
    counters: Arc<EventRecorderCounters>,
    committed: watch::Sender<u64>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let n = batch.len() as u64;
        let (payloads, acks): (Vec<_>, Vec<_>) = batch.drain(..).map(|p| (p.payload, p.ack)).unzip();
        match meta.outbox_append(payloads).await {
            Ok(last) => {
                counters.recorded.fetch_add(n, Ordering::Relaxed);
                committed.send_replace(last);
            }
            Err(e) => {
                counters.lost.fetch_add(n, Ordering::Relaxed);
                tracing::error!(error = %e, events = n, "cannot write events to the outbox; they are lost");
            }
        }
        for ack in acks.into_iter().flatten() {
            let _ = ack.send(());
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
    async fn changes_are_in_the_outbox_when_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let meta: Arc<dyn MetadataStore> = Arc::new(metadata::RedbMetadata::open(&dir.path().join("m")).unwrap());
        let (tx, rx) = watch::channel(0);
        let mut kinds = EventKinds::default();
        kinds.insert(EventKind::Push);
        let counters = Arc::new(EventRecorderCounters::default());
        let r = Recorder::start(meta.clone(), kinds, "/berth/test", counters.clone(), tx);
        for i in 0..3 {
            r.change(
                EventKind::Push,
                EventData {
                    repository: format!("r{i}"),
                    ..Default::default()
                },
            )
            .await;
        }
        // Not wanted: not recorded.
        r.change(EventKind::Delete, EventData::default()).await;
        r.pull(EventData::default());
        let got = meta.outbox_read(0, 10).await.unwrap();
        assert_eq!(got.len(), 3);
        let repos: Vec<String> = got
            .iter()
            .map(|e| serde_json::from_slice::<Value>(&e.payload).unwrap()["data"]["repository"].to_string())
            .collect();
        assert_eq!(repos, ["\"r0\"", "\"r1\"", "\"r2\""]);
        assert_eq!(*rx.borrow(), 3);
        assert_eq!(counters.recorded.load(Ordering::Relaxed), 3);
    }
}
