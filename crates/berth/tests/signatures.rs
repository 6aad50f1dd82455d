//! Signature policy against the real binary, over HTTP: signatures are made
//! here in cosign's published formats (its `SIGNATURE_SPEC.md` tag scheme
//! and `BUNDLE_SPEC.md` v0.3 bundles through the referrers API), since
//! cosign itself cannot be installed on these machines.

mod common;

use base64::Engine;
use common::*;
use signature::keys::testing::Signer;
use signature::{bundle, simple};

const ADMIN_PW: &str = "admin-password-1";

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// The manifest digest `push_image` gives for `seed`, known before the
/// push (for an allow-list in the config).
fn image_digest(seed: u64) -> String {
    let config = format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"seed\":{seed}}}").into_bytes();
    let layer = bytes(seed, 1000);
    sha256(&image_manifest(
        (&sha256(&config), config.len()),
        &[(&sha256(&layer), layer.len())],
    ))
}

async fn put_manifest(
    c: &reqwest::Client,
    s: &Server,
    repo: &str,
    reference: &str,
    m: &serde_json::Value,
    auth: Option<&str>,
) {
    let r = with_auth(c.put(s.url(&format!("/v2/{repo}/manifests/{reference}"))), auth)
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(serde_json::to_vec(m).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

/// `cosign sign --key` with the tag scheme: the payload as a layer of the
/// `sha256-<hex>.sig` manifest, the signature in its annotation. `signs`
/// is the digest the payload names (the image's, unless a test lies).
/// Returns the payload's digest.
async fn sign_tag(
    c: &reqwest::Client,
    s: &Server,
    repo: &str,
    image: &str,
    signs: &str,
    by: &[&Signer],
    auth: Option<&str>,
) -> String {
    let payload = simple::payload(repo, &signs.parse().unwrap());
    let pd = push_blob_as(c, s, repo, &payload, auth).await;
    let empty = push_blob_as(c, s, repo, b"{}", auth).await;
    let layers: Vec<serde_json::Value> = by
        .iter()
        .map(|k| {
            serde_json::json!({
                "mediaType": simple::SIMPLE_SIGNING, "digest": pd, "size": payload.len(),
                "annotations": {simple::SIGNATURE_ANNOTATION: b64(&k.sign(&payload))},
            })
        })
        .collect();
    let m = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": empty, "size": 2},
        "layers": layers,
    });
    let tag = simple::sig_tag(&image.parse().unwrap());
    put_manifest(c, s, repo, &tag, &m, auth).await;
    pd
}

/// cosign 3's default: a v0.3 bundle attached as a referrer of the image.
async fn attach_bundle(c: &reqwest::Client, s: &Server, repo: &str, image: &str, by: &Signer) {
    let hex = image.trim_start_matches("sha256:");
    let json = bundle::dsse_bundle(hex, |m| by.sign(m));
    let bd = push_blob_as(c, s, repo, &json, None).await;
    let empty = push_blob_as(c, s, repo, b"{}", None).await;
    let m = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": bundle::BUNDLE_V03,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": bundle::BUNDLE_V03, "digest": bd, "size": json.len(),
                    "annotations": {"org.opencontainers.image.title": format!("sha256-{}.sigstore.json", &bd[7..])}}],
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": image, "size": 1},
    });
    let d = sha256(&serde_json::to_vec(&m).unwrap());
    put_manifest(c, s, repo, &d, &m, None).await;
}

/// GET of `repo:tag`: the status and, when refused, the error message.
async fn pull(c: &reqwest::Client, s: &Server, repo: &str, tag: &str, auth: Option<&str>) -> (u16, String) {
    let r = with_auth(c.get(s.url(&format!("/v2/{repo}/manifests/{tag}"))), auth)
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    (status, v["errors"][0]["message"].as_str().unwrap_or("").to_string())
}

fn config(dir: &std::path::Path, keys: &[(&str, &Signer)], policies: &str) -> std::path::PathBuf {
    for (name, k) in keys {
        std::fs::write(dir.join(format!("{name}.pub")), k.public_pem()).unwrap();
    }
    let path = dir.join("berth.toml");
    std::fs::write(&path, policies.replace("KEYS", &dir.display().to_string())).unwrap();
    path
}

#[tokio::test]
async fn the_policy_matrix_over_http() {
    let (a, b, stranger) = (Signer::p256(), Signer::ed25519(), Signer::p256());
    let dir = tempfile::tempdir().unwrap();
    let allowed = image_digest(7);
    let cfg = config(
        dir.path(),
        &[("a", &a), ("b", &b)],
        &format!(
            r#"
[[signature_policies]]
repositories = "prod/*"
keys = ["KEYS/a.pub", "KEYS/b.pub"]
allow_digests = ["{allowed}"]

[[signature_policies]]
repositories = "two/*"
keys = ["KEYS/a.pub", "KEYS/b.pub"]
threshold = 2

[[signature_policies]]
repositories = "soft/*"
keys = ["KEYS/a.pub"]
mode = "warn"
"#
        ),
    );
    let s = Server::start_with(&["--config", cfg.to_str().unwrap()]);
    let c = client();

    // Unsigned: refused with the reason; then signed after the refusal:
    // served at the next pull, no restart.
    let d = push_image(&c, &s, "prod/app", "v1", 1).await;
    let (st, msg) = pull(&c, &s, "prod/app", "v1", None).await;
    assert_eq!(st, 403, "{msg}");
    assert!(
        msg.contains(&format!("signature policy prod/* refuses {d}: no signature")),
        "{msg}"
    );
    // The signature tag itself is never blocked: the signer reads it first.
    let sig_tag = simple::sig_tag(&d.parse().unwrap());
    assert_eq!(pull(&c, &s, "prod/app", &sig_tag, None).await.0, 404);
    let payload = sign_tag(&c, &s, "prod/app", &d, &d, &[&a], None).await;
    assert_eq!(pull(&c, &s, "prod/app", "v1", None).await.0, 200);
    // By digest, not checked by default.
    assert_eq!(pull(&c, &s, "prod/app", &d, None).await.0, 200);
    // Deleting the signature's payload blob: refused again.
    let r = c
        .delete(s.url(&format!("/v2/prod/app/blobs/{payload}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let (st, msg) = pull(&c, &s, "prod/app", "v1", None).await;
    assert_eq!(st, 403, "{msg}");
    assert!(msg.contains("signature payload unreadable"), "{msg}");

    // Allow-listed digest: served unsigned.
    assert_eq!(push_image(&c, &s, "prod/listed", "v1", 7).await, allowed);
    assert_eq!(pull(&c, &s, "prod/listed", "v1", None).await.0, 200);

    // A v0.3 bundle through the referrers API.
    let d = push_image(&c, &s, "prod/bundled", "v1", 2).await;
    attach_bundle(&c, &s, "prod/bundled", &d, &b).await;
    assert_eq!(pull(&c, &s, "prod/bundled", "v1", None).await.0, 200);

    // An untrusted key.
    let d = push_image(&c, &s, "prod/stranger", "v1", 3).await;
    sign_tag(&c, &s, "prod/stranger", &d, &d, &[&stranger], None).await;
    let (st, msg) = pull(&c, &s, "prod/stranger", "v1", None).await;
    assert_eq!(st, 403);
    assert!(msg.contains("signed by an untrusted key"), "{msg}");

    // A genuine signature of another manifest.
    let d = push_image(&c, &s, "prod/copied", "v1", 4).await;
    let other = image_digest(99);
    sign_tag(&c, &s, "prod/copied", &d, &other, &[&a], None).await;
    let (st, msg) = pull(&c, &s, "prod/copied", "v1", None).await;
    assert_eq!(st, 403);
    assert!(
        msg.contains(&format!("payload digest does not match: a trusted key signed {other}")),
        "{msg}"
    );

    // Threshold 2: one key signing twice counts once; two keys pass.
    let d = push_image(&c, &s, "two/app", "v1", 5).await;
    sign_tag(&c, &s, "two/app", &d, &d, &[&a, &a], None).await;
    let (st, msg) = pull(&c, &s, "two/app", "v1", None).await;
    assert_eq!(st, 403);
    assert!(msg.contains("signed by 1 of 2 required distinct trusted keys"), "{msg}");
    attach_bundle(&c, &s, "two/app", &d, &b).await;
    assert_eq!(pull(&c, &s, "two/app", "v1", None).await.0, 200);

    // Warn mode: served, and counted.
    push_image(&c, &s, "soft/app", "v1", 6).await;
    assert_eq!(pull(&c, &s, "soft/app", "v1", None).await.0, 200);
    let m = c.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        m.contains(r#"berth_signature_decisions_total{result="unsigned",mode="warn"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"berth_signature_decisions_total{result="signed",mode="enforce"}"#),
        "{m}"
    );
    // Not covered by any policy: unaffected.
    push_image(&c, &s, "dev/app", "v1", 8).await;
    assert_eq!(pull(&c, &s, "dev/app", "v1", None).await.0, 200);

    // `berth verify`: the same engine from outside, with the keys given.
    let keys = [dir.path().join("a.pub"), dir.path().join("b.pub")];
    let verify = |image: &str, keys: &[&std::path::Path]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_berth"));
        cmd.args(["verify", "--plain-http", &format!("{}/{image}", s.addr)]);
        for k in keys {
            cmd.arg("--key").arg(k);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (code, out) = verify("prod/bundled:v1", &[&keys[1]]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("bundle referrer sha256:") && out.contains("signed by trusted key sha256:"),
        "{out}"
    );
    assert!(out.contains("verdict: verified (signed)"), "{out}");
    // A tag the registry refuses: checked by the digest its refusal names.
    let (code, out) = verify("prod/stranger:v1", &[&keys[0], &keys[1]]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("not verified by any given key") && out.contains("signed by an untrusted key"),
        "{out}"
    );
    let (code, out) = verify("two/app:v1", &[&keys[0]]);
    assert_eq!(code, 0, "one of the two signers is enough with --threshold 1: {out}");

    // `berth diagnose` names the refusal with the policy's reason.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args([
            "diagnose",
            "--json",
            "--plain-http",
            &format!("{}/prod/stranger:v1", s.addr),
        ])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(16), "{v}");
    assert!(
        v["root_cause"].as_str().unwrap().contains("signed by an untrusted key"),
        "{v}"
    );
}

#[tokio::test]
async fn a_pusher_may_pull_what_it_is_about_to_sign_and_a_guest_may_not() {
    let a = Signer::p256();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &[("a", &a)],
        "[[signature_policies]]\nrepositories = \"team/*\"\nkeys = [\"KEYS/a.pub\"]\n",
    );
    let s = Server::start_env(
        &["--auth", "--config", cfg.to_str().unwrap()],
        &[("BERTH_INITIAL_ADMIN_PASSWORD", ADMIN_PW)],
    );
    let c = client();
    let admin = basic("admin", ADMIN_PW);
    let call = |m: reqwest::Method, path: &str, body: serde_json::Value| {
        c.request(m, s.url(path))
            .header("authorization", &admin)
            .json(&body)
            .send()
    };
    assert_eq!(
        call(
            reqwest::Method::POST,
            "/api/v1/projects",
            serde_json::json!({"name": "team", "public": false})
        )
        .await
        .unwrap()
        .status(),
        201
    );
    assert_eq!(
        call(
            reqwest::Method::POST,
            "/api/v1/users",
            serde_json::json!({"name": "bob", "password": "bob-password"})
        )
        .await
        .unwrap()
        .status(),
        201
    );
    assert_eq!(
        call(
            reqwest::Method::PUT,
            "/api/v1/projects/team/members/bob",
            serde_json::json!({"role": "guest"})
        )
        .await
        .unwrap()
        .status(),
        204
    );
    let d = push_image_as(&c, &s, "team/app", "v1", 1, Some(&admin)).await;
    assert_eq!(
        pull(&c, &s, "team/app", "v1", Some(&admin)).await.0,
        200,
        "the pusher reads it"
    );
    let bob = basic("bob", "bob-password");
    let (st, msg) = pull(&c, &s, "team/app", "v1", Some(&bob)).await;
    assert_eq!(st, 403, "{msg}");
    assert!(msg.contains("no signature"), "{msg}");
    sign_tag(&c, &s, "team/app", &d, &d, &[&a], Some(&admin)).await;
    assert_eq!(pull(&c, &s, "team/app", "v1", Some(&bob)).await.0, 200);
}

fn basic(user: &str, pw: &str) -> String {
    format!("Basic {}", b64(format!("{user}:{pw}").as_bytes()))
}
