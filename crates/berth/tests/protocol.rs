//! Protocol tests: every endpoint of the OCI Distribution Spec and its error
//! codes, against the real binary, with a plain HTTP client.

mod common;

use common::*;
use serde_json::{json, Value};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

#[tokio::test]
async fn ping_and_unknown_paths() {
    let s = Server::start();
    let c = client();
    let r = c.get(s.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "docker-distribution-api-version"), "registry/2.0");
    assert_eq!(c.head(s.url("/v2/")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(s.url("/v2")).send().await.unwrap().status(), 200);
    for p in ["/", "/v1/", "/v2/a", "/v2/a/foo/bar"] {
        assert_eq!(error_code(c.get(s.url(p)).send().await.unwrap()).await.0, 404, "{p}");
    }
    // A method an endpoint does not have.
    let r = c.post(s.url("/v2/a/manifests/v1")).send().await.unwrap();
    assert_eq!(error_code(r).await, (405, "UNSUPPORTED".into()));
}

#[tokio::test]
async fn invalid_names_tags_and_digests() {
    let s = Server::start();
    let c = client();
    for (path, want) in [
        ("/v2/UPPER/tags/list", "NAME_INVALID"),
        ("/v2/a..b/manifests/v1", "NAME_INVALID"),
        ("/v2/a/%2e%2eb/manifests/v1", "NAME_INVALID"),
        ("/v2/a/manifests/-bad", "TAG_INVALID"),
        ("/v2/a/manifests/sha256:123", "DIGEST_INVALID"),
        ("/v2/a/blobs/sha256:nothex", "DIGEST_INVALID"),
        ("/v2/a/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", "UNSUPPORTED"),
    ] {
        let r = c.get(s.url(path)).send().await.unwrap();
        let (status, code) = error_code(r).await;
        assert_eq!(code, want, "{path}");
        assert!(status == 400 || status == 405, "{path}: {status}");
    }
    let long = "a".repeat(256);
    let r = c.get(s.url(&format!("/v2/{long}/tags/list"))).send().await.unwrap();
    assert_eq!(error_code(r).await, (400, "NAME_INVALID".into()));
    // Nothing reached the disk under a name built from the request.
    let entries: Vec<_> = std::fs::read_dir(s.data())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    for e in entries {
        let e = e.to_string_lossy().to_string();
        assert!(
            ["blobs", "uploads", "meta.redb"].contains(&e.as_str()),
            "unexpected {e}"
        );
    }
}

#[tokio::test]
async fn blob_get_head_and_ranges() {
    let s = Server::start();
    let c = client();
    let data = bytes(1, 10_000);
    let d = push_blob(&c, &s, "r/blobs", &data).await;
    let r = c.head(s.url(&format!("/v2/r/blobs/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), "10000");
    assert_eq!(header(&r, "docker-content-digest"), d);
    let r = c.get(s.url(&format!("/v2/r/blobs/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);
    let r = c
        .get(s.url(&format!("/v2/r/blobs/blobs/{d}")))
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(header(&r, "content-range"), "bytes 100-199/10000");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[100..200]);
    let r = c
        .get(s.url(&format!("/v2/r/blobs/blobs/{d}")))
        .header("range", "bytes=-10")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[9990..]);
    // Unsatisfiable: past the end, or ending before it starts.
    for range in ["bytes=10000-", "bytes=500-0"] {
        let r = c
            .get(s.url(&format!("/v2/r/blobs/blobs/{d}")))
            .header("range", range)
            .send()
            .await
            .unwrap();
        assert_eq!(header(&r, "content-range"), "bytes */10000", "{range}");
        assert_eq!(error_code(r).await, (416, "RANGE_INVALID".into()), "{range}");
    }
    // Another repository cannot read it: the link is per repository.
    let r = c.get(s.url(&format!("/v2/other/blobs/{d}"))).send().await.unwrap();
    assert_eq!(error_code(r).await, (404, "BLOB_UNKNOWN".into()));
    let r = c.head(s.url(&format!("/v2/other/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

/// Large blobs over plain HTTP/1 go out as mapped windows of the file:
/// whole, and ranged across window edges, they are the bytes pushed.
#[tokio::test]
async fn large_blob_reads_span_windows() {
    let s = Server::start();
    let c = client();
    let data = bytes(2, (17 << 20) + 4_321);
    let d = push_blob(&c, &s, "r/large", &data).await;
    let url = s.url(&format!("/v2/r/large/blobs/{d}"));
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap().as_ref() == &data[..]);
    for (from, to) in [
        (1u64, (9u64 << 20) - 1),
        ((8 << 20) - 5, (17 << 20) + 4_320),
        (4_096, 4_097),
    ] {
        let r = c
            .get(&url)
            .header("range", format!("bytes={from}-{to}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206);
        assert!(
            r.bytes().await.unwrap().as_ref() == &data[from as usize..=to as usize],
            "{from}-{to}"
        );
    }
}

#[tokio::test]
async fn monolithic_and_post_put_uploads() {
    let s = Server::start();
    let c = client();
    // Wrong digest: rejected, nothing stored.
    let data = b"some content".to_vec();
    let wrong = sha256(b"other content");
    let r = c
        .post(s.url(&format!("/v2/up/blobs/uploads/?digest={wrong}")))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (400, "DIGEST_INVALID".into()));
    for d in [&wrong, &sha256(&data)] {
        let r = c.head(s.url(&format!("/v2/up/blobs/{d}"))).send().await.unwrap();
        assert_eq!(r.status(), 404);
    }
    assert_eq!(count_files(&s.data().join("uploads")), 0, "no upload left behind");
    assert_eq!(count_files(&s.data().join("blobs")), 0, "no blob stored");
    // POST then PUT with the whole body.
    let r = c.post(s.url("/v2/up/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let loc = header(&r, "location");
    assert!(loc.starts_with("/v2/up/blobs/uploads/"), "{loc}");
    assert!(!header(&r, "docker-upload-uuid").is_empty());
    let d = sha256(&data);
    let r = c
        .put(s.url(&format!("{loc}?digest={d}")))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "location"), format!("/v2/up/blobs/{d}"));
    assert_eq!(header(&r, "docker-content-digest"), d);
    let got = c.get(s.url(&format!("/v2/up/blobs/{d}"))).send().await.unwrap();
    assert_eq!(got.bytes().await.unwrap().as_ref(), &data[..]);
    // PUT without a digest.
    let r = c.post(s.url("/v2/up/blobs/uploads/")).send().await.unwrap();
    let loc = header(&r, "location");
    let r = c.put(s.url(&loc)).body(data.clone()).send().await.unwrap();
    assert_eq!(error_code(r).await, (400, "DIGEST_INVALID".into()));
    // An empty blob is a blob.
    let empty = sha256(b"");
    let r = c
        .post(s.url(&format!("/v2/up/blobs/uploads/?digest={empty}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

fn count_files(dir: &std::path::Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.map(|e| e.unwrap())
        .map(|e| {
            if e.file_type().unwrap().is_dir() {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

#[tokio::test]
async fn chunked_and_streamed_uploads() {
    let s = Server::start();
    let c = client();
    let data = bytes(7, 300_000);
    let d = sha256(&data);
    let r = c.post(s.url("/v2/chunk/blobs/uploads/")).send().await.unwrap();
    let mut loc = header(&r, "location");
    // Chunks in order, with Content-Range.
    for (i, part) in data[..200_000].chunks(100_000).enumerate() {
        let start = i * 100_000;
        let r = c
            .patch(s.url(&loc))
            .header("content-range", format!("{}-{}", start, start + part.len() - 1))
            .header("content-type", "application/octet-stream")
            .body(part.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        assert_eq!(header(&r, "range"), format!("0-{}", start + part.len() - 1));
        loc = header(&r, "location");
    }
    // Out of order: 416, and the upload is unchanged.
    let r = c
        .patch(s.url(&loc))
        .header("content-range", "250000-299999")
        .body(data[250_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (416, "RANGE_INVALID".into()));
    // A Content-Range that disagrees with the body length.
    let r = c
        .patch(s.url(&loc))
        .header("content-range", "200000-200009")
        .body(vec![0u8; 5])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    let r = c.get(s.url(&loc)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(header(&r, "range"), "0-199999");
    // The rest streamed without Content-Range, then the final PUT.
    let r = c
        .patch(s.url(&loc))
        .body(data[200_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(header(&r, "range"), "0-299999");
    let r = c.put(s.url(&format!("{loc}?digest={d}"))).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let got = c.get(s.url(&format!("/v2/chunk/blobs/{d}"))).send().await.unwrap();
    assert_eq!(got.bytes().await.unwrap().as_ref(), &data[..]);
    // The finished upload is gone.
    let r = c.get(s.url(&loc)).send().await.unwrap();
    assert_eq!(error_code(r).await, (404, "BLOB_UPLOAD_UNKNOWN".into()));
}

#[tokio::test]
async fn upload_status_cancel_and_unknown_ids() {
    let s = Server::start();
    let c = client();
    let r = c.post(s.url("/v2/cancel/blobs/uploads/")).send().await.unwrap();
    let loc = header(&r, "location");
    let r = c.patch(s.url(&loc)).body(vec![1u8; 10]).send().await.unwrap();
    assert_eq!(r.status(), 202);
    // The session belongs to its repository.
    let other = loc.replace("/v2/cancel/", "/v2/other/");
    let r = c.get(s.url(&other)).send().await.unwrap();
    assert_eq!(error_code(r).await, (404, "BLOB_UPLOAD_UNKNOWN".into()));
    let r = c.delete(s.url(&loc)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let r = c.get(s.url(&loc)).send().await.unwrap();
    assert_eq!(error_code(r).await, (404, "BLOB_UPLOAD_UNKNOWN".into()));
    let r = c.delete(s.url(&loc)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    for id in ["00000000-0000-0000-0000-000000000000", "..%2F..%2Fmeta.redb"] {
        let r = c
            .patch(s.url(&format!("/v2/cancel/blobs/uploads/{id}")))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(r).await, (404, "BLOB_UPLOAD_UNKNOWN".into()), "{id}");
    }
    assert_eq!(count_files(&s.data().join("uploads")), 0);
}

#[tokio::test]
async fn cross_repo_mount() {
    let s = Server::start();
    let c = client();
    let data = bytes(3, 5000);
    let d = push_blob(&c, &s, "src/app", &data).await;
    // With `from` holding the blob: mounted.
    let r = c
        .post(s.url(&format!("/v2/dst/app/blobs/uploads/?mount={d}&from=src/app")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "location"), format!("/v2/dst/app/blobs/{d}"));
    assert_eq!(header(&r, "docker-content-digest"), d);
    let got = c.get(s.url(&format!("/v2/dst/app/blobs/{d}"))).send().await.unwrap();
    assert_eq!(got.bytes().await.unwrap().as_ref(), &data[..]);
    // From a repository that does not hold it: an upload session instead.
    let r = c
        .post(s.url(&format!("/v2/dst2/app/blobs/uploads/?mount={d}&from=empty/repo")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert!(header(&r, "location").starts_with("/v2/dst2/app/blobs/uploads/"));
    let r = c.head(s.url(&format!("/v2/dst2/app/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 404, "a failed mount must not link the blob");
    // Without `from`: a known blob mounts.
    let r = c
        .post(s.url(&format!("/v2/dst3/app/blobs/uploads/?mount={d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // An unknown blob falls back to an upload.
    let unknown = sha256(b"unknown");
    let r = c
        .post(s.url(&format!("/v2/dst3/app/blobs/uploads/?mount={unknown}&from=src/app")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

#[tokio::test]
async fn manifests_by_tag_and_digest() {
    let s = Server::start();
    let c = client();
    let md = push_image(&c, &s, "m/app", "v1", 1).await;
    for reference in ["v1", md.as_str()] {
        let r = c
            .get(s.url(&format!("/v2/m/app/manifests/{reference}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "content-type"), OCI_MANIFEST);
        assert_eq!(header(&r, "docker-content-digest"), md);
        let body = r.bytes().await.unwrap();
        assert_eq!(sha256(&body), md);
        let r = c
            .head(s.url(&format!("/v2/m/app/manifests/{reference}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "content-length"), body.len().to_string());
        assert_eq!(header(&r, "docker-content-digest"), md);
    }
    let r = c.get(s.url("/v2/m/app/manifests/nope")).send().await.unwrap();
    assert_eq!(error_code(r).await, (404, "MANIFEST_UNKNOWN".into()));
    let r = c.head(s.url("/v2/m/app/manifests/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // PUT by digest with several ?tag= at once (one repeated): one
    // `OCI-Tag` line per tag applied (distribution spec, "Pushing Manifests").
    let body = c
        .get(s.url(&format!("/v2/m/app/manifests/{md}")))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let r = c
        .put(s.url(&format!("/v2/m/app/manifests/{md}?tag=a&tag=b&tag=a")))
        .header("content-type", OCI_MANIFEST)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "location"), format!("/v2/m/app/manifests/{md}"));
    let applied: Vec<&str> = r
        .headers()
        .get_all("oci-tag")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(applied, ["a", "b"]);
    let tags: Value = c
        .get(s.url("/v2/m/app/tags/list"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tags, json!({"name": "m/app", "tags": ["a", "b", "v1"]}));
    // PUT by a digest the content does not have.
    let wrong = sha256(b"x");
    let r = c
        .put(s.url(&format!("/v2/m/app/manifests/{wrong}")))
        .header("content-type", OCI_MANIFEST)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (400, "DIGEST_INVALID".into()));
    // Delete a tag: the manifest stays.
    let r = c.delete(s.url("/v2/m/app/manifests/a")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        c.get(s.url("/v2/m/app/manifests/a")).send().await.unwrap().status(),
        404
    );
    assert_eq!(
        c.get(s.url(&format!("/v2/m/app/manifests/{md}")))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Delete by digest: the manifest and its tags go.
    let r = c
        .delete(s.url(&format!("/v2/m/app/manifests/{md}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    for reference in ["v1", "b", md.as_str()] {
        let r = c
            .get(s.url(&format!("/v2/m/app/manifests/{reference}")))
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(r).await, (404, "MANIFEST_UNKNOWN".into()));
    }
    let r = c
        .delete(s.url(&format!("/v2/m/app/manifests/{md}")))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (404, "MANIFEST_UNKNOWN".into()));
    // The repository is gone from the catalog and its tags list.
    let r = c.get(s.url("/v2/m/app/tags/list")).send().await.unwrap();
    assert_eq!(error_code(r).await, (404, "NAME_UNKNOWN".into()));
}

#[tokio::test]
async fn manifest_validation() {
    let s = Server::start();
    let c = client();
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let cd = push_blob(&c, &s, "v/app", &config).await;
    let missing = sha256(b"missing layer");
    let put = |body: Vec<u8>, ct: &'static str| {
        let c = c.clone();
        let url = s.url("/v2/v/app/manifests/t");
        async move { c.put(url).header("content-type", ct).body(body).send().await.unwrap() }
    };
    // A layer that was never pushed.
    let m = image_manifest((&cd, config.len()), &[(&missing, 10)]);
    let r = put(m, OCI_MANIFEST).await;
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 400);
    assert_eq!(body["errors"][0]["code"], "MANIFEST_BLOB_UNKNOWN");
    assert_eq!(body["errors"][0]["detail"], missing.as_str());
    assert_eq!(
        c.get(s.url("/v2/v/app/manifests/t")).send().await.unwrap().status(),
        404,
        "nothing partial"
    );
    // A non-distributable layer need not be in the registry.
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", "digest": missing, "size": 10, "urls": ["https://example.com/layer"]}],
    }))
    .unwrap();
    assert_eq!(put(m, OCI_MANIFEST).await.status(), 201);
    // Broken JSON, wrong schema, and a type mismatch.
    for (body, ct) in [
        (b"{not json".to_vec(), OCI_MANIFEST),
        (br#"{"schemaVersion":1}"#.to_vec(), OCI_MANIFEST),
        (
            serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []})).unwrap(),
            OCI_MANIFEST,
        ),
        (image_manifest((&cd, config.len()), &[]), OCI_INDEX),
    ] {
        let r = put(body, ct).await;
        assert_eq!(error_code(r).await, (400, "MANIFEST_INVALID".into()));
    }
    // Over the 4 MiB limit.
    let mut big = image_manifest((&cd, config.len()), &[]);
    big.truncate(big.len() - 1);
    big.extend_from_slice(format!(",\"annotations\":{{\"x\":\"{}\"}}}}", "a".repeat(4 * 1024 * 1024 - 100)).as_bytes());
    let r = put(big, OCI_MANIFEST).await;
    assert_eq!(r.status(), 413);
    assert_eq!(error_code(r).await.1, "SIZE_INVALID");
}

fn index_of(children: &[(&str, usize, &str)], media_type: &str, child_type: &str) -> Vec<u8> {
    let manifests: Vec<Value> = children
        .iter()
        .map(|(d, n, arch)| json!({"mediaType": child_type, "digest": d, "size": n, "platform": {"os": "linux", "architecture": arch}}))
        .collect();
    serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": media_type, "manifests": manifests})).unwrap()
}

#[tokio::test]
async fn indexes_and_docker_schema2() {
    let s = Server::start();
    let c = client();
    let amd = push_image(&c, &s, "multi/app", "amd64", 10).await;
    let missing = sha256(b"arm64 manifest never pushed");
    // An index whose child is missing is refused...
    let idx = index_of(
        &[(&amd, 100, "amd64"), (&missing, 100, "arm64")],
        OCI_INDEX,
        OCI_MANIFEST,
    );
    let r = c
        .put(s.url("/v2/multi/app/manifests/latest"))
        .header("content-type", OCI_INDEX)
        .body(idx.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (400, "MANIFEST_BLOB_UNKNOWN".into()));
    // ...and accepted once every child is there.
    let arm = push_image(&c, &s, "multi/app", "arm64", 11).await;
    let idx = index_of(&[(&amd, 100, "amd64"), (&arm, 100, "arm64")], OCI_INDEX, OCI_MANIFEST);
    let r = c
        .put(s.url("/v2/multi/app/manifests/latest"))
        .header("content-type", OCI_INDEX)
        .body(idx.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = c.get(s.url("/v2/multi/app/manifests/latest")).send().await.unwrap();
    assert_eq!(header(&r, "content-type"), OCI_INDEX);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &idx[..]);
    // Docker schema2 manifest and manifest list.
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec();
    let cd = push_blob(&c, &s, "multi/docker", &config).await;
    let layer = bytes(12, 2000);
    let ld = push_blob(&c, &s, "multi/docker", &layer).await;
    let dm = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": cd, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": ld, "size": layer.len()}],
    }))
    .unwrap();
    let r = c
        .put(s.url("/v2/multi/docker/manifests/v2"))
        .header("content-type", "application/vnd.docker.distribution.manifest.v2+json")
        .body(dm.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let list = index_of(
        &[(&sha256(&dm), dm.len(), "amd64")],
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    );
    let r = c
        .put(s.url("/v2/multi/docker/manifests/list"))
        .header(
            "content-type",
            "application/vnd.docker.distribution.manifest.list.v2+json",
        )
        .body(list)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = c.get(s.url("/v2/multi/docker/manifests/v2")).send().await.unwrap();
    assert_eq!(
        header(&r, "content-type"),
        "application/vnd.docker.distribution.manifest.v2+json"
    );
}

#[tokio::test]
async fn sparse_index_option() {
    let s = Server::start_with(&["--sparse-index"]);
    let c = client();
    let amd = push_image(&c, &s, "sparse/app", "amd64", 20).await;
    let missing = sha256(b"not mirrored");
    let idx = index_of(
        &[(&amd, 100, "amd64"), (&missing, 100, "arm64")],
        OCI_INDEX,
        OCI_MANIFEST,
    );
    let r = c
        .put(s.url("/v2/sparse/app/manifests/latest"))
        .header("content-type", OCI_INDEX)
        .body(idx)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn referrers_api() {
    let s = Server::start();
    let c = client();
    let subject = push_image(&c, &s, "ref/app", "v1", 30).await;
    let empty = b"{}".to_vec();
    let ed = push_blob(&c, &s, "ref/app", &empty).await;
    let blob = b"signature bytes".to_vec();
    let bd = push_blob(&c, &s, "ref/app", &blob).await;
    let artifact = |artifact_type: &str| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": ed, "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": bd, "size": blob.len()}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 100},
            "annotations": {"org.example.kind": artifact_type},
        }))
        .unwrap()
    };
    let mut pushed = Vec::new();
    for t in ["application/vnd.example.sig", "application/vnd.example.sbom"] {
        let body = artifact(t);
        let d = sha256(&body);
        let r = c
            .put(s.url(&format!("/v2/ref/app/manifests/{d}")))
            .header("content-type", OCI_MANIFEST)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(header(&r, "oci-subject"), subject);
        pushed.push((t, d));
    }
    let r = c
        .get(s.url(&format!("/v2/ref/app/referrers/{subject}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), OCI_INDEX);
    assert_eq!(header(&r, "oci-filters-applied"), "");
    let idx: Value = r.json().await.unwrap();
    assert_eq!(idx["schemaVersion"], 2);
    assert_eq!(idx["mediaType"], OCI_INDEX);
    let list = idx["manifests"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    for (t, d) in &pushed {
        let e = list.iter().find(|e| e["digest"] == d.as_str()).expect("listed");
        assert_eq!(e["artifactType"], *t);
        assert_eq!(e["mediaType"], OCI_MANIFEST);
        assert_eq!(e["annotations"]["org.example.kind"], *t);
    }
    let r = c
        .get(s.url(&format!(
            "/v2/ref/app/referrers/{subject}?artifactType=application/vnd.example.sbom"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "oci-filters-applied"), "artifactType");
    let idx: Value = r.json().await.unwrap();
    assert_eq!(idx["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(idx["manifests"][0]["digest"], pushed[1].1.as_str());
    // A subject with no referrers, or that does not exist: an empty index.
    let none = sha256(b"no such manifest");
    let r = c
        .get(s.url(&format!("/v2/ref/app/referrers/{none}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let idx: Value = r.json().await.unwrap();
    assert_eq!(idx["manifests"], json!([]));
    let r = c.get(s.url("/v2/ref/app/referrers/sha256:bad")).send().await.unwrap();
    assert_eq!(error_code(r).await, (400, "DIGEST_INVALID".into()));
    // Deleting a referrer removes it from the list.
    c.delete(s.url(&format!("/v2/ref/app/manifests/{}", pushed[0].1)))
        .send()
        .await
        .unwrap();
    let idx: Value = c
        .get(s.url(&format!("/v2/ref/app/referrers/{subject}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(idx["manifests"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn catalog_and_tags_pagination() {
    let s = Server::start();
    let c = client();
    for repo in ["p/c", "p/a", "p/b", "p/d"] {
        push_image(&c, &s, repo, "t1", 40).await;
    }
    for tag in ["t2", "t3", "t0"] {
        push_image(&c, &s, "p/a", tag, 41).await;
    }
    let r = c.get(s.url("/v2/_catalog")).send().await.unwrap();
    let all: Value = r.json().await.unwrap();
    assert_eq!(all, json!({"repositories": ["p/a", "p/b", "p/c", "p/d"]}));
    let r = c.get(s.url("/v2/_catalog?n=2")).send().await.unwrap();
    assert_eq!(header(&r, "link"), "</v2/_catalog?n=2&last=p%2Fb>; rel=\"next\"");
    let page: Value = r.json().await.unwrap();
    assert_eq!(page, json!({"repositories": ["p/a", "p/b"]}));
    let r = c.get(s.url("/v2/_catalog?n=2&last=p/b")).send().await.unwrap();
    assert_eq!(header(&r, "link"), "");
    let page: Value = r.json().await.unwrap();
    assert_eq!(page, json!({"repositories": ["p/c", "p/d"]}));
    let r = c.get(s.url("/v2/_catalog?n=0")).send().await.unwrap();
    let page: Value = r.json().await.unwrap();
    assert_eq!(page, json!({"repositories": []}));
    let r = c.get(s.url("/v2/p/a/tags/list?n=2")).send().await.unwrap();
    assert_eq!(header(&r, "link"), "</v2/p/a/tags/list?n=2&last=t1>; rel=\"next\"");
    let page: Value = r.json().await.unwrap();
    assert_eq!(page, json!({"name": "p/a", "tags": ["t0", "t1"]}));
    let page: Value = c
        .get(s.url("/v2/p/a/tags/list?n=2&last=t1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["tags"], json!(["t2", "t3"]));
    let r = c.get(s.url("/v2/p/a/tags/list?n=abc")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let r = c.get(s.url("/v2/p/none/tags/list")).send().await.unwrap();
    assert_eq!(error_code(r).await, (404, "NAME_UNKNOWN".into()));
}

#[tokio::test]
async fn blob_delete() {
    let s = Server::start();
    let c = client();
    let d = push_blob(&c, &s, "del/a", b"delete me").await;
    c.post(s.url(&format!("/v2/del/b/blobs/uploads/?mount={d}&from=del/a")))
        .send()
        .await
        .unwrap();
    let r = c.delete(s.url(&format!("/v2/del/a/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let r = c.get(s.url(&format!("/v2/del/a/blobs/{d}"))).send().await.unwrap();
    assert_eq!(error_code(r).await, (404, "BLOB_UNKNOWN".into()));
    // Still readable where it is still linked.
    assert_eq!(
        c.get(s.url(&format!("/v2/del/b/blobs/{d}")))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = c.delete(s.url(&format!("/v2/del/a/blobs/{d}"))).send().await.unwrap();
    assert_eq!(error_code(r).await, (404, "BLOB_UNKNOWN".into()));
}

#[tokio::test]
async fn sha512_content() {
    let s = Server::start();
    let c = client();
    let data = bytes(50, 70_000);
    let d512 = {
        use sha2::{Digest as _, Sha512};
        let out = Sha512::digest(&data);
        format!("sha512:{}", out.iter().map(|b| format!("{b:02x}")).collect::<String>())
    };
    // Chunked, so the commit has to hash with sha512 rather than the
    // streaming sha256.
    let r = c.post(s.url("/v2/s512/blobs/uploads/")).send().await.unwrap();
    let loc = header(&r, "location");
    let r = c.patch(s.url(&loc)).body(data.clone()).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let r = c.put(s.url(&format!("{loc}?digest={d512}"))).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let got = c.get(s.url(&format!("/v2/s512/blobs/{d512}"))).send().await.unwrap();
    assert_eq!(header(&got, "docker-content-digest"), d512);
    assert_eq!(got.bytes().await.unwrap().as_ref(), &data[..]);
}

#[tokio::test]
async fn containerd_ns_parameter_is_tolerated() {
    let s = Server::start();
    let c = client();
    let md = push_image(&c, &s, "library/busybox", "1", 60).await;
    let r = c
        .get(s.url("/v2/library/busybox/manifests/1?ns=docker.io"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "docker-content-digest"), md);
    let r = c.get(s.url("/v2/?ns=docker.io")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// Hot manifests are cached in memory: every read below first warms the
/// cache, so each write must be visible to the very next read.
#[tokio::test]
async fn cached_manifests_follow_tag_moves_and_deletes() {
    let s = Server::start();
    let c = client();
    let accept = "application/vnd.oci.image.manifest.v1+json";
    let get = |path: String| {
        let c = c.clone();
        let url = s.url(&path);
        async move {
            let r = c.get(url).header("accept", accept).send().await.unwrap();
            (r.status().as_u16(), header(&r, "docker-content-digest"))
        }
    };
    let d1 = push_image(&c, &s, "cache/app", "v1", 1).await;
    for _ in 0..3 {
        assert_eq!(get("/v2/cache/app/manifests/v1".into()).await, (200, d1.clone()));
    }
    // Tag move.
    let d2 = push_image(&c, &s, "cache/app", "v1", 2).await;
    assert_eq!(get("/v2/cache/app/manifests/v1".into()).await, (200, d2.clone()));
    let head = c
        .head(s.url("/v2/cache/app/manifests/v1"))
        .header("accept", accept)
        .send()
        .await
        .unwrap();
    assert_eq!(header(&head, "docker-content-digest"), d2);
    // The old manifest is still there by digest.
    assert_eq!(get(format!("/v2/cache/app/manifests/{d1}")).await, (200, d1.clone()));
    // Tag delete.
    let r = c.delete(s.url("/v2/cache/app/manifests/v1")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    assert_eq!(get("/v2/cache/app/manifests/v1".into()).await.0, 404);
    assert_eq!(get(format!("/v2/cache/app/manifests/{d2}")).await, (200, d2.clone()));
    // Delete by digest, after a cached read by digest.
    let r = c
        .delete(s.url(&format!("/v2/cache/app/manifests/{d2}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    assert_eq!(get(format!("/v2/cache/app/manifests/{d2}")).await.0, 404);
    // Deleting by digest also removes the tags pointing at it.
    let d3 = push_image(&c, &s, "cache/app", "v3", 3).await;
    assert_eq!(get("/v2/cache/app/manifests/v3".into()).await, (200, d3.clone()));
    let r = c
        .delete(s.url(&format!("/v2/cache/app/manifests/{d3}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    assert_eq!(get("/v2/cache/app/manifests/v3".into()).await.0, 404);
    // Another repository's entries are its own.
    let d4 = push_image(&c, &s, "cache/other", "v1", 4).await;
    assert_eq!(get("/v2/cache/other/manifests/v1".into()).await, (200, d4));
    assert_eq!(get("/v2/cache/app/manifests/v1".into()).await.0, 404);
}

/// A closing PUT whose Content-Range does not start at the upload's offset
/// is 416 with `Location` and `Range`, like an out-of-order PATCH; the
/// upload is unchanged and can still be completed.
#[tokio::test]
async fn out_of_order_final_chunk_is_416_and_resumable() {
    let s = Server::start();
    let c = client();
    let data = bytes(9, 3_000);
    let d = sha256(&data);
    let r = c.post(s.url("/v2/last/chunk/blobs/uploads/")).send().await.unwrap();
    let loc = header(&r, "location");
    let r = c
        .patch(s.url(&loc))
        .header("content-range", "0-999")
        .body(data[..1_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let loc = header(&r, "location");
    // The last chunk, sent while the upload holds 1000 bytes, then again
    // once it holds 2000.
    let last_chunk = || {
        c.put(s.url(&format!("{loc}?digest={d}")))
            .header("content-range", "2000-2999")
            .body(data[2_000..].to_vec())
            .send()
    };
    let r = last_chunk().await.unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(header(&r, "location"), loc);
    assert_eq!(header(&r, "range"), "0-999");
    assert_eq!(error_code(r).await, (416, "RANGE_INVALID".into()));
    // Where to resume, and the upload still takes the right chunks.
    let r = c.get(s.url(&loc)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(header(&r, "range"), "0-999");
    let r = c
        .patch(s.url(&loc))
        .header("content-range", "1000-1999")
        .body(data[1_000..2_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(header(&r, "range"), "0-1999");
    let r = last_chunk().await.unwrap();
    assert_eq!(r.status(), 201);
    let got = c.get(s.url(&format!("/v2/last/chunk/blobs/{d}"))).send().await.unwrap();
    assert_eq!(got.bytes().await.unwrap().as_ref(), &data[..]);
}

/// The `Docker-Content-Digest` of a GET and of a HEAD of `path`, and the
/// GET's body.
async fn served_digest(c: &reqwest::Client, s: &Server, path: &str) -> (String, String, Vec<u8>) {
    let r = c.get(s.url(path)).send().await.unwrap();
    assert_eq!(r.status(), 200, "GET {path}");
    let got = header(&r, "docker-content-digest");
    let body = r.bytes().await.unwrap().to_vec();
    let r = c.head(s.url(path)).send().await.unwrap();
    (got, header(&r, "docker-content-digest"), body)
}

/// A manifest pushed by a sha512 digest with `?tag=` is served by that tag
/// under the digest it was pushed as, from the store and from the hot cache;
/// a push of the same bytes by another tag (a sha256 digest) moves only that
/// tag.
#[tokio::test]
async fn sha512_manifests_by_tag_keep_their_digest() {
    let s = Server::start();
    let c = client();
    let config = b"{\"architecture\":\"amd64\",\"os\":\"linux\"}".to_vec();
    let layer = bytes(51, 2000);
    let cd = push_blob(&c, &s, "s512/app", &config).await;
    let ld = push_blob(&c, &s, "s512/app", &layer).await;
    let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())]);
    let d512 = sha512(&m);
    let r = c
        .put(s.url(&format!("/v2/s512/app/manifests/{d512}?tag=t&tag=u")))
        .header("content-type", OCI_MANIFEST)
        .body(m.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "docker-content-digest"), d512);
    // Twice each: the first read fills the hot cache, the second comes from it.
    for round in 0..2 {
        for tag in ["t", "u"] {
            let (got, head, body) = served_digest(&c, &s, &format!("/v2/s512/app/manifests/{tag}")).await;
            assert_eq!(
                (got.as_str(), head.as_str()),
                (d512.as_str(), d512.as_str()),
                "{tag}, round {round}"
            );
            assert_eq!(body, m);
        }
    }
    // The same bytes by tag: a sha256 digest for that tag only.
    let r = c
        .put(s.url("/v2/s512/app/manifests/w"))
        .header("content-type", OCI_MANIFEST)
        .body(m.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "docker-content-digest"), sha256(&m));
    for (tag, want) in [("t", d512.clone()), ("u", d512.clone()), ("w", sha256(&m))] {
        let (got, head, _) = served_digest(&c, &s, &format!("/v2/s512/app/manifests/{tag}")).await;
        assert_eq!((got, head), (want.clone(), want), "{tag} after the sha256 push");
    }
    // And by either digest.
    for d in [d512.clone(), sha256(&m)] {
        let r = c
            .get(s.url(&format!("/v2/s512/app/manifests/{d}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "docker-content-digest"), d);
    }
}

/// `?digest-algorithm=` on POST picks the upload's hash; the status says
/// which; an unknown algorithm is refused before anything is created.
#[tokio::test]
async fn uploads_hash_with_the_digest_algorithm_asked_for() {
    let s = Server::start();
    let c = client();
    let data = bytes(52, 300_000);
    let r = c
        .post(s.url("/v2/alg/app/blobs/uploads/?digest-algorithm=sha512"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(header(&r, "digest-algorithm"), "sha512");
    let loc = header(&r, "location");
    for part in data.chunks(100_000) {
        let r = c.patch(s.url(&loc)).body(part.to_vec()).send().await.unwrap();
        assert_eq!(r.status(), 202);
    }
    let r = c.get(s.url(&loc)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(header(&r, "digest-algorithm"), "sha512");
    let d = sha512(&data);
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = c.put(s.url(&format!("{loc}{sep}digest={d}"))).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "docker-content-digest"), d);
    let r = c.get(s.url(&format!("/v2/alg/app/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);
    // Without the parameter: sha256, as before.
    let r = c.post(s.url("/v2/alg/app/blobs/uploads/")).send().await.unwrap();
    assert_eq!(header(&r, "digest-algorithm"), "sha256");
    // A monolithic push whose digest disagrees with the algorithm asked for.
    let r = c
        .post(s.url(&format!(
            "/v2/alg/app/blobs/uploads/?digest-algorithm=sha256&digest={d}"
        )))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (400, "DIGEST_INVALID".into()));
    // That answer came before the body was read, so the connection closed.
    let c = client();
    // Unknown, and malformed, algorithms.
    for (alg, want) in [
        ("blake3", "UNSUPPORTED"),
        ("md5", "UNSUPPORTED"),
        ("SHA!", "DIGEST_INVALID"),
    ] {
        let r = c
            .post(s.url(&format!("/v2/alg/app/blobs/uploads/?digest-algorithm={alg}")))
            .send()
            .await
            .unwrap();
        let (status, code) = error_code(r).await;
        assert_eq!(code, want, "{alg}");
        assert!((400..500).contains(&status), "{alg}: {status}");
    }
}
