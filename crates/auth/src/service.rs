//! `Auth`: authentication (passwords, robot secrets, tokens), authorization
//! against the identity store, and token issuance.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use metadata::{IdentityStore, Project};
use observe::metrics::AuthCounters;
use sha2::Digest as _;

use crate::audit::AuditLog;
use crate::limiter::Limiter;
use crate::policy::{decide, Action, Principal};
use crate::scope::Access;
use crate::token::{Claims, TokenError, TokenKey};
use crate::{now, password};

#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// The token endpoint's absolute URL, from the configured external URL.
    pub realm: String,
    /// The `service` of challenges and the `aud` of tokens.
    pub service: String,
    /// Lifetime of access tokens.
    pub token_ttl: Duration,
    /// Lifetime of refresh tokens (docker's identity token, containerd's
    /// refresh grant).
    pub refresh_ttl: Duration,
    /// Failed logins allowed for one account from one client address
    /// within the window; then that pair is refused for the window.
    pub max_failed_logins: u32,
    /// Failed logins allowed from one client address, whatever the
    /// accounts; then that address is refused for the window.
    pub max_failed_logins_per_client: u32,
    pub failed_login_window: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            realm: "http://127.0.0.1:5000/token".into(),
            service: "berth".into(),
            token_ttl: Duration::from_secs(300),
            refresh_ttl: Duration::from_secs(7 * 24 * 3600),
            max_failed_logins: 10,
            max_failed_logins_per_client: 50,
            failed_login_window: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No or bad credentials: the client should (re)authenticate.
    #[error("{0}")]
    Unauthorized(String),
    /// Authenticated, but not allowed.
    #[error("{0}")]
    Denied(String),
    /// Locked out for `retry_after` (the `Retry-After` of the 429).
    #[error("{message}")]
    TooManyRequests { message: String, retry_after: Duration },
    #[error("{0}")]
    Internal(String),
}

fn internal(e: impl std::error::Error) -> AuthError {
    tracing::error!(error = %metadata::error_chain(&e), "access control backend failure");
    AuthError::Internal("internal error while checking access; the server log has the details".into())
}

/// How long a verified password is remembered, so clients that send basic
/// credentials on every request do not pay for argon2 each time.
const CREDENTIAL_CACHE_TTL: Duration = Duration::from_secs(60);

pub struct Auth {
    store: Arc<dyn IdentityStore>,
    key: TokenKey,
    config: AuthConfig,
    /// Failed logins per (account, client address).
    pairs: Limiter,
    /// Failed logins per client address.
    clients: Limiter,
    counters: Arc<AuthCounters>,
    /// user -> (sha256 of the password and of the stored hash it was
    /// verified against, when). The stored hash is read from the store on
    /// every login, so a password changed on any node (a new hash) misses.
    verified: Mutex<HashMap<String, ([u8; 32], Instant)>>,
    pub audit: AuditLog,
}

impl Auth {
    pub fn new(store: Arc<dyn IdentityStore>, key: TokenKey, config: AuthConfig, audit: AuditLog) -> Auth {
        let pairs = Limiter::new(config.max_failed_logins, config.failed_login_window);
        let clients = Limiter::new(config.max_failed_logins_per_client, config.failed_login_window);
        Auth {
            store,
            key,
            config,
            pairs,
            clients,
            counters: Arc::default(),
            verified: Mutex::new(HashMap::new()),
            audit,
        }
    }

    /// Counts into `counters` (the exported metrics) instead of a private
    /// set.
    pub fn with_counters(mut self, counters: Arc<AuthCounters>) -> Auth {
        self.counters = counters;
        self
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    pub fn store(&self) -> &Arc<dyn IdentityStore> {
        &self.store
    }

    /// Checks a user name (or `robot$name`) and password or secret from
    /// `client` (the TCP peer's address). Failures are counted per
    /// (account, client) and per client, never per account alone: a
    /// stranger guessing a password locks out only themselves.
    pub async fn login(&self, name: &str, secret: &str, client: &str) -> Result<Principal, AuthError> {
        let (pair_key, client_key) = (format!("{name}\0{client}"), client.to_string());
        if let Some(left) = self
            .pairs
            .locked(&pair_key)
            .or_else(|| self.clients.locked(&client_key))
        {
            self.audit
                .record(name, "login_failed", name, client, "denied", "locked out");
            return Err(AuthError::TooManyRequests {
                message: format!(
                    "too many failed logins from {client}; try again in {} s",
                    retry_secs(left)
                ),
                retry_after: left,
            });
        }
        match self.check_secret(name, secret).await? {
            Some(p) => {
                self.pairs.record_success(&pair_key);
                Ok(p)
            }
            None => {
                self.audit
                    .record(name, "login_failed", name, client, "denied", "bad credentials");
                if let Some(d) = self.pairs.record_failure(&pair_key) {
                    self.lockout(name, client, self.pairs.max_failures(), &format!("account {name:?}"), d);
                }
                if let Some(d) = self.clients.record_failure(&client_key) {
                    self.lockout(name, client, self.clients.max_failures(), "every account", d);
                }
                Err(AuthError::Unauthorized("invalid username or password".into()))
            }
        }
    }

    /// Records a lockout that just began, with its source.
    fn lockout(&self, name: &str, client: &str, failures: u32, what: &str, d: Duration) {
        self.counters.lockouts.fetch_add(1, Ordering::Relaxed);
        let detail = format!(
            "{failures} failed logins from {client}: {what} refused from {client} for {} s",
            d.as_secs()
        );
        tracing::warn!(account = name, client, "login lockout: {detail}");
        self.audit.record(name, "login_locked", name, client, "denied", &detail);
    }

    async fn check_secret(&self, name: &str, secret: &str) -> Result<Option<Principal>, AuthError> {
        let Some((hash, principal)) = self.account(name).await? else {
            // The same argon2 work as for a real account, so the time taken
            // does not tell which names exist.
            self.verify(secret, DUMMY_HASH.clone()).await?;
            return Ok(None);
        };
        let fingerprint = fingerprint(secret, &hash);
        let cached = {
            let map = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            map.get(name)
                .is_some_and(|(fp, at)| *fp == fingerprint && at.elapsed() < CREDENTIAL_CACHE_TTL)
        };
        if cached {
            return Ok(Some(principal));
        }
        if !self.verify(secret, hash).await? {
            return Ok(None);
        }
        let mut map = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 10_000 {
            map.clear();
        }
        map.insert(name.to_string(), (fingerprint, Instant::now()));
        Ok(Some(principal))
    }

    /// A usable account's stored hash and principal; `None` for a missing,
    /// revoked or expired one.
    async fn account(&self, name: &str) -> Result<Option<(String, Principal)>, AuthError> {
        if name.starts_with("robot$") {
            let Some(r) = self.store.get_robot(name).await.map_err(internal)? else {
                return Ok(None);
            };
            if r.revoked || r.expires_at.is_some_and(|e| e <= now()) {
                return Ok(None);
            }
            let p = Principal::Robot {
                name: r.name,
                grants: r.grants,
            };
            Ok(Some((r.secret_hash, p)))
        } else {
            let Some(u) = self.store.get_user(name).await.map_err(internal)? else {
                return Ok(None);
            };
            let p = Principal::User {
                name: u.name,
                system_admin: u.system_admin,
                generation: u.generation,
            };
            Ok(Some((u.password_hash, p)))
        }
    }

    /// Runs argon2, off the async workers (it is deliberately slow).
    async fn verify(&self, secret: &str, hash: String) -> Result<bool, AuthError> {
        self.counters.password_verifications.fetch_add(1, Ordering::Relaxed);
        let secret = secret.to_string();
        tokio::task::spawn_blocking(move || password::verify(&secret, &hash))
            .await
            .map_err(internal)
    }

    /// Forgets cached credentials of `name` (after a password change or a
    /// revocation).
    pub fn forget(&self, name: &str) {
        self.verified.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
    }

    /// The principal a token speaks for, re-checked against the store so a
    /// deleted user, a changed password or a revoked robot ends the token at
    /// once.
    async fn principal_of(&self, claims: &Claims) -> Result<Principal, AuthError> {
        let sub = &claims.sub;
        let gone = || AuthError::Unauthorized(format!("account {sub:?} no longer exists or was revoked; log in again"));
        if sub.starts_with("robot$") {
            let r = self.store.get_robot(sub).await.map_err(internal)?.ok_or_else(gone)?;
            if r.revoked || r.expires_at.is_some_and(|e| e <= now()) {
                return Err(gone());
            }
            Ok(Principal::Robot {
                name: r.name,
                grants: r.grants,
            })
        } else if sub == "anonymous" {
            Ok(Principal::Anonymous)
        } else {
            let u = self.store.get_user(sub).await.map_err(internal)?.ok_or_else(gone)?;
            if u.generation != claims.gen {
                return Err(AuthError::Unauthorized(format!(
                    "the password or permissions of {sub:?} changed after this token was issued; log in again"
                )));
            }
            Ok(Principal::User {
                name: u.name,
                system_admin: u.system_admin,
                generation: u.generation,
            })
        }
    }

    /// Verifies an access token: signature, time, audience, account.
    pub async fn verify_access(&self, token: &str) -> Result<(Principal, Claims), AuthError> {
        let claims = self
            .key
            .verify(token, now(), &self.config.service)
            .map_err(token_error)?;
        if claims.kind != "access" {
            return Err(AuthError::Unauthorized(
                "a refresh token cannot be used as an access token".into(),
            ));
        }
        let p = self.principal_of(&claims).await?;
        Ok((p, claims))
    }

    /// Verifies a refresh token and returns its account.
    pub async fn verify_refresh(&self, token: &str) -> Result<Principal, AuthError> {
        let claims = self
            .key
            .verify(token, now(), &self.config.service)
            .map_err(token_error)?;
        if claims.kind != "refresh" {
            return Err(AuthError::Unauthorized("not a refresh token".into()));
        }
        self.principal_of(&claims).await
    }

    /// Decides whether `who` may do `action` on repository `repo`.
    pub async fn permit(&self, who: &Principal, repo: &str, action: Action) -> Result<(), AuthError> {
        if who.is_system_admin() {
            return Ok(());
        }
        let project_name = repo.split('/').next().unwrap_or(repo);
        let project = self.store.get_project(project_name).await.map_err(internal)?;
        let role = match who {
            Principal::User { name, .. } => self.store.get_role(project_name, name).await.map_err(internal)?,
            _ => None,
        };
        decide(who, project_name, project.as_ref(), role, action).map_err(|reason| match who {
            Principal::Anonymous => AuthError::Unauthorized(reason),
            _ => AuthError::Denied(reason),
        })
    }

    /// Creates the project of `repo` if a system administrator pushes into a
    /// project that does not exist yet (private by default).
    pub async fn ensure_project(&self, who: &Principal, repo: &str) -> Result<(), AuthError> {
        let name = repo.split('/').next().unwrap_or(repo);
        if who.is_system_admin() && self.store.get_project(name).await.map_err(internal)?.is_none() {
            let p = Project {
                name: name.to_string(),
                public: false,
                created: now(),
            };
            self.store.put_project(&p).await.map_err(internal)?;
            self.audit
                .record(who.name(), "project_create", name, "", "ok", "created by first push");
        }
        Ok(())
    }

    /// The subset of `requested` that `who` may have.
    pub async fn grant(&self, who: &Principal, requested: &[Access]) -> Vec<Access> {
        let mut out = Vec::new();
        for req in requested {
            let actions: Vec<String> = match req.kind.as_str() {
                "repository" if req.name.parse::<oci::RepoName>().is_ok() => {
                    let mut ok = Vec::new();
                    for a in &req.actions {
                        let Some(action) = Action::parse(a) else { continue };
                        if self.permit(who, &req.name, action).await.is_ok() {
                            ok.push(a.clone());
                        }
                    }
                    ok
                }
                // The catalog is filtered per repository when served.
                "registry" if req.name == "catalog" && *who != Principal::Anonymous => req.actions.clone(),
                _ => Vec::new(),
            };
            if !actions.is_empty() {
                out.push(Access {
                    kind: req.kind.clone(),
                    name: req.name.clone(),
                    actions,
                });
            }
        }
        out
    }

    fn claims(&self, who: &Principal, access: Vec<Access>, ttl: Duration, kind: &str) -> Claims {
        let t = now();
        Claims {
            iss: self.config.service.clone(),
            sub: who.name().to_string(),
            aud: self.config.service.clone(),
            exp: t + ttl.as_secs(),
            nbf: t,
            iat: t,
            jti: uuid::Uuid::new_v4().to_string(),
            access,
            kind: kind.into(),
            gen: match who {
                Principal::User { generation, .. } => *generation,
                _ => 0,
            },
        }
    }

    /// Issues an access token; returns it with its lifetime in seconds.
    pub fn issue_access(&self, who: &Principal, access: Vec<Access>) -> (String, u64) {
        let ttl = self.config.token_ttl;
        (self.key.sign(&self.claims(who, access, ttl, "access")), ttl.as_secs())
    }

    pub fn issue_refresh(&self, who: &Principal) -> String {
        self.key
            .sign(&self.claims(who, Vec::new(), self.config.refresh_ttl, "refresh"))
    }

    /// The `WWW-Authenticate` value for a request needing `scope`.
    pub fn challenge(&self, scope: Option<&str>, insufficient: bool) -> String {
        let mut v = format!(
            "Bearer realm=\"{}\",service=\"{}\"",
            self.config.realm, self.config.service
        );
        if let Some(s) = scope {
            v.push_str(&format!(",scope=\"{s}\""));
        }
        if insufficient {
            v.push_str(",error=\"insufficient_scope\"");
        }
        v
    }
}

/// What the credential cache keeps of a verified secret: a hash of it and
/// of the stored hash it matched (never the secret itself).
fn fingerprint(secret: &str, stored_hash: &str) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    h.update(secret.as_bytes());
    h.update([0u8]);
    h.update(stored_hash.as_bytes());
    h.finalize().into()
}

/// A `Retry-After` in whole seconds, never 0.
pub fn retry_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A valid argon2id hash of a random secret nobody knows: what an unknown
/// account's password is checked against.
static DUMMY_HASH: LazyLock<String> = LazyLock::new(|| {
    let secret = password::random_secret().unwrap_or_else(|_| "no randomness: still never matches".into());
    password::hash(&secret).unwrap_or_default()
});

fn token_error(e: TokenError) -> AuthError {
    AuthError::Unauthorized(format!("invalid token: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two nodes (two `Auth`s) on one store: a password changed through one
    /// ends, at once, the other's cached acceptance of the old one.
    #[tokio::test]
    async fn a_password_changed_on_one_node_stops_working_on_every_node() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn IdentityStore> = Arc::new(metadata::RedbMetadata::open(&dir.path().join("m.redb")).unwrap());
        crate::admin::create_user(store.as_ref(), "alice", "first password", false)
            .await
            .unwrap();
        let node = |n: &str| {
            let audit = AuditLog::open(dir.path().join(format!("audit-{n}.log"))).unwrap();
            Auth::new(
                store.clone(),
                TokenKey::from_seed([7; 32]),
                AuthConfig::default(),
                audit,
            )
        };
        let (a, b) = (node("a"), node("b"));
        assert!(a.login("alice", "first password", "10.0.0.1").await.is_ok());
        // Now cached on A.
        crate::admin::set_password(store.as_ref(), "alice", "second password")
            .await
            .unwrap();
        b.forget("alice");
        let old = a.login("alice", "first password", "10.0.0.1").await;
        assert!(matches!(old, Err(AuthError::Unauthorized(_))), "{old:?}");
        assert!(a.login("alice", "second password", "10.0.0.1").await.is_ok());
        assert!(b.login("alice", "second password", "10.0.0.1").await.is_ok());
    }
}
