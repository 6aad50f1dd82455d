//! Webhook events: CloudEvents for push, tag, pull, mount and delete arrive
//! in order, filters apply, and events pending across a restart of berth are
//! delivered once the receiver is back.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use common::*;
use serde_json::Value;

/// A webhook receiver on loopback; it appends (path, content type, body) of
/// every request to the shared list, in arrival order.
struct Receiver {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

async fn receiver(addr: &str, got: Arc<Mutex<Vec<(String, String, Value)>>>) -> Receiver {
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind receiver");
    let addr = listener.local_addr().unwrap();
    let sink = got.clone();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri, headers: HeaderMap, body: String| {
        let sink = sink.clone();
        async move {
            let ct = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            sink.lock().unwrap().push((uri.path().to_string(), ct, v));
            "ok"
        }
    });
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
    });
    Receiver {
        addr,
        stop: Some(tx),
        task,
    }
}

impl Receiver {
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// Events delivered to `path`, as (type, subject).
fn delivered(got: &Mutex<Vec<(String, String, Value)>>, path: &str) -> Vec<(String, String)> {
    got.lock()
        .unwrap()
        .iter()
        .filter(|(p, _, _)| p == path)
        .map(|(_, _, v)| {
            (
                v["type"].as_str().unwrap_or("").to_string(),
                v["subject"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

async fn wait_for_count(got: &Mutex<Vec<(String, String, Value)>>, path: &str, n: usize) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d = delivered(got, path);
        if d.len() >= n {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} events arrived at {path}: {d:?}",
            d.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ev(t: &str, subject: &str) -> (String, String) {
    (format!("io.berth.{t}"), subject.to_string())
}

#[tokio::test]
async fn webhook_events_arrive_in_order_and_survive_a_restart() {
    let got = Arc::new(Mutex::new(Vec::new()));
    let rx = receiver("127.0.0.1:0", got.clone()).await;
    let hook = rx.addr;
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("berth.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[[webhooks]]
name = "all"
url = "http://{hook}/all"
backoff_initial = "50ms"
backoff_max = "200ms"
max_attempts = 100000

[[webhooks]]
name = "keep-deletes"
url = "http://{hook}/deletes"
types = ["delete"]
repositories = ["hooks/keep*"]
"#
        ),
    )
    .unwrap();
    let mut s = Server::start_with(&["--config", cfg.to_str().unwrap()]);
    let c = client();

    let md = push_image(&c, &s, "hooks/app", "v1", 11).await;
    let r = c.get(s.url("/v2/hooks/app/manifests/v1")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let layer = sha256(&bytes(11, 1000));
    let r = c
        .post(s.url(&format!("/v2/hooks/other/blobs/uploads/?mount={layer}&from=hooks/app")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = c.delete(s.url("/v2/hooks/app/manifests/v1")).send().await.unwrap();
    assert_eq!(r.status(), 202);

    let d = wait_for_count(&got, "/all", 5).await;
    assert_eq!(
        d,
        vec![
            ev("push", "hooks/app:v1"),
            ev("tag", "hooks/app:v1"),
            ev("pull", "hooks/app:v1"),
            ev("mount", &format!("hooks/other@{layer}")),
            ev("delete", "hooks/app:v1"),
        ]
    );
    {
        let all = got.lock().unwrap();
        let (_, ct, push) = &all[0];
        assert!(ct.starts_with("application/cloudevents+json"), "{ct}");
        assert_eq!(push["specversion"], "1.0");
        assert!(push["source"].as_str().unwrap().starts_with("/berth/"));
        assert_eq!(push["data"]["repository"], "hooks/app");
        assert_eq!(push["data"]["digest"], md.as_str());
        assert_eq!(push["data"]["mediaType"], "application/vnd.oci.image.manifest.v1+json");
        assert_eq!(all[3].2["data"]["from"], "hooks/app");
        let mut ids: Vec<&str> = all.iter().map(|(_, _, v)| v["id"].as_str().unwrap()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 5, "event ids are unique");
    }
    // The filtered endpoint saw nothing of hooks/app, and sees a delete in
    // hooks/keepme but not its push.
    push_image(&c, &s, "hooks/keepme", "v1", 12).await;
    let r = c.delete(s.url("/v2/hooks/keepme/manifests/v1")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        wait_for_count(&got, "/deletes", 1).await,
        vec![ev("delete", "hooks/keepme:v1")]
    );
    wait_for_count(&got, "/all", 8).await;

    // The receiver goes away; events wait in the outbox, across a restart.
    rx.stop().await;
    push_image(&c, &s, "hooks/app", "v2", 13).await;
    let r = c.delete(s.url("/v2/hooks/app/manifests/v2")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let scrape = c.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
        let failed = scrape
            .lines()
            .any(|l| l.starts_with("berth_event_deliveries_total{endpoint=\"all\",result=\"failed\"}"));
        let pending = scrape.lines().any(|l| {
            l.strip_prefix("berth_events_pending{endpoint=\"all\"} ")
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v >= 3.0)
        });
        if failed && pending {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no failed deliveries or pending events:\n{scrape}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(s.terminate(), "clean exit with events pending");
    s.restart();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _rx = receiver(&hook.to_string(), got.clone()).await;
    let d = wait_for_count(&got, "/all", 11).await;
    assert_eq!(
        d[8..],
        [
            ev("push", "hooks/app:v2"),
            ev("tag", "hooks/app:v2"),
            ev("delete", "hooks/app:v2"),
        ]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(delivered(&got, "/all").len(), 11, "nothing delivered twice");
}

/// `kill -9` during a storm of pushes: after the restart, every push that
/// was acknowledged, and every tag the store holds at all, has its push
/// event in the stream (the change and its event are one transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_never_leaves_a_change_without_its_event() {
    const PUSHERS: usize = 6;
    const PER_PUSHER: usize = 40;
    let got = Arc::new(Mutex::new(Vec::new()));
    let rx = receiver("127.0.0.1:0", got.clone()).await;
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("berth.toml");
    let hook = rx.addr;
    std::fs::write(
        &cfg,
        format!("[[webhooks]]\nname = \"all\"\nurl = \"http://{hook}/all\"\ntypes = [\"push\"]\nbackoff_initial = \"50ms\"\n"),
    )
    .unwrap();
    let mut s = Server::start_with(&["--config", cfg.to_str().unwrap()]);
    let c = client();
    let layer = bytes(21, 1000);
    let ld = push_blob(&c, &s, "crash/app", &layer).await;
    let base = s.url("");
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut tasks = Vec::new();
    for p in 0..PUSHERS {
        let (c, base, acked, ld) = (c.clone(), base.clone(), acked.clone(), ld.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_PUSHER {
                let tag = format!("p{p}-{i}");
                let config = format!("{{\"os\":\"linux\",\"tag\":\"{tag}\"}}").into_bytes();
                let cd = sha256(&config);
                let r = c
                    .post(format!("{base}/v2/crash/app/blobs/uploads/?digest={cd}"))
                    .body(config.clone())
                    .send()
                    .await;
                if !r.is_ok_and(|r| r.status() == 201) {
                    return;
                }
                let m = image_manifest((&cd, config.len()), &[(&ld, 1000)]);
                let r = c
                    .put(format!("{base}/v2/crash/app/manifests/{tag}"))
                    .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                    .body(m)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 201 => acked.lock().unwrap().push(tag),
                    _ => return,
                }
            }
        }));
    }
    // Kill it in the middle of the storm.
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < PUSHERS * PER_PUSHER / 4 {
        assert!(Instant::now() < deadline, "pushes are not acknowledged");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.kill9();
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() < PUSHERS * PER_PUSHER, "the kill came after the storm");
    s.restart();
    let r = c.get(s.url("/v2/crash/app/tags/list?n=10000")).send().await.unwrap();
    let body: Value = r.json().await.unwrap();
    let stored: Vec<String> = body["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    for t in &acked {
        assert!(stored.contains(t), "acknowledged push of {t} is not in the store");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen: std::collections::HashSet<String> = delivered(&got, "/all")
            .into_iter()
            .filter(|(ty, _)| ty == "io.berth.push")
            .map(|(_, subject)| subject)
            .collect();
        let missing: Vec<&String> = stored
            .iter()
            .filter(|t| !seen.contains(&format!("crash/app:{t}")))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} stored tags ({} acknowledged) have no push event: {missing:?}",
            missing.len(),
            stored.len(),
            acked.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rx.stop().await;
}
