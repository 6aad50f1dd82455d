//! `berth bench` against a running berth: seeding, every scenario briefly
//! (checked through `--json`), and the errors bad input must produce.

mod common;

use std::process::{Command, Output, Stdio};

use common::Server;

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("bench")
        .args(args)
        .env_remove("BERTH_BENCH_REGISTRY")
        .env_remove("BERTH_BENCH_USER")
        .env_remove("BERTH_BENCH_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("run berth bench")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a scenario for a moment and returns its JSON summary, after checking
/// that every operation succeeded.
fn run_json(registry: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec![
        "--registry",
        registry,
        "--json",
        "--duration",
        "1s",
        "--connections",
        "4",
    ];
    all.extend_from_slice(args);
    let out = bench(&all);
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    // Piped output: no progress bar on stderr.
    assert!(!text(&out.stderr).contains("measuring"), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", text(&out.stdout)));
    let requests = v["requests"].as_u64().unwrap();
    assert!(requests > 0, "{args:?}: {v}");
    assert_eq!(v["ok"].as_u64(), Some(requests), "{args:?}: {v}");
    assert_eq!(v["success_rate"].as_f64(), Some(100.0), "{args:?}: {v}");
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(0), "{args:?}: {v}");
    v
}

#[test]
fn seeds_and_runs_every_scenario() {
    let s = Server::start();
    let registry = format!("http://{}", s.addr);
    let out = bench(&["--registry", &registry, "--seed", "25", "--connections", "4"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("seeded 25 repositories (0 already there)"));
    // Seeding again keeps what is there.
    let out = bench(&["--registry", &registry, "--seed", "25"]);
    assert!(
        text(&out.stderr).contains("(25 already there)"),
        "{}",
        text(&out.stderr)
    );

    let v = run_json(&registry, &["catalog"]);
    assert!(v["bytes"].as_u64().unwrap() > 25 * 10, "{v}");
    let v = run_json(&registry, &["catalog-walk", "--page-size", "10"]);
    // 25 repositories in pages of 10 (at least 3 pages; more if the earlier
    // pushes created the push repository).
    assert!(
        v["http_requests"].as_u64().unwrap() >= 3 * v["requests"].as_u64().unwrap(),
        "{v}"
    );
    for args in [
        &["catalog-page", "--page-size", "5"][..],
        &["tags"],
        &["manifest-get"],
        &["manifest-get", "--by-digest", "--image", "bench/r00024:latest"],
        &["manifest-head"],
        &["blob-get"],
        &["blob-get", "--range", "100"],
        &["pull-image", "--image", "bench/r00007"],
        &["mixed", "--mix", "manifest-get=2,tags=1,pull-image=1"],
        &["manifest-head", "--rate", "200", "--warmup", "200ms"],
    ] {
        run_json(&registry, args);
    }
    let v = run_json(&registry, &["blob-get", "--range", "100", "--requests", "20"]);
    assert_eq!(v["requests"].as_u64(), Some(20), "{v}");
    assert_eq!(v["bytes"].as_u64(), Some(2000), "{v}");
    let v = run_json(&registry, &["push", "--layer-size", "300KiB", "--requests", "6"]);
    assert_eq!(v["bytes"].as_u64(), Some(6 * 300 * 1024), "{v}");
    assert_eq!(v["http_requests"].as_u64(), Some(12), "POST + PUT each: {v}");
    let v = run_json(
        &registry,
        &[
            "push",
            "--layer-size",
            "300KiB",
            "--chunk-size",
            "100KiB",
            "--requests",
            "3",
        ],
    );
    assert_eq!(v["http_requests"].as_u64(), Some(15), "POST + 3 PATCH + PUT each: {v}");

    // The human table names the measured columns.
    let out = bench(&["--registry", &registry, "manifest-get", "-d", "300ms"]);
    let table = text(&out.stdout);
    for col in ["requests", "success", "QPS", "MB/s", "p50", "p99.9", "max"] {
        assert!(table.contains(col), "{table}");
    }
}

#[test]
fn failures_are_grouped_by_status_and_code() {
    let s = Server::start();
    let registry = format!("http://{}", s.addr);
    assert!(bench(&["--registry", &registry, "--seed", "1"]).status.success());
    // Unlink the image's layer: the manifest still resolves (so setup
    // passes), but every pull then fails on that blob.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = common::client();
        let m: serde_json::Value = c
            .get(s.url("/v2/bench/r00000/manifests/latest"))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let layer = m["layers"][0]["digest"].as_str().unwrap();
        let resp = c
            .delete(s.url(&format!("/v2/bench/r00000/blobs/{layer}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 202);
    });
    let out = bench(&[
        "--registry",
        &registry,
        "pull-image",
        "-d",
        "300ms",
        "-c",
        "2",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let requests = v["requests"].as_u64().unwrap();
    assert!(requests > 0, "{v}");
    assert_eq!(v["ok"].as_u64(), Some(0), "{v}");
    assert_eq!(v["success_rate"].as_f64(), Some(0.0), "{v}");
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{v}");
    assert_eq!(errors[0]["status"].as_u64(), Some(404), "{v}");
    assert_eq!(errors[0]["error"].as_str(), Some("BLOB_UNKNOWN"), "{v}");
    assert_eq!(errors[0]["count"].as_u64(), Some(requests), "{v}");

    let out = bench(&["--registry", &registry, "pull-image", "-d", "300ms"]);
    let table = text(&out.stdout);
    assert!(
        table.contains("errors:") && table.contains("404  BLOB_UNKNOWN"),
        "{table}"
    );

    // A missing blob named directly is refused before the run (HEAD: no body, so no code).
    let out = bench(&[
        "--registry",
        &registry,
        "blob-get",
        "--blob",
        &common::sha256(b"nowhere"),
    ]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("cannot find blob"), "{}", text(&out.stderr));
}

#[test]
fn bad_input_gets_a_clear_error_not_a_panic() {
    // A port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dead = format!("http://127.0.0.1:{port}");
    let s = Server::start();
    let live = format!("http://{}", s.addr);
    for (args, needle) in [
        (
            vec!["--registry", dead.as_str(), "catalog", "-d", "1s"],
            "cannot reach the registry",
        ),
        (
            vec!["--registry", live.as_str(), "manifest-get", "--image", "Bad Ref:x"],
            "bad --image",
        ),
        (
            vec!["--registry", live.as_str(), "manifest-get", "--image", "a@sha256:12"],
            "bad --image",
        ),
        (
            vec!["--registry", live.as_str(), "catalog", "--duration", "0s"],
            "--duration must be more than zero",
        ),
        (vec!["--registry", "ftp://x", "catalog"], "bad registry URL"),
        (
            vec!["--registry", live.as_str(), "manifest-get", "--image", "no/such:tag"],
            "not in the registry",
        ),
        (vec!["--registry", live.as_str()], "nothing to do"),
    ] {
        let out = bench(&args);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
