//! Every fuzz target's checks (`fuzz/checks/<target>.rs`) run on its
//! committed seeds (`fuzz/seeds/<target>/`, which include the crashes found
//! so far) and on any crash files a local fuzzing run left
//! (`fuzz/artifacts/<target>/`), in the normal test build: a regression of a
//! parser fails here without the instrumented build of `scripts/fuzz.sh`.

use std::path::{Path, PathBuf};

mod challenge {
    include!("../../../fuzz/checks/challenge.rs");
}
mod digest {
    include!("../../../fuzz/checks/digest.rs");
}
mod manifest {
    include!("../../../fuzz/checks/manifest.rs");
}
mod reference {
    include!("../../../fuzz/checks/reference.rs");
}
mod route {
    // The checks name the crates as the fuzz workspace does: `api`, and
    // `http` (which reaches this crate through axum).
    use axum::http;
    use berth_api as api;
    include!("../../../fuzz/checks/route.rs");
}
mod traceparent {
    include!("../../../fuzz/checks/traceparent.rs");
}
mod token {
    use axum::http;
    use berth_api as api;
    include!("../../../fuzz/checks/token.rs");
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// Runs `check` on every seed and crash file of `target`; fails if there
/// are no seeds (a renamed directory must not make this pass vacuously).
fn replay(target: &str, check: fn(&[u8])) {
    let seeds = fuzz_dir().join("seeds");
    let mut files = Vec::new();
    for dir in [seeds.clone(), fuzz_dir().join("artifacts")] {
        let Ok(entries) = std::fs::read_dir(dir.join(target)) else {
            continue;
        };
        files.extend(entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()));
    }
    files.sort();
    assert!(
        files.iter().any(|f| f.starts_with(&seeds)),
        "no seeds for fuzz target {target} in {}",
        seeds.display()
    );
    for f in &files {
        let data = std::fs::read(f).unwrap();
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            panic!("fuzz target {target} fails on {}", f.display());
        }
    }
}

#[test]
fn challenge_seeds() {
    replay("challenge", challenge::check);
}

#[test]
fn digest_seeds() {
    replay("digest", digest::check);
}

#[test]
fn manifest_seeds() {
    replay("manifest", manifest::check);
}

#[test]
fn reference_seeds() {
    replay("reference", reference::check);
}

#[test]
fn route_seeds() {
    replay("route", route::check);
}

#[test]
fn token_seeds() {
    replay("token", token::check);
}

#[test]
fn traceparent_seeds() {
    replay("traceparent", traceparent::check);
}

/// Each target in fuzz/Cargo.toml has its replay above.
#[test]
fn every_fuzz_target_is_replayed() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    let replayed = [
        "challenge",
        "digest",
        "manifest",
        "reference",
        "route",
        "token",
        "traceparent",
    ];
    for line in manifest.lines() {
        if let Some(name) = line.strip_prefix("name = \"").and_then(|l| l.strip_suffix('"')) {
            assert!(
                name == "berth-fuzz" || replayed.contains(&name),
                "fuzz target {name} has no seed replay in {}",
                file!()
            );
        }
    }
}
