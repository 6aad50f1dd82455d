//! The JSON admin API under `/api/v1/`: users, projects and members, robot
//! accounts, and the audit log. Guarded by the same credentials as the
//! registry: system administrators may do everything; a project's admins
//! may manage its members.

use std::net::SocketAddr;
use std::sync::Arc;

use auth::admin::{self, AdminError};
use auth::audit::{self, AuditQuery};
use auth::{Auth, Principal};
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use metadata::Role;
use oci::ErrorCode;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use crate::access::{auth_error, authenticate, Caller};
use crate::error::ApiError;
use crate::{client_addr, App};

type AdminResult = Result<Response, ApiError>;

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/api/v1/users", get(list_users).post(create_user))
        .route("/api/v1/users/{name}", axum::routing::delete(delete_user))
        .route("/api/v1/users/{name}/password", put(set_password))
        .route("/api/v1/projects", get(list_projects).post(create_project))
        .route(
            "/api/v1/projects/{name}",
            get(get_project).patch(patch_project).delete(delete_project),
        )
        .route("/api/v1/projects/{name}/members", get(list_members))
        .route("/api/v1/projects/{name}/usage", get(project_usage))
        .route(
            "/api/v1/projects/{name}/members/{user}",
            put(set_member).delete(remove_member),
        )
        .route("/api/v1/robots", get(list_robots).post(create_robot))
        .route("/api/v1/robots/{name}/revoke", post(revoke_robot))
        .route("/api/v1/audit", get(query_audit))
}

fn admin_error(e: AdminError) -> ApiError {
    let code = match e {
        AdminError::Invalid(_) => ErrorCode::Invalid,
        AdminError::NotFound(_) => ErrorCode::NotFound,
        AdminError::Conflict(_) => ErrorCode::Conflict,
        AdminError::Backend(_) => ErrorCode::Internal,
    };
    ApiError::new(code, e.to_string())
}

/// What a request needs: a system administrator, or an admin of a project.
enum Need<'a> {
    SystemAdmin,
    ProjectAdmin(&'a str),
}

struct Ctx<'a> {
    auth: &'a Auth,
    who: Principal,
    client: String,
}

impl Ctx<'_> {
    fn audit(&self, action: &str, resource: &str, detail: &str) {
        self.auth
            .audit
            .record(self.who.name(), action, resource, &self.client, "ok", detail);
    }
}

async fn guard<'a>(
    app: &'a App,
    headers: &HeaderMap,
    addr: Option<Extension<ConnectInfo<SocketAddr>>>,
    need: Need<'_>,
) -> Result<Ctx<'a>, ApiError> {
    let Some(auth) = app.auth.as_ref() else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            "access control is off: start berth with --auth to manage users, projects and robots",
        ));
    };
    let client = client_addr(addr.map(|c| c.0 .0));
    let caller = authenticate(Some(auth), headers, &client).await?;
    let who = match caller {
        Caller::Basic(p) | Caller::Bearer(p, _) => p,
        _ => {
            return Err(auth_error(
                auth,
                auth::AuthError::Unauthorized("the admin API needs credentials".into()),
                None,
            ))
        }
    };
    let allowed = who.is_system_admin()
        || match (&need, &who) {
            (Need::ProjectAdmin(p), Principal::User { name, .. }) => {
                auth.store().get_role(p, name).await.ok().flatten() == Some(Role::Admin)
            }
            _ => false,
        };
    if !allowed {
        let what = match need {
            Need::SystemAdmin => "a system administrator".to_string(),
            Need::ProjectAdmin(p) => format!("a system administrator or an admin of project {p:?}"),
        };
        auth.audit
            .record(who.name(), "admin", "", &client, "denied", &format!("needs {what}"));
        return Err(ApiError::new(
            ErrorCode::Denied,
            format!("{} is not {what}", who.name()),
        ));
    }
    Ok(Ctx { auth, who, client })
}

/// Reads a JSON request body, after `guard` so that nothing about the
/// body is answered to an unauthenticated caller. The Content-Type is not
/// required (`curl -d` sends a form type), and a bad body gets the API's
/// JSON error.
fn json_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            ErrorCode::Invalid,
            format!("the request body is not the JSON expected: {e}"),
        )
    })
}

fn ok(v: serde_json::Value) -> AdminResult {
    Ok(Json(v).into_response())
}

fn created(v: serde_json::Value) -> AdminResult {
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

fn no_content() -> AdminResult {
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_users(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    a: Option<Extension<ConnectInfo<SocketAddr>>>,
) -> AdminResult {
    let ctx = guard(&app, &h, a, Need::SystemAdmin).await?;
    ok(json!(admin::list_users(ctx.auth.store().as_ref())
        .await
        .map_err(admin_error)?))
}

#[derive(Deserialize)]
struct NewUser {
    name: String,
    password: String,
    #[serde(default)]
    system_admin: bool,
}

async fn create_user(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    a: Option<Extension<ConnectInfo<SocketAddr>>>,
    body: Bytes,
) -> AdminResult {
    let ctx = guard(&app, &h, a, Need::SystemAdmin).await?;
    let u: NewUser = json_body(&body)?;
    let v = admin::create_user(ctx.auth.store().as_ref(), &u.name, &u.password, u.system_admin)
        .await
        .map_err(admin_error)?;
    ctx.audit("user_create", &u.name, if u.system_admin { "system admin" } else { "" });
    created(json!(v))
}

async fn delete_user(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    a: Option<Extension<ConnectInfo<SocketAddr>>>,
    Path(name): Path<String>,
) -> AdminResult {
    let ctx = guard(&app, &h, a, Need::SystemAdmin).await?;
    admin::delete_user(ctx.auth.store().as_ref(), &name)
        .await
        .map_err(admin_error)?;
    ctx.auth.forget(&name);
    ctx.audit("user_delete", &name, "");
    no_content()
}

#[derive(Deserialize)]
struct NewPassword {
    password: String,
}

async fn set_password(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    a: Option<Extension<ConnectInfo<SocketAddr>>>,
    Path(name): Path<String>,
    body: Bytes,
) -> AdminResult {
    let ctx = guard(&app, &h, a, Need::SystemAdmin).await?;
    let p: NewPassword = json_body(&body)?;
    admin::set_password(ctx.auth.store().as_ref(), &name, &p.password)
        .await
        .map_err(admin_error)?;
    ctx.auth.forget(&name);
    ctx.audit("user_password", &name, "");
    no_content()
}

async fn list_projects(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    a: Option<Extension<ConnectInfo<SocketAddr>>>,
) -> AdminResult {
    let ctx = guard(&app, &h, a, Need::SystemAdmin).await?;
    ok(json!(admin::list_projects(ctx.auth.store().as_ref())
        .await
        .map_err(admin_error)?))
}

#[derive(Deserialize)]
struct NewProject {
    name: String,
    #[serde(default)]
    public: bool,
}

async fn create_project(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    a: Option<Extension<ConnectInfo<SocketAddr>>>,
    body: Bytes,
) -> AdminResult {
    let ctx = guard(&app, &h, a, Need::SystemAdmin).await?;
    let p: NewProject = json_body(&body)?;
    let v = admin::create_project(ctx.auth.store().as_ref(), &p.name, p.public)
        .await
        .map_err(admin_error)?;
    ctx.audit("project_create", &p.name, if p.public { "public" } else { "private" });
    created(json!(v))
}

async fn get_project(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    a: Option<Extension<ConnectInfo<SocketAddr>>>,
    Path(name): Path<String>,
) -> AdminResult {
    let ctx = guard(&app, &h, a, Need::ProjectAdmin(&name)).await?;
    ok(json!(admin::get_project(ctx.auth.store().as_ref(), &name)
        .await
        .map_err(admin_error)?))
}

/// Storage the project uses, as its quota counts it (each blob once).
async fn project_usage(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    a: Option<Extension<ConnectInfo<SocketAddr>>>,
    Path(name): Path<String>,
) -> AdminResult {
    let ctx = guard(&app, &h, a, Need::ProjectAdmin(&name)).await?;
    admin::get_project(ctx.auth.store().as_ref(), &name)
        .await
        .map_err(admin_error)?;
    let u = app.registry.project_usage(&name).await?;
    ok(json!({"project": name, "bytes": u.bytes, "quota": u.quota}))
}

#[derive(Deserialize)]
struct ProjectPatch {
    public: bool,
}

async fn patch_project(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    a: Option<Extension<ConnectInfo<SocketAddr>>>,
    Path(name): Path<String>,
    body: Bytes,
) -> AdminResult {
    let ctx = guard(&app, &h, a, Need::SystemAdmin).await?;
    let p: ProjectPatch = json_body(&body)?;
    let v = admin::set_public(ctx.auth.store().as_ref(), &name, p.public)
        .await
        .map_err(admin_error)?;
    ctx.audit("project_update", &name, if p.public { "public" } else { "private" });
    ok(json!(v))
}

async fn delete_project(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    a: Option<Extension<ConnectInfo<SocketAddr>>>,
    Path(name): Path<String>,
) -> AdminResult {
    let ctx = guard(&app, &h, a, Need::SystemAdmin).await?;
    admin::delete_project(ctx.auth.store().as_ref(), &name)
        .await
        .map_err(admin_error)?;
    ctx.audit("project_delete", &name, "");
    no_content()
}

async fn list_members(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    a: Option<Extension<ConnectInfo<SocketAddr>>>,
    Path(name): Path<String>,
) -> AdminResult {
    let ctx = guard(&app, &h, a, Need::ProjectAdmin(&name)).await?;
    let members = admin::list_members(ctx.auth.store().as_ref(), &name)
        .await
        .map_err(admin_error)?;
    let list: Vec<_> = members
        .into_iter()
        .map(|(u, r)| json!({"user": u, "role": r}))
        .collect();
    ok(json!(list))
}

#[derive(Deserialize)]
struct Membership {
    role: String,
}

async fn set_member(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    a: Option<Extension<ConnectInfo<SocketAddr>>>,
    Path((name, user)): Path<(String, String)>,
    body: Bytes,
) -> AdminResult {
    let ctx = guard(&app, &h, a, Need::ProjectAdmin(&name)).await?;
    let m: Membership = json_body(&body)?;
    let role = Role::parse(&m.role).ok_or_else(|| {
        admin_error(AdminError::Invalid(format!(
            "unknown role {:?}: use guest, developer, maintainer or admin",
            m.role
        )))
    })?;
    admin::set_member(ctx.auth.store().as_ref(), &name, &user, Some(role))
        .await
        .map_err(admin_error)?;
    ctx.audit("member_set", &format!("{name}/{user}"), role.as_str());
    no_content()
}

async fn remove_member(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    a: Option<Extension<ConnectInfo<SocketAddr>>>,
    Path((name, user)): Path<(String, String)>,
) -> AdminResult {
    let ctx = guard(&app, &h, a, Need::ProjectAdmin(&name)).await?;
    admin::set_member(ctx.auth.store().as_ref(), &name, &user, None)
        .await
        .map_err(admin_error)?;
    ctx.audit("member_remove", &format!("{name}/{user}"), "");
    no_content()
}

async fn list_robots(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    a: Option<Extension<ConnectInfo<SocketAddr>>>,
) -> AdminResult {
    let ctx = guard(&app, &h, a, Need::SystemAdmin).await?;
    ok(json!(admin::list_robots(ctx.auth.store().as_ref())
        .await
        .map_err(admin_error)?))
}

#[derive(Deserialize)]
struct NewRobot {
    name: String,
    /// e.g. ["team:pull,push"]
    grants: Vec<String>,
    /// e.g. "90d"; absent means no expiry.
    #[serde(default)]
    expires_in: Option<String>,
    #[serde(default)]
    description: String,
}

async fn create_robot(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    a: Option<Extension<ConnectInfo<SocketAddr>>>,
    body: Bytes,
) -> AdminResult {
    let ctx = guard(&app, &h, a, Need::SystemAdmin).await?;
    let r: NewRobot = json_body(&body)?;
    let grants = r
        .grants
        .iter()
        .map(|g| admin::parse_grant(g))
        .collect::<Result<Vec<_>, _>>()
        .map_err(admin_error)?;
    let ttl = r
        .expires_in
        .as_deref()
        .map(admin::parse_duration)
        .transpose()
        .map_err(admin_error)?;
    let (view, secret) = admin::create_robot(ctx.auth.store().as_ref(), &r.name, grants, ttl, &r.description)
        .await
        .map_err(admin_error)?;
    ctx.audit("robot_create", &view.name, &r.grants.join(" "));
    created(json!({"robot": view, "secret": secret}))
}

async fn revoke_robot(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    a: Option<Extension<ConnectInfo<SocketAddr>>>,
    Path(name): Path<String>,
) -> AdminResult {
    let ctx = guard(&app, &h, a, Need::SystemAdmin).await?;
    admin::revoke_robot(ctx.auth.store().as_ref(), &name)
        .await
        .map_err(admin_error)?;
    let full = if name.starts_with("robot$") {
        name.clone()
    } else {
        format!("robot${name}")
    };
    ctx.auth.forget(&full);
    ctx.audit("robot_revoke", &full, "");
    no_content()
}

#[derive(Deserialize)]
struct AuditParams {
    actor: Option<String>,
    action: Option<String>,
    resource: Option<String>,
    result: Option<String>,
    since: Option<String>,
    last: Option<usize>,
}

async fn query_audit(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    a: Option<Extension<ConnectInfo<SocketAddr>>>,
    params: Result<axum::extract::Query<AuditParams>, QueryRejection>,
) -> AdminResult {
    let ctx = guard(&app, &h, a, Need::SystemAdmin).await?;
    let axum::extract::Query(p) =
        params.map_err(|e| ApiError::new(ErrorCode::Invalid, format!("invalid audit query: {}", e.body_text())))?;
    let Some(path) = ctx.auth.audit.path() else {
        return ok(json!([]));
    };
    let q = AuditQuery {
        actor: p.actor,
        action: p.action,
        resource: p.resource,
        result: p.result,
        since: p.since,
        last: p.last.or(Some(1000)),
    };
    let records = audit::query(path, &q).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    ok(json!(records))
}
