//! The rollout of plain containers: resolve the tag to a digest and deploy
//! by digest; start the new version beside the old; gate on Running within
//! the start timeout and on health; switch; stop the old; watch health for
//! the verify period, and roll back to the last release that passed when
//! the threshold of consecutive failed checks is reached.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::classify::{classify_pull, classify_start, Cause, Failure, PullDiagnoser};
use crate::engine::{ContainerConfig, Engine, EngineError, LABEL_DEPLOYMENT, LABEL_DIGEST, LABEL_SERVICE};
use crate::health::{self, Check};
use crate::notify::{self, Alert, Priority};
use crate::spec::{self, Spec, SpecError};
use crate::store::{Deployment, Effect, Kind, Outcome, Release, ServiceState, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("service {service:?}: {why}")]
    NoRollback { service: String, why: String },
    #[error("{0}")]
    Unsupported(String),
}

#[cfg(not(feature = "kubernetes"))]
const NO_KUBERNETES: &str = "this berth was built without Kubernetes support; build it with `--features kubernetes`";

/// What the guard works with.
pub struct Guard {
    pub engine: Arc<dyn Engine>,
    pub store: Store,
    pub diagnoser: Arc<dyn PullDiagnoser>,
    pub http: reqwest::Client,
    /// Print each step to stderr as it happens.
    pub echo: bool,
}

/// The instances of one version, as started.
pub(crate) struct Started {
    pub(crate) release: Release,
    pub(crate) ids: Vec<String>,
    /// The instances of other versions found at the start.
    old: Vec<crate::engine::ContainerSummary>,
}

/// A deployment the history admitted, as every backend starts it.
pub(crate) struct Begun {
    pub(crate) d: Deployment,
    /// When it started, for the timeline's elapsed times.
    pub(crate) t0: Instant,
    /// The service's state before it: what to roll back to.
    pub(crate) before: ServiceState,
}

/// The longest pause between two looks at a starting container.
const GATE_POLL: Duration = Duration::from_millis(500);

impl Guard {
    pub(crate) fn log(&self, d: &Deployment, t0: Instant, what: &str) {
        // Printed once written: what the operator saw is in the history,
        // even if the process is killed the next moment.
        let line = self
            .echo
            .then(|| format!("[{:>6.1}s] {} #{}: {what}", t0.elapsed().as_secs_f64(), d.service, d.id));
        self.store.bg().event(&d.service, d.id, what, line);
    }

    /// Deploys `spec` (read from `file`, whose text is `toml`): the start
    /// every backend shares (the service's lock, for containers the
    /// reconciliation of an interrupted deployment, the history's
    /// admission, which refuses a paused service), then the backend's own.
    pub async fn deploy(&self, spec: &Spec, file: &Path, toml: &str) -> Result<Deployment, WatchError> {
        // Held to the end: a deployment whose process dies releases it.
        let _lock = self.store.bg().lock(&spec.name).await?;
        match &spec.backend {
            spec::Backend::Containers => {
                self.recover(&spec.name).await?;
            }
            spec::Backend::Swarm(_) => {}
            #[cfg(feature = "kubernetes")]
            spec::Backend::Kubernetes(_) => {}
            #[cfg(not(feature = "kubernetes"))]
            spec::Backend::Kubernetes(_) => return Err(WatchError::Unsupported(NO_KUBERNETES.into())),
        }
        let d = self
            .store
            .bg()
            .begin(
                &spec.name,
                Kind::Deploy,
                &spec.image,
                &spec.version,
                spec.rollout.failure_limit,
            )
            .await?;
        let begun = Begun {
            d,
            t0: Instant::now(),
            before: self.store.bg().state(&spec.name).await?,
        };
        let spec_file = file.display().to_string();
        let source = (spec_file.as_str(), toml);
        match &spec.backend {
            spec::Backend::Containers => self.deploy_containers(spec, begun, source).await,
            spec::Backend::Swarm(sw) => self.deploy_swarm(spec, sw, begun, source).await,
            #[cfg(feature = "kubernetes")]
            spec::Backend::Kubernetes(k) => self.deploy_kubernetes(spec, k, begun, source).await,
            #[cfg(not(feature = "kubernetes"))]
            spec::Backend::Kubernetes(_) => Err(WatchError::Unsupported(NO_KUBERNETES.into())),
        }
    }

    /// Deploys `spec` as plain containers: beside the old version (or as a
    /// canary), gated, switched, verified, rolled back on failure.
    async fn deploy_containers(
        &self,
        spec: &Spec,
        Begun { d, t0, before }: Begun,
        (spec_file, toml): (&str, &str),
    ) -> Result<Deployment, WatchError> {
        if let (Some(c), Some(r), Some(_)) = (&spec.canary, &spec.router, &before.active) {
            return self
                .deploy_canary(spec, (c, r), &d, t0, &before, (spec_file, toml))
                .await;
        }
        let outcome = match self.start_version(spec, &d, t0, None, (spec_file, toml), true).await {
            Err(f) => Err(f),
            Ok(started) => match self.verify(spec, &started, &d, t0).await {
                Ok(()) => Ok(started.release),
                Err(f) => {
                    // Roll back to the last release that passed.
                    match before.rollback_target(&started.release.digest) {
                        Some(target) => {
                            self.log(
                                &d,
                                t0,
                                &format!("rolling back to {} ({})", target.version, target.digest),
                            );
                            match self.start_release(target, &d, t0).await {
                                Ok(_) => {
                                    self.alert(
                                        spec,
                                        "BerthWatchRolledBack",
                                        Priority::P1,
                                        format!(
                                            "{}: {} failed after the switch ({}); rolled back to {} by digest",
                                            spec.name, spec.version, f.cause, target.version
                                        ),
                                        &f,
                                    )
                                    .await;
                                    let state = self
                                        .store
                                        .bg()
                                        .finish(
                                            &spec.name,
                                            d.id,
                                            Outcome::RolledBack,
                                            Some(&f),
                                            Effect::RolledBack {
                                                from: started.release.digest.clone(),
                                            },
                                        )
                                        .await?;
                                    self.after_failure(spec, &state, &before).await;
                                    return self.finished(&spec.name, d.id).await;
                                }
                                Err(f2) => {
                                    let mut f = f;
                                    f.evidence.push_str(&format!(
                                        "; the rollback to {} failed too: {}: {}",
                                        target.version, f2.cause, f2.evidence
                                    ));
                                    Err(f)
                                }
                            }
                        }
                        None => {
                            let mut f = f;
                            f.evidence.push_str(
                                "; no earlier release passed its checks, so there is nothing to roll back to",
                            );
                            Err(f)
                        }
                    }
                }
            },
        };
        match outcome {
            Ok(release) => {
                self.log(&d, t0, &format!("{} passed; deployment succeeded", release.version));
                self.store
                    .bg()
                    .finish(&spec.name, d.id, Outcome::Success, None, Effect::Passed(release))
                    .await?;
            }
            Err(f) => return self.fail(spec, &d, t0, &before, f).await,
        }
        self.finished(&spec.name, d.id).await
    }

    /// Rolls `service` back to the newest release that passed before the
    /// active one (admitted while paused).
    pub async fn rollback(&self, service: &str, reason: &str) -> Result<Deployment, WatchError> {
        let _lock = self.store.bg().lock(service).await?;
        self.recover(service).await?;
        let state = self.store.bg().state(service).await?;
        let no = |why: &str| WatchError::NoRollback {
            service: service.to_string(),
            why: why.to_string(),
        };
        let active = state.active.as_ref().ok_or_else(|| no("nothing is deployed"))?;
        let target = state
            .rollback_target(&active.digest)
            .ok_or_else(|| no("no earlier release passed its checks; deploy a known good image instead"))?
            .clone();
        let spec = spec::parse(Path::new(&target.spec_file), &target.spec_toml)?;
        let d = self
            .store
            .bg()
            .begin(
                service,
                Kind::Rollback,
                &target.image,
                &target.version,
                spec.rollout.failure_limit,
            )
            .await?;
        let t0 = Instant::now();
        self.log(
            &d,
            t0,
            &format!("rollback from {} to {} ({reason})", active.version, target.version),
        );
        let restored = match &spec.backend {
            spec::Backend::Containers => self.start_release(&target, &d, t0).await.map(|_| ()),
            spec::Backend::Swarm(_) => self.swarm_restore(&target, &d, t0).await,
            #[cfg(feature = "kubernetes")]
            spec::Backend::Kubernetes(k) => self.kubernetes_restore(&spec, k, &target, &d, t0).await,
            #[cfg(not(feature = "kubernetes"))]
            spec::Backend::Kubernetes(_) => Err(Failure::new(Cause::Config, NO_KUBERNETES)),
        };
        match restored {
            Ok(()) => {
                let f = Failure::new(Cause::Unhealthy, reason);
                self.alert(
                    &spec,
                    "BerthWatchRolledBack",
                    Priority::P1,
                    format!(
                        "{service}: rolled back from {} to {} by digest",
                        active.version, target.version
                    ),
                    &f,
                )
                .await;
                // The release found bad is no longer a rollback target.
                let from = Effect::RolledBack {
                    from: active.digest.clone(),
                };
                self.store
                    .bg()
                    .finish(service, d.id, Outcome::Success, None, from)
                    .await?;
            }
            Err(f) => {
                self.alert(
                    &spec,
                    "BerthWatchRollbackFailed",
                    Priority::P0,
                    format!("{service}: the rollback to {} failed: {}", target.version, f.cause),
                    &f,
                )
                .await;
                self.store
                    .bg()
                    .finish(service, d.id, Outcome::Failure, Some(&f), Effect::Nothing)
                    .await?;
            }
        }
        self.finished(service, d.id).await
    }

    /// The digest `d` recorded once it resolved its image (empty before).
    pub(crate) async fn recorded_digest(&self, d: &Deployment) -> String {
        self.finished(&d.service, d.id)
            .await
            .map(|x| x.digest)
            .unwrap_or_default()
    }

    pub(crate) async fn finished(&self, service: &str, id: u64) -> Result<Deployment, WatchError> {
        let all = self.store.bg().deployments(Some(service), 0).await?;
        all.into_iter()
            .find(|d| d.id == id)
            .ok_or_else(|| WatchError::Store(StoreError::Unknown(service.to_string())))
    }

    pub(crate) async fn after_failure(&self, spec: &Spec, state: &ServiceState, before: &ServiceState) {
        if let (Some(p), None) = (&state.paused, &before.paused) {
            let f = Failure::new(Cause::Engine, p.reason.clone());
            self.alert(
                spec,
                "BerthWatchPaused",
                Priority::P1,
                format!(
                    "{}: deployments paused after {}; fix the cause, then `berth watch resume {}`",
                    spec.name, p.reason, spec.name
                ),
                &f,
            )
            .await;
        }
    }

    pub(crate) async fn alert(
        &self,
        spec: &Spec,
        name: &'static str,
        priority: Priority,
        summary: String,
        f: &Failure,
    ) {
        let mut details = BTreeMap::new();
        details.insert("cause".to_string(), f.cause.to_string());
        details.insert("evidence".to_string(), f.evidence.clone());
        details.insert("fix".to_string(), f.fix.clone());
        if let Some(r) = &f.root_cause {
            details.insert("root_cause".to_string(), r.clone());
        }
        let alert = Alert {
            name,
            service: spec.name.clone(),
            priority,
            summary,
            details,
        };
        notify::send(&self.http, &spec.notify, &alert).await;
    }

    /// Starts a release that passed before, by its digest.
    pub(crate) async fn start_release(&self, r: &Release, d: &Deployment, t0: Instant) -> Result<Started, Failure> {
        let spec = spec::parse(Path::new(&r.spec_file), &r.spec_toml)
            .map_err(|e| Failure::new(Cause::Config, e.to_string()))?;
        let spec = Spec {
            image: r.image.clone(),
            version: r.version.clone(),
            ..spec
        };
        self.start_version(&spec, d, t0, Some(&r.digest), (&r.spec_file, &r.spec_toml), true)
            .await
    }

    /// Resolves, pulls and starts `spec`'s image beside what runs, gates
    /// it, and switches to it. On failure the new instances are removed
    /// and the old ones are left serving.
    async fn start_version(
        &self,
        spec: &Spec,
        d: &Deployment,
        t0: Instant,
        digest: Option<&str>,
        (spec_file, spec_toml): (&str, &str),
        switch: bool,
    ) -> Result<Started, Failure> {
        let repo = spec::repository_of(&spec.image);
        let digest = match digest {
            Some(dg) => {
                let _ = self.store.bg().set_digest(&spec.name, d.id, dg).await;
                dg.to_string()
            }
            None => match self.resolve(&spec.image, d).await {
                Ok(dg) => dg,
                Err(e) => return Err(self.pull_failure(&spec.image, &e).await),
            },
        };
        let by_digest = format!("{repo}@{digest}");
        self.log(d, t0, &format!("{} is {digest}; pulling {by_digest}", spec.image));
        if let Err(e) = self.engine.pull(&by_digest).await {
            return Err(self.pull_failure(&by_digest, &e).await);
        }
        let old = self
            .engine
            .list(&spec.name)
            .await
            .map_err(|e| Failure::new(Cause::Engine, e.message()))?;
        // A fixed host port cannot be held by two versions at once: the
        // old one gives it up first (recreate), and is restored by the
        // caller's rollback if the new one fails.
        let fixed: Vec<u16> = spec.ports.iter().filter_map(|p| p.host).collect();
        if !fixed.is_empty() {
            for o in &old {
                self.log(
                    d,
                    t0,
                    &format!("stopping {} first: it holds the fixed host ports", o.name),
                );
                let _ = self.engine.remove(&o.id).await;
            }
            for port in &fixed {
                if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", *port)) {
                    return Err(Failure::new(
                        Cause::PortConflict,
                        format!("host port 127.0.0.1:{port} is in use by another process: {e}"),
                    ));
                }
            }
        }
        let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.sort();
        let mut ids = Vec::new();
        for i in 0..spec.replicas {
            let labels = BTreeMap::from([
                (LABEL_SERVICE.to_string(), spec.name.clone()),
                (LABEL_DIGEST.to_string(), digest.clone()),
                (LABEL_DEPLOYMENT.to_string(), d.id.to_string()),
            ]);
            let c = ContainerConfig {
                // Unique per deployment and version: a rollback inside a
                // deployment starts another version under the same id.
                name: format!("{}-{}-{}-{}", spec.name, d.id, short(&digest), i),
                image: by_digest.clone(),
                env: env.clone(),
                command: spec.command.clone(),
                labels,
                ports: spec.ports.clone(),
                nano_cpus: spec.cpus.map(|c| (c * 1e9) as i64),
                memory: spec.memory,
            };
            match self.engine.run(&c).await {
                Ok(id) => {
                    self.log(d, t0, &format!("started {} ({})", c.name, &id[..12.min(id.len())]));
                    ids.push(id);
                }
                Err(e) => {
                    self.remove_all(&ids).await;
                    return Err(Failure::new(classify_start(&e), e.message()));
                }
            }
        }
        let release = Release {
            image: spec.image.clone(),
            digest,
            version: spec.version.clone(),
            spec_file: spec_file.to_string(),
            spec_toml: spec_toml.to_string(),
        };
        if let Err(f) = self.gate(spec, &ids, d, t0).await {
            self.remove_all(&ids).await;
            return Err(f);
        }
        let old: Vec<_> = old.into_iter().filter(|o| !ids.contains(&o.id)).collect();
        let started = Started { release, ids, old };
        if switch {
            self.switch(spec, &started, d, t0).await?;
        }
        Ok(started)
    }

    /// The new version becomes the one serving: nginx (if any) sends it
    /// all the traffic, then the old instances go.
    async fn switch(&self, spec: &Spec, s: &Started, d: &Deployment, t0: Instant) -> Result<(), Failure> {
        if let Some(r) = &spec.router {
            let servers = self
                .addresses(&s.ids, r.port)
                .await
                .into_iter()
                .map(|a| (a, 1))
                .collect::<Vec<_>>();
            if let Err(e) = crate::canary::route(r, &servers) {
                self.remove_all(&s.ids).await;
                return Err(Failure::new(Cause::Router, e));
            }
            self.log(
                d,
                t0,
                &format!("nginx upstream {} now routes to {}", r.upstream, s.release.version),
            );
        }
        let _ = self.store.bg().set_active(&spec.name, &s.release).await;
        for o in &s.old {
            if spec.ports.iter().all(|p| p.host.is_none()) {
                self.log(d, t0, &format!("switched; stopping {}", o.name));
            }
            let _ = self.engine.remove(&o.id).await;
        }
        Ok(())
    }

    /// `127.0.0.1:HOSTPORT` of each instance's container port `port`.
    pub(crate) async fn addresses(&self, ids: &[String], port: u16) -> Vec<String> {
        let mut out = Vec::new();
        for id in ids {
            if let Ok(st) = self.engine.inspect(id).await {
                if let Some(p) = st.ports.get(&port) {
                    out.push(format!("127.0.0.1:{p}"));
                }
            }
        }
        out
    }

    /// A canary: the new version beside the stable one, nginx giving it
    /// each step's share, each window analysed; promoted after the last
    /// step, rolled back on the first failing window, and on too long
    /// without traffic rolled back or paused, as configured.
    async fn deploy_canary(
        &self,
        spec: &Spec,
        (c, router): (&crate::spec::Canary, &crate::spec::Router),
        d: &Deployment,
        t0: Instant,
        before: &ServiceState,
        (spec_file, toml): (&str, &str),
    ) -> Result<Deployment, WatchError> {
        let started = match self.start_version(spec, d, t0, None, (spec_file, toml), false).await {
            Ok(s) => s,
            Err(f) => return self.fail(spec, d, t0, before, f).await,
        };
        let stable: Vec<String> = started
            .old
            .iter()
            .filter(|o| o.state == "running")
            .map(|o| o.id.clone())
            .collect();
        let stable_addrs = self.addresses(&stable, router.port).await;
        let canary_addrs = self.addresses(&started.ids, router.port).await;
        let verdict = if stable_addrs.is_empty() {
            // Nothing to compare with, and nothing to protect: a plain switch.
            self.log(
                d,
                t0,
                "no stable instance serves: no canary, the new version takes all the traffic",
            );
            Ok(())
        } else {
            let track = |track, r: &Release| crate::prometheus::Track {
                track,
                service: spec.name.clone(),
                version: r.version.clone(),
                digest: r.digest.clone(),
            };
            let tracks = match &before.active {
                Some(a) => (track("stable", a), track("canary", &started.release)),
                None => (track("stable", &started.release), track("canary", &started.release)),
            };
            self.analyse(
                (c, router),
                (&stable_addrs, &canary_addrs),
                &tracks,
                &started.ids,
                d,
                t0,
            )
            .await
        };
        match verdict {
            Ok(()) => {
                self.log(
                    d,
                    t0,
                    &format!("canary {} passed every step; promoting", started.release.version),
                );
                if let Err(f) = self.switch(spec, &started, d, t0).await {
                    return self.fail(spec, d, t0, before, f).await;
                }
                self.log(
                    d,
                    t0,
                    &format!("{} promoted; deployment succeeded", started.release.version),
                );
                self.store
                    .bg()
                    .finish(
                        &spec.name,
                        d.id,
                        Outcome::Success,
                        None,
                        Effect::Passed(started.release.clone()),
                    )
                    .await?;
            }
            Err(f) => {
                let servers: Vec<(String, u32)> = stable_addrs.iter().map(|a| (a.clone(), 1)).collect();
                if let Err(e) = crate::canary::route(router, &servers) {
                    self.log(
                        d,
                        t0,
                        &format!("cannot route the traffic back to the stable version: {e}"),
                    );
                }
                self.remove_all(&started.ids).await;
                self.log(
                    d,
                    t0,
                    &format!(
                        "canary rolled back: all traffic to the stable version, {} removed",
                        started.release.version
                    ),
                );
                let pause =
                    f.cause == Cause::CanaryInconclusive && c.on_inconclusive == crate::spec::OnInconclusive::Pause;
                self.alert(
                    spec,
                    "BerthWatchCanaryFailed",
                    Priority::P1,
                    format!("{}: canary of {} rolled back: {}", spec.name, spec.version, f.cause),
                    &f,
                )
                .await;
                let state = self
                    .store
                    .bg()
                    .finish(
                        &spec.name,
                        d.id,
                        Outcome::RolledBack,
                        Some(&f),
                        Effect::RolledBack {
                            from: started.release.digest.clone(),
                        },
                    )
                    .await?;
                if pause {
                    self.store
                        .bg()
                        .pause(
                            &spec.name,
                            &format!("canary of {} inconclusive: no traffic", spec.version),
                        )
                        .await?;
                }
                let state = if pause {
                    self.store.bg().state(&spec.name).await?
                } else {
                    state
                };
                self.after_failure(spec, &state, before).await;
            }
        }
        self.finished(&spec.name, d.id).await
    }

    /// Ends a deployment that failed: the old version restored if nothing
    /// serves, the alert sent, the failure counted (maybe pausing).
    async fn fail(
        &self,
        spec: &Spec,
        d: &Deployment,
        t0: Instant,
        before: &ServiceState,
        f: Failure,
    ) -> Result<Deployment, WatchError> {
        // Restoring the version this deployment took the place of is a
        // rollback, as Swarm's is.
        let restored = self.restore(before, d, t0).await;
        let result = match (f.cause, &restored) {
            (Cause::StartTimeout, _) => Outcome::Timeout,
            (_, Some(_)) => Outcome::RolledBack,
            _ => Outcome::Failure,
        };
        let (name, summary) = match (f.cause, &restored) {
            (Cause::StartTimeout, _) => (
                "BerthWatchDeployTimeout",
                format!(
                    "{}: {} was not Running and healthy within {:?}{}",
                    spec.name,
                    spec.version,
                    spec.rollout.start_timeout,
                    restored.as_ref().map_or(String::new(), |v| format!("; restored {v}"))
                ),
            ),
            (c, Some(v)) => (
                "BerthWatchRolledBack",
                format!(
                    "{}: deployment of {} failed ({c}) with nothing left serving; restored {v} by digest",
                    spec.name, spec.version
                ),
            ),
            (c, None) if c.is_pull() => (
                "BerthWatchPullFailed",
                format!("{}: pulling {} failed: {c}", spec.name, spec.image),
            ),
            (c, None) => (
                "BerthWatchDeployFailed",
                format!("{}: deployment of {} failed: {c}", spec.name, spec.image),
            ),
        };
        self.end_failed(spec, d, before, result, &f, restored.is_some(), (name, summary))
            .await
    }

    /// How every backend's failed deployment ends: its alert, its record
    /// in the history (a rollback leaves the release it went back from
    /// behind, `Effect::RolledBack`), and the pause alert if this failure
    /// paused the service.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn end_failed(
        &self,
        spec: &Spec,
        d: &Deployment,
        before: &ServiceState,
        outcome: Outcome,
        f: &Failure,
        rolled_back: bool,
        (name, summary): (&'static str, String),
    ) -> Result<Deployment, WatchError> {
        self.alert(spec, name, Priority::P1, summary, f).await;
        let effect = if rolled_back {
            Effect::RolledBack {
                from: self.recorded_digest(d).await,
            }
        } else {
            Effect::Nothing
        };
        let state = self
            .store
            .bg()
            .finish(&spec.name, d.id, outcome, Some(f), effect)
            .await?;
        self.after_failure(spec, &state, before).await;
        self.finished(&spec.name, d.id).await
    }

    /// Runs the steps; Ok when every window of every step passed.
    async fn analyse(
        &self,
        (c, router): (&crate::spec::Canary, &crate::spec::Router),
        (stable, canary): (&[String], &[String]),
        tracks: &(crate::prometheus::Track, crate::prometheus::Track),
        canary_ids: &[String],
        d: &Deployment,
        t0: Instant,
    ) -> Result<(), Failure> {
        use crate::canary::{judge, judge_window, read_window, route, Verdict};
        let canary_set: std::collections::HashSet<String> = canary.iter().cloned().collect();
        let stable_set: std::collections::HashSet<String> = stable.iter().cloned().collect();
        let mut inconclusive = 0;
        for (n, step) in c.steps.iter().enumerate() {
            // Integer weights that give the canary exactly its percent.
            let mut servers: Vec<(String, u32)> = Vec::new();
            for a in stable {
                servers.push((a.clone(), (100 - step.weight) * canary.len() as u32));
            }
            for a in canary {
                servers.push((a.clone(), step.weight * stable.len() as u32));
            }
            route(router, &servers).map_err(|e| Failure::new(Cause::Router, e))?;
            self.log(
                d,
                t0,
                &format!(
                    "step {}: {} % of the traffic to the canary for {:?}",
                    n + 1,
                    step.weight,
                    step.duration
                ),
            );
            let windows = (step.duration.as_secs_f64() / c.interval.as_secs_f64()).ceil().max(1.0) as u32;
            let mut offset = std::fs::metadata(&router.access_log).map_or(0, |m| m.len());
            let mut passed = 0;
            while passed < windows {
                tokio::time::sleep(c.interval).await;
                // A canary instance that stopped fails the canary whatever
                // the traffic says.
                for id in canary_ids {
                    let st = self.engine.inspect(id).await.map_err(|e| {
                        Failure::new(Cause::Exited, format!("a canary instance is gone: {}", e.message()))
                    })?;
                    if let Some(f) = self.not_running(id, &st).await {
                        self.log(d, t0, &format!("canary instance stopped: {}", f.evidence));
                        return Err(f);
                    }
                }
                let verdict = match &c.prometheus {
                    None => {
                        let w =
                            read_window(&router.access_log, &mut offset, &canary_set, &stable_set).map_err(|e| {
                                Failure::new(
                                    Cause::Router,
                                    format!("cannot read {}: {e}", router.access_log.display()),
                                )
                            })?;
                        judge_window(c, &w)
                    }
                    Some(p) => {
                        use crate::prometheus::measure;
                        let canary = measure(&self.http, p, &tracks.1, c.interval, c.percentile).await;
                        let stable = measure(&self.http, p, &tracks.0, c.interval, c.percentile).await;
                        match (canary, stable) {
                            (Ok(canary), Ok(stable)) => judge(c, &canary, &stable),
                            (Err(e), _) | (_, Err(e)) => {
                                Verdict::Inconclusive(format!("no numbers from Prometheus: {e}"))
                            }
                        }
                    }
                };
                if let Err(e) = self.store.bg().count_analysis(&d.service, verdict.result()).await {
                    tracing::warn!(error = %e, "cannot count the analysis in the history");
                }
                match verdict {
                    Verdict::Pass(s) => {
                        passed += 1;
                        inconclusive = 0;
                        self.log(d, t0, &format!("window passed ({passed}/{windows}): {s}"));
                    }
                    Verdict::Fail(cause, s) => {
                        self.log(d, t0, &format!("window failed: {s}"));
                        return Err(Failure::new(cause, s));
                    }
                    Verdict::Inconclusive(s) => {
                        inconclusive += 1;
                        self.log(
                            d,
                            t0,
                            &format!("window inconclusive ({inconclusive}/{}): {s}", c.inconclusive_windows),
                        );
                        if inconclusive >= c.inconclusive_windows {
                            return Err(Failure::new(
                                Cause::CanaryInconclusive,
                                format!("{inconclusive} windows in a row without a conclusion; last: {s}"),
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// After a failed deployment: if nothing of the service runs any more
    /// (the old version gave up its fixed host ports), start the version
    /// that was active again, by digest. Returns its version if it did.
    async fn restore(&self, before: &ServiceState, d: &Deployment, t0: Instant) -> Option<String> {
        let active = before.active.as_ref()?;
        let running = self
            .engine
            .list(&d.service)
            .await
            .ok()?
            .iter()
            .any(|c| c.state == "running");
        if running {
            return None;
        }
        self.log(
            d,
            t0,
            &format!("nothing serves: restoring {} ({})", active.version, active.digest),
        );
        match self.start_release(active, d, t0).await {
            Ok(_) => {
                self.log(d, t0, &format!("restored {}", active.version));
                Some(active.version.clone())
            }
            Err(f) => {
                self.log(
                    d,
                    t0,
                    &format!("restoring {} failed: {}: {}", active.version, f.cause, f.evidence),
                );
                None
            }
        }
    }

    async fn remove_all(&self, ids: &[String]) {
        for id in ids {
            let _ = self.engine.remove(id).await;
        }
    }

    /// Resolves `image`'s tag to the digest a deployment deploys (the
    /// registry asked through the Engine) and records it on `d`. The error
    /// is the caller's to classify: a pull failure, or for Kubernetes no
    /// Engine to ask.
    pub(crate) async fn resolve(&self, image: &str, d: &Deployment) -> Result<String, EngineError> {
        let digest = self.engine.resolve_digest(image).await?;
        let _ = self.store.bg().set_digest(&d.service, d.id, &digest).await;
        Ok(digest)
    }

    pub(crate) async fn pull_failure(&self, image: &str, e: &EngineError) -> Failure {
        let mut f = Failure::new(classify_pull(e), e.message());
        if let Some(diag) = self.diagnoser.diagnose(image, &f).await {
            f.root_cause = Some(diag.root_cause);
            f.fix = diag.fix;
        }
        f
    }

    /// Waits until every instance is Running and answers healthy with the
    /// deployed version, within the start timeout.
    async fn gate(&self, spec: &Spec, ids: &[String], d: &Deployment, t0: Instant) -> Result<(), Failure> {
        let deadline = Instant::now() + spec.rollout.start_timeout;
        let poll = spec.health.interval.min(GATE_POLL);
        let mut ready = vec![false; ids.len()];
        let mut wrong = vec![0u32; ids.len()];
        let mut last = vec![String::from("not inspected yet"); ids.len()];
        loop {
            for (i, id) in ids.iter().enumerate() {
                if ready[i] {
                    continue;
                }
                let st = self
                    .engine
                    .inspect(id)
                    .await
                    .map_err(|e| Failure::new(Cause::Engine, e.message()))?;
                if let Some(f) = self.not_running(id, &st).await {
                    return Err(f);
                }
                if !st.running {
                    last[i] = format!("state {}", st.status);
                    continue;
                }
                let Some(url) = health_url(spec, &st) else {
                    last[i] = "running, but the health port is not published".into();
                    continue;
                };
                let c = health::check(&self.http, &url, spec.health.timeout, &spec.version).await;
                match &c {
                    Check::Healthy => {
                        ready[i] = true;
                        self.log(d, t0, &format!("instance {} Running and healthy ({url})", i));
                    }
                    Check::WrongVersion { .. } => {
                        wrong[i] += 1;
                        if wrong[i] >= spec.health.threshold {
                            return Err(Failure::new(Cause::WrongVersion, c.describe(&spec.version)));
                        }
                    }
                    _ => wrong[i] = 0,
                }
                last[i] = format!("running; last health check: {}", c.describe(&spec.version));
            }
            if ready.iter().all(|r| *r) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let worst = last
                    .iter()
                    .zip(&ready)
                    .find(|(_, r)| !**r)
                    .map(|(l, _)| l.clone())
                    .unwrap_or_default();
                return Err(Failure::new(
                    Cause::StartTimeout,
                    format!(
                        "not Running and healthy within {:?}: {worst}",
                        spec.rollout.start_timeout
                    ),
                ));
            }
            tokio::time::sleep(poll.min(deadline.saturating_duration_since(Instant::now()))).await;
        }
    }

    /// The failure of a container that stopped or keeps restarting.
    pub(crate) async fn not_running(&self, id: &str, st: &crate::engine::ContainerState) -> Option<Failure> {
        let cause = if st.restarting || st.restart_count > 0 {
            Cause::Restarting
        } else if !st.running && matches!(st.status.as_str(), "exited" | "dead") {
            Cause::Exited
        } else {
            return None;
        };
        let logs = self.engine.logs_tail(id, 20).await.unwrap_or_default();
        let mut evidence = format!(
            "state {}, exit code {}, restarts {}{}",
            st.status,
            st.exit_code,
            st.restart_count,
            if st.oom_killed {
                ", killed for lack of memory"
            } else {
                ""
            }
        );
        if !st.error.is_empty() {
            evidence.push_str(&format!(", error: {}", st.error));
        }
        if !logs.is_empty() {
            evidence.push_str(&format!("; output: {logs}"));
        }
        Some(Failure::new(cause, evidence))
    }

    /// Watches the instances for the verify period.
    async fn verify(&self, spec: &Spec, s: &Started, d: &Deployment, t0: Instant) -> Result<(), Failure> {
        self.log(
            d,
            t0,
            &format!(
                "switched to {}; verifying health for {:?}",
                s.release.version, spec.rollout.verify
            ),
        );
        let until = Instant::now() + spec.rollout.verify;
        watch_instances(self, spec, &s.ids, Some(until), |c| self.log(d, t0, c)).await
    }
}

/// Checks every instance once per health interval until `until` (or for
/// ever); returns the failure of the first instance that fails the
/// threshold of consecutive checks.
pub(crate) async fn watch_instances(
    g: &Guard,
    spec: &Spec,
    ids: &[String],
    until: Option<Instant>,
    on_failed_check: impl Fn(&str),
) -> Result<(), Failure> {
    let mut failed = vec![0u32; ids.len()];
    loop {
        if until.is_some_and(|u| Instant::now() >= u) {
            return Ok(());
        }
        tokio::time::sleep(spec.health.interval).await;
        for (i, id) in ids.iter().enumerate() {
            let st = match g.engine.inspect(id).await {
                Ok(st) => st,
                Err(e) => {
                    return Err(Failure::new(
                        Cause::Exited,
                        format!("instance {i} is gone: {}", e.message()),
                    ))
                }
            };
            if let Some(f) = g.not_running(id, &st).await {
                return Err(f);
            }
            let c = match health_url(spec, &st) {
                Some(url) => health::check(&g.http, &url, spec.health.timeout, &spec.version).await,
                None => Check::NoAnswer("the health port is not published".into()),
            };
            if c.ok() {
                failed[i] = 0;
                continue;
            }
            failed[i] += 1;
            on_failed_check(&format!(
                "instance {i}: health check failed ({}/{}): {}",
                failed[i],
                spec.health.threshold,
                c.describe(&spec.version)
            ));
            if failed[i] >= spec.health.threshold {
                let cause = if matches!(c, Check::WrongVersion { .. }) {
                    Cause::WrongVersion
                } else {
                    Cause::Unhealthy
                };
                return Err(Failure::new(
                    cause,
                    format!(
                        "{} consecutive failed health checks; last: {}",
                        failed[i],
                        c.describe(&spec.version)
                    ),
                ));
            }
        }
    }
}

fn short(digest: &str) -> &str {
    let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
    &hex[..12.min(hex.len())]
}

fn health_url(spec: &Spec, st: &crate::engine::ContainerState) -> Option<String> {
    st.ports
        .get(&spec.health.port)
        .map(|p| format!("http://127.0.0.1:{p}{}", spec.health.path))
}
