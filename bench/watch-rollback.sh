#!/usr/bin/env bash
# berth watch: time from a fault to its detection, and to a completed
# rollback, on the real Docker Engine.
#
#   bench/watch-rollback.sh            ROUNDS=3 INTERVAL=1s THRESHOLD=3 FAULT_AFTER=3
#
# A berth registry on a free loopback port holds two test images
# (crates/berth/tests/watch_image/, `docker import` of busybox-static): v1
# healthy, v2 healthy for FAULT_AFTER seconds after its start, then 503.
# Each round deploys v1, then v2; v2 passes its gate, is switched to, and
# fails during the verify period; berth rolls back to v1 by digest. From the
# deployment's timeline (`berth watch history`):
#   fault      = v2's start + FAULT_AFTER
#   detection  = the check that reached the threshold
#   rollback   = v1 Running, healthy and serving alone (the finished event)
# The earliest a detection can be is fault + (THRESHOLD - 1) x INTERVAL (the
# first failed check right at the fault); the issue's target is a detection
# within 2 health intervals after that, and a rollback under 30 s.
# Not a test: the numbers depend on the machine.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BERTH=${BERTH:-$ROOT/target/debug/berth}
ROUNDS=${ROUNDS:-3}
INTERVAL=${INTERVAL:-1s}
THRESHOLD=${THRESHOLD:-3}
FAULT_AFTER=${FAULT_AFTER:-3}
DIR=$(mktemp -d /tmp/watch-bench.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
REPO=127.0.0.1:$PORT/watch-bench
export BERTH_WATCH_HISTORY=$DIR/history.redb

cleanup() {
    docker ps -aq --filter label=berth.watch.service=watch-bench | xargs -r docker rm -f >/dev/null
    docker images -q "$REPO" | sort -u | xargs -r docker rmi -f >/dev/null 2>&1 || true
    [[ -n ${SERVE_PID:-} ]] && kill "$SERVE_PID" 2>/dev/null
    rm -rf "$DIR"
}
trap cleanup EXIT

"$BERTH" serve --listen 127.0.0.1:$PORT --data-dir "$DIR/data" 2>"$DIR/serve.log" &
SERVE_PID=$!
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$PORT/v2/" >/dev/null && break; sleep 0.1; done

mkdir -p "$DIR/root/bin" "$DIR/root/www/cgi-bin" "$DIR/root/tmp"
cp /bin/busybox "$DIR/root/bin/"
for t in sh date cat; do ln -s busybox "$DIR/root/bin/$t"; done
cp "$ROOT/crates/berth/tests/watch_image/entry.sh" "$DIR/root/"
cp "$ROOT/crates/berth/tests/watch_image/healthz" "$ROOT/crates/berth/tests/watch_image/app" "$DIR/root/www/cgi-bin/"
tar -C "$DIR/root" -cf "$DIR/rootfs.tar" .
image() { # TAG [ENV...]
    local tag=$1 args=(); shift
    for e in "$@"; do args+=(--change "ENV $e"); done
    docker import --change 'ENTRYPOINT ["/bin/sh","/entry.sh"]' --change "ENV VERSION=$tag" "${args[@]}" \
        "$DIR/rootfs.tar" "$REPO:$tag" >/dev/null
    docker push -q "$REPO:$tag" >/dev/null
    docker rmi "$REPO:$tag" >/dev/null
}
image v1
image v2 "UNHEALTHY_AFTER=$FAULT_AFTER"

cat >"$DIR/watch-bench.toml" <<TOML
name = "watch-bench"
image = "$REPO:v1"
ports = [{ container = 80 }]

[health]
port = 80
path = "/cgi-bin/healthz"
interval = "$INTERVAL"
threshold = $THRESHOLD

[rollout]
start_timeout = "30s"
verify = "60s"
failure_limit = 1000
TOML

for r in $(seq "$ROUNDS"); do
    "$BERTH" watch deploy "$DIR/watch-bench.toml" >/dev/null 2>&1
    "$BERTH" watch deploy "$DIR/watch-bench.toml" --image "$REPO:v2" >"$DIR/round$r.txt" 2>/dev/null || true
done

python3 - "$DIR" "$ROUNDS" "$INTERVAL" "$THRESHOLD" "$FAULT_AFTER" <<'PY'
import datetime, re, sys
d, rounds, interval, threshold, fault_after = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
iv = float(interval[:-2]) / 1000 if interval.endswith("ms") else float(interval.rstrip("s"))
def t(line):
    return datetime.datetime.strptime(line.split()[0], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()
print(f"interval {iv}s, threshold {threshold}, fault {fault_after}s after the start")
print("round  fault->detection  beyond the earliest possible  detection->rolled back")
for r in range(1, rounds + 1):
    lines = [l.strip() for l in open(f"{d}/round{r}.txt") if re.match(r"\s+\d{4}-", l)]
    started = next(t(l) for l in lines if " started watch-bench-" in l)
    detected = next(t(l) for l in lines if f"({threshold}/{threshold})" in l)
    done = next(t(l) for l in lines if "finished: rolled_back" in l)
    fault = started + fault_after
    print(f"{r:>5}  {detected - fault:>15.2f}s  {detected - fault - (threshold - 1) * iv:>27.2f}s  {done - detected:>21.2f}s")
PY
