//! A private PostgreSQL cluster for tests: `initdb` into a temporary
//! directory, `postgres` on a free loopback port, removed on drop. Public so
//! the berth binary's integration tests use the same one.
//!
//! PostgreSQL refuses to run as root: as root, the cluster runs as the
//! `postgres` account (Debian's package creates it).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TestCluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    /// (uid, gid) to run as, when this process is root.
    user: Option<(u32, u32)>,
    server: Option<Child>,
}

/// The user name the cluster is initialised with (trust authentication).
pub const USER: &str = "berth";

/// Where the server binaries are: `$BERTH_PG_BIN`, else Debian's
/// `/usr/lib/postgresql/<newest>/bin`, else `initdb` on the `PATH`.
fn find_bin() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("BERTH_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).find(|d| d.join("initdb").exists() && d.join("postgres").exists()))
}

/// The `postgres` account's (uid, gid), from /etc/passwd.
fn postgres_account() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd.lines().find(|l| l.starts_with("postgres:"))?;
    let f: Vec<&str> = line.split(':').collect();
    Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
}

/// Whether the effective uid is 0 (`Uid:` of /proc/self/status: real,
/// effective, saved, filesystem).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Uid:"))?.to_string();
            line.split_whitespace().nth(2).map(|e| e == "0")
        })
        .unwrap_or(false)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl TestCluster {
    /// Starts a cluster. Where PostgreSQL is not installed: panics under CI
    /// (`CI=true`), else prints why the test is skipped and returns `None`.
    pub fn start() -> Option<TestCluster> {
        let Some(bin) = find_bin() else {
            let msg = "PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin, $BERTH_PG_BIN or \
                       the PATH); install it with scripts/install-test-deps.sh";
            if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
                panic!("{msg}");
            }
            eprintln!("\n*** SKIPPED: {msg} ***\n");
            return None;
        };
        let user = if running_as_root() {
            Some(postgres_account().expect("running as root, and there is no postgres account to run PostgreSQL as"))
        } else {
            None
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("berth-pg-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the cluster directory");
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("hand the cluster directory to postgres");
        }
        let mut cluster = TestCluster {
            dir,
            bin,
            port: 0,
            user,
            server: None,
        };
        let out = cluster
            .command("initdb")
            .args([
                "-D",
                "data",
                "-U",
                USER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // A port another process takes between choosing and binding makes
        // the server exit: choose again.
        for _ in 0..3 {
            cluster.port = free_port();
            if cluster.start_server() {
                return Some(cluster);
            }
        }
        panic!("PostgreSQL did not start; its log:\n{}", cluster.log());
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        c.current_dir(&self.dir).env_remove("PGDATA").env_remove("PGHOST");
        if let Some((uid, gid)) = self.user {
            c.uid(uid).gid(gid);
        }
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    /// Starts the server (again, after `stop_server`) on the cluster's port.
    /// Returns whether it accepts connections within 30 s.
    pub fn start_server(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("postgres.log"))
            .expect("open the server log");
        if let Some((uid, gid)) = self.user {
            let _ = std::os::unix::fs::chown(self.dir.join("postgres.log"), Some(uid), Some(gid));
        }
        let port = self.port.to_string();
        let sockets = self.dir.to_string_lossy().into_owned();
        let child = self
            .command("postgres")
            .args(["-D", "data", "-p", &port, "-k", &sockets])
            // Loopback only; no fsync (these clusters are thrown away); no
            // autovacuum, whose transactions would hold GC's snapshot back
            // at random.
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "autovacuum=off",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("run postgres");
        self.server = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.server.as_mut().map(|c| c.try_wait()) {
                self.server = None;
                return false;
            }
            let ready = self
                .command("pg_isready")
                .args(["-q", "-h", "127.0.0.1", "-p", &port, "-U", USER, "-d", "postgres"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Stops the server (fast shutdown: open connections are cut).
    pub fn stop_server(&mut self) {
        let Some(mut child) = self.server.take() else { return };
        let _ = self
            .command("pg_ctl")
            .args(["-D", "data", "stop", "-m", "fast", "-w", "-t", "30"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(child.try_wait(), Ok(Some(_))) {
            let _ = child.kill();
        }
        let _ = child.wait();
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates an empty database and returns its URL.
    pub async fn create_database(&self, name: &str) -> String {
        let (client, conn) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
            .await
            .expect("connect to the test cluster");
        let task = tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create the test database");
        drop(client);
        let _ = task.await;
        self.url(name)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.stop_server();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
