#!/usr/bin/env bash
# Observability tests that need Prometheus tooling (Debian's prometheus and
# prometheus-alertmanager; scripts/install-test-deps.sh installs them):
#
#   rules-check       promtool check rules on the shipped rules
#   rules-unit        promtool test rules: every alert, both thresholds
#   am-check          amtool check-config on the shipped Alertmanager config
#   am-routes         priority routing: P0 -> p0-page, P1 -> p1-chat, P2 -> p2-ticket
#   am-grouping       a real Alertmanager: five node-disk alerts in one region
#                     become one notification; a region alert inhibits the node
#                     alerts; a critical alert inhibits its warning
#   metrics-lint      promtool check metrics on a scrape of a running berth
#   prometheus-e2e    a real Prometheus scrapes berth; a burst of failing pulls
#                     makes BerthPullFailureRateCritical fire within 90 s
#
# Prints PASS/FAIL per test and a last line `observability: N passed, N failed`;
# exits non-zero if any failed. Everything listens on 127.0.0.1 only.
#
#   BERTH_BIN=target/debug/berth tests/observability/run.sh [TEST...]
#   KEEP_TMP=1  keep the temp dir (configs and logs)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BERTH_BIN=${BERTH_BIN:-$ROOT/target/debug/berth}
RULES=$ROOT/deploy/prometheus/berth-rules.yml
RULE_TESTS=$ROOT/deploy/prometheus/tests/berth-rules.test.yml
AM_CONFIG=$ROOT/deploy/alertmanager/alertmanager.yml
TMP=$(mktemp -d /tmp/berth-obs.XXXXXX)
PIDS=()
passed=0
failed=0

cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
    if [[ ${KEEP_TMP:-0} == 1 ]]; then echo "kept $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_for URL SECONDS: until URL answers 2xx.
wait_for() {
    local url=$1 deadline=$((SECONDS + $2))
    until curl -fsS -o /dev/null "$url" 2>/dev/null; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# start_berth NAME [ARGS...]: starts berth; sets BERTH_URL.
start_berth() {
    local name=$1; shift
    local port; port=$(free_port)
    "$BERTH_BIN" serve --listen "127.0.0.1:$port" --data-dir "$TMP/$name-data" --health-interval 1s "$@" \
        >"$TMP/$name.log" 2>&1 &
    PIDS+=($!)
    BERTH_URL=http://127.0.0.1:$port
    wait_for "$BERTH_URL/readyz" 20 || { tail -20 "$TMP/$name.log" >&2; return 1; }
}

run() {
    local name=$1 out="$TMP/$1.out"
    if "test_${name//-/_}" >"$out" 2>&1; then
        echo "PASS $name"
        passed=$((passed + 1))
    else
        echo "FAIL $name"
        sed 's/^/    | /' "$out" | tail -25
        failed=$((failed + 1))
    fi
}

test_rules_check() { promtool check rules "$RULES"; }

test_rules_unit() { promtool test rules "$RULE_TESTS"; }

test_am_check() { amtool check-config "$AM_CONFIG"; }

test_am_routes() {
    local want prio got
    for want in P0:p0-page P1:p1-chat P2:p2-ticket none:p2-ticket; do
        prio=${want%%:*}
        got=$(amtool config routes test --config.file="$AM_CONFIG" "priority=$prio" alertname=X region=eu 2>/dev/null)
        echo "priority=$prio -> $got"
        [[ $got == "${want#*:}" ]] || { echo "expected ${want#*:}"; return 1; }
    done
}

# post_alerts JSON: sends alerts to the Alertmanager under test.
post_alerts() { curl -fsS -XPOST -H 'content-type: application/json' -d "$1" "$AM_URL/api/v2/alerts"; }

alert_json() { # alertname region instance severity scope
    local prio=P0; [[ $4 == warning ]] && prio=P1
    printf '{"labels":{"alertname":"%s","region":"%s","instance":"%s","severity":"%s","priority":"%s","scope":"%s","area":"disk"}}' \
        "$1" "$2" "$3" "$4" "$prio" "$5"
}

test_am_grouping() {
    local hook_port am_port d=$TMP/am
    mkdir -p "$d"
    hook_port=$(free_port)
    am_port=$(free_port)
    # A webhook receiver that appends every notification, one JSON per line.
    python3 - "$hook_port" "$d/notifications" <<'PY' &
import http.server, sys
port, path = int(sys.argv[1]), sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        with open(path, "ab") as f:
            f.write(body.replace(b"\n", b" ") + b"\n")
        self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
PY
    PIDS+=($!)
    sed "s#http://127.0.0.1:9099#http://127.0.0.1:$hook_port#" "$AM_CONFIG" >"$d/alertmanager.yml"
    prometheus-alertmanager --config.file="$d/alertmanager.yml" --storage.path="$d/data" \
        --web.listen-address="127.0.0.1:$am_port" --cluster.listen-address= >"$d/am.log" 2>&1 &
    PIDS+=($!)
    AM_URL=http://127.0.0.1:$am_port
    wait_for "$AM_URL/-/ready" 20 || { tail "$d/am.log"; return 1; }
    # Five nodes of region eu with full disks, one in us, and in us a
    # warning shadowed by its critical.
    local alerts=() i
    for i in 1 2 3 4 5; do alerts+=("$(alert_json BerthDiskUsageCritical eu "eu-$i" critical node)"); done
    alerts+=("$(alert_json BerthDiskUsageCritical us us-1 critical node)")
    alerts+=("$(alert_json BerthDiskUsageWarning us us-1 warning node)")
    post_alerts "[$(IFS=,; echo "${alerts[*]}")]" || return 1
    # P0 groups wait 10 s before the first notification.
    local deadline=$((SECONDS + 40)) eu_groups=0
    while ((SECONDS < deadline)); do
        eu_groups=$(grep -c '"groupLabels":{"alertname":"BerthDiskUsageCritical","region":"eu"}' "$d/notifications" 2>/dev/null)
        ((eu_groups >= 1)) && break
        sleep 0.5
    done
    sleep 1
    echo "notifications:"; cat "$d/notifications"
    eu_groups=$(grep -c '"groupLabels":{"alertname":"BerthDiskUsageCritical","region":"eu"}' "$d/notifications")
    [[ $eu_groups == 1 ]] || { echo "expected one notification for region eu, got $eu_groups"; return 1; }
    python3 - "$d/notifications" <<'PY' || return 1
import json, sys
ns = [json.loads(l) for l in open(sys.argv[1])]
eu = [n for n in ns if n["groupLabels"] == {"alertname": "BerthDiskUsageCritical", "region": "eu"}]
assert len(eu[0]["alerts"]) == 5, f"the eu notification holds {len(eu[0]['alerts'])} alerts, not 5"
assert eu[0]["receiver"] == "p0-page", eu[0]["receiver"]
warn = [n for n in ns if n["groupLabels"].get("alertname") == "BerthDiskUsageWarning"]
assert not warn, "the warning shadowed by a critical alert was notified"
PY
    # A region-wide alert now suppresses the eu node alerts, not us.
    post_alerts "[$(alert_json BerthRegionDiskUsageCritical eu region-wide critical region)]" || return 1
    deadline=$((SECONDS + 20))
    while ((SECONDS < deadline)); do
        curl -fsS "$AM_URL/api/v2/alerts" >"$d/alerts.json"
        python3 - "$d/alerts.json" <<'PY' && return 0
import json, sys
alerts = json.load(open(sys.argv[1]))
state = {(a["labels"]["alertname"], a["labels"]["instance"]): a["status"] for a in alerts}
eu = [s for (n, i), s in state.items() if n == "BerthDiskUsageCritical" and i.startswith("eu-")]
assert len(eu) == 5 and all(s["state"] == "suppressed" and s["inhibitedBy"] for s in eu), eu
assert state[("BerthDiskUsageCritical", "us-1")]["state"] == "active"
assert state[("BerthRegionDiskUsageCritical", "region-wide")]["state"] == "active"
assert state[("BerthDiskUsageWarning", "us-1")]["state"] == "suppressed"
PY
        sleep 0.5
    done
    echo "alerts:"; cat "$d/alerts.json"
    return 1
}

test_metrics_lint() {
    start_berth lint || return 1
    # Traffic, so the families have samples: a blob push, a pull, a failed pull.
    local d; d=$(printf 'layer' | sha256sum | cut -d' ' -f1)
    curl -fsS -XPOST --data-binary layer "$BERTH_URL/v2/lint/app/blobs/uploads/?digest=sha256:$d" >/dev/null || return 1
    curl -fsS -o /dev/null "$BERTH_URL/v2/lint/app/blobs/sha256:$d" || return 1
    curl -sS -o /dev/null "$BERTH_URL/v2/lint/app/manifests/missing"
    curl -fsS "$BERTH_URL/metrics" >"$TMP/scrape.txt" || return 1
    promtool check metrics <"$TMP/scrape.txt" >"$TMP/lint.txt" 2>&1
    local rc=$?
    cat "$TMP/lint.txt"
    # promtool prints lint findings (and exits non-zero on some of them).
    ((rc == 0)) && [[ ! -s $TMP/lint.txt ]] || return 1
    grep -q '^berth_pull_failures_total{reason="not_found"} 1$' "$TMP/scrape.txt" || { echo "no pull failure counted"; return 1; }
    grep -q '^berth_pushes_total 1$' "$TMP/scrape.txt" || { echo "no push counted"; return 1; }
    curl -fsS -H 'accept: application/openmetrics-text' "$BERTH_URL/metrics" | tail -1 | grep -qx '# EOF'
}

test_prometheus_e2e() {
    start_berth e2e || return 1
    local d=$TMP/prom p_port
    mkdir -p "$d"
    p_port=$(free_port)
    # The shipped rules with windows and `for` durations scaled down from
    # minutes to seconds; expressions and thresholds are untouched.
    sed -E -e 's/\[(5m|10m|1h)\]/[20s]/g' -e 's/^( +for: ).*/\12s/' "$RULES" >"$d/rules.yml"
    cat >"$d/prometheus.yml" <<YML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [rules.yml]
scrape_configs:
  - job_name: berth
    static_configs:
      - targets: ['${BERTH_URL#http://}']
        labels: {region: ci}
YML
    promtool check config "$d/prometheus.yml" >/dev/null || return 1
    prometheus --config.file="$d/prometheus.yml" --storage.tsdb.path="$d/tsdb" \
        --web.listen-address="127.0.0.1:$p_port" >"$d/prometheus.log" 2>&1 &
    PIDS+=($!)
    local prom=http://127.0.0.1:$p_port
    wait_for "$prom/-/ready" 30 || { tail "$d/prometheus.log"; return 1; }
    # Failing pulls (unknown tags), about 20 per second, until the alert
    # fires or 90 s pass.
    local deadline=$((SECONDS + 90)) i=0
    while ((SECONDS < deadline)); do
        seq "$i" $((i + 19)) | xargs -P 20 -I{} curl -s -o /dev/null "$BERTH_URL/v2/ci/app/manifests/missing-{}"
        i=$((i + 20))
        curl -fsS "$prom/api/v1/alerts" >"$d/alerts.json" 2>/dev/null
        if python3 - "$d/alerts.json" <<'PY'; then echo "fired after $i failing pulls"; return 0; fi
import json, sys
alerts = json.load(open(sys.argv[1]))["data"]["alerts"]
firing = [a for a in alerts if a["labels"]["alertname"] == "BerthPullFailureRateCritical" and a["state"] == "firing"]
assert firing, [(a["labels"]["alertname"], a["state"]) for a in alerts]
l = firing[0]["labels"]
assert l["region"] == "ci" and l["instance"] and l["priority"] == "P0", l
PY
        sleep 1
    done
    echo "BerthPullFailureRateCritical did not fire within 90 s; alerts:"
    cat "$d/alerts.json"
    return 1
}

ALL=(rules-check rules-unit am-check am-routes am-grouping metrics-lint prometheus-e2e)
for c in promtool amtool prometheus prometheus-alertmanager curl python3; do
    command -v "$c" >/dev/null || { echo "FAIL setup: $c is missing; run scripts/install-test-deps.sh"; echo "observability: 0 passed, 1 failed"; exit 1; }
done
[[ -x $BERTH_BIN ]] || { echo "FAIL setup: $BERTH_BIN is missing; cargo build --bin berth"; echo "observability: 0 passed, 1 failed"; exit 1; }
for t in "${@:-${ALL[@]}}"; do run "$t"; done
echo "observability: $passed passed, $failed failed"
((failed == 0))
