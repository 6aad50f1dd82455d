#!/usr/bin/env python3
"""Turns the JSON runs of bench/compare.sh into one Markdown table with the
ratios and the issue's targets. Usage: table.py OUT_DIR"""
import glob
import json
import os
import sys

out = sys.argv[1]
runs = {}
for f in glob.glob(os.path.join(out, "*.*.*.json")):
    name, target, _round, _ = os.path.basename(f).rsplit(".", 3)
    runs.setdefault((name, target), []).append(json.load(open(f)))


def agg(name, target):
    rs = runs.get((name, target))
    if not rs:
        return None
    if any(r.get("run_failed") for r in rs):
        return {"failed": True}
    n = len(rs)
    return {
        "qps": sum(r["qps"] for r in rs) / n,
        "mbs": sum(r["mb_per_s"] for r in rs) / n,
        "p99": max(r["latency_ms"]["p99"] for r in rs),
        "ok": min(r["success_rate"] for r in rs),
        "rounds": n,
    }


def fmt(x, unit=""):
    # Ratios get two decimals: a target of 0.9× is missed at 0.86×.
    return "–" if x is None else f"{x:,.2f}{unit}" if unit == "×" else f"{x:,.1f}{unit}"


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


openssl = json.load(open(os.path.join(out, "openssl.json")))
rss = json.load(open(os.path.join(out, "rss.json")))

rows = []
checks = []
for name, metric, label in [
    ("manifest-get", "qps", "manifest GET by tag (req/s)"),
    ("manifest-head", "qps", "manifest HEAD by tag (req/s)"),
    ("catalog-page", "qps", "`/v2/_catalog?n=100` (req/s)"),
    ("catalog", "qps", "plain `/v2/_catalog` (req/s)"),
    ("blob-get", "mbs", "1 GiB blob GET, 4 conns (MB/s)"),
    ("push", "mbs", "1 GiB monolithic push (MB/s)"),
]:
    b, d, n = agg(name, "berth"), agg(name, "distribution"), agg(name, "nginx")
    val = lambda a: None if a is None or a.get("failed") else a[metric]
    ceiling = val(n) if name != "push" else openssl["mb_per_s"]
    rows.append(
        [
            label,
            fmt(val(b)),
            fmt(val(d)),
            fmt(ceiling) + (" (openssl)" if name == "push" else ""),
            fmt(ratio(val(b), ceiling), "×"),
            fmt(ratio(val(b), val(d)), "×"),
            "–" if not b or b.get("failed") else f"{b['p99']:.1f} / {b['ok']:.2f}%",
            "–" if not d or d.get("failed") else f"{d['p99']:.1f} / {d['ok']:.2f}%",
        ]
    )
    ok = lambda a: a and not a.get("failed")
    if name == "manifest-get" and ok(b):
        checks.append(("manifest GET ≥ 0.7× nginx, p99 < 20 ms, 100 %",
                       ratio(val(b), ceiling) is not None and ratio(val(b), ceiling) >= 0.7 and b["p99"] < 20 and b["ok"] == 100))
    if name == "manifest-head" and ok(b):
        checks.append(("manifest HEAD ≥ 0.7× nginx", (ratio(val(b), ceiling) or 0) >= 0.7))
    if name == "catalog-page" and ok(b):
        checks.append(("catalog?n=100 ≥ 0.5× nginx, ≥ 20× distribution, 100 %, p99 < 50 ms",
                       (ratio(val(b), ceiling) or 0) >= 0.5 and (ratio(val(b), val(d)) or 0) >= 20
                       and b["ok"] == 100 and b["p99"] < 50))
    if name == "catalog" and ok(b):
        checks.append(("plain catalog 100 %, p99 < 100 ms", b["ok"] == 100 and b["p99"] < 100))
    if name == "blob-get" and ok(b):
        checks.append(("1 GiB blob GET ≥ 0.9× nginx", (ratio(val(b), ceiling) or 0) >= 0.9))
    if name == "push" and ok(b):
        checks.append(("1 GiB push ≥ 0.8× openssl dgst", (ratio(val(b), ceiling) or 0) >= 0.8))

rss_ratio = rss["berth_kib"] / rss["distribution_kib"]
checks.append(("peak RSS (catalog and manifest runs) ≤ 0.5× distribution", rss_ratio <= 0.5))

print("| scenario | berth | distribution | nginx (ceiling) | berth / ceiling | berth / distribution "
      "| berth p99 ms / ok | distribution p99 ms / ok |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print("| " + " | ".join(r) + " |")
print(f"| peak RSS, catalog and manifest runs | {rss['berth_kib'] / 1024:.1f} MiB "
      f"| {rss['distribution_kib'] / 1024:.1f} MiB | | | {rss_ratio:.2f}× | | |")
print()
print("Values are means over the rounds; p99 is the worst round, ok the worst success rate.")
print()
print("| target | met |")
print("|---|---|")
for label, met in checks:
    print(f"| {label} | {'yes' if met else '**no**'} |")
