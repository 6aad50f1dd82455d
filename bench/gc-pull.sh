#!/usr/bin/env bash
# Pull latency while garbage collection runs: berth (release build) serving
# `berth bench pull-image` with no GC (A), and with online GC running and
# busy with real garbage (B), alternated A/B/A/B.
#
#   bench/gc-pull.sh                 DUR=10 WARM=2 ROUNDS=2 REPOS=1000 GARBAGE=3400 CONNS=32
#   DUR=3 ROUNDS=1 bench/gc-pull.sh  a quick look
#   GC_ARGS="--gc-pause-ms 100" bench/gc-pull.sh   B with other GC options
#
# Each phase starts berth afresh on the same data directory (so both start
# with a cold manifest cache and the warm-up covers it):
#   A  berth serve --gc-interval 0                       (no GC at all)
#   B  berth serve --gc-interval 1 --gc-grace 1 --gc-untagged bench
# Before each B phase, GARBAGE seeded images of their own repositories
# (bench/gNNNNN, never pulled) lose their tag, so the B phase's GC runs remove
# GARBAGE untagged manifests and 3 x GARBAGE blob-store objects, in batches
# of --gc-batch with the default pause (the production throttle). The
# default GARBAGE is sized so that this keeps GC busy through the measured
# window on a 2-core machine; the script reports, from berth's log, which
# share of the measured window a GC run was actually in progress, and a B
# phase whose GC did not cover the window says so.
#
# The load is `berth bench pull-image` (manifest by tag, config, layer, every
# digest verified) on bench/r00000:latest, CONNS connections, closed loop
# (or RATE operations/s if set). Prints p50/p99/QPS of both and the B/A
# ratios; raw JSON, logs and the table go to $OUT. Not a test: it takes
# minutes and its numbers depend on the machine.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DUR=${DUR:-10}          # seconds measured per phase
WARM=${WARM:-2}         # warm-up seconds before each measurement
ROUNDS=${ROUNDS:-2}     # A/B alternations
REPOS=${REPOS:-1000}    # live repositories (bench/rNNNNN); r00000 is pulled
# Images untagged before each B phase (bench/gNNNNN): about 200 per second of warm-up and
# measurement, plus margin, as one GC run removed 2,000 in 10-15 s on a loaded 2-core machine.
GARBAGE=${GARBAGE:-$((200 * (DUR + WARM + 5)))}
CONNS=${CONNS:-32}
RATE=${RATE:-}          # constant rate (ops/s) instead of a closed loop
GC_ARGS=${GC_ARGS:-}    # more options for the B phase's berth, e.g. "--gc-pause-ms 100"
OUT=${OUT:-$ROOT/target/bench-gc-pull}
PORT=${PORT:-5611}

say() { printf '== %s (%s)\n' "$*" "$(date +%T)" >&2; }
for c in curl python3 cargo; do
    command -v "$c" >/dev/null || { echo "missing command: $c" >&2; exit 2; }
done

say "building berth (release)"
(cd "$ROOT" && cargo build --release --locked -p berth)
BERTH=$ROOT/target/release/berth

T=$(mktemp -d /tmp/berth-gc-pull.XXXXXX)
BERTH_PID=""
stop_berth() {
    [[ -n $BERTH_PID ]] || return 0
    kill "$BERTH_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$BERTH_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$BERTH_PID" 2>/dev/null || true
    wait "$BERTH_PID" 2>/dev/null || true
    BERTH_PID=""
}
cleanup() {
    stop_berth
    rm -rf "$T"
}
trap cleanup EXIT
rm -rf "$OUT" && mkdir -p "$OUT"
URL=http://127.0.0.1:$PORT

# start_berth LOG ARGS...: berth on the shared data directory, JSON logs.
start_berth() {
    local log=$1
    shift
    env -u BERTH_CONFIG BERTH_LOG=info BERTH_LOG_FORMAT=json \
        "$BERTH" serve --listen "127.0.0.1:$PORT" --data-dir "$T/data" "$@" >"$log" 2>&1 &
    BERTH_PID=$!
    for _ in $(seq 200); do
        curl -sf -o /dev/null "$URL/v2/" && return 0
        kill -0 "$BERTH_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "berth did not come up; see $log" >&2
    tail -5 "$log" >&2
    exit 1
}

# untag FIRST COUNT: delete the tag of bench/gFIRST.. (COUNT repositories), one connection.
untag() {
    local first=$1 count=$2 urls=() i
    for ((i = first; i < first + count; i++)); do
        urls+=("$URL/v2/$(printf 'bench/g%05d' "$i")/manifests/latest")
    done
    # -K with a config on stdin: thousands of URLs over one kept-alive connection.
    printf 'url = "%s"\n' "${urls[@]}" |
        curl -s -X DELETE -K - -o /dev/null -w '%{http_code}\n' >"$T/untag.codes"
    local bad
    bad=$(grep -vc '^202$' "$T/untag.codes" || true)
    if ((bad != 0)) || (($(wc -l <"$T/untag.codes") != count)); then
        echo "untagging bench/g$first..: $bad of $count deletes did not answer 202" >&2
        sort "$T/untag.codes" | uniq -c >&2
        exit 1
    fi
}

# measure NAME ROUND LOG: one pull-image run; its JSON in $OUT/NAME.ROUND.json and
# the measured window (epoch seconds) in $OUT/NAME.ROUND.window.
measure() {
    local name=$1 round=$2 f="$OUT/$1.$2.json" args=()
    [[ -z $RATE ]] || args+=(--rate "$RATE")
    local start
    start=$(date +%s.%N)
    # berth's CPU time (user + system, clock ticks) at the start and the end of the window.
    (
        sleep "$WARM"
        awk '{print $14 + $15}' "/proc/$BERTH_PID/stat"
        sleep "$DUR"
        awk '{print $14 + $15}' "/proc/$BERTH_PID/stat"
    ) >"$OUT/$name.$round.cpu" &
    local sampler=$!
    "$BERTH" bench pull-image --registry "$URL" --json -c "$CONNS" -d "${DUR}s" --warmup "${WARM}s" \
        --timeout 10s "${args[@]}" >"$f" 2>>"$OUT/bench.log"
    wait "$sampler"
    getconf CLK_TCK >>"$OUT/$name.$round.cpu"
    python3 -c "import sys; s=float(sys.argv[1]); print(s + $WARM, s + $WARM + $DUR)" "$start" >"$OUT/$name.$round.window"
    python3 - "$f" "$name" <<'PY' >&2
import json, sys
v = json.load(open(sys.argv[1]))
l = v["latency_ms"]
print(f"   {sys.argv[2]:<8} {v['qps']:>9.1f} pulls/s  p50 {l['p50']:>7.2f} ms  p99 {l['p99']:>7.2f} ms  ok {v['success_rate']:.2f}%")
PY
}

say "seeding: $REPOS live images, and $((ROUNDS * GARBAGE)) images to become garbage"
mkdir -p "$T/data"
start_berth "$OUT/seed.berth.log" --gc-interval 0 --access-log=false
"$BERTH" bench --registry "$URL" --seed "$REPOS" --connections 16 2>>"$OUT/seed.log"
# Another layer size than the live images', so no garbage layer is shared with a live image
# (seeded layer contents depend only on the index and the size).
"$BERTH" bench --registry "$URL" --seed "$((ROUNDS * GARBAGE))" --seed-prefix bench/g --seed-layer-size 4KiB \
    --connections 16 2>>"$OUT/seed.log"
cat "$OUT/seed.log" >&2
stop_berth
# The grace window (1 s) must have passed since the garbage was pushed.
sleep 2

for r in $(seq "$ROUNDS"); do
    say "round $r: A, no GC"
    start_berth "$OUT/A.$r.berth.log" --gc-interval 0
    measure A "$r"
    say "round $r: untagging $GARBAGE images (bench/g$(((r - 1) * GARBAGE))..)"
    untag $(((r - 1) * GARBAGE)) "$GARBAGE"
    stop_berth
    sleep 1.5 # past the grace window

    say "round $r: B, GC every second, $GARBAGE untagged images to collect"
    # shellcheck disable=SC2086 # GC_ARGS is a list of options
    start_berth "$OUT/B.$r.berth.log" --gc-interval 1 --gc-grace 1 --gc-untagged bench $GC_ARGS
    measure B "$r"
    # Let the GC run in progress at the window's end finish (at most 2 min), so its log
    # line, with its duration, is there for the table.
    for _ in $(seq 240); do
        python3 "$ROOT/bench/gc_pull_table.py" --covered "$OUT" B "$r" && break
        sleep 0.5
    done
    stop_berth
done

say "results"
python3 "$ROOT/bench/gc_pull_table.py" "$OUT" | tee "$OUT/table.md"
{
    echo
    echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
    echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "berth $(git -C "$ROOT" rev-parse --short HEAD)"
    echo "command: DUR=$DUR WARM=$WARM ROUNDS=$ROUNDS REPOS=$REPOS GARBAGE=$GARBAGE CONNS=$CONNS${RATE:+ RATE=$RATE}${GC_ARGS:+ GC_ARGS=\"$GC_ARGS\"} bench/gc-pull.sh"
} | tee -a "$OUT/table.md"
