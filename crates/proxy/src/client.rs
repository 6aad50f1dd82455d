//! The HTTP client of one upstream registry: the Distribution API calls the
//! cache needs, the upstream's auth (a Docker token flow or Basic, with
//! tokens cached until they expire), and the limits on what we ask of it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use oci::Digest;
use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};

use crate::limit::{Limiter, Permit, Refused};
use crate::Upstream;

/// The manifest types berth stores, in the order we prefer them: an index
/// first, so a multi-platform tag stays multi-platform.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// Why an upstream request failed. `kind` is the metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("refused our credentials ({0}); check username and password of this upstream")]
    Auth(String),
    #[error("sent content whose digest is {actual}, not {expected}")]
    Digest { expected: String, actual: String },
    #[error("broke off the transfer: {0}")]
    Body(String),
    #[error("sent a manifest larger than {0} bytes")]
    TooLarge(usize),
    #[error("has {0} requests waiting already; retry later")]
    QueueFull(usize),
    #[error("did not get a free slot within {0:?} (rate or concurrency limit); retry later")]
    QueueTimeout(Duration),
}

impl UpstreamError {
    /// The `kind` label of `berth_proxy_upstream_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "connect",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::Status { status: 404, .. } => "not_found",
            UpstreamError::Status { status: 429, .. } => "rate_limited",
            UpstreamError::Status { status: 500.., .. } => "server_error",
            UpstreamError::Status { .. } => "client_error",
            UpstreamError::Auth(_) => "auth",
            UpstreamError::Digest { .. } => "digest",
            UpstreamError::Body(_) => "body",
            UpstreamError::TooLarge(_) => "too_large",
            UpstreamError::QueueFull(_) | UpstreamError::QueueTimeout(_) => "limited",
        }
    }

    /// The upstream cannot answer now (down, slow, overloaded, or our own
    /// limit): a cached copy may be served instead.
    pub fn is_unavailable(&self) -> bool {
        match self {
            UpstreamError::Status { status, .. } => *status == 429 || *status >= 500,
            UpstreamError::Connect(_)
            | UpstreamError::Timeout(_)
            | UpstreamError::Body(_)
            | UpstreamError::QueueFull(_)
            | UpstreamError::QueueTimeout(_) => true,
            UpstreamError::Auth(_) | UpstreamError::Digest { .. } | UpstreamError::TooLarge(_) => false,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, UpstreamError::Status { status: 404, .. })
    }

    fn from_reqwest(e: reqwest::Error) -> UpstreamError {
        if e.is_timeout() {
            UpstreamError::Timeout(e.to_string())
        } else if e.is_connect() {
            UpstreamError::Connect(e.to_string())
        } else if e.is_body() || e.is_decode() {
            UpstreamError::Body(e.to_string())
        } else {
            UpstreamError::Connect(e.to_string())
        }
    }
}

type Result<T, E = UpstreamError> = std::result::Result<T, E>;

/// What a manifest HEAD or GET told us.
#[derive(Debug, Clone)]
pub struct ManifestHead {
    /// `Docker-Content-Digest`, when the upstream sends it.
    pub digest: Option<Digest>,
    pub media_type: Option<String>,
}

pub struct Client {
    up: Upstream,
    http: reqwest::Client,
    limiter: Limiter,
    /// Bearer tokens by scope, with when they stop being good.
    tokens: Mutex<HashMap<String, (String, Instant)>>,
    /// The upstream asked for Basic once: send it up front from then on.
    wants_basic: AtomicBool,
    /// When the upstream stopped answering (no connection, no response
    /// head in time, or a 5xx), until it answers again: what a refused
    /// client and `berth diagnose` are told as "since when".
    down_since: Mutex<Option<SystemTime>>,
}

impl Client {
    pub fn new(up: &Upstream) -> std::result::Result<Client, String> {
        let mut b = reqwest::Client::builder()
            .connect_timeout(up.timeout)
            .read_timeout(up.timeout)
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION"), " (pull-through cache)"));
        if let Some(pem) = &up.ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| format!("upstream {:?}: ca_file is not PEM certificates: {e}", up.name))?
            {
                b = b.add_root_certificate(cert);
            }
        }
        let http = b
            .build()
            .map_err(|e| format!("upstream {:?}: cannot build an HTTP client: {e}", up.name))?;
        Ok(Client {
            limiter: Limiter::new(up.rate, up.concurrency, up.queue, up.queue_timeout),
            up: up.clone(),
            http,
            tokens: Mutex::new(HashMap::new()),
            wants_basic: AtomicBool::new(false),
            down_since: Mutex::new(None),
        })
    }

    pub fn upstream(&self) -> &Upstream {
        &self.up
    }

    /// Since when the upstream has not answered, if it is not answering.
    pub fn down_since(&self) -> Option<SystemTime> {
        *self.down_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records whether the upstream answered: `answered` is a response
    /// head below 500. The first failure of a run sets the time; an answer
    /// clears it.
    fn reached(&self, answered: bool) {
        let mut since = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        match (answered, since.is_some()) {
            (true, true) => *since = None,
            (false, false) => *since = Some(SystemTime::now()),
            _ => {}
        }
    }

    /// Whether the upstream answers `/v2/` (any status below 500: a 401 is
    /// an upstream that is up). Outside the limits: it pulls nothing.
    pub async fn ping(&self) -> std::result::Result<(), String> {
        let url = format!("{}/v2/", self.up.url);
        let result = match tokio::time::timeout(self.up.timeout, self.http.get(&url).send()).await {
            Err(_) => Err(format!("{url} did not answer within {:?}", self.up.timeout)),
            Ok(Err(e)) => Err(format!("{url}: {}", UpstreamError::from_reqwest(e))),
            Ok(Ok(r)) if r.status().is_server_error() => Err(format!("{url} answered {}", r.status())),
            Ok(Ok(_)) => Ok(()),
        };
        self.reached(result.is_ok());
        result
    }

    /// HEAD of a manifest: its digest without its bytes, which spares the
    /// upstream's pull rate limits (Docker Hub counts GETs only).
    pub async fn head_manifest(&self, repo: &str, reference: &str) -> Result<ManifestHead> {
        let (resp, _permit) = self
            .send(
                Method::HEAD,
                repo,
                &format!("manifests/{reference}"),
                Some(MANIFEST_ACCEPT),
            )
            .await?;
        Ok(manifest_head(resp.headers()))
    }

    /// GET of a manifest, at most `max` bytes.
    pub async fn get_manifest(&self, repo: &str, reference: &str, max: usize) -> Result<(ManifestHead, Bytes)> {
        let (resp, _permit) = self
            .send(
                Method::GET,
                repo,
                &format!("manifests/{reference}"),
                Some(MANIFEST_ACCEPT),
            )
            .await?;
        let head = manifest_head(resp.headers());
        if resp.content_length().is_some_and(|n| n > max as u64) {
            return Err(UpstreamError::TooLarge(max));
        }
        let body = read_limited(resp, max).await?;
        Ok((head, body))
    }

    /// HEAD of a blob: its size.
    pub async fn head_blob(&self, repo: &str, digest: &Digest) -> Result<Option<u64>> {
        let (resp, _permit) = self.send(Method::HEAD, repo, &format!("blobs/{digest}"), None).await?;
        Ok(resp.content_length())
    }

    /// GET of a blob. The permit counts the download against the
    /// concurrency limit until it is dropped.
    pub async fn get_blob(&self, repo: &str, digest: &Digest) -> Result<(Response, Permit)> {
        self.send(Method::GET, repo, &format!("blobs/{digest}"), None).await
    }

    /// One request under the limits, with the upstream's auth. A 401 is
    /// answered once: by a token for the challenge's scope, or Basic.
    async fn send(&self, method: Method, repo: &str, rest: &str, accept: Option<&str>) -> Result<(Response, Permit)> {
        let permit = self.limiter.acquire().await.map_err(|r| match r {
            Refused::QueueFull => UpstreamError::QueueFull(self.up.queue),
            Refused::QueueTimeout => UpstreamError::QueueTimeout(self.up.queue_timeout),
        })?;
        let url = format!("{}/v2/{repo}/{rest}", self.up.url);
        let scope = format!("repository:{repo}:pull");
        let auth = self.cached_token(&scope);
        let resp = self.request(method.clone(), &url, accept, auth.as_deref()).await?;
        let resp = if resp.status() == StatusCode::UNAUTHORIZED {
            let header = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let challenges = oci::challenge::parse(&header);
            // A token when offered (the realm must be a URL), else Basic.
            let bearer = challenges.iter().find(|c| c.is("bearer")).and_then(|c| {
                let realm = c
                    .param("realm")
                    .filter(|r| r.starts_with("https://") || r.starts_with("http://"))?;
                Some((
                    realm.to_string(),
                    c.param("service").map(str::to_string),
                    c.param("scope").map(str::to_string),
                ))
            });
            let auth = match bearer {
                Some((realm, service, want)) => self.fetch_token(&realm, service, want, &scope).await?,
                None if challenges.iter().any(|c| c.is("basic")) => {
                    self.wants_basic.store(true, Ordering::Relaxed);
                    self.basic()
                        .ok_or_else(|| UpstreamError::Auth("it asks for Basic auth and none is configured".into()))?
                }
                None => {
                    return Err(UpstreamError::Auth(format!(
                        "401 with a challenge berth cannot answer: {header:?}"
                    )))
                }
            };
            let resp = self.request(method, &url, accept, Some(&auth)).await?;
            if resp.status() == StatusCode::UNAUTHORIZED {
                return Err(UpstreamError::Auth("401 after authenticating".into()));
            }
            resp
        } else {
            resp
        };
        if resp.status().is_success() {
            Ok((resp, permit))
        } else {
            Err(status_error(resp).await)
        }
    }

    async fn request(&self, method: Method, url: &str, accept: Option<&str>, auth: Option<&str>) -> Result<Response> {
        let mut req = self.http.request(method, url);
        if let Some(a) = accept {
            req = req.header(ACCEPT, a);
        }
        if let Some(a) = auth {
            req = req.header(AUTHORIZATION, a);
        }
        req = traced(req);
        // The response head must come within the timeout; a body then only
        // has to keep moving (the client's read timeout).
        let result = match tokio::time::timeout(self.up.timeout, req.send()).await {
            Err(_) => Err(UpstreamError::Timeout(format!(
                "no response within {:?} from {url}",
                self.up.timeout
            ))),
            Ok(r) => r.map_err(UpstreamError::from_reqwest),
        };
        self.reached(result.as_ref().is_ok_and(|r| !r.status().is_server_error()));
        result
    }

    fn basic(&self) -> Option<String> {
        use base64::Engine;
        let (u, p) = self.up.credentials.as_ref()?;
        Some(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        ))
    }

    fn cached_token(&self, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        match tokens.get(scope) {
            Some((t, until)) if *until > Instant::now() => Some(format!("Bearer {t}")),
            // Credentials go only where the upstream asked for them.
            _ if self.wants_basic.load(Ordering::Relaxed) => self.basic(),
            _ => None,
        }
    }

    /// The Docker token flow: GET the realm with `service` and `scope`,
    /// with our credentials if we have any (anonymous otherwise).
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<String>,
        want: Option<String>,
        scope: &str,
    ) -> Result<String> {
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let mut query: Vec<(&str, &str)> = vec![("scope", want.as_deref().unwrap_or(scope))];
        if let Some(service) = &service {
            query.push(("service", service));
        }
        let mut req = traced(self.http.get(realm).query(&query));
        if let Some(b) = self.basic() {
            req = req.header(AUTHORIZATION, b);
        }
        let resp = match tokio::time::timeout(self.up.timeout, req.send()).await {
            Err(_) => return Err(UpstreamError::Timeout(format!("token service {realm} did not answer"))),
            Ok(r) => r.map_err(UpstreamError::from_reqwest)?,
        };
        if resp.status() == StatusCode::UNAUTHORIZED || resp.status() == StatusCode::FORBIDDEN {
            return Err(UpstreamError::Auth(format!(
                "token service {realm} answered {}",
                resp.status()
            )));
        }
        if !resp.status().is_success() {
            return Err(status_error(resp).await);
        }
        let body = read_limited(resp, 64 * 1024).await?;
        let t: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| UpstreamError::Auth(format!("token service {realm} sent no token: {e}")))?;
        let token = t
            .token
            .or(t.access_token)
            .ok_or_else(|| UpstreamError::Auth(format!("token service {realm} sent no token")))?;
        // Docker's token spec: 60 s when unsaid. Renew a little early.
        let life = Duration::from_secs(t.expires_in.unwrap_or(60)).saturating_sub(Duration::from_secs(5));
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(scope.to_string(), (token.clone(), Instant::now() + life));
        Ok(format!("Bearer {token}"))
    }
}

fn manifest_head(h: &HeaderMap) -> ManifestHead {
    let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    ManifestHead {
        digest: text("docker-content-digest").and_then(|d| d.parse().ok()),
        media_type: text(CONTENT_TYPE.as_str()).map(|t| t.split(';').next().unwrap_or("").trim().to_string()),
    }
}

/// Reads a response body, refusing more than `max` bytes.
async fn read_limited(mut resp: Response, max: usize) -> Result<Bytes> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(UpstreamError::from_reqwest)? {
        if out.len() + chunk.len() > max {
            return Err(UpstreamError::TooLarge(max));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(out))
}

/// An error status, with the upstream's own error message when it sent the
/// spec's JSON error body.
async fn status_error(resp: Response) -> UpstreamError {
    let status = resp.status().as_u16();
    let body = read_limited(resp, 16 * 1024).await.unwrap_or_default();
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            let e = v.get("errors")?.get(0)?;
            let code = e.get("code")?.as_str()?.to_string();
            let msg = e.get("message").and_then(|m| m.as_str()).unwrap_or("");
            Some(format!("{code} {msg}").trim().to_string())
        })
        .unwrap_or_else(|| {
            StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("")
                .to_string()
        });
    UpstreamError::Status { status, message }
}

/// The request, carrying the W3C trace of the client request it serves.
fn traced(req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    match observe::TraceContext::current() {
        Some(t) => req.header("traceparent", t.header()),
        None => req,
    }
}
