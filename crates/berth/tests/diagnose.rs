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
    let s = Server::start();
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
