#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time each. Installs
# cargo-fuzz if it is missing (idempotent). Every target `cargo fuzz list`
# reports is run, so a new target needs no change here.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]      default 30
#   FUZZ_TARGETS="digest route" scripts/fuzz.sh 60      only these targets
#   FUZZ_SANITIZER=none scripts/fuzz.sh       no ASan: faster, for safe-Rust-only code
#
# Seeds in fuzz/seeds/<target>/ (committed) are copied into the working
# corpus fuzz/corpus/<target>/ (ignored), which keeps growing between runs.
# Crashes land in fuzz/artifacts/<target>/; libFuzzer's output is kept in
# fuzz/target/fuzz-logs/<target>.log. Exits non-zero if any target crashed,
# hung, ran out of memory or did not build. The last line is
# `fuzz: N passed, N failed`.
set -uo pipefail

secs=${1:-30}
if ! [[ $secs =~ ^[0-9]+$ ]] || ((secs == 0)); then
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FUZZ="$ROOT/fuzz"
cd "$FUZZ"

# libFuzzer needs unstable rustc flags (-Zsanitizer, sanitizer coverage);
# RUSTC_BOOTSTRAP lets the stable toolchain accept them.
export RUSTC_BOOTSTRAP=1
sanitizer=${FUZZ_SANITIZER:-address}
build_flags=(--sanitizer "$sanitizer")
rss_limit_mb=2048
timeout_s=10 # one input running longer than this is a hang, and fails

# Longest input libFuzzer generates, per target; the default suits parsers of
# short strings. Manifests are JSON documents, so they get more room.
max_len_for() {
    case $1 in
    manifest) echo 65536 ;;
    *) echo 4096 ;;
    esac
}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

if [[ -n ${FUZZ_TARGETS:-} ]]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    mapfile -t targets < <(cargo fuzz list)
fi
if ((${#targets[@]} == 0)); then
    echo "fuzz: no targets found in $FUZZ" >&2
    echo "fuzz: 0 passed, 1 failed"
    exit 1
fi

echo "fuzz: building ${targets[*]} (sanitizer: $sanitizer)"
build_start=$(date +%s)
if ! cargo fuzz build "${build_flags[@]}"; then
    echo "fuzz: the fuzz workspace did not build" >&2
    echo "fuzz: 0 passed, ${#targets[@]} failed"
    exit 1
fi
echo "fuzz: built in $(($(date +%s) - build_start)) s"

logs="$FUZZ/target/fuzz-logs"
mkdir -p "$logs"
passed=0
failed=0
failed_names=()

for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    if [[ -d seeds/$t ]]; then
        cp -n "seeds/$t"/* "corpus/$t/" 2>/dev/null || true
    fi
    args=(
        -max_total_time="$secs"
        -rss_limit_mb="$rss_limit_mb"
        -max_len="$(max_len_for "$t")"
        -timeout="$timeout_s"
        -print_final_stats=1
    )
    [[ -f dicts/$t.dict ]] && args+=(-dict="dicts/$t.dict")

    log="$logs/$t.log"
    echo "fuzz: running $t for ${secs}s (log: $log)"
    cargo fuzz run "${build_flags[@]}" "$t" -- "${args[@]}" >"$log" 2>&1
    rc=$?

    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "$log" | tail -1)
    summary="${execs:-?} execs (${rate:-?}/s), ${cov:-no coverage line}, corpus files $(find "corpus/$t" -type f | wc -l)"

    if ((rc == 0)); then
        echo "fuzz: $t passed: $summary"
        passed=$((passed + 1))
        continue
    fi
    failed=$((failed + 1))
    failed_names+=("$t")
    echo "fuzz: $t FAILED (exit $rc): $summary"
    # The panic message and libFuzzer's verdict.
    grep -E "panicked at|^thread '|SUMMARY:|ERROR: libFuzzer|==ERROR" -A2 "$log" | head -20 | sed 's/^/    /'
    mapfile -t found < <(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log")
    if ((${#found[@]} == 0)); then
        echo "    no artifact written; see $log"
    fi
    for a in "${found[@]}"; do
        a=$(cd "$FUZZ" && realpath -m "$a")
        echo "    artifact: $a"
        echo "    hint: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz tmin $t $a), then add its bytes (xxd -p) as a unit test in the crate that panicked; see fuzz/README.md"
    done
done

((failed > 0)) && echo "fuzz: failed targets: ${failed_names[*]}"
echo "fuzz: $passed passed, $failed failed"
((failed == 0))
