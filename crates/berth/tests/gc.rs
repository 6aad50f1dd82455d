//! Garbage collection through the binary: `berth gc` (dry run and real) on a
//! stopped registry's data directory, and the schedule inside `berth serve`.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn berth_gc(data: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("gc")
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("BERTH_DATA_DIR")
        .stdin(Stdio::null())
        .output()
        .expect("run berth gc");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn status(c: &reqwest::Client, url: String) -> u16 {
    c.head(url).send().await.expect("request").status().as_u16()
}

#[tokio::test]
async fn berth_gc_collects_a_deleted_image_and_keeps_a_live_one() {
    let mut s = Server::start_with(&["--gc-interval", "0"]);
    let c = client();
    let live = push_image(&c, &s, "lib/live", "v1", 1).await;
    let dead = push_image(&c, &s, "lib/dead", "v1", 2).await;
    let resp = c
        .delete(s.url(&format!("/v2/lib/dead/manifests/{dead}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);

    // While berth runs, the database is locked: the error says what to do.
    let (ok, _, err) = berth_gc(s.data(), &["--dry-run"]);
    assert!(!ok);
    assert!(err.contains("--gc-interval"), "{err}");
    assert!(s.terminate());

    // The default grace window (1 h) keeps everything just pushed.
    let (ok, out, err) = berth_gc(s.data(), &[]);
    assert!(ok, "{err}");
    assert!(out.starts_with("freed 0 bytes in 0 objects"), "{out}");
    let (ok, out, err) = berth_gc(s.data(), &["--dry-run", "--gc-grace", "0"]);
    assert!(ok, "{err}");
    assert!(out.contains("would free") && out.contains(": 3 blobs"), "{out}");
    let (ok, out, err) = berth_gc(s.data(), &["--gc-grace", "0"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("freed ") && out.contains(": 3 blobs"), "{out}");
    let (_, out, _) = berth_gc(s.data(), &["--gc-grace", "0"]);
    assert!(out.starts_with("freed 0 bytes"), "{out}");

    s.restart();
    // A new client: the old one's pooled connections died with the server.
    let c = client();
    assert_eq!(status(&c, s.url(&format!("/v2/lib/live/manifests/{live}"))).await, 200);
    assert_eq!(
        status(&c, s.url(&format!("/v2/lib/live/blobs/{}", sha256(&bytes(1, 1000))))).await,
        200
    );
    assert_eq!(
        status(&c, s.url(&format!("/v2/lib/dead/blobs/{}", sha256(&bytes(2, 1000))))).await,
        404
    );
}

#[tokio::test]
async fn berth_gc_refuses_a_directory_without_a_registry() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = berth_gc(dir.path(), &[]);
    assert!(!ok);
    assert!(err.contains("no meta.redb") && err.contains("--data-dir"), "{err}");
}

#[tokio::test]
async fn serve_collects_on_its_schedule() {
    let s = Server::start_with(&[
        "--gc-interval",
        "1",
        "--gc-grace",
        "0",
        "--gc-pause-ms",
        "0",
        "--gc-duty",
        "100",
    ]);
    let c = client();
    let loose = push_blob(&c, &s, "lib/app", &bytes(7, 2000)).await;
    let url = s.url(&format!("/v2/lib/app/blobs/{loose}"));
    assert_eq!(status(&c, url.clone()).await, 200);
    // Bounded wait for a scheduled run: up to 30 s, polling.
    let mut gone = false;
    for _ in 0..300 {
        if status(&c, url.clone()).await == 404 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        gone,
        "the scheduled GC never collected the loose layer; log:\n{}",
        s.log_text()
    );
    // The pass logs when it ends, which can be just after the blob went.
    let mut logged = false;
    for _ in 0..100 {
        logged = s.log_text().contains("scheduled garbage collection");
        if logged {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        logged,
        "no log line of the scheduled run:
{}",
        s.log_text()
    );
}

#[tokio::test]
async fn berth_retention_untags_and_gc_then_collects() {
    let mut s = Server::start_with(&["--gc-interval", "0"]);
    let c = client();
    push_image(&c, &s, "team/app", "v1", 11).await;
    push_image(&c, &s, "team/app", "v2", 12).await;
    push_image(&c, &s, "team/app", "release-1", 13).await;
    assert!(s.terminate());
    let rule = "team:keep-last=0:pattern=v*:protect=v2";
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["retention", "--dry-run", "--rule", rule, "--data-dir"])
        .arg(s.data())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text, "would delete team/app:v1\nwould delete 1 tags\n");
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["retention", "--rule", rule, "--data-dir"])
        .arg(s.data())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "deleted team/app:v1\ndeleted 1 tags\n"
    );
    // The untagged manifest and its blobs go with untagged pruning.
    let (ok, out, err) = berth_gc(s.data(), &["--gc-grace", "0", "--gc-untagged", "team"]);
    assert!(ok, "{err}");
    assert!(
        out.contains(": 3 blobs") && out.contains("1 untagged manifests"),
        "{out}"
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["retention", "--rule", "team:pattern=v*", "--data-dir"])
        .arg(s.data())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("keeps nothing"));
}

async fn tags(c: &reqwest::Client, s: &Server, repo: &str) -> Vec<String> {
    let resp = c.get(s.url(&format!("/v2/{repo}/tags/list"))).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200, "tags of {repo}");
    let v: serde_json::Value = resp.json().await.unwrap();
    let mut t: Vec<String> = v["tags"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
        .unwrap_or_default();
    t.sort();
    t
}

/// The retention rules of `serve`, applied by its schedule, then GC pruning
/// untagged manifests only in the project named by `--gc-untagged`; and
/// `berth retention --dry-run`, which lists exactly those tags when given
/// the same `--immutable-tags`.
#[tokio::test]
async fn serve_applies_retention_and_prunes_untagged_manifests_per_project() {
    let immutable = "frozen-*";
    let mut s = Server::start_with(&["--gc-interval", "0", "--immutable-tags", immutable]);
    let c = client();
    let mut digest = std::collections::HashMap::new();
    for (repo, tag, seed) in [
        ("team/app", "frozen-1", 21),
        ("team/app", "v1", 22),
        ("team/app", "v2", 23),
        ("team/app", "v3", 24),
        ("other/app", "v1", 31),
        ("other/app", "v2", 32),
    ] {
        digest.insert((repo, tag), (push_image(&c, &s, repo, tag, seed).await, seed));
    }
    assert!(s.terminate());

    // keep-last=0: only protect (and immutability) keep a tag, so push
    // times, which may all fall in one second here, do not matter.
    let rules = ["team:keep-last=0:protect=v3", "other:keep-last=0"];
    let dry_run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args([
                "retention",
                "--dry-run",
                "--rule",
                rules[0],
                "--rule",
                rules[1],
                "--data-dir",
            ])
            .arg(s.data())
            .args(extra)
            .env_remove("BERTH_IMMUTABLE_TAGS")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let planned = "would delete other/app:v1\nwould delete other/app:v2\nwould delete team/app:v1\n\
                   would delete team/app:v2\nwould delete 4 tags\n";
    assert_eq!(dry_run(&["--immutable-tags", immutable]), planned);
    // Without the serve's immutability rules, the plan would include the
    // frozen tag: the flag is what keeps it.
    assert!(dry_run(&[]).contains("would delete team/app:frozen-1\n"));

    let joined = rules.join(";");
    s.restart_with(&[
        "--immutable-tags",
        immutable,
        "--retention",
        &joined,
        "--gc-untagged",
        "team",
        "--gc-interval",
        "1",
        "--gc-grace",
        "0",
        "--gc-pause-ms",
        "0",
        "--gc-duty",
        "100",
    ]);
    let c = client();
    // Bounded wait for the first scheduled run (retention, then GC): 30 s.
    let mut ran = false;
    for _ in 0..300 {
        if s.log_text().contains("scheduled garbage collection") {
            ran = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ran, "no scheduled GC run; log:\n{}", s.log_text());
    let log = s.log_text();
    assert_eq!(log.matches("retention deleted a tag").count(), 4, "{log}");
    assert!(
        !log.contains("retention kept a tag"),
        "no refused delete was even tried: {log}"
    );

    assert_eq!(tags(&c, &s, "team/app").await, ["frozen-1", "v3"]);
    assert!(tags(&c, &s, "other/app").await.is_empty());
    let manifest = |repo: &str, d: &str| s.url(&format!("/v2/{repo}/manifests/{d}"));
    let layer = |repo: &str, seed: u64| s.url(&format!("/v2/{repo}/blobs/{}", sha256(&bytes(seed, 1000))));
    for ((repo, tag), (d, seed)) in &digest {
        // team is in --gc-untagged: its untagged manifests and their layers
        // are gone. other is not: its manifests stay, by digest.
        let kept = *repo == "other/app" || ["frozen-1", "v3"].contains(tag);
        let want = if kept { 200 } else { 404 };
        assert_eq!(status(&c, manifest(repo, d)).await, want, "manifest of {repo}:{tag}");
        assert_eq!(status(&c, layer(repo, *seed)).await, want, "layer of {repo}:{tag}");
    }
}

#[test]
fn gc_untagged_takes_projects_not_repositories() {
    let dir = tempfile::tempdir().unwrap();
    for cmd in [
        &["gc", "--gc-untagged", "team/app"][..],
        &["serve", "--gc-untagged", "team,Bad"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(cmd)
            .arg("--data-dir")
            .arg(dir.path())
            .env_remove("BERTH_CONFIG")
            .env_remove("BERTH_GC_UNTAGGED")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{cmd:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("is not a project name"), "{cmd:?}: {err}");
    }
}
