//! Durable history: every deployment's timeline, and each service's state
//! (the active release, the releases that passed, the run of failures, the
//! pause), in one redb file. The check that admits a deployment (not
//! paused) is in the transaction that records it.
//!
//! The file is opened for each transaction and closed after it, so
//! `berth watch status` can read while `berth watch run` guards.
//!
//! Async code never touches the file on a runtime thread: [`Store::bg`]
//! hands each transaction to the history's own thread, in order (an event
//! queued without waiting is still written before the next transaction).
//!
//! A deployment is owned by the process that holds its service's lock
//! ([`Store::lock`], an `flock` the kernel releases when that process dies,
//! even by `kill -9`): a deployment in progress whose lock nobody holds was
//! interrupted, and is reconciled (`rollout::Guard::recover`) instead of
//! making the service wait.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::classify::Failure;

const DEPLOYMENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("deployments");
const SERVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("services");

/// Releases kept per service as rollback targets.
const PASSED_KEPT: usize = 10;
/// Events kept per deployment: a guard that polls for hours must not grow
/// one record without bound.
const EVENTS_KEPT: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the history at {path}: {source}")]
    Db { path: String, source: redb::Error },
    #[error("the history at {path} holds a record berth cannot read: {detail}")]
    Corrupt { path: String, detail: String },
    #[error("service {service:?} is paused since {since} after {failures} consecutive failed deployments (last: {last}); fix the cause, then run `berth watch resume {service}`")]
    Paused {
        service: String,
        since: String,
        failures: u32,
        last: String,
    },
    #[error("service {service:?} has a deployment in progress since {since} (#{id}); wait for it (`berth watch history {service}`)")]
    Busy { service: String, since: String, id: u64 },
    #[error("service {service:?} is being deployed by berth process {pid} (it holds {lock}); wait for it (`berth watch history {service}`)")]
    Locked { service: String, pid: String, lock: String },
    #[error("the history's lock {path}: {source}")]
    Lock { path: String, source: std::io::Error },
    #[error("service {0:?} has no deployment in the history")]
    Unknown(String),
    #[error("the history's thread is gone (a transaction panicked); restart berth")]
    Worker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Failure,
    Timeout,
    RolledBack,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Timeout => "timeout",
            Outcome::RolledBack => "rolled_back",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Deploy,
    Rollback,
}

/// A version of a service as it was deployed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub image: String,
    pub digest: String,
    pub version: String,
    /// The deployment description it was deployed with, to start it again.
    pub spec_file: String,
    pub spec_toml: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub at_ms: u64,
    pub what: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    pub id: u64,
    pub service: String,
    pub kind: Kind,
    pub image: String,
    #[serde(default)]
    pub digest: String,
    pub version: String,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    pub outcome: Option<Outcome>,
    pub failure: Option<Failure>,
    pub events: Vec<Event>,
}

impl Deployment {
    pub fn duration(&self) -> Option<Duration> {
        self.finished_ms
            .map(|f| Duration::from_millis(f.saturating_sub(self.started_ms)))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceState {
    pub active: Option<Release>,
    /// Releases that passed their checks, oldest first.
    pub passed: Vec<Release>,
    pub consecutive_failures: u32,
    pub failure_limit: u32,
    pub paused: Option<Pause>,
    pub last_failure: Option<String>,
    /// What the metrics export, kept with the history so every berth
    /// process exports the same numbers.
    #[serde(default)]
    pub counts: Counts,
    /// When the deployment or rollback in progress started: the guard
    /// leaves the service to it meanwhile.
    #[serde(default)]
    pub in_progress_since_ms: Option<u64>,
}

/// Upper bounds (seconds) of the deploy duration histogram's buckets.
pub const DURATION_BUCKETS: [f64; 12] = [
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0,
];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Finished deployments by outcome (`Outcome::as_str`).
    pub deploys: BTreeMap<String, u64>,
    /// Rollbacks done: after a failed deployment, by the guard, by hand.
    pub rollbacks: u64,
    pub pauses: u64,
    /// Per bucket of `DURATION_BUCKETS`, then one for longer.
    pub duration_buckets: Vec<u64>,
    pub duration_sum: f64,
    /// Canary analysis windows by result (pass, fail, inconclusive).
    #[serde(default)]
    pub analyses: BTreeMap<String, u64>,
}

impl Counts {
    fn observe(&mut self, secs: f64) {
        self.duration_buckets.resize(DURATION_BUCKETS.len() + 1, 0);
        let i = DURATION_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(DURATION_BUCKETS.len());
        self.duration_buckets[i] += 1;
        self.duration_sum += secs;
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    pub since_ms: u64,
    pub reason: String,
}

/// What a finished deployment or rollback did to the service, for
/// [`Store::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Nothing that changes where a rollback goes.
    Nothing,
    /// This release passed its checks: a rollback target from now on.
    Passed(Release),
    /// berth rolled the service back from the release with digest `from`
    /// (the failed deployment's own, or the active one for a rollback by
    /// hand or by the guard): one rollback counted, whatever the outcome
    /// (a `timeout` can be rolled back too), and that release, found bad,
    /// is no longer a rollback target, unless it is the active one after
    /// the rollback (a deployment of the active release's digest failed
    /// and the same release was started again). An empty digest (a
    /// Kubernetes image deployed by tag) removes nothing.
    RolledBack { from: String },
}

impl ServiceState {
    /// The newest release that passed and is not `digest`: where a
    /// rollback goes. A release berth rolled back from has left `passed`
    /// ([`Effect::RolledBack`]), so every backend can take this alone.
    pub fn rollback_target(&self, digest: &str) -> Option<&Release> {
        self.passed.iter().rev().find(|r| r.digest != digest)
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn time_of(ms: u64) -> String {
    observe::time::rfc3339(UNIX_EPOCH + Duration::from_millis(ms))
}

#[derive(Clone)]
pub struct Store {
    path: PathBuf,
    /// The history's own thread, started at the first [`Store::bg`].
    worker: Arc<OnceLock<mpsc::Sender<Job>>>,
}

type Job = Box<dyn FnOnce(&Store) + Send>;

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// A service's lock, held while a deployment of it runs; released when
/// dropped or when the process ends, however it ends.
#[derive(Debug)]
pub struct ServiceLock {
    _file: std::fs::File,
}

/// A deployment in progress for longer than this is taken to have died
/// with its process: another may start.
pub const STALE_DEPLOYMENT: Duration = Duration::from_secs(3600);

/// How long to wait for another berth process's transaction to end.
const LOCK_WAIT: Duration = Duration::from_secs(10);

impl Store {
    pub fn new(path: &Path) -> Store {
        Store {
            path: path.to_path_buf(),
            worker: Arc::new(OnceLock::new()),
        }
    }

    /// The history's transactions for async code: each runs on the
    /// history's own thread, never on a runtime thread.
    pub fn bg(&self) -> Bg<'_> {
        Bg(self)
    }

    fn queue(&self, job: Job) -> Result<(), StoreError> {
        let tx = self.worker.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            let own = Store::new(&self.path);
            // Ends when the last Store handle (and its sender) is dropped.
            let spawned = std::thread::Builder::new()
                .name("berth-watch-history".into())
                .spawn(move || rx.into_iter().for_each(|job| job(&own)));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the history's thread");
            }
            tx
        });
        tx.send(job).map_err(|_| StoreError::Worker)
    }

    /// Runs `f` on the history's thread after every job queued before it.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.queue(Box::new(move |s| {
            let _ = tx.send(f(s));
        }))?;
        rx.await.map_err(|_| StoreError::Worker)?
    }

    /// Takes `service`'s lock, or says which live process holds it. The
    /// lock file holds the owner's pid, for that message.
    pub fn lock(&self, service: &str) -> Result<ServiceLock, StoreError> {
        use std::io::{Read, Seek, Write};
        let dir = self.path.with_extension("locks");
        let path = dir.join(format!("{service}.lock"));
        let err = |e: std::io::Error| StoreError::Lock {
            path: path.display().to_string(),
            source: e,
        };
        std::fs::create_dir_all(&dir).map_err(err)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(err)?;
        // SAFETY: flock on a descriptor this function owns; no memory is shared.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                return Err(StoreError::Locked {
                    service: service.to_string(),
                    pid: pid.trim().to_string(),
                    lock: path.display().to_string(),
                });
            }
            return Err(err(e));
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| write!(file, "{}", std::process::id()))
            .map_err(err)?;
        Ok(ServiceLock { _file: file })
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Db {
            path: self.path.display().to_string(),
            source: e.into(),
        }
    }

    fn corrupt(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt {
            path: self.path.display().to_string(),
            detail: e.to_string(),
        }
    }

    fn open(&self) -> Result<Database, StoreError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.err(redb::StorageError::Io(e)))?;
        }
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            match Database::create(&self.path) {
                Ok(db) => return Ok(db),
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(self.err(e)),
            }
        }
    }

    /// Runs `f` in one write transaction, committed (and synced) when it
    /// returns Ok.
    fn write<T>(
        &self,
        f: impl FnOnce(&Store, &redb::WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let db = self.open()?;
        let w = db.begin_write().map_err(|e| self.err(e))?;
        let out = f(self, &w)?;
        w.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }

    fn get_state(&self, w: &redb::WriteTransaction, service: &str) -> Result<ServiceState, StoreError> {
        let t = w.open_table(SERVICES).map_err(|e| self.err(e))?;
        let v = t.get(service).map_err(|e| self.err(e))?;
        match v {
            None => Ok(ServiceState::default()),
            Some(v) => serde_json::from_slice(v.value()).map_err(|e| self.corrupt(e)),
        }
    }

    fn put_state(&self, w: &redb::WriteTransaction, service: &str, s: &ServiceState) -> Result<(), StoreError> {
        let mut t = w.open_table(SERVICES).map_err(|e| self.err(e))?;
        let bytes = serde_json::to_vec(s).map_err(|e| self.corrupt(e))?;
        t.insert(service, bytes.as_slice()).map_err(|e| self.err(e))?;
        Ok(())
    }

    fn get_deployment(&self, w: &redb::WriteTransaction, service: &str, id: u64) -> Result<Deployment, StoreError> {
        let t = w.open_table(DEPLOYMENTS).map_err(|e| self.err(e))?;
        let v = t.get((service, id)).map_err(|e| self.err(e))?;
        let v = v.ok_or_else(|| self.corrupt(format!("deployment {service}#{id} is missing")))?;
        serde_json::from_slice(v.value()).map_err(|e| self.corrupt(e))
    }

    fn put_deployment(&self, w: &redb::WriteTransaction, d: &Deployment) -> Result<(), StoreError> {
        let mut t = w.open_table(DEPLOYMENTS).map_err(|e| self.err(e))?;
        let bytes = serde_json::to_vec(d).map_err(|e| self.corrupt(e))?;
        t.insert((d.service.as_str(), d.id), bytes.as_slice())
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Records the start of a deployment, unless the service is paused
    /// (a manual rollback is admitted while paused: it is how an operator
    /// gets back to a good version).
    pub fn begin(
        &self,
        service: &str,
        kind: Kind,
        image: &str,
        version: &str,
        failure_limit: u32,
    ) -> Result<Deployment, StoreError> {
        self.write(|s, w| {
            let mut state = s.get_state(w, service)?;
            if let (Some(p), Kind::Deploy) = (&state.paused, kind) {
                return Err(StoreError::Paused {
                    service: service.to_string(),
                    since: time_of(p.since_ms),
                    failures: state.consecutive_failures,
                    last: state.last_failure.clone().unwrap_or_else(|| p.reason.clone()),
                });
            }
            let now = now_ms();
            if let Some(since) = state.in_progress_since_ms {
                if now.saturating_sub(since) < STALE_DEPLOYMENT.as_millis() as u64 {
                    let t = w.open_table(DEPLOYMENTS).map_err(|e| s.err(e))?;
                    let id = t
                        .range((service, 0)..=(service, u64::MAX))
                        .map_err(|e| s.err(e))?
                        .next_back()
                        .transpose()
                        .map_err(|e| s.err(e))?
                        .map_or(0, |(k, _)| k.value().1);
                    return Err(StoreError::Busy {
                        service: service.to_string(),
                        since: time_of(since),
                        id,
                    });
                }
            }
            let id = {
                let t = w.open_table(DEPLOYMENTS).map_err(|e| s.err(e))?;
                let last = t
                    .range((service, 0)..=(service, u64::MAX))
                    .map_err(|e| s.err(e))?
                    .next_back()
                    .transpose()
                    .map_err(|e| s.err(e))?
                    .map(|(k, _)| k.value().1);
                last.map_or(1, |l| l + 1)
            };
            let d = Deployment {
                id,
                service: service.to_string(),
                kind,
                image: image.to_string(),
                digest: String::new(),
                version: version.to_string(),
                started_ms: now,
                finished_ms: None,
                outcome: None,
                failure: None,
                events: vec![Event {
                    at_ms: now,
                    what: format!("{} of {image} started", kind_word(kind)),
                }],
            };
            s.put_deployment(w, &d)?;
            state.failure_limit = failure_limit;
            state.in_progress_since_ms = Some(now);
            s.put_state(w, service, &state)?;
            Ok(d)
        })
    }

    /// Appends one event to a deployment's timeline.
    pub fn event(&self, service: &str, id: u64, what: &str) -> Result<(), StoreError> {
        self.write(|s, w| {
            let mut d = s.get_deployment(w, service, id)?;
            if d.events.len() >= EVENTS_KEPT {
                d.events.remove(1);
            }
            d.events.push(Event {
                at_ms: now_ms(),
                what: what.to_string(),
            });
            s.put_deployment(w, &d)
        })
    }

    pub fn set_digest(&self, service: &str, id: u64, digest: &str) -> Result<(), StoreError> {
        self.write(|s, w| {
            let mut d = s.get_deployment(w, service, id)?;
            d.digest = digest.to_string();
            s.put_deployment(w, &d)
        })
    }

    /// Marks `release` as the one serving (after the switch).
    pub fn set_active(&self, service: &str, release: &Release) -> Result<(), StoreError> {
        self.write(|s, w| {
            let mut state = s.get_state(w, service)?;
            state.active = Some(release.clone());
            s.put_state(w, service, &state)
        })
    }

    /// Records how a deployment ended and updates the service in the same
    /// transaction: a release that passed joins the rollback targets, one
    /// rolled back from leaves them and the rollback is counted
    /// ([`Effect`]); a successful deployment ends a run of failures, a
    /// failed one extends it, and the run reaching the limit pauses the
    /// service. Returns the service's new state.
    pub fn finish(
        &self,
        service: &str,
        id: u64,
        outcome: Outcome,
        failure: Option<&Failure>,
        effect: Effect,
    ) -> Result<ServiceState, StoreError> {
        self.write(|s, w| {
            let mut d = s.get_deployment(w, service, id)?;
            let now = now_ms();
            d.finished_ms = Some(now);
            d.outcome = Some(outcome);
            d.failure = failure.cloned();
            let mut what = format!("finished: {}", outcome.as_str());
            if let Some(f) = failure {
                what.push_str(&format!(" ({}: {})", f.cause, f.evidence));
            }
            d.events.push(Event { at_ms: now, what });
            s.put_deployment(w, &d)?;
            let mut state = s.get_state(w, service)?;
            state.in_progress_since_ms = None;
            if d.kind == Kind::Deploy {
                *state.counts.deploys.entry(outcome.as_str().to_string()).or_default() += 1;
                state.counts.observe(now.saturating_sub(d.started_ms) as f64 / 1000.0);
            }
            match effect {
                Effect::Nothing => {}
                Effect::Passed(r) => {
                    state.passed.retain(|p| p.digest != r.digest);
                    state.passed.push(r);
                    if state.passed.len() > PASSED_KEPT {
                        state.passed.remove(0);
                    }
                }
                Effect::RolledBack { from } => {
                    state.counts.rollbacks += 1;
                    let serves = state.active.as_ref().is_some_and(|a| a.digest == from);
                    if !from.is_empty() && !serves {
                        state.passed.retain(|p| p.digest != from);
                    }
                }
            }
            // A deployment whose process died says nothing about the image.
            let interrupted = failure.is_some_and(|f| f.cause == crate::classify::Cause::Interrupted);
            if d.kind == Kind::Deploy && !interrupted {
                if outcome == Outcome::Success {
                    state.consecutive_failures = 0;
                    state.last_failure = None;
                } else {
                    state.consecutive_failures += 1;
                    state.last_failure = failure.map(|f| f.cause.to_string()).or(Some(outcome.as_str().into()));
                    if state.consecutive_failures >= state.failure_limit.max(1) && state.paused.is_none() {
                        state.counts.pauses += 1;
                        state.paused = Some(Pause {
                            since_ms: now,
                            reason: format!(
                                "{} consecutive failed deployments (last: {})",
                                state.consecutive_failures,
                                state.last_failure.as_deref().unwrap_or("unknown")
                            ),
                        });
                    }
                }
            }
            s.put_state(w, service, &state)?;
            Ok(state)
        })
    }

    pub fn pause(&self, service: &str, reason: &str) -> Result<ServiceState, StoreError> {
        self.write(|s, w| {
            let mut state = s.get_state(w, service)?;
            if state.paused.is_none() {
                state.counts.pauses += 1;
                state.paused = Some(Pause {
                    since_ms: now_ms(),
                    reason: reason.to_string(),
                });
            }
            s.put_state(w, service, &state)?;
            Ok(state)
        })
    }

    /// Counts one canary analysis window's result.
    pub fn count_analysis(&self, service: &str, result: &str) -> Result<(), StoreError> {
        self.write(|s, w| {
            let mut state = s.get_state(w, service)?;
            *state.counts.analyses.entry(result.to_string()).or_default() += 1;
            s.put_state(w, service, &state)
        })
    }

    /// Lifts a pause and starts the count of failures again.
    pub fn resume(&self, service: &str) -> Result<ServiceState, StoreError> {
        self.write(|s, w| {
            let mut state = s.get_state(w, service)?;
            state.paused = None;
            state.consecutive_failures = 0;
            s.put_state(w, service, &state)?;
            Ok(state)
        })
    }

    pub fn state(&self, service: &str) -> Result<ServiceState, StoreError> {
        self.write(|s, w| s.get_state(w, service))
    }

    /// Every service with its state, by name.
    pub fn services(&self) -> Result<Vec<(String, ServiceState)>, StoreError> {
        let db = self.open()?;
        let r = db.begin_read().map_err(|e| self.err(e))?;
        let t = match r.open_table(SERVICES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(e)),
        };
        let mut out = Vec::new();
        for kv in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = kv.map_err(|e| self.err(e))?;
            let state = serde_json::from_slice(v.value()).map_err(|e| self.corrupt(e))?;
            out.push((k.value().to_string(), state));
        }
        Ok(out)
    }

    /// The deployments of `service` (all services if `None`) that started
    /// at or after `since_ms`, oldest first.
    pub fn deployments(&self, service: Option<&str>, since_ms: u64) -> Result<Vec<Deployment>, StoreError> {
        let db = self.open()?;
        let r = db.begin_read().map_err(|e| self.err(e))?;
        let t = match r.open_table(DEPLOYMENTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(e)),
        };
        let mut out = Vec::new();
        let iter = match service {
            Some(s) => t.range((s, 0)..=(s, u64::MAX)),
            None => t.iter(),
        }
        .map_err(|e| self.err(e))?;
        for kv in iter {
            let (_, v) = kv.map_err(|e| self.err(e))?;
            let d: Deployment = serde_json::from_slice(v.value()).map_err(|e| self.corrupt(e))?;
            if d.started_ms >= since_ms {
                out.push(d);
            }
        }
        out.sort_by_key(|d| (d.started_ms, d.id));
        Ok(out)
    }
}

/// [`Store`]'s transactions, run on the history's thread (see
/// [`Store::bg`]).
pub struct Bg<'a>(&'a Store);

impl Bg<'_> {
    /// [`Store::lock`], waiting a little for a holder that only looks (the
    /// guard takes a service's lock for a moment to see if it is free).
    pub async fn lock(&self, service: &str) -> Result<ServiceLock, StoreError> {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match self.0.lock(service) {
                Err(StoreError::Locked { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                r => return r,
            }
        }
    }

    pub async fn begin(
        &self,
        service: &str,
        kind: Kind,
        image: &str,
        version: &str,
        failure_limit: u32,
    ) -> Result<Deployment, StoreError> {
        let (service, image, version) = (service.to_string(), image.to_string(), version.to_string());
        self.0
            .run(move |s| s.begin(&service, kind, &image, &version, failure_limit))
            .await
    }

    /// Queued, not awaited: written in order before the next transaction;
    /// `echo` is printed to stderr once the event is written.
    pub fn event(&self, service: &str, id: u64, what: &str, echo: Option<String>) {
        let (service, what) = (service.to_string(), what.to_string());
        let queued = self.0.queue(Box::new(move |s| {
            if let Err(e) = s.event(&service, id, &what) {
                tracing::warn!(error = %e, "cannot record an event in the history");
            }
            if let Some(line) = echo {
                eprintln!("{line}");
            }
        }));
        if let Err(e) = queued {
            tracing::warn!(error = %e, "cannot record an event in the history");
        }
    }

    pub async fn set_digest(&self, service: &str, id: u64, digest: &str) -> Result<(), StoreError> {
        let (service, digest) = (service.to_string(), digest.to_string());
        self.0.run(move |s| s.set_digest(&service, id, &digest)).await
    }

    pub async fn set_active(&self, service: &str, release: &Release) -> Result<(), StoreError> {
        let (service, release) = (service.to_string(), release.clone());
        self.0.run(move |s| s.set_active(&service, &release)).await
    }

    pub async fn finish(
        &self,
        service: &str,
        id: u64,
        outcome: Outcome,
        failure: Option<&Failure>,
        effect: Effect,
    ) -> Result<ServiceState, StoreError> {
        let (service, failure) = (service.to_string(), failure.cloned());
        self.0
            .run(move |s| s.finish(&service, id, outcome, failure.as_ref(), effect))
            .await
    }

    pub async fn pause(&self, service: &str, reason: &str) -> Result<ServiceState, StoreError> {
        let (service, reason) = (service.to_string(), reason.to_string());
        self.0.run(move |s| s.pause(&service, &reason)).await
    }

    pub async fn count_analysis(&self, service: &str, result: &'static str) -> Result<(), StoreError> {
        let service = service.to_string();
        self.0.run(move |s| s.count_analysis(&service, result)).await
    }

    pub async fn state(&self, service: &str) -> Result<ServiceState, StoreError> {
        let service = service.to_string();
        self.0.run(move |s| s.state(&service)).await
    }

    pub async fn services(&self) -> Result<Vec<(String, ServiceState)>, StoreError> {
        self.0.run(|s| s.services()).await
    }

    pub async fn deployments(&self, service: Option<&str>, since_ms: u64) -> Result<Vec<Deployment>, StoreError> {
        let service = service.map(str::to_string);
        self.0.run(move |s| s.deployments(service.as_deref(), since_ms)).await
    }
}

fn kind_word(k: Kind) -> &'static str {
    match k {
        Kind::Deploy => "deployment",
        Kind::Rollback => "rollback",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{Cause, Failure};

    fn release(d: &str) -> Release {
        Release {
            image: format!("r/a:{d}"),
            digest: d.into(),
            version: d.into(),
            spec_file: "a.toml".into(),
            spec_toml: String::new(),
        }
    }

    #[test]
    fn failures_pause_and_resume_lifts() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::new(&dir.path().join("h.redb"));
        let d = s.begin("a", Kind::Deploy, "r/a:v1", "v1", 3).unwrap();
        let st = s
            .finish("a", d.id, Outcome::Success, None, Effect::Passed(release("v1")))
            .unwrap();
        assert_eq!(st.consecutive_failures, 0);
        for i in 0..3 {
            let d = s.begin("a", Kind::Deploy, "r/a:v2", "v2", 3).unwrap();
            let f = Failure::new(Cause::Exited, "exit 1");
            let st = s
                .finish("a", d.id, Outcome::Failure, Some(&f), Effect::Nothing)
                .unwrap();
            assert_eq!(st.paused.is_some(), i == 2);
        }
        let e = s.begin("a", Kind::Deploy, "r/a:v3", "v3", 3).unwrap_err();
        assert!(e.to_string().contains("berth watch resume a"), "{e}");
        // A manual rollback is still admitted.
        let r = s.begin("a", Kind::Rollback, "r/a:v1", "v1", 3).unwrap();
        s.finish(
            "a",
            r.id,
            Outcome::Success,
            None,
            Effect::RolledBack { from: "v2".into() },
        )
        .unwrap();
        s.resume("a").unwrap();
        s.begin("a", Kind::Deploy, "r/a:v3", "v3", 3).unwrap();
        let all = s.deployments(Some("a"), 0).unwrap();
        assert_eq!(all.iter().map(|d| d.id).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
        let st = s.state("a").unwrap();
        assert_eq!(st.rollback_target("v2").unwrap().digest, "v1");
        assert_eq!(st.counts.deploys["failure"], 3);
        assert_eq!(st.counts.deploys["success"], 1);
        assert_eq!(st.counts.pauses, 1);
        assert_eq!(st.counts.rollbacks, 1, "the manual rollback");
        assert_eq!(st.counts.duration_buckets.iter().sum::<u64>(), 4);
    }

    /// v1 and v2 pass; v2 turns bad and berth rolls back from it to v1;
    /// v3 then fails: its rollback goes to v1, never to v2.
    #[test]
    fn a_release_rolled_back_from_is_no_longer_a_target() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::new(&dir.path().join("h.redb"));
        for v in ["v1", "v2"] {
            let d = s.begin("a", Kind::Deploy, v, v, 3).unwrap();
            s.finish("a", d.id, Outcome::Success, None, Effect::Passed(release(v)))
                .unwrap();
            s.set_active("a", &release(v)).unwrap();
        }
        assert_eq!(s.state("a").unwrap().rollback_target("v3").unwrap().digest, "v2");
        // The guard's rollback from v2 (the active release) to v1.
        let st = s.state("a").unwrap();
        let target = st.rollback_target("v2").unwrap().clone();
        assert_eq!(target.digest, "v1");
        let r = s.begin("a", Kind::Rollback, &target.image, &target.version, 3).unwrap();
        s.set_active("a", &target).unwrap();
        let st = s
            .finish(
                "a",
                r.id,
                Outcome::Success,
                None,
                Effect::RolledBack { from: "v2".into() },
            )
            .unwrap();
        assert_eq!(st.passed.iter().map(|p| p.digest.as_str()).collect::<Vec<_>>(), ["v1"]);
        // v3 fails after its switch: it goes back to v1.
        let d = s.begin("a", Kind::Deploy, "v3", "v3", 3).unwrap();
        assert_eq!(st.rollback_target("v3").map(|r| r.digest.as_str()), Some("v1"));
        let f = Failure::new(Cause::Unhealthy, "3 consecutive failed health checks");
        let st = s
            .finish(
                "a",
                d.id,
                Outcome::RolledBack,
                Some(&f),
                Effect::RolledBack { from: "v3".into() },
            )
            .unwrap();
        assert_eq!(st.rollback_target("v3").map(|r| r.digest.as_str()), Some("v1"));
        assert_eq!(st.counts.rollbacks, 2);
        // v2 deployed again and passing is a rollback target again.
        let d = s.begin("a", Kind::Deploy, "v2", "v2", 3).unwrap();
        let st = s
            .finish("a", d.id, Outcome::Success, None, Effect::Passed(release("v2")))
            .unwrap();
        assert_eq!(st.rollback_target("v4").map(|r| r.digest.as_str()), Some("v2"));
        // An unknown digest (a Kubernetes tag) counts, and removes nothing.
        let d = s.begin("a", Kind::Deploy, "v5", "v5", 3).unwrap();
        let st = s
            .finish(
                "a",
                d.id,
                Outcome::RolledBack,
                Some(&f),
                Effect::RolledBack { from: String::new() },
            )
            .unwrap();
        assert_eq!((st.passed.len(), st.counts.rollbacks), (2, 3));
        // A deployment of the active release's own digest that failed and
        // was started again: what serves stays a target.
        assert_eq!(st.active.as_ref().map(|a| a.digest.as_str()), Some("v1"));
        let d = s.begin("a", Kind::Deploy, "v1", "v1", 3).unwrap();
        let st = s
            .finish(
                "a",
                d.id,
                Outcome::RolledBack,
                Some(&f),
                Effect::RolledBack { from: "v1".into() },
            )
            .unwrap();
        assert_eq!(st.rollback_target("v2").map(|r| r.digest.as_str()), Some("v1"));
    }

    /// A rollback counts once whatever the outcome: a deployment not
    /// healthy within its start timeout and rolled back stays a `timeout`.
    #[test]
    fn every_rollback_counts_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::new(&dir.path().join("h.redb"));
        let d = s.begin("a", Kind::Deploy, "v1", "v1", 5).unwrap();
        s.finish("a", d.id, Outcome::Success, None, Effect::Passed(release("v1")))
            .unwrap();
        let timeout = Failure::new(Cause::StartTimeout, "not Running and healthy within 5s");
        let d = s.begin("a", Kind::Deploy, "v2", "v2", 5).unwrap();
        let st = s
            .finish(
                "a",
                d.id,
                Outcome::Timeout,
                Some(&timeout),
                Effect::RolledBack { from: "v2".into() },
            )
            .unwrap();
        assert_eq!((st.counts.deploys["timeout"], st.counts.rollbacks), (1, 1));
        // A timeout with nothing undone, and a rollback that failed, do not.
        let d = s.begin("a", Kind::Deploy, "v3", "v3", 5).unwrap();
        s.finish("a", d.id, Outcome::Timeout, Some(&timeout), Effect::Nothing)
            .unwrap();
        let r = s.begin("a", Kind::Rollback, "v1", "v1", 5).unwrap();
        let st = s
            .finish("a", r.id, Outcome::Failure, Some(&timeout), Effect::Nothing)
            .unwrap();
        assert_eq!((st.counts.deploys["timeout"], st.counts.rollbacks), (2, 1));
        assert_eq!(st.rollback_target("v2").map(|r| r.digest.as_str()), Some("v1"));
    }

    #[test]
    fn a_lock_is_held_until_dropped_and_names_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::new(&dir.path().join("h.redb"));
        let held = s.lock("a").unwrap();
        let e = s.lock("a").unwrap_err();
        assert!(
            matches!(&e, StoreError::Locked { pid, .. } if *pid == std::process::id().to_string()),
            "{e}"
        );
        s.lock("b").unwrap();
        drop(held);
        s.lock("a").unwrap();
    }

    #[test]
    fn an_interruption_does_not_count_towards_the_pause() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::new(&dir.path().join("h.redb"));
        for _ in 0..3 {
            let d = s.begin("a", Kind::Deploy, "r/a:v2", "v2", 2).unwrap();
            let f = Failure::new(Cause::Interrupted, "killed");
            let st = s
                .finish("a", d.id, Outcome::Failure, Some(&f), Effect::Nothing)
                .unwrap();
            assert_eq!((st.consecutive_failures, st.paused.is_some()), (0, false));
            assert!(st.in_progress_since_ms.is_none());
        }
        assert_eq!(s.state("a").unwrap().counts.deploys["failure"], 3);
    }

    #[tokio::test]
    async fn background_transactions_keep_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::new(&dir.path().join("h.redb"));
        let d = s.bg().begin("a", Kind::Deploy, "r/a:v1", "v1", 3).await.unwrap();
        let main = std::thread::current().id();
        for i in 0..50 {
            s.bg().event("a", d.id, &format!("event {i}"), None);
        }
        let on = s.run(move |_| Ok(std::thread::current().id())).await.unwrap();
        assert_ne!(on, main, "not on the runtime's thread");
        s.bg()
            .finish("a", d.id, Outcome::Success, None, Effect::Nothing)
            .await
            .unwrap();
        let d = &s.bg().deployments(Some("a"), 0).await.unwrap()[0];
        let events: Vec<&str> = d.events.iter().map(|e| e.what.as_str()).collect();
        assert_eq!(events.len(), 52, "{events:?}");
        assert_eq!(events[1], "event 0");
        assert_eq!(events[50], "event 49");
        assert!(events[51].starts_with("finished: success"));
    }
}
