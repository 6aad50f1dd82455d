//! `berth watch` against Kubernetes (feature `kubernetes`). No API server
//! can run on these machines, so the test runs a fake one on loopback: it
//! serves API objects written from the Kubernetes API reference's shapes
//! (tests/fixtures/kubernetes/: a Deployment before, during and after a
//! rollout, its ReplicaSets, the new ReplicaSet's pods in each failure state
//! and their events), moves the Deployment on as the PATCHes arrive, and
//! records every PATCH. The real binary, with a kubeconfig that points at
//! it, must classify each failure and send exactly the patches expected.
#![cfg(feature = "kubernetes")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

const V1: &str = "127.0.0.1:1/shop/web@sha256:1111111111111111111111111111111111111111111111111111111111111111";
const V2: &str = "127.0.0.1:1/shop/web@sha256:2222222222222222222222222222222222222222222222222222222222222222";

fn fixture(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kubernetes")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// One PATCH as received.
#[derive(Debug, Clone)]
struct Patch {
    content_type: String,
    query: String,
    body: Value,
}

#[derive(Default)]
struct State {
    /// The pods fixture the new ReplicaSet shows (`ready` or a failure;
    /// `slow`: ready pods, but a rollout that never finishes).
    case: String,
    /// 0 at revision 1 (V1), 1 rolling out V2, 3 back at V1 after an undo.
    phase: u8,
    paused: bool,
    patches: Vec<Patch>,
    /// Requests without the kubeconfig's token.
    unauthenticated: u32,
}

impl State {
    /// The case whose pods and events fixtures are served.
    fn pods(&self) -> &str {
        match self.case.as_str() {
            "slow" => "ready",
            c => c,
        }
    }
}

struct FakeApi {
    url: String,
    state: Arc<Mutex<State>>,
    _thread: std::thread::JoinHandle<()>,
}

impl FakeApi {
    fn start() -> FakeApi {
        use axum::extract::State as S;
        use axum::http::{HeaderMap, Method, StatusCode, Uri};
        let state = Arc::new(Mutex::new(State::default()));
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let handler = |S(st): S<Arc<Mutex<State>>>,
                               method: Method,
                               uri: Uri,
                               headers: HeaderMap,
                               body: axum::body::Bytes| async move {
                    let mut s = st.lock().unwrap();
                    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer test-token") {
                        s.unauthenticated += 1;
                    }
                    let path = uri.path();
                    let query = uri.query().unwrap_or_default().to_string();
                    let deployment = |s: &State| {
                        let mut d = match (s.phase, s.case.as_str()) {
                            (0, _) => fixture("deployment-v1.json"),
                            (1, "ready") => fixture("deployment-v2-complete.json"),
                            (1, _) => fixture("deployment-v2-progressing.json"),
                            _ => fixture("deployment-v1-restored.json"),
                        };
                        if s.paused {
                            d["spec"]["paused"] = json!(true);
                        }
                        d
                    };
                    let answer = match (method.as_str(), path) {
                        ("GET", "/apis/apps/v1/namespaces/shop/deployments/web") => deployment(&s),
                        ("PATCH", "/apis/apps/v1/namespaces/shop/deployments/web") => {
                            let content_type = headers
                                .get("content-type")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_string();
                            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            match content_type.as_str() {
                                "application/strategic-merge-patch+json" => {
                                    let image = &body["spec"]["template"]["spec"]["containers"][0]["image"];
                                    s.phase = match (image.as_str(), s.phase) {
                                        // V1 where V1 runs changes nothing.
                                        (Some(V1), 0) => 0,
                                        (Some(V1), _) => 3,
                                        _ => 1,
                                    };
                                }
                                "application/merge-patch+json" => {
                                    s.paused = body["spec"]["paused"].as_bool().unwrap_or(s.paused)
                                }
                                "application/json-patch+json" => {
                                    s.phase = 3;
                                    s.paused = false;
                                }
                                _ => {}
                            }
                            s.patches.push(Patch {
                                content_type,
                                query,
                                body,
                            });
                            deployment(&s)
                        }
                        ("GET", "/apis/apps/v1/namespaces/shop/replicasets") => fixture("replicasets.json"),
                        ("GET", "/api/v1/namespaces/shop/pods") if query.contains("pod-template-hash%3D5f4d8c7b9") => {
                            fixture(&format!("pods-{}.json", s.pods()))
                        }
                        ("GET", "/api/v1/namespaces/shop/pods") => {
                            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []})
                        }
                        ("GET", "/api/v1/namespaces/shop/events") => fixture(&format!("events-{}.json", s.pods())),
                        _ => {
                            return (
                                StatusCode::NOT_FOUND,
                                axum::Json(json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                    "message": format!("the fake API server has no {method} {path}"),
                                    "reason": "NotFound", "code": 404})),
                            )
                        }
                    };
                    (StatusCode::OK, axum::Json(answer))
                };
                let app = axum::Router::new().fallback(handler).with_state(st);
                let listener = tokio::net::TcpListener::from_std(l).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        FakeApi {
            url,
            state,
            _thread: thread,
        }
    }

    fn reset(&self, case: &str) {
        let mut s = self.state.lock().unwrap();
        *s = State {
            case: case.to_string(),
            ..State::default()
        };
    }

    /// Changes what the pods show, keeping the rollout where it is.
    fn set_case(&self, case: &str) {
        self.state.lock().unwrap().case = case.to_string();
    }

    fn patches(&self) -> Vec<Patch> {
        self.state.lock().unwrap().patches.clone()
    }

    fn clear_patches(&self) {
        self.state.lock().unwrap().patches.clear();
    }
}

struct Fixture {
    api: FakeApi,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    history: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let api = FakeApi::start();
        let dir = tempfile::Builder::new().prefix("watch-k8s-").tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: tester\n    namespace: shop\ncurrent-context: fake\nusers:\n- name: tester\n  user:\n    token: test-token\n",
                api.url
            ),
        )
        .unwrap();
        let history = dir.path().join("history.redb");
        Fixture {
            api,
            dir,
            kubeconfig,
            history,
        }
    }

    /// `berth watch deploy` of V2 as `service` (a name per case: no run of
    /// failures pauses the next) to the fake cluster.
    fn deploy(&self, service: &str, extra: &str) -> (bool, String, String) {
        self.deploy_image(service, V2, "v2", extra)
    }

    fn deploy_image(&self, service: &str, image: &str, version: &str, extra: &str) -> (bool, String, String) {
        let file = self.dir.path().join(format!("{service}.toml"));
        std::fs::write(
            &file,
            format!(
                "name = \"{service}\"\nimage = \"{image}\"\nversion = \"{version}\"\nbackend = \"kubernetes\"\n\n[rollout]\nstart_timeout = \"5s\"\nverify = \"1s\"\n\n[kubernetes]\nnamespace = \"shop\"\ndeployment = \"web\"\n{extra}"
            ),
        )
        .unwrap();
        self.watch(&["deploy", file.to_str().unwrap()])
    }

    /// `berth watch ARGS` with the kubeconfig of the fake cluster:
    /// (succeeded, stdout, stderr).
    fn watch(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(["watch", "--history"])
            .arg(&self.history)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

fn image_patch() -> Value {
    json!({"spec": {"template": {"spec": {"containers": [{"name": "web", "image": V2}]}}}})
}

/// The undo: revision 1's pod template without its `pod-template-hash`,
/// and the rollout resumed.
fn undo_patch() -> Value {
    let rs = fixture("replicasets.json");
    let mut template = rs["items"][0]["spec"]["template"].clone();
    assert_eq!(template["spec"]["containers"][0]["image"], V1);
    let meta = template["metadata"].as_object_mut().unwrap();
    meta["labels"].as_object_mut().unwrap().remove("pod-template-hash");
    // The API server writes `creationTimestamp: null` in templates; the
    // typed object berth reads it into has no null to send back.
    meta.remove("creationTimestamp");
    json!([
        {"op": "replace", "path": "/spec/template", "value": template},
        {"op": "replace", "path": "/spec/paused", "value": false},
    ])
}

fn assert_patches(got: &[Patch], want: &[(&str, Value)], out: &str) {
    let got_pairs: Vec<(&str, &Value)> = got.iter().map(|p| (p.content_type.as_str(), &p.body)).collect();
    let want_pairs: Vec<(&str, &Value)> = want.iter().map(|(c, v)| (*c, v)).collect();
    assert_eq!(got_pairs, want_pairs, "{out}");
    for p in got {
        assert!(p.query.contains("fieldManager=berth-watch"), "{p:?}");
    }
}

#[test]
fn watch_kubernetes_classifies_pods_pauses_and_rolls_back() {
    let f = Fixture::new();

    // A rollout whose new pods become ready: one patch, a success.
    f.api.reset("ready");
    let (ok, out, err) = f.deploy("k8s-ready", "");
    assert!(ok, "{out}{err}");
    assert!(out.contains("-> success"), "{out}");
    assert!(
        out.contains("rollout done: 2 of 2 replicas updated, 2 available"),
        "{out}"
    );
    assert_patches(
        &f.api.patches(),
        &[("application/strategic-merge-patch+json", image_patch())],
        &out,
    );

    // Each failure state of the new ReplicaSet's pod: classified with the
    // kubelet's or the scheduler's words, paused, rolled back.
    for (case, cause, evidence) in [
        (
            "ImagePullBackOff",
            "tag_not_found",
            "container web: ImagePullBackOff: Failed to pull image",
        ),
        ("ErrImagePull", "registry_unreachable", "connect: connection refused"),
        (
            "CrashLoopBackOff",
            "restarting",
            "back-off 40s restarting failed container=web",
        ),
        (
            "CreateContainerConfigError",
            "container_config",
            "secret \"web-db\" not found",
        ),
        ("Unschedulable", "unschedulable", "2 Insufficient cpu"),
    ] {
        f.api.reset(case);
        let (ok, out, _) = f.deploy(&format!("k8s-{}", case.to_lowercase()), "");
        assert!(!ok, "{case}: {out}");
        assert!(out.contains("-> rolled_back"), "{case}: {out}");
        assert!(out.contains(&format!("cause: {cause}: ")), "{case}: {out}");
        assert!(out.contains(evidence), "{case}: {out}");
        assert!(
            out.contains("paused the rollout of Deployment shop/web (spec.paused)"),
            "{out}"
        );
        assert!(
            out.contains("restored the pod template of ReplicaSet web-6b7c9d8f5 (revision 1"),
            "{out}"
        );
        assert!(out.contains("revision 1 serves again"), "{out}");
        assert_patches(
            &f.api.patches(),
            &[
                ("application/strategic-merge-patch+json", image_patch()),
                ("application/merge-patch+json", json!({"spec": {"paused": true}})),
                ("application/json-patch+json", undo_patch()),
            ],
            &out,
        );
    }

    // `on_failure = "pause"`: paused, not rolled back.
    f.api.reset("CrashLoopBackOff");
    let (ok, out, _) = f.deploy("k8s-hold", "on_failure = \"pause\"\n");
    assert!(!ok);
    assert!(out.contains("-> failure"), "{out}");
    assert!(out.contains("cause: restarting"), "{out}");
    assert_patches(
        &f.api.patches(),
        &[
            ("application/strategic-merge-patch+json", image_patch()),
            ("application/merge-patch+json", json!({"spec": {"paused": true}})),
        ],
        &out,
    );
    assert_eq!(
        f.api.state.lock().unwrap().unauthenticated,
        0,
        "every request carried the token"
    );

    // A description for Kubernetes is validated like any other.
    let bad = f.dir.path().join("k8s-bad.toml");
    std::fs::write(
        &bad,
        "name = \"k8s-bad\"\nimage = \"r/web:v1\"\nbackend = \"kubernetes\"\n[kubernetes]\nnamespace = \"Shop Floor\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["watch", "--history"])
        .arg(&f.history)
        .arg("deploy")
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "{}:5: `kubernetes.namespace`: \"Shop Floor\" is not a valid name",
            bad.display()
        )),
        "{err}"
    );
}

/// `berth watch rollback` of a Deployment: from v2 back to v1, the release
/// that passed before, by restoring the pod template of v1's ReplicaSet in
/// one JSON patch; the history records it, v2 is no longer a rollback
/// target, and a `timeout` that was rolled back counts as a rollback in
/// `berth_watch_rollbacks_total`.
#[test]
fn watch_kubernetes_rollback_restores_the_previous_template() {
    let f = Fixture::new();
    f.api.reset("ready");
    let (ok, out, err) = f.deploy_image("k8s-undo", V1, "v1", "");
    assert!(ok && out.contains("-> success"), "{out}{err}");
    let (ok, out, err) = f.deploy_image("k8s-undo", V2, "v2", "");
    assert!(ok && out.contains("-> success"), "{out}{err}");
    let (_, status, _) = f.watch(&["status"]);
    assert!(status.contains("k8s-undo: active v2 (sha256:2222"), "{status}");
    assert!(status.contains("rollback target: v1 (sha256:1111"), "{status}");

    f.api.clear_patches();
    let (ok, out, err) = f.watch(&["rollback", "k8s-undo"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("rollback from v2 to v1"), "{out}");
    assert!(
        out.contains("restored the pod template of ReplicaSet web-6b7c9d8f5 (revision 1"),
        "{out}"
    );
    assert!(out.contains("rollout done: 2 of 2 replicas updated"), "{out}");
    assert_patches(&f.api.patches(), &[("application/json-patch+json", undo_patch())], &out);
    let (_, history, _) = f.watch(&["history", "k8s-undo"]);
    assert!(
        history.contains(&format!("#3 rollback {V1} ")) && history.contains("-> success"),
        "{history}"
    );
    assert!(
        history.contains("rolling back: restored the pod template of ReplicaSet web-6b7c9d8f5"),
        "{history}"
    );
    let (_, status, _) = f.watch(&["status"]);
    assert!(status.contains("k8s-undo: active v1 (sha256:1111"), "{status}");
    assert!(
        !status.contains("rollback target: v2"),
        "the release rolled back from is no target: {status}"
    );

    // Never rolled out within the start timeout, and rolled back: a
    // `timeout`, and a rollback.
    f.api.reset("slow");
    let (ok, out, _) = f.deploy("k8s-slow", "");
    assert!(!ok, "{out}");
    assert!(out.contains("-> timeout"), "{out}");
    assert!(out.contains("cause: start_timeout: not rolled out within 5s"), "{out}");
    assert!(out.contains("revision 1 serves again"), "{out}");
    assert_patches(
        &f.api.patches(),
        &[
            ("application/strategic-merge-patch+json", image_patch()),
            ("application/merge-patch+json", json!({"spec": {"paused": true}})),
            ("application/json-patch+json", undo_patch()),
        ],
        &out,
    );

    let mut guard = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["watch", "--history"])
        .arg(&f.history)
        .args(["run", "--listen", "127.0.0.1:0"])
        .env("KUBECONFIG", &f.kubeconfig)
        .env("BERTH_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(guard.stderr.take().unwrap()));
    let first = lines.next().unwrap().unwrap();
    let url = first.split("metrics on ").nth(1).expect(&first).trim().to_string();
    std::thread::spawn(move || lines.for_each(drop));
    let metrics = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async { reqwest::get(&url).await.unwrap().text().await.unwrap() });
    let _ = guard.kill();
    let _ = guard.wait();
    for line in [
        r#"berth_watch_rollbacks_total{service="k8s-undo"} 1"#,
        r#"berth_watch_rollbacks_total{service="k8s-slow"} 1"#,
        r#"berth_watch_deploys_total{service="k8s-slow",result="timeout"} 1"#,
        r#"berth_watch_deploys_total{service="k8s-slow",result="rolled_back"} 0"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
}

#[test]
fn the_guard_rolls_back_a_deployment_whose_pods_start_failing() {
    // `berth watch run` watches the active release's pods: a crash loop
    // seen in `health.threshold` consecutive checks rolls the Deployment
    // back to the release before.
    let f = Fixture::new();
    f.api.reset("ready");
    let health = "\n[health]\ninterval = \"200ms\"\nthreshold = 2\n";
    let (ok, out, err) = f.deploy_image("k8s-guard", V1, "v1", health);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = f.deploy_image("k8s-guard", V2, "v2", health);
    assert!(ok, "{out}{err}");
    f.api.clear_patches();
    f.api.set_case("CrashLoopBackOff");
    let mut guard = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["watch", "--history"])
        .arg(&f.history)
        .args(["run", "--listen", "127.0.0.1:0"])
        .env("KUBECONFIG", &f.kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    // Done when v1 is active again (the rollback has finished, not just begun).
    loop {
        let (_, st, _) = f.watch(&["status"]);
        if st.contains("k8s-guard: active v1") || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (_, history, _) = f.watch(&["history", "k8s-guard"]);
    let _ = guard.kill();
    let _ = guard.wait();
    assert!(history.contains(&format!("#3 rollback {V1} ")), "{history}");
    assert!(history.contains("guard: restarting"), "{history}");
    assert_patches(
        &f.api.patches(),
        &[("application/json-patch+json", undo_patch())],
        &history,
    );
    let (_, status, _) = f.watch(&["status"]);
    assert!(status.contains("k8s-guard: active v1 (sha256:1111"), "{status}");
}
