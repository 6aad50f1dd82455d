//! `berth serve` and `berth migrate` on PostgreSQL metadata (a private
//! cluster on a loopback port; blobs stay in the data directory). Needs the
//! `postgres` feature; skipped with a notice where PostgreSQL is not
//! installed, a failure under `CI=true`.
#![cfg(feature = "postgres")]

mod common;

use std::process::Command;

use common::*;
use metadata::pg_cluster::TestCluster;

fn berth(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .env_remove("BERTH_METADATA")
        .output()
        .expect("run berth")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_applies_the_schema_once_and_says_so() {
    let Some(cluster) = TestCluster::start() else { return };
    let url = cluster.create_database("migrate_cli").await;
    let first = berth(&["migrate", "--metadata", &url]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert_eq!(
        String::from_utf8_lossy(&first.stdout).trim(),
        "schema at version 2: applied 1 (initial schema), 2 (leases)"
    );
    let again = berth(&["migrate", "--metadata", &url]);
    assert_eq!(
        String::from_utf8_lossy(&again.stdout).trim(),
        "schema at version 2: already up to date"
    );
    // Without a PostgreSQL URL there is nothing to migrate, and it says why.
    let none = berth(&["migrate"]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("--metadata postgres://"));
}

#[test]
fn serve_names_what_to_check_when_postgresql_is_unreachable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("postgres://berth:hunter2@127.0.0.1:{port}/registry");
    let out = berth(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--metadata",
        &url,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "cannot connect to PostgreSQL at 127.0.0.1:{port} (database registry, user berth)"
        )),
        "{err}"
    );
    assert!(err.contains("check that PostgreSQL runs"), "{err}");
    assert!(err.contains("--metadata, BERTH_METADATA"), "{err}");
    assert!(!err.contains("hunter2"), "the password stays out of messages: {err}");
}

/// A push and pull through the HTTP API with metadata in PostgreSQL:
/// nothing of it is in the data directory's database (there is none), it
/// survives a restart, and a PostgreSQL outage gives fast 503 UNAVAILABLE
/// answers, then full service again without restarting berth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_postgresql_pushes_pulls_and_survives_an_outage() {
    let Some(mut cluster) = TestCluster::start() else {
        return;
    };
    let url = cluster.create_database("serve").await;
    let mut s = Server::start_with(&["--metadata", &url, "--health-interval", "200ms"]);
    let c = client();
    let digest = push_image(&c, &s, "pg/app", "v1", 7).await;
    let get = |s: &Server, path: &str| {
        c.get(s.url(path))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
    };
    let resp = get(&s, "/v2/pg/app/manifests/v1").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(header(&resp, "docker-content-digest"), digest);
    let layer = bytes(7, 1000);
    let resp = c
        .get(s.url(&format!("/v2/pg/app/blobs/{}", sha256(&layer))))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.bytes().await.unwrap().as_ref(), layer.as_slice());
    assert!(!s.data().join("meta.redb").exists(), "metadata went to PostgreSQL");

    assert!(s.terminate());
    s.restart();
    let tags: serde_json::Value = c
        .get(s.url("/v2/pg/app/tags/list"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["v1"]));

    cluster.stop_server();
    // Requests that need the store fail at once (each within the pool's
    // 5 s wait at most), with the spec's code, and nothing of the backend's
    // text.
    for _ in 0..3 {
        let resp = c.get(s.url("/v2/pg/app/tags/list")).send().await.unwrap();
        let (status, code) = error_code(resp).await;
        assert_eq!((status, code.as_str()), (503, "UNAVAILABLE"));
    }
    let resp = c.post(s.url("/v2/pg/other/blobs/uploads/")).send().await.unwrap();
    assert_eq!(error_code(resp).await, (503, "UNAVAILABLE".to_string()));

    assert!(cluster.start_server(), "PostgreSQL restarts");
    let digest2 = push_image(&c, &s, "pg/app", "v2", 8).await;
    let resp = get(&s, "/v2/pg/app/manifests/v2").send().await.unwrap();
    assert_eq!(header(&resp, "docker-content-digest"), digest2);
    let tags: serde_json::Value = c
        .get(s.url("/v2/pg/app/tags/list"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["v1", "v2"]));

    // The offline commands work on the same backends (fsck counts the
    // manifests' bytes as blobs: two images of three objects each).
    assert!(s.terminate());
    let dir = s.data().to_str().unwrap().to_string();
    let fsck = berth(&["fsck", "--data-dir", &dir, "--metadata", &url]);
    let out = String::from_utf8_lossy(&fsck.stdout);
    assert!(fsck.status.success(), "{out}{}", String::from_utf8_lossy(&fsck.stderr));
    assert!(out.contains("checked 6 blobs") && out.contains(": 0 problems"), "{out}");
    let du = berth(&["du", "--data-dir", &dir, "--metadata", &url]);
    let out = String::from_utf8_lossy(&du.stdout);
    assert!(du.status.success() && out.contains("pg/app"), "{out}");
    let user = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["user", "add", "ops", "--metadata", &url, "--data-dir", &dir])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"a long enough password\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(user.status.success(), "{}", String::from_utf8_lossy(&user.stderr));
    let list = berth(&["user", "list", "--metadata", &url, "--data-dir", &dir]);
    assert!(String::from_utf8_lossy(&list.stdout).lines().any(|l| l == "ops"));
}
