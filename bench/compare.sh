#!/usr/bin/env bash
# Side-by-side benchmark: berth (release build) against CNCF distribution
# (Debian's docker-registry), with nginx serving the very same bytes as static
# files as the ceiling, and `openssl dgst -sha256` as the hashing reference.
#
#   bench/compare.sh                 about 10 minutes on 2 cores
#   DUR=5 ROUNDS=1 bench/compare.sh  a quick look
#
# Every target is measured with the same generator (`berth bench`), scenario
# by scenario, alternating berth / distribution / nginx ROUNDS times (each
# round starting with the next target) so that machine noise hits all of them
# alike. Results (raw JSON per run, and the table) go to $OUT. Not part of the
# tests: it takes minutes and needs root for apt-get.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DUR=${DUR:-10}          # seconds measured per scenario, per target, per round
WARM=${WARM:-2}         # warm-up seconds before each measurement
ROUNDS=${ROUNDS:-2}     # A/B/A/B alternations
REPOS=${REPOS:-1000}    # repositories of small images
BIG=${BIG:-1GiB}        # the one big layer
CONNS=${CONNS:-400}
OUT=${OUT:-$ROOT/target/bench-compare}
P_BERTH=${P_BERTH:-5601} P_DIST=${P_DIST:-5602} P_NGINX=${P_NGINX:-5603}

say() { printf '== %s (%s)\n' "$*" "$(date +%T)" >&2; }

say "installing docker-registry, nginx-light, openssl (idempotent)"
need=()
for p in docker-registry nginx-light openssl curl python3; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if ((${#need[@]})); then
    apt-get update -qq -o DPkg::Lock::Timeout=300
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 "${need[@]}" >/dev/null
fi

say "building berth (release)"
(cd "$ROOT" && cargo build --release --locked --bin berth)
BERTH=$ROOT/target/release/berth

T=$(mktemp -d /tmp/berth-compare.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$T"
}
trap cleanup EXIT
rm -rf "$OUT" && mkdir -p "$OUT"

wait_up() { # url
    for _ in $(seq 100); do
        curl -sf -o /dev/null "$1/v2/" && return 0
        sleep 0.1
    done
    echo "$1 did not come up; see $OUT/*.log" >&2
    exit 1
}

say "starting berth and distribution on empty directories"
"$BERTH" serve --listen 127.0.0.1:$P_BERTH --data-dir "$T/berth" >"$OUT/berth.log" 2>&1 &
BERTH_PID=$!
PIDS+=($BERTH_PID)
# Debian's default config turns on htpasswd; this one is distribution's
# defaults on a temporary directory (logging at its default level).
cat >"$T/distribution.yml" <<YML
version: 0.1
storage: { filesystem: { rootdirectory: $T/distribution }, delete: { enabled: true } }
http: { addr: 127.0.0.1:$P_DIST }
YML
docker-registry serve "$T/distribution.yml" >"$OUT/distribution.log" 2>&1 &
DIST_PID=$!
PIDS+=($DIST_PID)
BERTH_URL=http://127.0.0.1:$P_BERTH DIST_URL=http://127.0.0.1:$P_DIST NGINX_URL=http://127.0.0.1:$P_NGINX
wait_up "$BERTH_URL"
wait_up "$DIST_URL"

say "seeding both: $REPOS repositories of small images, and one image with a $BIG layer"
for url in "$BERTH_URL" "$DIST_URL"; do
    "$BERTH" bench --registry "$url" --seed "$REPOS" --connections 16 2>>"$OUT/seed.log"
    "$BERTH" bench --registry "$url" --seed 1 --seed-prefix bench/big --seed-layer-size "$BIG" 2>>"$OUT/seed.log"
done
cat "$OUT/seed.log" >&2

say "laying out the same bytes for nginx"
# The registry paths, as files, so one generator and one set of scenarios
# serve all three targets. Query strings are ignored by nginx's static files.
W=$T/www
accept='application/vnd.oci.image.manifest.v1+json'
mkdir -p "$W/v2/bench/r00000/manifests" "$W/v2/bench/big00000/manifests" "$W/v2/bench/big00000/blobs"
echo '{}' >"$W/v2/index.html"
curl -sf -H "Accept: $accept" "$BERTH_URL/v2/bench/r00000/manifests/latest" -o "$W/v2/bench/r00000/manifests/latest"
curl -sf -H "Accept: $accept" "$BERTH_URL/v2/bench/big00000/manifests/latest" -o "$W/v2/bench/big00000/manifests/latest"
curl -sf "$BERTH_URL/v2/_catalog?n=100" -o "$W/v2/_catalog"
LAYER=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["layers"][0]["digest"])' "$W/v2/bench/big00000/manifests/latest")
BLOB=$T/berth/blobs/sha256/${LAYER:7:2}/${LAYER:7}
# A hard link: the very file berth serves, so the page cache is shared too.
ln "$BLOB" "$W/v2/bench/big00000/blobs/$LAYER"
cat >"$T/nginx.conf" <<NGX
user root;
worker_processes auto;
pid $T/nginx.pid;
error_log $OUT/nginx-error.log;
events { worker_connections 4096; }
http {
    access_log $T/nginx-access.log;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$P_NGINX;
        root $W;
        location /v2/ { default_type application/octet-stream; }
        location ~ /manifests/ { default_type $accept; }
        location = /v2/_catalog { default_type application/json; }
    }
}
NGX
nginx -c "$T/nginx.conf" -p "$T" -g 'daemon off;' &
PIDS+=($!)
wait_up "$NGINX_URL"

say "openssl dgst -sha256 on the $BIG layer (best of 3, file in page cache)"
cat "$BLOB" >/dev/null
best=999999
for _ in 1 2 3; do
    s=$(date +%s.%N)
    openssl dgst -sha256 "$BLOB" >/dev/null
    e=$(date +%s.%N)
    best=$(python3 -c "print(min($best, $e - $s))")
done
python3 -c "import os,json; n=os.path.getsize('$BLOB'); print(json.dumps({'seconds': $best, 'bytes': n, 'mb_per_s': n/1e6/$best}))" >"$OUT/openssl.json"
cat "$OUT/openssl.json" >&2

# run NAME TARGET URL ARGS...: one measurement, its JSON in $OUT/NAME.TARGET.ROUND.json
run() {
    local name=$1 target=$2 url=$3 round=$4
    shift 4
    local f="$OUT/$name.$target.$round.json"
    if ! "$BERTH" bench --registry "$url" --json "$@" >"$f" 2>>"$OUT/bench.log"; then
        echo "{\"scenario\": \"$name\", \"run_failed\": true}" >"$f"
    fi
    python3 - "$f" "$name" "$target" <<'PY' >&2
import json, sys
v = json.load(open(sys.argv[1]))
if v.get("run_failed"):
    print(f"   {sys.argv[2]:<16} {sys.argv[3]:<13} run failed (see bench.log)")
else:
    print(f"   {sys.argv[2]:<16} {sys.argv[3]:<13} {v['qps']:>10.1f} req/s {v['mb_per_s']:>9.1f} MB/s  "
          f"p99 {v['latency_ms']['p99']:>8.2f} ms  ok {v['success_rate']:.2f}%")
PY
}

# rotated ROUND TARGETS...: the targets, starting with a different one each
# round, so that whatever favours the first (or last) of a round, such as the
# page cache or the CPU's clock after a pause, does not always favour the same.
rotated() {
    local r=$1
    shift
    local n=$# i
    for ((i = 0; i < n; i++)); do
        local k=$(((i + r - 1) % n + 1))
        printf '%s ' "${!k}"
    done
}

url_of() {
    case $1 in berth) echo "$BERTH_URL" ;; distribution) echo "$DIST_URL" ;; nginx) echo "$NGINX_URL" ;; esac
}

# small NAME TARGETS ARGS...: the small-response scenarios, 400 connections.
# A 2 s timeout, as wrk's default, so "success" means what it meant in the guide.
small() {
    local name=$1 targets=$2
    shift 2
    say "$name"
    for r in $(seq "$ROUNDS"); do
        for t in $(rotated "$r" $targets); do
            run "$name" "$t" "$(url_of "$t")" "$r" -c "$CONNS" -d "${DUR}s" --warmup "${WARM}s" --timeout 2s "$@"
        done
    done
}

# Peak RSS counts from here: seeding is not part of the measured load.
echo 5 >/proc/$BERTH_PID/clear_refs
echo 5 >/proc/$DIST_PID/clear_refs

small manifest-get "berth distribution nginx" manifest-get
small manifest-head "berth distribution nginx" manifest-head
small catalog-page "berth distribution nginx" catalog-page --page-size 100
small catalog "berth distribution" catalog

hwm() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
echo "{\"berth_kib\": $(hwm $BERTH_PID), \"distribution_kib\": $(hwm $DIST_PID)}" >"$OUT/rss.json"
cat "$OUT/rss.json" >&2

say "blob-get: the $BIG layer, 4 connections"
for r in $(seq "$ROUNDS"); do
    for t in $(rotated "$r" berth distribution nginx); do
        run blob-get "$t" "$(url_of "$t")" "$r" blob-get --image bench/big00000:latest -c 4 -d "${DUR}s" --timeout 120s
    done
done

say "push: $BIG monolithic, 1 connection, 2 pushes"
for r in $(seq "$ROUNDS"); do
    for t in $(rotated "$r" berth distribution); do
        run push "$t" "$(url_of "$t")" "$r" push --layer-size "$BIG" -c 1 -n 2 -d 120s --timeout 120s
    done
done
echo "{\"berth_kib\": $(hwm $BERTH_PID), \"distribution_kib\": $(hwm $DIST_PID)}" >"$OUT/rss-all.json"

say "results"
python3 "$ROOT/bench/table.py" "$OUT" | tee "$OUT/table.md"
{
    echo
    echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
    echo "berth $(git -C "$ROOT" rev-parse --short HEAD), $(docker-registry --version 2>/dev/null | head -1), $(nginx -v 2>&1), $(openssl version)"
    echo "command: DUR=$DUR WARM=$WARM ROUNDS=$ROUNDS REPOS=$REPOS BIG=$BIG CONNS=$CONNS bench/compare.sh"
} | tee -a "$OUT/table.md"
