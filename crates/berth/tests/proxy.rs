//! The pull-through cache against a real upstream: Debian's
//! `docker-registry` (CNCF distribution 2.8) on loopback, or a second berth
//! with token auth. Counts what reached the upstream from its own access
//! log.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;

/// Debian's `docker-registry` on a free loopback port and a temporary
/// directory; killed on drop.
struct Upstream {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    htpasswd: Option<(String, String)>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Upstream {
    fn start() -> Upstream {
        let mut u = Upstream {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            htpasswd: None,
        };
        u.spawn();
        u
    }

    fn config(&self) -> PathBuf {
        let cfg = self.dir.path().join("config.yml");
        let auth = match &self.htpasswd {
            Some(_) => format!(
                "auth: {{ htpasswd: {{ realm: test, path: {} }} }}\n",
                self.dir.path().join("htpasswd").display()
            ),
            None => String::new(),
        };
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog: {{ level: info }}\nstorage: {{ filesystem: {{ rootdirectory: {} }}, delete: {{ enabled: true }} }}\nhttp: {{ addr: 127.0.0.1:{} }}\n{auth}",
                self.dir.path().join("data").display(),
                self.port
            ),
        )
        .expect("write config");
        cfg
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("access.log"))
            .expect("log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.config())
            // The access log (combined format) goes to stdout.
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("docker-registry is installed (scripts/install-test-deps.sh)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").arg(sig).arg(c.id().to_string()).status();
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Upstream requests `METHOD uri` in its access log (combined log
    /// format: `"GET /v2/... HTTP/1.1" 200 ...`).
    fn count(&self, method: &str, uri: &str) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
        let needle = format!("\"{method} {uri} HTTP/1.1\"");
        let n = log.lines().filter(|l| l.contains(&needle)).count();
        if n == 0 {
            eprintln!("no {needle} in the upstream log; its requests:");
            for l in log.lines().filter(|l| l.starts_with("127.0.0.1")) {
                eprintln!("  {l}");
            }
        }
        n
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An image in the upstream.
struct Image {
    manifest: Vec<u8>,
    digest: String,
    /// (digest, bytes) of the config and the layers.
    blobs: Vec<(String, Vec<u8>)>,
}

async fn push_to(
    c: &reqwest::Client,
    base: &str,
    auth: Option<&str>,
    repo: &str,
    tag: &str,
    layers: &[Vec<u8>],
) -> Image {
    let config = format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"tag\":\"{tag}\"}}").into_bytes();
    let mut blobs = vec![(sha256(&config), config)];
    for l in layers {
        blobs.push((sha256(l), l.clone()));
    }
    // POST then PUT: distribution 2.8 has no monolithic POST.
    for (d, data) in &blobs {
        let r = with_auth(c.post(format!("{base}/v2/{repo}/blobs/uploads/")), auth)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202, "start upload");
        let loc = header(&r, "location");
        let loc = if loc.starts_with("http") {
            loc
        } else {
            format!("{base}{loc}")
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = with_auth(c.put(format!("{loc}{sep}digest={d}")), auth)
            .body(data.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201, "seed blob {d}");
    }
    let layer_refs: Vec<(&str, usize)> = blobs[1..].iter().map(|(d, b)| (d.as_str(), b.len())).collect();
    let manifest = image_manifest((&blobs[0].0, blobs[0].1.len()), &layer_refs);
    let r = with_auth(c.put(format!("{base}/v2/{repo}/manifests/{tag}")), auth)
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "seed manifest");
    Image {
        digest: sha256(&manifest),
        manifest,
        blobs,
    }
}

/// berth with `[[upstreams]]` `extra` lines for an upstream at `url`.
fn berth_with(url: &str, extra: &str, args: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap().keep();
    let cfg = dir.join("berth.toml");
    std::fs::write(
        &cfg,
        format!("[[upstreams]]\nname = \"hub\"\nurl = \"{url}\"\n{extra}\n"),
    )
    .unwrap();
    let mut all = vec!["--config", cfg.to_str().unwrap()];
    all.extend_from_slice(args);
    Server::start_with(&all)
}

/// Pulls an image through berth as a client does, and checks every byte.
async fn pull(c: &reqwest::Client, s: &Server, repo: &str, tag: &str, img: &Image) {
    let r = c
        .get(s.url(&format!("/v2/{repo}/manifests/{tag}")))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "manifest {repo}:{tag}");
    assert_eq!(header(&r, "docker-content-digest"), img.digest);
    assert_eq!(r.bytes().await.unwrap().to_vec(), img.manifest, "manifest bytes");
    for (d, data) in &img.blobs {
        let r = c.get(s.url(&format!("/v2/{repo}/blobs/{d}"))).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "blob {d}");
        assert_eq!(header(&r, "content-length"), data.len().to_string());
        let got = r.bytes().await.unwrap();
        assert!(got.as_ref() == data.as_slice(), "blob {d} bytes differ");
    }
}

async fn metric(c: &reqwest::Client, s: &Server, name: &str) -> f64 {
    let text = c.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Status, OCI error code and message of an error response.
async fn error_of(r: reqwest::Response) -> (u16, String, String) {
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    let field = |k: &str| body["errors"][0][k].as_str().unwrap_or("").to_string();
    (status, field("code"), field("message"))
}

#[tokio::test]
async fn pulls_through_by_project_and_by_ns_and_refuses_writes() {
    let up = Upstream::start();
    let c = client();
    let img = push_to(
        &c,
        &up.url(""),
        None,
        "lib/app",
        "v1",
        &[bytes(1, 3000), bytes(2, 70_000)],
    )
    .await;
    let s = berth_with(&up.url(""), "", &[]);

    pull(&c, &s, "hub/lib/app", "v1", &img).await;
    // By digest too, and a second pull is served from the cache.
    pull(&c, &s, "hub/lib/app", &img.digest, &img).await;
    pull(&c, &s, "hub/lib/app", "v1", &img).await;
    for (d, _) in &img.blobs {
        assert_eq!(
            up.count("GET", &format!("/v2/lib/app/blobs/{d}")),
            1,
            "blob {d} fetched once"
        );
    }
    assert!(metric(&c, &s, "berth_proxy_requests_total{upstream=\"hub\",result=\"hit\"}").await >= 3.0);
    assert!(metric(&c, &s, "berth_proxy_requests_total{upstream=\"hub\",result=\"miss\"}").await >= 3.0);
    let pulled: usize = img.blobs.iter().map(|(_, b)| b.len()).sum::<usize>() + img.manifest.len();
    assert!(metric(&c, &s, "berth_proxy_upstream_bytes_total{upstream=\"hub\"}").await >= pulled as f64);

    // containerd as a mirror: `?ns=` names the upstream registry.
    let ns = format!("127.0.0.1:{}", up.port);
    let r = c
        .get(s.url(&format!("/v2/lib/app/manifests/v1?ns={ns}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(header(&r, "docker-content-digest"), img.digest);
    let (d, data) = &img.blobs[2];
    let r = c
        .get(s.url(&format!("/v2/lib/app/blobs/{d}?ns={ns}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), data.as_slice());
    // An unknown ns is an ordinary local request.
    let r = c
        .get(s.url("/v2/lib/app/manifests/v1?ns=quay.io"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (404, "MANIFEST_UNKNOWN".into()));

    // Pushes and deletes into the cache project are refused, with why.
    let r = c.post(s.url("/v2/hub/lib/app/blobs/uploads/")).send().await.unwrap();
    let (status, code, msg) = error_of(r).await;
    assert_eq!((status, code.as_str()), (405, "UNSUPPORTED"));
    assert!(
        msg.contains("project hub is a pull-through cache of hub") && msg.contains("read-only"),
        "{msg}"
    );
    let r = c
        .delete(s.url(&format!("/v2/hub/lib/app/manifests/{}", img.digest)))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (405, "UNSUPPORTED".into()));

    // Unknown upstream content is the upstream's 404, named as such.
    let r = c.get(s.url("/v2/hub/lib/app/manifests/nope")).send().await.unwrap();
    let (status, code, msg) = error_of(r).await;
    assert_eq!((status, code.as_str()), (404, "MANIFEST_UNKNOWN"));
    assert!(msg.contains("upstream hub"), "{msg}");

    // Local projects are untouched by the cache.
    let d = push_image(&c, &s, "team/app", "v1", 9).await;
    let r = c.get(s.url("/v2/team/app/manifests/v1")).send().await.unwrap();
    assert_eq!(header(&r, "docker-content-digest"), d);

    // What is cached shows as the cache repository's tags.
    let r = c.get(s.url("/v2/hub/lib/app/tags/list")).send().await.unwrap();
    let tags: serde_json::Value = r.json().await.unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["v1"]));
}

#[tokio::test]
async fn fifty_concurrent_cold_pulls_fetch_each_object_once() {
    let up = Upstream::start();
    let c = client();
    let img = push_to(
        &c,
        &up.url(""),
        None,
        "lib/big",
        "v1",
        &[bytes(3, 8 << 20), bytes(4, 100_000)],
    )
    .await;
    let s = berth_with(&up.url(""), "", &[]);
    let mut pulls = Vec::new();
    for _ in 0..50 {
        let (c, url) = (c.clone(), s.url(""));
        let img = (img.manifest.clone(), img.digest.clone(), img.blobs.clone());
        pulls.push(tokio::spawn(async move {
            let r = c
                .get(format!("{url}/v2/hub/lib/big/manifests/v1"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
            assert_eq!(r.bytes().await.unwrap().to_vec(), img.0);
            for (d, data) in &img.2 {
                let r = c.get(format!("{url}/v2/hub/lib/big/blobs/{d}")).send().await.unwrap();
                assert_eq!(r.status().as_u16(), 200);
                let got = r.bytes().await.unwrap();
                assert_eq!(sha256(&got), *d, "digest of what a client received");
                assert_eq!(got.len(), data.len());
            }
        }));
    }
    for p in pulls {
        p.await.expect("a pull failed");
    }
    for (d, _) in &img.blobs {
        assert_eq!(
            up.count("GET", &format!("/v2/lib/big/blobs/{d}")),
            1,
            "blob {d} fetched once"
        );
    }
    assert_eq!(up.count("HEAD", "/v2/lib/big/manifests/v1"), 1, "one tag revalidation");
    assert_eq!(
        up.count("GET", &format!("/v2/lib/big/manifests/{}", img.digest)),
        1,
        "one manifest fetch"
    );
    assert_eq!(
        up.count("GET", "/v2/lib/big/manifests/v1"),
        0,
        "no GET of the tag: HEAD named the digest"
    );
}

#[tokio::test]
async fn serves_stale_while_the_upstream_is_down_and_fails_after_the_window() {
    let mut up = Upstream::start();
    let c = client();
    let img = push_to(&c, &up.url(""), None, "lib/app", "v1", &[bytes(5, 5000)]).await;
    let s = berth_with(
        &up.url(""),
        "revalidate = \"1s\"\nstale_for = \"4s\"\ntimeout = \"2s\"",
        &["--health-interval", "200ms", "--health-failures", "1"],
    );
    pull(&c, &s, "hub/lib/app", "v1", &img).await;
    let healthz = |c: reqwest::Client, url: String| async move {
        let r = c.get(url).send().await.unwrap();
        (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while healthz(c.clone(), s.url("/healthz")).await.1["dependencies"]["upstream:hub"] != "reachable" {
        assert!(Instant::now() < deadline, "/healthz never reported the upstream");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let confirmed = Instant::now();
    up.kill();
    // /healthz reports it, but berth stays healthy: it serves from the cache.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = healthz(c.clone(), s.url("/healthz")).await;
        if body["dependencies"]["upstream:hub"] == "unreachable" {
            assert_eq!((status, body["status"].as_str()), (200, Some("healthy")));
            break;
        }
        assert!(Instant::now() < deadline, "/healthz never saw the upstream go: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Past revalidate, within stale_for: the cached copy, counted as stale.
    pull(&c, &s, "hub/lib/app", "v1", &img).await;
    assert!(metric(&c, &s, "berth_proxy_requests_total{upstream=\"hub\",result=\"stale\"}").await >= 1.0);
    assert!(
        metric(
            &c,
            &s,
            "berth_proxy_upstream_errors_total{upstream=\"hub\",kind=\"connect\"}"
        )
        .await
            >= 1.0
    );
    // Never cached: a clear error naming the upstream.
    let r = c.get(s.url("/v2/hub/lib/other/manifests/v1")).send().await.unwrap();
    let (status, code, msg) = error_of(r).await;
    assert_eq!((status, code.as_str()), (503, "UNAVAILABLE"));
    assert!(
        msg.contains("cannot fetch manifest hub/lib/other:v1 from upstream hub"),
        "{msg}"
    );
    // Past the window: refused, saying why.
    let wait = Duration::from_millis(5200).saturating_sub(confirmed.elapsed());
    tokio::time::sleep(wait).await;
    let r = c.get(s.url("/v2/hub/lib/app/manifests/v1")).send().await.unwrap();
    let (status, code, msg) = error_of(r).await;
    assert_eq!((status, code.as_str()), (503, "UNAVAILABLE"));
    assert!(msg.contains("beyond the 4 s staleness window"), "{msg}");
    // Content-addressed objects stay servable.
    let r = c
        .get(s.url(&format!("/v2/hub/lib/app/manifests/{}", img.digest)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // The upstream is back: fresh again.
    up.spawn();
    pull(&c, &s, "hub/lib/app", "v1", &img).await;
}

#[tokio::test]
async fn an_upstream_killed_mid_blob_leaves_nothing_and_a_retry_succeeds() {
    let mut up = Upstream::start();
    let c = client();
    let big = bytes(6, 96 << 20);
    let img = push_to(&c, &up.url(""), None, "lib/big", "v1", std::slice::from_ref(&big)).await;
    let d = img.blobs[1].0.clone();
    let s = berth_with(&up.url(""), "timeout = \"2s\"", &[]);
    let mut r = c
        .get(s.url(&format!("/v2/hub/lib/big/blobs/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let first = r
        .chunk()
        .await
        .unwrap()
        .expect("first bytes before the whole blob arrived");
    assert!(!first.is_empty());
    // Freeze the upstream mid-transfer, check berth has not got it all,
    // then kill it.
    up.signal("-STOP");
    let fetched = metric(&c, &s, "berth_proxy_upstream_bytes_total{upstream=\"hub\"}").await;
    assert!(
        fetched < big.len() as f64,
        "the transfer should still be under way ({fetched} bytes)"
    );
    up.signal("-KILL");
    up.kill();
    let mut got = first.len();
    let failed = loop {
        match tokio::time::timeout(Duration::from_secs(30), r.chunk()).await {
            Err(_) => panic!("the client's download hung"),
            Ok(Err(_)) => break true,
            Ok(Ok(None)) => break false,
            Ok(Ok(Some(b))) => got += b.len(),
        }
    };
    assert!(
        failed,
        "the client must see an error, not a clean end (got {got} bytes)"
    );
    assert!(got < big.len(), "the client never gets the whole of an unverified blob");
    // Nothing partial is kept: no upload, no blob.
    let uploads = s.data().join("uploads");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&uploads).unwrap().count() > 0 {
        assert!(Instant::now() < deadline, "the failed fill's upload was not removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hex = &d["sha256:".len()..];
    assert!(!s.data().join("blobs/sha256").join(&hex[..2]).join(hex).exists());
    assert!(
        metric(
            &c,
            &s,
            "berth_proxy_upstream_errors_total{upstream=\"hub\",kind=\"body\"}"
        )
        .await
            >= 1.0
    );
    // The upstream is back: the retry succeeds, whole and verified.
    up.spawn();
    let r = c
        .get(s.url(&format!("/v2/hub/lib/big/blobs/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(sha256(&r.bytes().await.unwrap()), d);
}

#[tokio::test]
async fn ttl_and_size_cap_evict_least_recently_pulled_and_keep_shared_content() {
    let up = Upstream::start();
    let c = client();
    let a = push_to(&c, &up.url(""), None, "lib/a", "v1", &[bytes(7, 600_000)]).await;
    let b = push_to(&c, &up.url(""), None, "lib/b", "v1", &[bytes(8, 600_000)]).await;
    // Size: 1 MiB cap: one image fits, two are above the 90 % watermark.
    let s = berth_with(
        &up.url(""),
        "max_size = \"1M\"\nevict_interval = \"1s\"",
        &["--gc-grace", "0"],
    );
    pull(&c, &s, "hub/lib/a", "v1", &a).await;
    // A local image shares a's layer: eviction must not lose it.
    let shared = &a.blobs[1];
    let local = push_to(&c, &s.url(""), None, "team/keep", "v1", std::slice::from_ref(&shared.1)).await;
    assert_eq!(local.blobs[1].0, shared.0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    pull(&c, &s, "hub/lib/b", "v1", &b).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&c, &s, "berth_proxy_evictions_total{upstream=\"hub\",reason=\"size\"}").await < 1.0 {
        assert!(Instant::now() < deadline, "nothing was evicted for size");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(metric(&c, &s, "berth_proxy_cached_bytes{upstream=\"hub\"}").await <= (1 << 20) as f64 * 0.8);
    // a (least recently pulled) went; b stays.
    let r = c.get(s.url("/v2/hub/lib/a/tags/list")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404, "a's tag was evicted");
    let r = c.get(s.url("/v2/hub/lib/b/tags/list")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // The local copy of the shared layer is whole.
    let r = c
        .get(s.url(&format!("/v2/team/keep/blobs/{}", shared.0)))
        .send()
        .await
        .unwrap();
    assert_eq!(sha256(&r.bytes().await.unwrap()), shared.0);
    // Pulling a again fetches it again.
    pull(&c, &s, "hub/lib/a", "v1", &a).await;
    assert_eq!(up.count("GET", &format!("/v2/lib/a/manifests/{}", a.digest)), 2);

    // TTL: not pulled for 2 s, gone.
    let s = berth_with(
        &up.url(""),
        "ttl = \"2s\"\nevict_interval = \"1s\"",
        &["--gc-grace", "0"],
    );
    pull(&c, &s, "hub/lib/a", "v1", &a).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while metric(&c, &s, "berth_proxy_evictions_total{upstream=\"hub\",reason=\"ttl\"}").await < 2.0 {
        assert!(Instant::now() < deadline, "nothing expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = c.get(s.url("/v2/hub/lib/a/tags/list")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404, "a's tag expired");
    // Its bytes are freed (grace 0): only the local layer remains stored.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let hex = &a.blobs[1].0["sha256:".len()..];
        if !s.data().join("blobs/sha256").join(&hex[..2]).join(hex).exists() {
            break;
        }
        assert!(Instant::now() < deadline, "evicted bytes were not freed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn upstream_limits_refuse_excess_with_too_many_requests() {
    let up = Upstream::start();
    let c = client();
    let mut imgs = Vec::new();
    for i in 0..8u64 {
        imgs.push(
            push_to(
                &c,
                &up.url(""),
                None,
                &format!("lib/i{i}"),
                "v1",
                &[bytes(20 + i, 2000)],
            )
            .await,
        );
    }
    let s = berth_with(
        &up.url(""),
        "rate = 2.0\nconcurrency = 1\nqueue = 1\nqueue_timeout = \"1s\"",
        &[],
    );
    let mut reqs = Vec::new();
    for i in 0..8 {
        let (c, url) = (c.clone(), s.url(&format!("/v2/hub/lib/i{i}/manifests/v1")));
        reqs.push(tokio::spawn(async move {
            error_code(c.get(url).send().await.unwrap()).await
        }));
    }
    let mut limited = 0;
    for r in reqs {
        let (status, code) = r.await.unwrap();
        match status {
            200 => {}
            429 => {
                assert_eq!(code, "TOOMANYREQUESTS");
                limited += 1;
            }
            other => panic!("unexpected status {other} {code}"),
        }
    }
    assert!(
        limited >= 1,
        "8 cold pulls against concurrency 1 and a queue of 1 must refuse some"
    );
    assert!(
        metric(
            &c,
            &s,
            "berth_proxy_upstream_errors_total{upstream=\"hub\",kind=\"limited\"}"
        )
        .await
            >= 1.0
    );
}

#[tokio::test]
async fn upstream_with_htpasswd_basic_auth() {
    let mut up = Upstream {
        child: None,
        port: free_port(),
        dir: tempfile::tempdir().unwrap(),
        htpasswd: Some(("puller".into(), "pull-secret".into())),
    };
    // distribution's htpasswd wants bcrypt.
    let out = Command::new("htpasswd")
        .args(["-Bbn", "puller", "pull-secret"])
        .output()
        .expect("htpasswd (apache2-utils) is installed");
    std::fs::write(up.dir.path().join("htpasswd"), out.stdout).unwrap();
    up.spawn();
    let c = client();
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "puller:pull-secret")
    );
    let img = push_to(&c, &up.url(""), Some(&basic), "lib/app", "v1", &[bytes(9, 4000)]).await;
    let s = berth_with(&up.url(""), "username = \"puller\"\npassword = \"pull-secret\"", &[]);
    pull(&c, &s, "hub/lib/app", "v1", &img).await;
    let bad = berth_with(&up.url(""), "username = \"puller\"\npassword = \"wrong\"", &[]);
    let r = c.get(bad.url("/v2/hub/lib/app/manifests/v1")).send().await.unwrap();
    let (status, code, msg) = error_of(r).await;
    assert_eq!(
        (status, code.as_str()),
        (403, "DENIED"),
        "a 4xx, so clients show the message"
    );
    assert!(msg.contains("upstream hub") && msg.contains("credentials"), "{msg}");
}

#[tokio::test]
async fn upstream_with_token_auth() {
    // The upstream is berth itself with access control: the Docker token flow.
    let up = Server::start_env(&["--auth"], &[("BERTH_INITIAL_ADMIN_PASSWORD", "upstream-admin-1")]);
    let c = client();
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "admin:upstream-admin-1")
    );
    let img = push_to(&c, &up.url(""), Some(&basic), "lib/app", "v1", &[bytes(10, 4000)]).await;
    let s = berth_with(
        &up.url(""),
        "username = \"admin\"\npassword = \"upstream-admin-1\"",
        &[],
    );
    pull(&c, &s, "hub/lib/app", "v1", &img).await;
    // Tokens are cached: the upstream issued far fewer than the requests made.
    let issued = up.log_text().matches("\"url.path\":\"/token\"").count();
    assert!((1..=2).contains(&issued), "tokens issued: {issued}");
}

#[tokio::test]
async fn a_mirror_upstream_serves_what_is_missing_locally() {
    // Docker's registry-mirrors sends `library/nginx`: no prefix, no ?ns=.
    let up = Upstream::start();
    let c = client();
    let img = push_to(&c, &up.url(""), None, "library/app", "v1", &[bytes(11, 3000)]).await;
    let s = berth_with(&up.url(""), "mirror = true", &[]);
    pull(&c, &s, "library/app", "v1", &img).await;
    // It is cached under the project.
    let r = c.get(s.url("/v2/hub/library/app/tags/list")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // What exists locally wins, and pushes outside the cache project work.
    let local = push_image(&c, &s, "library/app", "v1", 12).await;
    let r = c.get(s.url("/v2/library/app/manifests/v1")).send().await.unwrap();
    assert_eq!(header(&r, "docker-content-digest"), local);
    // Missing locally and upstream: the upstream's answer.
    let r = c.get(s.url("/v2/library/none/manifests/v1")).send().await.unwrap();
    assert_eq!(error_code(r).await, (404, "MANIFEST_UNKNOWN".into()));
}

#[tokio::test]
async fn with_storage_full_blobs_stream_straight_from_upstream() {
    let up = Upstream::start();
    let c = client();
    let img = push_to(&c, &up.url(""), None, "lib/app", "v1", &[bytes(13, 300_000)]).await;
    // Any volume is at or above a 0 % watermark: nothing can be uploaded.
    let s = berth_with(&up.url(""), "", &["--disk-watermark", "0"]);
    let r = c.get(s.url("/v2/hub/lib/app/manifests/v1")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    for (d, data) in &img.blobs {
        let r = c
            .get(s.url(&format!("/v2/hub/lib/app/blobs/{d}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "the pull is no worse than going direct");
        assert!(r.bytes().await.unwrap().as_ref() == data.as_slice());
        let hex = &d["sha256:".len()..];
        assert!(
            !s.data().join("blobs/sha256").join(&hex[..2]).join(hex).exists(),
            "nothing cached"
        );
    }
    assert!(s.log_text().contains("streaming the blob straight from upstream"));
}

#[tokio::test]
async fn a_corrupt_upstream_blob_never_reaches_a_client_whole_nor_the_cache() {
    let up = Upstream::start();
    let c = client();
    let layer = bytes(14, 3 << 20);
    let img = push_to(&c, &up.url(""), None, "lib/app", "v1", std::slice::from_ref(&layer)).await;
    let d = img.blobs[1].0.clone();
    // Flip one byte of the upstream's stored copy: same length, wrong digest.
    let hex = &d["sha256:".len()..];
    let path = up
        .dir
        .path()
        .join(format!("data/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]));
    let mut stored = std::fs::read(&path).expect("distribution's blob file");
    stored[1000] ^= 0xff;
    std::fs::write(&path, &stored).unwrap();
    let s = berth_with(&up.url(""), "", &[]);
    for _ in 0..2 {
        let mut r = c
            .get(s.url(&format!("/v2/hub/lib/app/blobs/{d}")))
            .send()
            .await
            .unwrap();
        let mut got = 0usize;
        let failed = if r.status().as_u16() != 200 {
            true
        } else {
            loop {
                match r.chunk().await {
                    Err(_) => break true,
                    Ok(None) => break false,
                    Ok(Some(b)) => got += b.len(),
                }
            }
        };
        assert!(failed, "a corrupt blob was served as if whole ({got} bytes)");
        assert!(got < layer.len());
    }
    let hex_dir = s.data().join("blobs/sha256").join(&hex[..2]).join(hex);
    assert!(!hex_dir.exists(), "a corrupt blob was cached");
    assert!(
        metric(
            &c,
            &s,
            "berth_proxy_upstream_errors_total{upstream=\"hub\",kind=\"digest\"}"
        )
        .await
            >= 2.0
    );
}

/// A manifest the upstream holds under a sha512 digest is cached and served
/// under that digest, by tag and by digest, cold and from the hot cache.
#[tokio::test]
async fn a_sha512_manifest_keeps_its_digest_through_the_cache() {
    let up = Server::start();
    let c = client();
    let config = b"{\"architecture\":\"amd64\",\"os\":\"linux\"}".to_vec();
    let layer = bytes(53, 3000);
    let cd = push_blob(&c, &up, "lib/s512", &config).await;
    let ld = push_blob(&c, &up, "lib/s512", &layer).await;
    let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())]);
    let d512 = sha512(&m);
    let r = c
        .put(up.url(&format!("/v2/lib/s512/manifests/{d512}?tag=t")))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(m.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let s = berth_with(&up.url(""), "", &[]);
    for round in 0..2 {
        let r = c.get(s.url("/v2/hub/lib/s512/manifests/t")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "round {round}");
        assert_eq!(header(&r, "docker-content-digest"), d512, "GET by tag, round {round}");
        assert_eq!(r.bytes().await.unwrap().to_vec(), m);
        let r = c.head(s.url("/v2/hub/lib/s512/manifests/t")).send().await.unwrap();
        assert_eq!(header(&r, "docker-content-digest"), d512, "HEAD by tag, round {round}");
    }
    let r = c
        .get(s.url(&format!("/v2/hub/lib/s512/manifests/{d512}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(header(&r, "docker-content-digest"), d512);
}

/// A pull through the cache carries the client's W3C trace to the upstream
/// (here a second berth, which logs the trace id it was given), for the
/// manifest and for the blob fill that runs in a task of its own.
#[tokio::test]
async fn the_callers_trace_reaches_the_upstream() {
    let up = Server::start();
    let c = client();
    let img = push_to(&c, &up.url(""), None, "lib/traced", "v1", &[bytes(54, 3000)]).await;
    let s = berth_with(&up.url(""), "", &[]);
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let traceparent = format!("00-{trace}-b7ad6b7169203331-01");
    let r = c
        .get(s.url("/v2/hub/lib/traced/manifests/v1"))
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let layer = &img.blobs[1].0;
    let r = c
        .get(s.url(&format!("/v2/hub/lib/traced/blobs/{layer}")))
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), img.blobs[1].1.as_slice());
    let upstream_lines = |path: String| {
        up.log_text()
            .lines()
            .filter(|l| l.contains("\"message\":\"request\"") && l.contains(&format!("\"url.path\":\"{path}\"")))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = upstream_lines("/v2/lib/traced/manifests/v1".into());
        let b = upstream_lines(format!("/v2/lib/traced/blobs/{layer}"));
        let traced = |lines: &[String]| lines.iter().any(|l| l.contains(&format!("\"trace.id\":\"{trace}\"")));
        if traced(&m) && traced(&b) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the upstream did not see trace {trace}:\nmanifest: {m:?}\nblob: {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
