//! Access control at the HTTP edge: reads credentials from the request
//! (Basic or Bearer), asks `auth` for a decision, and turns refusals into
//! 401 challenges or 403 errors. With no `Auth` configured, everything is
//! allowed.

use auth::scope::Access;
use auth::{Action, Auth, AuthError, Principal};
use axum::http::{header, HeaderMap, HeaderValue};
use base64::Engine;
use oci::{ErrorCode, RepoName};

use crate::error::ApiError;

/// How the caller proved who they are.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Access control is off.
    Open,
    Anonymous,
    Basic(Principal),
    Bearer(Principal, Vec<Access>),
}

impl Caller {
    pub fn principal(&self) -> Option<&Principal> {
        match self {
            Caller::Basic(p) | Caller::Bearer(p, _) => Some(p),
            _ => None,
        }
    }

    /// The identity that owns uploads and appears in the audit log.
    pub fn name(&self) -> &str {
        match self {
            Caller::Open => "anonymous",
            Caller::Anonymous => "anonymous",
            Caller::Basic(p) | Caller::Bearer(p, _) => p.name(),
        }
    }

    /// The upload owner: `None` when access control is off.
    pub fn owner(&self) -> Option<&str> {
        match self {
            Caller::Open => None,
            other => Some(other.name()),
        }
    }
}

/// Decodes `Authorization: Basic`; `None` if absent or malformed.
pub fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

pub fn auth_error(auth: &Auth, e: AuthError, scope: Option<&str>) -> ApiError {
    match e {
        AuthError::Unauthorized(m) => unauthorized(auth, m, scope, false),
        AuthError::Denied(m) => ApiError::new(ErrorCode::Denied, m),
        AuthError::TooManyRequests { message, retry_after } => ApiError::new(ErrorCode::TooManyRequests, message)
            .with_header(
                header::RETRY_AFTER,
                HeaderValue::from(auth::service::retry_secs(retry_after)),
            ),
        AuthError::Internal(m) => ApiError::new(ErrorCode::Internal, m),
    }
}

fn unauthorized(auth: &Auth, message: String, scope: Option<&str>, insufficient: bool) -> ApiError {
    let challenge = auth.challenge(scope, insufficient);
    ApiError::new(ErrorCode::Unauthorized, message).with_header(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_str(&challenge).unwrap_or_else(|_| HeaderValue::from_static("Bearer")),
    )
}

/// Identifies the caller. Bad credentials are an error; no credentials make
/// an anonymous caller (who may still pull from public projects).
pub async fn authenticate(auth: Option<&Auth>, headers: &HeaderMap, client: &str) -> Result<Caller, ApiError> {
    let Some(auth) = auth else { return Ok(Caller::Open) };
    if let Some(token) = bearer(headers) {
        let (p, claims) = auth.verify_access(token).await.map_err(|e| auth_error(auth, e, None))?;
        return Ok(Caller::Bearer(p, claims.access));
    }
    if let Some((u, pw)) = basic_credentials(headers) {
        let p = auth
            .login(&u, &pw, client)
            .await
            .map_err(|e| auth_error(auth, e, None))?;
        return Ok(Caller::Basic(p));
    }
    Ok(Caller::Anonymous)
}

fn scope_for(repo: &RepoName, action: Action) -> String {
    let actions = match action {
        Action::Pull => "pull",
        Action::Push => "pull,push",
        Action::Delete => "delete",
    };
    format!("repository:{repo}:{actions}")
}

/// Requires that the caller may do `action` on `repo`.
pub async fn require(auth: Option<&Auth>, caller: &Caller, repo: &RepoName, action: Action) -> Result<(), ApiError> {
    let Some(auth) = auth else { return Ok(()) };
    let scope = scope_for(repo, action);
    let principal = match caller {
        Caller::Open => return Ok(()),
        Caller::Anonymous => &Principal::Anonymous,
        Caller::Basic(p) => p,
        Caller::Bearer(p, access) => {
            if access
                .iter()
                .any(|a| a.allows("repository", repo.as_str(), action.as_str()))
            {
                if action == Action::Push {
                    auth.ensure_project(p, repo.as_str())
                        .await
                        .map_err(|e| auth_error(auth, e, None))?;
                }
                return Ok(());
            }
            // The token lacks the scope. If the account may have it, the
            // client should fetch a new token; if not, say why.
            return match auth.permit(p, repo.as_str(), action).await {
                Ok(()) => Err(unauthorized(
                    auth,
                    format!(
                        "token does not grant {} on {repo}; request a token with scope {scope}",
                        action.as_str()
                    ),
                    Some(&scope),
                    true,
                )),
                Err(e) => Err(auth_error(auth, e, Some(&scope))),
            };
        }
    };
    auth.permit(principal, repo.as_str(), action)
        .await
        .map_err(|e| auth_error(auth, e, Some(&scope)))?;
    if action == Action::Push {
        auth.ensure_project(principal, repo.as_str())
            .await
            .map_err(|e| auth_error(auth, e, None))?;
    }
    Ok(())
}

/// Whether the caller may push to `repo`, without an error (signature
/// policy exemptions). A bearer token must carry the push scope.
pub async fn can_push(auth: Option<&Auth>, caller: &Caller, repo: &RepoName) -> bool {
    let Some(auth) = auth else { return true };
    match caller {
        Caller::Open => true,
        Caller::Anonymous => false,
        Caller::Basic(p) => auth.permit(p, repo.as_str(), Action::Push).await.is_ok(),
        Caller::Bearer(_, access) => access.iter().any(|a| a.allows("repository", repo.as_str(), "push")),
    }
}

/// Whether the caller may pull `repo`, without an error (mount sources,
/// catalog filtering). A bearer token must carry the pull scope.
pub async fn can_pull(auth: Option<&Auth>, caller: &Caller, repo: &str) -> bool {
    let Some(auth) = auth else { return true };
    match caller {
        Caller::Open => true,
        Caller::Anonymous => auth.permit(&Principal::Anonymous, repo, Action::Pull).await.is_ok(),
        Caller::Basic(p) => auth.permit(p, repo, Action::Pull).await.is_ok(),
        Caller::Bearer(p, access) => {
            access.iter().any(|a| a.allows("repository", repo, "pull"))
                || access.iter().any(|a| a.kind == "registry" && a.name == "catalog")
                    && auth.permit(p, repo, Action::Pull).await.is_ok()
        }
    }
}
