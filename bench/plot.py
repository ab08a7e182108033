"""Plots a bench JSON: speedup per entry, and time vs number of classes C for the C-swept entries.

    python -m bench.plot RESULTS.json [--out PNG]
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict


def plot(result: dict, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    swept = defaultdict(list)
    for r in rows:
        if "C" in r["case"]:
            swept[r["entry"]].append(r)
    n_panels = 1 + (1 if swept else 0)
    fig, axes = plt.subplots(1, n_panels, figsize=(7 * n_panels, 4.8), squeeze=False)
    ax = axes[0][0]
    labels = [f"{r['entry']}\n" + ",".join(f"{k}={v}" for k, v in r["case"].items()) for r in rows]
    speedups = [r["speedup"] for r in rows]
    bars = ax.bar(range(len(rows)), speedups, color=["tab:green" if s >= 1 else "tab:red" for s in speedups])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("speedup over the eager reference (x, log scale)")
    ax.set_title(f"guidg-fast vs reference ({result['machine'].get('gpu') or 'CPU'}, torch {result['machine']['torch']})")
    for bar, s in zip(bars, speedups):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{s:.1f}x", ha="center", va="bottom", fontsize=7)
    if swept:
        ax = axes[0][1]
        for entry, rs in sorted(swept.items()):
            rs = sorted(rs, key=lambda r: r["case"]["C"])
            cs = [r["case"]["C"] for r in rs]
            line = ax.plot(cs, [r["fast"]["median_ms"] for r in rs], marker="o", label=f"{entry} fast")[0]
            ax.plot(cs, [r["reference"]["median_ms"] for r in rs], marker="x", linestyle="--",
                    color=line.get_color(), label=f"{entry} reference")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of classes C")
        ax.set_ylabel("median time per call (ms)")
        ax.set_title("time vs C")
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__)
    parser.add_argument("results", help="a JSON file written by python -m bench")
    parser.add_argument("--out", default=None, help="PNG path (default: the JSON path with .png)")
    args = parser.parse_args(argv)
    with open(args.results) as fh:
        result = json.load(fh)
    out = args.out or os.path.splitext(args.results)[0] + ".png"
    print(plot(result, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
