//! Failure classes, and how the Engine's errors map onto them. Every
//! failed deployment carries exactly one classified failure with its
//! evidence (the Engine's words, the container's state and output).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::engine::EngineError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The deployment description is not valid.
    Config,
    /// The registry does not have the tag (or digest).
    TagNotFound,
    /// The registry cannot be reached (DNS, TCP, TLS).
    RegistryUnreachable,
    /// The registry refused the credentials or the permission.
    PullDenied,
    /// The registry refused for lack of quota or space.
    QuotaExceeded,
    /// Any other pull failure.
    PullFailed,
    /// A fixed host port is taken.
    PortConflict,
    /// CPU or memory asked for cannot be given.
    Resources,
    /// The Engine refused the container's configuration.
    ContainerConfig,
    /// No node can take the instance (Kubernetes `Unschedulable`, Swarm's
    /// "no suitable node").
    Unschedulable,
    /// The container exited during the start.
    Exited,
    /// The container keeps restarting.
    Restarting,
    /// Not Running and healthy within the start timeout.
    StartTimeout,
    /// Its health endpoint failed the threshold of consecutive checks.
    Unhealthy,
    /// Healthy, but from another version than the one deployed.
    WrongVersion,
    /// The canary's error rate was above the threshold in a window.
    CanaryErrors,
    /// The canary's latency percentile was above the threshold.
    CanaryLatency,
    /// The canary had too little traffic to judge, for too long.
    CanaryInconclusive,
    /// nginx could not be given the new upstream.
    Router,
    /// The berth process running the deployment died part-way (killed,
    /// host restarted); a later berth process reconciled it.
    Interrupted,
    /// The Engine failed in a way berth does not classify.
    Engine,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Config => "config",
            Cause::TagNotFound => "tag_not_found",
            Cause::RegistryUnreachable => "registry_unreachable",
            Cause::PullDenied => "pull_denied",
            Cause::QuotaExceeded => "quota_exceeded",
            Cause::PullFailed => "pull_failed",
            Cause::PortConflict => "port_conflict",
            Cause::Resources => "resources",
            Cause::ContainerConfig => "container_config",
            Cause::Unschedulable => "unschedulable",
            Cause::Exited => "exited",
            Cause::Restarting => "restarting",
            Cause::StartTimeout => "start_timeout",
            Cause::Unhealthy => "unhealthy",
            Cause::WrongVersion => "wrong_version",
            Cause::CanaryErrors => "canary_errors",
            Cause::CanaryLatency => "canary_latency",
            Cause::CanaryInconclusive => "canary_inconclusive",
            Cause::Router => "router",
            Cause::Interrupted => "interrupted",
            Cause::Engine => "engine",
        }
    }

    pub fn is_pull(self) -> bool {
        matches!(
            self,
            Cause::TagNotFound
                | Cause::RegistryUnreachable
                | Cause::PullDenied
                | Cause::QuotaExceeded
                | Cause::PullFailed
        )
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One classified failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub cause: Cause,
    /// What was observed, in the Engine's or the instance's own words.
    pub evidence: String,
    /// Why, when a diagnosis found it (pull failures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_cause: Option<String>,
    /// What to do about it.
    pub fix: String,
}

impl Failure {
    pub fn new(cause: Cause, evidence: impl Into<String>) -> Failure {
        Failure {
            cause,
            evidence: evidence.into(),
            root_cause: None,
            fix: default_fix(cause).to_string(),
        }
    }
}

fn default_fix(c: Cause) -> &'static str {
    match c {
        Cause::Config => "correct the deployment description at the line named",
        Cause::TagNotFound => "push the tag, or deploy a tag that exists (list them with GET /v2/REPOSITORY/tags/list)",
        Cause::RegistryUnreachable => "check that the registry runs and that this host reaches it (DNS, firewall, TLS)",
        Cause::PullDenied => "give the Engine credentials with pull permission on the repository (docker login)",
        Cause::QuotaExceeded => "free space in the project or raise its quota",
        Cause::PullFailed => "run `berth diagnose IMAGE` for the whole pull path",
        Cause::PortConflict => "free the host port, or choose another in `ports`",
        Cause::Resources => "lower `cpus`/`memory` in the description, or free capacity on the host",
        Cause::ContainerConfig => "correct the container settings (`command`, `env`, `ports`) in the description",
        Cause::Unschedulable => "no node has the CPU, memory or placement asked for: lower the requests, or add capacity",
        Cause::Exited => "read the container's output in the evidence; fix the image or its settings",
        Cause::Restarting => "read the container's output in the evidence; it crashes on start",
        Cause::StartTimeout => "the instance did not become Running and healthy in time; check its start and health endpoint, or raise `rollout.start_timeout`",
        Cause::Unhealthy => "the health endpoint failed; read the evidence and the instance's logs",
        Cause::WrongVersion => "the image does not report the version deployed; rebuild it with the right version, or set `version`",
        Cause::CanaryErrors => "the new version answers errors under real traffic; read its logs before deploying it again",
        Cause::CanaryLatency => "the new version is slow under real traffic; profile it before deploying it again",
        Cause::CanaryInconclusive => "the canary got too little traffic to judge; deploy when there is traffic, or lower `canary.min_requests`",
        Cause::Router => "check the [router] settings: nginx must include the upstream file and accept the reload command",
        Cause::Interrupted => "nothing to fix in the image: deploy it again; the timeline says where the process died",
        Cause::Engine => "read the Engine's message in the evidence",
    }
}

/// Classifies a failure to resolve or pull an image, from the Engine's
/// status and message (the Engine passes on the registry's error codes).
pub fn classify_pull(e: &EngineError) -> Cause {
    if matches!(e, EngineError::Connect { .. }) {
        return Cause::Engine;
    }
    classify_pull_message(&e.message(), e.status())
}

/// Classifies a pull failure from its message (the Engine's, a Swarm
/// task's, a kubelet's event) and the HTTP status if there was one.
pub fn classify_pull_message(message: &str, status: Option<u16>) -> Cause {
    let m = message.to_ascii_lowercase();
    if m.contains("manifest unknown") || m.contains("not found") || status == Some(404) {
        Cause::TagNotFound
    } else if m.contains("quota") || m.contains("denied: storage") || m.contains("insufficient storage") {
        Cause::QuotaExceeded
    } else if m.contains("unauthorized")
        || m.contains("denied")
        || m.contains("authentication required")
        || status == Some(401)
        || status == Some(403)
    {
        Cause::PullDenied
    } else if m.contains("connection refused")
        || m.contains("no such host")
        || m.contains("i/o timeout")
        || m.contains("timeout exceeded")
        || m.contains("tls:")
        || m.contains("dial tcp")
        || m.contains("network is unreachable")
    {
        Cause::RegistryUnreachable
    } else {
        Cause::PullFailed
    }
}

/// Classifies a refusal to create or start a container.
pub fn classify_start(e: &EngineError) -> Cause {
    let m = e.message().to_ascii_lowercase();
    if m.contains("port is already allocated") || m.contains("address already in use") || m.contains("bind for") {
        Cause::PortConflict
    } else if m.contains("range of cpus")
        || m.contains("memory limit")
        || m.contains("cannot allocate memory")
        || m.contains("insufficient")
        || m.contains("no space left")
        || m.contains("nanocpus")
    {
        Cause::Resources
    } else if e.status() == Some(400) || m.contains("invalid") || m.contains("executable file not found") {
        Cause::ContainerConfig
    } else {
        Cause::Engine
    }
}

/// A diagnosis of a pull failure: why, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnosis {
    pub root_cause: String,
    pub fix: String,
}

/// Walks the pull path after a pull failure (`berth diagnose` is wired in
/// here by the binary); the result goes into the event and the alert.
#[async_trait]
pub trait PullDiagnoser: Send + Sync {
    async fn diagnose(&self, image: &str, failure: &Failure) -> Option<Diagnosis>;
}

/// The diagnosis the Engine's error alone supports: the class's cause and
/// fix, in the guide's order (registry reachable, tag exists, quota).
pub struct FromEngineError;

#[async_trait]
impl PullDiagnoser for FromEngineError {
    async fn diagnose(&self, image: &str, failure: &Failure) -> Option<Diagnosis> {
        let registry = image.split('/').next().unwrap_or(image);
        let root_cause = match failure.cause {
            Cause::RegistryUnreachable => format!("registry {registry} is not reachable from the Docker Engine"),
            Cause::TagNotFound => format!("registry {registry} is reachable, but it has no manifest for {image}"),
            Cause::PullDenied => format!("registry {registry} refused the Engine's credentials for {image}"),
            Cause::QuotaExceeded => format!("registry {registry} refused {image} for lack of quota or space"),
            Cause::PullFailed => format!("pulling {image} failed: {}", failure.evidence),
            _ => return None,
        };
        Some(Diagnosis {
            root_cause,
            fix: default_fix(failure.cause).to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, message: &str) -> EngineError {
        EngineError::Api {
            status,
            what: "test".into(),
            message: message.into(),
        }
    }

    /// The messages are the Engine's (20.10) own, captured on this machine.
    #[test]
    fn engine_messages() {
        assert_eq!(
            classify_pull(&api(404, "manifest unknown: manifest unknown")),
            Cause::TagNotFound
        );
        assert_eq!(
            classify_pull(&api(
                500,
                "Get \"http://127.0.0.1:35199/v2/\": dial tcp 127.0.0.1:35199: connect: connection refused"
            )),
            Cause::RegistryUnreachable
        );
        assert_eq!(
            classify_pull(&api(500, "unauthorized: authentication required")),
            Cause::PullDenied
        );
        assert_eq!(
            classify_start(&api(
                400,
                "Range of CPUs is from 0.01 to 2.00, as there are only 2 CPUs available"
            )),
            Cause::Resources
        );
        assert_eq!(
            classify_start(&api(400, "Minimum memory limit allowed is 6MB")),
            Cause::Resources
        );
        assert_eq!(
            classify_start(&api(500, "driver failed programming external connectivity on endpoint x: Bind for 127.0.0.1:8080 failed: port is already allocated")),
            Cause::PortConflict
        );
    }
}
