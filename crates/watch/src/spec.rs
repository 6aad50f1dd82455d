//! The deployment description: one TOML file per service. Every error names
//! the file, the line and the key, so a bad file is fixed without guessing.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// A validated deployment description.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    /// As written (a tag); deployed by the digest it resolves to.
    pub image: String,
    /// The `image_version` a healthy instance must report.
    pub version: String,
    pub replicas: u32,
    pub ports: Vec<Port>,
    pub env: BTreeMap<String, String>,
    pub command: Option<Vec<String>>,
    pub cpus: Option<f64>,
    pub memory: Option<u64>,
    pub health: Health,
    pub rollout: Rollout,
    pub notify: Notify,
    pub router: Option<Router>,
    pub canary: Option<Canary>,
    /// What runs the service: plain containers (berth's own rollout), a
    /// Swarm service, or a Kubernetes Deployment.
    pub backend: Backend,
}

/// Where the service runs, and how berth drives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Plain containers on the Docker Engine; berth runs the rollout.
    Containers,
    /// A Docker Swarm service: berth updates it, watches the update with its
    /// own checks, and rolls it back itself.
    Swarm(Swarm),
    /// A Kubernetes Deployment (feature `kubernetes`).
    Kubernetes(Kubernetes),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swarm {
    /// The Swarm service's name (default: `name`).
    pub service: String,
    /// `ingress` (the routing mesh) or `host` (each task on its node).
    pub publish_mode: String,
    /// How long a task has to stop before it is killed (Swarm's default:
    /// 10 s). Every update waits for it with `stop-first`.
    pub stop_grace_period: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kubernetes {
    pub namespace: String,
    /// The Deployment's name (default: `name`).
    pub deployment: String,
    /// The container whose image is deployed (default: the first).
    pub container: Option<String>,
    /// The kubeconfig context (default: its current one).
    pub context: Option<String>,
    /// On a failed check: roll back (after pausing), or only pause.
    pub on_failure: OnFailure,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    Rollback,
    Pause,
}

/// nginx in front of the service: berth writes the upstream block and
/// reloads nginx at every switch, and sets the weights of a canary.
#[derive(Debug, Clone)]
pub struct Router {
    /// The upstream's name (`proxy_pass http://NAME`).
    pub upstream: String,
    /// The container port nginx sends the traffic to.
    pub port: u16,
    /// The file berth writes the upstream block to (nginx includes it).
    pub conf: PathBuf,
    /// The command that makes nginx read it again.
    pub reload: Vec<String>,
    /// nginx's access log in JSON (`upstream_addr`, `status`,
    /// `request_time`), where the canary analysis reads the traffic.
    pub access_log: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Canary {
    pub steps: Vec<Step>,
    /// Length of one analysis window.
    pub interval: Duration,
    /// The canary fails a window above this share of 5xx answers.
    pub max_error_rate: f64,
    /// ... or with this percentile of latency above `max_latency`.
    pub max_latency: Duration,
    pub percentile: f64,
    /// Fewer canary requests in a window: inconclusive (never a pass).
    pub min_requests: u64,
    /// Consecutive inconclusive windows before `on_inconclusive`.
    pub inconclusive_windows: u32,
    pub on_inconclusive: OnInconclusive,
    /// Judge the canary on the thresholds, against the stable, or both.
    pub compare: Compare,
    /// Relative: the canary fails above the stable's error rate plus this.
    pub max_error_rate_increase: f64,
    /// Relative: the canary fails above the stable's latency times this...
    pub max_latency_ratio: f64,
    /// ... unless it is under this (a ratio of milliseconds is noise).
    pub latency_floor: Duration,
    /// Where the windows' numbers come from: Prometheus if set, else
    /// nginx's access log.
    pub prometheus: Option<PrometheusAnalysis>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compare {
    Absolute,
    Relative,
    Both,
}

/// The canary analysis from Prometheus, like an AnalysisTemplate: PromQL
/// instant queries, each run once for the canary and once for the stable,
/// with `{{service}}`, `{{version}}`, `{{digest}}`, `{{track}}` (canary or
/// stable), `{{interval}}` (the window, e.g. `30s`) and `{{quantile}}`
/// (the percentile as 0-1) replaced.
#[derive(Debug, Clone)]
pub struct PrometheusAnalysis {
    /// Prometheus's base URL (its HTTP API is used).
    pub url: String,
    /// The requests in the window (a number); no result: no data.
    pub requests: String,
    /// The failed requests in the window; no result: none failed (a
    /// counter of errors that never happened does not exist yet).
    pub errors: String,
    /// The latency percentile in the window, in seconds; no result or NaN:
    /// no data.
    pub latency: String,
    pub timeout: Duration,
}

/// The placeholders a query may use.
pub const QUERY_VARIABLES: [&str; 6] = ["service", "version", "digest", "track", "interval", "quantile"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Percent of the traffic to the canary.
    pub weight: u32,
    pub duration: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnInconclusive {
    Rollback,
    Pause,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Port {
    pub container: u16,
    /// A fixed host port; `None`: an ephemeral port on 127.0.0.1, so the
    /// new version can start beside the old one.
    pub host: Option<u16>,
}

#[derive(Debug, Clone)]
pub struct Health {
    pub port: u16,
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive failed checks that make an instance unhealthy.
    pub threshold: u32,
}

#[derive(Debug, Clone)]
pub struct Rollout {
    /// The new version must be Running and healthy within this.
    pub start_timeout: Duration,
    /// After the switch, health is watched this long before the deployment
    /// counts as a success; failing it rolls back.
    pub verify: Duration,
    /// Consecutive failed deployments that pause the service.
    pub failure_limit: u32,
}

#[derive(Debug, Clone, Default)]
pub struct Notify {
    /// Alertmanager's base URL (its v2 API is used).
    pub alertmanager: Option<String>,
    /// CloudEvents receivers.
    pub webhooks: Vec<String>,
    /// Extra labels on every alert (e.g. `region`).
    pub labels: BTreeMap<String, String>,
}

/// A description that cannot be used, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    pub file: PathBuf,
    pub line: usize,
    /// The key at fault; empty when the file is not TOML at all.
    pub key: String,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
        } else {
            write!(
                f,
                "{}:{}: `{}`: {}",
                self.file.display(),
                self.line,
                self.key,
                self.message
            )
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: Spanned<String>,
    image: Spanned<String>,
    version: Option<Spanned<String>>,
    replicas: Option<Spanned<i64>>,
    #[serde(default)]
    ports: Vec<Spanned<RawPort>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    command: Option<Vec<String>>,
    cpus: Option<Spanned<f64>>,
    memory: Option<Spanned<String>>,
    /// Required except for Kubernetes, where readiness is the cluster's.
    health: Option<Spanned<RawHealth>>,
    #[serde(default)]
    rollout: RawRollout,
    #[serde(default)]
    notify: RawNotify,
    router: Option<Spanned<RawRouter>>,
    canary: Option<Spanned<RawCanary>>,
    backend: Option<Spanned<String>>,
    swarm: Option<Spanned<RawSwarm>>,
    kubernetes: Option<Spanned<RawKubernetes>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSwarm {
    service: Option<Spanned<String>>,
    publish_mode: Option<Spanned<String>>,
    stop_grace_period: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKubernetes {
    namespace: Option<Spanned<String>>,
    deployment: Option<Spanned<String>>,
    container: Option<Spanned<String>>,
    context: Option<String>,
    on_failure: Option<OnFailure>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouter {
    upstream: String,
    port: Option<Spanned<i64>>,
    conf: PathBuf,
    reload: Vec<String>,
    access_log: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCanary {
    steps: Option<Vec<Spanned<RawStep>>>,
    interval: Option<Spanned<String>>,
    max_error_rate: Option<Spanned<f64>>,
    max_latency: Option<Spanned<String>>,
    percentile: Option<Spanned<f64>>,
    min_requests: Option<Spanned<i64>>,
    inconclusive_windows: Option<Spanned<i64>>,
    on_inconclusive: Option<OnInconclusive>,
    compare: Option<Compare>,
    max_error_rate_increase: Option<Spanned<f64>>,
    max_latency_ratio: Option<Spanned<f64>>,
    latency_floor: Option<Spanned<String>>,
    prometheus: Option<Spanned<RawPrometheus>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrometheus {
    url: Spanned<String>,
    requests: Spanned<String>,
    errors: Spanned<String>,
    latency: Spanned<String>,
    timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    weight: Spanned<i64>,
    duration: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    container: Spanned<i64>,
    host: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    /// Not for Kubernetes, whose readiness probes are the cluster's: there
    /// only `interval` and `threshold` apply (the guard's checks of pods).
    port: Option<Spanned<i64>>,
    #[serde(default = "root_path")]
    path: Spanned<String>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    threshold: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    start_timeout: Option<Spanned<String>>,
    verify: Option<Spanned<String>>,
    failure_limit: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    alertmanager: Option<Spanned<String>>,
    #[serde(default)]
    webhooks: Vec<Spanned<String>>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// Reads and validates the description in `path`.
pub fn load(path: &Path) -> Result<(Spec, String), SpecError> {
    let text = std::fs::read_to_string(path).map_err(|e| SpecError {
        file: path.to_path_buf(),
        line: 0,
        key: String::new(),
        message: format!("cannot read the deployment description: {e}"),
    })?;
    let spec = parse(path, &text)?;
    Ok((spec, text))
}

/// Validates `text`, the contents of `file`.
pub fn parse(file: &Path, text: &str) -> Result<Spec, SpecError> {
    let at = |span: Range<usize>, key: &str, message: String| SpecError {
        file: file.to_path_buf(),
        line: line_of(text, span.start),
        key: key.to_string(),
        message,
    };
    let raw: RawSpec = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        let key = key_at(text, &span);
        at(span, &key, e.message().to_string())
    })?;

    let name = raw.name.get_ref();
    if !valid_name(name) {
        return Err(at(
            raw.name.span(),
            "name",
            format!("{name:?} is not a service name; use lowercase letters, digits, '-', '_' and '.', starting with a letter or digit"),
        ));
    }
    let image = raw.image.get_ref().trim().to_string();
    let version = match &raw.version {
        Some(v) => v.get_ref().clone(),
        None => tag_of(&image).map(str::to_string).ok_or_else(|| {
            at(
                raw.image.span(),
                "image",
                format!("{image:?} has no tag; give the image as REPOSITORY:TAG, or set `version`"),
            )
        })?,
    };
    if image.is_empty() || image.contains(char::is_whitespace) {
        return Err(at(
            raw.image.span(),
            "image",
            format!("{image:?} is not an image reference"),
        ));
    }
    let replicas = match &raw.replicas {
        None => 1,
        Some(r) => bounded(r, 1, 100).map_err(|m| at(r.span(), "replicas", m))? as u32,
    };
    let mut ports = Vec::new();
    for p in &raw.ports {
        let container = bounded(&p.get_ref().container, 1, 65535).map_err(|m| at(p.span(), "ports.container", m))?;
        let host = match &p.get_ref().host {
            None => None,
            Some(h) => Some(bounded(h, 1, 65535).map_err(|m| at(h.span(), "ports.host", m))? as u16),
        };
        if host.is_some() && replicas > 1 {
            return Err(at(
                p.span(),
                "ports.host",
                "a fixed host port cannot be shared by several replicas; leave `host` out".to_string(),
            ));
        }
        ports.push(Port {
            container: container as u16,
            host,
        });
    }
    let cpus = match &raw.cpus {
        Some(c) if !c.get_ref().is_finite() || *c.get_ref() <= 0.0 => {
            return Err(at(
                c.span(),
                "cpus",
                "must be a positive number of CPUs, e.g. 0.5".to_string(),
            ))
        }
        c => c.as_ref().map(|c| *c.get_ref()),
    };
    let memory = match &raw.memory {
        None => None,
        Some(m) => Some(observe::size::parse_size(m.get_ref()).map_err(|e| at(m.span(), "memory", e))?),
    };

    let backend_name = raw.backend.as_ref().map_or("containers", |b| b.get_ref().as_str());
    let default_health;
    let h = match &raw.health {
        Some(h) => h.get_ref(),
        None if backend_name == "kubernetes" => {
            // Readiness is the cluster's (the pods' probes); berth's own
            // health settings are unused there.
            default_health = RawHealth {
                port: None,
                path: root_path(),
                interval: None,
                timeout: None,
                threshold: None,
            };
            &default_health
        }
        None => {
            return Err(at(
                0..0,
                "health",
                "missing table [health] (port and path of the instances' health endpoint)".into(),
            ))
        }
    };
    let health_span = raw.health.as_ref().map_or(0..0, |h| h.span());
    let health_port = match (&h.port, backend_name == "kubernetes") {
        (_, true) => 0,
        (None, false) => {
            return Err(at(
                health_span,
                "health.port",
                "missing: the container port of the instances' health endpoint".into(),
            ))
        }
        (Some(p), false) => bounded(p, 1, 65535).map_err(|m| at(p.span(), "health.port", m))? as u16,
    };
    if backend_name != "kubernetes" && !ports.iter().any(|p| p.container == health_port) {
        return Err(at(
            h.port.as_ref().map_or(0..0, |p| p.span()),
            "health.port",
            format!("port {health_port} is not in `ports`; add {{ container = {health_port} }} there"),
        ));
    }
    if !h.path.get_ref().starts_with('/') {
        return Err(at(h.path.span(), "health.path", "must start with '/'".to_string()));
    }
    let duration = |d: &Option<Spanned<String>>, key: &str, default: Duration| match d {
        None => Ok(default),
        Some(d) => match observe::time::parse_duration(d.get_ref()) {
            Ok(v) if !v.is_zero() => Ok(v),
            Ok(_) => Err(at(d.span(), key, "must be longer than zero".to_string())),
            Err(e) => Err(at(d.span(), key, e)),
        },
    };
    let health = Health {
        port: health_port,
        path: h.path.get_ref().clone(),
        interval: duration(&h.interval, "health.interval", Duration::from_secs(10))?,
        timeout: duration(&h.timeout, "health.timeout", Duration::from_secs(2))?,
        threshold: match &h.threshold {
            None => 3,
            Some(t) => bounded(t, 1, 1000).map_err(|m| at(t.span(), "health.threshold", m))? as u32,
        },
    };
    let r = &raw.rollout;
    let rollout = Rollout {
        start_timeout: duration(&r.start_timeout, "rollout.start_timeout", Duration::from_secs(180))?,
        verify: duration(&r.verify, "rollout.verify", Duration::from_secs(60))?,
        failure_limit: match &r.failure_limit {
            None => 3,
            Some(t) => bounded(t, 1, 1000).map_err(|m| at(t.span(), "rollout.failure_limit", m))? as u32,
        },
    };
    let url = |u: &Spanned<String>, key: &str| {
        let s = u.get_ref();
        if s.starts_with("http://") || s.starts_with("https://") {
            Ok(s.trim_end_matches('/').to_string())
        } else {
            Err(at(u.span(), key, format!("{s:?} is not an http:// or https:// URL")))
        }
    };
    let notify = Notify {
        alertmanager: raw
            .notify
            .alertmanager
            .as_ref()
            .map(|u| url(u, "notify.alertmanager"))
            .transpose()?,
        webhooks: raw
            .notify
            .webhooks
            .iter()
            .map(|u| url(u, "notify.webhooks"))
            .collect::<Result<_, _>>()?,
        labels: raw.notify.labels.clone(),
    };
    let router = match &raw.router {
        None => None,
        Some(r) => {
            let v = r.get_ref();
            if v.reload.is_empty() {
                return Err(at(
                    r.span(),
                    "router.reload",
                    "give the command that reloads nginx, e.g. [\"nginx\", \"-s\", \"reload\"]".into(),
                ));
            }
            if !valid_name(&v.upstream.replace('-', "_")) {
                return Err(at(
                    r.span(),
                    "router.upstream",
                    format!("{:?} is not an upstream name", v.upstream),
                ));
            }
            let port = match &v.port {
                None => ports.first().map_or(health_port, |p| p.container),
                Some(p) => bounded(p, 1, 65535).map_err(|m| at(p.span(), "router.port", m))? as u16,
            };
            if !ports.iter().any(|p| p.container == port) {
                return Err(at(r.span(), "router.port", format!("port {port} is not in `ports`")));
            }
            Some(Router {
                port,
                upstream: v.upstream.clone(),
                conf: v.conf.clone(),
                reload: v.reload.clone(),
                access_log: v.access_log.clone(),
            })
        }
    };
    let canary = match &raw.canary {
        None => None,
        Some(c) => {
            if router.is_none() {
                return Err(at(
                    c.span(),
                    "canary",
                    "a canary needs a [router] (nginx) to give it its share of the traffic".into(),
                ));
            }
            let v = c.get_ref();
            let mut steps = Vec::new();
            for st in v.steps.iter().flatten() {
                let weight =
                    bounded(&st.get_ref().weight, 1, 99).map_err(|m| at(st.span(), "canary.steps.weight", m))? as u32;
                let duration = duration(
                    &Some(st.get_ref().duration.clone()),
                    "canary.steps.duration",
                    Duration::ZERO,
                )?;
                if steps.last().is_some_and(|l: &Step| l.weight >= weight) {
                    return Err(at(
                        st.span(),
                        "canary.steps.weight",
                        "weights must grow from step to step".into(),
                    ));
                }
                steps.push(Step { weight, duration });
            }
            if steps.is_empty() {
                steps.push(Step {
                    weight: 5,
                    duration: Duration::from_secs(15 * 60),
                });
            }
            let fraction = |f: &Option<Spanned<f64>>, key: &str, default: f64, hi: f64| match f {
                None => Ok(default),
                Some(x) if *x.get_ref() >= 0.0 && *x.get_ref() <= hi => Ok(*x.get_ref()),
                Some(x) => Err(at(x.span(), key, format!("must be between 0 and {hi}"))),
            };
            Some(Canary {
                steps,
                interval: duration(&v.interval, "canary.interval", Duration::from_secs(60))?,
                max_error_rate: fraction(&v.max_error_rate, "canary.max_error_rate", 0.01, 1.0)?,
                max_latency: duration(&v.max_latency, "canary.max_latency", Duration::from_secs(2))?,
                percentile: fraction(&v.percentile, "canary.percentile", 99.0, 100.0)?,
                min_requests: match &v.min_requests {
                    None => 20,
                    Some(n) => bounded(n, 1, 1_000_000).map_err(|m| at(n.span(), "canary.min_requests", m))? as u64,
                },
                inconclusive_windows: match &v.inconclusive_windows {
                    None => 3,
                    Some(n) => bounded(n, 1, 1000).map_err(|m| at(n.span(), "canary.inconclusive_windows", m))? as u32,
                },
                on_inconclusive: v.on_inconclusive.unwrap_or(OnInconclusive::Rollback),
                compare: v.compare.unwrap_or(Compare::Both),
                max_error_rate_increase: fraction(
                    &v.max_error_rate_increase,
                    "canary.max_error_rate_increase",
                    0.005,
                    1.0,
                )?,
                max_latency_ratio: match &v.max_latency_ratio {
                    None => 1.5,
                    Some(x) if *x.get_ref() >= 1.0 && x.get_ref().is_finite() => *x.get_ref(),
                    Some(x) => {
                        return Err(at(
                            x.span(),
                            "canary.max_latency_ratio",
                            "must be 1 or more (1.5: the canary may be half again as slow as the stable)".into(),
                        ))
                    }
                },
                latency_floor: duration(&v.latency_floor, "canary.latency_floor", Duration::from_millis(100))?,
                prometheus: match &v.prometheus {
                    None => None,
                    Some(p) => {
                        let p = p.get_ref();
                        let query = |q: &Spanned<String>, key: &str| {
                            check_query(q.get_ref())
                                .map(|()| q.get_ref().trim().to_string())
                                .map_err(|m| at(q.span(), key, m))
                        };
                        Some(PrometheusAnalysis {
                            url: url(&p.url, "canary.prometheus.url")?,
                            requests: query(&p.requests, "canary.prometheus.requests")?,
                            errors: query(&p.errors, "canary.prometheus.errors")?,
                            latency: query(&p.latency, "canary.prometheus.latency")?,
                            timeout: duration(&p.timeout, "canary.prometheus.timeout", Duration::from_secs(5))?,
                        })
                    }
                },
            })
        }
    };
    let backend = backend(&raw, name, &ports, health_port, &at)?;
    Ok(Spec {
        name: name.clone(),
        image,
        version,
        replicas,
        ports,
        env: raw.env,
        command: raw.command,
        cpus,
        memory,
        health,
        rollout,
        notify,
        router,
        canary,
        backend,
    })
}

/// `backend` and its table: `[swarm]` or `[kubernetes]`.
fn backend(
    raw: &RawSpec,
    name: &str,
    ports: &[Port],
    health_port: u16,
    at: &dyn Fn(Range<usize>, &str, String) -> SpecError,
) -> Result<Backend, SpecError> {
    let kind = raw.backend.as_ref().map_or("containers", |b| b.get_ref().as_str());
    let span = raw.backend.as_ref().map_or(0..0, |b| b.span());
    let stray = |table: &str, t: Range<usize>| {
        at(
            t,
            table,
            format!("[{table}] is for `backend = \"{table}\"`, and this file's backend is {kind:?}"),
        )
    };
    if kind != "swarm" {
        if let Some(t) = &raw.swarm {
            return Err(stray("swarm", t.span()));
        }
    }
    if kind != "kubernetes" {
        if let Some(t) = &raw.kubernetes {
            return Err(stray("kubernetes", t.span()));
        }
    }
    let object_name_or = |v: &Option<Spanned<String>>, key: &str, default: &str| match v {
        None => Ok(default.to_string()),
        Some(s) if valid_name(s.get_ref()) => Ok(s.get_ref().clone()),
        Some(s) => Err(at(
            s.span(),
            key,
            format!(
                "{:?} is not a valid name; use lowercase letters, digits, '-' and '.'",
                s.get_ref()
            ),
        )),
    };
    let object_name = |v: &Option<Spanned<String>>, key: &str| object_name_or(v, key, name);
    match kind {
        "containers" => Ok(Backend::Containers),
        "swarm" => {
            if raw.router.is_some() || raw.canary.is_some() {
                return Err(at(
                    span,
                    "backend",
                    "[router] and [canary] are for plain containers; a Swarm service is updated and rolled back as a whole".into(),
                ));
            }
            let s = raw.swarm.as_ref().map(|s| s.get_ref());
            let service = object_name(&s.and_then(|s| s.service.clone()), "swarm.service")?;
            let publish_mode = match s.and_then(|s| s.publish_mode.as_ref()) {
                None => "ingress".to_string(),
                Some(m) if matches!(m.get_ref().as_str(), "ingress" | "host") => m.get_ref().clone(),
                Some(m) => {
                    return Err(at(
                        m.span(),
                        "swarm.publish_mode",
                        format!("{:?}: use \"ingress\" (the routing mesh) or \"host\"", m.get_ref()),
                    ))
                }
            };
            // berth checks health through the published port.
            if !ports.iter().any(|p| p.container == health_port && p.host.is_some()) {
                return Err(at(
                    span,
                    "ports.host",
                    format!(
                        "a Swarm service is checked through its published port: give the health port one, e.g. {{ container = {health_port}, host = 8080 }}"
                    ),
                ));
            }
            let stop_grace_period = match s.and_then(|s| s.stop_grace_period.as_ref()) {
                None => None,
                Some(d) => Some(
                    observe::time::parse_duration(d.get_ref())
                        .map_err(|e| at(d.span(), "swarm.stop_grace_period", e))?,
                ),
            };
            Ok(Backend::Swarm(Swarm {
                service,
                publish_mode,
                stop_grace_period,
            }))
        }
        "kubernetes" => {
            if !cfg!(feature = "kubernetes") {
                return Err(at(
                    span,
                    "backend",
                    "this berth was built without Kubernetes support; build it with `--features kubernetes`".into(),
                ));
            }
            if raw.router.is_some() || raw.canary.is_some() {
                return Err(at(
                    span,
                    "backend",
                    "[router] and [canary] are for plain containers; a Kubernetes Deployment is rolled out by the cluster".into(),
                ));
            }
            let k = raw.kubernetes.as_ref().map(|k| k.get_ref());
            let namespace = object_name_or(&k.and_then(|k| k.namespace.clone()), "kubernetes.namespace", "default")?;
            let deployment = object_name(&k.and_then(|k| k.deployment.clone()), "kubernetes.deployment")?;
            let container = match k.and_then(|k| k.container.clone()) {
                None => None,
                c => Some(object_name(&c, "kubernetes.container")?),
            };
            Ok(Backend::Kubernetes(Kubernetes {
                namespace,
                deployment,
                container,
                context: k.and_then(|k| k.context.clone()),
                on_failure: k.and_then(|k| k.on_failure).unwrap_or(OnFailure::Rollback),
            }))
        }
        other => Err(at(
            span,
            "backend",
            format!("{other:?} is not a backend; use \"containers\", \"swarm\" or \"kubernetes\""),
        )),
    }
}

impl Spec {
    /// The same description for another image (`deploy --image`, a
    /// rollback): the expected version follows the image's tag unless the
    /// file pins one.
    pub fn with_image(&self, image: &str, version: Option<&str>) -> Result<Spec, String> {
        let version = match version.or(tag_of(image)) {
            Some(v) => v.to_string(),
            None => return Err(format!("{image:?} has no tag; give the image as REPOSITORY:TAG")),
        };
        Ok(Spec {
            image: image.to_string(),
            version,
            ..self.clone()
        })
    }
}

/// The tag of `REPOSITORY[:TAG][@DIGEST]`: after the last ':' that follows
/// the last '/' (a ':' before it is a registry's port).
pub fn tag_of(image: &str) -> Option<&str> {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    last.split_once(':').map(|(_, t)| t).filter(|t| !t.is_empty())
}

/// The repository of `REPOSITORY[:TAG][@DIGEST]`, for `REPOSITORY@DIGEST`.
pub fn repository_of(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    match tag_of(without_digest) {
        Some(t) => &without_digest[..without_digest.len() - t.len() - 1],
        None => without_digest,
    }
}

/// A query is not empty and uses only the known placeholders.
fn check_query(q: &str) -> Result<(), String> {
    if q.trim().is_empty() {
        return Err("give a PromQL query".into());
    }
    let mut rest = q;
    while let Some(i) = rest.find("{{") {
        let after = &rest[i + 2..];
        let Some(j) = after.find("}}") else {
            return Err("a `{{` without its `}}`".into());
        };
        let name = after[..j].trim();
        if !QUERY_VARIABLES.contains(&name) {
            return Err(format!(
                "unknown placeholder {{{{{name}}}}}; use {}",
                QUERY_VARIABLES.map(|v| format!("{{{{{v}}}}}")).join(", ")
            ));
        }
        rest = &after[j + 2..];
    }
    Ok(())
}

/// `q` with its placeholders replaced by `vars`' values.
pub fn render_query(q: &str, vars: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(q.len());
    let mut rest = q;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let Some(j) = after.find("}}") else { break };
        let name = after[..j].trim();
        match vars.iter().find(|(k, _)| *k == name) {
            Some((_, v)) => out.push_str(v),
            None => out.push_str(&rest[i..i + 2 + j + 2]),
        }
        rest = &after[j + 2..];
    }
    out.push_str(rest);
    out
}

fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_' | b'.'))
}

fn bounded(v: &Spanned<i64>, lo: i64, hi: i64) -> Result<i64, String> {
    let n = *v.get_ref();
    if (lo..=hi).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} is out of range; use {lo} to {hi}"))
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The key a parse error points at: the span's text when it is a bare key,
/// else the key that starts the span's line.
fn key_at(text: &str, span: &Range<usize>) -> String {
    let bare = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
    };
    let inside = text.get(span.clone()).unwrap_or("").trim();
    if bare(inside) {
        return inside.to_string();
    }
    let start = text[..span.start.min(text.len())].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next().unwrap_or("");
    match line.split_once('=') {
        Some((k, _)) if bare(k.trim()) => k.trim().to_string(),
        _ => String::new(),
    }
}

fn root_path() -> Spanned<String> {
    Spanned::new(0..0, "/".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "web"
image = "127.0.0.1:5000/team/web:v2"
ports = [{ container = 80 }]
env = { MODE = "prod" }

[health]
port = 80
path = "/healthz"
interval = "2s"

[rollout]
start_timeout = "30s"
"#;

    fn err(text: &str) -> SpecError {
        parse(Path::new("web.toml"), text).unwrap_err()
    }

    #[test]
    fn good_file_with_defaults() {
        let s = parse(Path::new("web.toml"), GOOD).unwrap();
        assert_eq!(s.version, "v2");
        assert_eq!(s.replicas, 1);
        assert_eq!(s.health.interval, Duration::from_secs(2));
        assert_eq!(s.health.threshold, 3);
        assert_eq!(s.rollout.start_timeout, Duration::from_secs(30));
        assert_eq!(s.rollout.failure_limit, 3);
        assert_eq!(
            s.ports,
            vec![Port {
                container: 80,
                host: None
            }]
        );
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = err(&GOOD.replace("interval = \"2s\"", "interval = \"2 weeks\""));
        assert_eq!((e.line, e.key.as_str()), (10, "health.interval"), "{e}");
        assert!(e.to_string().starts_with("web.toml:10: `health.interval`: "), "{e}");

        let e = err(&GOOD.replace("[rollout]", "[rollout]\nstart_timout = \"1m\""));
        assert_eq!((e.line, e.key.as_str()), (13, "start_timout"), "{e}");
        assert!(e.message.contains("unknown field"), "{e}");

        let e = err(&GOOD.replace("port = 80", "port = 81"));
        assert_eq!((e.line, e.key.as_str()), (8, "health.port"), "{e}");

        let e = err(&GOOD.replace("name = \"web\"", "name = \"Web App\""));
        assert_eq!((e.line, e.key.as_str()), (2, "name"), "{e}");

        let e = err(&GOOD.replace(":v2\"", "\""));
        assert_eq!((e.line, e.key.as_str()), (3, "image"), "{e}");

        let e = err("name = \"web\"\nimage = [\n");
        assert_eq!((e.line, e.key.as_str()), (2, "image"), "{e}");

        let e = err(&GOOD.replace("env = { MODE = \"prod\" }", "env = { MODE = 1 }"));
        assert_eq!(e.line, 5, "{e}");
    }

    #[test]
    fn backends_are_validated_with_file_line_and_key() {
        let swarm = GOOD.replace("{ container = 80 }", "{ container = 80, host = 8080 }")
            + "\n[swarm]\nservice = \"web-svc\"\nstop_grace_period = \"2s\"\n";
        let s = parse(
            Path::new("web.toml"),
            &swarm.replace("env =", "backend = \"swarm\"\nenv ="),
        )
        .unwrap();
        assert_eq!(
            s.backend,
            Backend::Swarm(Swarm {
                service: "web-svc".into(),
                publish_mode: "ingress".into(),
                stop_grace_period: Some(Duration::from_secs(2)),
            })
        );
        assert_eq!(parse(Path::new("web.toml"), GOOD).unwrap().backend, Backend::Containers);

        let e = err(&GOOD.replace("env =", "backend = \"nomad\"\nenv ="));
        assert_eq!((e.line, e.key.as_str()), (5, "backend"), "{e}");
        assert!(e.message.contains("\"containers\", \"swarm\" or \"kubernetes\""), "{e}");
        let e = err(&swarm);
        assert_eq!(
            (e.line, e.key.as_str()),
            (15, "swarm"),
            "[swarm] without backend = \"swarm\": {e}"
        );
        let e = err(&GOOD.replace("env =", "backend = \"swarm\"\nenv ="));
        assert_eq!((e.line, e.key.as_str()), (5, "ports.host"), "{e}");
        let e = err(&swarm
            .replace("env =", "backend = \"swarm\"\nenv =")
            .replace("stop_grace_period = \"2s\"", "publish_mode = \"mesh\""));
        assert_eq!((e.line, e.key.as_str()), (18, "swarm.publish_mode"), "{e}");
        let e = err("name = \"web\"\nimage = \"r/web:v1\"\n");
        assert_eq!(e.key, "health", "{e}");

        let k8s =
            "name = \"web\"\nimage = \"r/web:v1\"\nbackend = \"kubernetes\"\n[kubernetes]\ndeployment = \"web-app\"\n";
        match parse(Path::new("k.toml"), k8s) {
            Ok(s) if cfg!(feature = "kubernetes") => {
                let Backend::Kubernetes(k) = s.backend else {
                    panic!("{:?}", s.backend)
                };
                assert_eq!((k.namespace.as_str(), k.deployment.as_str()), ("default", "web-app"));
                assert_eq!(k.on_failure, OnFailure::Rollback);
            }
            Err(e) if !cfg!(feature = "kubernetes") => {
                assert_eq!((e.line, e.key.as_str()), (3, "backend"), "{e}");
                assert!(e.message.contains("--features kubernetes"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn references() {
        assert_eq!(tag_of("127.0.0.1:5000/a/b:v1"), Some("v1"));
        assert_eq!(tag_of("127.0.0.1:5000/a/b"), None);
        assert_eq!(tag_of("b:v1@sha256:00"), Some("v1"));
        assert_eq!(repository_of("127.0.0.1:5000/a/b:v1"), "127.0.0.1:5000/a/b");
        assert_eq!(repository_of("127.0.0.1:5000/a/b"), "127.0.0.1:5000/a/b");
        assert_eq!(repository_of("b:v1@sha256:00"), "b");
    }

    #[test]
    fn prometheus_analysis() {
        let canary = r#"
[router]
upstream = "web"
conf = "/tmp/up.conf"
reload = ["nginx", "-s", "reload"]
access_log = "/tmp/access.log"

[canary]
compare = "relative"
max_latency_ratio = 2.0

[canary.prometheus]
url = "http://127.0.0.1:9090/"
requests = 'sum(increase(http_requests_total{service="{{service}}",digest="{{digest}}"}[{{interval}}]))'
errors = 'sum(increase(http_requests_total{version="{{ version }}",code=~"5.."}[{{interval}}]))'
latency = 'histogram_quantile({{quantile}}, sum by (le) (rate(d_bucket{track="{{track}}"}[{{interval}}])))'
"#;
        let s = parse(Path::new("web.toml"), &format!("{GOOD}{canary}")).unwrap();
        let c = s.canary.unwrap();
        assert_eq!(c.compare, Compare::Relative);
        assert_eq!(c.max_latency_ratio, 2.0);
        assert_eq!(c.latency_floor, Duration::from_millis(100));
        let p = c.prometheus.unwrap();
        assert_eq!(p.url, "http://127.0.0.1:9090");
        let q = render_query(&p.errors, &[("version", "v2".into()), ("interval", "30s".into())]);
        assert_eq!(
            q,
            r#"sum(increase(http_requests_total{version="v2",code=~"5.."}[30s]))"#
        );

        let e = err(&format!("{GOOD}{}", canary.replace("{{track}}", "{{tier}}")));
        assert_eq!(e.key, "canary.prometheus.latency", "{e}");
        assert!(e.message.contains("unknown placeholder {{tier}}"), "{e}");
        let e = err(&format!(
            "{GOOD}{}",
            canary.replace("compare = \"relative\"", "compare = \"sideways\"")
        ));
        assert!(e.message.contains("unknown variant"), "{e}");
        let e = err(&format!("{GOOD}{}", canary.replace("2.0", "0.5")));
        assert_eq!(e.key, "canary.max_latency_ratio", "{e}");
    }
}
