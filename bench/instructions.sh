#!/usr/bin/env bash
# User-space instructions per request of a release berth, counted by
# valgrind's callgrind: repeatable whatever else the machine does, so a change
# of a few percent shows where timed runs cannot tell it from noise. It counts
# the whole process for N1 and then N2 requests (each on a fresh start over
# the same data) and prints (total2 - total1) / (N2 - N1): start-up and
# shutdown cancel out. Kernel work (syscalls) is not counted: see `strace -c`.
#
#   bench/instructions.sh                        # manifest-head, 2,000 and 12,000 requests
#   SCENARIO=manifest-get N1=1000 N2=6000 bench/instructions.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SCENARIO=${SCENARIO:-manifest-head}
N1=${N1:-2000}
N2=${N2:-12000}
PORT=${PORT:-5179}
command -v valgrind >/dev/null || apt-get install -y valgrind >/dev/null
cargo build --release --locked --bin berth --manifest-path "$ROOT/Cargo.toml" >&2
BERTH=$ROOT/target/release/berth
T=$(mktemp -d /tmp/berth-instructions.XXXXXX)
trap 'pkill -f "serve --listen 127.0.0.1:$PORT" 2>/dev/null || true; rm -rf "$T"' EXIT
URL=http://127.0.0.1:$PORT

up() {
    for _ in $(seq 200); do curl -sf -o /dev/null "$URL/v2/" && return 0; sleep 0.1; done
    echo "berth did not come up" >&2
    exit 1
}

"$BERTH" serve --listen 127.0.0.1:$PORT --data-dir "$T/data" >"$T/seed.log" 2>&1 &
up
"$BERTH" bench -r "$URL" --seed 10 >&2
kill -INT $! && wait $! || true

count() { # requests -> total instructions
    rm -f "$T"/cg.out.*
    valgrind --tool=callgrind --callgrind-out-file="$T/cg.out.%p" \
        "$BERTH" serve --listen 127.0.0.1:$PORT --data-dir "$T/data" >"$T/serve.log" 2>"$T/valgrind.log" &
    local pid=$!
    up
    "$BERTH" bench -r "$URL" "$SCENARIO" -c 8 -n "$1" -d 600s --timeout 30s >&2
    kill -INT $pid
    wait $pid || true
    grep -h '^summary:' "$T"/cg.out.* | awk '{print $2}'
}

a=$(count "$N1")
b=$(count "$N2")
echo "$SCENARIO: $(( (b - a) / (N2 - N1) )) user-space instructions per request (berth $(git -C "$ROOT" rev-parse --short HEAD))"
