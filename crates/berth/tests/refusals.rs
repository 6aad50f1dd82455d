//! Push refusals through the binary: immutable tags, quotas and the
//! disk-watermark guard, with the exact errors a client sees.

mod common;

use common::*;

#[tokio::test]
async fn immutable_tags_are_denied_over_http() {
    let s = Server::start_with(&["--gc-interval", "0", "--immutable-tags", "v*,lib=release-*"]);
    let c = client();
    push_image(&c, &s, "lib/app", "v1", 1).await;
    push_image(&c, &s, "lib/app", "release-1", 1).await;
    push_image(&c, &s, "lib/app", "latest", 1).await;
    // Another image onto v1: refused.
    let config = b"{\"other\":true}".to_vec();
    let layer = bytes(2, 100);
    let cd = push_blob(&c, &s, "lib/app", &config).await;
    let ld = push_blob(&c, &s, "lib/app", &layer).await;
    let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())]);
    for t in ["v1", "release-1"] {
        let resp = c
            .put(s.url(&format!("/v2/lib/app/manifests/{t}")))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(m.clone())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(
            (status, body["errors"][0]["code"].as_str()),
            (403, Some("DENIED")),
            "{body}"
        );
        let msg = body["errors"][0]["message"].as_str().unwrap();
        assert!(msg.starts_with(&format!("tag lib/app:{t} is immutable")), "{msg}");
    }
    let resp = c.delete(s.url("/v2/lib/app/manifests/v1")).send().await.unwrap();
    assert_eq!(error_code(resp).await, (403, "DENIED".to_string()));
    // A mutable tag still moves.
    let resp = c
        .put(s.url("/v2/lib/app/manifests/latest"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(m)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
}

#[test]
fn an_empty_rule_is_a_clear_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["serve", "--immutable-tags", "team="])
        .env_remove("BERTH_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("immutable tag rule \"team=\" is empty"), "{err}");
}

#[tokio::test]
async fn above_the_disk_watermark_uploads_are_denied_over_http() {
    let s = Server::start_with(&["--gc-interval", "0", "--disk-watermark", "0"]);
    let c = client();
    let resp = c.post(s.url("/v2/lib/app/blobs/uploads/")).send().await.unwrap();
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        (status, body["errors"][0]["code"].as_str()),
        (403, Some("DENIED")),
        "{body}"
    );
    assert!(
        body["errors"][0]["message"].as_str().unwrap().contains("watermark"),
        "{body}"
    );
    // Reads still answer.
    let resp = c.get(s.url("/v2/_catalog")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

#[tokio::test]
async fn a_push_over_quota_is_denied_over_http_and_shared_layers_are_free() {
    let s = Server::start_with(&["--gc-interval", "0", "--quota", "lib=2000"]);
    let c = client();
    push_image(&c, &s, "lib/one", "v1", 1).await;
    // The same image in another repository of the project fits: shared.
    push_image(&c, &s, "lib/two", "v1", 1).await;
    let layer = bytes(2, 1000);
    let resp = c
        .post(s.url(&format!("/v2/lib/one/blobs/uploads/?digest={}", sha256(&layer))))
        .body(layer.clone())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        (status, body["errors"][0]["code"].as_str()),
        (403, Some("DENIED")),
        "{body}"
    );
    let msg = body["errors"][0]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("project lib is over its storage quota: it uses "),
        "{msg}"
    );
    assert!(msg.contains(" of 2000 bytes, and this needs 1000 more"), "{msg}");
    // Nothing of it remains.
    let resp = c
        .head(s.url(&format!("/v2/lib/one/blobs/{}", sha256(&layer))))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    // Other projects are not limited.
    push_image(&c, &s, "free/app", "v1", 2).await;
}

#[tokio::test]
async fn project_usage_is_in_the_admin_api() {
    use base64::Engine;
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("admin:admin-password-1")
    );
    let s = Server::start_env(
        &["--auth", "--gc-interval", "0", "--quota", "team=1M"],
        &[("BERTH_INITIAL_ADMIN_PASSWORD", "admin-password-1")],
    );
    let c = client();
    let resp = c
        .post(s.url("/api/v1/projects"))
        .header("authorization", &auth)
        .json(&serde_json::json!({"name": "team"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    push_image_as(&c, &s, "team/a", "v1", 3, Some(&auth)).await;
    push_image_as(&c, &s, "team/b", "v1", 3, Some(&auth)).await;
    let usage: serde_json::Value = c
        .get(s.url("/api/v1/projects/team/usage"))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // One config, one layer and one manifest, though two repositories hold them.
    let config = "{\"architecture\":\"amd64\",\"os\":\"linux\",\"seed\":3}".len();
    let manifest = image_manifest(
        (&sha256(config.to_string().as_bytes()), config),
        &[(&sha256(b"x"), 1000)],
    )
    .len();
    assert_eq!(
        usage["bytes"].as_u64().unwrap() as usize,
        config + 1000 + manifest,
        "{usage}"
    );
    assert_eq!(usage["quota"].as_u64(), Some(1 << 20));
    let resp = c
        .get(s.url("/api/v1/projects/nope/usage"))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
}
