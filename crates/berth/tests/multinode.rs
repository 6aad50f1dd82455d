//! Several `berth serve` nodes sharing one PostgreSQL database (a private
//! cluster) and one blob directory, as a scaled-out deployment runs them:
//! behind a real nginx (Debian's nginx-light) that spreads requests round
//! robin with no affinity, pushed to and pulled from with skopeo. A node
//! killed with SIGKILL in the middle of a push loses nothing acknowledged,
//! and the client's retry through nginx finishes the push; a tag moved
//! through one node is served by every node; GC runs on one node at a
//! time; webhooks are delivered by one node. Needs the `postgres` feature;
//! skipped with a notice where PostgreSQL is not installed (a failure under
//! `CI=true`, as the other PostgreSQL tests).
#![cfg(feature = "postgres")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use metadata::pg_cluster::TestCluster;
use serde_json::{json, Value};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// nginx on a free loopback port, round robin over `backends` (no
/// affinity), streaming bodies both ways; stopped on drop.
struct Nginx {
    child: Child,
    addr: String,
    dir: PathBuf,
}

impl Nginx {
    fn start(dir: &Path, backends: &[&str]) -> Nginx {
        let dir = dir.join("nginx");
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let port = free_port();
        let d = dir.display();
        let servers: String = backends
            .iter()
            .map(|b| format!("        server {b} max_fails=1 fail_timeout=10s;\n"))
            .collect();
        std::fs::write(
            dir.join("nginx.conf"),
            format!(
                r#"daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 512; }}
http {{
    client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
    log_format nodes '$upstream_addr $request_method $uri $status';
    access_log {d}/access.log nodes;
    upstream berth {{
{servers}    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_http_version 1.1;
        proxy_set_header Host $http_host;
        proxy_set_header Connection "";
        proxy_read_timeout 120s;
        location / {{ proxy_pass http://berth; }}
    }}
}}
"#
            ),
        )
        .unwrap();
        let child = Command::new("nginx")
            .args([
                "-p",
                &d.to_string(),
                "-c",
                &format!("{d}/nginx.conf"),
                "-e",
                &format!("{d}/error.log"),
            ])
            .spawn()
            .expect("nginx (nginx-light) is installed (scripts/install-test-deps.sh)");
        let nginx = Nginx {
            child,
            addr: format!("127.0.0.1:{port}"),
            dir,
        };
        for _ in 0..200 {
            if std::net::TcpStream::connect(&nginx.addr).is_ok() {
                return nginx;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "nginx did not start: {}",
            std::fs::read_to_string(nginx.dir.join("error.log")).unwrap_or_default()
        );
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The upstreams nginx sent requests to, from its access log.
    fn served_by(&self) -> Vec<String> {
        let log = std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default();
        let mut nodes: Vec<String> = log
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .flat_map(|a| a.split(", "))
            .map(str::to_string)
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }
}

impl Drop for Nginx {
    /// SIGTERM: the master stops its workers (SIGKILL would orphan them).
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A PostgreSQL database, a shared data directory, and `n` nodes on them.
struct Fleet {
    nodes: Vec<Server>,
    dir: tempfile::TempDir,
    _pg: TestCluster,
}

async fn fleet(db: &str, n: usize, args: &[&str]) -> Option<Fleet> {
    let pg = TestCluster::start()?;
    let url = pg.create_database(db).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut all = vec!["--metadata", url.as_str()];
    all.extend_from_slice(args);
    let nodes = (0..n).map(|_| Server::start_in(&data, &all)).collect();
    Some(Fleet { nodes, dir, _pg: pg })
}

/// Whether process `pid` has an upload of `data` open: it is appending to it.
fn appending(pid: u32, data: &Path) -> bool {
    let uploads = data.join("uploads");
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok()).any(|p| {
        p.parent() == Some(uploads.as_path()) && p.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.'))
    })
}

/// This node's id, from its "serving" line (JSON: the log is not a
/// terminal).
fn node_id(s: &Server) -> String {
    s.log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "berth is serving")
        .and_then(|v| v["node"].as_str().map(str::to_string))
        .expect("the serving line names the node")
}

/// An OCI image layout (what skopeo copies from) with one image, `v1`: a
/// config and layers of `layers` bytes each, from `seed`.
struct Layout {
    dir: PathBuf,
    manifest: String,
    /// (digest, bytes) of the config and layers.
    blobs: Vec<(String, Vec<u8>)>,
}

fn layout(dir: &Path, seed: u64, layers: &[usize]) -> Layout {
    let blobs_dir = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs_dir).unwrap();
    let put = |data: &[u8]| {
        let d = sha256(data);
        std::fs::write(blobs_dir.join(d.trim_start_matches("sha256:")), data).unwrap();
        d
    };
    let layer_blobs: Vec<(String, Vec<u8>)> = layers
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let b = bytes(seed * 100 + i as u64, *n);
            (put(&b), b)
        })
        .collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": {"seed": seed.to_string()}},
        "rootfs": {"type": "layers", "diff_ids": layer_blobs.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>()},
    }))
    .unwrap();
    let config_digest = put(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": layer_blobs.iter().map(|(d, b)| json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": b.len()
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    let manifest_digest = put(&manifest);
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": manifest.len(),
                "annotations": {"org.opencontainers.image.ref.name": "v1"}
            }],
        }))
        .unwrap(),
    )
    .unwrap();
    let mut blobs = layer_blobs;
    blobs.push((config_digest, config));
    Layout {
        dir: dir.to_path_buf(),
        manifest: manifest_digest,
        blobs,
    }
}

/// skopeo with an accept-anything policy, its blob-info cache (which it
/// keeps in /var/lib/containers as root, with no option to move it) in
/// `tmp` through a private mount namespace where one can be made.
fn skopeo(tmp: &Path, args: &[&str]) -> Command {
    let policy = tmp.join("policy.json");
    std::fs::write(&policy, r#"{"default":[{"type":"insecureAcceptAnything"}]}"#).unwrap();
    let varlib = tmp.join("varlib");
    std::fs::create_dir_all(&varlib).unwrap();
    let private_mounts = Command::new("unshare")
        .args(["-m", "--propagation", "private", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let mut cmd = if private_mounts {
        let mut c = Command::new("unshare");
        c.args([
            "-m",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            r#"mount --bind "$0" /var/lib && exec "$@""#,
        ])
        .arg(&varlib)
        .arg("skopeo");
        c
    } else {
        Command::new("skopeo")
    };
    cmd.arg("--policy").arg(&policy).args(args);
    cmd
}

/// Runs skopeo to the end (bounded) and asserts it succeeded.
fn run_skopeo(tmp: &Path, args: &[&str]) {
    let out = skopeo(tmp, args).output().expect("skopeo is installed");
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn push_args<'a>(l: &'a str, dest: &'a str) -> [&'a str; 7] {
    [
        "copy",
        "--retry-times",
        "5",
        "--preserve-digests",
        "--dest-tls-verify=false",
        l,
        dest,
    ]
}

/// The manifest digest `base` serves for `repo:reference`, and every blob
/// it references fetched and checked against its digest.
async fn pulled(c: &reqwest::Client, base: &str, repo: &str, reference: &str) -> Result<String, String> {
    let r = c
        .get(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != 200 {
        return Err(format!("{base} {repo}:{reference}: {}", r.status()));
    }
    let body = r.bytes().await.map_err(|e| e.to_string())?;
    let m: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let mut digests = vec![m["config"]["digest"].as_str().unwrap_or_default().to_string()];
    digests.extend(
        m["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| l["digest"].as_str().unwrap_or_default().to_string()),
    );
    for d in digests {
        let b = c
            .get(format!("{base}/v2/{repo}/blobs/{d}"))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .bytes()
            .await
            .map_err(|e| e.to_string())?;
        if sha256(&b) != d {
            return Err(format!("{base} {repo}: blob {d} has the wrong bytes"));
        }
    }
    Ok(sha256(&body))
}

/// Pushes through round-robin nginx with skopeo and pulls back through
/// every node; kills one node with SIGKILL in the middle of a push, whose
/// retry through nginx then finishes on the others; and a tag moved through
/// nginx is served by every node (no node's cache keeps the old digest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_through_round_robin_nginx_survive_a_node_killed_mid_push() {
    let Some(mut f) = fleet("push", 3, &[]).await else {
        return;
    };
    let addrs: Vec<String> = f.nodes.iter().map(|n| n.addr.clone()).collect();
    let nginx = Nginx::start(f.dir.path(), &addrs.iter().map(String::as_str).collect::<Vec<_>>());
    let tmp = f.dir.path().to_path_buf();
    let c = client();
    let reg = &nginx.addr;

    let base = layout(&tmp.join("base"), 1, &[2 << 20, 300_000]);
    run_skopeo(
        &tmp,
        &push_args(
            &format!("oci:{}:v1", base.dir.display()),
            &format!("docker://{reg}/multi/base:v1"),
        ),
    );
    for n in &f.nodes {
        assert_eq!(
            pulled(&c, &n.url(""), "multi/base", "v1").await,
            Ok(base.manifest.clone())
        );
    }
    let served = nginx.served_by();
    assert!(
        addrs.iter().all(|a| served.contains(a)),
        "round robin reached every node: {served:?}"
    );

    // Pushes of six-layer images, until one finds the victim appending to
    // an upload (a PATCH streaming into it, seen in its open files): then
    // the victim is killed with SIGKILL, and the push, retried by skopeo
    // through nginx, must finish on the other nodes. Round robin gives the
    // victim a third of the appends, so few pushes are needed.
    let victim = 1;
    let data = f.nodes[victim].data().to_path_buf();
    let mut pushed = Vec::new();
    let mut killed = None;
    for attempt in 0..5u64 {
        let img = layout(&tmp.join(format!("big{attempt}")), 10 + attempt, &[8 << 20; 6]);
        let dest = format!("docker://{reg}/multi/big:v{attempt}");
        let mut push = skopeo(&tmp, &push_args(&format!("oci:{}:v1", img.dir.display()), &dest))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("skopeo is installed");
        let deadline = Instant::now() + Duration::from_secs(300);
        let status = loop {
            if let Some(s) = push.try_wait().unwrap() {
                break s;
            }
            if killed.is_none() && appending(f.nodes[victim].pid(), &data) {
                f.nodes[victim].kill9();
                killed = Some(attempt);
            }
            assert!(Instant::now() < deadline, "the push did not finish");
            std::thread::sleep(Duration::from_millis(2));
        };
        let out = push.wait_with_output().unwrap();
        eprintln!("skopeo push {attempt}: {}", String::from_utf8_lossy(&out.stderr));
        if !status.success() {
            // Only a push the kill cut into may fail: a request in flight
            // on the killed node gets nginx's 502, which skopeo 1.9's
            // --retry-times does not retry. The user's retry, through
            // nginx, finishes it on the other nodes.
            assert_eq!(
                killed,
                Some(attempt),
                "push {attempt} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            run_skopeo(&tmp, &push_args(&format!("oci:{}:v1", img.dir.display()), &dest));
        }
        pushed.push((format!("v{attempt}"), img));
        if killed.is_some() {
            break;
        }
    }
    assert!(
        killed.is_some(),
        "the victim never appended to an upload in five pushes"
    );

    // Nothing acknowledged is lost: every image, whole, from every node
    // alive and through nginx, and from the killed node once it is back.
    let live = [nginx.url(""), f.nodes[0].url(""), f.nodes[2].url("")];
    for base_url in &live {
        assert_eq!(
            pulled(&c, base_url, "multi/base", "v1").await,
            Ok(base.manifest.clone())
        );
        for (t, img) in &pushed {
            assert_eq!(pulled(&c, base_url, "multi/big", t).await, Ok(img.manifest.clone()));
        }
    }
    f.nodes[victim].restart();
    let (last_tag, last) = pushed.last().expect("pushed");
    assert_eq!(
        pulled(&c, &f.nodes[victim].url(""), "multi/big", last_tag).await,
        Ok(last.manifest.clone())
    );
    // And with the real client, through nginx.
    let back = tmp.join("pulled");
    run_skopeo(
        &tmp,
        &[
            "copy",
            "--preserve-digests",
            "--src-tls-verify=false",
            &format!("docker://{reg}/multi/big:{last_tag}"),
            &format!("oci:{}:v1", back.display()),
        ],
    );
    let index: Value = serde_json::from_slice(&std::fs::read(back.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], last.manifest.as_str());
    for (d, b) in &last.blobs {
        let got = std::fs::read(back.join("blobs/sha256").join(d.trim_start_matches("sha256:"))).unwrap();
        assert!(got == *b, "blob {d} pulled back differs");
    }

    // Every node serves multi/base:v1 from its cache now; moved through
    // nginx, the tag is served moved by every node.
    for n in &f.nodes {
        assert_eq!(
            pulled(&c, &n.url(""), "multi/base", "v1").await,
            Ok(base.manifest.clone())
        );
    }
    let moved = layout(&tmp.join("moved"), 3, &[100_000]);
    run_skopeo(
        &tmp,
        &push_args(
            &format!("oci:{}:v1", moved.dir.display()),
            &format!("docker://{reg}/multi/base:v1"),
        ),
    );
    for n in &f.nodes {
        let mut seen = Err(String::new());
        // Within the caches' bound (2 s) of the push; well within this.
        for _ in 0..100 {
            seen = pulled(&c, &n.url(""), "multi/base", "v1").await;
            if seen.as_ref() == Ok(&moved.manifest) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            seen,
            Ok(moved.manifest.clone()),
            "node {} still serves the old tag",
            n.addr
        );
    }
}

/// A chunked upload that hops between nodes: POST on one, ten PATCHes of
/// 10 MiB alternating, PUT on the other. The blob is right; the time it took
/// is printed beside the same upload on one node, in alternating rounds, each
/// of a blob not stored yet (docs/BENCHMARKS.md; no time is asserted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_upload_alternating_nodes_commits_the_right_blob() {
    let Some(f) = fleet("chunks", 2, &[]).await else { return };
    let c = client();
    let mut data = bytes(42, 100 << 20);
    let mut took: Vec<(&str, u128)> = Vec::new();
    for round in 0..6u8 {
        let (label, hops) = if round % 2 == 0 {
            ("one node", [0, 0])
        } else {
            ("alternating", [0, 1])
        };
        data[0] = round;
        let digest = sha256(&data);
        let repo = format!("multi/{}", label.replace(' ', "-"));
        let node = |i: usize| &f.nodes[hops[i % 2]];
        let started = Instant::now();
        let r = c
            .post(node(0).url(&format!("/v2/{repo}/blobs/uploads/")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let mut location = header(&r, "location");
        for (i, chunk) in data.chunks(10 << 20).enumerate() {
            let start = i * (10 << 20);
            let r = c
                .patch(node(i + 1).url(&location))
                .header("content-type", "application/octet-stream")
                .header("content-range", format!("{start}-{}", start + chunk.len() - 1))
                .body(chunk.to_vec())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202, "chunk {i}");
            location = header(&r, "location");
        }
        let sep = if location.contains('?') { '&' } else { '?' };
        let r = c
            .put(node(11).url(&format!("{location}{sep}digest={digest}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{label}: {}", r.text().await.unwrap_or_default());
        took.push((label, started.elapsed().as_millis()));
        let blob = c
            .get(f.nodes[1].url(&format!("/v2/{repo}/blobs/{digest}")))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(blob == data, "{label}: the blob's bytes");
    }
    for label in ["one node", "alternating"] {
        let mut ms: Vec<u128> = took.iter().filter(|(l, _)| *l == label).map(|(_, t)| *t).collect();
        ms.sort_unstable();
        eprintln!(
            "100 MiB in 10 chunks, {label}: {ms:?} ms, median {} ms",
            ms[ms.len() / 2]
        );
    }
}

/// Two nodes with a short GC interval: while one collects (a slow run, with
/// garbage and pauses), the other skips and names it; the garbage goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_runs_on_one_node_at_a_time() {
    let gc = [
        "--gc-interval",
        "1",
        "--gc-grace",
        "0",
        "--gc-batch",
        "1",
        "--gc-pause-ms",
        "300",
    ];
    let Some(f) = fleet("gc", 2, &gc).await else { return };
    let c = client();
    let loose: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..12 {
            v.push(push_blob(&c, &f.nodes[i % 2], "multi/loose", &bytes(1000 + i as u64, 5000)).await);
        }
        v
    };
    let gone = |d: &String| {
        let c = c.clone();
        let url = f.nodes[0].url(&format!("/v2/multi/loose/blobs/{d}"));
        async move { c.head(url).send().await.unwrap().status() == 404 }
    };
    for _ in 0..600 {
        let mut all = true;
        for d in &loose {
            all &= gone(d).await;
        }
        if all {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for d in &loose {
        assert!(gone(d).await, "{d} was collected");
    }
    let skips: Vec<Vec<String>> = f
        .nodes
        .iter()
        .map(|n| {
            n.log_text()
                .lines()
                .filter(|l| l.contains("garbage collection skipped"))
                .map(str::to_string)
                .collect()
        })
        .collect();
    assert!(
        skips.iter().any(|s| !s.is_empty()),
        "a node skipped while the other collected"
    );
    let ids: Vec<String> = f.nodes.iter().map(node_id).collect();
    for (i, lines) in skips.iter().enumerate() {
        for line in lines {
            assert!(line.contains(&ids[1 - i]), "a node skips for the other: {line}");
        }
    }
}

/// A webhook configured on two nodes gets each event once: one node (the
/// lease holder) delivers, whichever node recorded the event. The receiver
/// is slow, so a second deliverer would find each event not yet done with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_delivered_once_by_one_node() {
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = listener.local_addr().unwrap();
    let sink = got.clone();
    let app = axum::Router::new().fallback(move |body: String| {
        let sink = sink.clone();
        async move {
            sink.lock()
                .unwrap()
                .push(serde_json::from_str(&body).unwrap_or(Value::Null));
            tokio::time::sleep(Duration::from_millis(1500)).await;
            "ok"
        }
    });
    let receiver = tokio::spawn(async move { axum::serve(listener, app).await });
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("berth.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[webhooks]]\nname = \"all\"\nurl = \"http://{hook}/\"\ntypes = [\"push\"]\nbackoff_initial = \"50ms\"\n"
        ),
    )
    .unwrap();
    let Some(f) = fleet("hooks", 2, &["--config", cfg.to_str().unwrap()]).await else {
        return;
    };
    let c = client();
    let mut pushed = Vec::new();
    for i in 0..6 {
        pushed.push(push_image(&c, &f.nodes[i % 2], "multi/hooks", &format!("v{i}"), 500 + i as u64).await);
    }
    let digests = |got: &Mutex<Vec<Value>>| -> Vec<String> {
        got.lock()
            .unwrap()
            .iter()
            .filter_map(|v| v["data"]["digest"].as_str().map(str::to_string))
            .collect()
    };
    for _ in 0..600 {
        if digests(&got).len() >= pushed.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Long enough for a second deliverer (they poll every second) to send
    // its copies, if there were one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut seen = digests(&got);
    seen.sort();
    pushed.sort();
    assert_eq!(seen, pushed, "every push event once");
    receiver.abort();
}
