//! `berth watch` against the real Docker Engine: test images built offline
//! (`docker import` of Debian's busybox-static with the scripts in
//! tests/watch_image/, faults chosen by environment), pushed to a real
//! berth on loopback, deployed by the real binary. Every container, image
//! and file is named `watch-...` and removed at the end.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::Server;

/// A registry, the test image's root file system, and what to clean up.
struct Fixture {
    server: Server,
    dir: tempfile::TempDir,
    repo: String,
    history: PathBuf,
    images: Vec<String>,
    services: Vec<String>,
}

fn sh(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run a command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The Docker tests are skipped, with a notice, only where `docker info`
/// fails (as the real-client tests are).
fn docker_available() -> bool {
    let ok = Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("NOTICE: `docker info` fails; the berth watch tests against the Docker Engine are skipped");
    }
    ok
}

impl Fixture {
    fn new(test: &str) -> Fixture {
        let server = Server::start();
        let dir = tempfile::Builder::new().prefix("watch-").tempdir().unwrap();
        let root = dir.path().join("root");
        for d in ["bin", "www/cgi-bin", "tmp"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("busybox-static is installed (scripts/install-test-deps.sh)");
        std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
        for tool in ["sh", "date", "cat"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(tool)).unwrap();
        }
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/watch_image");
        std::fs::copy(src.join("entry.sh"), root.join("entry.sh")).unwrap();
        std::fs::copy(src.join("healthz"), root.join("www/cgi-bin/healthz")).unwrap();
        std::fs::copy(src.join("app"), root.join("www/cgi-bin/app")).unwrap();
        std::fs::copy(src.join("metrics"), root.join("www/cgi-bin/metrics")).unwrap();
        sh(Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(dir.path().join("rootfs.tar"))
            .arg("."));
        let repo = format!("{}/watch-{test}", server.addr);
        let history = dir.path().join("watch-history.redb");
        Fixture {
            server,
            dir,
            repo,
            history,
            images: Vec::new(),
            services: Vec::new(),
        }
    }

    /// Builds `REPO:TAG` reporting version `tag` with extra `ENV`s, pushes
    /// it to berth, and returns its reference.
    fn image(&mut self, tag: &str, env: &[&str]) -> String {
        let reference = format!("{}:{tag}", self.repo);
        let mut cmd = Command::new("docker");
        cmd.arg("import")
            .arg("--change")
            .arg(r#"ENTRYPOINT ["/bin/sh", "/entry.sh"]"#)
            .arg("--change")
            .arg(format!("ENV VERSION={tag}"));
        for e in env {
            cmd.arg("--change").arg(format!("ENV {e}"));
        }
        sh(cmd.arg(self.dir.path().join("rootfs.tar")).arg(&reference));
        sh(Command::new("docker").arg("push").arg("-q").arg(&reference));
        // Deployed by digest, so the local tag is not what runs.
        sh(Command::new("docker").arg("rmi").arg(&reference));
        self.images.push(reference.clone());
        reference
    }

    /// A deployment description for `name` in a file.
    fn spec(&mut self, name: &str, image: &str, extra: &str) -> PathBuf {
        let service = format!("watch-{name}");
        self.services.push(service.clone());
        let text = format!(
            r#"name = "{service}"
image = "{image}"
ports = [{{ container = 80 }}]
{extra}

[health]
port = 80
path = "/cgi-bin/healthz"
interval = "500ms"
timeout = "1s"
threshold = 3

[rollout]
start_timeout = "5s"
verify = "3s"
failure_limit = 3
"#
        );
        let path = self.dir.path().join(format!("{service}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn watch(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("watch")
            .arg("--history")
            .arg(&self.history)
            .args(args)
            .output()
            .expect("run berth watch")
    }

    /// `berth watch deploy`: (succeeded, stdout, stderr).
    fn deploy(&self, file: &Path, image: Option<&str>) -> (bool, String, String) {
        let mut args = vec!["deploy", file.to_str().unwrap()];
        if let Some(i) = image {
            args.extend(["--image", i]);
        }
        let out = self.watch(&args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The running containers of `service`: (name, image as created).
    fn running(&self, service: &str) -> Vec<(String, String)> {
        let out =
            sh(Command::new("docker").args(["ps", "-q", "--filter", &format!("label=berth.watch.service={service}")]));
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if ids.is_empty() {
            return Vec::new();
        }
        let out = sh(Command::new("docker")
            .args(["inspect", "--format", "{{.Name}} {{.Config.Image}}"])
            .args(&ids));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                l.split_once(' ')
                    .map(|(a, b)| (a.trim_start_matches('/').to_string(), b.to_string()))
            })
            .collect()
    }

    /// What the running instance of `service` answers on its health port.
    fn health_of(&self, service: &str) -> String {
        let (name, _) = self.running(service).pop().expect("an instance runs");
        let out = sh(Command::new("docker").args(["port", &name, "80"]));
        let addr = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap()
            .trim()
            .to_string();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            reqwest::get(format!("http://{addr}/cgi-bin/healthz"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        })
    }

    fn digest_of(&self, reference: &str) -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (repo, tag) = reference.rsplit_once(':').unwrap();
        let name = repo.split_once('/').unwrap().1;
        rt.block_on(async {
            let r = reqwest::Client::new()
                .head(self.server.url(&format!("/v2/{name}/manifests/{tag}")))
                .header("accept", "application/vnd.docker.distribution.manifest.v2+json")
                .send()
                .await
                .unwrap();
            r.headers()["docker-content-digest"].to_str().unwrap().to_string()
        })
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for s in &self.services {
            let out = Command::new("docker")
                .args(["ps", "-aq", "--filter", &format!("label=berth.watch.service={s}")])
                .output();
            if let Ok(out) = out {
                for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("docker").args(["rm", "-f", id]).output();
                }
            }
        }
        // Pulled by digest: remove every image of the test's repository.
        let out = Command::new("docker")
            .args(["images", "-q", "--no-trunc", &self.repo])
            .output();
        let mut ids: Vec<String> = out
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids.dedup();
        for id in ids {
            let _ = Command::new("docker").args(["rmi", "-f", &id]).output();
        }
        for i in &self.images {
            let _ = Command::new("docker").args(["rmi", "-f", i]).output();
        }
    }
}

/// Deploy by digest, a failed health check after the switch rolled back to
/// the previous release by digest (the old version serves again), a manual
/// rollback, and the history and review.
#[test]
fn watch_deploys_by_digest_and_rolls_back_on_failed_health() {
    if !docker_available() {
        return;
    }
    let mut f = Fixture::new("roll");
    let v1 = f.image("v1", &[]);
    let v2 = f.image("v2", &[]);
    // Healthy at the gate, failing one second after it starts.
    let v3 = f.image("v3", &["UNHEALTHY_AFTER=1"]);
    let file = f.spec("roll", &v1, "");

    let (ok, out, err) = f.deploy(&file, None);
    assert!(ok, "{out}{err}");
    assert!(out.contains("-> success"), "{out}");
    let d1 = f.digest_of(&v1);
    assert!(
        out.contains(&format!("pulling {}@{d1}", f.repo)),
        "deployed by digest: {out}"
    );

    let (ok, out, err) = f.deploy(&file, Some(&v2));
    assert!(ok, "{out}{err}");
    let d2 = f.digest_of(&v2);
    let running = f.running("watch-roll");
    assert_eq!(running.len(), 1, "the old version was stopped: {running:?}");
    assert_eq!(running[0].1, format!("{}@{d2}", f.repo));
    assert!(f.health_of("watch-roll").contains(r#""image_version":"v2""#));

    let (ok, out, _) = f.deploy(&file, Some(&v3));
    assert!(!ok, "a rolled back deployment exits non-zero");
    assert!(out.contains("-> rolled_back"), "{out}");
    assert!(out.contains("health check failed (3/3)"), "{out}");
    assert!(out.contains(&format!("rolling back to v2 ({d2})")), "{out}");
    let running = f.running("watch-roll");
    assert_eq!(running.len(), 1, "{running:?}");
    assert_eq!(running[0].1, format!("{}@{d2}", f.repo));
    assert!(
        f.health_of("watch-roll").contains(r#""image_version":"v2""#),
        "v2 serves again"
    );

    let out = f.watch(&["rollback", "watch-roll"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("rollback from v2 to v1"), "{text}");
    assert_eq!(f.running("watch-roll")[0].1, format!("{}@{d1}", f.repo));
    assert!(f.health_of("watch-roll").contains(r#""image_version":"v1""#));

    let status = String::from_utf8_lossy(&f.watch(&["status"]).stdout).into_owned();
    assert!(status.contains(&format!("watch-roll: active v1 ({d1})")), "{status}");
    let history = String::from_utf8_lossy(&f.watch(&["history", "watch-roll"]).stdout).into_owned();
    for line in ["#1 deploy", "#2 deploy", "#3 deploy", "#4 rollback", "cause: unhealthy"] {
        assert!(history.contains(line), "{line} in {history}");
    }
    let report = String::from_utf8_lossy(&f.watch(&["report", "--since", "30d"]).stdout).into_owned();
    assert!(report.contains("deployments in the last 30 days: 3"), "{report}");
    assert!(report.contains("rolled_back  1"), "{report}");
    assert!(report.contains("unhealthy"), "{report}");
}

/// Each failure class from the real Engine, with its evidence; three
/// consecutive failures pause the service, the fourth deployment is
/// refused with why and how to resume, and `resume` lifts it.
#[test]
fn watch_classifies_failures_and_pauses_after_three() {
    if !docker_available() {
        return;
    }
    let mut f = Fixture::new("fail");
    let good = f.image("v1", &[]);
    let exits = f.image("v2", &["FAULT=exit"]);
    let wrong = f.image("v3", &["REPORT_VERSION=v1"]);
    let never = f.image("v4", &["FAULT=unhealthy"]);
    let file = f.spec("fail", &good, "");
    let (ok, out, err) = f.deploy(&file, None);
    assert!(ok, "{out}{err}");

    let (ok, out, _) = f.deploy(&file, Some(&exits));
    assert!(!ok);
    assert!(out.contains("cause: exited: state exited, exit code 3"), "{out}");
    assert!(
        out.contains("fault: exiting at once"),
        "the container's output is the evidence: {out}"
    );

    let (ok, out, _) = f.deploy(&file, Some(&format!("{}:no-such-tag", f.repo)));
    assert!(!ok);
    assert!(out.contains("cause: tag_not_found"), "{out}");
    // The root cause is berth diagnose's walk of the pull path.
    assert!(out.contains("tag no-such-tag does not; nearest tags: v"), "{out}");

    let (ok, out, _) = f.deploy(&file, Some(&wrong));
    assert!(!ok);
    assert!(out.contains("cause: wrong_version"), "{out}");
    assert!(
        out.contains(r#"reports image_version "v1" where "v3" was deployed"#),
        "{out}"
    );
    // Failed deployments leave the good version serving.
    assert!(f.health_of("watch-fail").contains(r#""image_version":"v1""#));

    let (ok, out, err) = f.deploy(&file, Some(&good));
    assert!(!ok, "the 4th deployment is refused: {out}");
    assert!(err.contains("is paused since"), "{err}");
    assert!(err.contains("after 3 consecutive failed deployments"), "{err}");
    assert!(err.contains("berth watch resume watch-fail"), "{err}");
    let status = String::from_utf8_lossy(&f.watch(&["status"]).stdout).into_owned();
    assert!(status.contains("PAUSED since"), "{status}");
    assert!(f.watch(&["resume", "watch-fail"]).status.success());

    // Not healthy within the start timeout: a `timeout` result.
    let (ok, out, _) = f.deploy(&file, Some(&never));
    assert!(!ok);
    assert!(out.contains("-> timeout"), "{out}");
    assert!(
        out.contains("cause: start_timeout: not Running and healthy within 5s"),
        "{out}"
    );
    assert!(out.contains("HTTP 503"), "the last check is the evidence: {out}");

    // More CPUs than the host has.
    let cpus = f.spec("fail-cpu", &good, "cpus = 512.0");
    let (ok, out, _) = f.deploy(&cpus, None);
    assert!(!ok);
    assert!(out.contains("cause: resources: Range of CPUs"), "{out}");

    // A fixed host port another process holds.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let fixed = f.dir.path().join("watch-fail-port.toml");
    let text = std::fs::read_to_string(f.spec("fail-port", &good, ""))
        .unwrap()
        .replace("{ container = 80 }", &format!("{{ container = 80, host = {port} }}"));
    std::fs::write(&fixed, text).unwrap();
    let (ok, out, _) = f.deploy(&fixed, None);
    assert!(!ok);
    assert!(
        out.contains(&format!("cause: port_conflict: host port 127.0.0.1:{port} is in use")),
        "{out}"
    );
    drop(taken);

    // A registry that does not answer.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("127.0.0.1:{}/watch-fail:v1", closed.local_addr().unwrap().port());
    drop(closed);
    let (ok, out, _) = f.deploy(&cpus, Some(&dead));
    assert!(!ok);
    assert!(out.contains("cause: registry_unreachable"), "{out}");
    assert!(out.contains("connection refused"), "{out}");

    // A description that is not valid: file, line and key.
    let bad = f.dir.path().join("watch-bad.toml");
    std::fs::write(
        &bad,
        "name = \"watch-bad\"\nimage = \"x:v1\"\nreplicas = 0\n[health]\nport = 80\npath = \"/\"\n",
    )
    .unwrap();
    let (ok, _, err) = f.deploy(&bad, None);
    assert!(!ok);
    assert!(
        err.contains(&format!("{}:3: `replicas`: 0 is out of range", bad.display())),
        "{err}"
    );
}

/// A real Alertmanager on a free loopback port; killed on drop.
struct Alertmanager {
    child: std::process::Child,
    url: String,
}

impl Alertmanager {
    fn start(dir: &Path) -> Alertmanager {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.join("watch-alertmanager.yml");
        std::fs::write(&config, "route:\n  receiver: none\nreceivers:\n  - name: none\n").unwrap();
        let child = Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.join("watch-am-data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus-alertmanager is installed (scripts/install-test-deps.sh)");
        let am = Alertmanager {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while get(&format!("{}/-/ready", am.url)).is_none() {
            assert!(std::time::Instant::now() < deadline, "alertmanager did not start");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        am
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(url: &str) -> Option<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = reqwest::get(url).await.ok()?;
        r.status().is_success().then_some(())?;
        r.text().await.ok()
    })
}

/// A webhook receiver: every request body, in order.
fn webhook() -> (String, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut len = 0;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            let _ = r.read_exact(&mut body);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            if tx.send(String::from_utf8_lossy(&body).into_owned()).is_err() {
                return;
            }
        }
    });
    (url, rx)
}

/// `berth watch run`: an instance that turns unhealthy after its
/// deployment passed is rolled back by the guard, by digest; /metrics has
/// the families the shipped rules use, and counts a `timeout` that was
/// rolled back (fixed host ports: the old version restored) as a
/// rollback; a pull failure's alert reaches a real Alertmanager with its
/// priority and root cause, and a CloudEvent reaches the webhook.
#[test]
fn watch_guard_rolls_back_exports_metrics_and_alerts() {
    if !docker_available() {
        return;
    }
    let mut f = Fixture::new("guard");
    let am = Alertmanager::start(f.dir.path());
    let (hook, events) = webhook();
    let v1 = f.image("v1", &[]);
    let v2 = f.image("v2", &["UNHEALTHY_AFTER=4"]);
    let never = f.image("v3", &["FAULT=unhealthy"]);
    let notify = format!(
        "[notify]\nalertmanager = \"{}\"\nwebhooks = [\"{hook}\"]\nlabels = {{ region = \"eu\" }}\n",
        am.url
    );
    let file = f.spec("guard", &v1, "");
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("verify = \"3s\"", "verify = \"1s\"")
        + &notify;
    std::fs::write(&file, text).unwrap();
    let (ok, out, err) = f.deploy(&file, None);
    assert!(ok, "{out}{err}");

    let (mut guard, metrics) = start_guard(&f);

    let (ok, out, err) = f.deploy(&file, Some(&v2));
    assert!(ok, "v2 passes its verify period: {out}{err}");
    let d1 = f.digest_of(&v1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    while f.running("watch-guard").first().map(|r| r.1.clone()) != Some(format!("{}@{d1}", f.repo)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the guard did not roll back: {:?}",
            f.running("watch-guard")
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let history = loop {
        let h = String::from_utf8_lossy(&f.watch(&["history", "watch-guard"]).stdout).into_owned();
        if h.contains("#3 rollback") && h.contains("-> success") && !h.contains("-> running") {
            break h;
        }
        assert!(std::time::Instant::now() < deadline, "{h}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(
        history.contains("guard: unhealthy: 3 consecutive failed health checks"),
        "{history}"
    );
    assert!(f.health_of("watch-guard").contains(r#""image_version":"v1""#));

    // A pull failure: the alert carries the root cause.
    let (ok, _, _) = f.deploy(&file, Some(&format!("{}:v9", f.repo)));
    assert!(!ok);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let alerts = loop {
        let a = get(&format!(
            "{}/api/v2/alerts?filter=alertname%3D%22BerthWatchPullFailed%22",
            am.url
        ))
        .unwrap_or_default();
        if a.contains("BerthWatchPullFailed") {
            break a;
        }
        assert!(std::time::Instant::now() < deadline, "no alert in Alertmanager: {a}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let alerts: serde_json::Value = serde_json::from_str(&alerts).unwrap();
    let a = &alerts[0];
    assert_eq!(a["labels"]["priority"], "P1", "{a}");
    assert_eq!(a["labels"]["severity"], "warning", "{a}");
    assert_eq!(a["labels"]["service"], "watch-guard", "{a}");
    assert_eq!(a["labels"]["region"], "eu", "{a}");
    assert_eq!(a["annotations"]["cause"], "tag_not_found", "{a}");
    let root = a["annotations"]["root_cause"].as_str().unwrap();
    assert!(root.contains("exists, tag v9 does not; nearest tags: v"), "{a}");
    let rolled = get(&format!(
        "{}/api/v2/alerts?filter=alertname%3D%22BerthWatchRolledBack%22",
        am.url
    ))
    .unwrap();
    assert!(rolled.contains("rolled back from v2 to v1"), "{rolled}");

    let mut saw = Vec::new();
    while let Ok(e) = events.recv_timeout(std::time::Duration::from_secs(5)) {
        let done = e.contains("io.berth.watch.BerthWatchPullFailed");
        saw.push(e);
        if done {
            break;
        }
    }
    let last: serde_json::Value = serde_json::from_str(saw.last().expect("a CloudEvent")).unwrap();
    assert_eq!(last["specversion"], "1.0");
    assert_eq!(last["type"], "io.berth.watch.BerthWatchPullFailed");
    assert_eq!(last["subject"], "watch-guard");

    // A fixed host port: v1 gives it up for the new version, which is
    // never healthy; berth starts v1 again. A `timeout`, and a rollback.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let fixed = f.spec("guard-fixed", &v1, "");
    let text = std::fs::read_to_string(&fixed)
        .unwrap()
        .replace("{ container = 80 }", &format!("{{ container = 80, host = {port} }}"));
    std::fs::write(&fixed, text).unwrap();
    let (ok, out, err) = f.deploy(&fixed, None);
    assert!(ok, "{out}{err}");
    let (ok, out, _) = f.deploy(&fixed, Some(&never));
    assert!(!ok, "{out}");
    assert!(out.contains("-> timeout"), "{out}");
    assert!(out.contains("nothing serves: restoring v1"), "{out}");
    assert!(out.contains("restored v1"), "{out}");
    let health = get(&format!("http://127.0.0.1:{port}/cgi-bin/healthz")).unwrap_or_default();
    assert!(health.contains(r#""image_version":"v1""#), "{health}");

    let m = get(&metrics).expect("metrics");
    for line in [
        r#"berth_watch_deploys_total{region="eu",service="watch-guard",result="success"} 2"#,
        r#"berth_watch_deploys_total{region="eu",service="watch-guard",result="failure"} 1"#,
        r#"berth_watch_deploys_total{region="eu",service="watch-guard",result="timeout"} 0"#,
        r#"berth_watch_rollbacks_total{region="eu",service="watch-guard"} 1"#,
        r#"berth_watch_pauses_total{region="eu",service="watch-guard"} 0"#,
        r#"berth_watch_paused{region="eu",service="watch-guard"} 0"#,
        r#"berth_watch_deploy_duration_seconds_count{region="eu",service="watch-guard"} 3"#,
        r#"berth_watch_deploys_total{region="eu",service="watch-guard-fixed",result="timeout"} 1"#,
        r#"berth_watch_rollbacks_total{region="eu",service="watch-guard-fixed"} 1"#,
    ] {
        assert!(m.contains(line), "{line} in\n{m}");
    }
    // Every berth_watch family the shipped rules use is exported.
    let rules =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/prometheus/berth-rules.yml"))
            .unwrap();
    let mut used: Vec<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("berth_watch_"))
        .collect();
    used.sort();
    used.dedup();
    assert!(used.len() >= 4, "{used:?}");
    for name in used {
        assert!(m.contains(&format!("\n{name}{{")), "{name} (used by the rules) in\n{m}");
    }
    let _ = guard.kill();
    let _ = guard.wait();
}

/// `berth watch run` on a free port: (the process, its /metrics URL).
fn start_guard(f: &Fixture) -> (std::process::Child, String) {
    let mut guard = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["watch", "--history"])
        .arg(&f.history)
        .args(["run", "--listen", "127.0.0.1:0", "--label", "region=eu"])
        .env("BERTH_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(guard.stderr.take().unwrap()));
    let first = lines.next().unwrap().unwrap();
    let metrics = first.split("metrics on ").nth(1).expect(&first).trim().to_string();
    std::thread::spawn(move || lines.for_each(drop));
    (guard, metrics)
}

/// nginx (Debian's nginx-light) on a free loopback port with its own
/// prefix, proxying to the upstream berth writes; killed on drop.
struct Nginx {
    child: std::process::Child,
    addr: String,
    dir: PathBuf,
}

impl Nginx {
    fn start(dir: &Path) -> Nginx {
        let dir = dir.join("watch-nginx");
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.display();
        std::fs::write(
            dir.join("upstream.conf"),
            "upstream watch_canary { server 127.0.0.1:1; }\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("nginx.conf"),
            format!(
                r#"daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
    log_format watch escape=json '{{"upstream_addr":"$upstream_addr","status":$status,"request_time":$request_time}}';
    access_log {d}/access.log watch;
    include {d}/upstream.conf;
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://watch_canary; }}
    }}
}}
"#
            ),
        )
        .unwrap();
        let child = Command::new("nginx")
            .args([
                "-p",
                &d.to_string(),
                "-c",
                &format!("{d}/nginx.conf"),
                "-e",
                &format!("{d}/error.log"),
            ])
            .spawn()
            .expect("nginx (nginx-light) is installed (scripts/install-test-deps.sh)");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !dir.join("nginx.pid").exists() {
            assert!(std::time::Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Nginx {
            child,
            addr: format!("127.0.0.1:{port}"),
            dir,
        }
    }

    /// The `[router]` section for a deployment description.
    fn router(&self) -> String {
        let d = self.dir.display();
        format!(
            "[router]\nupstream = \"watch_canary\"\nconf = \"{d}/upstream.conf\"\naccess_log = \"{d}/access.log\"\nreload = [\"nginx\", \"-p\", \"{d}\", \"-c\", \"{d}/nginx.conf\", \"-e\", \"{d}/error.log\", \"-s\", \"reload\"]\n"
        )
    }

    /// One GET of the app through nginx: the body.
    fn get(&self) -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(&self.addr) else {
            return String::new();
        };
        let _ = s.write_all(b"GET /cgi-bin/app HTTP/1.0\r\nHost: watch\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }
}

impl Drop for Nginx {
    /// SIGTERM: the master stops its workers (SIGKILL would orphan them).
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Requests through nginx, one after another, until dropped.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: &str) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, addr) = (stop.clone(), addr.to_string());
        let thread = std::thread::spawn(move || {
            let n = Nginx::client(&addr);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                n();
            }
        });
        Load {
            stop,
            thread: Some(thread),
        }
    }
}

impl Nginx {
    fn client(addr: &str) -> impl Fn() {
        let addr = addr.to_string();
        move || {
            use std::io::{Read, Write};
            if let Ok(mut s) = std::net::TcpStream::connect(&addr) {
                let _ = s.write_all(b"GET /cgi-bin/app HTTP/1.0\r\nHost: watch\r\n\r\n");
                let _ = s.read_to_end(&mut Vec::new());
            }
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Canary through real nginx: a healthy canary is promoted step by step
/// and gets its weight's share of the traffic (within one point, measured
/// in nginx's log); a canary with errors, or a slow one, is rolled back at
/// its first failing window, and so is one whose instance stops; a canary
/// without traffic is never promoted; one whose process is killed is
/// removed from nginx by the next command.
#[test]
fn watch_canary_through_nginx() {
    if !docker_available() {
        return;
    }
    let mut f = Fixture::new("canary");
    let nginx = Nginx::start(f.dir.path());
    let v1 = f.image("v1", &[]);
    let v2 = f.image("v2", &[]);
    // The issue's faults: 1.5 % errors, 2.5 s latency, on the canary only.
    let v3 = f.image("v3", &["ERROR_EVERY=67"]);
    let v4 = f.image("v4", &["LATENCY_MS=2500"]);
    let v5 = f.image("v5", &[]);
    let v6 = f.image("v6", &["EXIT_AFTER=2"]);
    let canary = |f: &mut Fixture, file: &str, section: &str| {
        let path = f.spec("canary", &v1, "");
        let text = std::fs::read_to_string(&path).unwrap() + &nginx.router() + section;
        let to = f.dir.path().join(file);
        std::fs::write(&to, text).unwrap();
        to
    };
    let steps = canary(
        &mut f,
        "watch-steps.toml",
        "[canary]\nsteps = [{ weight = 5, duration = \"3s\" }, { weight = 50, duration = \"1s\" }]\ninterval = \"1s\"\nmin_requests = 5\ninconclusive_windows = 2\n",
    );
    // The guide's thresholds (1 % errors, 2 s at p99). At least 250 canary requests a window: with every 67th
    // failing, no window of that size can be at or under 1 %.
    let errors = canary(
        &mut f,
        "watch-errors.toml",
        "[canary]\nsteps = [{ weight = 90, duration = \"4s\" }]\ninterval = \"4s\"\nmin_requests = 250\n",
    );
    let hold = canary(
        &mut f,
        "watch-hold.toml",
        "[canary]\nsteps = [{ weight = 5, duration = \"1s\" }]\ninterval = \"1s\"\ninconclusive_windows = 1\non_inconclusive = \"pause\"\n",
    );
    let slow = canary(
        &mut f,
        "watch-slow.toml",
        "[canary]\nsteps = [{ weight = 50, duration = \"3s\" }]\ninterval = \"3s\"\nmin_requests = 1\n",
    );

    let (ok, out, err) = f.deploy(&steps, None);
    assert!(
        ok,
        "the first deployment has no stable version to compare with: {out}{err}"
    );
    assert!(out.contains("nginx upstream watch_canary now routes to v1"), "{out}");
    assert!(nginx.get().contains("hello from v1"));

    let load = Load::start(&nginx.addr);
    let (ok, out, err) = f.deploy(&steps, Some(&v2));
    assert!(ok, "{out}{err}");
    assert!(out.contains("step 1: 5 % of the traffic to the canary"), "{out}");
    assert!(out.contains("step 2: 50 % of the traffic to the canary"), "{out}");
    assert!(out.contains("v2 promoted"), "{out}");
    // The share of each full window of step 1, from nginx's log.
    let shares: Vec<f64> = out
        .lines()
        .skip_while(|l| !l.contains("step 1:"))
        .take_while(|l| !l.contains("step 2:"))
        .filter_map(|l| l.split(" % of the traffic)").next()?.rsplit('(').next()?.parse().ok())
        .collect();
    assert!(!shares.is_empty(), "{out}");
    for s in &shares {
        assert!((s - 5.0).abs() <= 1.0, "canary share {s} % at weight 5 %: {out}");
    }
    assert!(nginx.get().contains("hello from v2"), "promoted: all traffic to v2");

    // A canary whose `deploy` is killed mid-analysis: the next `status`
    // removes it and gives nginx the stable version alone again.
    let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("watch")
        .arg("--history")
        .arg(&f.history)
        .arg("deploy")
        .arg(&steps)
        .args(["--image", &v5])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    for line in lines {
        if line.unwrap().contains("step 1:") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let upstream = || std::fs::read_to_string(nginx.dir.join("upstream.conf")).unwrap();
    assert_eq!(upstream().matches("server ").count(), 2, "{}", upstream());
    let out = f.watch(&["status"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("was interrupted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(upstream().matches("server ").count(), 1, "{}", upstream());
    assert_eq!(f.running("watch-canary").len(), 1);
    for _ in 0..20 {
        assert!(nginx.get().contains("hello from v2"), "the stable alone serves");
    }

    // One client at a time: the image's request counter is not locked.
    let (ok, out, _) = f.deploy(&errors, Some(&v3));
    assert!(!ok);
    assert!(out.contains("-> rolled_back"), "{out}");
    assert!(out.contains("cause: canary_errors"), "{out}");
    assert!(out.contains("canary error rate above 1.00 %"), "{out}");
    assert!(
        !out.contains("window passed"),
        "rolled back at the first judged window: {out}"
    );
    drop(load);
    for _ in 0..20 {
        assert!(nginx.get().contains("hello from v2"), "the stable version serves again");
    }

    let load = Load::start(&nginx.addr);
    let (ok, out, _) = f.deploy(&slow, Some(&v4));
    assert!(!ok);
    assert!(out.contains("cause: canary_latency"), "{out}");
    assert!(
        out.contains("canary p99 latency 2.") && out.contains("s above 2s"),
        "{out}"
    );
    // A canary instance that stops during the analysis.
    let (ok, out, _) = f.deploy(&steps, Some(&v6));
    assert!(!ok);
    assert!(out.contains("canary instance stopped"), "{out}");
    assert!(out.contains("cause: exited"), "{out}");
    drop(load);

    // Three canaries failed in a row: the service is paused.
    let (ok, _, err) = f.deploy(&steps, Some(&v5));
    assert!(!ok && err.contains("berth watch resume watch-canary"), "{err}");
    assert!(f.watch(&["resume", "watch-canary"]).status.success());

    // No traffic: inconclusive windows, then a rollback; never promoted.
    let (ok, out, _) = f.deploy(&steps, Some(&v5));
    assert!(!ok);
    assert!(out.contains("window inconclusive (2/2)"), "{out}");
    assert!(out.contains("cause: canary_inconclusive"), "{out}");
    assert!(!out.contains("promoted"), "{out}");
    assert!(nginx.get().contains("hello from v2"));

    // No traffic, `on_inconclusive = "pause"`: rolled back and paused.
    let (ok, out, _) = f.deploy(&hold, Some(&v5));
    assert!(!ok);
    assert!(out.contains("cause: canary_inconclusive"), "{out}");
    let status = String::from_utf8_lossy(&f.watch(&["status"]).stdout).into_owned();
    assert!(
        status.contains("PAUSED since") && status.contains("inconclusive"),
        "{status}"
    );
    assert!(nginx.get().contains("hello from v2"));
}

/// A real Prometheus (Debian's) on a free loopback port: it finds the
/// service's containers through the Docker Engine (`docker_sd_configs`,
/// by berth's labels, scraped at 127.0.0.1:HOSTPORT), scrapes the guard's
/// /metrics, and evaluates the shipped rules. Killed on drop.
struct Prometheus {
    child: std::process::Child,
    url: String,
}

impl Prometheus {
    fn start(dir: &Path, service: &str, guard: &str) -> Prometheus {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let socket = std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
        let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/prometheus/berth-rules.yml");
        let guard = guard.trim_start_matches("http://").trim_end_matches("/metrics");
        let config = dir.join("watch-prometheus.yml");
        std::fs::write(
            &config,
            format!(
                r#"global: {{scrape_interval: 500ms, evaluation_interval: 1s}}
rule_files: ["{rules}"]
scrape_configs:
  - job_name: berth-watch
    static_configs: [{{targets: ["{guard}"]}}]
  - job_name: apps
    metrics_path: /cgi-bin/metrics
    docker_sd_configs:
      - host: "{socket}"
        refresh_interval: 1s
        filters: [{{name: label, values: ["berth.watch.service={service}"]}}]
    relabel_configs:
      - {{source_labels: [__meta_docker_port_private], regex: "80", action: keep}}
      - {{source_labels: [__meta_docker_port_public], target_label: __address__, replacement: "127.0.0.1:$1"}}
      - {{source_labels: [__meta_docker_container_label_berth_watch_service], target_label: service}}
      - {{source_labels: [__meta_docker_container_label_berth_watch_digest], target_label: digest}}
"#,
                rules = rules.display()
            ),
        )
        .unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("watch-prom-data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("watch-prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus is installed (scripts/install-test-deps.sh)");
        let p = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while get(&format!("{}/-/ready", p.url)).is_none() {
            assert!(std::time::Instant::now() < deadline, "prometheus did not start");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        p
    }

    /// The value of an instant query with one result, if it has one.
    fn value(&self, query: &str) -> Option<f64> {
        let url = reqwest::Url::parse_with_params(&format!("{}/api/v1/query", self.url), [("query", query)]).ok()?;
        let body = get(url.as_str())?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The canary analysis from a real Prometheus, with the deployment's PromQL
/// (the app's own request counter and latency histogram, found by digest):
/// a healthy canary is promoted; 1.5 % errors and 2.5 s latency on the
/// canary only are each rolled back (the latency against the stable's, in
/// relative mode); no traffic is inconclusive and never promoted. The
/// analysis results reach Prometheus through `berth watch run`'s /metrics,
/// and the shipped rules evaluate on them.
#[test]
fn watch_canary_from_prometheus() {
    if !docker_available() {
        return;
    }
    let mut f = Fixture::new("prom");
    let nginx = Nginx::start(f.dir.path());
    let (mut guard, metrics) = start_guard(&f);
    let prom = Prometheus::start(f.dir.path(), "watch-prom", &metrics);
    let v1 = f.image("v1", &[]);
    let v2 = f.image("v2", &[]);
    let v3 = f.image("v3", &["ERROR_EVERY=67"]);
    let v4 = f.image("v4", &["LATENCY_MS=2500"]);
    let v5 = f.image("v5", &[]);
    let queries = format!(
        r#"
[canary.prometheus]
url = "{}"
requests = 'sum(increase(app_request_duration_seconds_count{{service="{{{{service}}}}",digest="{{{{digest}}}}"}}[{{{{interval}}}}]))'
errors = 'sum(increase(app_requests_total{{service="{{{{service}}}}",digest="{{{{digest}}}}",code=~"5.."}}[{{{{interval}}}}]))'
latency = 'histogram_quantile({{{{quantile}}}}, sum by (le) (rate(app_request_duration_seconds_bucket{{service="{{{{service}}}}",digest="{{{{digest}}}}"}}[{{{{interval}}}}])))'
"#,
        prom.url
    );
    let canary = |f: &mut Fixture, file: &str, section: &str| {
        let path = f.spec("prom", &v1, "");
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("failure_limit = 3", "failure_limit = 10")
            + &nginx.router()
            + section
            + &queries;
        let to = f.dir.path().join(file);
        std::fs::write(&to, text).unwrap();
        to
    };
    let steps = canary(
        &mut f,
        "watch-prom-steps.toml",
        "[canary]\nsteps = [{ weight = 20, duration = \"4s\" }, { weight = 50, duration = \"2s\" }]\ninterval = \"2s\"\nmin_requests = 10\ninconclusive_windows = 3\n",
    );
    // Every 67th request fails: at least 200 canary requests a window give
    // at least 2 errors (1 % is the threshold, 0.5 points over the stable
    // the relative limit).
    let errors = canary(
        &mut f,
        "watch-prom-errors.toml",
        "[canary]\nsteps = [{ weight = 90, duration = \"4s\" }]\ninterval = \"4s\"\nmin_requests = 200\ninconclusive_windows = 5\n",
    );
    let slow = canary(
        &mut f,
        "watch-prom-slow.toml",
        "[canary]\ncompare = \"relative\"\nsteps = [{ weight = 50, duration = \"3s\" }]\ninterval = \"3s\"\nmin_requests = 1\ninconclusive_windows = 4\n",
    );
    let quiet = canary(
        &mut f,
        "watch-prom-quiet.toml",
        "[canary]\nsteps = [{ weight = 5, duration = \"2s\" }]\ninterval = \"2s\"\ninconclusive_windows = 2\n",
    );
    let (ok, out, err) = f.deploy(&steps, None);
    assert!(ok, "{out}{err}");

    let load = Load::start(&nginx.addr);
    let (ok, out, err) = f.deploy(&steps, Some(&v2));
    assert!(ok, "{out}{err}");
    assert!(out.contains("window passed (1/2)"), "{out}");
    assert!(out.contains("v2 promoted"), "{out}");
    assert!(nginx.get().contains("hello from v2"));

    let (ok, out, _) = f.deploy(&errors, Some(&v3));
    assert!(!ok);
    assert!(out.contains("cause: canary_errors"), "{out}");
    assert!(!out.contains("window passed"), "{out}");
    drop(load);
    assert!(nginx.get().contains("hello from v2"), "the stable serves again");

    let load = Load::start(&nginx.addr);
    let (ok, out, _) = f.deploy(&slow, Some(&v4));
    assert!(!ok);
    assert!(out.contains("cause: canary_latency"), "{out}");
    assert!(out.contains("canary p99 latency above 1.5 x the stable's"), "{out}");
    drop(load);

    // No traffic: Prometheus has no requests for the canary.
    let (ok, out, _) = f.deploy(&quiet, Some(&v5));
    assert!(!ok);
    assert!(out.contains("window inconclusive (2/2)"), "{out}");
    assert!(out.contains("cause: canary_inconclusive"), "{out}");
    assert!(!out.contains("promoted"), "{out}");
    assert!(nginx.get().contains("hello from v2"));

    // The guard's families, as Prometheus scraped them, and a shipped rule.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let value = |q: &str| prom.value(q).unwrap_or(-1.0);
    let q = |r: &str| format!(r#"berth_watch_canary_analyses_total{{service="watch-prom",result="{r}"}}"#);
    while value(&q("inconclusive")) < 2.0
        || value(r#"berth_watch_deploys_total{service="watch-prom",result="rolled_back"}"#) != 3.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            get(&metrics).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    assert!(value(&q("pass")) >= 3.0, "{}", get(&metrics).unwrap_or_default());
    assert!(value(&q("fail")) >= 2.0, "{}", get(&metrics).unwrap_or_default());
    assert_eq!(
        value(r#"instance:berth_watch_deploy_timeout_ratio:rate1h{region="eu"}"#),
        0.0,
        "the shipped recording rule evaluates on the guard's series"
    );
    let _ = guard.kill();
    let _ = guard.wait();
}

/// `berth watch deploy` killed with SIGKILL part-way: the next `status`
/// (after the switch: rolls back to the release that passed) or `deploy`
/// (before it: removes the orphan instances) finds the unfinished
/// deployment in the history, reconciles it and records it, and the
/// service is not refused; so does `berth watch run`; while a deployment
/// runs, another is refused with the pid that holds the service.
#[test]
fn watch_recovers_from_a_killed_deploy() {
    if !docker_available() {
        return;
    }
    let mut f = Fixture::new("crash");
    let v1 = f.image("v1", &[]);
    let v2 = f.image("v2", &[]);
    let never = f.image("v3", &["FAULT=unhealthy"]);
    let file = f.spec("crash", &v1, "");
    let long = f.dir.path().join("watch-crash-long.toml");
    std::fs::write(
        &long,
        std::fs::read_to_string(&file)
            .unwrap()
            .replace("verify = \"3s\"", "verify = \"60s\"")
            .replace("start_timeout = \"5s\"", "start_timeout = \"60s\""),
    )
    .unwrap();
    let (ok, out, err) = f.deploy(&file, None);
    assert!(ok, "{out}{err}");
    let d1 = f.digest_of(&v1);

    // Runs `deploy --image IMAGE` until its output has `step`, then SIGKILL.
    let kill_at = |image: &str, step: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("watch")
            .arg("--history")
            .arg(&f.history)
            .arg("deploy")
            .arg(&long)
            .args(["--image", image])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
        let mut seen = String::new();
        for line in lines {
            let line = line.unwrap();
            seen.push_str(&line);
            seen.push('\n');
            if line.contains(step) {
                break;
            }
        }
        assert!(seen.contains(step), "{seen}");
        child
    };

    // Killed after the switch, during the verify period.
    let mut child = kill_at(&v2, "verifying health for");
    let out = f.watch(&["deploy", long.to_str().unwrap(), "--image", &v1]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("is being deployed by berth process {}", child.id())),
        "a live deployment holds the service: {err}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let history = String::from_utf8_lossy(&f.watch(&["history", "watch-crash"]).stdout).into_owned();
    assert!(
        history.contains("#2 deploy") && history.contains("-> running"),
        "{history}"
    );
    let out = f.watch(&["status"]);
    let (status, err) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{status}{err}");
    assert!(err.contains("watch-crash #2 was interrupted"), "{err}");
    assert!(status.contains(&format!("watch-crash: active v1 ({d1})")), "{status}");
    assert!(status.contains("consecutive failed deployments: 0 of 3"), "{status}");
    let history = String::from_utf8_lossy(&f.watch(&["history", "watch-crash"]).stdout).into_owned();
    assert!(!history.contains("-> running"), "{history}");
    assert!(history.contains("-> rolled_back"), "{history}");
    assert!(
        history.contains("cause: interrupted: interrupted after the switch to v2; rolled back to v1 by digest"),
        "{history}"
    );
    let running = f.running("watch-crash");
    assert_eq!(running.len(), 1, "{running:?}");
    assert_eq!(running[0].1, format!("{}@{d1}", f.repo));
    assert!(f.health_of("watch-crash").contains(r#""image_version":"v1""#));

    // Killed before the switch: its instance is left running, an orphan.
    let mut child = kill_at(&never, "started watch-crash-3-");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(f.running("watch-crash").len(), 2, "the orphan runs beside v1");
    let (ok, out, err) = f.deploy(&file, Some(&v2));
    assert!(ok, "the next deployment is admitted at once: {out}{err}");
    let history = String::from_utf8_lossy(&f.watch(&["history", "watch-crash"]).stdout).into_owned();
    assert!(
        history.contains("#3 deploy") && history.contains("-> failure"),
        "{history}"
    );
    assert!(history.contains("removing watch-crash-3-"), "{history}");
    assert!(
        history.contains("cause: interrupted: interrupted before its version passed"),
        "{history}"
    );
    assert!(
        history.contains("#4 deploy") && history.contains("-> success"),
        "{history}"
    );
    let d2 = f.digest_of(&v2);
    let running = f.running("watch-crash");
    assert_eq!(running.len(), 1, "{running:?}");
    assert_eq!(running[0].1, format!("{}@{d2}", f.repo));

    // `berth watch run` reconciles one too, without any command.
    let (mut guard, _) = start_guard(&f);
    let mut child = kill_at(&never, "started watch-crash-5-");
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let h = String::from_utf8_lossy(&f.watch(&["history", "watch-crash"]).stdout).into_owned();
        if h.contains("#5 deploy") && !h.contains("-> running") {
            assert!(h.contains("removing watch-crash-5-"), "{h}");
            assert!(
                h.contains("started watch-crash-5-"),
                "what was printed is in the history: {h}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the guard did not reconcile: {h}");
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    let running = f.running("watch-crash");
    assert_eq!(running.len(), 1, "{running:?}");
    assert_eq!(running[0].1, format!("{}@{d2}", f.repo));
    let _ = guard.kill();
    let _ = guard.wait();
}

/// A single-node Swarm for one test: initialised on loopback if this Engine
/// is in none, and on drop the test's services removed (their containers
/// waited for) and the swarm left, with the bridge network it made.
struct Swarm {
    services: Vec<String>,
    initialised: bool,
    had_gwbridge: bool,
}

impl Swarm {
    fn join() -> Swarm {
        let state = sh(Command::new("docker").args(["info", "--format", "{{.Swarm.LocalNodeState}}"]));
        let had_gwbridge = Command::new("docker")
            .args(["network", "inspect", "docker_gwbridge"])
            .output()
            .is_ok_and(|o| o.status.success());
        let initialised = String::from_utf8_lossy(&state.stdout).trim() == "inactive";
        let swarm = Swarm {
            services: Vec::new(),
            initialised,
            had_gwbridge,
        };
        if initialised {
            sh(Command::new("docker").args(["swarm", "init", "--advertise-addr", "127.0.0.1"]));
        }
        swarm
    }

    /// What the service's spec runs now.
    fn image(&self, service: &str) -> String {
        let out = sh(Command::new("docker").args([
            "service",
            "inspect",
            "--format",
            "{{.Spec.TaskTemplate.ContainerSpec.Image}}",
            service,
        ]));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        for s in &self.services {
            let _ = Command::new("docker").args(["service", "rm", s]).output();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while std::time::Instant::now() < deadline {
                let out = Command::new("docker")
                    .args([
                        "ps",
                        "-aq",
                        "--filter",
                        &format!("label=com.docker.swarm.service.name={s}"),
                    ])
                    .output();
                if out.map_or(true, |o| o.stdout.iter().all(u8::is_ascii_whitespace)) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
        if self.initialised {
            let _ = Command::new("docker").args(["swarm", "leave", "--force"]).output();
            if !self.had_gwbridge {
                let _ = Command::new("docker")
                    .args(["network", "rm", "docker_gwbridge"])
                    .output();
            }
        }
    }
}

/// A real Swarm service: berth creates it, updates it by digest, and when
/// its own checks fail (a task that exits, a healthy answer from the wrong
/// version, no health within the start timeout) rolls the service back
/// itself, by digest, to the release that passed before (never to one the
/// guard rolled back from), and the old version serves again; three
/// failures in a row pause it; every rollback is counted.
#[test]
fn watch_swarm_service_rolled_back_by_berth() {
    if !docker_available() {
        return;
    }
    let mut f = Fixture::new("swarm");
    let v1 = f.image("v1", &[]);
    let v2 = f.image("v2", &[]);
    let exits = f.image("v3", &["FAULT=exit"]);
    let wrong = f.image("v4", &["REPORT_VERSION=v2"]);
    let decays = f.image("v5", &["UNHEALTHY_AFTER=6"]);
    let never = f.image("v6", &["FAULT=unhealthy"]);
    // Declared after the fixture: dropped first, before its images go.
    let mut swarm = Swarm::join();
    swarm.services.push("watch-swarm".into());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let file = f.spec("swarm", &v1, "backend = \"swarm\"");
    // The routing mesh needs IPVS, which these machines lack: each task
    // publishes on its node (`host`).
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("{ container = 80 }", &format!("{{ container = 80, host = {port} }}"))
        + "\n[swarm]\npublish_mode = \"host\"\nstop_grace_period = \"1s\"\n";
    std::fs::write(&file, text).unwrap();
    let health = format!("http://127.0.0.1:{port}/cgi-bin/healthz");

    let (ok, out, err) = f.deploy(&file, None);
    assert!(ok, "{out}{err}");
    assert!(out.contains("created Swarm service watch-swarm"), "{out}");
    let (ok, out, err) = f.deploy(&file, Some(&v2));
    assert!(ok, "{out}{err}");
    let d2 = f.digest_of(&v2);
    assert!(
        out.contains(&format!("updated Swarm service watch-swarm to {}@{d2}", f.repo)),
        "{out}"
    );
    assert_eq!(swarm.image("watch-swarm"), format!("{}@{d2}", f.repo));
    assert!(get(&health).unwrap().contains(r#""image_version":"v2""#));

    // `berth watch run` keeps checking: v5 passes its deployment, turns
    // unhealthy six seconds after its start, and the guard rolls the
    // service back to v2.
    let mut guard = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["watch", "--history"])
        .arg(&f.history)
        .args(["run", "--listen", "127.0.0.1:0"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (ok, out, err) = f.deploy(&file, Some(&decays));
    assert!(ok, "v5 passes its verify period: {out}{err}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while swarm.image("watch-swarm") != format!("{}@{d2}", f.repo) {
        assert!(std::time::Instant::now() < deadline, "the guard did not roll back");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let history = loop {
        let h = String::from_utf8_lossy(&f.watch(&["history", "watch-swarm"]).stdout).into_owned();
        if h.contains("#4 rollback") && !h.contains("-> running") {
            break h;
        }
        assert!(std::time::Instant::now() < deadline, "{h}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let _ = guard.kill();
    let _ = guard.wait();
    assert!(
        history.contains("rollback from v5 to v2 (guard: unhealthy"),
        "{history}"
    );
    assert!(
        get(&health).unwrap().contains(r#""image_version":"v2""#),
        "v2 serves again"
    );

    let (ok, out, _) = f.deploy(&file, Some(&exits));
    assert!(!ok, "{out}");
    assert!(out.contains("-> rolled_back"), "{out}");
    assert!(out.contains("cause: exited"), "{out}");
    assert!(
        out.contains("fault: exiting at once"),
        "the task's output is the evidence: {out}"
    );
    assert!(
        out.contains(&format!("rolling the Swarm service back to v2 ({d2})")),
        "{out}"
    );
    assert_eq!(swarm.image("watch-swarm"), format!("{}@{d2}", f.repo));
    assert!(
        get(&health).unwrap().contains(r#""image_version":"v2""#),
        "v2 serves again"
    );

    let (ok, out, _) = f.deploy(&file, Some(&wrong));
    assert!(!ok, "{out}");
    assert!(out.contains("-> rolled_back"), "{out}");
    assert!(
        out.contains(r#"cause: wrong_version: healthy, but reports image_version "v2" where "v4" was deployed"#),
        "{out}"
    );
    assert_eq!(swarm.image("watch-swarm"), format!("{}@{d2}", f.repo));
    assert!(
        get(&health).unwrap().contains(r#""image_version":"v2""#),
        "v2 serves again"
    );

    // A third failure in a row (a tag that does not exist) pauses it.
    let (ok, out, _) = f.deploy(&file, Some(&format!("{}:no-such-tag", f.repo)));
    assert!(!ok);
    assert!(out.contains("cause: tag_not_found"), "{out}");
    let (ok, _, err) = f.deploy(&file, Some(&v1));
    assert!(!ok && err.contains("berth watch resume watch-swarm"), "{err}");
    assert!(f.watch(&["resume", "watch-swarm"]).status.success());

    // Never healthy within the start timeout: a `timeout`, rolled back.
    let (ok, out, _) = f.deploy(&file, Some(&never));
    assert!(!ok, "{out}");
    assert!(out.contains("-> timeout"), "{out}");
    assert!(out.contains("cause: start_timeout"), "{out}");
    assert!(
        out.contains(&format!("rolling the Swarm service back to v2 ({d2})")),
        "{out}"
    );
    assert!(
        get(&health).unwrap().contains(r#""image_version":"v2""#),
        "v2 serves again"
    );

    // A service made outside berth, with no release that passed under
    // berth: a failed update goes back through Swarm's own previous spec.
    swarm.services.push("watch-swarm-ext".into());
    let port2 = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d1 = f.digest_of(&v1);
    sh(Command::new("docker").args([
        "service",
        "create",
        "--detach",
        "--no-resolve-image",
        "--name",
        "watch-swarm-ext",
        "--stop-grace-period",
        "1s",
        "--publish",
        &format!("mode=host,target=80,published={port2}"),
        &format!("{}@{d1}", f.repo),
    ]));
    let health2 = format!("http://127.0.0.1:{port2}/cgi-bin/healthz");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !get(&health2).is_some_and(|h| h.contains(r#""image_version":"v1""#)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the service made by hand did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let ext = f.spec("swarm-ext", &exits, "backend = \"swarm\"");
    let text = std::fs::read_to_string(&ext)
        .unwrap()
        .replace("{ container = 80 }", &format!("{{ container = 80, host = {port2} }}"))
        + "\n[swarm]\npublish_mode = \"host\"\nstop_grace_period = \"1s\"\n";
    std::fs::write(&ext, text).unwrap();
    let (ok, out, _) = f.deploy(&ext, None);
    assert!(!ok, "{out}");
    assert!(out.contains("-> rolled_back"), "{out}");
    assert!(out.contains("cause: exited"), "{out}");
    assert!(out.contains("Swarm's own rollback to the previous spec"), "{out}");
    assert!(out.contains("the previous spec serves again"), "{out}");
    assert_eq!(swarm.image("watch-swarm-ext"), format!("{}@{d1}", f.repo));
    assert!(
        get(&health2).unwrap().contains(r#""image_version":"v1""#),
        "v1 serves again"
    );

    let history = String::from_utf8_lossy(&f.watch(&["history", "watch-swarm"]).stdout).into_owned();
    for line in ["#5 deploy", "cause: exited", "cause: wrong_version", "v2 serves again"] {
        assert!(history.contains(line), "{line} in {history}");
    }

    // The guard's, exits, wrong_version and the timeout; Swarm's own.
    let (mut guard, metrics) = start_guard(&f);
    let m = get(&metrics).expect("metrics");
    let _ = guard.kill();
    let _ = guard.wait();
    for line in [
        r#"berth_watch_rollbacks_total{region="eu",service="watch-swarm"} 4"#,
        r#"berth_watch_deploys_total{region="eu",service="watch-swarm",result="timeout"} 1"#,
        r#"berth_watch_rollbacks_total{region="eu",service="watch-swarm-ext"} 1"#,
    ] {
        assert!(m.contains(line), "{line} in\n{m}");
    }
}
