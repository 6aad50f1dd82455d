//! Health, readiness, metrics, request ids and logs, against the real
//! binary.

mod common;

use std::time::{Duration, Instant};

use common::*;

async fn get(c: &reqwest::Client, url: String) -> (u16, String) {
    let r = c.get(url).send().await.expect("request");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

/// The value of an unlabelled or fully labelled sample in a scrape.
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn healthz_has_the_guide_shape_and_turns_unhealthy_after_three_failures() {
    let s = Server::start_with(&["--health-interval", "100ms", "--health-failures", "3"]);
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (status, body) = get(&c, s.url("/healthz")).await;
        if status == 200 {
            break body;
        }
        assert!(Instant::now() < deadline, "never healthy: {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["status", "image_version", "last_check", "dependencies"],
        "{body}"
    );
    assert_eq!(v["status"], "healthy");
    assert_eq!(v["image_version"], env!("CARGO_PKG_VERSION"));
    let t = v["last_check"].as_str().unwrap();
    assert!(
        t.len() == 24 && t.ends_with('Z') && t.as_bytes()[10] == b'T',
        "RFC 3339: {t}"
    );
    assert_eq!(v["dependencies"]["database"], "connected");
    assert_eq!(v["dependencies"]["cache"], "available");
    assert_eq!(v["dependencies"]["disk"], "ok");
    assert_eq!(get(&c, s.url("/readyz")).await.0, 200);
    assert_eq!(get(&c, s.url("/livez")).await.0, 200);

    // Break the blob store in a way root cannot write through: the staging
    // directory becomes a file.
    let uploads = s.data().join("uploads");
    std::fs::remove_dir_all(&uploads).unwrap();
    std::fs::write(&uploads, b"not a directory").unwrap();
    let failures =
        |scrape: &str| sample(scrape, "berth_health_check_failures_total{dependency=\"cache\"}").unwrap_or(0.0);
    let mut saw_failing_but_healthy = false;
    let deadline = Instant::now() + Duration::from_secs(15);
    let (failed_checks, body) = loop {
        let scrape = get(&c, s.url("/metrics")).await.1;
        let (status, body) = get(&c, s.url("/healthz")).await;
        let n = failures(&scrape);
        if status == 200 && n >= 1.0 {
            saw_failing_but_healthy = true;
        }
        if status == 503 {
            break (failures(&get(&c, s.url("/metrics")).await.1), body);
        }
        assert!(Instant::now() < deadline, "never unhealthy: {body}");
        tokio::time::sleep(Duration::from_millis(15)).await;
    };
    assert!(
        saw_failing_but_healthy,
        "one or two failed checks must not make berth unhealthy"
    );
    assert!(failed_checks >= 3.0, "unhealthy after {failed_checks} failed checks");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "unhealthy");
    assert_eq!(v["dependencies"]["cache"], "unavailable");
    assert_eq!(v["dependencies"]["database"], "connected");
    let (status, body) = get(&c, s.url("/readyz")).await;
    assert_eq!((status, body.trim()), (503, "not ready: unhealthy"));
    assert!(s.log_text().contains("dependency is unhealthy"));

    // One good check is enough to recover.
    std::fs::remove_file(&uploads).unwrap();
    std::fs::create_dir(&uploads).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&c, s.url("/healthz")).await.0 != 200 {
        assert!(Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(&c, s.url("/readyz")).await.0, 200);
}

#[tokio::test]
async fn low_disk_fails_readiness() {
    let s = Server::start_with(&["--health-interval", "100ms", "--min-free-disk", "18446744073709551615"]);
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get(&c, s.url("/readyz")).await;
        if status == 503 && body.contains("out of disk") {
            break;
        }
        assert!(Instant::now() < deadline, "readyz: {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn request_ids_access_log_and_metrics() {
    let s = Server::start();
    let c = client();
    push_image(&c, &s, "obs/app", "v1", 7).await;
    // An incoming request id is honoured; otherwise berth makes one.
    // A W3C traceparent puts the request in the caller's trace.
    let r = c
        .get(s.url("/v2/obs/app/manifests/v1"))
        .header("x-request-id", "ci-run-17.pull")
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-request-id"), "ci-run-17.pull");
    let r = c.get(s.url("/v2/obs/app/manifests/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let generated = header(&r, "x-request-id");
    assert_eq!(generated.len(), 32, "{generated}");
    assert!(generated.bytes().all(|b| b.is_ascii_hexdigit()));
    // A request id with unsafe characters is replaced.
    let r = c
        .get(s.url("/v2/"))
        .header("x-request-id", "a b\"c")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "x-request-id").len(), 32);

    // The access log: one JSON line per request, ECS field names.
    let deadline = Instant::now() + Duration::from_secs(5);
    let line = loop {
        let log = s.log_text();
        if let Some(l) = log
            .lines()
            .find(|l| l.contains("\"http.request.id\":\"ci-run-17.pull\""))
        {
            break l.to_string();
        }
        assert!(Instant::now() < deadline, "no access log line:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["message"], "request");
    assert_eq!(v["log.level"], "info");
    assert_eq!(v["trace.id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    let span = v["span.id"].as_str().unwrap();
    assert!(span.len() == 16 && span != "00f067aa0ba902b7", "{span}");
    assert_eq!(v["http.request.method"], "GET");
    assert_eq!(v["url.path"], "/v2/obs/app/manifests/v1");
    assert_eq!(v["http.response.status_code"], 200);
    assert_eq!(v["client.ip"], "127.0.0.1");
    assert!(v["event.duration"].as_u64().unwrap() > 0);
    assert!(v["@timestamp"].as_str().unwrap().ends_with('Z'));
    // Each serving worker writes its lines in batches (flushed within
    // 100 ms), so the 404's line may come after the line above.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s.log_text().lines().any(|l| {
        l.contains(&format!("\"http.request.id\":\"{generated}\"")) && l.contains("\"http.response.status_code\":404")
    }) {
        assert!(
            Instant::now() < deadline,
            "no access log line for the 404:\n{}",
            s.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every line is JSON (stderr is not a terminal here).
    for l in s.log_text().lines() {
        serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
    }

    let scrape = get(&c, s.url("/metrics")).await.1;
    assert_eq!(sample(&scrape, "berth_pulls_total"), Some(2.0), "{scrape}");
    assert_eq!(
        sample(&scrape, "berth_pull_failures_total{reason=\"not_found\"}"),
        Some(1.0)
    );
    // Two blobs and a manifest.
    assert_eq!(sample(&scrape, "berth_pushes_total"), Some(3.0));
    assert_eq!(
        sample(
            &scrape,
            "berth_http_requests_total{method=\"PUT\",route=\"manifest\",status=\"201\"}"
        ),
        Some(1.0)
    );
    assert!(sample(&scrape, "berth_http_received_bytes_total{route=\"upload\"}").unwrap() >= 1000.0);
    assert!(sample(&scrape, "berth_http_sent_bytes_total{route=\"manifest\"}").unwrap() > 0.0);
    assert!(!scrape.contains("obs/app"), "no repository labels");
}

#[tokio::test]
async fn readyz_fails_while_draining() {
    let mut s = Server::start_with(&["--drain-delay", "3s", "--health-interval", "100ms"]);
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&c, s.url("/readyz")).await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(s.pid().to_string())
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (status, body) = get(&c, s.url("/readyz")).await;
        if status == 503 {
            assert_eq!(body.trim(), "not ready: draining");
            break;
        }
        assert!(Instant::now() < deadline, "readyz did not report draining");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Still serving while draining.
    assert_eq!(get(&c, s.url("/v2/")).await.0, 200);
    assert!(s.terminate(), "exits cleanly after the drain");
}

#[tokio::test]
async fn ops_endpoints_on_a_separate_listener() {
    let s = Server::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(5);
    let ops = loop {
        let found = s.log_text().lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v["ops_listen"].as_str().map(str::to_string)
        });
        if let Some(a) = found {
            break a;
        }
        assert!(Instant::now() < deadline, "no ops_listen in the log");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(get(&c, s.url("/metrics")).await.0, 404);
    let (status, body) = get(&c, format!("http://{ops}/metrics")).await;
    assert_eq!(status, 200);
    assert!(body.contains("berth_build_info"));
    assert_eq!(get(&c, format!("http://{ops}/livez")).await.0, 200);
}
