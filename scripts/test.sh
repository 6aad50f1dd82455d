#!/usr/bin/env bash
# Runs every test berth has: formatting, lints, unit and integration tests
# (which start the real binary), and the real-client tests (docker, skopeo,
# buildah, podman, containerd, oras, python-dxf), and the observability
# tests (Prometheus rules, Alertmanager, a real Prometheus scraping berth:
# tests/observability/run.sh). Installs what the tests
# need first (idempotent). Exits non-zero if anything fails.
#
#   scripts/test.sh            everything
#   SKIP_CLIENTS=1 scripts/test.sh   without the real-client tests
#   FUZZ_SECONDS=30 scripts/test.sh  also fuzz each target for 30 s (an
#                                    instrumented build of ~7 min on 2 cores;
#                                    the seeds are replayed by the unit tests
#                                    either way: crates/api/tests/fuzz_seeds.rs)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

section() { printf '\n=== %s (%s)\n' "$*" "$(date +%T)"; }
start=$(date +%s)

section "installing test dependencies"
scripts/install-test-deps.sh

section "cargo fmt --check"
cargo fmt --all -- --check

# --all-features on both lines: the optional backends (PostgreSQL, berth watch's
# Kubernetes backend) are
# linted and tested too, and both lines build the workspace with the same
# features, so it is built once.
section "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

section "unit and integration tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --all-features --locked --no-fail-fast
else
    cargo test --workspace --all-features --locked --no-fail-fast
fi

section "observability: promtool, amtool, Alertmanager and Prometheus"
[[ -x target/debug/berth ]] || cargo build --locked --all-features --bin berth
BERTH_BIN="$ROOT/target/debug/berth" tests/observability/run.sh

if [[ ${SKIP_CLIENTS:-0} != 1 ]]; then
    section "real-client tests"
    # The integration tests above built target/debug/berth; building it again
    # alone would only recompile dependencies with other features.
    [[ -x target/debug/berth ]] || cargo build --locked --all-features --bin berth
    BERTH_BIN="$ROOT/target/debug/berth" tests/clients/run.sh
fi

if [[ -n ${FUZZ_SECONDS:-} ]]; then
    # Every parser that takes client input, for a bounded time each; a
    # crash fails the run (scripts/fuzz.sh prints how to reproduce it).
    section "fuzzing ($FUZZ_SECONDS s per target)"
    FUZZ_SANITIZER=none scripts/fuzz.sh "$FUZZ_SECONDS"
fi

section "all tests passed in $(($(date +%s) - start)) s"
