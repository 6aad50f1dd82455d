//! The command line: help, configuration precedence, and the refusal to
//! expose an unauthenticated registry.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn berth() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_berth"));
    for v in [
        "BERTH_LISTEN",
        "BERTH_DATA_DIR",
        "BERTH_CONFIG",
        "BERTH_INSECURE_ALLOW_ANONYMOUS",
    ] {
        c.env_remove(v);
    }
    c.stdin(Stdio::null());
    c
}

/// Runs `berth serve` and reports whether it came up (then stops it) or
/// exited, with its stderr.
fn serve(mut cmd: Command) -> (bool, String) {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("berth is serving") {
            let _ = child.kill();
            let _ = child.wait();
            return (true, text);
        }
        if let Ok(Some(_)) = child.try_wait() {
            return (false, std::fs::read_to_string(&log).unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "berth neither served nor exited: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn help_documents_every_option() {
    let out = berth().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--config",
        "--listen",
        "--data-dir",
        "--sparse-index",
        "--max-manifest-size",
        "--manifest-cache-size",
        "--shutdown-timeout",
        "--insecure-allow-anonymous",
        "--log",
        "--log-format",
        "--access-log",
        "--metrics-listen",
        "--health-interval",
        "--health-failures",
        "--min-free-disk",
        "--drain-delay",
        "--event-source",
        "[[webhooks]]",
        "BERTH_LISTEN",
        "BERTH_DATA_DIR",
        "BERTH_METRICS_LISTEN",
    ] {
        assert!(help.contains(opt), "serve --help lacks {opt}:\n{help}");
    }
}

#[test]
fn flags_beat_environment_which_beats_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let public_file = tmp.path().join("public.toml");
    std::fs::write(&public_file, "listen = \"0.0.0.0:0\"\n").unwrap();
    let loopback_file = tmp.path().join("loopback.toml");
    std::fs::write(&loopback_file, "listen = \"127.0.0.1:0\"\n").unwrap();

    // The file alone: a public address is refused, with what to do instead.
    let mut c = berth();
    c.args(["serve", "--config"])
        .arg(&public_file)
        .arg("--data-dir")
        .arg(&data);
    let (up, log) = serve(c);
    assert!(!up);
    assert!(
        log.contains("refusing to listen on 0.0.0.0:0") && log.contains("--insecure-allow-anonymous"),
        "{log}"
    );

    // The environment beats the file.
    let mut c = berth();
    c.args(["serve", "--config"])
        .arg(&public_file)
        .arg("--data-dir")
        .arg(&data);
    c.env("BERTH_LISTEN", "127.0.0.1:0");
    assert!(serve(c).0, "BERTH_LISTEN should override the file");

    let mut c = berth();
    c.args(["serve", "--config"])
        .arg(&loopback_file)
        .arg("--data-dir")
        .arg(&data);
    c.env("BERTH_LISTEN", "0.0.0.0:0");
    assert!(!serve(c).0, "BERTH_LISTEN should override the file");

    // The flag beats the environment.
    let mut c = berth();
    c.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"]).arg(&data);
    c.env("BERTH_LISTEN", "0.0.0.0:0");
    assert!(serve(c).0, "--listen should override BERTH_LISTEN");

    // BERTH_DATA_DIR is honoured.
    let env_data = tmp.path().join("env-data");
    let mut c = berth();
    c.args(["serve", "--listen", "127.0.0.1:0"])
        .env("BERTH_DATA_DIR", &env_data);
    assert!(serve(c).0);
    assert!(env_data.join("meta.redb").exists());

    // The explicit opt-in allows a public bind.
    let mut c = berth();
    c.args([
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--insecure-allow-anonymous",
        "--data-dir",
    ])
    .arg(&data);
    assert!(serve(c).0);
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("bad.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\nlisten_addr = 1\n").unwrap();
    let out = berth().args(["serve", "--config"]).arg(&file).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen_addr") && err.contains("bad.toml"), "{err}");
    // A second berth on the same data directory is refused, not corrupted.
    let data = tmp.path().join("data");
    let first_log = tmp.path().join("first.log");
    let mut first = berth()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .stderr(std::fs::File::create(&first_log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !std::fs::read_to_string(&first_log)
        .unwrap_or_default()
        .contains("berth is serving")
    {
        assert!(Instant::now() < deadline, "first berth did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut c = berth();
    c.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"]).arg(&data);
    let (up, log) = serve(c);
    let _ = first.kill();
    let _ = first.wait();
    assert!(!up);
    assert!(log.contains("another berth"), "{log}");
}
