//! Access control against the real binary: token auth, roles, robots, the
//! admin API, catalog filtering, mounts, upload ownership, audit, and every
//! refusal with its exact status and error code.

mod common;

use base64::Engine;
use common::*;
use serde_json::{json, Value};

const ADMIN_PW: &str = "admin-password-1";

fn basic(user: &str, pw: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
    )
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

fn start(extra: &[&str]) -> Server {
    let mut args = vec!["--auth"];
    args.extend_from_slice(extra);
    Server::start_env(&args, &[("BERTH_INITIAL_ADMIN_PASSWORD", ADMIN_PW)])
}

async fn admin_call(
    c: &reqwest::Client,
    s: &Server,
    method: reqwest::Method,
    path: &str,
    body: Value,
) -> reqwest::Response {
    c.request(method, s.url(path))
        .header("authorization", basic("admin", ADMIN_PW))
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Users alice (developer of team), bob (guest of team), carol (maintainer of
/// team), dave (developer of other); projects team (private), other
/// (private), pub (public).
async fn setup(c: &reqwest::Client, s: &Server) {
    use reqwest::Method;
    for u in ["alice", "bob", "carol", "dave"] {
        let r = admin_call(
            c,
            s,
            Method::POST,
            "/api/v1/users",
            json!({"name": u, "password": format!("{u}-password")}),
        )
        .await;
        assert_eq!(r.status(), 201, "create {u}");
    }
    for (p, public) in [("team", false), ("other", false), ("pub", true)] {
        let r = admin_call(
            c,
            s,
            Method::POST,
            "/api/v1/projects",
            json!({"name": p, "public": public}),
        )
        .await;
        assert_eq!(r.status(), 201, "create {p}");
    }
    for (p, u, role) in [
        ("team", "alice", "developer"),
        ("team", "bob", "guest"),
        ("team", "carol", "maintainer"),
        ("other", "dave", "developer"),
    ] {
        let r = admin_call(
            c,
            s,
            Method::PUT,
            &format!("/api/v1/projects/{p}/members/{u}"),
            json!({"role": role}),
        )
        .await;
        assert_eq!(r.status(), 204, "{u} in {p}");
    }
}

async fn token(c: &reqwest::Client, s: &Server, user: Option<(&str, &str)>, scopes: &[&str]) -> reqwest::Response {
    let mut url = s.url("/token?service=berth");
    for sc in scopes {
        url.push_str(&format!("&scope={sc}"));
    }
    let mut rb = c.get(url);
    if let Some((u, p)) = user {
        rb = rb.header("authorization", basic(u, p));
    }
    rb.send().await.unwrap()
}

async fn token_for(c: &reqwest::Client, s: &Server, user: &str, scopes: &[&str]) -> String {
    let r = token(c, s, Some((user, &format!("{user}-password"))), scopes).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["token"].as_str().unwrap().to_string()
}

fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn token_flow_roles_and_refusals() {
    let s = start(&[]);
    let c = client();
    setup(&c, &s).await;

    // Anonymous: challenged, with the configured realm, not the Host header.
    let r = c
        .get(s.url("/v2/"))
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    let challenge = header(&r, "www-authenticate");
    assert_eq!(error_code(r).await, (401, "UNAUTHORIZED".into()));
    assert_eq!(
        challenge,
        format!("Bearer realm=\"http://{}/token\",service=\"berth\"", s.addr)
    );

    // alice (developer) gets pull and push on team/app and pushes with the token.
    let t = token_for(&c, &s, "alice", &["repository:team/app:pull,push"]).await;
    assert_eq!(
        claims(&t)["access"],
        json!([{"type": "repository", "name": "team/app", "actions": ["pull", "push"]}])
    );
    let md = push_image_as(&c, &s, "team/app", "v1", 1, Some(&bearer(&t))).await;
    let r = c
        .get(s.url("/v2/"))
        .header("authorization", bearer(&t))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Basic credentials work directly too.
    let r = c
        .get(s.url("/v2/team/app/manifests/v1"))
        .header("authorization", basic("alice", "alice-password"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "docker-content-digest"), md);

    // A wrong password.
    let r = token(&c, &s, Some(("alice", "wrong")), &["repository:team/app:pull"]).await;
    assert_eq!(error_code(r).await, (401, "UNAUTHORIZED".into()));
    let r = c
        .get(s.url("/v2/team/app/manifests/v1"))
        .header("authorization", basic("alice", "wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (401, "UNAUTHORIZED".into()));

    // A token for another repository: alice may push there, so she is told
    // to get a token with that scope...
    let r = c
        .get(s.url("/v2/team/other/tags/list"))
        .header("authorization", bearer(&t))
        .send()
        .await
        .unwrap();
    let ch = header(&r, "www-authenticate");
    assert_eq!(error_code(r).await, (401, "UNAUTHORIZED".into()));
    assert!(
        ch.contains("scope=\"repository:team/other:pull\"") && ch.contains("insufficient_scope"),
        "{ch}"
    );
    // ...but in a project she is not in, she is denied, with the reason.
    let r = c
        .get(s.url("/v2/other/app/tags/list"))
        .header("authorization", bearer(&t))
        .send()
        .await
        .unwrap();
    let (status, code) = (r.status().as_u16(), r.json::<Value>().await.unwrap());
    assert_eq!(status, 403);
    assert_eq!(code["errors"][0]["code"], "DENIED");
    assert!(code["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("not a member of project \"other\""));

    // A guest pushing: the token grants only pull, and the push is denied.
    let tb = token_for(&c, &s, "bob", &["repository:team/app:pull,push"]).await;
    assert_eq!(claims(&tb)["access"][0]["actions"], json!(["pull"]));
    let r = c
        .post(s.url("/v2/team/app/blobs/uploads/"))
        .header("authorization", bearer(&tb))
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "DENIED");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("has role guest"),
        "{body}"
    );
    let manifest = c
        .get(s.url("/v2/team/app/manifests/v1"))
        .header("authorization", bearer(&tb))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let r = c
        .put(s.url("/v2/team/app/manifests/evil"))
        .header("authorization", basic("bob", "bob-password"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (403, "DENIED".into()));

    // A developer deleting.
    let r = c
        .delete(s.url(&format!("/v2/team/app/manifests/{md}")))
        .header("authorization", basic("alice", "alice-password"))
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "DENIED");
    assert!(body["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("needs maintainer"));

    // Anonymous pull of a private project: challenged with the scope.
    let r = c.get(s.url("/v2/team/app/manifests/v1")).send().await.unwrap();
    let ch = header(&r, "www-authenticate");
    assert_eq!(error_code(r).await, (401, "UNAUTHORIZED".into()));
    assert!(ch.contains("scope=\"repository:team/app:pull\""), "{ch}");
    let r = token(&c, &s, None, &["repository:team/app:pull"]).await;
    let anon = r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_string();
    assert_eq!(claims(&anon)["access"], json!([]));

    // Nothing was half-written by the refused requests.
    let tags: Value = c
        .get(s.url("/v2/team/app/tags/list"))
        .header("authorization", basic("carol", "carol-password"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tags["tags"], json!(["v1"]));
    assert_eq!(std::fs::read_dir(s.data().join("uploads")).unwrap().count(), 0);

    // A maintainer deletes.
    let r = c
        .delete(s.url(&format!("/v2/team/app/manifests/{md}")))
        .header("authorization", basic("carol", "carol-password"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

#[tokio::test]
async fn tampered_expired_and_foreign_tokens() {
    let s = start(&["--token-ttl", "2"]);
    let other = start(&[]);
    let c = client();
    setup(&c, &s).await;
    setup(&c, &other).await;
    push_image_as(&c, &s, "team/app", "v1", 2, Some(&basic("alice", "alice-password"))).await;
    let t = token_for(&c, &s, "bob", &["repository:team/app:pull"]).await;
    let get = |auth: String| {
        let c = c.clone();
        let url = s.url("/v2/team/app/manifests/v1");
        async move { c.get(url).header("authorization", auth).send().await.unwrap() }
    };
    assert_eq!(get(bearer(&t)).await.status(), 200);
    // Tampered: bob grants himself push by editing the payload.
    let parts: Vec<&str> = t.split('.').collect();
    let mut cl = claims(&t);
    cl["access"][0]["actions"] = json!(["pull", "push", "delete"]);
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&cl).unwrap()),
        parts[2]
    );
    let r = get(bearer(&forged)).await;
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED");
    assert!(
        body["errors"][0]["message"].as_str().unwrap().contains("signature"),
        "{body}"
    );
    // Signed by another registry's key.
    let foreign = token_for(&c, &other, "bob", &["repository:team/app:pull"]).await;
    let r = get(bearer(&foreign)).await;
    assert_eq!(error_code(r).await, (401, "UNAUTHORIZED".into()));
    // Garbage.
    assert_eq!(
        error_code(get(bearer("a.b.c")).await).await,
        (401, "UNAUTHORIZED".into())
    );
    // Expired.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let r = get(bearer(&t)).await;
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED");
    assert!(
        body["errors"][0]["message"].as_str().unwrap().contains("expired"),
        "{body}"
    );
}

#[tokio::test]
async fn robots_public_projects_catalog_mounts_and_uploads() {
    let s = start(&[]);
    let c = client();
    setup(&c, &s).await;
    let alice = basic("alice", "alice-password");
    let dave = basic("dave", "dave-password");
    push_image_as(&c, &s, "team/app", "v1", 3, Some(&alice)).await;
    push_image_as(&c, &s, "other/tool", "v1", 4, Some(&dave)).await;
    push_image_as(&c, &s, "pub/base", "v1", 5, Some(&basic("admin", ADMIN_PW))).await;

    // Anonymous pull from a public project.
    let r = c.get(s.url("/v2/pub/base/manifests/v1")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = c.post(s.url("/v2/pub/base/blobs/uploads/")).send().await.unwrap();
    assert_eq!(error_code(r).await, (401, "UNAUTHORIZED".into()));

    // The catalog lists only what the caller may pull.
    let cat = |auth: Option<String>| {
        let c = c.clone();
        let url = s.url("/v2/_catalog");
        async move {
            let mut rb = c.get(url);
            if let Some(a) = auth {
                rb = rb.header("authorization", a);
            }
            rb.send().await.unwrap().json::<Value>().await.unwrap()["repositories"].clone()
        }
    };
    assert_eq!(cat(Some(alice.clone())).await, json!(["pub/base", "team/app"]));
    assert_eq!(cat(Some(dave.clone())).await, json!(["other/tool", "pub/base"]));
    assert_eq!(cat(None).await, json!(["pub/base"]));
    assert_eq!(
        cat(Some(basic("admin", ADMIN_PW))).await,
        json!(["other/tool", "pub/base", "team/app"])
    );

    // A mount from a private repository without rights falls back to an
    // upload and does not link (or reveal) the blob.
    let layer = bytes(3, 1000);
    let d = sha256(&layer);
    let r = c
        .post(s.url(&format!("/v2/other/copy/blobs/uploads/?mount={d}&from=team/app")))
        .header("authorization", dave.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = c
        .head(s.url(&format!("/v2/other/copy/blobs/{d}")))
        .header("authorization", dave.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // With rights, it mounts.
    let r = c
        .post(s.url(&format!("/v2/other/copy/blobs/uploads/?mount={d}&from=team/app")))
        .header("authorization", basic("admin", ADMIN_PW))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // Upload sessions belong to whoever opened them.
    let r = c
        .post(s.url("/v2/team/app/blobs/uploads/"))
        .header("authorization", alice.clone())
        .send()
        .await
        .unwrap();
    let loc = header(&r, "location");
    let r = c
        .patch(s.url(&loc))
        .header("authorization", basic("carol", "carol-password"))
        .body(vec![0u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (404, "BLOB_UPLOAD_UNKNOWN".into()));
    let r = c
        .patch(s.url(&loc))
        .header("authorization", alice.clone())
        .body(vec![0u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    // Robot accounts: scoped, and revocable at once.
    let r = admin_call(
        &c,
        &s,
        reqwest::Method::POST,
        "/api/v1/robots",
        json!({"name": "ci", "grants": ["team:pull"], "expires_in": "1d"}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let secret = r.json::<Value>().await.unwrap()["secret"].as_str().unwrap().to_string();
    let r = token(&c, &s, Some(("robot$ci", &secret)), &["repository:team/app:pull,push"]).await;
    let rt = r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_string();
    assert_eq!(claims(&rt)["access"][0]["actions"], json!(["pull"]));
    let r = c
        .get(s.url("/v2/team/app/manifests/v1"))
        .header("authorization", bearer(&rt))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(s.url("/v2/other/tool/manifests/v1"))
        .header("authorization", basic("robot$ci", &secret))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (403, "DENIED".into()));
    let r = admin_call(&c, &s, reqwest::Method::POST, "/api/v1/robots/ci/revoke", json!({})).await;
    assert_eq!(r.status(), 204);
    let r = token(&c, &s, Some(("robot$ci", &secret)), &["repository:team/app:pull"]).await;
    assert_eq!(error_code(r).await, (401, "UNAUTHORIZED".into()));
    let r = c
        .get(s.url("/v2/team/app/manifests/v1"))
        .header("authorization", bearer(&rt))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(r).await,
        (401, "UNAUTHORIZED".into()),
        "a revoked robot's token stops working"
    );

    // Only administrators manage accounts.
    let r = c
        .get(s.url("/api/v1/users"))
        .header("authorization", alice.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (403, "DENIED".into()));
    let r = c.get(s.url("/api/v1/users")).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // The audit log saw it all.
    let log: Value = c
        .get(s.url("/api/v1/audit?actor=alice"))
        .header("authorization", basic("admin", ADMIN_PW))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let actions: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"push"), "{actions:?}");
    // The audit log is written in the background: wait for the record.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let log = loop {
        let log: Value = c
            .get(s.url("/api/v1/audit?action=robot_revoke"))
            .header("authorization", basic("admin", ADMIN_PW))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if log.as_array().is_some_and(|a| !a.is_empty()) || std::time::Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(log[0]["resource"], "robot$ci");
    assert_eq!(log[0]["actor"], "admin");
}

#[tokio::test]
async fn oauth2_forms_and_refresh_tokens() {
    let s = start(&[]);
    let c = client();
    setup(&c, &s).await;
    // docker login: GET with offline_token gets a refresh token.
    let r = c
        .get(s.url("/token?service=berth&offline_token=true&client_id=docker"))
        .header("authorization", basic("alice", "alice-password"))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    let refresh = v["refresh_token"].as_str().unwrap().to_string();
    assert!(v["expires_in"].as_u64().unwrap() > 0);
    // containerd: POST with the refresh_token grant.
    let r = c
        .post(s.url("/token"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("service", "berth"),
            ("scope", "repository:team/app:pull,push"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["scope"], "repository:team/app:pull,push");
    let access = v["access_token"].as_str().unwrap();
    push_image_as(&c, &s, "team/app", "v2", 9, Some(&bearer(access))).await;
    // A refresh token is not an access token.
    let r = c
        .get(s.url("/v2/"))
        .header("authorization", bearer(&refresh))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The password grant.
    let r = c
        .post(s.url("/token"))
        .form(&[
            ("grant_type", "password"),
            ("username", "bob"),
            ("password", "bob-password"),
            ("service", "berth"),
            ("scope", "repository:team/app:pull"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .post(s.url("/token"))
        .form(&[
            ("grant_type", "password"),
            ("username", "bob"),
            ("password", "nope"),
            ("service", "berth"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (401, "UNAUTHORIZED".into()));
    let r = c
        .post(s.url("/token"))
        .form(&[("grant_type", "implicit")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn failed_logins_are_rate_limited() {
    let s = start(&[]);
    let c = client();
    for i in 0..10 {
        let r = token(&c, &s, Some(("admin", "wrong")), &[]).await;
        assert_eq!(r.status(), 401, "attempt {i}");
    }
    // Even the right password is refused while locked out.
    let r = token(&c, &s, Some(("admin", ADMIN_PW)), &[]).await;
    assert_eq!(error_code(r).await, (429, "TOOMANYREQUESTS".into()));
    // And the failures are in the audit log (read with `berth audit`),
    // which a background task writes: wait for it, within bounds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let lines = loop {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(["audit", "--action", "login_failed", "--json", "--data-dir"])
            .arg(s.data())
            .output()
            .unwrap();
        let lines = String::from_utf8_lossy(&out.stdout).lines().count();
        if lines >= 10 || std::time::Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(lines >= 10, "{lines} login failures audited");
}

#[test]
fn cli_manages_accounts_offline() {
    let dir = tempfile::tempdir().unwrap();
    let berth = |args: &[&str], stdin: &str| {
        use std::io::Write;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    assert!(berth(&["user", "add", "root", "--admin"], "root-password\n").0);
    let (ok, out) = berth(&["user", "add", "x"], "short\n");
    assert!(!ok && out.contains("too short"), "{out}");
    assert!(berth(&["user", "add", "eve"], "eve-password\n").0);
    assert!(berth(&["project", "create", "team"], "").0);
    assert!(berth(&["project", "member", "team", "eve", "developer"], "").0);
    let (_, out) = berth(&["project", "members", "team"], "");
    assert_eq!(out.trim(), "eve\tdeveloper");
    let (ok, out) = berth(
        &["robot", "create", "deploy", "--grant", "team:pull", "--expires", "30d"],
        "",
    );
    assert!(ok, "{out}");
    let (_, out) = berth(&["robot", "list"], "");
    assert!(out.contains("robot$deploy\tteam:pull\texpires"), "{out}");
    assert!(berth(&["robot", "revoke", "deploy"], "").0);
    let (_, out) = berth(&["robot", "list"], "");
    assert!(out.contains("revoked"), "{out}");
    let (_, out) = berth(&["audit"], "");
    assert!(out.contains("robot_revoke") && out.contains("user_create"), "{out}");
    let (ok, out) = berth(&["project", "member", "team", "ghost", "guest"], "");
    assert!(!ok && out.contains("no user"), "{out}");
}

/// A client whose connections come from `ip` (any 127.0.0.0/8 address is
/// local), so one test can be two client addresses.
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap()
}

/// Polls the audit log through the admin API until `pred` holds for the
/// records of `action` (a background task writes the file), within bounds.
async fn audited(c: &reqwest::Client, s: &Server, action: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = c
            .get(s.url(&format!("/api/v1/audit?action={action}")))
            .header("authorization", basic("admin", ADMIN_PW))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let log: Vec<Value> = r.json().await.unwrap();
        if pred(&log) || std::time::Instant::now() > deadline {
            return log;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_stranger_cannot_lock_the_admin_out() {
    let s = start(&[]);
    let stranger = client_from("127.0.0.2");
    for i in 0..10 {
        let r = token(&stranger, &s, Some(("admin", "wrong")), &[]).await;
        assert_eq!(r.status(), 401, "attempt {i}");
    }
    // The stranger is refused, on every way in, and told when to retry.
    let r = token(&stranger, &s, Some(("admin", ADMIN_PW)), &[]).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = header(&r, "retry-after").parse().expect("Retry-After in seconds");
    assert!((1..=300).contains(&retry), "Retry-After {retry}");
    assert_eq!(error_code(r).await, (429, "TOOMANYREQUESTS".into()));
    let r = stranger
        .get(s.url("/v2/"))
        .header("authorization", basic("admin", ADMIN_PW))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(!header(&r, "retry-after").is_empty());
    // The real admin, from another address, is not.
    let admin = client_from("127.0.0.1");
    let r = token(&admin, &s, Some(("admin", ADMIN_PW)), &[]).await;
    assert_eq!(r.status(), 200);
    let r = admin
        .get(s.url("/v2/"))
        .header("authorization", basic("admin", ADMIN_PW))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = admin
        .get(s.url("/api/v1/users"))
        .header("authorization", basic("admin", ADMIN_PW))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The lockout is audited with its source.
    let log = audited(&admin, &s, "login_locked", |l| !l.is_empty()).await;
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["client"], "127.0.0.2");
    assert_eq!(log[0]["resource"], "admin");
    assert!(log[0]["detail"]
        .as_str()
        .unwrap()
        .contains("10 failed logins from 127.0.0.2"));
    let m = metrics_text(&admin, &s).await;
    assert!(m.contains("berth_login_lockouts_total 1"), "{m}");
}

async fn metrics_text(c: &reqwest::Client, s: &Server) -> String {
    c.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap()
}

async fn verifications(c: &reqwest::Client, s: &Server) -> u64 {
    let m = metrics_text(c, s).await;
    m.lines()
        .find_map(|l| l.strip_prefix("berth_password_verifications_total "))
        .expect("berth_password_verifications_total exported")
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn unknown_users_cost_the_same_password_check() {
    let s = start(&[]);
    let c = client();
    setup(&c, &s).await;
    for (user, what) in [
        ("alice", "existing user"),
        ("nobody", "unknown user"),
        ("robot$ghost", "unknown robot"),
    ] {
        let before = verifications(&c, &s).await;
        let r = token(&c, &s, Some((user, "wrong-password")), &[]).await;
        assert_eq!(r.status(), 401);
        assert_eq!(
            verifications(&c, &s).await - before,
            1,
            "a failed login of an {what} runs one password verification"
        );
    }
}

/// A refresh grant with `refresh`; returns the status.
async fn refresh_status(c: &reqwest::Client, s: &Server, refresh: &str) -> u16 {
    c.post(s.url("/token"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh),
            ("service", "berth"),
            ("scope", "repository:team/app:pull"),
        ])
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn refresh_token(c: &reqwest::Client, s: &Server, user: &str, pw: &str) -> String {
    let r = c
        .get(s.url("/token?service=berth&offline_token=true&client_id=docker"))
        .header("authorization", basic(user, pw))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "login {user}");
    let v: Value = r.json().await.unwrap();
    v["refresh_token"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn refresh_tokens_end_with_the_password_removal_demotion_and_revocation() {
    use reqwest::Method;
    let s = start(&[]);
    let c = client();
    setup(&c, &s).await;
    // A password change.
    let alice = refresh_token(&c, &s, "alice", "alice-password").await;
    let alice_access = token_for(&c, &s, "alice", &["repository:team/app:pull"]).await;
    assert_eq!(refresh_status(&c, &s, &alice).await, 200);
    let r = admin_call(
        &c,
        &s,
        Method::PUT,
        "/api/v1/users/alice/password",
        json!({"password": "alice-new-pw"}),
    )
    .await;
    assert_eq!(r.status(), 204);
    assert_eq!(
        refresh_status(&c, &s, &alice).await,
        401,
        "refresh token issued before the change"
    );
    let r = c
        .get(s.url("/v2/team/app/tags/list"))
        .header("authorization", bearer(&alice_access))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "access token issued before the change");
    let fresh = refresh_token(&c, &s, "alice", "alice-new-pw").await;
    assert_eq!(
        refresh_status(&c, &s, &fresh).await,
        200,
        "a token issued after the change works"
    );
    // A demotion (maintainer to guest).
    let carol = refresh_token(&c, &s, "carol", "carol-password").await;
    let r = admin_call(
        &c,
        &s,
        Method::PUT,
        "/api/v1/projects/team/members/carol",
        json!({"role": "guest"}),
    )
    .await;
    assert_eq!(r.status(), 204);
    assert_eq!(refresh_status(&c, &s, &carol).await, 401, "demoted");
    // A removal, even when the name is taken again.
    let dave = refresh_token(&c, &s, "dave", "dave-password").await;
    let r = admin_call(&c, &s, Method::DELETE, "/api/v1/users/dave", json!({})).await;
    assert_eq!(r.status(), 204);
    assert_eq!(refresh_status(&c, &s, &dave).await, 401, "removed");
    let r = admin_call(
        &c,
        &s,
        Method::POST,
        "/api/v1/users",
        json!({"name": "dave", "password": "dave-password"}),
    )
    .await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        refresh_status(&c, &s, &dave).await,
        401,
        "a new account of the same name"
    );
    // A robot's revocation.
    let r = admin_call(
        &c,
        &s,
        Method::POST,
        "/api/v1/robots",
        json!({"name": "ci", "grants": ["team:pull"]}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let secret = r.json::<Value>().await.unwrap()["secret"].as_str().unwrap().to_string();
    let robot = refresh_token(&c, &s, "robot$ci", &secret).await;
    assert_eq!(refresh_status(&c, &s, &robot).await, 200);
    let r = admin_call(&c, &s, Method::POST, "/api/v1/robots/ci/revoke", json!({})).await;
    assert_eq!(r.status(), 204);
    assert_eq!(refresh_status(&c, &s, &robot).await, 401, "revoked");
}

#[tokio::test]
async fn secrets_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    // This test runs in its own process under nextest; the child inherits it.
    unsafe { libc::umask(0o022) };
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let mut s = start(&[]);
    let c = client();
    // Something in the audit log, so it exists.
    token(&c, &s, Some(("admin", "wrong")), &[]).await;
    audited(&c, &s, "login_failed", |l| !l.is_empty()).await;
    assert_eq!(mode(s.data()), 0o700, "data directory");
    for f in ["meta.redb", "audit.log", "token.key"] {
        assert_eq!(mode(&s.data().join(f)), 0o600, "{f}");
    }
    // A key left readable by others is reported, with the fix.
    let key = s.data().join("token.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(s.terminate());
    s.restart();
    let log = s.log_text();
    assert!(
        log.contains("the token signing key is readable by other local users")
            && log.contains(&format!("chmod 600 {}", key.display())),
        "{log}"
    );
}

#[tokio::test]
async fn the_anonymous_learn_nothing_and_the_admin_api_checks_credentials_first() {
    let s = start(&[]);
    let c = client();
    setup(&c, &s).await;
    // A private project and a missing one look the same to the anonymous.
    let private = c.get(s.url("/v2/other/app/tags/list")).send().await.unwrap();
    let missing = c.get(s.url("/v2/nothing/app/tags/list")).send().await.unwrap();
    assert_eq!(
        (private.status(), missing.status()),
        (reqwest::StatusCode::UNAUTHORIZED, reqwest::StatusCode::UNAUTHORIZED)
    );
    let (p, m): (Value, Value) = (private.json().await.unwrap(), missing.json().await.unwrap());
    assert_eq!(
        p["errors"][0]["message"].as_str().unwrap().replace("other", "X"),
        m["errors"][0]["message"].as_str().unwrap().replace("nothing", "X")
    );
    // Pushing to a public project needs a login, and says so.
    let r = c.post(s.url("/v2/pub/app/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("push needs a login"),
        "{v}"
    );
    // The admin API: credentials before the body.
    let r = c.post(s.url("/api/v1/users")).body("not json").send().await.unwrap();
    assert_eq!(error_code(r).await, (401, "UNAUTHORIZED".into()));
    // JSON without a Content-Type (curl -d) is accepted.
    let r = c
        .post(s.url("/api/v1/users"))
        .header("authorization", basic("admin", ADMIN_PW))
        .body(r#"{"name": "erin", "password": "erin-password"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // A bad body is a JSON error.
    let r = c
        .post(s.url("/api/v1/users"))
        .header("authorization", basic("admin", ADMIN_PW))
        .body(r#"{"name": 3}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (400, "INVALID".into()));
}
