#!/usr/bin/env python3
"""The results of bench/gc-pull.sh as a Markdown table: pull latency and
throughput without GC (A) and while GC runs (B), the B/A ratios, and how much
of each B window a GC run was in progress (from berth's JSON log).

    gc_pull_table.py OUT_DIR
    gc_pull_table.py --covered OUT_DIR B ROUND   exit 0 once a GC run ended after the window
"""
import datetime
import glob
import json
import os
import sys


def ts(s):
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def gc_runs(log):
    """(start, end, objects freed, untagged manifests) of every scheduled GC run in the log."""
    runs = []
    for line in open(log):
        try:
            v = json.loads(line)
        except ValueError:
            continue
        if not str(v.get("message", "")).startswith("scheduled garbage collection"):
            continue
        end = ts(v["@timestamp"])
        runs.append((end - v["elapsed_ms"] / 1000.0, end, v.get("objects_freed", 0), v.get("untagged_manifests", 0)))
    return runs


def window(out, name, r):
    a, b = open(os.path.join(out, f"{name}.{r}.window")).read().split()
    return float(a), float(b)


def cpu(out, name, r):
    """berth's CPU use over the measured window, in cores (CPU seconds per second)."""
    try:
        a, b, hz = (float(x) for x in open(os.path.join(out, f"{name}.{r}.cpu")).read().split())
    except (OSError, ValueError):
        return float("nan")
    w0, w1 = window(out, name, r)
    return (b - a) / hz / (w1 - w0)


def coverage(out, r):
    """Share of the B window with a GC run in progress, runs overlapping it, what they freed."""
    w0, w1 = window(out, "B", r)
    busy, n, freed, untagged = 0.0, 0, 0, 0
    for s, e, objs, unt in gc_runs(os.path.join(out, f"B.{r}.berth.log")):
        overlap = min(e, w1) - max(s, w0)
        if overlap > 0:
            busy += overlap
            n += 1
            freed += objs
            untagged += unt
    return busy / (w1 - w0), n, freed, untagged


if sys.argv[1] == "--covered":
    out, _, r = sys.argv[2:5]
    _, w1 = window(out, "B", r)
    sys.exit(0 if any(e >= w1 for _, e, _, _ in gc_runs(os.path.join(out, f"B.{r}.berth.log"))) else 1)

out = sys.argv[1]
runs = {}
for f in sorted(glob.glob(os.path.join(out, "[AB].*.json"))):
    name, r, _ = os.path.basename(f).split(".")
    runs.setdefault(name, {})[r] = json.load(open(f))

print("| phase | round | pulls/s | p50 ms | p99 ms | ok | berth CPU | GC in progress | GC runs | objects freed |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for name in ("A", "B"):
    for r, v in sorted(runs.get(name, {}).items()):
        l = v["latency_ms"]
        gc = "– | – | –"
        if name == "B":
            share, n, freed, untagged = coverage(out, r)
            gc = f"{share * 100:.0f} % of the window | {n} | {freed} ({untagged} manifests)"
        print(f"| {name} | {r} | {v['qps']:,.1f} | {l['p50']:.2f} | {l['p99']:.2f} | {v['success_rate']:.2f}% "
              f"| {cpu(out, name, r):.2f} cores | {gc} |")


def mean(name, f):
    vs = [f(v) for v in runs.get(name, {}).values()]
    return sum(vs) / len(vs) if vs else float("nan")


a = {k: mean("A", f) for k, f in (("qps", lambda v: v["qps"]), ("p50", lambda v: v["latency_ms"]["p50"]), ("p99", lambda v: v["latency_ms"]["p99"]))}
b = {k: mean("B", f) for k, f in (("qps", lambda v: v["qps"]), ("p50", lambda v: v["latency_ms"]["p50"]), ("p99", lambda v: v["latency_ms"]["p99"]))}
print()
print("| | A: no GC | B: GC running | B / A |")
print("|---|---:|---:|---:|")
print(f"| pulls/s | {a['qps']:,.1f} | {b['qps']:,.1f} | {b['qps'] / a['qps']:.2f}× |")
print(f"| p50 ms | {a['p50']:.2f} | {b['p50']:.2f} | {b['p50'] / a['p50']:.2f}× |")
print(f"| p99 ms | {a['p99']:.2f} | {b['p99']:.2f} | {b['p99'] / a['p99']:.2f}× |")
cpu_a = [cpu(out, "A", r) / v["qps"] * 1e6 for r, v in runs.get("A", {}).items()]
cpu_b = [cpu(out, "B", r) / v["qps"] * 1e6 for r, v in runs.get("B", {}).items()]
if cpu_a and cpu_b:
    ca, cb = sum(cpu_a) / len(cpu_a), sum(cpu_b) / len(cpu_b)
    print(f"| berth CPU µs per pull | {ca:.0f} | {cb:.0f} | {cb / ca:.2f}× |")
print()
print("Means over the rounds. Target: latency while GC runs within 10 % of the idle registry's "
      f"(B/A ≤ 1.10): p50 {'met' if b['p50'] <= 1.10 * a['p50'] else '**not met**'}, "
      f"p99 {'met' if b['p99'] <= 1.10 * a['p99'] else '**not met**'}.")
low = [r for r in runs.get("B", {}) if coverage(out, r)[0] < 0.9]
if low:
    print(f"Note: in B round(s) {', '.join(low)} a GC run was in progress for less than 90 % of the measured window; "
          "raise GARBAGE to keep GC busy throughout.")
