//! Test harness: starts the real `berth` binary on a free loopback port with
//! a temporary data directory, and helpers to drive it over HTTP.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use sha2::{Digest as _, Sha256, Sha512};

pub struct Server {
    child: Option<Child>,
    pub addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    extra_args: Vec<String>,
    extra_env: Vec<(String, String)>,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> Server {
        Server::start_env(args, &[])
    }

    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data_dir = tmp.path().join("data");
        let log = tmp.path().join("berth.log");
        let extra_args = args.iter().map(|s| s.to_string()).collect();
        let mut s = Server {
            child: None,
            addr: String::new(),
            data_dir,
            log,
            extra_args,
            extra_env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            _tmp: Some(tmp),
        };
        s.spawn("127.0.0.1:0");
        s
    }

    /// Starts berth on `data_dir`, which other nodes may share (with
    /// metadata in PostgreSQL); its log goes to a file of its own.
    pub fn start_in(data_dir: &Path, args: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut s = Server {
            child: None,
            addr: String::new(),
            data_dir: data_dir.to_path_buf(),
            log: tmp.path().join("berth.log"),
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            extra_env: Vec::new(),
            _tmp: Some(tmp),
        };
        s.spawn("127.0.0.1:0");
        s
    }

    /// Starts berth and waits for the address it reports.
    fn spawn(&mut self, listen: &str) {
        // BERTH_TEST_BIN runs a test against another build (say, main's),
        // to check that a new test fails there.
        let bin = std::env::var("BERTH_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_berth").into());
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.extra_args)
            .envs(self.extra_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("BERTH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start berth");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        let log_path = self.log.clone();
        // Drain stderr into the log file for the whole life of the process.
        std::thread::spawn(move || {
            use std::io::Write;
            let mut out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .expect("log file");
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(out, "{line}");
                if !sent {
                    if let Some(addr) = listen_addr(&line) {
                        let _ = tx.send(addr);
                        sent = true;
                    }
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| {
            panic!(
                "berth did not start; log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            )
        });
        self.addr = addr;
        self.child = Some(child);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: no chance to clean up, as in a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for exit; returns whether it exited cleanly.
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        for _ in 0..200 {
            if let Ok(Some(status)) = c.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// Starts berth again on the same address and data directory, with
    /// these options instead of the ones it was started with.
    pub fn restart_with(&mut self, args: &[&str]) {
        self.extra_args = args.iter().map(|s| s.to_string()).collect();
        self.restart();
    }

    /// Starts berth again on the same address and data directory.
    pub fn restart(&mut self) {
        let addr = self.addr.clone();
        self.spawn(&addr);
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn data(&self) -> &Path {
        &self.data_dir
    }
}

/// The address in berth's "serving" line, in the human (`listen=ADDR`) or
/// the JSON (`"listen":"ADDR"`) log format.
fn listen_addr(line: &str) -> Option<String> {
    if let Some(rest) = line.split("listen=").nth(1) {
        return Some(rest.split_whitespace().next().unwrap_or("").to_string());
    }
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v["listen"].as_str().map(str::to_string)
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

pub fn sha256(data: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(data);
    let out = h.finalize();
    let mut s = String::from("sha256:");
    for b in out {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

pub fn sha512(data: &[u8]) -> String {
    let mut s = String::from("sha512:");
    for b in Sha512::digest(data) {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The OCI error code of an error response.
pub async fn error_code(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
    let code = body["errors"][0]["code"].as_str().unwrap_or("").to_string();
    (status, code)
}

pub fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// Pushes a blob monolithically and asserts 201.
pub async fn push_blob(c: &reqwest::Client, s: &Server, repo: &str, data: &[u8]) -> String {
    push_blob_as(c, s, repo, data, None).await
}

/// Adds an `Authorization` header when one is given.
pub fn with_auth(rb: reqwest::RequestBuilder, auth: Option<&str>) -> reqwest::RequestBuilder {
    match auth {
        Some(a) => rb.header("authorization", a),
        None => rb,
    }
}

pub async fn push_blob_as(c: &reqwest::Client, s: &Server, repo: &str, data: &[u8], auth: Option<&str>) -> String {
    let d = sha256(data);
    let resp = with_auth(c.post(s.url(&format!("/v2/{repo}/blobs/uploads/?digest={d}"))), auth)
        .body(data.to_vec())
        .send()
        .await
        .expect("push blob");
    assert_eq!(resp.status().as_u16(), 201, "push blob to {repo}");
    d
}

/// An OCI image manifest for a config and layers (digest, size).
pub fn image_manifest(config: (&str, usize), layers: &[(&str, usize)]) -> Vec<u8> {
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|(d, n)| {
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n})
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.0, "size": config.1},
        "layers": layers,
    }))
    .expect("json")
}

/// Pushes a small image (config plus one layer) under `tag`; returns the
/// manifest digest.
pub async fn push_image(c: &reqwest::Client, s: &Server, repo: &str, tag: &str, seed: u64) -> String {
    push_image_as(c, s, repo, tag, seed, None).await
}

pub async fn push_image_as(
    c: &reqwest::Client,
    s: &Server,
    repo: &str,
    tag: &str,
    seed: u64,
    auth: Option<&str>,
) -> String {
    let config = format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"seed\":{seed}}}").into_bytes();
    let layer = bytes(seed, 1000);
    let cd = push_blob_as(c, s, repo, &config, auth).await;
    let ld = push_blob_as(c, s, repo, &layer, auth).await;
    let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())]);
    let resp = with_auth(c.put(s.url(&format!("/v2/{repo}/manifests/{tag}"))), auth)
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(m.clone())
        .send()
        .await
        .expect("put manifest");
    assert_eq!(resp.status().as_u16(), 201, "push manifest {repo}:{tag}");
    sha256(&m)
}
