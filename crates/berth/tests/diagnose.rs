//! `berth diagnose` against a real berth on loopback: each fault asserts
//! the failing step, the root cause and the exit code.

mod common;

use std::process::Command;

use common::*;

/// Runs `berth diagnose --json ARGS`; returns (exit code, report). With
/// `BERTH_DIAGNOSE_COMPARE=DIR`, also runs the human form, `skopeo inspect`
/// and `docker pull` on the same case and appends them to DIR/<case>.txt
/// (how docs/DIAGNOSE.md was made).
fn diagnose(args: &[&str]) -> (i32, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("diagnose")
        .arg("--json")
        .args(["--timeout", "2s"])
        .args(args)
        .output()
        .expect("run berth diagnose");
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    compare(args, &v);
    (out.status.code().unwrap_or(-1), v)
}

/// See [`diagnose`]: the same case through skopeo and docker, for the docs.
fn compare(args: &[&str], v: &serde_json::Value) {
    let Ok(dir) = std::env::var("BERTH_DIAGNOSE_COMPARE") else {
        return;
    };
    let thread = std::thread::current();
    let case = thread.name().unwrap_or("case").replace("::", "-");
    let image = args.last().copied().unwrap_or("");
    let plain = image.trim_start_matches("http://").trim_start_matches("https://");
    let creds = args.iter().position(|a| *a == "--creds").map(|i| args[i + 1]);
    let platform = args.iter().position(|a| *a == "--platform").map(|i| args[i + 1]);
    let run = |cmd: &mut Command| {
        cmd.output()
            .map(|o| {
                format!(
                    "exit {}\n{}{}",
                    o.status.code().unwrap_or(-1),
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_else(|e| format!("cannot run: {e}\n"))
    };
    let mut text = format!(
        "## {case}\n$ berth diagnose {}\nroot cause: {}\n",
        args.join(" "),
        v["root_cause"]
    );
    // With --resolve the case is about TLS: skopeo verifies, trusts the
    // --ca-file, and finds the name in an /etc/hosts bind-mounted in a
    // mount namespace of its own (the machine's file is not touched).
    let resolve = args.iter().position(|a| *a == "--resolve").map(|i| args[i + 1]);
    let tmp = tempfile::tempdir().unwrap();
    let mut sk = if let Some(r) = resolve {
        let mut it = r.split(':');
        let (host, _, addr) = (it.next().unwrap(), it.next(), it.next().unwrap());
        std::fs::write(tmp.path().join("hosts"), format!("{addr} {host}\n")).unwrap();
        let certs = tmp.path().join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        if let Some(i) = args.iter().position(|a| *a == "--ca-file") {
            std::fs::copy(args[i + 1], certs.join("ca.crt")).unwrap();
        }
        let mut c = Command::new("unshare");
        c.args(["-m", "sh", "-c", "mount --bind \"$0\" /etc/hosts && exec \"$@\""])
            .arg(tmp.path().join("hosts"))
            .args([
                "skopeo",
                "inspect",
                "--tls-verify=true",
                "--retry-times",
                "0",
                "--cert-dir",
            ])
            .arg(&certs);
        c
    } else {
        let mut c = Command::new("skopeo");
        c.args(["inspect", "--tls-verify=false", "--retry-times", "0"]);
        c
    };
    if let Some(c) = creds {
        sk.args(["--creds", c]);
    }
    if let Some(p) = platform {
        let mut it = p.split('/');
        sk.args([
            "--override-os",
            it.next().unwrap_or(""),
            "--override-arch",
            it.next().unwrap_or(""),
        ]);
    }
    sk.arg(format!("docker://{plain}"));
    text.push_str(&format!("$ skopeo inspect docker://{plain}\n{}", run(&mut sk)));
    if resolve.is_none() {
        let cfg = tempfile::tempdir().unwrap();
        let host = plain.split('/').next().unwrap_or("");
        if let Some(c) = creds {
            let (u, p) = c.split_once(':').unwrap_or((c, ""));
            run(Command::new("docker")
                .env("DOCKER_CONFIG", cfg.path())
                .args(["login", "-u", u, "-p", p, host]));
        }
        let mut d = Command::new("docker");
        d.env("DOCKER_CONFIG", cfg.path()).arg("pull");
        if let Some(p) = platform {
            d.args(["--platform", p]);
        }
        d.arg(plain);
        text.push_str(&format!("$ docker pull {plain}\n{}", run(&mut d)));
        // A pull that got through leaves an image: remove it.
        run(Command::new("docker").args(["rmi", "-f", plain]));
    }
    text.push('\n');
    use std::io::Write;
    std::fs::create_dir_all(&dir).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(std::path::Path::new(&dir).join(format!("{case}.txt")))
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

fn failing_step(v: &serde_json::Value) -> String {
    v["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["status"] == "fail"))
        .map(|s| s["name"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

fn cause(v: &serde_json::Value) -> String {
    v["root_cause"].as_str().unwrap_or("").to_string()
}

#[test]
fn name_that_does_not_resolve() {
    let (code, v) = diagnose(&["--plain-http", "nosuch.invalid:5000/a:b"]);
    assert_eq!((code, failing_step(&v).as_str()), (10, "name resolution"), "{v}");
    assert!(cause(&v).contains("does not resolve"), "{v}");
}

#[test]
fn connection_refused() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, v) = diagnose(&["--plain-http", &format!("127.0.0.1:{port}/a:b")]);
    assert_eq!((code, failing_step(&v).as_str()), (10, "tcp connect"), "{v}");
    assert!(cause(&v).contains("connection refused"), "{v}");
}

#[test]
fn resolve_override_and_https_expected_on_plain_http() {
    let s = Server::start();
    let port = s.addr.rsplit(':').next().unwrap();
    let (code, v) = diagnose(&[
        "--resolve",
        &format!("registry.test:{port}:127.0.0.1"),
        &format!("registry.test:{port}/a:b"),
    ]);
    assert_eq!((code, failing_step(&v).as_str()), (11, "tls"), "{v}");
    assert!(cause(&v).contains("plain HTTP registry"), "{v}");
    assert!(v["fix"].as_str().unwrap().contains("insecure-registries"), "{v}");
}

#[tokio::test]
async fn repository_absent_tag_absent_and_a_good_pull() {
    // The shared test machine's disk may be past the default watermark.
    let s = Server::start_with(&["--disk-watermark", "100"]);
    let c = client();
    for t in ["v1.2.0", "v1.2.1", "latest"] {
        push_image(&c, &s, "team/app", t, 7).await;
    }
    let (code, v) = diagnose(&["--plain-http", &format!("{}/team/nothing:v1", s.addr)]);
    assert_eq!((code, failing_step(&v).as_str()), (13, "repository and tag"), "{v}");
    assert!(cause(&v).contains("repository team/nothing does not exist"), "{v}");

    let (code, v) = diagnose(&["--plain-http", &format!("{}/team/app:v1.2.2", s.addr)]);
    assert_eq!((code, failing_step(&v).as_str()), (13, "repository and tag"), "{v}");
    assert!(
        cause(&v).contains("repository team/app exists, tag v1.2.2 does not; nearest tags: v1.2.1, v1.2.0"),
        "{v}"
    );

    let (code, v) = diagnose(&["--plain-http", "--deep", &format!("{}/team/app:v1.2.1", s.addr)]);
    assert_eq!(code, 0, "{v}");
    assert!(v["root_cause"].is_null(), "{v}");
}

/// A CA and a leaf for `names` signed by it; `expired` backdates the leaf.
/// Returns (ca pem, leaf pem, leaf key pem).
fn certs(names: &[&str], expired: bool) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "diagnose test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    if expired {
        leaf.not_before = rcgen::date_time_ymd(2001, 1, 1);
        leaf.not_after = rcgen::date_time_ymd(2002, 1, 1);
    }
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// berth serving TLS with `leaf`; the CA written to a file for --ca-file.
fn tls_server(dir: &std::path::Path, ca: &str, leaf: &str, key: &str) -> (Server, String, String) {
    std::fs::write(dir.join("ca.pem"), ca).unwrap();
    std::fs::write(dir.join("leaf.pem"), leaf).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
    let s = Server::start_with(&[
        "--tls-cert",
        dir.join("leaf.pem").to_str().unwrap(),
        "--tls-key",
        dir.join("key.pem").to_str().unwrap(),
    ]);
    let port = s.addr.rsplit(':').next().unwrap().to_string();
    (s, port, dir.join("ca.pem").display().to_string())
}

#[test]
fn tls_unknown_ca_wrong_host_expired() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaf, key) = certs(&["registry.test"], false);
    let (_s, port, ca_file) = tls_server(dir.path(), &ca, &leaf, &key);
    let resolve = format!("registry.test:{port}:127.0.0.1");
    let image = format!("registry.test:{port}/a:b");

    // The server sends only its leaf, and the client does not know the CA.
    let (code, v) = diagnose(&["--resolve", &resolve, &image]);
    assert_eq!((code, failing_step(&v).as_str()), (11, "tls"), "{v}");
    assert!(cause(&v).contains("unknown authority"), "{v}");

    // Trusted CA, wrong name.
    let other = format!("other.test:{port}:127.0.0.1");
    let (code, v) = diagnose(&[
        "--resolve",
        &other,
        "--ca-file",
        &ca_file,
        &format!("other.test:{port}/a:b"),
    ]);
    assert_eq!((code, failing_step(&v).as_str()), (11, "tls"), "{v}");
    assert!(cause(&v).contains("wrong host name"), "{v}");

    // Trusted CA, right name: TLS passes.
    let (code, v) = diagnose(&["--resolve", &resolve, "--ca-file", &ca_file, &image]);
    assert_eq!((code, failing_step(&v).as_str()), (13, "repository and tag"), "{v}");

    let dir2 = tempfile::tempdir().unwrap();
    let (ca, leaf, key) = certs(&["registry.test"], true);
    let (_s2, port, ca_file) = tls_server(dir2.path(), &ca, &leaf, &key);
    let (code, v) = diagnose(&[
        "--resolve",
        &format!("registry.test:{port}:127.0.0.1"),
        "--ca-file",
        &ca_file,
        &format!("registry.test:{port}/a:b"),
    ]);
    assert_eq!((code, failing_step(&v).as_str()), (11, "tls"), "{v}");
    assert!(cause(&v).contains("expired"), "{v}");
}

// ---- helpers for the faults below ----

fn step<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

fn fix(v: &serde_json::Value) -> String {
    v["fix"].as_str().unwrap_or("").to_string()
}

fn with(rb: reqwest::RequestBuilder, auth: Option<&str>) -> reqwest::RequestBuilder {
    match auth {
        Some(a) => rb.header("authorization", a),
        None => rb,
    }
}

/// Pushes a blob to any registry (POST, then PUT with the digest: the
/// two-step upload every registry takes); returns its digest.
async fn put_blob(c: &reqwest::Client, base: &str, repo: &str, data: &[u8], auth: Option<&str>) -> String {
    let d = sha256(data);
    let r = with(c.post(format!("{base}/v2/{repo}/blobs/uploads/")), auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202, "start upload to {repo}");
    let loc = header(&r, "location");
    let loc = if loc.starts_with("http") {
        loc
    } else {
        format!("{base}{loc}")
    };
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = with(c.put(format!("{loc}{sep}digest={d}")), auth)
        .header("content-type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "finish upload to {repo}");
    d
}

async fn put_manifest(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
    media: &str,
    body: &[u8],
    auth: Option<&str>,
) -> reqwest::StatusCode {
    with(c.put(format!("{base}/v2/{repo}/manifests/{reference}")), auth)
        .header("content-type", media)
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
        .status()
}

/// An image pushed by `put_image`: its manifest (digest, size) and its
/// layer's digest.
struct Pushed {
    digest: String,
    size: usize,
    layer: String,
}

/// Pushes a small image for `arch` built at `created` under `reference`.
async fn put_image(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
    (seed, arch, created): (u64, &str, &str),
    auth: Option<&str>,
) -> Pushed {
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch, "os": "linux", "created": created,
        "rootfs": {"type": "layers", "diff_ids": []}, "config": {}, "seed": seed,
    }))
    .unwrap();
    let layer = bytes(seed, 1000);
    let cd = put_blob(c, base, repo, &config, auth).await;
    let ld = put_blob(c, base, repo, &layer, auth).await;
    let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())]);
    let st = put_manifest(
        c,
        base,
        repo,
        reference,
        "application/vnd.oci.image.manifest.v1+json",
        &m,
        auth,
    )
    .await;
    assert_eq!(st.as_u16(), 201, "push {repo}:{reference}");
    Pushed {
        digest: sha256(&m),
        size: m.len(),
        layer: ld,
    }
}

/// Pushes `repo:tag` as an index of images for linux/arm64 and
/// linux/s390x only.
async fn put_index_without_amd64(c: &reqwest::Client, base: &str, repo: &str, tag: &str, auth: Option<&str>) {
    let mut entries = Vec::new();
    for (i, arch) in ["arm64", "s390x"].iter().enumerate() {
        let p = put_image(
            c,
            base,
            repo,
            &format!("{arch}-only"),
            (40 + i as u64, arch, "2026-01-01T00:00:00Z"),
            auth,
        )
        .await;
        entries.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": p.digest, "size": p.size,
            "platform": {"os": "linux", "architecture": arch},
        }));
    }
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    }))
    .unwrap();
    let st = put_manifest(
        c,
        base,
        repo,
        tag,
        "application/vnd.oci.image.index.v1+json",
        &index,
        auth,
    )
    .await;
    assert_eq!(st.as_u16(), 201, "push index {repo}:{tag}");
}

/// The file holding `digest`'s bytes under a registry's data directory
/// (berth: blobs/sha256/ab/<hex>; distribution: .../blobs/sha256/ab/<hex>/data).
fn blob_file(root: &std::path::Path, digest: &str) -> std::path::PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            let in_blobs = p.components().any(|c| c.as_os_str() == "blobs");
            if p.is_dir() {
                if name == hex && in_blobs && p.join("data").is_file() {
                    return p.join("data");
                }
                stack.push(p);
            } else if name == hex && in_blobs {
                return p;
            }
        }
    }
    panic!("no file for {digest} under {}", root.display());
}

/// A registry of the test's own on loopback: answers each request with
/// `answer(path, own address)` as a raw HTTP response, closing after each.
fn fake_registry(answer: fn(&str, &str) -> String) -> String {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let me = addr.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&req);
            let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
            let _ = conn.write_all(answer(&path, &me).as_bytes());
        }
    });
    addr
}

fn http_response(status: &str, headers: &[(&str, String)], body: &str) -> String {
    let mut s = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s.push_str("\r\n");
    s.push_str(body);
    s
}

/// A token for a JWT-reading client: only the payload matters to it.
fn jwt(payload: serde_json::Value) -> String {
    use base64::Engine;
    let e = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!(
        "{}.{}.{}",
        e(br#"{"alg":"ES256","typ":"JWT"}"#),
        e(&serde_json::to_vec(&payload).unwrap()),
        e(b"not-checked")
    )
}

// ---- network and TLS ----

#[tokio::test]
async fn connection_timed_out() {
    // A listener that never accepts, with the shortest accept queue: once
    // the queue is full the kernel drops further SYNs, as a filtering
    // network path does.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = sock.listen(0).unwrap();
    let addr = l.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..64 {
        match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200)) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    assert!(held.len() < 64, "the accept queue never filled");
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args([
            "diagnose",
            "--json",
            "--timeout",
            "1s",
            "--plain-http",
            &format!("{addr}/a:b"),
        ])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (out.status.code(), failing_step(&v).as_str()),
        (Some(10), "tcp connect"),
        "{v}"
    );
    assert!(
        cause(&v).contains(&format!("the connection to {addr} timed out after 1s")),
        "{v}"
    );
    assert!(fix(&v).contains("network policy"), "{v}");
    drop(l);
}

/// root -> intermediate -> leaf for `name`: (root pem, intermediate pem,
/// leaf pem, leaf key pem).
fn chain(name: &str) -> (String, String, String, String) {
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut root = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root.distinguished_name
        .push(rcgen::DnType::CommonName, "diagnose test root");
    let root_cert = root.self_signed(&root_key).unwrap();
    let root_issuer = rcgen::Issuer::new(root, root_key);
    let int_key = rcgen::KeyPair::generate().unwrap();
    let mut int = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    int.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    int.distinguished_name
        .push(rcgen::DnType::CommonName, "diagnose test intermediate");
    let int_cert = int.signed_by(&int_key, &root_issuer).unwrap();
    let int_issuer = rcgen::Issuer::new(int, int_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    let cert = leaf.signed_by(&key, &int_issuer).unwrap();
    (root_cert.pem(), int_cert.pem(), cert.pem(), key.serialize_pem())
}

#[test]
fn tls_missing_intermediate_then_the_full_chain() {
    let (root, int, leaf, key) = chain("registry.test");
    let dir = tempfile::tempdir().unwrap();
    let (_s, port, ca_file) = tls_server(dir.path(), &root, &leaf, &key);
    let resolve = format!("registry.test:{port}:127.0.0.1");
    let image = format!("registry.test:{port}/a:b");
    let (code, v) = diagnose(&["--resolve", &resolve, "--ca-file", &ca_file, &image]);
    assert_eq!((code, failing_step(&v).as_str()), (11, "tls"), "{v}");
    assert!(cause(&v).contains("missing intermediate"), "{v}");
    assert!(cause(&v).contains("issued by CN=diagnose test intermediate"), "{v}");
    assert!(fix(&v).contains("full chain"), "{v}");

    // The same leaf with its intermediate appended: TLS passes.
    let dir2 = tempfile::tempdir().unwrap();
    let (_s2, port, ca_file) = tls_server(dir2.path(), &root, &format!("{leaf}{int}"), &key);
    let (code, v) = diagnose(&[
        "--resolve",
        &format!("registry.test:{port}:127.0.0.1"),
        "--ca-file",
        &ca_file,
        &format!("registry.test:{port}/a:b"),
    ]);
    assert_eq!(step(&v, "tls")["status"], "ok", "{v}");
    assert_eq!((code, failing_step(&v).as_str()), (13, "repository and tag"), "{v}");
}

#[test]
fn plain_http_expected_on_an_https_registry() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaf, key) = certs(&["127.0.0.1"], false);
    let (_s, port, _ca) = tls_server(dir.path(), &ca, &leaf, &key);
    let (code, v) = diagnose(&["--plain-http", &format!("127.0.0.1:{port}/a:b")]);
    assert_eq!((code, failing_step(&v).as_str()), (11, "tls"), "{v}");
    assert!(cause(&v).contains("is an HTTPS registry"), "{v}");
    assert!(fix(&v).contains("use https"), "{v}");
}

// ---- credentials and permissions (berth with --auth) ----

const ADMIN_PW: &str = "admin-password-1";

fn basic(user: &str, pw: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
    )
}

async fn admin(
    c: &reqwest::Client,
    s: &Server,
    method: reqwest::Method,
    path: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let r = c
        .request(method, s.url(path))
        .header("authorization", basic("admin", ADMIN_PW))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{path}: {}", r.status());
    r.json().await.unwrap_or_default()
}

#[tokio::test]
async fn credentials_robots_and_roles_on_berth() {
    use reqwest::Method;
    let s = Server::start_env(
        &["--auth", "--disk-watermark", "100"],
        &[("BERTH_INITIAL_ADMIN_PASSWORD", ADMIN_PW)],
    );
    let c = client();
    for u in ["alice", "bob"] {
        admin(
            &c,
            &s,
            Method::POST,
            "/api/v1/users",
            serde_json::json!({"name": u, "password": format!("{u}-password")}),
        )
        .await;
    }
    admin(
        &c,
        &s,
        Method::POST,
        "/api/v1/projects",
        serde_json::json!({"name": "team", "public": false}),
    )
    .await;
    admin(
        &c,
        &s,
        Method::PUT,
        "/api/v1/projects/team/members/alice",
        serde_json::json!({"role": "developer"}),
    )
    .await;
    let a = basic("alice", "alice-password");
    put_image(
        &c,
        &s.url(""),
        "team/app",
        "v1",
        (1, "amd64", "2026-01-01T00:00:00Z"),
        Some(&a),
    )
    .await;
    let image = format!("{}/team/app:v1", s.addr);

    // A good pull with credentials, in the human form: exit 0, checklist.
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["diagnose", "--plain-http", "--creds", "alice:alice-password", &image])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("root cause: none: every step of the pull succeeded"),
        "{text}"
    );
    assert!(!text.contains("alice-password"), "the password is redacted: {text}");
    assert!(
        text.contains("token issued for scope repository:team/app:pull; granted: [{"),
        "{text}"
    );

    // Wrong password.
    let (code, v) = diagnose(&["--plain-http", "--creds", "alice:wrong-password", &image]);
    assert_eq!((code, failing_step(&v).as_str()), (12, "credentials"), "{v}");
    assert!(
        cause(&v).contains(r#"the realm refused user "alice": wrong user name or password"#),
        "{v}"
    );
    assert!(!v.to_string().contains("wrong-password"), "redacted: {v}");

    // No credentials for a private project.
    let (code, v) = diagnose(&["--plain-http", &image]);
    assert_eq!((code, failing_step(&v).as_str()), (12, "credentials"), "{v}");
    assert!(
        cause(&v).contains("an anonymous client was issued a token without pull on team/app"),
        "{v}"
    );
    assert!(fix(&v).contains("project team is private"), "{v}");

    // A valid user without the pull permission: the exact role to give.
    let (code, v) = diagnose(&["--plain-http", "--creds", "bob:bob-password", &image]);
    assert_eq!((code, failing_step(&v).as_str()), (12, "credentials"), "{v}");
    assert!(
        cause(&v).contains(r#"user "bob" is not a member of project "team"; pull needs role guest or higher"#),
        "{v}"
    );
    assert!(fix(&v).contains("berth project member team bob guest"), "{v}");

    // Robots: one that expires at once, one revoked, one without a grant here.
    let exp = admin(
        &c,
        &s,
        Method::POST,
        "/api/v1/robots",
        serde_json::json!({"name": "short", "grants": ["team:pull"], "expires_in": "1s"}),
    )
    .await;
    let rev = admin(
        &c,
        &s,
        Method::POST,
        "/api/v1/robots",
        serde_json::json!({"name": "ci", "grants": ["team:pull"]}),
    )
    .await;
    admin(
        &c,
        &s,
        Method::POST,
        "/api/v1/projects",
        serde_json::json!({"name": "other", "public": false}),
    )
    .await;
    let wrong = admin(
        &c,
        &s,
        Method::POST,
        "/api/v1/robots",
        serde_json::json!({"name": "elsewhere", "grants": ["other:pull"]}),
    )
    .await;
    let creds = |name: &str, v: &serde_json::Value| format!("robot${name}:{}", v["secret"].as_str().unwrap());
    let (code, v) = diagnose(&["--plain-http", "--creds", &creds("ci", &rev), &image]);
    assert_eq!(code, 0, "the robot works before its revocation: {v}");
    admin(&c, &s, Method::POST, "/api/v1/robots/ci/revoke", serde_json::json!({})).await;
    let (code, v) = diagnose(&["--plain-http", "--creds", &creds("ci", &rev), &image]);
    assert_eq!((code, failing_step(&v).as_str()), (12, "credentials"), "{v}");
    assert!(
        cause(&v).contains("the robot's secret is wrong, or the robot expired or was revoked"),
        "{v}"
    );
    assert!(fix(&v).contains("berth robot list"), "{v}");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let (code, v) = diagnose(&["--plain-http", "--creds", &creds("short", &exp), &image]);
    assert_eq!((code, failing_step(&v).as_str()), (12, "credentials"), "{v}");
    assert!(
        cause(&v).contains(r#"user "robot$short""#) && cause(&v).contains("expired or was revoked"),
        "{v}"
    );
    let (code, v) = diagnose(&["--plain-http", "--creds", &creds("elsewhere", &wrong), &image]);
    assert_eq!((code, failing_step(&v).as_str()), (12, "credentials"), "{v}");
    assert!(
        cause(&v).contains(r#"robot "robot$elsewhere" has no pull permission in project "team""#),
        "{v}"
    );
    assert!(fix(&v).contains("--grant team:pull"), "{v}");
}

#[test]
fn insufficient_scope_from_a_token_server() {
    // A Docker Hub style registry whose token server grants nothing.
    fn answer(path: &str, me: &str) -> String {
        if path == "/v2/" {
            let ch = format!("Bearer realm=\"http://{me}/token\",service=\"fake\"");
            http_response(
                "401 Unauthorized",
                &[("WWW-Authenticate", ch)],
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
            )
        } else if path.starts_with("/token") {
            let body = serde_json::json!({"token": jwt(serde_json::json!({"sub": "carol", "access": []}))}).to_string();
            http_response("200 OK", &[("Content-Type", "application/json".into())], &body)
        } else {
            let ch = format!("Bearer realm=\"http://{me}/token\",service=\"fake\",scope=\"repository:team/app:pull\",error=\"insufficient_scope\"");
            http_response(
                "401 Unauthorized",
                &[("WWW-Authenticate", ch)],
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required","detail":[{"Type":"repository","Name":"team/app","Action":"pull"}]}]}"#,
            )
        }
    }
    let addr = fake_registry(answer);
    let (code, v) = diagnose(&[
        "--plain-http",
        "--creds",
        "carol:pw-of-carol",
        &format!("{addr}/team/app:v1"),
    ]);
    assert_eq!((code, failing_step(&v).as_str()), (12, "credentials"), "{v}");
    assert!(
        cause(&v).contains(r#"insufficient scope: user "carol" was issued a token without pull on team/app (asked repository:team/app:pull, granted [])"#),
        "{v}"
    );
    assert_eq!(step(&v, "/v2/ and auth challenge")["status"], "ok", "{v}");
}

// ---- content and platform (berth) ----

#[tokio::test]
async fn platform_missing_and_a_corrupt_blob_on_berth() {
    let s = Server::start_with(&["--disk-watermark", "100"]);
    let c = client();
    let base = s.url("");
    put_index_without_amd64(&c, &base, "team/multi", "v1", None).await;
    let (code, v) = diagnose(&[
        "--plain-http",
        "--platform",
        "linux/amd64",
        &format!("{}/team/multi:v1", s.addr),
    ]);
    assert_eq!((code, failing_step(&v).as_str()), (14, "platform"), "{v}");
    assert!(
        cause(&v).contains("the index has no manifest for linux/amd64; platforms present: linux/arm64, linux/s390x"),
        "{v}"
    );
    let (code, v) = diagnose(&[
        "--plain-http",
        "--platform",
        "linux/arm64",
        &format!("{}/team/multi:v1", s.addr),
    ]);
    assert_eq!(code, 0, "{v}");

    let p = put_image(&c, &base, "team/app", "v1", (9, "amd64", "2026-01-01T00:00:00Z"), None).await;
    let f = blob_file(s.data(), &p.layer);
    let mut bad = std::fs::read(&f).unwrap();
    bad[10] ^= 0xff;
    std::fs::write(&f, bad).unwrap();
    let image = format!("{}/team/app:v1", s.addr);
    let (code, _) = diagnose(&["--plain-http", &image]);
    assert_eq!(code, 0, "HEAD sees the right size: only --deep reads the bytes");
    let (code, v) = diagnose(&["--plain-http", "--deep", &image]);
    assert_eq!((code, failing_step(&v).as_str()), (15, "blobs"), "{v}");
    assert!(
        cause(&v).contains(&format!(
            "layer 1 {}: the bytes the registry serves do not match the digest",
            p.layer
        )) || cause(&v).contains("storage is corrupt"),
        "{v}"
    );
}

// ---- registry refusals ----

#[test]
fn rate_limited_with_retry_after() {
    fn answer(path: &str, _me: &str) -> String {
        if path == "/v2/" {
            http_response("200 OK", &[], "{}")
        } else {
            http_response(
                "429 Too Many Requests",
                &[
                    ("Retry-After", "30".into()),
                    ("Content-Type", "application/json".into()),
                ],
                r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate limit."}]}"#,
            )
        }
    }
    let addr = fake_registry(answer);
    let (code, v) = diagnose(&["--plain-http", &format!("{addr}/library/app:v1")]);
    assert_eq!((code, failing_step(&v).as_str()), (16, "registry refusals"), "{v}");
    assert!(
        cause(&v).contains("the registry is rate limiting (429 TOOMANYREQUESTS: You have reached your pull rate limit.); retry after 30 s"),
        "{v}"
    );
}

#[test]
fn a_cache_whose_upstream_is_down() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("berth.toml");
    std::fs::write(
        &cfg,
        format!("[[upstreams]]\nname = \"hub\"\nurl = \"http://{dead}\"\ntimeout = \"1s\"\n"),
    )
    .unwrap();
    let s = Server::start_with(&["--config", cfg.to_str().unwrap(), "--disk-watermark", "100"]);
    let (code, v) = diagnose(&["--plain-http", &format!("{}/hub/library/app:v1", s.addr)]);
    assert_eq!((code, failing_step(&v).as_str()), (16, "registry refusals"), "{v}");
    assert!(
        cause(&v).contains("pull-through cache cannot reach its upstream"),
        "{v}"
    );
    assert!(cause(&v).contains(&format!("upstream hub (http://{dead})")), "{v}");
    // Since when: the first failed request to it.
    assert!(cause(&v).contains("; unreachable since 20"), "{v}");
}

#[tokio::test]
async fn a_locked_out_account() {
    let s = Server::start_env(
        &["--auth", "--disk-watermark", "100"],
        &[("BERTH_INITIAL_ADMIN_PASSWORD", ADMIN_PW)],
    );
    let c = client();
    // Ten wrong passwords from this address lock the account out here.
    for i in 0..10 {
        let r = c
            .get(s.url("/token?service=berth&scope=repository:team/app:pull"))
            .basic_auth("admin", Some("wrong"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "attempt {i}");
    }
    let (code, v) = diagnose(&[
        "--plain-http",
        "--creds",
        &format!("admin:{ADMIN_PW}"),
        &format!("{}/team/app:v1", s.addr),
    ]);
    assert_eq!((code, failing_step(&v).as_str()), (12, "credentials"), "{v}");
    assert!(
        cause(&v).contains("the account is locked out after too many failed logins from this address"),
        "{v}"
    );
    assert!(cause(&v).contains("; Retry-After 300 s"), "{v}");
    assert!(fix(&v).contains("stale imagePullSecret"), "{v}");
}

#[tokio::test]
async fn a_push_refused_at_the_disk_watermark() {
    // Any real volume is at or above a watermark of 0 %: berth refuses
    // every upload, and says so in /healthz, where diagnose reads it.
    let s = Server::start_with(&["--disk-watermark", "0", "--health-interval", "100ms"]);
    let c = client();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let v: serde_json::Value = c.get(s.url("/healthz")).send().await.unwrap().json().await.unwrap();
        if v["dependencies"]["uploads"] == "refused" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "uploads never refused: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let r = c.post(s.url("/v2/team/app/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("watermark"));
    let (code, v) = diagnose(&["--plain-http", &format!("{}/team/app:v1", s.addr)]);
    assert_eq!((code, failing_step(&v).as_str()), (16, "registry refusals"), "{v}");
    assert!(
        cause(&v).contains(
            "team/app:v1 is not on the registry, and the registry's storage is at or above its disk watermark"
        ),
        "{v}"
    );
    assert!(fix(&v).contains("--disk-watermark"), "{v}");
}

#[tokio::test]
async fn a_push_refused_out_of_disk() {
    // Below --min-free-disk /readyz reports "out of disk" at once.
    let s = Server::start_with(&[
        "--disk-watermark",
        "100",
        "--min-free-disk",
        "1000000000000000000",
        "--health-interval",
        "100ms",
    ]);
    let c = client();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // (503 "starting" comes first, before the first round of checks.)
    while !c
        .get(s.url("/readyz"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .contains("out of disk")
    {
        assert!(std::time::Instant::now() < deadline, "/readyz never said out of disk");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (code, v) = diagnose(&["--plain-http", &format!("{}/team/app:v1", s.addr)]);
    assert_eq!((code, failing_step(&v).as_str()), (16, "registry refusals"), "{v}");
    assert!(
        cause(&v).contains("team/app:v1 is not on the registry, and the registry is out of disk: it refuses pushes"),
        "{v}"
    );
    assert!(fix(&v).contains("free space on the registry's data volume"), "{v}");
}

#[tokio::test]
async fn a_push_refused_by_the_quota() {
    // The tag a deployment asks for was never stored: berth refused its
    // push, and tells an admin of the project why.
    use reqwest::Method;
    let s = Server::start_env(
        &["--auth", "--disk-watermark", "100", "--quota", "team=1700"],
        &[("BERTH_INITIAL_ADMIN_PASSWORD", ADMIN_PW)],
    );
    let c = client();
    admin(
        &c,
        &s,
        Method::POST,
        "/api/v1/projects",
        serde_json::json!({"name": "team", "public": false}),
    )
    .await;
    let a = basic("admin", ADMIN_PW);
    put_image(
        &c,
        &s.url(""),
        "team/app",
        "v1",
        (1, "amd64", "2026-01-01T00:00:00Z"),
        Some(&a),
    )
    .await;
    // The project is within 10% of its quota: the next image does not fit.
    let u = admin(
        &c,
        &s,
        Method::GET,
        "/api/v1/projects/team/usage",
        serde_json::json!({}),
    )
    .await;
    let used = u["bytes"].as_u64().unwrap();
    assert!(used * 10 >= 1700 * 9 && used <= 1700, "{u}");
    let layer = bytes(2, 1000);
    let r = c
        .post(s.url(&format!("/v2/team/app/blobs/uploads/?digest={}", sha256(&layer))))
        .header("authorization", &a)
        .body(layer)
        .send()
        .await
        .unwrap();
    let body = r.text().await.unwrap();
    assert!(body.contains("over its storage quota"), "{body}");
    let (code, v) = diagnose(&[
        "--plain-http",
        "--creds",
        &format!("admin:{ADMIN_PW}"),
        &format!("{}/team/app:v2", s.addr),
    ]);
    assert_eq!((code, failing_step(&v).as_str()), (16, "registry refusals"), "{v}");
    assert!(
        cause(&v).contains("team/app:v2 is not on the registry, and project team uses"),
        "{v}"
    );
    assert!(cause(&v).contains("of its 1700-byte storage quota"), "{v}");
    assert!(fix(&v).contains("--quota team=SIZE"), "{v}");
}

// ---- a real CNCF distribution (Debian's docker-registry) ----

/// A running `docker-registry serve`, killed on drop.
struct Distribution {
    child: std::process::Child,
    addr: String,
    root: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Distribution {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a tool a test needs is there; in CI its absence is a failure,
/// elsewhere the test is skipped with a note.
fn have(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is missing in CI: scripts/install-test-deps.sh installs it"
        );
        eprintln!("skipped: {tool} is not installed (scripts/install-test-deps.sh)");
    }
    found
}

/// Starts distribution on a free loopback port, with an htpasswd file for
/// `users` (bcrypt, made by htpasswd -B) when there are any.
fn distribution(users: &[(&str, &str)]) -> Distribution {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut auth = String::new();
    if !users.is_empty() {
        let file = dir.path().join("htpasswd");
        let mut text = String::new();
        for (u, p) in users {
            let out = Command::new("htpasswd").args(["-nbB", u, p]).output().unwrap();
            assert!(
                out.status.success(),
                "htpasswd: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            text.push_str(String::from_utf8_lossy(&out.stdout).trim());
            text.push('\n');
        }
        std::fs::write(&file, text).unwrap();
        auth = format!(
            "auth:\n  htpasswd:\n    realm: diagnose-test\n    path: {}\n",
            file.display()
        );
    }
    // No blob descriptor cache: a blob removed from disk is missing at once.
    let cfg = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
        root.display()
    );
    let cfg_path = dir.path().join("config.yml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&cfg_path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("registry.log")).unwrap())
        .spawn()
        .expect("start docker-registry");
    let d = Distribution {
        child,
        addr: format!("127.0.0.1:{port}"),
        root,
        _dir: dir,
    };
    for _ in 0..200 {
        if std::net::TcpStream::connect(&d.addr).is_ok() {
            return d;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("docker-registry did not listen on {}", d.addr);
}

#[tokio::test]
async fn distribution_without_auth() {
    if !have("docker-registry") {
        return;
    }
    let d = distribution(&[]);
    let c = client();
    let base = format!("http://{}", d.addr);
    for (i, (tag, created)) in [
        ("v1.2.0", "2026-01-10T00:00:00Z"),
        ("v1.2.1", "2026-01-20T00:00:00Z"),
        ("build-77", "2026-02-01T00:00:00Z"),
    ]
    .iter()
    .enumerate()
    {
        put_image(&c, &base, "team/app", tag, (i as u64 + 1, "amd64", created), None).await;
    }
    let (code, v) = diagnose(&["--plain-http", &format!("{}/team/nothing:v1", d.addr)]);
    assert_eq!((code, failing_step(&v).as_str()), (13, "repository and tag"), "{v}");
    assert!(cause(&v).contains("repository team/nothing does not exist"), "{v}");

    // Nearest by edit distance, and by recency (the images' build times).
    let (code, v) = diagnose(&["--plain-http", &format!("{}/team/app:v1.2.2", d.addr)]);
    assert_eq!((code, failing_step(&v).as_str()), (13, "repository and tag"), "{v}");
    assert!(
        cause(&v).contains("repository team/app exists, tag v1.2.2 does not; nearest tags: v1.2.1, v1.2.0, build-77; most recently built: build-77 (built 2026-02-01T00:00:00Z), v1.2.1 (built 2026-01-20T00:00:00Z), v1.2.0 (built 2026-01-10T00:00:00Z)"),
        "{v}"
    );

    put_index_without_amd64(&c, &base, "team/multi", "v1", None).await;
    let (code, v) = diagnose(&[
        "--plain-http",
        "--platform",
        "linux/amd64",
        &format!("{}/team/multi:v1", d.addr),
    ]);
    assert_eq!((code, failing_step(&v).as_str()), (14, "platform"), "{v}");
    assert!(cause(&v).contains("platforms present: linux/arm64, linux/s390x"), "{v}");

    // A good pull, then a blob whose bytes changed on disk (same size).
    let p = put_image(&c, &base, "team/good", "v1", (7, "amd64", "2026-01-01T00:00:00Z"), None).await;
    let image = format!("{}/team/good:v1", d.addr);
    let (code, v) = diagnose(&["--plain-http", "--deep", &image]);
    assert_eq!(code, 0, "{v}");
    let f = blob_file(&d.root, &p.layer);
    let mut bad = std::fs::read(&f).unwrap();
    bad[0] ^= 0xff;
    std::fs::write(&f, &bad).unwrap();
    let (code, v) = diagnose(&["--plain-http", "--deep", &image]);
    assert_eq!((code, failing_step(&v).as_str()), (15, "blobs"), "{v}");
    assert!(
        cause(&v).contains("do not match the digest") && cause(&v).contains("storage is corrupt"),
        "{v}"
    );

    // The blob's file deleted from distribution's data directory.
    std::fs::remove_file(&f).unwrap();
    let (code, v) = diagnose(&["--plain-http", &image]);
    assert_eq!((code, failing_step(&v).as_str()), (15, "blobs"), "{v}");
    assert!(
        cause(&v).contains(&format!(
            "layer 1 {} is missing from the registry's storage (404",
            p.layer
        )),
        "{v}"
    );
}

#[tokio::test]
async fn distribution_with_htpasswd() {
    if !have("docker-registry") || !have("htpasswd") {
        return;
    }
    let d = distribution(&[("alice", "alice-secret")]);
    let c = client();
    let base = format!("http://{}", d.addr);
    let a = basic("alice", "alice-secret");
    put_image(
        &c,
        &base,
        "team/app",
        "v1",
        (3, "amd64", "2026-01-01T00:00:00Z"),
        Some(&a),
    )
    .await;
    let image = format!("{}/team/app:v1", d.addr);

    let (code, v) = diagnose(&["--plain-http", &image]);
    assert_eq!((code, failing_step(&v).as_str()), (12, "credentials"), "{v}");
    assert!(
        cause(&v).contains("the registry requires a login (Basic) and none was given"),
        "{v}"
    );

    let (code, v) = diagnose(&["--plain-http", "--creds", "alice:not-her-secret", &image]);
    assert_eq!((code, failing_step(&v).as_str()), (12, "credentials"), "{v}");
    assert!(
        cause(&v).contains(r#"the registry refused user "alice": wrong user name or password (401"#),
        "{v}"
    );
    assert!(!v.to_string().contains("not-her-secret"), "{v}");

    let (code, v) = diagnose(&[
        "--plain-http",
        "--creds",
        "alice:alice-secret",
        &format!("{}/team/app:v2", d.addr),
    ]);
    assert_eq!((code, failing_step(&v).as_str()), (13, "repository and tag"), "{v}");
    assert!(
        cause(&v).contains("repository team/app exists, tag v2 does not; nearest tags: v1"),
        "{v}"
    );

    let (code, v) = diagnose(&["--plain-http", "--deep", "--creds", "alice:alice-secret", &image]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(step(&v, "credentials")["detail"], r#"user "alice" accepted"#, "{v}");
}

#[test]
fn help_documents_json_and_every_exit_code() {
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["diagnose", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{help}");
    assert!(help.contains("--json"), "{help}");
    for code in [
        "0 the pull works",
        "2 bad arguments",
        "10 network",
        "11 TLS",
        "12 authentication",
        "13 repository or tag not found",
        "14 platform",
        "15 content",
        "16 refused",
    ] {
        assert!(help.contains(code), "{code:?} missing from:\n{help}");
    }
    // A bad option is exit 2, before any network step.
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["diagnose", "--timeout", "soon", "127.0.0.1:1/a:b"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}
