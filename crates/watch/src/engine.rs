//! The container backend behind one trait, and its Docker Engine
//! implementation: Engine API 1.41 over the Unix socket with hyper (no
//! Docker SDK crate: the dozen calls berth makes do not justify one).

use std::collections::BTreeMap;
use std::path::PathBuf;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};

/// Labels berth puts on the containers it runs, and finds them by.
pub const LABEL_SERVICE: &str = "berth.watch.service";
pub const LABEL_DIGEST: &str = "berth.watch.digest";
pub const LABEL_DEPLOYMENT: &str = "berth.watch.deployment";

/// What a rollout needs from a container runtime.
#[async_trait]
pub trait Engine: Send + Sync {
    /// The manifest digest `image` (a tag) names in its registry now.
    async fn resolve_digest(&self, image: &str) -> Result<String, EngineError>;
    /// Pulls `image` (`REPOSITORY@DIGEST`).
    async fn pull(&self, image: &str) -> Result<(), EngineError>;
    /// Creates and starts a container; returns its id.
    async fn run(&self, c: &ContainerConfig) -> Result<String, EngineError>;
    async fn inspect(&self, id: &str) -> Result<ContainerState, EngineError>;
    /// The last lines of the container's output (evidence for a failure).
    async fn logs_tail(&self, id: &str, lines: u32) -> Result<String, EngineError>;
    /// Stops and removes a container (gone already is fine).
    async fn remove(&self, id: &str) -> Result<(), EngineError>;
    /// The containers of `service`, running or not.
    async fn list(&self, service: &str) -> Result<Vec<ContainerSummary>, EngineError>;

    // Swarm services (crates/watch/src/swarm.rs). A backend without them
    // answers that it has none.

    /// The Swarm service `name`, or None if there is none.
    async fn service(&self, name: &str) -> Result<Option<crate::swarm::Service>, EngineError> {
        Err(no_swarm(name))
    }
    /// Creates a Swarm service from its spec; returns its id.
    async fn create_service(&self, spec: &Value) -> Result<String, EngineError> {
        Err(no_swarm(&spec["Name"].to_string()))
    }
    /// Replaces the spec of service `id` at `version` (the version read
    /// with it, so a concurrent change is refused rather than lost).
    async fn update_service(&self, id: &str, version: u64, spec: &Value) -> Result<(), EngineError> {
        let _ = (version, spec);
        Err(no_swarm(id))
    }
    /// Swarm's own rollback of service `id` to its previous spec (the body
    /// is required and ignored).
    async fn rollback_service(&self, id: &str, version: u64, spec: &Value) -> Result<(), EngineError> {
        let _ = (version, spec);
        Err(no_swarm(id))
    }
    async fn remove_service(&self, id: &str) -> Result<(), EngineError> {
        Err(no_swarm(id))
    }
    /// The tasks of service `name`, newest first.
    async fn tasks(&self, name: &str) -> Result<Vec<crate::swarm::Task>, EngineError> {
        Err(no_swarm(name))
    }
}

fn no_swarm(what: &str) -> EngineError {
    EngineError::Protocol {
        what: format!("Swarm service {what}"),
        detail: "this backend has no Swarm services".into(),
    }
}

#[derive(Debug, Clone, Default)]
pub struct ContainerConfig {
    pub name: String,
    pub image: String,
    pub env: Vec<String>,
    pub command: Option<Vec<String>>,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<crate::spec::Port>,
    pub nano_cpus: Option<i64>,
    pub memory: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerState {
    /// created, running, restarting, exited, dead, ...
    pub status: String,
    pub running: bool,
    pub restarting: bool,
    pub exit_code: i64,
    pub oom_killed: bool,
    pub error: String,
    pub restart_count: i64,
    /// Container port -> host port on 127.0.0.1.
    pub ports: BTreeMap<u16, u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSummary {
    pub id: String,
    pub name: String,
    pub digest: String,
    pub deployment: String,
    pub state: String,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "cannot reach the Docker Engine at {socket}: {source}; is dockerd running, and may this user use its socket?"
    )]
    Connect { socket: String, source: std::io::Error },
    #[error("the Docker Engine answered {status} to {what}: {message}")]
    Api { status: u16, what: String, message: String },
    #[error("talking to the Docker Engine ({what}): {detail}")]
    Protocol { what: String, detail: String },
}

impl EngineError {
    /// The Engine's own words, for classification and evidence.
    pub fn message(&self) -> String {
        match self {
            EngineError::Api { message, .. } => message.clone(),
            e => e.to_string(),
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            EngineError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The Docker Engine at a Unix socket.
pub struct Docker {
    socket: PathBuf,
}

/// A pull's progress stream is small; anything larger is not an answer.
const MAX_BODY: usize = 16 << 20;

impl Docker {
    /// `DOCKER_HOST=unix://PATH` if set, else /var/run/docker.sock.
    pub fn from_env() -> Docker {
        let socket = std::env::var("DOCKER_HOST")
            .ok()
            .and_then(|h| h.strip_prefix("unix://").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/var/run/docker.sock"));
        Docker { socket }
    }

    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        what: &str,
    ) -> Result<(u16, Bytes), EngineError> {
        let proto = |detail: String| EngineError::Protocol {
            what: what.to_string(),
            detail,
        };
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| EngineError::Connect {
                socket: self.socket.display().to_string(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| proto(e.to_string()))?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(format!("/v1.41{path}"))
            .header(http::header::HOST, "docker");
        let body = match body {
            Some(v) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(body)).map_err(|e| proto(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| proto(e.to_string()))?;
        let status = resp.status().as_u16();
        let bytes = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| proto(e.to_string()))?
            .to_bytes();
        if status >= 400 {
            let message = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_string());
            return Err(EngineError::Api {
                status,
                what: what.to_string(),
                message,
            });
        }
        Ok((status, bytes))
    }

    pub(crate) async fn json<T: for<'de> Deserialize<'de>>(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        what: &str,
    ) -> Result<T, EngineError> {
        let (_, bytes) = self.call(method, path, body, what).await?;
        serde_json::from_slice(&bytes).map_err(|e| EngineError::Protocol {
            what: what.to_string(),
            detail: format!("unexpected answer: {e}"),
        })
    }
}

pub(crate) fn query(pairs: &[(&str, &str)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        q.append_pair(k, v);
    }
    q.finish()
}

#[derive(Deserialize)]
struct Distribution {
    #[serde(rename = "Descriptor")]
    descriptor: DistDescriptor,
}

#[derive(Deserialize)]
struct DistDescriptor {
    digest: String,
}

#[derive(Deserialize)]
struct Inspect {
    #[serde(rename = "State")]
    state: InspectState,
    #[serde(rename = "RestartCount", default)]
    restart_count: i64,
    #[serde(rename = "NetworkSettings")]
    network: Option<InspectNetwork>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectState {
    status: String,
    running: bool,
    restarting: bool,
    #[serde(rename = "OOMKilled", default)]
    oom_killed: bool,
    #[serde(default)]
    exit_code: i64,
    #[serde(default)]
    error: String,
}

#[derive(Deserialize)]
struct InspectNetwork {
    #[serde(rename = "Ports", default)]
    ports: Option<BTreeMap<String, Option<Vec<HostBinding>>>>,
}

#[derive(Deserialize)]
struct HostBinding {
    #[serde(rename = "HostPort")]
    host_port: String,
}

#[derive(Deserialize)]
struct Listed {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Names", default)]
    names: Vec<String>,
    #[serde(rename = "Labels", default)]
    labels: BTreeMap<String, String>,
    #[serde(rename = "State", default)]
    state: String,
}

#[async_trait]
impl Engine for Docker {
    async fn resolve_digest(&self, image: &str) -> Result<String, EngineError> {
        let d: Distribution = self
            .json(
                Method::GET,
                &format!("/distribution/{image}/json"),
                None,
                "resolve the tag",
            )
            .await?;
        Ok(d.descriptor.digest)
    }

    async fn pull(&self, image: &str) -> Result<(), EngineError> {
        let (_, body) = self
            .call(
                Method::POST,
                &format!("/images/create?{}", query(&[("fromImage", image)])),
                None,
                "pull",
            )
            .await?;
        // A pull that fails part-way still answers 200; the error is a
        // line of the progress stream.
        for line in body.split(|&b| b == b'\n') {
            if let Ok(v) = serde_json::from_slice::<Value>(line) {
                if let Some(e) = v.get("error").and_then(Value::as_str) {
                    return Err(EngineError::Api {
                        status: 500,
                        what: "pull".into(),
                        message: e.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    async fn run(&self, c: &ContainerConfig) -> Result<String, EngineError> {
        let mut exposed = serde_json::Map::new();
        let mut bindings = serde_json::Map::new();
        for p in &c.ports {
            let key = format!("{}/tcp", p.container);
            exposed.insert(key.clone(), json!({}));
            let host = p.host.map(|h| h.to_string()).unwrap_or_default();
            bindings.insert(key, json!([{"HostIp": "127.0.0.1", "HostPort": host}]));
        }
        let mut host_config = json!({"PortBindings": bindings});
        if let Some(n) = c.nano_cpus {
            host_config["NanoCpus"] = json!(n);
        }
        if let Some(m) = c.memory {
            host_config["Memory"] = json!(m);
        }
        let mut body = json!({
            "Image": c.image,
            "Env": c.env,
            "Labels": c.labels,
            "ExposedPorts": exposed,
            "HostConfig": host_config,
        });
        if let Some(cmd) = &c.command {
            body["Cmd"] = json!(cmd);
        }
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "Id")]
            id: String,
        }
        let created: Created = self
            .json(
                Method::POST,
                &format!("/containers/create?{}", query(&[("name", &c.name)])),
                Some(body),
                "create the container",
            )
            .await?;
        if let Err(e) = self
            .call(
                Method::POST,
                &format!("/containers/{}/start", created.id),
                None,
                "start the container",
            )
            .await
        {
            // No half-made state: a container that did not start is removed.
            let _ = self.remove(&created.id).await;
            return Err(e);
        }
        Ok(created.id)
    }

    async fn inspect(&self, id: &str) -> Result<ContainerState, EngineError> {
        let i: Inspect = self
            .json(
                Method::GET,
                &format!("/containers/{id}/json"),
                None,
                "inspect the container",
            )
            .await?;
        let mut ports = BTreeMap::new();
        for (k, v) in i.network.and_then(|n| n.ports).unwrap_or_default() {
            let Some(container) = k.split('/').next().and_then(|p| p.parse().ok()) else {
                continue;
            };
            if let Some(host) = v.unwrap_or_default().iter().find_map(|b| b.host_port.parse().ok()) {
                ports.insert(container, host);
            }
        }
        Ok(ContainerState {
            status: i.state.status,
            running: i.state.running,
            restarting: i.state.restarting,
            exit_code: i.state.exit_code,
            oom_killed: i.state.oom_killed,
            error: i.state.error,
            restart_count: i.restart_count,
            ports,
        })
    }

    async fn logs_tail(&self, id: &str, lines: u32) -> Result<String, EngineError> {
        let (_, body) = self
            .call(
                Method::GET,
                &format!("/containers/{id}/logs?stdout=1&stderr=1&tail={lines}"),
                None,
                "read the container's logs",
            )
            .await?;
        Ok(demux(&body))
    }

    async fn remove(&self, id: &str) -> Result<(), EngineError> {
        match self
            .call(
                Method::DELETE,
                &format!("/containers/{id}?force=1"),
                None,
                "remove the container",
            )
            .await
        {
            Err(e) if e.status() == Some(404) => Ok(()),
            r => r.map(|_| ()),
        }
    }

    async fn list(&self, service: &str) -> Result<Vec<ContainerSummary>, EngineError> {
        let filters = json!({"label": [format!("{LABEL_SERVICE}={service}")]}).to_string();
        let listed: Vec<Listed> = self
            .json(
                Method::GET,
                &format!("/containers/json?{}", query(&[("all", "1"), ("filters", &filters)])),
                None,
                "list containers",
            )
            .await?;
        Ok(listed
            .into_iter()
            .map(|l| ContainerSummary {
                name: l
                    .names
                    .first()
                    .map(|n| n.trim_start_matches('/').to_string())
                    .unwrap_or_default(),
                digest: l.labels.get(LABEL_DIGEST).cloned().unwrap_or_default(),
                deployment: l.labels.get(LABEL_DEPLOYMENT).cloned().unwrap_or_default(),
                id: l.id,
                state: l.state,
            })
            .collect())
    }

    async fn service(&self, name: &str) -> Result<Option<crate::swarm::Service>, EngineError> {
        crate::swarm::api::service(self, name).await
    }

    async fn create_service(&self, spec: &Value) -> Result<String, EngineError> {
        crate::swarm::api::create(self, spec).await
    }

    async fn update_service(&self, id: &str, version: u64, spec: &Value) -> Result<(), EngineError> {
        crate::swarm::api::update(self, id, version, spec).await
    }

    async fn rollback_service(&self, id: &str, version: u64, spec: &Value) -> Result<(), EngineError> {
        crate::swarm::api::rollback(self, id, version, spec).await
    }

    async fn remove_service(&self, id: &str) -> Result<(), EngineError> {
        crate::swarm::api::remove(self, id).await
    }

    async fn tasks(&self, name: &str) -> Result<Vec<crate::swarm::Task>, EngineError> {
        crate::swarm::api::tasks(self, name).await
    }
}

/// The log stream of a container without a TTY: frames of an 8-byte header
/// (stream, 0, 0, 0, big-endian length) and the bytes.
fn demux(mut b: &[u8]) -> String {
    let mut out = Vec::new();
    while b.len() >= 8 {
        let n = u32::from_be_bytes([b[4], b[5], b[6], b[7]]) as usize;
        let end = (8 + n).min(b.len());
        out.extend_from_slice(&b[8..end]);
        b = &b[end..];
    }
    String::from_utf8_lossy(&out).trim_end().to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn demux_frames() {
        let mut b = vec![1, 0, 0, 0, 0, 0, 0, 3];
        b.extend_from_slice(b"ab\n");
        b.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 2]);
        b.extend_from_slice(b"c\n");
        assert_eq!(super::demux(&b), "ab\nc");
    }
}
