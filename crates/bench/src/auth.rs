//! Credentials: none, Basic, a given Bearer token, or the Bearer token flow
//! of the Docker token spec (the registry answers 401 with a realm; a token
//! for a scope is fetched there, with the Basic credentials if any, and
//! cached per scope for the run).

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine;
use bytes::Bytes;
use http::header::WWW_AUTHENTICATE;
use http::{HeaderValue, Method};

use crate::conn::{self, Conn};
use crate::options::{Credentials, TlsOptions};
use crate::outcome::Failure;
use crate::target::{self, Target};

pub enum Auth {
    None,
    /// Sent as is on every request (Basic, or a given token).
    Header(HeaderValue),
    Bearer(Bearer),
}

pub struct Bearer {
    realm: String,
    service: Option<String>,
    basic: Option<HeaderValue>,
    tls: TlsOptions,
    tokens: Mutex<HashMap<String, HeaderValue>>,
}

/// What a request needs access to, as a token scope.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    Catalog,
    Pull(&'a str),
    Push(&'a str),
}

impl Scope<'_> {
    fn as_scope(&self) -> String {
        match self {
            Scope::Catalog => "registry:catalog:*".into(),
            Scope::Pull(r) => format!("repository:{r}:pull"),
            Scope::Push(r) => format!("repository:{r}:pull,push"),
        }
    }
}

impl Auth {
    pub async fn header(&self, scope: Scope<'_>) -> Result<Option<HeaderValue>, Failure> {
        match self {
            Auth::None => Ok(None),
            Auth::Header(h) => Ok(Some(h.clone())),
            Auth::Bearer(b) => b.token_for(Some(scope.as_scope())).await.map(Some),
        }
    }
}

impl Bearer {
    async fn token_for(&self, scope: Option<String>) -> Result<HeaderValue, Failure> {
        let key = scope.clone().unwrap_or_default();
        if let Some(h) = self.tokens.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(h.clone());
        }
        let h = self.fetch(scope.as_deref()).await?;
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, h.clone());
        Ok(h)
    }

    async fn fetch(&self, scope: Option<&str>) -> Result<HeaderValue, Failure> {
        let (base, path) = split_url(&self.realm).map_err(Failure::other)?;
        let mut query = Vec::new();
        if let Some(s) = &self.service {
            query.push(format!("service={}", escape(s)));
        }
        if let Some(s) = scope {
            query.push(format!("scope={}", escape(s)));
        }
        let sep = if path.contains('?') { '&' } else { '?' };
        let path = if query.is_empty() {
            path
        } else {
            format!("{path}{sep}{}", query.join("&"))
        };
        let realm = target::resolve(&base, &self.tls).await.map_err(Failure::other)?;
        let mut c = Conn::new(std::sync::Arc::new(realm));
        let mut b = c.bare_request(Method::GET, &path);
        if let Some(basic) = &self.basic {
            b = b.header(http::header::AUTHORIZATION, basic.clone());
        }
        let resp = conn::check(c.send(conn::with_body(b, Bytes::new())?).await?, &[200]).await?;
        let body = conn::read_all(resp.into_body(), 1 << 20).await?;
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|_| Failure::other("token endpoint: response is not JSON"))?;
        let token = v["token"]
            .as_str()
            .or_else(|| v["access_token"].as_str())
            .ok_or_else(|| Failure::other("token endpoint: no token in the response"))?;
        HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| Failure::other("token endpoint: the token has invalid characters"))
    }
}

/// `scheme://authority` and the path (with query) of a URL.
fn split_url(url: &str) -> Result<(String, String), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("token realm {url:?} is not an absolute URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    Ok((format!("{scheme}://{authority}"), path.to_string()))
}

/// Percent-encodes a query value, keeping what scopes are made of readable.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:/,*".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn basic_header(user: &str, password: &str) -> HeaderValue {
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    HeaderValue::from_str(&format!("Basic {b64}")).expect("base64 is a valid header value")
}

/// Asks the registry what it wants (`GET /v2/`) and prepares credentials.
/// This is also the reachability check, so its errors say how to fix the URL.
pub async fn negotiate(target: &Target, creds: &Credentials, tls: &TlsOptions) -> Result<Auth, String> {
    if let Credentials::Token(t) = creds {
        return HeaderValue::from_str(&format!("Bearer {t}"))
            .map(Auth::Header)
            .map_err(|_| "--token has characters a header cannot hold".into());
    }
    let url = &target.url;
    let (status, challenge) = probe(target, None).await?;
    if status == 200 {
        return Ok(Auth::None);
    }
    if status != 401 {
        return Err(format!(
            "{url}/v2/ answered HTTP {status}, not 200 or 401: is this an OCI registry, and is the URL right?"
        ));
    }
    let basic = match creds {
        Credentials::Basic { user, password } => Some(basic_header(user, password)),
        _ => None,
    };
    let challenge =
        challenge.ok_or_else(|| format!("{url}/v2/ answered 401 without a usable WWW-Authenticate header"))?;
    if challenge.is("basic") {
        let basic = basic.ok_or_else(|| format!("{url} asks for credentials: pass --user USER:PASSWORD"))?;
        let (status, _) = probe(target, Some(&basic)).await?;
        if status != 200 {
            return Err(format!(
                "{url} refused the --user credentials (HTTP {status}); check them"
            ));
        }
        return Ok(Auth::Header(basic));
    }
    if challenge.is("bearer") {
        let realm = challenge
            .param("realm")
            .ok_or_else(|| format!("{url} asks for a Bearer token but names no realm"))?;
        let bearer = Bearer {
            realm: realm.to_string(),
            service: challenge.param("service").map(str::to_string),
            basic,
            tls: tls.clone(),
            tokens: Mutex::new(HashMap::new()),
        };
        // Like `docker login`: a token without scope proves the credentials.
        bearer
            .token_for(None)
            .await
            .map_err(|e| format!("cannot get a token from {realm}: {e}; check --user"))?;
        return Ok(Auth::Bearer(bearer));
    }
    Err(format!(
        "{url} asks for {} authentication, which berth bench does not speak (Basic and Bearer only)",
        challenge.scheme
    ))
}

async fn probe(
    target: &Target,
    auth: Option<&HeaderValue>,
) -> Result<(u16, Option<oci::challenge::Challenge>), String> {
    let unreachable = |e: Failure| {
        format!(
            "cannot reach the registry at {}: {e}; is it running, and is --registry right?",
            target.url
        )
    };
    let t = target.with_auth(match auth {
        Some(h) => Auth::Header(h.clone()),
        None => Auth::None,
    });
    let mut c = Conn::new(std::sync::Arc::new(t));
    let b = c
        .request(Method::GET, "/v2/", Scope::Catalog)
        .await
        .map_err(unreachable)?;
    let resp = c
        .send(conn::with_body(b, Bytes::new()).map_err(unreachable)?)
        .await
        .map_err(unreachable)?;
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get(WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| oci::challenge::parse(h).into_iter().next());
    let _ = conn::drain(resp.into_body(), None).await;
    Ok((status, challenge))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_escapes() {
        assert_eq!(
            split_url("https://auth.example:8443/token?x=1").unwrap(),
            ("https://auth.example:8443".into(), "/token?x=1".into())
        );
        assert!(split_url("/token").is_err());
        assert_eq!(escape("repository:a/b:pull,push"), "repository:a/b:pull,push");
        assert_eq!(escape("my service&x"), "my%20service%26x");
        assert_eq!(basic_header("a", "b"), HeaderValue::from_static("Basic YTpi"));
    }
}
