//! `berth diagnose` against a real berth on loopback: each fault asserts
//! the failing step, the root cause and the exit code.

mod common;

use std::process::Command;

use common::*;

/// Runs `berth diagnose --json ARGS`; returns (exit code, report).
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
    (out.status.code().unwrap_or(-1), v)
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
