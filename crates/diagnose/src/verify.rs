//! `berth verify IMAGE --key K`: the signature policy engine
//! (`signature::decide`) from the command line, against any registry. It
//! finds every signature of the image as cosign stores them (the `.sig`
//! tag, Sigstore bundle referrers, the referrers fallback index), checks
//! each against the given keys and prints who signed and the verdict. Only
//! GETs, with credentials sent to the registry or the realm it names.

use base64::Engine;
use oci::{Digest, Manifest, Reference};
use reqwest::{header, Response, StatusCode};
use serde::Serialize;
use signature::{bundle, simple, Candidate, Finding, Mode, Policy, PublicKey, Verdict};

use crate::{Creds, Image, Options};

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
/// Signature payloads and bundles are small.
const MAX_BLOB: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Registry(String),
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub image: String,
    pub digest: String,
    /// One line per signature found: where, and what became of it.
    pub signatures: Vec<String>,
    pub allowed: bool,
    pub result: &'static str,
    pub reason: String,
}

struct Client {
    http: reqwest::Client,
    base: String,
    creds: Option<Creds>,
    scope: String,
    bearer: Option<String>,
}

impl Client {
    /// GET `path`, answering one 401 with Basic or a token from the realm
    /// the registry names.
    async fn get(&mut self, path: &str, accept: Option<&str>) -> Result<Response, VerifyError> {
        let url = format!("{}{path}", self.base);
        let send = |auth: Option<String>| {
            let mut rb = self.http.get(&url);
            if let Some(a) = accept {
                rb = rb.header(header::ACCEPT, a);
            }
            if let Some(a) = auth {
                rb = rb.header(header::AUTHORIZATION, a);
            }
            rb.send()
        };
        let net = |e: reqwest::Error| VerifyError::Registry(format!("GET {url}: {e}; run berth diagnose on the image"));
        let resp = send(self.bearer.clone()).await.map_err(net)?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let cs = oci::challenge::parse(&challenge);
        let auth = if let Some(c) = cs.iter().find(|c| c.is("bearer")) {
            let realm = c
                .param("realm")
                .ok_or_else(|| VerifyError::Registry("the registry's Bearer challenge names no realm".into()))?;
            let mut rb = self.http.get(realm).query(&[
                ("service", c.param("service").unwrap_or("")),
                ("scope", self.scope.as_str()),
            ]);
            if let Some(cr) = &self.creds {
                rb = rb.basic_auth(&cr.user, Some(&cr.pass));
            }
            let r = rb.send().await.map_err(net)?;
            if !r.status().is_success() {
                return Err(VerifyError::Registry(format!(
                    "the token realm {realm} refused ({}): check --creds, or run berth diagnose on the image",
                    r.status()
                )));
            }
            let v: serde_json::Value = r.json().await.map_err(net)?;
            let t = v["token"].as_str().or(v["access_token"].as_str()).unwrap_or("");
            format!("Bearer {t}")
        } else {
            let cr = self
                .creds
                .as_ref()
                .ok_or_else(|| VerifyError::Registry("the registry asks for a login: give --creds USER:PASS".into()))?;
            let b = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", cr.user, cr.pass));
            format!("Basic {b}")
        };
        self.bearer = Some(auth);
        send(self.bearer.clone()).await.map_err(net)
    }

    /// A small body, or `None` on 404.
    async fn small(&mut self, path: &str, accept: Option<&str>) -> Result<Option<(Vec<u8>, Option<String>)>, String> {
        let r = self.get(path, accept).await.map_err(|e| e.to_string())?;
        if r.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !r.status().is_success() {
            return Err(format!("GET {path}: {}", r.status()));
        }
        let ct = r
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if r.content_length().is_some_and(|n| n as usize > MAX_BLOB) {
            return Err(format!("GET {path}: larger than {MAX_BLOB} bytes"));
        }
        let b = r.bytes().await.map_err(|e| format!("GET {path}: {e}"))?;
        if b.len() > MAX_BLOB {
            return Err(format!("GET {path}: larger than {MAX_BLOB} bytes"));
        }
        Ok(Some((b.to_vec(), ct)))
    }

    async fn blob(&mut self, repo: &str, d: &Digest) -> Result<Vec<u8>, String> {
        match self.small(&format!("/v2/{repo}/blobs/{d}"), None).await? {
            Some((b, _)) if d.verify(&b) => Ok(b),
            Some(_) => Err(format!("blob {d}: the bytes served do not match the digest")),
            None => Err(format!("blob {d} is missing (404)")),
        }
    }

    async fn manifest(&mut self, repo: &str, reference: &str) -> Result<Option<Manifest>, String> {
        match self
            .small(&format!("/v2/{repo}/manifests/{reference}"), Some(ACCEPT))
            .await?
        {
            Some((b, ct)) => Manifest::parse(&b, ct.as_deref())
                .map(Some)
                .map_err(|e| format!("manifest {reference}: {e}")),
            None => Ok(None),
        }
    }
}

/// Verifies `opts.image` against `keys` (distinct keys needed: `threshold`).
pub async fn run(opts: &Options, keys: Vec<PublicKey>, threshold: usize) -> Result<VerifyReport, VerifyError> {
    let img = Image::parse(&opts.image, opts.plain_http).map_err(|e| VerifyError::Usage(e.to_string()))?;
    if keys.is_empty() {
        return Err(VerifyError::Usage("give at least one --key".into()));
    }
    let mut b = reqwest::Client::builder()
        .timeout(opts.timeout)
        .user_agent(concat!("berth-verify/", env!("CARGO_PKG_VERSION")));
    if img.https {
        let store = crate::tls::roots(opts).map_err(VerifyError::Usage)?;
        let (cfg, _) = crate::tls::config(store).map_err(VerifyError::Usage)?;
        b = b.tls_backend_preconfigured(cfg);
    }
    let repo = img.repo.as_str().to_string();
    let mut c = Client {
        http: b.build().map_err(|e| VerifyError::Usage(e.to_string()))?,
        base: img.base(),
        creds: opts.creds.clone(),
        scope: format!("repository:{repo}:pull"),
        bearer: None,
    };
    let digest = resolve(&mut c, &repo, &img.reference).await?;
    let manifest_bytes = c
        .small(&format!("/v2/{repo}/manifests/{digest}"), Some(ACCEPT))
        .await
        .map_err(VerifyError::Registry)?
        .map(|(b, _)| b)
        .ok_or_else(|| VerifyError::Registry(format!("manifest {digest} is not on the registry")))?;
    let (found, mut where_) = gather(&mut c, &repo, &digest).await;
    let policy = Policy {
        name: "--key".into(),
        keys,
        threshold: threshold.max(1),
        allow_digests: Default::default(),
        mode: Mode::Enforce,
    };
    let v: Verdict = signature::decide(&policy, &digest, &manifest_bytes, &found);
    let signatures = where_
        .drain(..)
        .zip(&v.findings)
        .map(|(w, f)| format!("{w}: {}", finding(f)))
        .collect();
    Ok(VerifyReport {
        image: opts.image.clone(),
        digest: digest.to_string(),
        signatures,
        allowed: v.allowed,
        result: v.result,
        reason: v.reason,
    })
}

fn finding(f: &Finding) -> String {
    match f {
        Finding::Trusted { key } => format!("signed by trusted key {key}"),
        Finding::OtherDigest { signs } => format!("a trusted key's signature, but of {signs}"),
        Finding::Untrusted { hint: Some(h) } => format!("not verified by any given key (key hint {h})"),
        Finding::Untrusted { hint: None } => "not verified by any given key".into(),
        Finding::Malformed { why } => format!("unreadable: {why}"),
    }
}

/// The digest of the image. A tag the registry's own signature policy
/// refuses still names its digest: berth's refusal carries it in the
/// error's `detail`, so the image can be checked by digest.
async fn resolve(c: &mut Client, repo: &str, r: &Reference) -> Result<Digest, VerifyError> {
    if let Reference::Digest(d) = r {
        return Ok(d.clone());
    }
    let resp = c.get(&format!("/v2/{repo}/manifests/{r}"), Some(ACCEPT)).await?;
    let status = resp.status();
    let header_digest = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|d| d.parse::<Digest>().ok());
    if status.is_success() {
        if let Some(d) = header_digest {
            return Ok(d);
        }
        let b = resp.bytes().await.map_err(|e| VerifyError::Registry(e.to_string()))?;
        return Ok(Digest::sha256(&b));
    }
    let v: serde_json::Value = resp.json().await.unwrap_or_default();
    let e = &v["errors"][0];
    let msg = e["message"].as_str().unwrap_or("");
    let refused_by_policy = status == StatusCode::FORBIDDEN && msg.starts_with("signature policy ");
    if let Some(d) = e["detail"]
        .as_str()
        .and_then(|d| d.parse::<Digest>().ok())
        .filter(|_| refused_by_policy)
    {
        return Ok(d);
    }
    Err(VerifyError::Registry(format!(
        "cannot read {repo}:{r} ({status}{}{msg}); run berth diagnose on the image",
        if msg.is_empty() { "" } else { ": " }
    )))
}

/// Every signature of `digest`, and where each was found.
async fn gather(c: &mut Client, repo: &str, digest: &Digest) -> (Vec<Candidate>, Vec<String>) {
    let (mut found, mut where_) = (Vec::new(), Vec::new());
    let tag = simple::sig_tag(digest);
    match c.manifest(repo, &tag).await {
        Ok(Some(m)) => {
            for l in simple::layers(&m) {
                found.push(Candidate::Simple {
                    payload: c.blob(repo, &l.payload).await,
                    signature_b64: l.signature_b64,
                });
                where_.push(format!("{tag} layer {}", l.payload));
            }
        }
        Ok(None) => {}
        Err(e) => {
            found.push(Candidate::Simple {
                payload: Err(e),
                signature_b64: String::new(),
            });
            where_.push(tag.clone());
        }
    }
    let mut artifacts: Vec<Digest> = Vec::new();
    let listed = c.small(&format!("/v2/{repo}/referrers/{digest}"), None).await;
    let listed = match listed {
        Ok(Some((b, _))) => Some(b),
        // No referrers API: the fallback tag.
        _ => c
            .small(
                &format!("/v2/{repo}/manifests/{}", bundle::referrers_tag(digest)),
                Some(ACCEPT),
            )
            .await
            .ok()
            .flatten()
            .map(|(b, _)| b),
    };
    if let Some(index) = listed.and_then(|b| Manifest::parse(&b, None).ok()) {
        for d in index.manifests {
            if d.artifact_type.as_deref().is_some_and(bundle::is_bundle_type) && !artifacts.contains(&d.digest) {
                artifacts.push(d.digest);
            }
        }
    }
    for a in artifacts.into_iter().take(64) {
        let json = match c.manifest(repo, a.as_str()).await {
            Ok(Some(m)) => match m.layers.iter().find(|l| bundle::is_bundle_type(&l.media_type)) {
                Some(l) => c.blob(repo, &l.digest).await,
                None => Err(format!("artifact {a} has no bundle layer")),
            },
            Ok(None) => Err(format!("artifact {a} is missing")),
            Err(e) => Err(e),
        };
        found.push(Candidate::Bundle { json });
        where_.push(format!("bundle referrer {a}"));
    }
    (found, where_)
}

impl VerifyReport {
    pub fn human(&self) -> String {
        let mut out = format!("image:   {}\ndigest:  {}\n", self.image, self.digest);
        if self.signatures.is_empty() {
            out.push_str("signatures: none found\n");
        }
        for s in &self.signatures {
            out.push_str(&format!("  - {s}\n"));
        }
        out.push_str(&format!(
            "verdict: {} ({})\n{}\n",
            if self.allowed { "verified" } else { "NOT verified" },
            self.result,
            self.reason
        ));
        out
    }
}
