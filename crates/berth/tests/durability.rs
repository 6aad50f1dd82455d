//! Durability: restarts, crashes (SIGKILL) at arbitrary points, graceful
//! shutdown, and concurrent pushes of the same content.

mod common;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::*;

/// Every file under `blobs/` must hash to its own name: a partial or
/// corrupt blob must never be visible.
fn assert_blob_files_verified(data_dir: &Path) {
    let root = data_dir.join("blobs/sha256");
    let Ok(prefixes) = std::fs::read_dir(&root) else { return };
    for p in prefixes {
        for f in std::fs::read_dir(p.unwrap().path()).unwrap() {
            let f = f.unwrap();
            let content = std::fs::read(f.path()).unwrap();
            let name = f.file_name().to_string_lossy().to_string();
            assert_eq!(
                sha256(&content),
                format!("sha256:{name}"),
                "blob file {name} is not what its name says"
            );
        }
    }
}

fn blob_files(data_dir: &Path) -> usize {
    let root = data_dir.join("blobs/sha256");
    let Ok(prefixes) = std::fs::read_dir(&root) else {
        return 0;
    };
    prefixes
        .map(|p| std::fs::read_dir(p.unwrap().path()).unwrap().count())
        .sum()
}

#[tokio::test]
async fn restart_keeps_content_and_uploads_resume() {
    let mut s = Server::start();
    let c = client();
    let md = push_image(&c, &s, "keep/app", "v1", 1).await;
    // An upload half done when the server stops.
    let data = bytes(2, 2_000_000);
    let d = sha256(&data);
    let r = c.post(s.url("/v2/keep/app/blobs/uploads/")).send().await.unwrap();
    let loc = header(&r, "location");
    let r = c
        .patch(s.url(&loc))
        .header("content-range", "0-999999")
        .body(data[..1_000_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert!(s.terminate(), "SIGTERM exits cleanly");
    s.restart();
    // A new client: pooled connections to the old process are dead.
    let c = client();
    // Everything is still there.
    let r = c.get(s.url("/v2/keep/app/manifests/v1")).send().await.unwrap();
    assert_eq!(header(&r, "docker-content-digest"), md);
    let tags: serde_json::Value = c
        .get(s.url("/v2/keep/app/tags/list"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["v1"]));
    // The upload resumes where it stopped, and the commit is verified.
    let r = c.get(s.url(&loc)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(header(&r, "range"), "0-999999");
    let r = c
        .patch(s.url(&loc))
        .header("content-range", "1000000-1999999")
        .body(data[1_000_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = c.put(s.url(&format!("{loc}?digest={d}"))).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let got = c.get(s.url(&format!("/v2/keep/app/blobs/{d}"))).send().await.unwrap();
    assert_eq!(got.bytes().await.unwrap().as_ref(), &data[..]);
}

/// Pushes blobs one after another until the server dies; returns the
/// blobs whose push was acknowledged.
async fn push_until_killed(c: reqwest::Client, url_base: String, seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut acked = Vec::new();
    for i in 0..200u64 {
        let data = bytes(seed * 1000 + i, 4 * 1024 * 1024 + (i as usize * 4099) % 65536);
        let d = sha256(&data);
        // Half monolithic, half chunked, so crashes hit both paths.
        let ok = if i % 2 == 0 {
            c.post(format!("{url_base}/v2/crash/app/blobs/uploads/?digest={d}"))
                .body(data.clone())
                .send()
                .await
                .map(|r| r.status().as_u16() == 201)
                .unwrap_or(false)
        } else {
            chunked_push(&c, &url_base, &data, &d).await.unwrap_or(false)
        };
        if !ok {
            break;
        }
        acked.push((d, data));
    }
    acked
}

async fn chunked_push(c: &reqwest::Client, base: &str, data: &[u8], d: &str) -> Result<bool, reqwest::Error> {
    let r = c.post(format!("{base}/v2/crash/app/blobs/uploads/")).send().await?;
    let mut loc = header(&r, "location");
    for (i, part) in data.chunks(1024 * 1024).enumerate() {
        let start = i * 1024 * 1024;
        let r = c
            .patch(format!("{base}{loc}"))
            .header("content-range", format!("{}-{}", start, start + part.len() - 1))
            .body(part.to_vec())
            .send()
            .await?;
        if r.status() != 202 {
            return Ok(false);
        }
        loc = header(&r, "location");
    }
    let r = c.put(format!("{base}{loc}?digest={d}")).send().await?;
    Ok(r.status() == 201)
}

#[tokio::test]
async fn kill_9_at_random_points_loses_nothing_acknowledged() {
    let mut s = Server::start();
    let mut all_acked = Vec::new();
    for round in 0..5u64 {
        let pusher = tokio::spawn(push_until_killed(client(), s.url(""), round));
        // Vary the moment of the crash from round to round.
        tokio::time::sleep(Duration::from_millis(150 + round * 170)).await;
        s.kill9();
        let acked = tokio::time::timeout(Duration::from_secs(60), pusher)
            .await
            .expect("pusher ends")
            .unwrap();
        eprintln!("round {round}: {} pushes acknowledged before the kill", acked.len());
        all_acked.extend(acked);
        assert_blob_files_verified(s.data());
        s.restart();
        let c = client();
        // Every acknowledged blob, from every round, is complete.
        for (d, data) in &all_acked {
            let r = c.get(s.url(&format!("/v2/crash/app/blobs/{d}"))).send().await.unwrap();
            assert_eq!(r.status(), 200, "acknowledged blob {d} lost after crash {round}");
            let body = r.bytes().await.unwrap();
            assert_eq!(sha256(&body), *d);
            assert_eq!(body.len(), data.len());
        }
    }
    assert!(
        !all_acked.is_empty(),
        "some pushes were acknowledged before the crashes"
    );
    // After a crash the client can simply retry a push.
    let c = client();
    let data = bytes(99, 3_000_000);
    push_blob(&c, &s, "crash/app", &data).await;
}

#[tokio::test]
async fn concurrent_pushes_of_one_layer_store_it_once() {
    let s = Server::start();
    let c = client();
    let layer = bytes(5, 3_000_000);
    let d = sha256(&layer);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (c, url, layer, d) = (c.clone(), s.url(""), layer.clone(), d.clone());
        tasks.push(tokio::spawn(async move {
            // Half into one repository, half into their own.
            let repo = if i % 2 == 0 {
                "same/app".to_string()
            } else {
                format!("own/app{i}")
            };
            let r = c
                .post(format!("{url}/v2/{repo}/blobs/uploads/?digest={d}"))
                .body(layer)
                .send()
                .await
                .unwrap();
            (repo, r.status().as_u16())
        }));
    }
    for t in tasks {
        let (repo, status) = t.await.unwrap();
        assert_eq!(status, 201, "{repo}");
        let r = c.get(s.url(&format!("/v2/{repo}/blobs/{d}"))).send().await.unwrap();
        assert_eq!(sha256(&r.bytes().await.unwrap()), d);
    }
    assert_eq!(blob_files(s.data()), 1, "the layer is stored once");
    assert_eq!(
        std::fs::read_dir(s.data().join("uploads")).unwrap().count(),
        0,
        "no upload left behind"
    );
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish() {
    let mut s = Server::start();
    let c = client();
    let data = bytes(8, 2_000_000);
    let d = sha256(&data);
    let url = s.url(&format!("/v2/drain/app/blobs/uploads/?digest={d}"));
    // A slow upload: 20 chunks, 100 ms apart.
    let chunks: Vec<Bytes> = data.chunks(100_000).map(Bytes::copy_from_slice).collect();
    let stream = futures_util::stream::iter(chunks).then(|chunk| async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok::<_, std::io::Error>(chunk)
    });
    let upload = tokio::spawn({
        let c = c.clone();
        async move {
            c.post(url)
                .body(reqwest::Body::wrap_stream(stream))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = s.pid();
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    let status = upload.await.unwrap().expect("the in-flight upload completes");
    assert_eq!(status, 201);
    assert!(s.terminate(), "berth exits cleanly after draining");
    assert!(s.log_text().contains("shutting down"), "{}", s.log_text());
    s.restart();
    let c = client();
    let r = c.get(s.url(&format!("/v2/drain/app/blobs/{d}"))).send().await.unwrap();
    assert_eq!(sha256(&r.bytes().await.unwrap()), d);
}

use futures_util::StreamExt;
