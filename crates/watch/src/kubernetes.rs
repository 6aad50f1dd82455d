//! Kubernetes Deployments (feature `kubernetes`): berth sets the new image
//! (by digest) with a strategic merge patch, then follows the rollout by
//! polling the Deployment, its ReplicaSets, the new ReplicaSet's Pods and
//! their Events. Pod states are classified (`ImagePullBackOff`,
//! `ErrImagePull`, `CrashLoopBackOff`, `CreateContainerConfigError`,
//! unschedulable); on a failed check berth pauses the rollout
//! (`spec.paused`, a merge patch) and, unless told only to pause, rolls it
//! back by restoring the previous ReplicaSet's pod template (a JSON patch,
//! as `kubectl rollout undo` does). `progressDeadlineSeconds` only marks a
//! Deployment failed; berth acts.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment as K8sDeployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{json, Value};

use crate::classify::{classify_pull_message, Cause, Failure};
use crate::rollout::{Begun, Guard, WatchError};
use crate::spec::{self, Kubernetes, OnFailure, Spec};
use crate::store::{Deployment, Effect, Outcome, Release, ServiceState};

const REVISION: &str = "deployment.kubernetes.io/revision";
/// The label a Deployment's controller puts on each ReplicaSet's pods.
const TEMPLATE_HASH: &str = "pod-template-hash";
/// berth's field manager name in the objects' managedFields.
const MANAGER: &str = "berth-watch";

/// The longest pause between two looks at a rollout.
const POLL: Duration = Duration::from_millis(500);

fn api_failure(what: &str, e: impl std::fmt::Display) -> Failure {
    let mut f = Failure::new(Cause::Engine, format!("{what}: {e}"));
    f.fix = "check that the kubeconfig's cluster answers and that its user may get, list and patch Deployments, ReplicaSets, Pods and Events".into();
    f
}

/// A client from the kubeconfig (KUBECONFIG or ~/.kube/config; the
/// description's context if it names one), else the in-cluster service
/// account.
pub async fn client(k: &Kubernetes) -> Result<Client, Failure> {
    // Both of rustls's providers are in the tree (other crates want
    // aws-lc-rs), so kube's TLS cannot pick one by itself: ring, as berth's
    // own TLS uses. Already installed (by this or another caller) is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match &k.context {
        Some(c) => kube::Config::from_kubeconfig(&kube::config::KubeConfigOptions {
            context: Some(c.clone()),
            ..Default::default()
        })
        .await
        .map_err(|e| api_failure(&format!("the kubeconfig's context {c:?}"), e))?,
        None => kube::Config::infer()
            .await
            .map_err(|e| api_failure("no kubeconfig and not in a cluster", e))?,
    };
    Client::try_from(config).map_err(|e| api_failure("the Kubernetes client", e))
}

/// The failure a pod shows, if any, with its events as the evidence.
pub fn pod_failure(pod: &Pod, events: &[Event]) -> Option<Failure> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let status = pod.status.as_ref()?;
    // The newest warning about this pod: the kubelet's and the scheduler's
    // own words (why the pull failed, what the scheduler lacked).
    let warning = |reasons: &[&str]| {
        events
            .iter()
            .rev()
            .filter(|e| e.involved_object.name.as_deref() == Some(name.as_str()))
            .find(|e| e.reason.as_deref().is_some_and(|r| reasons.contains(&r)))
            .and_then(|e| e.message.clone())
    };
    for c in status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
    {
        let Some(w) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
            continue;
        };
        let reason = w.reason.as_deref().unwrap_or_default();
        let message = w.message.clone().unwrap_or_default();
        let at = format!("pod {name}, container {}: {reason}", c.name);
        match reason {
            "ImagePullBackOff" | "ErrImagePull" | "ErrImageNeverPull" | "InvalidImageName" => {
                // The kubelet's "Failed to pull image ...: <the registry's
                // answer>", not its later "Error: ImagePullBackOff".
                let why = events
                    .iter()
                    .rev()
                    .filter(|e| e.involved_object.name.as_deref() == Some(name.as_str()))
                    .filter_map(|e| e.message.clone())
                    .find(|m| m.starts_with("Failed to pull image"))
                    .or_else(|| warning(&["Failed"]))
                    .unwrap_or(message);
                let cause = match classify_pull_message(&why, None) {
                    Cause::PullFailed if reason == "InvalidImageName" => Cause::Config,
                    c => c,
                };
                return Some(Failure::new(cause, format!("{at}: {why}")));
            }
            "CrashLoopBackOff" => {
                let last = c
                    .last_state
                    .as_ref()
                    .and_then(|s| s.terminated.as_ref())
                    .map(|t| {
                        format!(
                            "; last exit code {} ({})",
                            t.exit_code,
                            t.reason.as_deref().unwrap_or("no reason given")
                        )
                    })
                    .unwrap_or_default();
                return Some(Failure::new(
                    Cause::Restarting,
                    format!("{at}: {message}; restarts {}{last}", c.restart_count),
                ));
            }
            "CreateContainerConfigError" | "CreateContainerError" | "RunContainerError" => {
                return Some(Failure::new(Cause::ContainerConfig, format!("{at}: {message}")));
            }
            _ => {}
        }
    }
    for cond in status.conditions.iter().flatten() {
        if cond.type_ == "PodScheduled" && cond.status == "False" && cond.reason.as_deref() == Some("Unschedulable") {
            let why = warning(&["FailedScheduling"])
                .or_else(|| cond.message.clone())
                .unwrap_or_default();
            return Some(Failure::new(
                Cause::Unschedulable,
                format!("pod {name}: Unschedulable: {why}"),
            ));
        }
    }
    None
}

/// Where a Deployment's rollout stands: Ok(true) when every replica is
/// updated and available and no old one is left.
pub fn rollout_done(d: &K8sDeployment) -> Result<bool, Failure> {
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(st) = &d.status else { return Ok(false) };
    for c in st.conditions.iter().flatten() {
        if c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded") {
            return Err(Failure::new(
                Cause::StartTimeout,
                format!(
                    "the Deployment exceeded its progress deadline: {}",
                    c.message.as_deref().unwrap_or_default()
                ),
            ));
        }
    }
    let observed = st.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
    Ok(observed
        && st.updated_replicas.unwrap_or(0) == want
        && st.available_replicas.unwrap_or(0) == want
        && st.replicas.unwrap_or(0) == want)
}

fn progress(d: &K8sDeployment) -> String {
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let st = d.status.clone().unwrap_or_default();
    format!(
        "{} of {want} replicas updated, {} available, {} in all",
        st.updated_replicas.unwrap_or(0),
        st.available_replicas.unwrap_or(0),
        st.replicas.unwrap_or(0)
    )
}

fn revision(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> u64 {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn image_of(template: Option<&k8s_openapi::api::core::v1::PodTemplateSpec>, container: &str) -> Option<String> {
    template?
        .spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == container)?
        .image
        .clone()
}

/// `k=v,k2=v2` from a selector's matchLabels.
fn selector(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The patch that sets `container`'s image: strategic merge, so the other
/// containers and fields are left as they are.
pub fn image_patch(container: &str, image: &str) -> Value {
    json!({"spec": {"template": {"spec": {"containers": [{"name": container, "image": image}]}}}})
}

/// The patch that restores `rs`'s pod template (without the controller's
/// `pod-template-hash` label) and resumes the rollout: what `kubectl
/// rollout undo` sends, plus the resume.
pub fn undo_patch(rs: &ReplicaSet) -> Result<Value, Failure> {
    let mut template = rs
        .spec
        .as_ref()
        .and_then(|s| s.template.clone())
        .ok_or_else(|| Failure::new(Cause::Engine, "the previous ReplicaSet has no pod template"))?;
    if let Some(l) = template.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        l.remove(TEMPLATE_HASH);
    }
    Ok(json!([
        {"op": "replace", "path": "/spec/template", "value": template},
        {"op": "replace", "path": "/spec/paused", "value": false},
    ]))
}

/// One Deployment's API, and what berth needs to read it.
struct Target {
    client: Client,
    deployments: Api<K8sDeployment>,
    replicasets: Api<ReplicaSet>,
    pods: Api<Pod>,
    events: Api<Event>,
    ns: String,
    name: String,
}

impl Target {
    async fn new(k: &Kubernetes) -> Result<Target, Failure> {
        let client = client(k).await?;
        Ok(Target {
            deployments: Api::namespaced(client.clone(), &k.namespace),
            replicasets: Api::namespaced(client.clone(), &k.namespace),
            pods: Api::namespaced(client.clone(), &k.namespace),
            events: Api::namespaced(client.clone(), &k.namespace),
            client,
            ns: k.namespace.clone(),
            name: k.deployment.clone(),
        })
    }

    fn what(&self) -> String {
        format!("Deployment {}/{}", self.ns, self.name)
    }

    async fn get(&self) -> Result<K8sDeployment, Failure> {
        self.deployments
            .get(&self.name)
            .await
            .map_err(|e| api_failure(&format!("reading {}", self.what()), e))
    }

    async fn patch(&self, p: &Patch<Value>) -> Result<K8sDeployment, Failure> {
        self.deployments
            .patch(
                &self.name,
                &PatchParams {
                    field_manager: Some(MANAGER.into()),
                    ..Default::default()
                },
                p,
            )
            .await
            .map_err(|e| api_failure(&format!("patching {}", self.what()), e))
    }

    /// A JSON patch (RFC 6902), sent as such (kube's typed one needs
    /// another crate for three lines of JSON).
    async fn json_patch(&self, ops: &Value) -> Result<K8sDeployment, Failure> {
        let req = http::Request::patch(format!(
            "/apis/apps/v1/namespaces/{}/deployments/{}?fieldManager={MANAGER}",
            self.ns, self.name
        ))
        .header(http::header::CONTENT_TYPE, "application/json-patch+json")
        .body(ops.to_string().into_bytes())
        .map_err(|e| api_failure("building the patch", e))?;
        self.client
            .request(req)
            .await
            .map_err(|e| api_failure(&format!("patching {}", self.what()), e))
    }

    /// The Deployment's ReplicaSets, newest revision first.
    async fn replicasets(&self, d: &K8sDeployment) -> Result<Vec<ReplicaSet>, Failure> {
        let labels = d
            .spec
            .as_ref()
            .and_then(|s| s.selector.match_labels.clone())
            .unwrap_or_default();
        let mut l = self
            .replicasets
            .list(&ListParams::default().labels(&selector(&labels)))
            .await
            .map_err(|e| api_failure(&format!("listing the ReplicaSets of {}", self.what()), e))?
            .items;
        l.sort_by_key(|r| std::cmp::Reverse(revision(&r.metadata)));
        Ok(l)
    }

    /// The first failure among `rs`'s pods.
    async fn pods_failure(&self, rs: &ReplicaSet) -> Result<Option<Failure>, Failure> {
        let mut labels = rs
            .spec
            .as_ref()
            .and_then(|s| s.selector.match_labels.clone())
            .unwrap_or_default();
        if let Some(h) = rs.metadata.labels.as_ref().and_then(|l| l.get(TEMPLATE_HASH)) {
            labels.insert(TEMPLATE_HASH.into(), h.clone());
        }
        let pods = self
            .pods
            .list(&ListParams::default().labels(&selector(&labels)))
            .await
            .map_err(|e| api_failure("listing the new ReplicaSet's pods", e))?
            .items;
        for p in &pods {
            if pod_failure(p, &[]).is_none() {
                continue;
            }
            let name = p.metadata.name.clone().unwrap_or_default();
            let events = self
                .events
                .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
                .await
                .map(|l| l.items)
                .unwrap_or_default();
            return Ok(pod_failure(p, &events));
        }
        Ok(None)
    }

    /// Follows the rollout to `image` until it is done, a pod fails, or the
    /// timeout passes.
    async fn follow(
        &self,
        container: &str,
        image: &str,
        timeout: Duration,
        log: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<(), Failure> {
        let deadline = Instant::now() + timeout;
        let mut seen_rs = None;
        loop {
            let d = self.get().await?;
            let rss = self.replicasets(&d).await?;
            if let Some(rs) = rss.iter().find(|r| {
                image_of(r.spec.as_ref().and_then(|s| s.template.as_ref()), container).as_deref() == Some(image)
            }) {
                let name = rs.metadata.name.clone().unwrap_or_default();
                if seen_rs.as_ref() != Some(&name) {
                    log(&format!(
                        "ReplicaSet {name} (revision {}) runs {image}",
                        revision(&rs.metadata)
                    ));
                    seen_rs = Some(name);
                }
                if let Some(f) = self.pods_failure(rs).await? {
                    return Err(f);
                }
            }
            if rollout_done(&d)? {
                log(&format!("rollout done: {}", progress(&d)));
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Failure::new(
                    Cause::StartTimeout,
                    format!("not rolled out within {timeout:?}: {}", progress(&d)),
                ));
            }
            tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
        }
    }
}

impl Guard {
    /// Deploys `spec`'s image to its Deployment, follows the rollout, and
    /// pauses and rolls it back on a failed check.
    pub(crate) async fn deploy_kubernetes(
        &self,
        spec: &Spec,
        k: &Kubernetes,
        Begun { d, t0, before }: Begun,
        (spec_file, toml): (&str, &str),
    ) -> Result<Deployment, WatchError> {
        let t = match Target::new(k).await {
            Ok(t) => t,
            Err(f) => return self.kubernetes_end(spec, k, None, &d, t0, &before, f).await,
        };
        let current = match t.get().await {
            Ok(c) => c,
            Err(f) => return self.kubernetes_end(spec, k, None, &d, t0, &before, f).await,
        };
        if current.spec.as_ref().and_then(|s| s.paused) == Some(true) {
            let f = Failure::new(
                Cause::Config,
                format!("{} is paused (spec.paused); nothing would roll out", t.what()),
            );
            return self.kubernetes_end(spec, k, None, &d, t0, &before, f).await;
        }
        let container = match k.container.clone().or_else(|| {
            current
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .and_then(|p| p.containers.first())
                .map(|c| c.name.clone())
        }) {
            Some(c) => c,
            None => {
                let f = Failure::new(Cause::Config, format!("{} has no container", t.what()));
                return self.kubernetes_end(spec, k, None, &d, t0, &before, f).await;
            }
        };
        let (image, digest) = match self.k8s_image(&spec.image, &d, t0).await {
            Ok(i) => i,
            Err(f) => return self.kubernetes_end(spec, k, None, &d, t0, &before, f).await,
        };
        let prev_revision = revision(&current.metadata);
        if let Err(f) = t.patch(&Patch::Strategic(image_patch(&container, &image))).await {
            return self.kubernetes_end(spec, k, None, &d, t0, &before, f).await;
        }
        self.log(
            &d,
            t0,
            &format!(
                "patched {}: container {container} image {image} (was revision {prev_revision})",
                t.what()
            ),
        );
        let log = |m: &str| self.log(&d, t0, m);
        let checked = match t.follow(&container, &image, spec.rollout.start_timeout, &log).await {
            Ok(()) => self.k8s_verify(&t, &container, &image, spec.rollout.verify, &log).await,
            Err(f) => Err(f),
        };
        if let Err(mut f) = checked {
            // The pull path as this host sees it (registry, tag, quota).
            if f.cause.is_pull() {
                if let Some(diag) = self.diagnoser.diagnose(&image, &f).await {
                    f.root_cause = Some(diag.root_cause);
                    f.fix = diag.fix;
                }
            }
            return self
                .kubernetes_end(spec, k, Some((&t, prev_revision)), &d, t0, &before, f)
                .await;
        }
        let release = Release {
            image: spec.image.clone(),
            digest,
            version: spec.version.clone(),
            spec_file: spec_file.to_string(),
            spec_toml: toml.to_string(),
        };
        let _ = self.store.bg().set_active(&spec.name, &release).await;
        self.log(&d, t0, &format!("{} rolled out; deployment succeeded", spec.version));
        self.store
            .bg()
            .finish(&spec.name, d.id, Outcome::Success, None, Effect::Passed(release))
            .await?;
        self.finished(&spec.name, d.id).await
    }

    /// `berth watch run` for a Deployment: once per health interval, the
    /// pods of the ReplicaSet that runs `release`; a failure (crash loop,
    /// pull error, unschedulable...) seen in `threshold` consecutive checks
    /// is returned for the guard to roll back. Returns `Ok` at `until`, or
    /// when no ReplicaSet runs the release any more (someone else changed
    /// the Deployment; the guard reads the history again).
    pub(crate) async fn kubernetes_watch(
        &self,
        spec: &Spec,
        k: &Kubernetes,
        release: &Release,
        until: Instant,
        on_failed_check: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<(), Failure> {
        let image = if release.digest.is_empty() {
            release.image.clone()
        } else {
            format!("{}@{}", spec::repository_of(&release.image), release.digest)
        };
        let t = Target::new(k).await?;
        let mut failed = 0;
        while Instant::now() < until {
            tokio::time::sleep(spec.health.interval).await;
            let d = t.get().await?;
            let container = match k.container.clone().or_else(|| {
                d.spec
                    .as_ref()
                    .and_then(|s| s.template.spec.as_ref())
                    .and_then(|p| p.containers.first())
                    .map(|c| c.name.clone())
            }) {
                Some(c) => c,
                None => return Ok(()),
            };
            let rss = t.replicasets(&d).await?;
            let Some(rs) = rss.iter().find(|r| {
                image_of(r.spec.as_ref().and_then(|s| s.template.as_ref()), &container).as_deref()
                    == Some(image.as_str())
            }) else {
                return Ok(());
            };
            match t.pods_failure(rs).await? {
                None => failed = 0,
                Some(f) => {
                    failed += 1;
                    on_failed_check(&format!(
                        "pods of {} failing ({failed}/{}): {}: {}",
                        t.what(),
                        spec.health.threshold,
                        f.cause,
                        f.evidence
                    ));
                    if failed >= spec.health.threshold {
                        return Err(f);
                    }
                }
            }
        }
        Ok(())
    }

    /// The image by digest, and the digest (recorded on `d`): as given if
    /// it names one, else the tag resolved through the Docker Engine; by
    /// tag (with a note in the timeline) where there is no Engine to ask.
    async fn k8s_image(&self, image: &str, d: &Deployment, t0: Instant) -> Result<(String, String), Failure> {
        if let Some((_, digest)) = image.split_once('@') {
            let _ = self.store.bg().set_digest(&d.service, d.id, digest).await;
            return Ok((image.to_string(), digest.to_string()));
        }
        match self.resolve(image, d).await {
            Ok(dg) => {
                let by_digest = format!("{}@{dg}", spec::repository_of(image));
                self.log(d, t0, &format!("{image} is {dg}"));
                Ok((by_digest, dg))
            }
            Err(e @ crate::EngineError::Connect { .. }) => {
                self.log(
                    d,
                    t0,
                    &format!("cannot resolve {image} to a digest ({e}); deploying the tag as written"),
                );
                Ok((image.to_string(), String::new()))
            }
            Err(e) => Err(self.pull_failure(image, &e).await),
        }
    }

    /// After the rollout, the new pods must stay well for `verify`.
    async fn k8s_verify(
        &self,
        t: &Target,
        container: &str,
        image: &str,
        verify: Duration,
        log: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<(), Failure> {
        let until = Instant::now() + verify;
        while Instant::now() < until {
            tokio::time::sleep(POLL.min(until.saturating_duration_since(Instant::now()))).await;
            let d = t.get().await?;
            if let Some(rs) = t.replicasets(&d).await?.iter().find(|r| {
                image_of(r.spec.as_ref().and_then(|s| s.template.as_ref()), container).as_deref() == Some(image)
            }) {
                if let Some(f) = t.pods_failure(rs).await? {
                    return Err(f);
                }
            }
            if !rollout_done(&d)? {
                log(&format!("after the rollout: {}", progress(&d)));
            }
        }
        Ok(())
    }

    /// Ends a failed deployment: if the image was patched (`patched`, with
    /// the revision before it), the rollout is paused, then rolled back to
    /// the previous ReplicaSet's template unless `on_failure = "pause"`.
    #[allow(clippy::too_many_arguments)]
    async fn kubernetes_end(
        &self,
        spec: &Spec,
        k: &Kubernetes,
        patched: Option<(&Target, u64)>,
        d: &Deployment,
        t0: Instant,
        before: &ServiceState,
        mut f: Failure,
    ) -> Result<Deployment, WatchError> {
        self.log(d, t0, &format!("check failed: {}: {}", f.cause, f.evidence));
        let mut rolled_back = None;
        let mut paused = false;
        if let Some((t, prev)) = patched {
            match t.patch(&Patch::Merge(json!({"spec": {"paused": true}}))).await {
                Ok(_) => {
                    paused = true;
                    self.log(d, t0, &format!("paused the rollout of {} (spec.paused)", t.what()));
                }
                Err(e) => f.evidence.push_str(&format!("; pausing failed: {}", e.evidence)),
            }
            if k.on_failure == OnFailure::Rollback {
                match self.k8s_undo(t, prev, spec.rollout.start_timeout, d, t0).await {
                    Ok(rev) => {
                        paused = false;
                        rolled_back = Some(rev);
                    }
                    Err(e) => f
                        .evidence
                        .push_str(&format!("; the rollback failed: {}: {}", e.cause, e.evidence)),
                }
            }
        }
        let outcome = match (f.cause, &rolled_back) {
            (Cause::StartTimeout, _) => Outcome::Timeout,
            (_, Some(_)) => Outcome::RolledBack,
            _ => Outcome::Failure,
        };
        let summary = match (&rolled_back, paused) {
            (Some(rev), _) => format!(
                "{}: the rollout of {} failed ({}); berth rolled {}/{} back to revision {rev}",
                spec.name, spec.version, f.cause, k.namespace, k.deployment
            ),
            (None, true) => format!(
                "{}: the rollout of {} failed ({}); {}/{} is paused: fix it, then `kubectl rollout resume`",
                spec.name, spec.version, f.cause, k.namespace, k.deployment
            ),
            (None, false) => format!("{}: deployment of {} failed: {}", spec.name, spec.image, f.cause),
        };
        let name = match f.cause {
            Cause::StartTimeout => "BerthWatchDeployTimeout",
            _ if rolled_back.is_some() => "BerthWatchRolledBack",
            c if c.is_pull() => "BerthWatchPullFailed",
            _ => "BerthWatchDeployFailed",
        };
        self.end_failed(spec, d, before, outcome, &f, rolled_back.is_some(), (name, summary))
            .await
    }

    /// Restores the pod template of the ReplicaSet at revision `prev` (or,
    /// if it is gone, the newest one before the current), and waits for it
    /// to roll out. Returns the revision restored.
    async fn k8s_undo(
        &self,
        t: &Target,
        prev: u64,
        timeout: Duration,
        d: &Deployment,
        t0: Instant,
    ) -> Result<u64, Failure> {
        let current = t.get().await?;
        let now = revision(&current.metadata);
        let rss = t.replicasets(&current).await?;
        let target = rss
            .iter()
            .find(|r| revision(&r.metadata) == prev && prev != now)
            .or_else(|| rss.iter().find(|r| revision(&r.metadata) < now))
            .ok_or_else(|| Failure::new(Cause::Engine, "no earlier ReplicaSet to roll back to"))?;
        let rev = revision(&target.metadata);
        self.restore_template(t, target, d, t0).await?;
        let deadline = Instant::now() + timeout;
        loop {
            let d2 = t.get().await?;
            if rollout_done(&d2)? {
                self.log(d, t0, &format!("revision {rev} serves again: {}", progress(&d2)));
                return Ok(rev);
            }
            if Instant::now() >= deadline {
                return Err(Failure::new(
                    Cause::StartTimeout,
                    format!("the rollback did not finish within {timeout:?}: {}", progress(&d2)),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Restores `rs`'s pod template and resumes the rollout, in one JSON
    /// patch (what `kubectl rollout undo` sends, plus the resume).
    async fn restore_template(&self, t: &Target, rs: &ReplicaSet, d: &Deployment, t0: Instant) -> Result<(), Failure> {
        let images: Vec<String> = rs
            .spec
            .as_ref()
            .and_then(|s| s.template.as_ref())
            .and_then(|t| t.spec.as_ref())
            .map(|p| p.containers.iter().filter_map(|c| c.image.clone()).collect())
            .unwrap_or_default();
        t.json_patch(&undo_patch(rs)?).await?;
        self.log(
            d,
            t0,
            &format!(
                "rolling back: restored the pod template of ReplicaSet {} (revision {}, {}) and resumed",
                rs.metadata.name.as_deref().unwrap_or_default(),
                revision(&rs.metadata),
                images.join(", ")
            ),
        );
        Ok(())
    }

    /// `berth watch rollback` of a Deployment to the release that passed
    /// before: the pod template of the newest ReplicaSet that ran it, by
    /// digest (as `kubectl rollout undo --to-revision` does; a paused
    /// rollout is resumed), or, if the Deployment keeps no such ReplicaSet
    /// any more (`revisionHistoryLimit`), its image set by digest; then the
    /// rollout followed.
    pub(crate) async fn kubernetes_restore(
        &self,
        spec: &Spec,
        k: &Kubernetes,
        target: &Release,
        d: &Deployment,
        t0: Instant,
    ) -> Result<(), Failure> {
        let t = Target::new(k).await?;
        let current = t.get().await?;
        let container = k
            .container
            .clone()
            .or_else(|| {
                current
                    .spec
                    .as_ref()
                    .and_then(|s| s.template.spec.as_ref())
                    .and_then(|p| p.containers.first())
                    .map(|c| c.name.clone())
            })
            .ok_or_else(|| Failure::new(Cause::Config, format!("{} has no container", t.what())))?;
        let image = if target.digest.is_empty() {
            target.image.clone()
        } else {
            format!("{}@{}", spec::repository_of(&target.image), target.digest)
        };
        let rss = t.replicasets(&current).await?;
        let ran = rss.iter().find(|r| {
            image_of(r.spec.as_ref().and_then(|s| s.template.as_ref()), &container).as_deref() == Some(image.as_str())
        });
        match ran {
            Some(rs) => self.restore_template(&t, rs, d, t0).await?,
            None => {
                // Resumed too: an operator's rollback must roll out.
                let mut p = image_patch(&container, &image);
                p["spec"]["paused"] = json!(false);
                t.patch(&Patch::Strategic(p)).await?;
                self.log(
                    d,
                    t0,
                    &format!(
                        "no ReplicaSet of {image} is left: patched {}: container {container} image {image}, resumed",
                        t.what()
                    ),
                );
            }
        }
        let log = |m: &str| self.log(d, t0, m);
        t.follow(&container, &image, spec.rollout.start_timeout, &log).await?;
        let _ = self.store.bg().set_active(&spec.name, target).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn classifies_pods() {
        let waiting = |reason: &str, message: &str| {
            pod(json!({"metadata": {"name": "web-1"}, "status": {"containerStatuses": [{
                "name": "web", "image": "i", "imageID": "", "ready": false, "restartCount": 4,
                "state": {"waiting": {"reason": reason, "message": message}},
                "lastState": {"terminated": {"exitCode": 3, "reason": "Error"}}
            }]}}))
        };
        let ev = |reason: &str, message: &str| -> Event {
            serde_json::from_value(json!({"metadata": {"name": "e"}, "involvedObject": {"name": "web-1"}, "reason": reason, "message": message, "type": "Warning"})).unwrap()
        };
        let f = pod_failure(
            &waiting("ImagePullBackOff", "Back-off pulling image \"r/web:v9\""),
            &[ev("Failed", "Failed to pull image \"r/web:v9\": rpc error: code = NotFound desc = failed to pull and unpack image \"r/web:v9\": not found")],
        )
        .unwrap();
        assert_eq!(f.cause, Cause::TagNotFound, "{f:?}");
        assert!(
            f.evidence
                .starts_with("pod web-1, container web: ImagePullBackOff: Failed to pull image"),
            "{}",
            f.evidence
        );
        let f = pod_failure(
            &waiting("CrashLoopBackOff", "back-off 10s restarting failed container"),
            &[],
        )
        .unwrap();
        assert_eq!(f.cause, Cause::Restarting);
        assert!(
            f.evidence.contains("restarts 4; last exit code 3 (Error)"),
            "{}",
            f.evidence
        );
        let f = pod_failure(&waiting("CreateContainerConfigError", "secret \"db\" not found"), &[]).unwrap();
        assert_eq!(f.cause, Cause::ContainerConfig);
        assert!(pod_failure(&waiting("ContainerCreating", ""), &[]).is_none());
        let unschedulable = pod(json!({"metadata": {"name": "web-1"}, "status": {"conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient cpu."
        }]}}));
        let f = pod_failure(&unschedulable, &[]).unwrap();
        assert_eq!(f.cause, Cause::Unschedulable);
        assert!(f.evidence.contains("3 Insufficient cpu"), "{}", f.evidence);
    }

    #[test]
    fn undo_drops_the_template_hash() {
        let rs: ReplicaSet = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "annotations": {REVISION: "1"}},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {
                "metadata": {"labels": {"app": "web", TEMPLATE_HASH: "abc"}},
                "spec": {"containers": [{"name": "web", "image": "r/web@sha256:11"}]}
            }}
        }))
        .unwrap();
        assert_eq!(
            undo_patch(&rs).unwrap(),
            json!([
                {"op": "replace", "path": "/spec/template", "value": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "web", "image": "r/web@sha256:11"}]}
                }},
                {"op": "replace", "path": "/spec/paused", "value": false},
            ])
        );
    }
}
