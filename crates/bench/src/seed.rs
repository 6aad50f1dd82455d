//! `--seed N`: N repositories PREFIX00000..., each with one image (a config
//! and one layer of --seed-layer-size) tagged `latest`. Images already
//! present are kept, so seeding twice is cheap.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::ACCEPT;
use http::Method;
use oci::Digest;

use crate::auth::Scope;
use crate::conn::{self, Conn};
use crate::data;
use crate::options::SeedOptions;
use crate::outcome::Failure;
use crate::push;
use crate::target::Target;

pub struct Seeded {
    pub pushed: usize,
    pub skipped: usize,
    pub elapsed: Duration,
}

pub fn repo_name(prefix: &str, i: usize) -> String {
    format!("{prefix}{i:05}")
}

pub async fn run(target: &Arc<Target>, opts: &SeedOptions, workers: usize) -> Result<Seeded, String> {
    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let opts = Arc::new(opts.clone());
    let tasks: Vec<_> = (0..workers.min(opts.repos))
        .map(|_| {
            let (target, next, opts) = (target.clone(), next.clone(), opts.clone());
            tokio::spawn(async move {
                let mut c = Conn::new(target);
                let (mut pushed, mut skipped) = (0, 0);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= opts.repos {
                        return Ok((pushed, skipped));
                    }
                    let repo = repo_name(&opts.prefix, i);
                    match one(&mut c, &repo, i, opts.layer_size).await {
                        Ok(true) => pushed += 1,
                        Ok(false) => skipped += 1,
                        Err(e) => {
                            // Stop the other workers too.
                            next.store(opts.repos, Ordering::Relaxed);
                            return Err(format!("seeding {repo} failed: {e}"));
                        }
                    }
                }
            })
        })
        .collect();
    let (mut pushed, mut skipped) = (0, 0);
    let mut first_err = None;
    for t in tasks {
        match t.await {
            Ok(Ok((p, s))) => {
                pushed += p;
                skipped += s;
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(format!("a seeding task crashed: {e}"));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(Seeded {
            pushed,
            skipped,
            elapsed: start.elapsed(),
        }),
    }
}

/// Pushes the image of repository `i` unless its `latest` is there.
/// Returns whether it pushed.
async fn one(c: &mut Conn, repo: &str, i: usize, layer_size: u64) -> Result<bool, Failure> {
    let path = format!("/v2/{repo}/manifests/latest");
    let b = c
        .request(Method::HEAD, &path, Scope::Pull(repo))
        .await?
        .header(ACCEPT, data::MANIFEST_ACCEPT);
    let resp = conn::check(c.send(conn::with_body(b, Bytes::new())?).await?, &[200, 404]).await?;
    let exists = resp.status() == 200;
    conn::drain(resp.into_body(), None).await?;
    if exists {
        return Ok(false);
    }
    let layer = data::fill(i as u64, layer_size as usize);
    let layer_digest = Digest::sha256(&layer);
    let img = data::image(repo, &layer, &layer_digest);
    push::blob(c, repo, &layer, &layer_digest, None).await?;
    push::blob(c, repo, &img.config, &img.config_digest, None).await?;
    push::manifest(c, repo, "latest", oci::media::OCI_MANIFEST, img.manifest).await?;
    Ok(true)
}
