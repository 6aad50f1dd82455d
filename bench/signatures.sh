#!/usr/bin/env bash
# Manifest GET by tag with signature enforcement on, against off, side by
# side in one berth (one process, so both share the machine's noise):
#   on   bench/r00000:latest, covered by a `[[signature_policies]]` entry and
#        signed in cosign's tag scheme (an ECDSA P-256 signature made here
#        with openssl, as `cosign sign --key` makes it)
#   off  bench/r00001:latest, no policy covers it
# `berth bench manifest-get`, CONNS connections, closed loop, rounds
# alternating which goes first. Prints QPS and p50/p99 of both and on/off.
#
#   bench/signatures.sh                  DUR=10 WARM=2 ROUNDS=3 CONNS=32
#   BERTH=target/debug/berth DUR=3 ROUNDS=1 bench/signatures.sh   a quick look
#
# Not a test: its numbers depend on the machine.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DUR=${DUR:-10}
WARM=${WARM:-2}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-32}
BERTH=${BERTH:-$ROOT/target/release/berth}
[[ -x $BERTH ]] || (cd "$ROOT" && cargo build --release -p berth)
OUT=$(mktemp -d /tmp/berth-sig-bench.XXXXXX)
say() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }

openssl ecparam -name prime256v1 -genkey -noout -out "$OUT/cosign.key" 2>/dev/null
openssl ec -in "$OUT/cosign.key" -pubout -out "$OUT/cosign.pub" 2>/dev/null
cat >"$OUT/berth.toml" <<TOML
[[signature_policies]]
repositories = "bench/r00000"
keys = ["$OUT/cosign.pub"]
TOML

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
"$BERTH" serve --listen "127.0.0.1:$PORT" --data-dir "$OUT/data" --config "$OUT/berth.toml" \
    --access-log false 2>"$OUT/berth.log" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -fs "$URL/v2/" >/dev/null && break; sleep 0.1; done

say "seeding 2 images and signing bench/r00000:latest"
"$BERTH" bench --registry "$URL" --seed 2 --connections 2 2>>"$OUT/seed.log"
# Refused (403) before it is signed: the refusal's `detail` names the digest.
digest=$(curl -s "$URL/v2/bench/r00000/manifests/latest" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["errors"][0]["detail"])')
printf '{"critical":{"identity":{"docker-reference":"bench/r00000"},"image":{"docker-manifest-digest":"%s"},"type":"cosign container image signature"},"optional":null}' \
    "$digest" >"$OUT/payload.json"
sig=$(openssl dgst -sha256 -sign "$OUT/cosign.key" "$OUT/payload.json" | base64 -w0)
push_blob() { # file -> digest
    local d="sha256:$(sha256sum "$1" | cut -d' ' -f1)"
    curl -fs -X POST --data-binary "@$1" -H 'Content-Type: application/octet-stream' \
        "$URL/v2/bench/r00000/blobs/uploads/?digest=$d" >/dev/null
    echo "$d"
}
printf '{}' >"$OUT/empty.json"
pd=$(push_blob "$OUT/payload.json")
cd_=$(push_blob "$OUT/empty.json")
cat >"$OUT/sig.json" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
 "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"$cd_","size":2},
 "layers":[{"mediaType":"application/vnd.dev.cosign.simplesigning.v1+json","digest":"$pd",
   "size":$(stat -c %s "$OUT/payload.json"),"annotations":{"dev.cosignproject.cosign/signature":"$sig"}}]}
JSON
curl -fs -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' --data-binary "@$OUT/sig.json" \
    "$URL/v2/bench/r00000/manifests/${digest/:/-}.sig" >/dev/null
code=$(curl -s -o /dev/null -w '%{http_code}' "$URL/v2/bench/r00000/manifests/latest")
[[ $code == 200 ]] || { say "the signed image is refused ($code); see $OUT/berth.log"; exit 1; }

for r in $(seq "$ROUNDS"); do
    order="on off"
    ((r % 2 == 0)) && order="off on"
    for t in $order; do
        image=bench/r00000:latest
        [[ $t == off ]] && image=bench/r00001:latest
        say "round $r: $t"
        "$BERTH" bench --registry "$URL" --json manifest-get --image "$image" -c "$CONNS" \
            -d "${DUR}s" --warmup "${WARM}s" >"$OUT/$t.$r.json" 2>>"$OUT/bench.log"
    done
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
runs = {t: [json.load(open(f"{out}/{t}.{r}.json")) for r in range(1, rounds + 1)] for t in ("on", "off")}
med = lambda t, f: statistics.median(f(r) for r in runs[t])
qps = lambda t: med(t, lambda r: r["qps"])
lat = lambda t, p: med(t, lambda r: r["latency_ms"][p])
for t in ("on", "off"):
    failed = sum(r["failed"] for r in runs[t])
    print(f"{t:4} QPS {qps(t):10.1f}  p50 {lat(t, 'p50'):.3f} ms  p99 {lat(t, 'p99'):.3f} ms  failed {failed}")
print(f"on/off  QPS {qps('on') / qps('off'):.3f}  p50 {lat('on', 'p50') / lat('off', 'p50'):.3f}  p99 {lat('on', 'p99') / lat('off', 'p99'):.3f}")
print(f"raw JSON and logs: {out}")
PY
