#!/usr/bin/env python3
"""Draws `cargo bench --bench wan`'s results: p99 latency and throughput against packet loss,
per path, for small requests alone and alongside a bulk transfer.

Usage: python3 benches/plot_wan.py [target/bench-wan.json] [wan.png]   (needs matplotlib)
"""
import json
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

source = sys.argv[1] if len(sys.argv) > 1 else "target/bench-wan.json"
target = sys.argv[2] if len(sys.argv) > 2 else "wan.png"
doc = json.load(open(source))
runs = doc["runs"]
paths = list(dict.fromkeys(r["path"] for r in runs))
scenarios = list(dict.fromkeys(r["scenario"] for r in runs))
titles = {"small": "small requests", "mixed": "small requests beside one bulk download"}
colours = ["#1f6feb", "#cf222e", "#9a6700", "#2da44e"]

fig, axes = plt.subplots(2, len(scenarios), figsize=(6 * len(scenarios), 8), squeeze=False)
for col, scenario in enumerate(scenarios):
    for i, path in enumerate(paths):
        mine = [r for r in runs if r["path"] == path and r["scenario"] == scenario]
        if not mine:  # a path that takes no part in this scenario (the bare hop in bulk runs)
            continue
        losses = sorted({r["loss"] for r in mine})
        p99 = [statistics.median(r["p99_us"] / 1000 for r in mine if r["loss"] == l) for l in losses]
        rps = [statistics.median(r["rps"] for r in mine if r["loss"] == l) for l in losses]
        axes[0][col].plot(losses, p99, marker="o", color=colours[i % len(colours)], label=path)
        axes[1][col].plot(losses, rps, marker="o", color=colours[i % len(colours)], label=path)
    axes[0][col].set_title(f"p99 latency, {titles.get(scenario, scenario)}")
    axes[0][col].set_yscale("log")
    axes[0][col].set_ylabel("p99 (ms, log scale)")
    axes[1][col].set_title(f"requests per second, {titles.get(scenario, scenario)}")
    axes[1][col].set_ylabel("req/s")
    for row in (0, 1):
        axes[row][col].set_xlabel("packet loss on the link (%)")
        axes[row][col].grid(True, which="both", alpha=0.3)
        axes[row][col].legend(fontsize=8)
fig.suptitle(
    f"quicmesh over a lossy link: wrk -c{doc['conns']}, {doc['rounds']} rounds of {doc['secs']} s, medians",
    fontsize=11,
)
fig.tight_layout()
fig.savefig(target, dpi=110)
print(f"wrote {target}")
