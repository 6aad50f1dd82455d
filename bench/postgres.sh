#!/usr/bin/env bash
# Cold manifest GET by tag with metadata in PostgreSQL (a private cluster on
# loopback) against the embedded redb, in the same run, same binary.
#
#   bench/postgres.sh                 DUR=10 REPOS=100 CONNS=1 ROUNDS=2
#   BERTH=target/release/berth bench/postgres.sh   (a build with --features berth/postgres)
#
# "Cold": both berths run with --manifest-cache-size 0, so every GET resolves
# the tag and reads the manifest's record from the metadata store (then its
# bytes from the blob store). CONNS=1 measures one request at a time (the
# latency of the store, not queueing). Rounds alternate redb/PostgreSQL.
# Prints p50/p99/req/s of both and the PostgreSQL/redb ratio. Not a test.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DUR=${DUR:-10}
REPOS=${REPOS:-100}
CONNS=${CONNS:-1}
ROUNDS=${ROUNDS:-2}
BERTH=${BERTH:-$ROOT/target/debug/berth}
pg_bins=(/usr/lib/postgresql/*/bin)
PGBIN=${PGBIN:-$(printf '%s\n' "${pg_bins[@]}" | sort -V | tail -1)}
OUT=$(mktemp -d /tmp/berth-bench-pg.XXXXXX)
chmod 755 "$OUT"

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    as_pg "$PGBIN/pg_ctl" -D "$OUT/pg" stop -m fast >/dev/null 2>&1 || true
    rm -rf "$OUT/pg" "$OUT/redb" "$OUT/blobs"
}
trap cleanup EXIT

as_pg() { if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

PGPORT=$(free_port)
mkdir -p "$OUT/pg"
[[ $(id -u) -eq 0 ]] && chown postgres "$OUT/pg"
as_pg "$PGBIN/initdb" -D "$OUT/pg" -U berth -A trust -E UTF8 --locale=C --no-sync >"$OUT/initdb.log"
as_pg "$PGBIN/pg_ctl" -D "$OUT/pg" -l "$OUT/pg/server.log" -w \
    -o "-p $PGPORT -k $OUT/pg -c listen_addresses=127.0.0.1" start >/dev/null
as_pg "$PGBIN/createdb" -h 127.0.0.1 -p "$PGPORT" -U berth registry
URL="postgres://berth@127.0.0.1:$PGPORT/registry"

start_berth() { # name port extra-args...
    local name=$1 port=$2; shift 2
    "$BERTH" serve --listen "127.0.0.1:$port" --data-dir "$OUT/$name" --manifest-cache-size 0 \
        --gc-interval 0 --access-log=false --log warn "$@" 2>"$OUT/$name.log" &
    pids+=($!)
    for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/v2/" >/dev/null && return; sleep 0.1; done
    echo "berth $name did not start:" >&2; cat "$OUT/$name.log" >&2; exit 1
}

P_REDB=$(free_port); P_PG=$(free_port)
start_berth redb "$P_REDB"
start_berth blobs "$P_PG" --metadata "$URL"
for port in "$P_REDB" "$P_PG"; do
    "$BERTH" bench -r "http://127.0.0.1:$port" --seed "$REPOS" >/dev/null
done

run() { # port label round
    "$BERTH" bench manifest-get -r "http://127.0.0.1:$1" -c "$CONNS" -d "${DUR}s" --warmup 1s --json \
        >"$OUT/$2-$3.json"
}
for r in $(seq "$ROUNDS"); do
    run "$P_REDB" redb "$r"
    run "$P_PG" postgres "$r"
done

python3 - "$OUT" "$ROUNDS" <<'PY'
import json, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
def load(name):
    rs = [json.load(open(f"{out}/{name}-{r}.json")) for r in range(1, rounds + 1)]
    return rs
rows = {}
for name in ("redb", "postgres"):
    rs = load(name)
    failed = sum(r["failed"] for r in rs)
    if failed:
        raise SystemExit(f"{name}: {failed} failed requests: {rs[0]['errors']}")
    rows[name] = (
        statistics.median(r["latency_ms"]["p50"] for r in rs),
        statistics.median(r["latency_ms"]["p99"] for r in rs),
        statistics.median(r["qps"] for r in rs),
    )
print("| metadata | p50 ms | p99 ms | req/s |")
print("|---|---|---|---|")
for name, (p50, p99, rps) in rows.items():
    print(f"| {name} | {p50:.3f} | {p99:.3f} | {rps:,.1f} |")
(a50, a99, arps), (b50, b99, brps) = rows["redb"], rows["postgres"]
print(f"| PostgreSQL / redb | {b50 / a50:.2f}x | {b99 / a99:.2f}x | {brps / arps:.2f}x |")
PY
echo "raw JSON and logs: $OUT"
