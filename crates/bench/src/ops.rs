//! One operation of each scenario. An operation is what the statistics
//! count: one request for most scenarios, several for push, catalog-walk
//! and pull-image.

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE, LINK, RANGE};
use http::{HeaderMap, Method};
use oci::{Digest, Manifest};

use crate::auth::Scope;
use crate::conn::{self, Conn};
use crate::data::MANIFEST_ACCEPT;
use crate::options::Scenario;
use crate::outcome::{Done, Failure, Outcome};
use crate::plan::Plan;
use crate::push;
use crate::rng::Rng;

/// Pages after which a catalog walk is called a loop.
const MAX_PAGES: u32 = 100_000;

pub async fn run(c: &mut Conn, plan: &Plan, s: Scenario, rng: &mut Rng) -> Outcome {
    match s {
        Scenario::Catalog => get(c, &plan.catalog_path, Scope::Catalog).await,
        Scenario::CatalogPage => get(c, &plan.catalog_page_path, Scope::Catalog).await,
        Scenario::CatalogWalk => walk(c, &plan.catalog_page_path).await,
        Scenario::Tags => get(c, &plan.tags_path, Scope::Pull(&plan.repo)).await,
        Scenario::ManifestGet => manifest(c, plan, Method::GET).await,
        Scenario::ManifestHead => manifest(c, plan, Method::HEAD).await,
        Scenario::BlobGet => blob(c, plan, rng).await,
        Scenario::Push => match &plan.push {
            Some(p) => push::blob(c, &p.repo, &p.data, &p.digest, p.chunk).await,
            None => Err(Failure::other("push was not prepared")),
        },
        Scenario::PullImage => pull(c, plan).await,
        Scenario::Mixed => Err(Failure::other("mixed is a mix, not an operation")),
    }
}

async fn get(c: &mut Conn, path: &str, scope: Scope<'_>) -> Outcome {
    let b = c.request(Method::GET, path, scope).await?;
    let resp = conn::check(c.send(conn::with_body(b, Bytes::new())?).await?, &[200]).await?;
    Ok(Done::one(conn::drain(resp.into_body(), None).await?))
}

/// The next page's path from a `Link: <...>; rel="next"` header.
pub fn next_link(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(LINK)?.to_str().ok()?;
    if !v.contains("rel=\"next\"") && !v.contains("rel=next") {
        return None;
    }
    let start = v.find('<')? + 1;
    let end = start + v[start..].find('>')?;
    Some(conn::location_path(&v[start..end]))
}

async fn walk(c: &mut Conn, first: &str) -> Outcome {
    let mut path = first.to_string();
    let mut done = Done::default();
    for _ in 0..MAX_PAGES {
        let b = c.request(Method::GET, &path, Scope::Catalog).await?;
        let resp = conn::check(c.send(conn::with_body(b, Bytes::new())?).await?, &[200]).await?;
        let next = next_link(resp.headers());
        done = done.add(Done::one(conn::drain(resp.into_body(), None).await?));
        match next {
            Some(n) => path = n,
            None => return Ok(done),
        }
    }
    Err(Failure::other(
        "catalog walk: more than 100000 pages; is the Link header looping?",
    ))
}

async fn manifest(c: &mut Conn, plan: &Plan, method: Method) -> Outcome {
    let b = c
        .request(method, &plan.manifest_path, Scope::Pull(&plan.repo))
        .await?
        .header(ACCEPT, MANIFEST_ACCEPT);
    let resp = conn::check(c.send(conn::with_body(b, Bytes::new())?).await?, &[200]).await?;
    Ok(Done::one(conn::drain(resp.into_body(), None).await?))
}

async fn blob(c: &mut Conn, plan: &Plan, rng: &mut Rng) -> Outcome {
    let Some(blob) = &plan.blob else {
        return Err(Failure::other("blob-get was not prepared"));
    };
    let mut b = c.request(Method::GET, &blob.path, Scope::Pull(&plan.repo)).await?;
    let expected = match plan.range {
        Some(len) if blob.size > 0 => {
            let len = len.min(blob.size);
            let start = rng.below(blob.size - len + 1);
            b = b.header(RANGE, format!("bytes={start}-{}", start + len - 1));
            206
        }
        _ => 200,
    };
    let resp = conn::check(c.send(conn::with_body(b, Bytes::new())?).await?, &[expected]).await?;
    Ok(Done::one(conn::drain(resp.into_body(), None).await?))
}

/// GET a manifest and check it hashes to `expect` when that is known.
async fn fetch_manifest(
    c: &mut Conn,
    repo: &str,
    path: &str,
    expect: Option<&Digest>,
) -> Result<(Manifest, Done), Failure> {
    let b = c
        .request(Method::GET, path, Scope::Pull(repo))
        .await?
        .header(ACCEPT, MANIFEST_ACCEPT);
    let resp = conn::check(c.send(conn::with_body(b, Bytes::new())?).await?, &[200]).await?;
    let media_type = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = conn::read_all(resp.into_body(), conn::SMALL_BODY).await?;
    if let Some(d) = expect {
        if !d.verify(&body) {
            return Err(Failure::other(format!("digest mismatch: manifest {path}")));
        }
    }
    let m =
        Manifest::parse(&body, media_type.as_deref()).map_err(|e| Failure::other(format!("invalid manifest: {e}")))?;
    Ok((m, Done::one(body.len() as u64)))
}

/// What a node does: HEAD the tag for its digest, GET the manifest by that
/// digest (and for an index, the linux/amd64 or first child), then the
/// config and every layer, each verified against its digest.
async fn pull(c: &mut Conn, plan: &Plan) -> Outcome {
    let repo = plan.repo.as_str();
    let b = c
        .request(Method::HEAD, &plan.image_path, Scope::Pull(repo))
        .await?
        .header(ACCEPT, MANIFEST_ACCEPT);
    let resp = conn::check(c.send(conn::with_body(b, Bytes::new())?).await?, &[200]).await?;
    let digest: Option<Digest> = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    conn::drain(resp.into_body(), None).await?;
    let mut done = Done::one(0);
    let path = match &digest {
        Some(d) => format!("/v2/{repo}/manifests/{d}"),
        None => plan.image_path.clone(),
    };
    let (mut manifest, d) = fetch_manifest(c, repo, &path, digest.as_ref()).await?;
    done = done.add(d);
    if !manifest.manifests.is_empty() {
        let child = manifest
            .manifests
            .iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_some_and(|p| p["os"] == "linux" && p["architecture"] == "amd64")
            })
            .unwrap_or(&manifest.manifests[0])
            .digest
            .clone();
        let (m, d) = fetch_manifest(c, repo, &format!("/v2/{repo}/manifests/{child}"), Some(&child)).await?;
        manifest = m;
        done = done.add(d);
    }
    for desc in manifest.config.iter().chain(manifest.layers.iter()) {
        if oci::media::is_non_distributable(&desc.media_type) {
            continue;
        }
        let path = format!("/v2/{repo}/blobs/{}", desc.digest);
        let b = c.request(Method::GET, &path, Scope::Pull(repo)).await?;
        let resp = conn::check(c.send(conn::with_body(b, Bytes::new())?).await?, &[200]).await?;
        let mut hasher = desc.digest.algorithm().hasher();
        let n = conn::drain(resp.into_body(), Some(&mut hasher)).await?;
        if hasher.finish() != desc.digest || n != desc.size {
            return Err(Failure::other(format!("digest mismatch: blob {}", desc.digest)));
        }
        done = done.add(Done::one(n));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn link_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(next_link(&h), None);
        h.insert(
            LINK,
            HeaderValue::from_static("</v2/_catalog?last=a%2Fb&n=100>; rel=\"next\""),
        );
        assert_eq!(next_link(&h).as_deref(), Some("/v2/_catalog?last=a%2Fb&n=100"));
        h.insert(
            LINK,
            HeaderValue::from_static("<http://r:5000/v2/_catalog?n=2&last=x>; rel=\"next\""),
        );
        assert_eq!(next_link(&h).as_deref(), Some("/v2/_catalog?n=2&last=x"));
        h.insert(LINK, HeaderValue::from_static("</x>; rel=\"prev\""));
        assert_eq!(next_link(&h), None);
    }
}
