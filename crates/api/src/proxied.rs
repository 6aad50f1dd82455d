//! Requests for pull-through cache repositories (crate `proxy`): pulls are
//! served through the cache, writes refused; containerd's `?ns=` names the
//! upstream; with a mirror upstream, pulls missing locally fall through to
//! it (Docker's `registry-mirrors`).

use auth::Action;
use axum::http::{HeaderMap, Method};
use oci::ErrorCode;
use proxy::{CachedBlob, Proxy};

use crate::error::ApiResult;
use crate::route::Route;
use crate::{blobs, manifests, Ctx};

/// `?ns=<registry>`: the route as it addresses the cache of that registry.
pub fn rewrite_ns(proxy: &Proxy, route: &mut Route, ns: Option<&str>) {
    let Some(ns) = ns else { return };
    if let Some(repo) = route.repo_mut() {
        if let Some(cached) = proxy.rewrite_ns(repo, ns) {
            *repo = cached;
        }
    }
}

fn is_pull(route: &Route, m: &Method) -> bool {
    matches!(route, Route::Manifest(..) | Route::Blob(..)) && (m == Method::GET || m == Method::HEAD)
}

/// Serves the request if it addresses a cache repository: a pull through
/// the cache, or a refused write. `None` for everything else.
pub async fn intercept(ctx: &Ctx<'_>, proxy: &Proxy, route: &Route, m: &Method, h: &HeaderMap) -> Option<ApiResult> {
    let repo = match route {
        Route::Manifest(n, _) | Route::Blob(n, _) | Route::UploadStart(n) | Route::Upload(n, _) => n,
        _ => return None,
    };
    let cache = proxy.cache_of(repo)?;
    if !is_pull(route, m) {
        return proxy.read_only(repo).map(|e| Err(e.into()));
    }
    let with_body = m == Method::GET;
    Some(match route {
        Route::Manifest(name, r) => match proxy.manifest(cache, name, r, with_body).await {
            Ok(body) => match crate::signed::check(ctx, name, r, &body).await {
                Ok(()) => Ok(manifests::send(ctx, name, r, body, with_body)),
                Err(e) => Err(e),
            },
            Err(e) => Err(e.into()),
        },
        Route::Blob(name, d) => match proxy.blob(cache, name, d, with_body).await {
            Ok(CachedBlob::Local(b)) => {
                let size = b.size;
                blobs::send(d, Some(size), h, with_body, |range| {
                    blobs::read(b, range, ctx.plain_socket)
                })
                .await
            }
            Ok(CachedBlob::Filling { size, reader }) => {
                blobs::send(d, size, h, with_body, |range| async move {
                    Ok(match range {
                        Some(r) => reader(r.start, Some(r.end)),
                        None => reader(0, None),
                    })
                })
                .await
            }
            // No length, no ranges: the whole blob as it arrives.
            Ok(CachedBlob::Direct(stream)) => blobs::send(d, None, h, true, |_| async { Ok(stream) }).await,
            Ok(CachedBlob::Remote { size }) => blobs::send(d, size, h, false, |_| async { unreachable_read() }).await,
            Err(e) => Err(e.into()),
        },
        _ => return None,
    })
}

/// A HEAD never reads the body.
fn unreachable_read() -> registry::Result<storage::ByteStream> {
    Err(registry::RegistryError::new(ErrorCode::Internal, "no body for HEAD"))
}

/// With a mirror upstream: the route a pull that missed locally retries
/// through the cache.
pub fn mirror_route(proxy: &Proxy, route: &Route, m: &Method) -> Option<Route> {
    if !is_pull(route, m) {
        return None;
    }
    Some(match route {
        Route::Manifest(n, r) => Route::Manifest(proxy.mirror_of(n)?, r.clone()),
        Route::Blob(n, d) => Route::Blob(proxy.mirror_of(n)?, d.clone()),
        _ => return None,
    })
}

/// Whether a local miss should fall through to the mirror.
pub fn is_miss(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::ManifestUnknown | ErrorCode::BlobUnknown | ErrorCode::NameUnknown
    )
}

/// Retries a pull through the mirror, with the caller's access to the
/// cache repository checked like any other.
pub async fn via_mirror(ctx: &Ctx<'_>, proxy: &Proxy, route: Route, m: &Method, h: &HeaderMap) -> ApiResult {
    if let Some(repo) = match &route {
        Route::Manifest(n, _) | Route::Blob(n, _) => Some(n),
        _ => None,
    } {
        crate::access::require(ctx.auth(), &ctx.caller, repo, Action::Pull).await?;
    }
    match intercept(ctx, proxy, &route, m, h).await {
        Some(r) => r,
        None => Err(crate::not_found().await),
    }
}
