//! `berth fsck` and `berth du` through the binary, on a stopped registry.

mod common;

use std::process::{Command, Stdio};

use common::*;

fn berth(data: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .env_remove("BERTH_DATA_DIR")
        .stdin(Stdio::null())
        .output()
        .expect("run berth");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn du_counts_shared_layers_and_fsck_finds_and_repairs_damage() {
    let mut s = Server::start_with(&["--gc-interval", "0"]);
    let c = client();
    // The same image in two repositories of one project: stored once.
    let m = push_image(&c, &s, "lib/one", "v1", 5).await;
    push_image(&c, &s, "lib/two", "v1", 5).await;
    assert!(s.terminate());

    let (ok, out, err) = berth(s.data(), &["du"]);
    assert!(ok, "{err}");
    let config_len = "{\"architecture\":\"amd64\",\"os\":\"linux\",\"seed\":5}".len() as u64;
    // Everything of one repository is saved: layer, config and manifest.
    let per_repo = 1000 + config_len;
    assert!(out.contains("lib/one") && out.contains("lib/two"), "{out}");
    assert!(
        out.contains(&format!("saved {} bytes", per_repo + manifest_len(&m, &s))),
        "{out}"
    );

    // `berth project usage` counts the project's shared content once, as quotas do.
    let (ok, out, err) = berth(s.data(), &["project", "usage", "lib"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), format!("lib\t{} bytes", per_repo + manifest_len(&m, &s)));

    let (ok, out, err) = berth(s.data(), &["fsck"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("checked 3 blobs") && out.contains(": 0 problems"), "{out}");

    // Damage the layer.
    let layer = sha256(&bytes(5, 1000));
    let hex = layer.trim_start_matches("sha256:");
    std::fs::write(s.data().join("blobs/sha256").join(&hex[..2]).join(hex), b"rotten").unwrap();
    let (ok, out, err) = berth(s.data(), &["fsck"]);
    assert!(!ok);
    assert!(out.contains(&format!("blob {layer} is corrupt")), "{out}");
    assert!(err.contains("berth fsck --repair"), "{err}");
    // Repair drops the corrupt blob; the manifests that need it remain, and
    // are reported for their owners to push again.
    let (ok, out, err) = berth(s.data(), &["fsck", "--repair"]);
    assert!(!ok);
    assert!(out.contains("1 repairs"), "{out}");
    assert!(err.contains("not safe to repair"), "{err}");
    let (_, out, _) = berth(s.data(), &["fsck"]);
    assert!(!out.contains("is corrupt"), "{out}");
    assert!(
        out.contains(&format!("manifest {m} of lib/one references blob {layer}")),
        "{out}"
    );
}

/// The size of manifest `m`, read from the data directory.
fn manifest_len(m: &str, s: &Server) -> u64 {
    let hex = m.trim_start_matches("sha256:");
    std::fs::metadata(s.data().join("blobs/sha256").join(&hex[..2]).join(hex))
        .unwrap()
        .len()
}

/// A manifest whose stored bytes were overwritten is reported as corrupt,
/// with the digest it should have and the one its bytes have, not as missing.
#[tokio::test]
async fn fsck_reports_corrupt_manifest_bytes_as_corrupt() {
    let mut s = Server::start_with(&["--gc-interval", "0"]);
    let c = client();
    let m = push_image(&c, &s, "lib/rot", "v1", 6).await;
    assert!(s.terminate());
    let hex = m.trim_start_matches("sha256:");
    let other = b"{\"not\":\"the manifest pushed, and longer than it was before the damage\"}";
    std::fs::write(s.data().join("blobs/sha256").join(&hex[..2]).join(hex), other).unwrap();
    let (ok, out, err) = berth(s.data(), &["fsck"]);
    assert!(!ok, "{out}{err}");
    let actual = sha256(other);
    assert!(
        out.contains(&format!(
            "manifest {m} of lib/rot is corrupt: expected digest {m}, its bytes hash to {actual}"
        )),
        "{out}"
    );
    assert!(!out.contains("bytes are missing"), "{out}");
}
