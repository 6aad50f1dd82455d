#!/usr/bin/env bash
# Pull-through cache benchmark: berth (release build) caching a Debian `docker-registry` (CNCF
# distribution 2.8) upstream, everything on loopback.
#
#   bench/proxy.sh                               LAYERS=3 LAYER_MIB=30 ROUNDS=5: about 30 s once built
#   LAYERS=3 LAYER_MIB=10 ROUNDS=3 bench/proxy.sh   a quick look
#
# The image (LAYERS layers of LAYER_MIB MiB of random bytes each, built with umoci) is pushed to
# the upstream, and into a local, non-cache project of a second ("warm") berth. The pull client is
# `skopeo copy docker://... dir:<fresh temp dir>`. Measured A/B, alternating which side goes
# first, ROUNDS times:
#   (a) cold: a pull through a berth started on a fresh data dir (started and ready before the
#       clock starts) vs a pull directly from the upstream;
#   (b) warm: a pull of the cached image (hub/bench/app) vs a pull of the same image pushed into a
#       local project (local/bench/app), both from the warm berth.
# Prints a table of medians and ratios (targets: cold <= 1.1x direct, warm <= 1.0x local).
# Results (raw timings, logs, table) go to $OUT. Not a test: it needs root (apt-get, unshare).
#
# Environment: LAYERS, LAYER_MIB, ROUNDS, OUT (default target/bench-proxy),
#   BERTH_BIN (default: build and use target/release/berth).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAYERS=${LAYERS:-3}
LAYER_MIB=${LAYER_MIB:-30}
ROUNDS=${ROUNDS:-5}
OUT=${OUT:-$ROOT/target/bench-proxy}

say() { printf '== %s (%s)\n' "$*" "$(date +%T)" >&2; }
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

need=()
for p in docker-registry skopeo umoci curl python3 jq; do
    command -v "$p" >/dev/null 2>&1 || need+=("$p")
done
if ((${#need[@]})); then
    say "installing ${need[*]}"
    apt-get update -qq -o DPkg::Lock::Timeout=300
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 "${need[@]}" >/dev/null
fi

if [[ -z ${BERTH_BIN:-} ]]; then
    say "building berth (release)"
    (cd "$ROOT" && cargo build --release -p berth)
    BERTH_BIN=$ROOT/target/release/berth
fi
BERTH_BIN=$(readlink -f "$BERTH_BIN")

T=$(mktemp -d /tmp/berth-bench-proxy.XXXXXX)
UP_PID="" WARM_PID="" COLD_PID=""
stop() { # pid
    [[ -n $1 ]] || return 0
    kill "$1" 2>/dev/null || return 0
    for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$1" 2>/dev/null || true
}
cleanup() {
    stop "$COLD_PID"
    stop "$WARM_PID"
    stop "$UP_PID"
    rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
rm -rf "$OUT" && mkdir -p "$OUT"
echo "load at start: $(uptime)" | tee "$OUT/load.txt" >&2

# containers/image keeps a blob-info cache in /var/lib/containers/cache for root: give skopeo a
# private /var/lib (mount namespace) so that runs do not share it with the host or each other.
mkdir -p "$T/varlib"
echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$T/policy.json"
# shellcheck disable=SC2016
if unshare -m --propagation private -- sh -c 'mount --bind "$0" /var/lib' "$T/varlib" 2>/dev/null; then
    sko() { unshare -m --propagation private -- sh -c 'mount --bind "$0" /var/lib && exec "$@"' "$T/varlib" \
        skopeo --policy "$T/policy.json" "$@"; }
else
    echo "note: unshare -m not permitted; skopeo uses the host's blob-info cache" >&2
    sko() { skopeo --policy "$T/policy.json" "$@"; }
fi

wait_up() { # url pid log
    for _ in $(seq 200); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1/v2/" || true) == 200 ]] && return 0
        kill -0 "$2" 2>/dev/null || { tail -5 "$3" >&2; echo "$1 exited during startup" >&2; exit 1; }
        sleep 0.1
    done
    echo "$1 did not answer GET /v2/ within 20 s; see $3" >&2
    exit 1
}

say "starting the upstream docker-registry"
UP=127.0.0.1:$(free_port)
mkdir -p "$T/upstream"
cat >"$T/upstream.yml" <<YML
version: 0.1
log: { level: info, accesslog: { disabled: true } }
storage: { filesystem: { rootdirectory: $T/upstream }, delete: { enabled: true } }
http: { addr: $UP }
YML
# distribution reads REGISTRY_* variables as configuration overrides.
unset_env=()
for v in $(compgen -e); do [[ $v != REGISTRY_* ]] || unset_env+=(-u "$v"); done
env "${unset_env[@]}" docker-registry serve "$T/upstream.yml" >"$OUT/upstream.log" 2>&1 &
UP_PID=$!
wait_up "http://$UP" "$UP_PID" "$OUT/upstream.log"

# start_berth warm|cold DATA-DIR: berth with upstream "hub" = the docker-registry; sets
# WARM_PID/COLD_PID and S_PORT.
start_berth() {
    local name=$1 data=$2 port
    port=$(free_port)
    mkdir -p "$data"
    cat >"$T/berth-$name.toml" <<TOML
listen = "127.0.0.1:$port"
data_dir = "$data"
log_format = "json"

[[upstreams]]
name = "hub"
url = "http://$UP"
TOML
    env -u BERTH_CONFIG -u BERTH_LISTEN -u BERTH_DATA_DIR "$BERTH_BIN" serve --config "$T/berth-$name.toml" \
        >>"$OUT/berth-$name.log" 2>&1 &
    local pid=$!
    if [[ $name == warm ]]; then WARM_PID=$pid; else COLD_PID=$pid; fi
    wait_up "http://127.0.0.1:$port" "$pid" "$OUT/berth-$name.log"
    S_PORT=$port
}

say "building the image: $LAYERS layers of $LAYER_MIB MiB random bytes"
L=$T/layout
umoci init --layout "$L"
umoci new --image "$L:v1"
for i in $(seq "$LAYERS"); do
    mkdir -p "$T/rootfs$i"
    head -c "$((LAYER_MIB << 20))" /dev/urandom >"$T/rootfs$i/data$i.bin"
    umoci insert --image "$L:v1" "$T/rootfs$i" "/layer$i"
    rm -rf "$T/rootfs$i"
done
umoci config --image "$L:v1" --architecture amd64 --os linux
D=$(jq -r '.manifests[0].digest' "$L/index.json")
BYTES=$(jq '[.config.size] + [.layers[].size] | add' "$L/blobs/sha256/${D#sha256:}")
echo "manifest $D, $BYTES bytes of blobs" >&2

say "seeding the upstream and the warm berth's local project"
sko copy --dest-tls-verify=false "oci:$L:v1" "docker://$UP/bench/app:v1" >&2
start_berth warm "$T/berth-warm"
WARM=127.0.0.1:$S_PORT
sko copy --dest-tls-verify=false "oci:$L:v1" "docker://$WARM/local/bench/app:v1" >&2
rm -rf "$L"

# pull NAME REF: one timed `skopeo copy` to a fresh dir:, checked; appends seconds to $OUT/NAME.txt
pull() {
    local name=$1 ref=$2 dest=$T/pull s e
    rm -rf "$dest"
    s=$(date +%s.%N)
    sko copy --src-tls-verify=false "docker://$ref" "dir:$dest" >/dev/null
    e=$(date +%s.%N)
    [[ $(sha256sum "$dest/manifest.json" | cut -d' ' -f1) == "${D#sha256:}" ]] ||
        { echo "pull of $ref gave another manifest" >&2; exit 1; }
    rm -rf "$dest"
    python3 -c "print(f'{$e - $s:.4f}')" | tee -a "$OUT/$name.txt" | sed "s/^/   $name: /" >&2
}

say "warming the cache of the warm berth (one pull through it)"
pull warmup "$WARM/hub/bench/app:v1"

# (a) cold: fresh berth data dir per round vs direct from the upstream
cold_round() {
    start_berth cold "$T/berth-cold-$1"
    pull cold_berth "127.0.0.1:$S_PORT/hub/bench/app:v1"
    stop "$COLD_PID"
    COLD_PID=""
    rm -rf "$T/berth-cold-$1"
}
say "(a) cold pulls: through a fresh berth vs directly from the upstream, $ROUNDS rounds"
for r in $(seq "$ROUNDS"); do
    if ((r % 2)); then
        pull cold_direct "$UP/bench/app:v1"
        cold_round "$r"
    else
        cold_round "$r"
        pull cold_direct "$UP/bench/app:v1"
    fi
done

say "(b) warm pulls: cached project vs local project on the same berth, $ROUNDS rounds"
up_before=$(grep -c 'msg="response completed' "$OUT/upstream.log" || true)
for r in $(seq "$ROUNDS"); do
    if ((r % 2)); then
        pull warm_cache "$WARM/hub/bench/app:v1"
        pull warm_local "$WARM/local/bench/app:v1"
    else
        pull warm_local "$WARM/local/bench/app:v1"
        pull warm_cache "$WARM/hub/bench/app:v1"
    fi
done
up_after=$(grep -c 'msg="response completed' "$OUT/upstream.log" || true)
echo "upstream requests during the warm pulls: $((up_after - up_before))" | tee "$OUT/warm-upstream.txt" >&2
echo "load at end: $(uptime)" | tee -a "$OUT/load.txt" >&2

say "results"
python3 - "$OUT" "$BYTES" "$ROUNDS" "$LAYERS" "$LAYER_MIB" <<'PY' | tee "$OUT/table.md"
import statistics, sys
out, nbytes, rounds, layers, mib = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
def load(n):
    return [float(x) for x in open(f"{out}/{n}.txt").read().split()]
rows = [("cold", "cold_berth", "cold_direct", "through a fresh berth", "direct from the upstream", 1.1),
        ("warm", "warm_cache", "warm_local", "cached project", "local project", 1.0)]
print(f"image: {layers} layers x {mib} MiB random ({nbytes / 2**20:.1f} MiB of blobs), {rounds} rounds, "
      "skopeo copy to a fresh dir:\n")
print("| pull | A | A median s (min–max) | A MB/s | B | B median s (min–max) | B MB/s | A/B (medians) | target | met |")
print("|---|---|---:|---:|---|---:|---:|---:|---:|---|")
for name, a, b, an, bn, target in rows:
    ta, tb = load(a), load(b)
    ma, mb = statistics.median(ta), statistics.median(tb)
    ratio = ma / mb
    print(f"| {name} | {an} | {ma:.2f} ({min(ta):.2f}–{max(ta):.2f}) | {nbytes / 1e6 / ma:.0f} "
          f"| {bn} | {mb:.2f} ({min(tb):.2f}–{max(tb):.2f}) | {nbytes / 1e6 / mb:.0f} "
          f"| {ratio:.2f}× | ≤ {target:.1f}× | {'yes' if ratio <= target else '**no**'} |")
PY
{
    echo
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
    echo "berth $(git -C "$ROOT" rev-parse --short HEAD) ($BERTH_BIN), $(docker-registry --version 2>/dev/null | head -1), skopeo $(skopeo --version | awk '{print $3}')"
    cat "$OUT/warm-upstream.txt" "$OUT/load.txt"
    echo "command: LAYERS=$LAYERS LAYER_MIB=$LAYER_MIB ROUNDS=$ROUNDS bench/proxy.sh"
} | tee -a "$OUT/table.md"
