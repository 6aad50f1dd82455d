//! Catalog, tags list and referrers.

use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use oci::{Digest, RepoName};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use registry::listing::Page;
use registry::Registry;
use serde::Serialize;
use serde_json::json;

use crate::error::ApiResult;
use crate::request::Query;
use crate::Ctx;

/// A JSON response with, when more entries follow, the `Link` header to the
/// next page (RFC 5988, as the spec uses it).
fn paged(body: impl Into<Body>, page: &Page, base: &str, n: Option<usize>) -> Response {
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.into(),
    )
        .into_response();
    if let (true, Some(last)) = (page.more, page.items.last()) {
        let n = n.unwrap_or(page.items.len());
        let last = utf8_percent_encode(last, NON_ALPHANUMERIC);
        if let Ok(v) = HeaderValue::from_str(&format!("<{base}?n={n}&last={last}>; rel=\"next\"")) {
            resp.headers_mut().insert(header::LINK, v);
        }
    }
    resp
}

#[derive(Serialize)]
struct Catalog<'a> {
    repositories: &'a [String],
}

fn catalog_json(page: &Page) -> Bytes {
    serde_json::to_vec(&Catalog {
        repositories: &page.items,
    })
    .map(Bytes::from)
    .unwrap_or_else(|_| Bytes::from_static(b"{\"repositories\":[]}"))
}

/// The JSON of the last catalog page rendered, with that page: a page the
/// registry serves from its cache (the same `Arc`) is rendered once.
#[derive(Default)]
pub struct RenderedCatalog(Mutex<Option<(Arc<Page>, Bytes)>>);

impl RenderedCatalog {
    fn body(&self, page: &Arc<Page>) -> Bytes {
        let mut memo = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((p, body)) = memo.as_ref() {
            if Arc::ptr_eq(p, page) {
                return body.clone();
            }
        }
        let body = catalog_json(page);
        *memo = Some((page.clone(), body.clone()));
        body
    }
}

/// The catalog lists only repositories the caller may pull, so with access
/// control a page is filled from as many index pages as it takes.
pub async fn catalog(ctx: &Ctx<'_>, q: &Query) -> ApiResult {
    let n = q.n()?;
    let (page, body) = match ctx.auth() {
        None => {
            let page = ctx.reg().catalog(n, q.get("last")).await?;
            let body = ctx.app.rendered_catalog.body(&page);
            (page, body)
        }
        Some(_) => {
            let page = filtered_catalog(ctx, n, q.get("last")).await?;
            let body = catalog_json(&page);
            (Arc::new(page), body)
        }
    };
    Ok(paged(body, &page, "/v2/_catalog", n))
}

pub async fn tags(reg: &Registry, name: &RepoName, q: &Query) -> ApiResult {
    let n = q.n()?;
    let page = reg.tags(name, n, q.get("last")).await?;
    let base = format!("/v2/{name}/tags/list");
    Ok(paged(
        json!({ "name": name.as_str(), "tags": page.items }).to_string(),
        &page,
        &base,
        n,
    ))
}

pub async fn referrers(reg: &Registry, name: &RepoName, subject: &Digest, q: &Query) -> ApiResult {
    let artifact_type = q.get("artifactType").filter(|t| !t.is_empty());
    let list = reg.referrers(name, subject, artifact_type).await?;
    let body = json!({
        "schemaVersion": 2,
        "mediaType": oci::media::OCI_INDEX,
        "manifests": list,
    });
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, oci::media::OCI_INDEX)],
        body.to_string(),
    )
        .into_response();
    if artifact_type.is_some() {
        resp.headers_mut()
            .insert("oci-filters-applied", HeaderValue::from_static("artifactType"));
    }
    Ok(resp)
}

async fn filtered_catalog(ctx: &Ctx<'_>, n: Option<usize>, last: Option<&str>) -> Result<Page, crate::ApiError> {
    let want = n
        .unwrap_or(registry::listing::DEFAULT_PAGE)
        .min(registry::listing::MAX_PAGE);
    let mut items = Vec::new();
    let mut cursor = last.map(str::to_string);
    // Decisions are per project; remember them for this request.
    let mut decided: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
    loop {
        let page = ctx.reg().catalog(Some(want.max(100)), cursor.as_deref()).await?;
        for repo in &page.items {
            let project = repo.split('/').next().unwrap_or(repo).to_string();
            let allowed = match decided.get(&project) {
                Some(a) => *a,
                None => {
                    let a = crate::access::can_pull(ctx.auth(), &ctx.caller, repo).await;
                    decided.insert(project, a);
                    a
                }
            };
            if allowed {
                if items.len() == want {
                    return Ok(Page { items, more: true });
                }
                items.push(repo.clone());
            }
        }
        if !page.more {
            return Ok(Page { items, more: false });
        }
        cursor = page.items.last().cloned();
    }
}
