//! Docker Swarm services: berth updates the service itself (by digest,
//! `POST /services/{id}/update`), watches the update with its own checks
//! (tasks Running within the start timeout, tasks that exit or are
//! rejected, the guide's health JSON through the published port) and, when
//! they fail, rolls the service back itself to the last release that passed,
//! by posting that release's spec. Swarm's own `failure_action` and
//! `monitor` are not trusted: a `monitor` shorter than the health check
//! lets a bad update count as a success, and its automatic rollback often
//! does not fire.

use std::path::Path;
use std::time::Instant;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::classify::{classify_pull_message, Cause, Failure};
use crate::engine::{EngineError, LABEL_DEPLOYMENT, LABEL_DIGEST, LABEL_SERVICE};
use crate::health::{self, Check};
use crate::rollout::{Begun, Guard, WatchError};
use crate::spec::{self, Spec, Swarm};
use crate::store::{Deployment, Effect, Outcome, Release, ServiceState};

/// A Swarm service as the Engine keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub id: String,
    /// The object's version, for the next update.
    pub version: u64,
    /// Its spec, kept whole: berth changes only the fields it manages.
    pub spec: Value,
    /// `updating`, `paused`, `completed`, `rollback_started`, ... (empty
    /// before any update).
    pub update_state: String,
    pub update_message: String,
}

/// One task of a service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Task {
    pub id: String,
    pub slot: u64,
    /// The image its spec names (as berth posted it: `REPO@DIGEST`).
    pub image: String,
    pub desired: String,
    /// new, pending, assigned, preparing, starting, running, complete,
    /// failed, rejected, shutdown, ...
    pub state: String,
    pub message: String,
    pub err: String,
    pub exit_code: Option<i64>,
    pub container: Option<String>,
    /// The berth deployment that posted its spec (a label).
    pub deployment: String,
}

impl Task {
    fn describe(&self) -> String {
        let mut s = format!("task {} (slot {}): {}", short_id(&self.id), self.slot, self.state);
        if !self.message.is_empty() {
            s.push_str(&format!(" ({})", self.message));
        }
        if !self.err.is_empty() {
            s.push_str(&format!(": {}", self.err));
        }
        s
    }
}

/// The Engine API calls (1.41) behind [`crate::Engine`]'s Swarm methods.
pub(crate) mod api {
    use super::*;
    use crate::engine::{query, Docker};
    use hyper::Method;

    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct RawService {
        #[serde(rename = "ID")]
        id: String,
        version: RawVersion,
        spec: Value,
        #[serde(default)]
        update_status: Option<RawUpdateStatus>,
    }

    #[derive(Deserialize)]
    struct RawVersion {
        #[serde(rename = "Index")]
        index: u64,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct RawUpdateStatus {
        #[serde(default)]
        state: String,
        #[serde(default)]
        message: String,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct RawTask {
        #[serde(rename = "ID")]
        id: String,
        #[serde(default)]
        slot: u64,
        #[serde(default)]
        desired_state: String,
        #[serde(default)]
        spec: Value,
        status: RawTaskStatus,
        #[serde(default)]
        updated_at: String,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct RawTaskStatus {
        #[serde(default)]
        state: String,
        #[serde(default)]
        message: String,
        #[serde(default)]
        err: String,
        #[serde(default)]
        container_status: Option<RawContainerStatus>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct RawContainerStatus {
        #[serde(rename = "ContainerID", default)]
        container_id: String,
        #[serde(default)]
        exit_code: Option<i64>,
    }

    pub(crate) async fn service(d: &Docker, name: &str) -> Result<Option<Service>, EngineError> {
        let r: Result<RawService, _> = d
            .json(Method::GET, &format!("/services/{name}"), None, "inspect the service")
            .await;
        match r {
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
            Ok(s) => Ok(Some(Service {
                id: s.id,
                version: s.version.index,
                spec: s.spec,
                update_state: s.update_status.as_ref().map(|u| u.state.clone()).unwrap_or_default(),
                update_message: s.update_status.map(|u| u.message).unwrap_or_default(),
            })),
        }
    }

    pub(crate) async fn create(d: &Docker, spec: &Value) -> Result<String, EngineError> {
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "ID")]
            id: String,
        }
        let c: Created = d
            .json(
                Method::POST,
                "/services/create",
                Some(spec.clone()),
                "create the service",
            )
            .await?;
        Ok(c.id)
    }

    pub(crate) async fn update(d: &Docker, id: &str, version: u64, spec: &Value) -> Result<(), EngineError> {
        d.call(
            Method::POST,
            &format!("/services/{id}/update?{}", query(&[("version", &version.to_string())])),
            Some(spec.clone()),
            "update the service",
        )
        .await
        .map(|_| ())
    }

    pub(crate) async fn rollback(d: &Docker, id: &str, version: u64, spec: &Value) -> Result<(), EngineError> {
        d.call(
            Method::POST,
            &format!(
                "/services/{id}/update?{}",
                query(&[("version", &version.to_string()), ("rollback", "previous")])
            ),
            Some(spec.clone()),
            "roll the service back to its previous spec",
        )
        .await
        .map(|_| ())
    }

    pub(crate) async fn remove(d: &Docker, id: &str) -> Result<(), EngineError> {
        match d
            .call(Method::DELETE, &format!("/services/{id}"), None, "remove the service")
            .await
        {
            Err(e) if e.status() == Some(404) => Ok(()),
            r => r.map(|_| ()),
        }
    }

    pub(crate) async fn tasks(d: &Docker, name: &str) -> Result<Vec<Task>, EngineError> {
        let filters = json!({"service": [name]}).to_string();
        let mut raw: Vec<RawTask> = d
            .json(
                Method::GET,
                &format!("/tasks?{}", query(&[("filters", &filters)])),
                None,
                "list the service's tasks",
            )
            .await?;
        // RFC 3339 with the same precision and zone: text order is time order.
        raw.sort_by(|a, b| b.updated_at.cmp(&a.updated_at));
        Ok(raw
            .into_iter()
            .map(|t| {
                let cs = t.status.container_status;
                Task {
                    image: t.spec["ContainerSpec"]["Image"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    deployment: t.spec["ContainerSpec"]["Labels"][LABEL_DEPLOYMENT]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    id: t.id,
                    slot: t.slot,
                    desired: t.desired_state,
                    state: t.status.state,
                    message: t.status.message,
                    err: t.status.err,
                    exit_code: cs.as_ref().and_then(|c| c.exit_code),
                    container: cs.map(|c| c.container_id).filter(|c| !c.is_empty()),
                }
            })
            .collect())
    }
}

/// The spec berth posts: `current` (the service as it is, if it exists)
/// with the fields the description manages set, the rest kept as the
/// operator left it.
pub fn service_spec(
    spec: &Spec,
    sw: &Swarm,
    image: &str,
    digest: &str,
    deployment: u64,
    current: Option<&Value>,
) -> Value {
    let mut s = current.cloned().unwrap_or_else(|| json!({}));
    s["Name"] = json!(sw.service);
    s["Labels"][LABEL_SERVICE] = json!(spec.name);
    let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.sort();
    let cs = &mut s["TaskTemplate"]["ContainerSpec"];
    cs["Image"] = json!(image);
    cs["Env"] = json!(env);
    cs["Labels"][LABEL_DIGEST] = json!(digest);
    cs["Labels"][LABEL_DEPLOYMENT] = json!(deployment.to_string());
    if let Some(cmd) = &spec.command {
        cs["Args"] = json!(cmd);
    }
    if let Some(g) = sw.stop_grace_period {
        cs["StopGracePeriod"] = json!(g.as_nanos() as i64);
    }
    if let Some(c) = spec.cpus {
        s["TaskTemplate"]["Resources"]["Limits"]["NanoCPUs"] = json!((c * 1e9) as i64);
    }
    if let Some(m) = spec.memory {
        s["TaskTemplate"]["Resources"]["Limits"]["MemoryBytes"] = json!(m);
    }
    s["Mode"] = json!({"Replicated": {"Replicas": spec.replicas}});
    let ports: Vec<Value> = spec
        .ports
        .iter()
        .map(|p| {
            let mut v = json!({"Protocol": "tcp", "TargetPort": p.container, "PublishMode": sw.publish_mode});
            if let Some(h) = p.host {
                v["PublishedPort"] = json!(h);
            }
            v
        })
        .collect();
    s["EndpointSpec"] = json!({"Ports": ports});
    if current.is_none() {
        // One task at a time, the old one stopped first (a fixed published
        // port), and Swarm told to stop, not to decide: berth decides.
        s["UpdateConfig"] = json!({"Parallelism": 1, "Order": "stop-first", "FailureAction": "pause"});
    }
    s
}

/// What the update's watch saw go wrong, from the tasks of the new image.
pub fn task_failure(t: &Task) -> Option<Failure> {
    let err = t.err.to_ascii_lowercase();
    match t.state.as_str() {
        "rejected" if err.contains("no such image") || err.contains("pull") || err.contains("manifest") => {
            Some(Failure::new(classify_pull_message(&t.err, None), t.describe()))
        }
        "rejected" => Some(Failure::new(Cause::ContainerConfig, t.describe())),
        "failed" | "complete" | "orphaned" => {
            let mut f = Failure::new(Cause::Exited, t.describe());
            if let Some(c) = t.exit_code {
                f.evidence.push_str(&format!(", exit code {c}"));
            }
            Some(f)
        }
        _ => None,
    }
}

/// How far a failed deployment got with the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Posted {
    Nothing,
    Created,
    Updated,
}

/// The tasks of `image` posted by deployment `deployment` (every one: a
/// task that failed has a newer replacement in its slot), newest first.
fn tasks_of<'a>(tasks: &'a [Task], image: &str, deployment: &str) -> Vec<&'a Task> {
    tasks
        .iter()
        .filter(|t| t.image == image && t.deployment == deployment)
        .collect()
}

/// The newest task of each slot among `tasks`.
fn newest_per_slot<'a>(tasks: &[&'a Task]) -> Vec<&'a Task> {
    let mut seen = std::collections::BTreeSet::new();
    tasks.iter().copied().filter(|t| seen.insert(t.slot)).collect()
}

fn short_id(id: &str) -> &str {
    &id[..12.min(id.len())]
}

fn health_url(spec: &Spec) -> Option<String> {
    spec.ports
        .iter()
        .find(|p| p.container == spec.health.port)
        .and_then(|p| p.host)
        .map(|h| format!("http://127.0.0.1:{h}{}", spec.health.path))
}

impl Guard {
    /// Deploys `spec` to its Swarm service: update (or create), watch,
    /// verify, and roll back to the last release that passed on failure.
    pub(crate) async fn deploy_swarm(
        &self,
        spec: &Spec,
        sw: &Swarm,
        Begun { d, t0, before }: Begun,
        (spec_file, toml): (&str, &str),
    ) -> Result<Deployment, WatchError> {
        let digest = match self.resolve(&spec.image, &d).await {
            Ok(dg) => dg,
            Err(e) => {
                let f = self.pull_failure(&spec.image, &e).await;
                return self.swarm_end(spec, sw, &d, t0, &before, f, Posted::Nothing).await;
            }
        };
        let release = Release {
            image: spec.image.clone(),
            digest: digest.clone(),
            version: spec.version.clone(),
            spec_file: spec_file.to_string(),
            spec_toml: toml.to_string(),
        };
        let created = match self.post_release(spec, sw, &release, &d, t0).await {
            Ok(c) => c,
            Err(f) => return self.swarm_end(spec, sw, &d, t0, &before, f, Posted::Nothing).await,
        };
        let posted = if created { Posted::Created } else { Posted::Updated };
        if let Err(f) = self.swarm_gate(spec, sw, &release, &d, t0).await {
            return self.swarm_end(spec, sw, &d, t0, &before, f, posted).await;
        }
        let _ = self.store.bg().set_active(&spec.name, &release).await;
        self.log(
            &d,
            t0,
            &format!(
                "all tasks of {} Running and healthy; verifying health for {:?}",
                spec.version, spec.rollout.verify
            ),
        );
        if let Err(f) = self
            .swarm_watch(spec, sw, &release, Some(Instant::now() + spec.rollout.verify), &|m| {
                self.log(&d, t0, m)
            })
            .await
        {
            return self.swarm_end(spec, sw, &d, t0, &before, f, posted).await;
        }
        self.log(&d, t0, &format!("{} passed; deployment succeeded", spec.version));
        self.store
            .bg()
            .finish(&spec.name, d.id, Outcome::Success, None, Effect::Passed(release))
            .await?;
        self.finished(&spec.name, d.id).await
    }

    /// Posts `release` to the service (creating it if there is none);
    /// true if it was created.
    async fn post_release(
        &self,
        spec: &Spec,
        sw: &Swarm,
        release: &Release,
        d: &Deployment,
        t0: Instant,
    ) -> Result<bool, Failure> {
        let engine = |e: EngineError| Failure::new(Cause::Engine, e.message());
        let by_digest = format!("{}@{}", spec::repository_of(&release.image), release.digest);
        let current = self.engine.service(&sw.service).await.map_err(engine)?;
        let body = service_spec(
            spec,
            sw,
            &by_digest,
            &release.digest,
            d.id,
            current.as_ref().map(|c| &c.spec),
        );
        match current {
            None => {
                let id = self.engine.create_service(&body).await.map_err(engine)?;
                self.log(
                    d,
                    t0,
                    &format!(
                        "created Swarm service {} ({}) with {by_digest}",
                        sw.service,
                        short_id(&id)
                    ),
                );
                Ok(true)
            }
            Some(c) => {
                self.engine
                    .update_service(&c.id, c.version, &body)
                    .await
                    .map_err(engine)?;
                self.log(
                    d,
                    t0,
                    &format!(
                        "updated Swarm service {} to {by_digest} (version {})",
                        sw.service, c.version
                    ),
                );
                Ok(false)
            }
        }
    }

    /// A service created by this deployment that failed is removed: nothing
    /// half-made is left crash-looping.
    async fn remove_created(&self, sw: &Swarm, d: &Deployment, t0: Instant) {
        match self.engine.remove_service(&sw.service).await {
            Ok(()) => self.log(d, t0, &format!("removed Swarm service {}: it never passed", sw.service)),
            Err(e) => self.log(
                d,
                t0,
                &format!("cannot remove Swarm service {}: {}", sw.service, e.message()),
            ),
        }
    }

    /// Waits until every slot runs a task of `release` and the health
    /// endpoint answers healthy with its version, within the start timeout;
    /// fails at once on a task that exits or is rejected.
    async fn swarm_gate(
        &self,
        spec: &Spec,
        sw: &Swarm,
        release: &Release,
        d: &Deployment,
        t0: Instant,
    ) -> Result<(), Failure> {
        let image = format!("{}@{}", spec::repository_of(&release.image), release.digest);
        let deadline = Instant::now() + spec.rollout.start_timeout;
        let poll = spec.health.interval.min(std::time::Duration::from_millis(500));
        let mut wrong = 0;
        let mut last = String::from("no task yet");
        let mut reported = std::collections::HashSet::new();
        loop {
            let tasks = self
                .engine
                .tasks(&sw.service)
                .await
                .map_err(|e| Failure::new(Cause::Engine, e.message()))?;
            let mine = tasks_of(&tasks, &image, &d.id.to_string());
            if let Some((t, f)) = mine.iter().rev().find_map(|t| task_failure(t).map(|f| (t, f))) {
                return Err(self.swarm_evidence(t, f).await);
            }
            let current = newest_per_slot(&mine);
            for t in &current {
                if t.state == "running" && reported.insert(t.id.clone()) {
                    self.log(d, t0, &format!("{} Running", t.describe()));
                }
            }
            let running = current.iter().filter(|t| t.state == "running").count() as u32;
            let others = tasks
                .iter()
                .filter(|t| t.image != image && t.state == "running")
                .count();
            if running < spec.replicas || others > 0 {
                last = match current.iter().find(|t| t.state != "running") {
                    Some(t) => t.describe(),
                    None if others > 0 => format!("{others} task(s) of the old version still running"),
                    None => format!("{running} of {} tasks running", spec.replicas),
                };
            } else if let Some(url) = health_url(spec) {
                let c = health::check(&self.http, &url, spec.health.timeout, &release.version).await;
                match &c {
                    Check::Healthy => {
                        self.log(d, t0, &format!("{running} task(s) Running; {url} healthy"));
                        return Ok(());
                    }
                    Check::WrongVersion { .. } => {
                        wrong += 1;
                        if wrong >= spec.health.threshold {
                            return Err(Failure::new(Cause::WrongVersion, c.describe(&release.version)));
                        }
                    }
                    _ => wrong = 0,
                }
                last = format!("tasks running; last health check: {}", c.describe(&release.version));
            }
            if Instant::now() >= deadline {
                let cause = if last.contains("no suitable node") {
                    Cause::Unschedulable
                } else {
                    Cause::StartTimeout
                };
                return Err(Failure::new(
                    cause,
                    format!(
                        "not Running and healthy within {:?}: {last}",
                        spec.rollout.start_timeout
                    ),
                ));
            }
            tokio::time::sleep(poll.min(deadline.saturating_duration_since(Instant::now()))).await;
        }
    }

    /// The container's last output, when the task ran on this node.
    async fn swarm_evidence(&self, t: &Task, mut f: Failure) -> Failure {
        if let Some(c) = &t.container {
            if let Ok(logs) = self.engine.logs_tail(c, 20).await {
                if !logs.is_empty() {
                    f.evidence.push_str(&format!("; output: {logs}"));
                }
            }
        }
        if f.cause.is_pull() {
            if let Some(diag) = self.diagnoser.diagnose(&t.image, &f).await {
                f.root_cause = Some(diag.root_cause);
                f.fix = diag.fix;
            }
        }
        f
    }

    /// Checks the service once per health interval until `until` (or for
    /// ever): its tasks of `release` still run, and the health endpoint
    /// passes; the threshold of consecutive failed checks fails it.
    pub(crate) async fn swarm_watch(
        &self,
        spec: &Spec,
        sw: &Swarm,
        release: &Release,
        until: Option<Instant>,
        on_failed_check: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<(), Failure> {
        let image = format!("{}@{}", spec::repository_of(&release.image), release.digest);
        let failed_tasks = |tasks: &[Task]| -> Vec<Task> {
            tasks
                .iter()
                .filter(|t| t.image == image && task_failure(t).is_some())
                .cloned()
                .collect()
        };
        // Tasks that had failed before the watch began are history.
        let before: std::collections::HashSet<String> = match self.engine.tasks(&sw.service).await {
            Ok(t) => failed_tasks(&t).into_iter().map(|t| t.id).collect(),
            Err(e) => return Err(Failure::new(Cause::Engine, e.message())),
        };
        let mut failed = 0;
        loop {
            if until.is_some_and(|u| Instant::now() >= u) {
                return Ok(());
            }
            tokio::time::sleep(spec.health.interval).await;
            let tasks = self
                .engine
                .tasks(&sw.service)
                .await
                .map_err(|e| Failure::new(Cause::Engine, e.message()))?;
            if let Some(t) = failed_tasks(&tasks).into_iter().find(|t| !before.contains(&t.id)) {
                let f = task_failure(&t).unwrap_or_else(|| Failure::new(Cause::Exited, t.describe()));
                let mut f = self.swarm_evidence(&t, f).await;
                if f.cause == Cause::Exited {
                    f.cause = Cause::Restarting;
                }
                return Err(f);
            }
            let c = match health_url(spec) {
                Some(url) => health::check(&self.http, &url, spec.health.timeout, &release.version).await,
                None => Check::NoAnswer("the health port is not published".into()),
            };
            if c.ok() {
                failed = 0;
                continue;
            }
            failed += 1;
            on_failed_check(&format!(
                "health check failed ({failed}/{}): {}",
                spec.health.threshold,
                c.describe(&release.version)
            ));
            if failed >= spec.health.threshold {
                let cause = if matches!(c, Check::WrongVersion { .. }) {
                    Cause::WrongVersion
                } else {
                    Cause::Unhealthy
                };
                return Err(Failure::new(
                    cause,
                    format!(
                        "{failed} consecutive failed health checks; last: {}",
                        c.describe(&release.version)
                    ),
                ));
            }
        }
    }

    /// Ends a failed Swarm deployment. If the update was posted
    /// (`posted`), the bad version replaced tasks: berth rolls the service
    /// back to the last release that passed, by digest, and waits for it
    /// to be Running and healthy again.
    #[allow(clippy::too_many_arguments)]
    async fn swarm_end(
        &self,
        spec: &Spec,
        sw: &Swarm,
        d: &Deployment,
        t0: Instant,
        before: &ServiceState,
        mut f: Failure,
        posted: Posted,
    ) -> Result<Deployment, WatchError> {
        self.log(d, t0, &format!("check failed: {}: {}", f.cause, f.evidence));
        let mut rolled_back: Option<String> = None;
        let digest = self.recorded_digest(d).await;
        if posted != Posted::Nothing {
            match before.rollback_target(&digest) {
                // Made by this deployment, never passed: removed, so nothing
                // half-made is left crash-looping.
                None if posted == Posted::Created => self.remove_created(sw, d, t0).await,
                // A service berth has no passing release of (made by hand,
                // or by another tool): Swarm's own previous spec.
                None => match self.swarm_previous(spec, sw, d, t0).await {
                    Ok(()) => rolled_back = Some("the service's previous spec".into()),
                    Err(e) => f.evidence.push_str(&format!(
                        "; no earlier release passed under berth, and Swarm's rollback to the previous spec failed: {}",
                        e.evidence
                    )),
                },
                Some(target) => match self.swarm_restore(target, d, t0).await {
                    Ok(()) => rolled_back = Some(target.version.clone()),
                    Err(f2) => f.evidence.push_str(&format!(
                        "; the rollback to {} failed too: {}: {}",
                        target.version, f2.cause, f2.evidence
                    )),
                },
            }
        }
        let outcome = match (f.cause, &rolled_back) {
            (Cause::StartTimeout, _) => Outcome::Timeout,
            (_, Some(_)) => Outcome::RolledBack,
            _ => Outcome::Failure,
        };
        let (name, summary) = match (&rolled_back, f.cause) {
            (_, Cause::StartTimeout) => (
                "BerthWatchDeployTimeout",
                format!(
                    "{}: {} was not Running and healthy within {:?}{}",
                    spec.name,
                    spec.version,
                    spec.rollout.start_timeout,
                    rolled_back
                        .as_ref()
                        .map_or(String::new(), |t| format!("; rolled back to {t}"))
                ),
            ),
            (Some(t), c) => (
                "BerthWatchRolledBack",
                format!(
                    "{}: the Swarm update to {} failed ({c}); berth rolled it back to {t}",
                    spec.name, spec.version
                ),
            ),
            (None, c) if c.is_pull() => (
                "BerthWatchPullFailed",
                format!("{}: pulling {} failed: {c}", spec.name, spec.image),
            ),
            (None, c) => (
                "BerthWatchDeployFailed",
                format!("{}: deployment of {} failed: {c}", spec.name, spec.image),
            ),
        };
        self.end_failed(spec, d, before, outcome, &f, rolled_back.is_some(), (name, summary))
            .await
    }

    /// Swarm's server-side rollback to the spec before berth's update
    /// (`rollback=previous`), for a service berth has no passing release
    /// of; waits until Swarm says it is done and a task of that spec runs.
    async fn swarm_previous(&self, spec: &Spec, sw: &Swarm, d: &Deployment, t0: Instant) -> Result<(), Failure> {
        let engine = |e: EngineError| Failure::new(Cause::Engine, e.message());
        let svc = self
            .engine
            .service(&sw.service)
            .await
            .map_err(engine)?
            .ok_or_else(|| Failure::new(Cause::Engine, format!("Swarm service {} is gone", sw.service)))?;
        if svc.update_state.starts_with("rollback") {
            // Swarm's own failure_action got there first: rolling back again
            // would go "back" to the bad spec. Wait for it instead.
            self.log(
                d,
                t0,
                &format!("Swarm is rolling {} back itself ({})", sw.service, svc.update_state),
            );
        } else {
            self.engine
                .rollback_service(&svc.id, svc.version, &svc.spec)
                .await
                .map_err(engine)?;
        }
        self.log(
            d,
            t0,
            &format!(
                "no release of {} passed under berth: Swarm's own rollback to the previous spec (rollback=previous)",
                sw.service
            ),
        );
        let deadline = Instant::now() + spec.rollout.start_timeout;
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let now = self.engine.service(&sw.service).await.map_err(engine)?;
            let image = now
                .as_ref()
                .and_then(|n| {
                    n.spec["TaskTemplate"]["ContainerSpec"]["Image"]
                        .as_str()
                        .map(str::to_string)
                })
                .unwrap_or_default();
            let state = now.map(|n| n.update_state).unwrap_or_default();
            let tasks = self.engine.tasks(&sw.service).await.map_err(engine)?;
            let running = tasks.iter().any(|t| t.image == image && t.state == "running");
            // Swarm says "rollback_completed" only after its rollback
            // monitor period; a running task of the previous spec that
            // answers healthy (its version is not known to berth) is enough.
            if state.starts_with("rollback") && running {
                let c = match health_url(spec) {
                    Some(url) => health::check(&self.http, &url, spec.health.timeout, "").await,
                    None => Check::NoAnswer("the health port is not published".into()),
                };
                if matches!(c, Check::Healthy | Check::WrongVersion { .. }) {
                    self.log(d, t0, &format!("the previous spec serves again ({image}, {state})"));
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(Failure::new(
                    Cause::StartTimeout,
                    format!(
                        "Swarm's rollback did not finish within {:?} (update state {state:?})",
                        spec.rollout.start_timeout
                    ),
                ));
            }
        }
    }

    /// Posts a release that passed before and waits for it to serve.
    pub(crate) async fn swarm_restore(&self, target: &Release, d: &Deployment, t0: Instant) -> Result<(), Failure> {
        let spec = spec::parse(Path::new(&target.spec_file), &target.spec_toml)
            .map_err(|e| Failure::new(Cause::Config, e.to_string()))?;
        let spec = Spec {
            image: target.image.clone(),
            version: target.version.clone(),
            ..spec
        };
        let spec::Backend::Swarm(sw) = &spec.backend else {
            return Err(Failure::new(
                Cause::Config,
                format!("release {} was not deployed to a Swarm service", target.version),
            ));
        };
        self.log(
            d,
            t0,
            &format!(
                "rolling the Swarm service back to {} ({})",
                target.version, target.digest
            ),
        );
        self.post_release(&spec, sw, target, d, t0).await?;
        self.swarm_gate(&spec, sw, target, d, t0).await?;
        let _ = self.store.bg().set_active(&spec.name, target).await;
        self.log(d, t0, &format!("{} serves again", target.version));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(state: &str, err: &str) -> Task {
        Task {
            id: "abcdefabcdefabcdef".into(),
            slot: 1,
            image: "r/a@sha256:00".into(),
            desired: "running".into(),
            state: state.into(),
            message: "started".into(),
            err: err.into(),
            exit_code: Some(3),
            container: None,
            deployment: "1".into(),
        }
    }

    /// Task errors as the Engine (20.10) words them.
    #[test]
    fn task_failures() {
        let f = task_failure(&task("failed", "task: non-zero exit (3)")).unwrap();
        assert_eq!(f.cause, Cause::Exited);
        assert!(f.evidence.contains("non-zero exit (3), exit code 3"), "{}", f.evidence);
        let f = task_failure(&task("rejected", "No such image: 127.0.0.1:5000/a@sha256:00")).unwrap();
        assert!(f.cause.is_pull(), "{f:?}");
        assert!(task_failure(&task("running", "")).is_none());
        assert!(task_failure(&task("pending", "no suitable node (insufficient resources on 1 node)")).is_none());
    }

    #[test]
    fn spec_keeps_what_berth_does_not_manage() {
        let text = r#"
name = "web"
image = "127.0.0.1:5000/web:v2"
backend = "swarm"
ports = [{ container = 80, host = 18080 }]
env = { B = "2", A = "1" }
[health]
port = 80
path = "/healthz"
"#;
        let spec = crate::spec::parse(Path::new("web.toml"), text).unwrap();
        let crate::spec::Backend::Swarm(sw) = &spec.backend else {
            panic!()
        };
        let current = json!({"Name": "web", "Labels": {"team": "a"}, "TaskTemplate": {"ContainerSpec": {"Image": "old", "User": "app"}, "Placement": {"Constraints": ["node.role==worker"]}}, "UpdateConfig": {"Parallelism": 2}});
        let s = service_spec(
            &spec,
            sw,
            "127.0.0.1:5000/web@sha256:11",
            "sha256:11",
            7,
            Some(&current),
        );
        assert_eq!(
            s["TaskTemplate"]["ContainerSpec"]["Image"],
            "127.0.0.1:5000/web@sha256:11"
        );
        assert_eq!(s["TaskTemplate"]["ContainerSpec"]["User"], "app");
        assert_eq!(s["TaskTemplate"]["ContainerSpec"]["Env"], json!(["A=1", "B=2"]));
        assert_eq!(s["TaskTemplate"]["Placement"]["Constraints"][0], "node.role==worker");
        assert_eq!(s["Labels"]["team"], "a");
        assert_eq!(s["Labels"][LABEL_SERVICE], "web");
        assert_eq!(
            s["UpdateConfig"]["Parallelism"], 2,
            "the operator's update config is kept"
        );
        assert_eq!(
            s["EndpointSpec"]["Ports"][0],
            json!({"Protocol": "tcp", "TargetPort": 80, "PublishedPort": 18080, "PublishMode": "ingress"})
        );
        let created = service_spec(&spec, sw, "i", "d", 1, None);
        assert_eq!(created["UpdateConfig"]["FailureAction"], "pause");
        assert_eq!(created["Mode"]["Replicated"]["Replicas"], 1);
    }
}
