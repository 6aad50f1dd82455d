//! Steps 4 to 10 over HTTP: the challenge, credentials, the repository and
//! tag, the manifest, the platform, the blobs, and the registry's own
//! refusals. Only GET and HEAD; credentials go only to the registry (Basic)
//! or to the realm it named (Bearer).

use std::time::Instant;

use base64::Engine;
use oci::{Digest, Manifest, Reference};
use reqwest::{header, Response, StatusCode};

use crate::image::Image;
use crate::report::{Category, Report};
use crate::tls::Conn;
use crate::Options;

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// The first error of an OCI error body: (code, message).
async fn error_of(resp: Response) -> (String, String) {
    let v: serde_json::Value = resp.json().await.unwrap_or_default();
    let e = &v["errors"][0];
    (
        e["code"].as_str().unwrap_or("").to_string(),
        e["message"].as_str().unwrap_or("").to_string(),
    )
}

/// A refusal by the registry itself (rate limit, upstream down, quota):
/// step 10 fails with the server's reason.
async fn refusal(r: &mut Report, t: Instant, what: &str, resp: Response) {
    let status = resp.status();
    let retry = resp
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (code, msg) = error_of(resp).await;
    // berth's answer to repeated wrong passwords: a lockout of this
    // account from this address, not a rate limit of the registry.
    if status == StatusCode::TOO_MANY_REQUESTS && msg.contains("failed logins") {
        let when = retry
            .map(|s| format!("Retry-After {s} s"))
            .unwrap_or_else(|| "no Retry-After given".into());
        r.fail(
            "credentials",
            Category::Auth,
            t,
            format!("{status} {code} {msg}"),
            format!("{what}: the account is locked out after too many failed logins from this address ({status} {code}: {msg}); {when}"),
            "fix the password where the failures come from (a stale imagePullSecret or CI secret retries it), wait for the lockout to end, then retry once; other addresses are not locked out".into(),
        );
        return;
    }
    let (cause, fix) = if status == StatusCode::TOO_MANY_REQUESTS {
        let when = retry
            .map(|s| format!("retry after {s} s"))
            .unwrap_or_else(|| "no Retry-After given".into());
        (
            format!("{what}: the registry is rate limiting (429 {code}: {msg}); {when}"),
            "wait and retry (kubelet's back-off does); lower the pull rate (pull once per node, use a mirror), or raise the registry's limit".into(),
        )
    } else if msg.contains("upstream") {
        (
            format!("{what}: the registry's pull-through cache cannot reach its upstream ({status} {code}: {msg})"),
            "check the upstream named in the message (its URL, credentials, network path from the registry); cached images still pull".into(),
        )
    } else {
        (
            format!("{what}: the registry failed ({status} {code}: {msg})"),
            "read the registry's log for this request; check its storage and /readyz".into(),
        )
    };
    r.fail(
        "registry refusals",
        Category::Refused,
        t,
        format!("{status} {code} {msg}"),
        cause,
        fix,
    );
}

/// Classifies a DENIED body: the registry's own policy (quota, disk,
/// immutability) versus a permission.
fn is_policy(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    ["quota", "watermark", "disk", "immutable", "signature"]
        .iter()
        .any(|w| m.contains(w))
}

/// Nearest tags by edit distance (ties: later in the list, i.e. newer
/// when the registry lists in push order).
pub fn nearest(tag: &str, tags: &[String]) -> Vec<String> {
    let mut scored: Vec<(usize, usize, &String)> = tags
        .iter()
        .enumerate()
        .map(|(i, t)| (strsim::levenshtein(tag, t), usize::MAX - i, t))
        .collect();
    scored.sort();
    scored.into_iter().take(3).map(|(_, _, t)| t.clone()).collect()
}

/// The `access` claim of a JWT bearer token (Docker's token spec), when
/// the token is one; opaque tokens say nothing about their grants.
fn jwt_access(token: &str) -> Option<serde_json::Value> {
    let payload = token.split('.').nth(1)?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&raw).ok()?;
    v.get("access").cloned()
}

/// Whether an `access` claim grants `action` on repository `repo`.
fn grants(access: &serde_json::Value, repo: &str, action: &str) -> bool {
    access.as_array().is_some_and(|a| {
        a.iter().any(|e| {
            e["type"] == "repository"
                && e["name"] == repo
                && e["actions"]
                    .as_array()
                    .is_some_and(|x| x.iter().any(|y| y == action || y == "*"))
        })
    })
}

/// The text between `start` and the next `end` in `s`.
fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = s.find(start)? + start.len();
    let len = s[from..].find(end)?;
    Some(&s[from..from + len])
}

/// The fix for a refused pull, from the registry's reason. berth's reasons
/// name the project, the role the account has and the role pull needs, so
/// the fix is the exact command; other registries get the general advice.
pub fn permission_fix(msg: &str, user: Option<&str>) -> String {
    let project = between(msg, "project \"", "\"");
    let need = between(msg, "needs role ", " or higher").or_else(|| between(msg, "needs ", " or higher"));
    match (project, need, user) {
        (Some(p), Some(role), Some(u)) if !u.starts_with("robot$") => format!(
            "give {u} the role {role} (or higher) in project {p}: berth project member {p} {u} {role} (with berth running: PUT /api/v1/projects/{p}/members/{u} {{\"role\": \"{role}\"}} as an administrator of {p})"
        ),
        (Some(p), _, Some(u)) if u.starts_with("robot$") => format!(
            "{u} has no pull grant for project {p}, and a robot's grants are fixed when it is made: create one with it (berth robot create NAME --grant {p}:pull), then update the imagePullSecret"
        ),
        (Some(p), _, None) if msg.contains("private") || msg.contains("login") => format!(
            "project {p} is private: log in with an account that has pull there (docker login, an imagePullSecret; here --creds USER:PASS), or make the project public"
        ),
        (Some(p), _, _) if msg.contains("does not exist") => {
            format!("check the project in the image reference, or have an administrator create it: berth project create {p}")
        }
        _ => "grant the account pull on this repository (berth: a project role of guest or higher, or a robot grant PROJECT:pull), or use an account that has it".into(),
    }
}

/// Why the registry would refuse the push of a missing tag, when it tells
/// a reader: berth's `/readyz` ("out of disk"), its `/healthz` (`uploads`
/// "refused" at the disk watermark) and, for a caller who may read it (an
/// admin of the project), the project's quota use. Read-only GETs; other
/// registries answer 404 and say nothing.
async fn push_refusal(
    get: &(dyn Fn(String, bool) -> reqwest::RequestBuilder + Sync),
    base: &str,
    repo: &str,
) -> Option<(String, String)> {
    let project = repo.split('/').next().unwrap_or(repo);
    if let Ok(resp) = get(format!("{base}/readyz"), false).send().await {
        if resp.status() == StatusCode::SERVICE_UNAVAILABLE {
            let why = resp.text().await.unwrap_or_default();
            if why.contains("disk") {
                return Some((
                    format!("the registry is {}: it refuses pushes, so the missing image was most likely never stored", why.trim().trim_start_matches("not ready: ")),
                    "free space on the registry's data volume (delete old images, run garbage collection: berth gc) or grow it; then push the image again".into(),
                ));
            }
        }
    }
    if let Ok(resp) = get(format!("{base}/healthz"), false).send().await {
        let v: serde_json::Value = resp.json().await.unwrap_or_default();
        if v["dependencies"]["uploads"] == "refused" {
            return Some((
                "the registry's storage is at or above its disk watermark (/healthz: uploads refused): berth refuses every push there, so the missing image was most likely never stored".into(),
                "free space on the registry's storage (delete old images, run garbage collection: berth gc), grow the volume, or raise --disk-watermark; then push the image again".into(),
            ));
        }
    }
    let resp = get(format!("{base}/api/v1/projects/{project}/usage"), false)
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let v: serde_json::Value = resp.json().await.ok()?;
    let (used, quota) = (v["bytes"].as_u64()?, v["quota"].as_u64()?);
    // At 90% a new image's layers rarely fit any more.
    if quota == 0 || used.saturating_mul(10) < quota.saturating_mul(9) {
        return None;
    }
    Some((
        format!("project {project} uses {used} of its {quota}-byte storage quota ({}%): berth refuses a push that would exceed it (DENIED: over its storage quota), so the push of this image was most likely refused", used * 100 / quota),
        format!("raise the quota (--quota {project}=SIZE), or delete old images of {project} and run garbage collection (berth gc); then push the image again"),
    ))
}

/// How many tags [`recent`] reads the build time of: bounded, since each
/// costs a manifest and a config GET.
const RECENT_PROBE: usize = 10;

/// The build time of an image: the config's `created`, or an index's
/// `org.opencontainers.image.created` annotation.
async fn created(
    get: &(dyn Fn(String, bool) -> reqwest::RequestBuilder + Sync),
    base: &str,
    repo: &str,
    tag: &str,
) -> Option<String> {
    let resp = get(format!("{base}/v2/{repo}/manifests/{tag}"), true)
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let ct = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let m = Manifest::parse(&resp.bytes().await.ok()?, ct.as_deref()).ok()?;
    if let Some(c) = m
        .annotations
        .as_ref()
        .and_then(|a| a.get("org.opencontainers.image.created"))
    {
        return Some(c.clone());
    }
    let config = m.config?;
    let resp = get(format!("{base}/v2/{repo}/blobs/{}", config.digest), false)
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() || config.size > 1 << 20 {
        return None;
    }
    let v: serde_json::Value = resp.json().await.ok()?;
    v["created"].as_str().map(str::to_string)
}

/// The most recently built of the last [`RECENT_PROBE`] tags listed
/// (newest first, with their build times). Registries list tags in
/// lexical order and keep no push time a client can read, so the build
/// time in the image is the recency every registry can tell.
async fn recent(
    get: &(dyn Fn(String, bool) -> reqwest::RequestBuilder + Sync),
    base: &str,
    repo: &str,
    tags: &[String],
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in tags.iter().rev().take(RECENT_PROBE) {
        if let Some(c) = created(get, base, repo, t).await {
            out.push((c, t.clone()));
        }
    }
    by_recency(out)
}

/// (created, tag) pairs, newest first, as (tag, created); RFC 3339 times
/// in UTC sort as text.
fn by_recency(mut v: Vec<(String, String)>) -> Vec<(String, String)> {
    v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    v.into_iter().take(3).map(|(c, t)| (t, c)).collect()
}

pub async fn steps(r: &mut Report, img: &Image, opts: &Options, conn: Conn) {
    let mut b = reqwest::Client::builder()
        .timeout(opts.timeout)
        .resolve(&img.host, conn.addr)
        .user_agent(concat!("berth-diagnose/", env!("CARGO_PKG_VERSION")));
    if let Some(cfg) = conn.tls {
        b = b.tls_backend_preconfigured(cfg);
    }
    let http = match b.build() {
        Ok(c) => c,
        Err(e) => {
            r.fail(
                "/v2/ and auth challenge",
                Category::Usage,
                Instant::now(),
                e.to_string(),
                format!("cannot build an HTTP client: {e}"),
                "report this as a berth bug".into(),
            );
            return;
        }
    };
    if let Some(c) = &opts.creds {
        r.secret(&c.pass);
    }
    let base = img.base();
    let repo = img.repo.as_str();
    let scope = format!("repository:{repo}:pull");

    // 4. /v2/ and the challenge.
    let t = Instant::now();
    let resp = match http.get(format!("{base}/v2/")).send().await {
        Ok(r) => r,
        Err(e) => {
            r.fail(
                "/v2/ and auth challenge",
                Category::Network,
                t,
                e.to_string(),
                format!("GET {base}/v2/ failed: {e}"),
                "check that this address serves the registry API (a proxy in front may answer elsewhere)".into(),
            );
            return;
        }
    };
    if is_refusal(&resp) {
        refusal(r, t, "GET /v2/", resp).await;
        return;
    }
    let challenge = resp
        .headers()
        .get(header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .map(oci::challenge::parse)
        .unwrap_or_default();
    let mut authz: Option<String> = None;
    match resp.status() {
        StatusCode::OK => {
            r.ok("/v2/ and auth challenge", t, "200: no authentication required".into());
            r.ok("credentials", Instant::now(), "none needed".into());
        }
        StatusCode::UNAUTHORIZED => {
            let bearer = challenge.iter().find(|c| c.is("bearer"));
            let basic = challenge.iter().find(|c| c.is("basic"));
            if let Some(c) = bearer {
                let Some(realm) = c.param("realm").map(str::to_string) else {
                    r.fail(
                        "/v2/ and auth challenge",
                        Category::Auth,
                        t,
                        format!("{c:?}"),
                        "the Bearer challenge names no realm".into(),
                        "fix the registry's token configuration (realm)".into(),
                    );
                    return;
                };
                let service = c.param("service").unwrap_or("").to_string();
                r.ok(
                    "/v2/ and auth challenge",
                    t,
                    format!("401 Bearer realm={realm} service={service}"),
                );
                // 5. A token from the realm the registry named, and only there.
                let t = Instant::now();
                let mut req = http
                    .get(&realm)
                    .query(&[("service", service.as_str()), ("scope", scope.as_str())]);
                if let Some(c) = &opts.creds {
                    req = req.basic_auth(&c.user, Some(&c.pass));
                }
                let resp = match req.send().await {
                    Ok(r) => r,
                    Err(e) => {
                        r.fail("credentials", Category::Network, t, e.to_string(), format!("the token realm {realm} is unreachable: {e}"), "the registry's realm URL must be reachable from the clients: check its external URL and the network path to it".into());
                        return;
                    }
                };
                if is_refusal(&resp) {
                    refusal(r, t, "the token request", resp).await;
                    return;
                }
                if !resp.status().is_success() {
                    let status = resp.status();
                    let (code, msg) = error_of(resp).await;
                    let who = opts
                        .creds
                        .as_ref()
                        .map(|c| format!("user {:?}", c.user))
                        .unwrap_or_else(|| "an anonymous client".into());
                    let robot = opts.creds.as_ref().is_some_and(|c| c.user.starts_with("robot$"));
                    let (cause, fix) = if robot {
                        (
                            format!("the realm refused {who} ({status} {code}: {msg}): the robot's secret is wrong, or the robot expired or was revoked (a registry answers these alike, so a guesser learns nothing)"),
                            "check the robot on the registry (berth robot list shows its expiry and whether it is revoked); if it expired or was revoked, create a new one (berth robot create NAME --grant PROJECT:pull --expires 90d) and update the imagePullSecret".to_string(),
                        )
                    } else if opts.creds.is_some() {
                        (
                            format!("the realm refused {who}: wrong user name or password ({status} {code}: {msg})"),
                            "check the credentials (docker login again; update the imagePullSecret); after repeated failures the account is locked out for a while: wait, then retry once".to_string(),
                        )
                    } else {
                        (
                            format!("the realm refused {who}: {msg}"),
                            "log in: docker login, or an imagePullSecret; here --creds USER:PASS".to_string(),
                        )
                    };
                    r.fail(
                        "credentials",
                        Category::Auth,
                        t,
                        format!("{status} {code}: {msg}"),
                        cause,
                        fix,
                    );
                    return;
                }
                let v: serde_json::Value = resp.json().await.unwrap_or_default();
                let token = v["token"]
                    .as_str()
                    .or(v["access_token"].as_str())
                    .unwrap_or("")
                    .to_string();
                r.secret(&token);
                let access = jwt_access(&token);
                let granted = access
                    .as_ref()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "(not readable from the token)".into());
                let bearer = format!("Bearer {token}");
                if access.as_ref().is_some_and(|a| !grants(a, repo, "pull")) {
                    // The token lacks the scope asked for: the registry's
                    // refusal of the manifest says why (the role, the grant).
                    let why = http
                        .get(format!("{base}/v2/{repo}/manifests/{}", img.reference))
                        .header(header::ACCEPT, ACCEPT)
                        .header(header::AUTHORIZATION, &bearer)
                        .send()
                        .await;
                    if let Ok(resp) = why {
                        if !resp.status().is_success() {
                            let status = resp.status();
                            let (code, msg) = error_of(resp).await;
                            let who = opts
                                .creds
                                .as_ref()
                                .map(|c| format!("user {:?}", c.user))
                                .unwrap_or_else(|| "an anonymous client".into());
                            r.fail(
                                "credentials",
                                Category::Auth,
                                t,
                                format!("asked {scope}, granted {granted}; manifest GET: {status} {code}: {msg}"),
                                format!("insufficient scope: {who} was issued a token without pull on {repo} (asked {scope}, granted {granted}); the registry says: {msg}"),
                                permission_fix(&msg, opts.creds.as_ref().map(|c| c.user.as_str())),
                            );
                            return;
                        }
                    }
                }
                r.ok(
                    "credentials",
                    t,
                    format!("token issued for scope {scope}; granted: {granted}"),
                );
                authz = Some(bearer);
            } else if basic.is_some() {
                r.ok("/v2/ and auth challenge", t, "401 Basic".into());
                let t = Instant::now();
                let Some(c) = &opts.creds else {
                    r.fail(
                        "credentials",
                        Category::Auth,
                        t,
                        "no credentials given".into(),
                        "the registry requires a login (Basic) and none was given".into(),
                        "docker login, or an imagePullSecret; here --creds USER:PASS".into(),
                    );
                    return;
                };
                let resp = http
                    .get(format!("{base}/v2/"))
                    .basic_auth(&c.user, Some(&c.pass))
                    .send()
                    .await;
                match resp {
                    Ok(resp) if resp.status().is_success() => {
                        r.ok("credentials", t, format!("user {:?} accepted", c.user));
                        let raw = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.user, c.pass));
                        r.secret(&raw);
                        authz = Some(format!("Basic {raw}"));
                    }
                    Ok(resp) => {
                        let status = resp.status();
                        let (code, msg) = error_of(resp).await;
                        r.fail(
                            "credentials",
                            Category::Auth,
                            t,
                            format!("{status} {code}: {msg}"),
                            format!(
                                "the registry refused user {:?}: wrong user name or password ({status})",
                                c.user
                            ),
                            "check the credentials (docker login again; update the imagePullSecret)".into(),
                        );
                        return;
                    }
                    Err(e) => {
                        r.fail(
                            "credentials",
                            Category::Network,
                            t,
                            e.to_string(),
                            format!("GET /v2/ with credentials failed: {e}"),
                            "retry; check the network path".into(),
                        );
                        return;
                    }
                }
            } else {
                r.fail(
                    "/v2/ and auth challenge",
                    Category::Auth,
                    t,
                    format!("{challenge:?}"),
                    "401 without a Bearer or Basic challenge".into(),
                    "the registry (or a proxy in front of it) must send WWW-Authenticate".into(),
                );
                return;
            }
        }
        s => {
            let (code, msg) = error_of(resp).await;
            r.fail(
                "/v2/ and auth challenge",
                Category::NotFound,
                t,
                format!("{s} {code} {msg}"),
                format!("{base}/v2/ answered {s}: this is not a registry API endpoint"),
                "check the host and port (a web server or proxy answers there, not the registry)".into(),
            );
            return;
        }
    }
    let get = |url: String, accept: bool| {
        let mut q = http.get(url);
        if accept {
            q = q.header(header::ACCEPT, ACCEPT);
        }
        if let Some(a) = &authz {
            q = q.header(header::AUTHORIZATION, a);
        }
        q
    };

    // 6. The repository and the tag.
    let t = Instant::now();
    let reference = img.reference.to_string();
    let resp = match get(format!("{base}/v2/{repo}/manifests/{reference}"), true)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => {
            r.fail(
                "repository and tag",
                Category::Network,
                t,
                e.to_string(),
                format!("GET the manifest failed: {e}"),
                "retry; check the network path".into(),
            );
            return;
        }
    };
    if is_refusal(&resp) {
        refusal(r, t, "the manifest GET", resp).await;
        return;
    }
    let status = resp.status();
    if !status.is_success() {
        let insufficient = resp
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(|h| h.contains("insufficient_scope"))
            .unwrap_or(false);
        let (code, msg) = error_of(resp).await;
        let detail = format!("{status} {code}: {msg}");
        match status {
            StatusCode::NOT_FOUND => {
                if let Some((cause, fix)) = push_refusal(&get, &base, repo).await {
                    r.fail(
                        "registry refusals",
                        Category::Refused,
                        t,
                        detail,
                        format!("{repo}:{reference} is not on the registry, and {cause}"),
                        fix,
                    );
                    return;
                }
                let tags = get(format!("{base}/v2/{repo}/tags/list"), false).send().await;
                let tags: Option<Vec<String>> = match tags {
                    Ok(t) if t.status().is_success() => t.json::<serde_json::Value>().await.ok().map(|v| {
                        v["tags"]
                            .as_array()
                            .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
                            .unwrap_or_default()
                    }),
                    _ => None,
                };
                match tags {
                    Some(tags) if !tags.is_empty() || code == "MANIFEST_UNKNOWN" => {
                        let near = nearest(&reference, &tags);
                        let newest = recent(&get, &base, repo, &tags).await;
                        let newest = if newest.is_empty() {
                            String::new()
                        } else {
                            let list: Vec<String> = newest.iter().map(|(t, c)| format!("{t} (built {c})")).collect();
                            format!("; most recently built: {}", list.join(", "))
                        };
                        r.fail("repository and tag", Category::NotFound, t, detail, format!("repository {repo} exists, tag {reference} does not; nearest tags: {}{newest}", if near.is_empty() { "(none: the repository has no tags)".into() } else { near.join(", ") }), format!("fix the tag where it is generated (the pipeline that wrote {reference} into the deployment) or push it; {} tags exist", tags.len()));
                    }
                    _ => {
                        r.fail(
                            "repository and tag",
                            Category::NotFound,
                            t,
                            detail,
                            format!(
                                "repository {repo} does not exist on {} (or this caller may not list it)",
                                img.authority()
                            ),
                            "check the repository path (project/name) in the image reference, or push the image".into(),
                        );
                    }
                }
            }
            StatusCode::FORBIDDEN if is_policy(&msg) => {
                r.fail(
                    "registry refusals",
                    Category::Refused,
                    t,
                    detail,
                    format!("the registry refused by policy: {msg}"),
                    "see the registry's policy named in the message (quota, disk, immutability)".into(),
                );
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                let cause = if insufficient {
                    format!("insufficient scope: the token does not grant {scope}: {msg}")
                } else {
                    format!("permission denied: {msg}")
                };
                let fix = permission_fix(&msg, opts.creds.as_ref().map(|c| c.user.as_str()));
                r.fail("repository and tag", Category::Auth, t, detail, cause, fix);
            }
            _ => {
                r.fail(
                    "repository and tag",
                    Category::NotFound,
                    t,
                    detail.clone(),
                    format!("the manifest GET answered {detail}"),
                    "read the registry's log for this request".into(),
                );
            }
        }
        return;
    }
    let ctype = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let header_digest = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = resp.bytes().await.unwrap_or_default();
    r.ok(
        "repository and tag",
        t,
        format!("{repo}:{reference} found ({} bytes)", bytes.len()),
    );

    // 7. The manifest.
    let t = Instant::now();
    let Some(mut manifest) = check_manifest(r, t, &bytes, ctype.as_deref(), header_digest.as_deref(), &img.reference)
    else {
        return;
    };

    // 8. The platform.
    let t = Instant::now();
    if manifest.is_index() {
        let want = opts.platform.clone().unwrap_or_else(this_platform);
        let plat = |d: &oci::Descriptor| {
            let p = d.platform.as_ref()?;
            let mut s = format!("{}/{}", p["os"].as_str()?, p["architecture"].as_str()?);
            if let Some(v) = p["variant"].as_str() {
                s.push('/');
                s.push_str(v);
            }
            Some(s)
        };
        let present: Vec<String> = manifest.manifests.iter().filter_map(plat).collect();
        let found = manifest
            .manifests
            .iter()
            .find(|d| plat(d).is_some_and(|p| p == want || p.starts_with(&format!("{want}/"))));
        let Some(d) = found.cloned() else {
            r.fail("platform", Category::Platform, t, format!("present: {}", present.join(", ")), format!("the index has no manifest for {want}; platforms present: {}", present.join(", ")), format!("build and push the image for {want} (docker buildx build --platform {want},...), or run on one of the platforms present"));
            return;
        };
        let resp = match get(format!("{base}/v2/{repo}/manifests/{}", d.digest), true)
            .send()
            .await
        {
            Ok(x) if x.status().is_success() => x,
            Ok(x) => {
                let s = x.status();
                r.fail(
                    "platform",
                    Category::Content,
                    t,
                    format!("{s}"),
                    format!(
                        "the index refers to {} for {want}, and the registry answered {s} for it",
                        d.digest
                    ),
                    "push the platform's manifest again (the index is incomplete)".into(),
                );
                return;
            }
            Err(e) => {
                r.fail(
                    "platform",
                    Category::Network,
                    t,
                    e.to_string(),
                    format!("GET the {want} manifest failed: {e}"),
                    "retry; check the network path".into(),
                );
                return;
            }
        };
        let ct = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = resp.bytes().await.unwrap_or_default();
        let Some(child) = check_manifest(r, t, &bytes, ct.as_deref(), None, &Reference::Digest(d.digest.clone()))
        else {
            return;
        };
        r.ok(
            "platform",
            t,
            format!("{want} -> {} (present: {})", d.digest, present.join(", ")),
        );
        manifest = child;
    } else {
        r.ok("platform", t, "single-platform manifest".into());
    }

    // 9. Every blob.
    let t = Instant::now();
    let blobs: Vec<oci::Descriptor> = manifest
        .required_blobs()
        .filter(|d| d.urls.is_none())
        .cloned()
        .collect();
    let bar = (opts.deep && opts.progress).then(|| {
        let total = blobs.iter().map(|d| d.size).sum();
        indicatif::ProgressBar::new(total).with_style(
            indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        )
    });
    for (i, d) in blobs.iter().enumerate() {
        let what = if Some(&d.digest) == manifest.config.as_ref().map(|c| &c.digest) {
            "config".to_string()
        } else {
            format!("layer {i}")
        };
        let url = format!("{base}/v2/{repo}/blobs/{}", d.digest);
        let resp = if opts.deep {
            get(url, false).send().await
        } else {
            http.head(url)
                .header(header::AUTHORIZATION, authz.clone().unwrap_or_default())
                .send()
                .await
        };
        let resp = match resp {
            Ok(x) => x,
            Err(e) => {
                r.fail(
                    "blobs",
                    Category::Network,
                    t,
                    e.to_string(),
                    format!("{what} {}: {e}", d.digest),
                    "retry; check the network path to the registry and its storage".into(),
                );
                return;
            }
        };
        if is_refusal(&resp) {
            refusal(r, t, &format!("{what} {}", d.digest), resp).await;
            return;
        }
        let status = resp.status();
        if !status.is_success() {
            r.fail("blobs", Category::Content, t, format!("{what} {}: {status}", d.digest), format!("{what} {} is missing from the registry's storage ({status}): the manifest refers to a blob the registry cannot serve", d.digest), "push the image again (it uploads the missing blob); then check the registry's storage (berth fsck; distribution: its storage driver)".into());
            return;
        }
        let size = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if size.is_some_and(|s| s != d.size) {
            r.fail(
                "blobs",
                Category::Content,
                t,
                format!("{what}: Content-Length {size:?}, descriptor {}", d.size),
                format!(
                    "{what} {} is {} bytes in storage, the manifest says {}",
                    d.digest,
                    size.unwrap_or(0),
                    d.size
                ),
                "push the image again; check the registry's storage".into(),
            );
            return;
        }
        if opts.deep {
            let mut h = d.digest.algorithm().hasher();
            let mut n = 0u64;
            let mut resp = resp;
            loop {
                match resp.chunk().await {
                    Ok(Some(c)) => {
                        n += c.len() as u64;
                        h.update(&c);
                        if let Some(b) = &bar {
                            b.inc(c.len() as u64);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        r.fail(
                            "blobs",
                            Category::Network,
                            t,
                            e.to_string(),
                            format!("{what} {}: the download broke off after {n} bytes: {e}", d.digest),
                            "retry; check proxies and timeouts on the path".into(),
                        );
                        return;
                    }
                }
            }
            let got: Digest = h.finish();
            if got != d.digest || n != d.size {
                r.fail("blobs", Category::Content, t, format!("{what}: got {got}, {n} bytes"), format!("{what} {}: the bytes the registry serves do not match the digest (they hash to {got}, {n} bytes): storage is corrupt", d.digest), "push the image again; run the registry's storage check (berth fsck) and check its disk".into());
                return;
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let total: u64 = blobs.iter().map(|d| d.size).sum();
    r.ok(
        "blobs",
        t,
        format!(
            "{} blobs, {total} bytes, {}",
            blobs.len(),
            if opts.deep {
                "every digest verified"
            } else {
                "HEAD: present, sizes match (--deep verifies the bytes)"
            }
        ),
    );
    r.ok("registry refusals", Instant::now(), "none".into());
}

/// A rate limit or a server-side failure, reported as step 10.
fn is_refusal(resp: &Response) -> bool {
    resp.status() == StatusCode::TOO_MANY_REQUESTS || resp.status().is_server_error()
}

fn this_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        a => a,
    };
    format!("{}/{arch}", std::env::consts::OS)
}

fn check_manifest(
    r: &mut Report,
    t: Instant,
    bytes: &[u8],
    ctype: Option<&str>,
    header: Option<&str>,
    reference: &Reference,
) -> Option<Manifest> {
    let got = Digest::sha256(bytes);
    let expect = match reference {
        Reference::Digest(d) => Some(d.to_string()),
        Reference::Tag(_) => header.map(str::to_string),
    };
    if let Some(e) = expect.filter(|e| *e != got.to_string()) {
        r.fail(
            "manifest",
            Category::Content,
            t,
            format!("expected {e}, bytes hash to {got}"),
            format!("the manifest's digest does not match: expected {e}, the bytes hash to {got}"),
            "push the image again; a proxy that rewrites responses breaks this".into(),
        );
        return None;
    }
    match Manifest::parse(bytes, ctype) {
        Ok(m) if oci::media::is_manifest(&m.media_type) => {
            r.ok("manifest", t, format!("{} {got}", m.media_type));
            Some(m)
        }
        Ok(m) => {
            r.fail(
                "manifest",
                Category::Content,
                t,
                m.media_type.clone(),
                format!(
                    "manifest media type {} is not one docker, containerd or podman pull",
                    m.media_type
                ),
                "push an OCI image manifest or index, or a Docker schema2 manifest".into(),
            );
            None
        }
        Err(e) => {
            r.fail(
                "manifest",
                Category::Content,
                t,
                e.to_string(),
                format!("the manifest does not parse: {e}"),
                "push the image again with a current client".into(),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn nearest_tags() {
        let tags: Vec<String> = ["v1.0.0", "v1.2.0", "v1.2.1", "latest", "main"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(super::nearest("v1.2.2", &tags), ["v1.2.1", "v1.2.0", "v1.0.0"]);
    }

    #[test]
    fn recency_orders_newest_first() {
        let v = |c: &str, t: &str| (c.to_string(), t.to_string());
        let got = super::by_recency(vec![
            v("2026-01-01T00:00:00Z", "old"),
            v("2026-03-01T00:00:00Z", "new"),
            v("2026-02-01T00:00:00Z", "mid"),
            v("2025-01-01T00:00:00Z", "oldest"),
        ]);
        let tags: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(tags, ["new", "mid", "old"]);
    }

    #[test]
    fn grants_and_permission_fixes() {
        let a = serde_json::json!([{"type": "repository", "name": "team/app", "actions": ["pull"]}]);
        assert!(super::grants(&a, "team/app", "pull"));
        assert!(!super::grants(&a, "team/other", "pull"));
        assert!(!super::grants(&serde_json::json!([]), "team/app", "pull"));
        let fix = super::permission_fix(
            "user \"bob\" is not a member of project \"other\"; pull needs role guest or higher",
            Some("bob"),
        );
        assert!(fix.contains("berth project member other bob guest"), "{fix}");
        let fix = super::permission_fix(
            "robot \"robot$ci\" has no pull permission in project \"other\"",
            Some("robot$ci"),
        );
        assert!(fix.contains("--grant other:pull"), "{fix}");
        let fix = super::permission_fix("project \"team\" is private or does not exist: log in to pull it", None);
        assert!(fix.contains("project team is private"), "{fix}");
    }
}
