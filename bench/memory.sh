#!/usr/bin/env bash
# Peak memory and descriptors under hostile reads (issue 13, items 10-11):
#  1. one ~4 MiB manifest fetched by tag on 256 connections, 512 requests;
#  2. 1,000 sockets that send that GET and never read (4 KiB receive
#     buffers), with --client-timeout 5: RSS and open descriptors 2 s in,
#     and 10 s in (after the timeout).
# Each binary given is measured in turn on a fresh data directory:
#
#   bench/memory.sh BEFORE_BIN AFTER_BIN     (e.g. main's build, then yours)
#
# Not a test: it takes about a minute per binary. Reads /proc/PID/status.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 BERTH_BIN [BERTH_BIN...]" >&2; exit 2; }

for bin in "$@"; do
  dir=$(mktemp -d)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$bin" serve --listen "127.0.0.1:$port" --data-dir "$dir/data" --client-timeout 5 \
    --max-connections 2000 >"$dir/log" 2>&1 &
  pid=$!
  # Older builds have no --max-connections.
  sleep 1
  if ! kill -0 "$pid" 2>/dev/null; then
    "$bin" serve --listen "127.0.0.1:$port" --data-dir "$dir/data" --client-timeout 5 >"$dir/log" 2>&1 &
    pid=$!
  fi
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.2; done
  python3 - "$port" "$pid" "$bin" <<'PY'
import hashlib, http.client, json, resource, socket, sys, threading, time
port, pid, binary = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, max(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])))

def status(field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field):
            return int(line.split()[1]) // 1024
def fds():
    import os
    return len(os.listdir(f"/proc/{pid}/fd"))

def req(method, path, body=b"", headers={}):
    c = http.client.HTTPConnection("127.0.0.1", port)
    c.request(method, path, body, headers)
    r = c.getresponse(); data = r.read(); c.close()
    return r.status, data

cfg = b"{}"
d = "sha256:" + hashlib.sha256(cfg).hexdigest()
assert req("POST", f"/v2/big/m/blobs/uploads/?digest={d}", cfg)[0] == 201
mt = "application/vnd.oci.image.manifest.v1+json"
m = json.dumps({"schemaVersion": 2, "mediaType": mt,
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": d, "size": 2},
    "layers": [], "annotations": {"pad": "x" * ((4 << 20) - 4096)}}).encode()
assert req("PUT", "/v2/big/m/manifests/t", m, {"content-type": mt})[0] == 201
idle = status("VmRSS")

# 1. 256 connections, two GETs each.
def two():
    c = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(2):
        c.request("GET", "/v2/big/m/manifests/t", headers={"accept": mt})
        r = c.getresponse(); assert r.status == 200; r.read()
threads = [threading.Thread(target=two) for _ in range(256)]
t0 = time.time()
[t.start() for t in threads]; [t.join() for t in threads]
took = time.time() - t0
peak = status("VmHWM")
time.sleep(10)
after_idle = status("VmRSS")

# 2. 1,000 slow readers.
fd0 = fds()
socks = []
for _ in range(1000):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET /v2/big/m/manifests/t HTTP/1.1\r\nhost: x\r\naccept: {mt}\r\n\r\n".encode())
    socks.append(s)
time.sleep(2)
rss2, fd2 = status("VmRSS"), fds()
time.sleep(8)
rss10, fd10 = status("VmRSS"), fds()
peak_all = status("VmHWM")
for s in socks: s.close()
print(f"{binary}\n  4 MiB manifest, 256 conns x 2: idle {idle} MiB, peak {peak} MiB, "
      f"{after_idle} MiB 10 s after ({took:.1f} s for 512 GETs)\n"
      f"  1,000 slow readers: at 2 s {rss2} MiB / {fd2 - fd0} extra fds; at 10 s {rss10} MiB / "
      f"{fd10 - fd0} extra fds; peak {peak_all} MiB")
PY
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
done
