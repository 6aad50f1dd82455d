//! Resolves what a scenario works on before the clock starts: paths, the
//! image's digest and largest layer, the bytes to push. A missing image is
//! reported here, with how to create it, rather than as a run of 404s.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
use http::Method;
use oci::{Digest, Manifest, RepoName, Tag};

use crate::auth::Scope;
use crate::conn::{self, Conn};
use crate::data;
use crate::options::{PlanOptions, Scenario};
use crate::rng::Rng;
use crate::target::Target;

pub struct Blob {
    pub path: String,
    pub size: u64,
}

pub struct PushData {
    pub repo: String,
    pub data: Bytes,
    pub digest: Digest,
    pub chunk: Option<u64>,
}

pub struct Plan {
    pub repo: String,
    /// The image as given (tag or digest): what pull-image resolves.
    pub image_path: String,
    /// What manifest-get and manifest-head ask for (tag, or digest with --by-digest).
    pub manifest_path: String,
    pub tags_path: String,
    pub catalog_path: String,
    pub catalog_page_path: String,
    pub blob: Option<Blob>,
    pub range: Option<u64>,
    pub push: Option<PushData>,
    mix: Vec<(Scenario, u32)>,
    total_weight: u64,
    pub random_seed: u64,
}

impl Plan {
    /// The scenario of the next operation: the one asked for, or a weighted
    /// draw for `mixed`.
    pub fn pick(&self, rng: &mut Rng) -> Scenario {
        if self.mix.len() == 1 {
            return self.mix[0].0;
        }
        let mut x = rng.below(self.total_weight);
        for (s, w) in &self.mix {
            if x < u64::from(*w) {
                return *s;
            }
            x -= u64::from(*w);
        }
        self.mix[self.mix.len() - 1].0
    }
}

/// `REPO:TAG` or `REPO@DIGEST`; a bare `REPO` means `REPO:latest`.
pub fn parse_image(s: &str) -> Result<(RepoName, String), String> {
    let bad =
        |why: String| format!("bad --image {s:?}: {why}; write REPO:TAG or REPO@DIGEST, e.g. bench/r00000:latest");
    let (repo, reference) = if let Some((r, d)) = s.split_once('@') {
        d.parse::<Digest>().map_err(|e| bad(e.to_string()))?;
        (r, d.to_string())
    } else {
        match s.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => {
                t.parse::<Tag>().map_err(|e| bad(e.to_string()))?;
                (r, t.to_string())
            }
            _ => (s, "latest".to_string()),
        }
    };
    let repo = repo.parse::<RepoName>().map_err(|e| bad(e.to_string()))?;
    Ok((repo, reference))
}

pub async fn prepare(target: &Arc<Target>, scenario: Scenario, o: &PlanOptions) -> Result<Plan, String> {
    let mix = if scenario == Scenario::Mixed {
        o.mix.clone()
    } else {
        vec![(scenario, 1)]
    };
    let uses = |s: Scenario| mix.iter().any(|(m, _)| *m == s);
    let (repo, reference) = parse_image(&o.image)?;
    let repo = repo.to_string();
    let image_path = format!("/v2/{repo}/manifests/{reference}");
    let page = o.page_size.unwrap_or(100);
    let tags_path = match o.page_size {
        Some(n) => format!("/v2/{repo}/tags/list?n={n}"),
        None => format!("/v2/{repo}/tags/list"),
    };

    let mut c = Conn::new(target.clone());
    let needs_image = [
        Scenario::Tags,
        Scenario::ManifestGet,
        Scenario::ManifestHead,
        Scenario::PullImage,
    ]
    .into_iter()
    .any(uses)
        || (uses(Scenario::BlobGet) && o.blob.is_none());
    let mut manifest_path = image_path.clone();
    let mut largest_layer = None;
    if needs_image {
        let (digest, manifest) = fetch_manifest(&mut c, &repo, &image_path, &o.image).await?;
        if o.by_digest {
            manifest_path = format!("/v2/{repo}/manifests/{digest}");
        }
        largest_layer = manifest.layers.iter().max_by_key(|l| l.size).cloned();
        if largest_layer.is_none() && uses(Scenario::BlobGet) && o.blob.is_none() {
            return Err(format!(
                "{} has no layers (is it an index?); pass --blob DIGEST for blob-get",
                o.image
            ));
        }
    }

    let blob = if uses(Scenario::BlobGet) {
        let (path, size) = match &o.blob {
            Some(d) => {
                let d: Digest = d.parse().map_err(|e| format!("bad --blob {d:?}: {e}"))?;
                let path = format!("/v2/{repo}/blobs/{d}");
                (path.clone(), blob_size(&mut c, &repo, &path).await?)
            }
            None => {
                let l = largest_layer.expect("checked above");
                (format!("/v2/{repo}/blobs/{}", l.digest), l.size)
            }
        };
        Some(Blob { path, size })
    } else {
        None
    };

    let push = if uses(Scenario::Push) {
        let data = data::fill(o.random_seed, o.layer_size as usize);
        let digest = Digest::sha256(&data);
        Some(PushData {
            repo: o.push_repo.to_string(),
            data,
            digest,
            chunk: o.chunk_size,
        })
    } else {
        None
    };

    let total_weight = mix.iter().map(|(_, w)| u64::from(*w)).sum();
    Ok(Plan {
        repo,
        image_path,
        manifest_path,
        tags_path,
        catalog_path: "/v2/_catalog".into(),
        // Repository names need no escaping in a query.
        catalog_page_path: match &o.last {
            Some(last) => format!("/v2/_catalog?n={page}&last={last}"),
            None => format!("/v2/_catalog?n={page}"),
        },
        blob,
        range: o.range,
        push,
        mix,
        total_weight,
        random_seed: o.random_seed,
    })
}

async fn fetch_manifest(c: &mut Conn, repo: &str, path: &str, image: &str) -> Result<(Digest, Manifest), String> {
    let fail = |e: crate::outcome::Failure| {
        if e.status == Some(404) {
            format!(
                "image {image} is not in the registry ({e}); create it with --seed N (it makes bench/r00000:latest ...) or pass --image"
            )
        } else {
            format!("cannot fetch the manifest of {image}: {e}")
        }
    };
    let b = c
        .request(Method::GET, path, Scope::Pull(repo))
        .await
        .map_err(fail)?
        .header(ACCEPT, data::MANIFEST_ACCEPT);
    let resp = c
        .send(conn::with_body(b, Bytes::new()).map_err(fail)?)
        .await
        .map_err(fail)?;
    let resp = conn::check(resp, &[200]).await.map_err(fail)?;
    let media_type = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = conn::read_all(resp.into_body(), conn::SMALL_BODY).await.map_err(fail)?;
    let manifest = Manifest::parse(&body, media_type.as_deref()).map_err(|e| format!("{image}: {e}"))?;
    Ok((Digest::sha256(&body), manifest))
}

async fn blob_size(c: &mut Conn, repo: &str, path: &str) -> Result<u64, String> {
    let fail = |e: crate::outcome::Failure| format!("cannot find blob {path}: {e}");
    let b = c.request(Method::HEAD, path, Scope::Pull(repo)).await.map_err(fail)?;
    let resp = c
        .send(conn::with_body(b, Bytes::new()).map_err(fail)?)
        .await
        .map_err(fail)?;
    let resp = conn::check(resp, &[200]).await.map_err(fail)?;
    let size = resp
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("HEAD {path} gave no Content-Length"))?;
    conn::drain(resp.into_body(), None).await.map_err(fail)?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references() {
        let (r, t) = parse_image("bench/r00000:latest").unwrap();
        assert_eq!((r.as_str(), t.as_str()), ("bench/r00000", "latest"));
        let (r, t) = parse_image("library/alpine").unwrap();
        assert_eq!((r.as_str(), t.as_str()), ("library/alpine", "latest"));
        let d = Digest::sha256(b"x");
        let (_, t) = parse_image(&format!("a@{d}")).unwrap();
        assert_eq!(t, d.as_str());
        for bad in ["UPPER:x", "a:bad tag", "a@sha256:123", "", "a:"] {
            assert!(parse_image(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mix_follows_weights() {
        let plan = Plan {
            repo: String::new(),
            image_path: String::new(),
            manifest_path: String::new(),
            tags_path: String::new(),
            catalog_path: String::new(),
            catalog_page_path: String::new(),
            blob: None,
            range: None,
            push: None,
            mix: vec![(Scenario::Tags, 3), (Scenario::Catalog, 1)],
            total_weight: 4,
            random_seed: 0,
        };
        let mut rng = Rng::new(9);
        let tags = (0..4000).filter(|_| plan.pick(&mut rng) == Scenario::Tags).count();
        assert!((2700..3300).contains(&tags), "{tags}");
    }
}
