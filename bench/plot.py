#!/usr/bin/env python3
"""Draws the PNG plots of one `edgespec bench` result.

usage: python3 bench/plot.py <result.json> <out-dir> <stem>

For every entry of the report's "plots": the median of the metric for every series, against the
scenario's x axis (RTT, streams) as lines, or as bars when the scenario has no x axis; whiskers
span the min..max over the runs. Prints the path of every PNG written.
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def value(cfg, key):
    if key.startswith("ratio:"):
        return cfg["ratios"].get(key[len("ratio:"):])
    return cfg["median"].get(key)


def spread(cfg, key):
    if key.startswith("ratio:"):
        return None
    vals = [r["metrics"].get(key) for r in cfg["runs"]]
    vals = [v for v in vals if isinstance(v, (int, float))]
    if not vals:
        return None
    return min(vals), max(vals)


def main():
    path, out, stem = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(path) as f:
        rep = json.load(f)
    series = []
    for c in rep["configs"]:
        if c["series"] not in series:
            series.append(c["series"])
    tag = stem[len(rep["scenario"]):]  # "" or "-<tag>"
    for spec in rep["plots"]:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
        key = spec["metric"]
        if rep["x_label"]:
            for s in series:
                pts = [c for c in rep["configs"] if c["series"] == s and value(c, key) is not None]
                pts.sort(key=lambda c: c["x"])
                if not pts:
                    continue
                xs = [c["x"] for c in pts]
                ys = [value(c, key) for c in pts]
                lo, hi = [], []
                for c, y in zip(pts, ys):
                    sp = spread(c, key) or (y, y)
                    lo.append(y - sp[0])
                    hi.append(sp[1] - y)
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=s)
            ax.set_xlabel(rep["x_label"])
            xs_all = sorted({c["x"] for c in rep["configs"]})
            ax.set_xticks(xs_all)
        else:
            pts = [c for c in rep["configs"] if value(c, key) is not None]
            names = [c["series"] for c in pts]
            ys = [value(c, key) for c in pts]
            lo, hi = [], []
            for c, y in zip(pts, ys):
                sp = spread(c, key) or (y, y)
                lo.append(y - sp[0])
                hi.append(sp[1] - y)
            ax.bar(range(len(ys)), ys, yerr=[lo, hi], capsize=4, color="tab:blue")
            ax.set_xticks(range(len(ys)))
            ax.set_xticklabels(names, rotation=20, ha="right")
            for i, y in enumerate(ys):
                ax.annotate(f"{y:.2f}", (i, y), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(spec["ylabel"])
        runs = max((len(c["runs"]) for c in rep["configs"]), default=0)
        ax.set_title(f"{spec['title']} (median of {runs} run(s))", fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        if rep["x_label"]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        name = spec["file"]
        if tag:
            root, ext = os.path.splitext(name)
            name = f"{root}{tag}{ext}"
        dest = os.path.join(out, name)
        fig.savefig(dest)
        plt.close(fig)
        print(dest)


if __name__ == "__main__":
    main()
