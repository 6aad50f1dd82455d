//! Recovery of a deployment whose berth process died part-way (`kill -9`,
//! a crash, a host restart). The history says what it was doing: a
//! deployment without an outcome whose service lock nobody holds
//! (`store::Store::lock`). The next berth process that takes the lock
//! (`deploy`, `rollback`, `status`, the guard of `run`) reconciles it
//! before anything else:
//!
//! - the dead deployment had switched to its version, which had not passed
//!   its verify period: roll back, by digest, to the newest release that
//!   passed (it was the one serving before);
//! - otherwise the active release is what serves: the dead deployment's
//!   instances (any instance of another digest) are removed, the active
//!   release is started again if nothing of it runs, and nginx (if the
//!   service has a router) is given the active instances alone, undoing a
//!   canary's weights.
//!
//! The deployment is then finished with the cause `interrupted` and the
//! steps taken in its timeline. An interruption does not count towards the
//! failures that pause a service: it says nothing about the image.

use std::path::Path;
use std::time::Instant;

use crate::classify::{Cause, Failure};
use crate::notify::Priority;
use crate::rollout::{Guard, WatchError};
use crate::spec;
use crate::store::{Deployment, Effect, Kind, Outcome};

impl Guard {
    /// Reconciles the deployments of `service` left unfinished; the
    /// caller holds the service's lock. Returns the ids it finished.
    pub async fn recover(&self, service: &str) -> Result<Vec<u64>, WatchError> {
        let open: Vec<Deployment> = self
            .store
            .bg()
            .deployments(Some(service), 0)
            .await?
            .into_iter()
            .filter(|d| d.outcome.is_none())
            .collect();
        let mut done = Vec::new();
        for d in open {
            self.reconcile(&d).await?;
            done.push(d.id);
        }
        Ok(done)
    }

    async fn reconcile(&self, d: &Deployment) -> Result<(), WatchError> {
        let t0 = Instant::now();
        let service = d.service.as_str();
        let last = d.events.last().map_or("", |e| e.what.as_str());
        self.log(
            d,
            t0,
            &format!(
                "the berth process running this {} died part-way (no process holds the service's lock); its last step: {last}; reconciling",
                if d.kind == Kind::Deploy { "deployment" } else { "rollback" }
            ),
        );
        let state = self.store.bg().state(service).await?;
        let switched_unverified = state.active.as_ref().filter(|a| {
            d.kind == Kind::Deploy
                && !d.digest.is_empty()
                && a.digest == d.digest
                && !state.passed.iter().any(|p| p.digest == a.digest)
        });
        let rolled_back = |from: &str| Effect::RolledBack { from: from.to_string() };
        let (outcome, evidence, effect) = match switched_unverified {
            Some(a) => match state.rollback_target(&a.digest) {
                Some(target) => {
                    self.log(
                        d,
                        t0,
                        &format!(
                            "{} was switched to but had not passed its verify period: rolling back to {} ({})",
                            a.version, target.version, target.digest
                        ),
                    );
                    match self.start_release(target, d, t0).await {
                        Ok(_) => (
                            Outcome::RolledBack,
                            format!(
                                "interrupted after the switch to {}; rolled back to {} by digest",
                                a.version, target.version
                            ),
                            rolled_back(&a.digest),
                        ),
                        Err(f) => (
                            Outcome::Failure,
                            format!(
                                "interrupted after the switch to {}; the rollback to {} failed: {}: {}",
                                a.version, target.version, f.cause, f.evidence
                            ),
                            Effect::Nothing,
                        ),
                    }
                }
                None => (
                    Outcome::Failure,
                    format!(
                        "interrupted after the switch to {}, before its verify period ended; no earlier release passed, so it is left serving",
                        a.version
                    ),
                    Effect::Nothing,
                ),
            },
            None => {
                let (evidence, restarted) = self.keep_active(d, t0, &state).await?;
                // The active release started again in place of a
                // deployment's version is a rollback, as after a failed one
                // (`fail`); an interrupted rollback's digest is the release
                // it went to, not one found bad.
                let effect = match (restarted, d.kind) {
                    (true, Kind::Deploy) => rolled_back(&d.digest),
                    _ => Effect::Nothing,
                };
                (Outcome::Failure, evidence, effect)
            }
        };
        self.log(d, t0, &evidence);
        let f = Failure::new(Cause::Interrupted, evidence);
        if let Some(spec) = state
            .active
            .as_ref()
            .and_then(|a| spec::parse(Path::new(&a.spec_file), &a.spec_toml).ok())
        {
            self.alert(
                &spec,
                "BerthWatchDeployInterrupted",
                Priority::P1,
                format!("{service}: deployment #{} was interrupted: {}", d.id, f.evidence),
                &f,
            )
            .await;
        }
        self.store.bg().finish(service, d.id, outcome, Some(&f), effect).await?;
        Ok(())
    }

    /// The active release keeps serving: other instances go, the active
    /// one is started again if none of it runs, nginx routes to it alone.
    /// Returns what was done, and whether the active one was started again.
    async fn keep_active(
        &self,
        d: &Deployment,
        t0: Instant,
        state: &crate::store::ServiceState,
    ) -> Result<(String, bool), WatchError> {
        let service = d.service.as_str();
        let active = state.active.as_ref();
        let mut removed = Vec::new();
        for c in self.engine.list(service).await? {
            if active.is_some_and(|a| a.digest == c.digest) {
                continue;
            }
            self.log(
                d,
                t0,
                &format!("removing {} (left by the interrupted deployment)", c.name),
            );
            self.engine.remove(&c.id).await?;
            removed.push(c.name);
        }
        let Some(active) = active else {
            return Ok((
                format!(
                    "interrupted before anything was deployed; removed {} instance(s)",
                    removed.len()
                ),
                false,
            ));
        };
        let mut serving: Vec<String> = self
            .engine
            .list(service)
            .await?
            .into_iter()
            .filter(|c| c.digest == active.digest && c.state == "running")
            .map(|c| c.id)
            .collect();
        let mut restored = String::new();
        let mut restarted = false;
        if serving.is_empty() {
            self.log(
                d,
                t0,
                &format!("nothing serves: starting {} ({}) again", active.version, active.digest),
            );
            // start_release routes nginx to it as it switches.
            match self.start_release(active, d, t0).await {
                Ok(s) => {
                    serving = s.ids;
                    restored = format!("; {} started again", active.version);
                    restarted = true;
                }
                Err(f) => {
                    restored = format!(
                        "; starting {} again failed: {}: {}",
                        active.version, f.cause, f.evidence
                    )
                }
            }
        }
        if let Ok(spec) = spec::parse(Path::new(&active.spec_file), &active.spec_toml) {
            if let Some(r) = &spec.router {
                let servers: Vec<(String, u32)> = self
                    .addresses(&serving, r.port)
                    .await
                    .into_iter()
                    .map(|a| (a, 1))
                    .collect();
                if !servers.is_empty() {
                    match crate::canary::route(r, &servers) {
                        Ok(()) => self.log(
                            d,
                            t0,
                            &format!("nginx upstream {} routes to {} alone", r.upstream, active.version),
                        ),
                        Err(e) => self.log(d, t0, &format!("cannot route nginx back to {}: {e}", active.version)),
                    }
                }
            }
        }
        let evidence = format!(
            "interrupted before its version passed; removed {}{restored}; {} ({}) serves",
            if removed.is_empty() {
                "nothing".to_string()
            } else {
                removed.join(", ")
            },
            active.version,
            active.digest
        );
        Ok((evidence, restarted))
    }
}
