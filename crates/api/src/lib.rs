//! The HTTP API of the OCI Distribution Spec, the token endpoint and the
//! admin API. This is the only crate that knows HTTP: it parses requests
//! into validated types, checks access, calls the registry service, and
//! renders results and errors as the spec says.

use std::net::SocketAddr;
use std::sync::Arc;

use auth::{Action, Auth};
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use oci::ErrorCode;
use registry::Registry;

pub mod access;
mod admin;
mod blobs;
pub mod error;
mod lists;
mod manifests;
pub mod ops;
mod proxied;
pub mod request;
pub mod route;
pub mod signed;
pub mod telemetry;
mod token;

use access::Caller;
pub use error::{ApiError, ApiResult};
use request::Query;
use route::Route;

/// Everything a request handler can reach.
pub struct App {
    pub registry: Arc<Registry>,
    /// The pull-through cache; `None` when no upstream is configured.
    pub proxy: Option<Arc<proxy::Proxy>>,
    /// `None` when access control is off.
    pub auth: Option<Auth>,
    /// A request body that sends nothing for this long fails.
    pub body_idle_timeout: std::time::Duration,
    /// Signature policies; `None` when none is configured.
    pub signatures: Option<Arc<signed::Policies>>,
    rendered_catalog: lists::RenderedCatalog,
}

impl App {
    pub fn new(registry: Arc<Registry>, auth: Option<Auth>) -> App {
        App {
            registry,
            proxy: None,
            auth,
            body_idle_timeout: std::time::Duration::from_secs(60),
            signatures: None,
            rendered_catalog: lists::RenderedCatalog::default(),
        }
    }
}

pub type AppState = Arc<App>;

/// Marks a request that came over plain TCP, without TLS; the server puts
/// it in the request's extensions.
#[derive(Clone, Copy, Debug)]
pub struct PlainTcp;

/// The registry's HTTP routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v2", get(ping).head(ping))
        .route("/v2/", get(ping).head(ping))
        .route("/token", get(token_get).post(token_post))
        .merge(admin::routes())
        // Everything else under /v2/ is routed by `route::parse`: as the
        // fallback rather than a `{*rest}` route, axum does not percent-decode
        // and store a path parameter nobody reads for every request.
        .fallback(dispatch)
        .layer(axum::middleware::map_response(api_version_header))
        .with_state(app)
}

async fn api_version_header(mut resp: Response) -> Response {
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    resp
}

/// A header value from text we built (digests, locations, ranges): always
/// valid, and empty rather than a panic if that ever stopped being true.
pub(crate) fn hv(s: impl AsRef<str>) -> HeaderValue {
    HeaderValue::from_str(s.as_ref()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The client address, for the audit log and login limiting.
pub fn client_addr(addr: Option<SocketAddr>) -> String {
    addr.map(|a| a.ip().to_string()).unwrap_or_else(|| "unknown".into())
}

fn connect_addr(req: &Request<Body>) -> String {
    client_addr(req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0))
}

/// `GET /v2/`: with access control, only for authenticated callers, which
/// is how clients discover the token service (`docker login`).
async fn ping(State(app): State<AppState>, req: Request<Body>) -> ApiResult {
    if let Some(auth) = app.auth.as_ref() {
        let caller = access::authenticate(Some(auth), req.headers(), &connect_addr(&req)).await?;
        if matches!(caller, Caller::Anonymous) {
            return Err(access::auth_error(
                auth,
                auth::AuthError::Unauthorized("authentication required".into()),
                None,
            ));
        }
    }
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], "{}").into_response())
}

async fn token_get(State(app): State<AppState>, req: Request<Body>) -> ApiResult {
    let auth = auth_on(&app)?;
    let q = Query::parse(req.uri().query());
    token::get(auth, &q, req.headers(), &connect_addr(&req)).await
}

async fn token_post(State(app): State<AppState>, req: Request<Body>) -> ApiResult {
    let auth = auth_on(&app)?;
    let client = connect_addr(&req);
    let (parts, body) = req.into_parts();
    token::post(auth, &parts.headers, body, &client).await
}

fn auth_on(app: &App) -> Result<&Auth, ApiError> {
    app.auth
        .as_ref()
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "access control is off; no token service"))
}

async fn not_found() -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        "no such endpoint; registry endpoints are under /v2/",
    )
}

fn unsupported(method: &Method) -> ApiError {
    ApiError::new(
        ErrorCode::Unsupported,
        format!("method {method} is not supported on this endpoint"),
    )
}

/// The action a request needs on its repository.
fn action_of(route: &Route, method: &Method) -> Option<Action> {
    match (route, method) {
        (Route::Catalog, _) => None,
        (_, &Method::GET | &Method::HEAD) => match route {
            Route::Upload(..) => Some(Action::Push),
            _ => Some(Action::Pull),
        },
        (Route::Upload(..) | Route::UploadStart(_), _) => Some(Action::Push),
        (Route::Manifest(..), &Method::PUT) => Some(Action::Push),
        (Route::Manifest(..) | Route::Blob(..), &Method::DELETE) => Some(Action::Delete),
        _ => None,
    }
}

/// Per-request context for the handlers.
pub(crate) struct Ctx<'a> {
    pub app: &'a App,
    pub caller: Caller,
    /// The client's address; empty without access control, its only user.
    pub client: String,
    /// The response goes out over plain TCP as HTTP/1: its body bytes are
    /// only read by the kernel (no TLS, no HTTP/2 framing), so blob bodies
    /// may be mapped file pages (`storage::SocketReads`).
    pub plain_socket: bool,
}

impl Ctx<'_> {
    pub fn reg(&self) -> &Registry {
        &self.app.registry
    }

    pub fn auth(&self) -> Option<&Auth> {
        self.app.auth.as_ref()
    }

    /// Records a push, pull or delete in the audit log (with access control on).
    pub fn audit(&self, action: &str, resource: &str, result: &str, detail: &str) {
        if let Some(auth) = self.auth() {
            auth.audit
                .record(self.caller.name(), action, resource, &self.client, result, detail);
        }
    }
}

async fn dispatch(State(app): State<AppState>, req: Request<Body>) -> ApiResult {
    // Only access control uses the address (audit, login limits): without
    // it, no text is made for every request.
    let client = match app.auth {
        Some(_) => connect_addr(&req),
        None => String::new(),
    };
    let (parts, body) = req.into_parts();
    let Some(rest) = parts.uri.path().strip_prefix("/v2/") else {
        return Err(not_found().await);
    };
    let mut route = match route::parse(rest) {
        None => return Err(not_found().await),
        Some(r) => r?,
    };
    let q = Query::parse(parts.uri.query());
    if let Some(proxy) = app.proxy.as_deref() {
        proxied::rewrite_ns(proxy, &mut route, q.get("ns"));
    }
    let h = &parts.headers;
    let m = &parts.method;
    let caller = access::authenticate(app.auth.as_ref(), h, &client).await?;
    let ctx = Ctx {
        app: &app,
        caller,
        client,
        plain_socket: parts.extensions.get::<PlainTcp>().is_some() && parts.version <= axum::http::Version::HTTP_11,
    };
    if let (Some(action), Some(repo)) = (action_of(&route, m), route.repo()) {
        if let Err(e) = access::require(ctx.auth(), &ctx.caller, repo, action).await {
            if e.error.code == ErrorCode::Denied {
                ctx.audit(action.as_str(), repo.as_str(), "denied", &e.error.message);
            }
            return Err(e);
        }
    }
    handle(&ctx, route, m, &q, h, body).await
}

async fn handle(ctx: &Ctx<'_>, route: Route, m: &Method, q: &Query, h: &HeaderMap, body: Body) -> ApiResult {
    let Some(proxy) = ctx.app.proxy.as_deref() else {
        return handle_local(ctx, route, m, q, h, body).await;
    };
    if let Some(r) = proxied::intercept(ctx, proxy, &route, m, h).await {
        return r;
    }
    let mirror = proxied::mirror_route(proxy, &route, m);
    match (handle_local(ctx, route, m, q, h, body).await, mirror) {
        (Err(e), Some(route)) if proxied::is_miss(e.error.code) => proxied::via_mirror(ctx, proxy, route, m, h).await,
        (r, _) => r,
    }
}

async fn handle_local(ctx: &Ctx<'_>, route: Route, m: &Method, q: &Query, h: &HeaderMap, body: Body) -> ApiResult {
    match route {
        Route::Catalog if m == Method::GET => lists::catalog(ctx, q).await,
        Route::Tags(name) if m == Method::GET => lists::tags(ctx.reg(), &name, q).await,
        Route::Referrers(name, d) if m == Method::GET => lists::referrers(ctx.reg(), &name, &d, q).await,
        Route::Manifest(name, r) => match *m {
            Method::GET => manifests::get(ctx, &name, &r, true).await,
            Method::HEAD => manifests::get(ctx, &name, &r, false).await,
            Method::PUT => manifests::put(ctx, &name, &r, q, h, body).await,
            Method::DELETE => manifests::delete(ctx, &name, &r).await,
            _ => Err(unsupported(m)),
        },
        Route::Blob(name, d) => match *m {
            Method::GET => blobs::get(ctx.reg(), &name, &d, h, true, ctx.plain_socket).await,
            Method::HEAD => blobs::get(ctx.reg(), &name, &d, h, false, ctx.plain_socket).await,
            Method::DELETE => blobs::delete(ctx, &name, &d).await,
            _ => Err(unsupported(m)),
        },
        Route::UploadStart(name) if m == Method::POST => blobs::start(ctx, &name, q, body).await,
        Route::Upload(name, id) => {
            let (reg, owner) = (ctx.reg(), ctx.caller.owner());
            match *m {
                Method::GET => blobs::status(reg, &name, &id, owner).await,
                Method::PATCH => blobs::patch(ctx, &name, &id, owner, h, body).await,
                Method::PUT => blobs::finish(ctx, &name, &id, owner, q, h, body).await,
                Method::DELETE => blobs::cancel(reg, &name, &id, owner).await,
                _ => Err(unsupported(m)),
            }
        }
        _ => Err(unsupported(m)),
    }
}
