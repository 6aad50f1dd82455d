//! Durable history: every deployment's timeline, and each service's state
//! (the active release, the releases that passed, the run of failures, the
//! pause), in one redb file. The check that admits a deployment (not
//! paused) is in the transaction that records it.
//!
//! The file is opened for each transaction and closed after it, so
//! `berth watch status` can read while `berth watch run` guards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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
    #[error("service {0:?} has no deployment in the history")]
    Unknown(String),
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

impl ServiceState {
    /// The newest release that passed and is not `digest`: where a
    /// rollback goes.
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

#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
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
        }
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

    /// Records how a deployment ended and updates the service: a success
    /// joins the releases that passed and ends a run of failures; a failed
    /// deployment extends the run, and the run reaching the limit pauses
    /// the service. Returns the service's new state.
    pub fn finish(
        &self,
        service: &str,
        id: u64,
        outcome: Outcome,
        failure: Option<&Failure>,
        passed: Option<&Release>,
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
            match d.kind {
                Kind::Deploy => {
                    *state.counts.deploys.entry(outcome.as_str().to_string()).or_default() += 1;
                    state.counts.observe(now.saturating_sub(d.started_ms) as f64 / 1000.0);
                    if outcome == Outcome::RolledBack {
                        state.counts.rollbacks += 1;
                    }
                }
                Kind::Rollback if outcome == Outcome::Success => state.counts.rollbacks += 1,
                Kind::Rollback => {}
            }
            if let Some(r) = passed {
                state.passed.retain(|p| p.digest != r.digest);
                state.passed.push(r.clone());
                if state.passed.len() > PASSED_KEPT {
                    state.passed.remove(0);
                }
            }
            if d.kind == Kind::Deploy {
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
            .finish("a", d.id, Outcome::Success, None, Some(&release("v1")))
            .unwrap();
        assert_eq!(st.consecutive_failures, 0);
        for i in 0..3 {
            let d = s.begin("a", Kind::Deploy, "r/a:v2", "v2", 3).unwrap();
            let f = Failure::new(Cause::Exited, "exit 1");
            let st = s.finish("a", d.id, Outcome::Failure, Some(&f), None).unwrap();
            assert_eq!(st.paused.is_some(), i == 2);
        }
        let e = s.begin("a", Kind::Deploy, "r/a:v3", "v3", 3).unwrap_err();
        assert!(e.to_string().contains("berth watch resume a"), "{e}");
        // A manual rollback is still admitted.
        let r = s.begin("a", Kind::Rollback, "r/a:v1", "v1", 3).unwrap();
        s.finish("a", r.id, Outcome::Success, None, None).unwrap();
        s.resume("a").unwrap();
        s.begin("a", Kind::Deploy, "r/a:v3", "v3", 3).unwrap();
        let all = s.deployments(Some("a"), 0).unwrap();
        assert_eq!(all.iter().map(|d| d.id).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
        let st = s.state("a").unwrap();
        assert_eq!(st.rollback_target("v2").unwrap().digest, "v1");
        assert_eq!(st.counts.deploys["failure"], 3);
        assert_eq!(st.counts.deploys["success"], 1);
        assert_eq!(st.counts.pauses, 1);
        assert_eq!(st.counts.duration_buckets.iter().sum::<u64>(), 4);
    }
}
