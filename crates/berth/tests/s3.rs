//! `berth serve --storage s3://...` on a private SeaweedFS (real SigV4, on
//! loopback ports of its own): push and pull over HTTP with the blobs only
//! in the bucket, `berth gc` and `fsck` on them, `kill -9` in the middle of
//! pushes, the startup errors for a bucket that is missing or refuses the
//! credentials, and (with `postgres`) two nodes sharing one upload. Needs the
//! `s3` feature; skipped with a notice where SeaweedFS is not installed, a
//! failure under `CI=true`.
#![cfg(feature = "s3")]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use storage::seaweedfs::{TestS3, ACCESS_KEY, SECRET_KEY};

const KEYS: [(&str, &str); 2] = [("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", SECRET_KEY)];

/// A berth command on S3 (offline commands, or `serve` expected to fail).
fn berth(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .env_remove("BERTH_STORAGE")
        .env_remove("BERTH_METADATA")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run berth");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Pushes `data` in PATCH chunks of `chunk` bytes, then the closing PUT.
async fn chunked_push(c: &reqwest::Client, s: &Server, repo: &str, data: &[u8], chunk: usize) -> String {
    chunked_push_via(c, &[s, s, s], repo, data, chunk).await
}

/// A chunked push whose POST, PATCHes and closing PUT go to the servers
/// given, in turn (the last for the PUT): nodes behind a load balancer.
async fn chunked_push_via(c: &reqwest::Client, nodes: &[&Server], repo: &str, data: &[u8], chunk: usize) -> String {
    let d = sha256(data);
    let r = c
        .post(nodes[0].url(&format!("/v2/{repo}/blobs/uploads/")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let mut loc = header(&r, "location");
    for (i, part) in data.chunks(chunk).enumerate() {
        let node = nodes[(i + 1) % nodes.len()];
        let start = i * chunk;
        let r = c
            .patch(node.url(&loc))
            .header("content-range", format!("{}-{}", start, start + part.len() - 1))
            .body(part.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202, "chunk {i}");
        assert_eq!(header(&r, "range"), format!("0-{}", start + part.len() - 1));
        loc = header(&r, "location");
    }
    let last = nodes[nodes.len() - 1];
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = c.put(last.url(&format!("{loc}{sep}digest={d}"))).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 201, "closing PUT");
    d
}

async fn get_blob(c: &reqwest::Client, s: &Server, repo: &str, d: &str) -> (u16, Vec<u8>) {
    let r = c.get(s.url(&format!("/v2/{repo}/blobs/{d}"))).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.bytes().await.unwrap().to_vec())
}

/// Blobs pushed one after another until the server dies; returns those
/// acknowledged (201), half of them pushed in chunks.
async fn push_until_killed(c: reqwest::Client, base: String, seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut acked = Vec::new();
    for i in 0..100u64 {
        let data = bytes(seed * 1000 + i, (3 << 20) + (i as usize * 4099) % 65536);
        let d = sha256(&data);
        let ok = if i % 2 == 0 {
            c.post(format!("{base}/v2/crash/app/blobs/uploads/?digest={d}"))
                .body(data.clone())
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == 201)
        } else {
            chunked_until_error(&c, &base, &data, &d).await
        };
        if !ok {
            break;
        }
        acked.push((d, data));
    }
    acked
}

async fn chunked_until_error(c: &reqwest::Client, base: &str, data: &[u8], d: &str) -> bool {
    let Ok(r) = c.post(format!("{base}/v2/crash/app/blobs/uploads/")).send().await else {
        return false;
    };
    let mut loc = header(&r, "location");
    for (i, part) in data.chunks(1 << 20).enumerate() {
        let start = i << 20;
        let sent = c
            .patch(format!("{base}{loc}"))
            .header("content-range", format!("{}-{}", start, start + part.len() - 1))
            .body(part.to_vec())
            .send()
            .await;
        match sent {
            Ok(r) if r.status() == 202 => loc = header(&r, "location"),
            _ => return false,
        }
    }
    c.put(format!("{base}{loc}?digest={d}"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 201)
}

/// Push and pull with the blobs in S3 and the metadata in the data
/// directory: monolithic and chunked uploads (one part copied on the
/// server, several streamed into one object), a range GET, nothing of the
/// blobs on local disk; then `berth fsck`, `berth du` and `berth gc` on the
/// bucket; then `kill -9` in the middle of pushes, after which every
/// acknowledged blob is there and intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_s3_pushes_pulls_collects_and_loses_nothing_acknowledged() {
    let Some(s3) = TestS3::start().await else { return };
    let url = s3.storage_url("node");
    let args = ["--storage", url.as_str(), "--gc-interval", "0"];
    let mut s = Server::start_env(&args, &KEYS);
    assert!(
        s.log_text()
            .contains("blobs in s3://registry/node at http://127.0.0.1:"),
        "{}",
        s.log_text()
    );
    let c = client();

    let manifest = push_image(&c, &s, "s3/app", "v1", 1).await;
    let big = bytes(2, (9 << 20) + 333);
    let monolithic = push_blob(&c, &s, "s3/app", &big).await;
    let chunked_data = bytes(3, (10 << 20) + 5);
    let chunked = chunked_push(&c, &s, "s3/app", &chunked_data, 3 << 20).await;
    for (d, data) in [(&monolithic, &big), (&chunked, &chunked_data)] {
        let (status, body) = get_blob(&c, &s, "s3/app", d).await;
        assert_eq!(status, 200);
        assert!(body == *data, "{d} read back");
    }
    let r = c
        .get(s.url(&format!("/v2/s3/app/blobs/{chunked}")))
        .header("range", "bytes=3145720-3145800")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 206);
    assert_eq!(
        header(&r, "content-range"),
        format!("bytes 3145720-3145800/{}", chunked_data.len())
    );
    assert!(r.bytes().await.unwrap() == chunked_data[3145720..=3145800]);
    let r = c
        .get(s.url("/v2/s3/app/manifests/v1"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "docker-content-digest"), manifest);
    // An upload cancelled half way leaves nothing to find.
    let r = c.post(s.url("/v2/s3/app/blobs/uploads/")).send().await.unwrap();
    let loc = header(&r, "location");
    let r = c.patch(s.url(&loc)).body(vec![1u8; 5000]).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    assert_eq!(c.delete(s.url(&loc)).send().await.unwrap().status().as_u16(), 204);
    assert_eq!(c.get(s.url(&loc)).send().await.unwrap().status().as_u16(), 404);

    // The bytes are in the bucket, not on local disk.
    let local = std::fs::read_dir(s.data().join("blobs"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(local, 0, "no blob files in the data directory");

    // An unreferenced blob for GC, then the offline commands on the bucket.
    let garbage = push_blob(&c, &s, "s3/junk", &bytes(4, 20_000)).await;
    assert!(s.terminate());
    let dir = s.data().to_str().unwrap().to_string();
    let offline = |cmd: &[&str]| {
        let mut a = vec![cmd[0], "--data-dir", &dir, "--storage", &url];
        a.extend(&cmd[1..]);
        berth(&a, &KEYS)
    };
    let (ok, out, err) = offline(&["fsck"]);
    // The image (config, layer, manifest), two large blobs, the garbage.
    assert!(
        ok && out.contains("checked 6 blobs") && out.contains(": 0 problems"),
        "{out}{err}"
    );
    let (ok, out, err) = offline(&["du"]);
    assert!(ok && out.contains("s3/app"), "{out}{err}");
    let (ok, out, err) = offline(&["gc", "--gc-grace", "0", "--dry-run"]);
    assert!(ok && out.contains("would free"), "{out}{err}");
    // What no manifest references goes: the garbage and the two large blobs.
    let (ok, out, err) = offline(&["gc", "--gc-grace", "0"]);
    assert!(
        ok && out.starts_with("freed ") && out.contains(": 3 blobs"),
        "{out}{err}"
    );
    // Without --storage, the same data directory has no blobs: fsck says
    // what is missing rather than reading another store.
    let (ok, out, _) = berth(&["fsck", "--data-dir", &dir], &[]);
    assert!(!ok && out.contains("problems"), "{out}");

    s.restart();
    let c = client();
    assert_eq!(get_blob(&c, &s, "s3/junk", &garbage).await.0, 404, "collected");
    assert_eq!(get_blob(&c, &s, "s3/app", &chunked).await.0, 404, "collected");
    let layer = bytes(1, 1000);
    let (status, body) = get_blob(&c, &s, "s3/app", &sha256(&layer)).await;
    assert!(status == 200 && body == layer, "the image's layer is kept");

    // kill -9 at varying moments of monolithic and chunked pushes.
    let mut all_acked = Vec::new();
    for round in 0..3u64 {
        let pusher = tokio::spawn(push_until_killed(client(), s.url(""), 10 + round));
        tokio::time::sleep(Duration::from_millis(700 + round * 450)).await;
        s.kill9();
        let acked = tokio::time::timeout(Duration::from_secs(120), pusher)
            .await
            .expect("the pusher ends")
            .unwrap();
        eprintln!("round {round}: {} pushes acknowledged before the kill", acked.len());
        all_acked.extend(acked);
        s.restart();
        let c = client();
        for (d, data) in &all_acked {
            let (status, body) = get_blob(&c, &s, "crash/app", d).await;
            assert_eq!(status, 200, "acknowledged blob {d} lost after kill {round}");
            assert!(sha256(&body) == *d && body.len() == data.len(), "{d} intact");
        }
    }
    assert!(!all_acked.is_empty(), "some pushes were acknowledged before the kills");
    // After a crash a client simply pushes again.
    push_blob(&client(), &s, "crash/app", &bytes(99, 100_000)).await;
}

/// The errors of a start on a bucket that cannot be used say what is wrong
/// and what to do, and never show the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_missing_bucket_wrong_credentials_and_a_malformed_url() {
    let Some(s3) = TestS3::start().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let serve = |url: &str, env: &[(&str, &str)]| {
        berth(
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                data.to_str().unwrap(),
                "--storage",
                url,
            ],
            env,
        )
    };
    let endpoint = s3.endpoint();

    let (ok, _, err) = serve(&format!("s3://no-such-bucket?endpoint={endpoint}"), &KEYS);
    assert!(!ok);
    assert!(
        err.contains("bucket \"no-such-bucket\" does not exist on http://127.0.0.1:"),
        "{err}"
    );
    assert!(
        err.contains("aws s3 mb s3://no-such-bucket --endpoint-url http://127.0.0.1:"),
        "{err}"
    );

    let url = s3.storage_url("");
    let wrong = [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", "not-the-secret"),
    ];
    let (ok, _, err) = serve(&url, &wrong);
    assert!(!ok);
    assert!(
        err.contains("refused berth's credentials (access key id \"berth-test\")"),
        "{err}"
    );
    assert!(
        err.contains("check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        "{err}"
    );
    assert!(err.contains("SignatureDoesNotMatch"), "the server's reason: {err}");
    assert!(!err.contains("not-the-secret"), "{err}");

    let (ok, _, err) = serve(&url, &[]);
    assert!(!ok && err.contains("no S3 credentials: set AWS_ACCESS_KEY_ID"), "{err}");

    let (ok, _, err) = serve("s3://registry?endpoint=127.0.0.1:9000", &KEYS);
    assert!(
        !ok && err.contains("--storage: ") && err.contains("must start with http://"),
        "{err}"
    );

    // A credentials file works instead of the environment; one others may
    // read is reported with the fix.
    let file = dir.path().join("s3-credentials");
    std::fs::write(
        &file,
        format!("[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let s = Server::start_with(&["--storage", &url, "--storage-credentials", file.to_str().unwrap()]);
    let c = client();
    let d = push_blob(&c, &s, "file/creds", b"pushed with a credentials file").await;
    assert_eq!(get_blob(&c, &s, "file/creds", &d).await.0, 200);
    let log = s.log_text();
    assert!(
        log.contains("the S3 credentials file is readable by other local users"),
        "{log}"
    );
    assert!(log.contains(&format!("chmod 600 {}", file.display())), "{log}");
    assert!(!log.contains(SECRET_KEY), "the secret stays out of the log");
}

/// Two nodes on one bucket and one PostgreSQL database, as behind a load
/// balancer: an upload started on one is continued and finished on the
/// other, an image pushed through one is pulled through the other, and the
/// first node, killed with SIGKILL mid-push, leaves the other serving
/// everything acknowledged.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_s3_and_postgresql_share_uploads() {
    use metadata::pg_cluster::TestCluster;
    let Some(s3) = TestS3::start().await else { return };
    let Some(cluster) = TestCluster::start() else { return };
    let db = cluster.create_database("s3_nodes").await;
    let url = s3.storage_url("shared");
    let args = [
        "--storage",
        url.as_str(),
        "--metadata",
        db.as_str(),
        "--gc-interval",
        "0",
    ];
    let mut a = Server::start_env(&args, &KEYS);
    let b = Server::start_env(&args, &KEYS);
    let c = client();

    let data = bytes(21, (12 << 20) + 17);
    let d = chunked_push_via(&c, &[&a, &b, &a, &b], "multi/app", &data, 4 << 20).await;
    for node in [&a, &b] {
        let (status, body) = get_blob(&c, node, "multi/app", &d).await;
        assert!(status == 200 && body == data, "{d} through either node");
    }
    let manifest = push_image(&c, &b, "multi/app", "v1", 22).await;
    let r = c
        .get(a.url("/v2/multi/app/manifests/v1"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "docker-content-digest"), manifest);

    let pusher = tokio::spawn(push_until_killed(client(), a.url(""), 30));
    tokio::time::sleep(Duration::from_millis(900)).await;
    a.kill9();
    let acked = tokio::time::timeout(Duration::from_secs(120), pusher)
        .await
        .expect("the pusher ends")
        .unwrap();
    assert!(!acked.is_empty(), "some pushes were acknowledged before the kill");
    for (d, data) in &acked {
        let (status, body) = get_blob(&c, &b, "crash/app", d).await;
        assert!(
            status == 200 && sha256(&body) == *d && body.len() == data.len(),
            "{d} on the other node"
        );
    }
}
