#!/usr/bin/env python3
"""Latency against offered rate (open loop), Stockade (fsync always) beside Redis + Lua.

Each point is `stockade bench sustained --rate R --duration D` with latency measured from the intended
send time, so queueing is not hidden. Writes docs/latency-vs-rate.svg and docs/latency-vs-rate.csv.
Usage: python3 scripts/latency_curve.py [--rates 20000,40000,...] [--duration 3] [--stockade PATH]
"""
import argparse
import csv
import math
import os

import compare
from compare import ROOT, harness, start_all, url

COLORS = {"stockade": "#1b7f3b", "redis-nopersist": "#c0392b", "redis-always": "#2c3e90"}
LABELS = {"stockade": "Stockade, fsync always", "redis-nopersist": "Redis + Lua, no persistence",
          "redis-always": "Redis + Lua, appendfsync always"}


def svg(points, path):
    width, height, left, right, top, bottom = 760, 440, 70, 20, 40, 60
    rates = sorted({p[1] for p in points})
    ys = [p[3] for p in points if p[3] > 0]
    ymin, ymax = 10 ** math.floor(math.log10(min(ys))), 10 ** math.ceil(math.log10(max(ys)))
    x = lambda r: left + (r - rates[0]) / (rates[-1] - rates[0]) * (width - left - right)
    y = lambda v: top + (1 - (math.log10(v) - math.log10(ymin)) / (math.log10(ymax) - math.log10(ymin))) * (height - top - bottom)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">p99 latency against offered rate (open loop, 50 connections, 2 cores)</text>']
    decade = ymin
    while decade <= ymax:
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y(decade):.1f}" y2="{y(decade):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y(decade) + 4:.1f}" text-anchor="end">{decade:g} ms</text>')
        decade *= 10
    for r in rates:
        out.append(f'<line x1="{x(r):.1f}" x2="{x(r):.1f}" y1="{top}" y2="{height - bottom}" stroke="#eee"/>')
        out.append(f'<text x="{x(r):.1f}" y="{height - bottom + 18}" text-anchor="middle">{r // 1000}k</text>')
    out.append(f'<text x="{width / 2}" y="{height - 15}" text-anchor="middle">offered requests per second</text>')
    for i, name in enumerate(COLORS):
        series = sorted((p[1], p[3]) for p in points if p[0] == name and p[3] > 0)
        if not series:
            continue
        d = " ".join(f"{'M' if j == 0 else 'L'}{x(r):.1f},{y(v):.1f}" for j, (r, v) in enumerate(series))
        out.append(f'<path d="{d}" fill="none" stroke="{COLORS[name]}" stroke-width="2"/>')
        for r, v in series:
            out.append(f'<circle cx="{x(r):.1f}" cy="{y(v):.1f}" r="3" fill="{COLORS[name]}"/>')
        out.append(f'<text x="{left + 10}" y="{top + 16 + 16 * i}" fill="{COLORS[name]}">{LABELS[name]}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="20000,40000,60000,80000,100000,150000,200000,250000")
    ap.add_argument("--duration", type=float, default=3)
    ap.add_argument("--stockade", default=compare.STOCKADE, help="the stockade binary (default: $STOCKADE_BIN or .build/release/stockade)")
    args = ap.parse_args()
    compare.STOCKADE = os.path.abspath(args.stockade)  # harness() and start_all() read it from compare
    rates = [int(r) for r in args.rates.split(",")]
    servers = start_all()
    points = []
    try:
        for rate in rates:
            for name, p in servers.items():  # alternating systems at each rate
                rep = harness(url(name, p), "sustained", "--rate", rate, "--duration", args.duration, "-c", 50, "--quiet")
                points.append((name, rate, rep["latencyMicros"]["p50"] / 1000, rep["latencyMicros"]["p99"] / 1000, rep["throughput"]))
                print(f"{name:16} offered {rate:7d}/s  achieved {rep['throughput']:9.0f}/s  p50 {points[-1][2]:8.3f} ms  p99 {points[-1][3]:8.3f} ms", flush=True)
    finally:
        for p in servers.values():
            p.stop()
    with open(os.path.join(ROOT, "docs", "latency-vs-rate.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["system", "offered_per_s", "p50_ms", "p99_ms", "achieved_per_s"])
        w.writerows(points)
    svg(points, os.path.join(ROOT, "docs", "latency-vs-rate.svg"))


if __name__ == "__main__":
    main()
