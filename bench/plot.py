"""Plots a bench JSON: speedup per entry, and time vs number of classes C for the C-swept entries.

    python -m guidg_fast.bench.plot RESULTS.json [--out PNG]
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict


# the C-swept entries drawn in the time-vs-C panel (the ones whose cost grows with C)
SWEPT = ("expert_text", "multi_expert_loss", "cmattn", "ensemble_logits")


def _label(row: dict, varying: set) -> str:
    """Entry name plus only the case keys that vary within that entry (a readable bar label)."""
    parts = [f"{k}={v}" for k, v in row["case"].items() if k in varying]
    return row["entry"] + (f" ({', '.join(parts)})" if parts else "")


def plot(result: dict, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("speedup")]  # skipped cases have no bars
    cases = defaultdict(list)
    for r in rows:
        cases[r["entry"]].append(r["case"])
    varying = {e: {k for k in cs[0] if len({str(c.get(k)) for c in cs}) > 1} for e, cs in cases.items()}
    swept = defaultdict(list)
    for r in rows:
        if r["entry"] in SWEPT and "C" in r["case"] and "C" in varying[r["entry"]]:
            swept[r["entry"]].append(r)
    # ensemble_logits sweeps C for one weights/mode setting: keep the rows of the first setting
    for entry, rs in swept.items():
        first = {k: v for k, v in rs[0]["case"].items() if k != "C"}
        swept[entry] = [r for r in rs if {k: v for k, v in r["case"].items() if k != "C"} == first]
    height = max(4.0, 0.28 * len(rows) + 1.2)
    fig, axes = plt.subplots(1, 2 if swept else 1, figsize=(13 if swept else 7, height), squeeze=False,
                             gridspec_kw={"width_ratios": [1.15, 1]} if swept else None)
    ax = axes[0][0]
    labels = [_label(r, varying[r["entry"]]) for r in rows]
    speedups = [r["speedup"] for r in rows]
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, speedups, color=["tab:green" if s >= 1 else "tab:red" for s in speedups])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("speedup over the eager reference (x, log scale)")
    device = result["machine"].get("gpu") or f"CPU, {result['machine'].get('torch_threads', '?')} threads"
    ax.set_title(f"guidg-fast vs reference ({device}, torch {result['machine']['torch']})", fontsize=9)
    for y, s in zip(ys, speedups):
        ax.text(s, y, f" {s:.2f}x", va="center", fontsize=7)
    ax.set_xlim(right=max(speedups) * 3)
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
        ax.set_title("time vs number of classes", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guidg_fast.bench.plot", description=__doc__)
    parser.add_argument("results", help="a latest.json written by guidg-fast bench")
    parser.add_argument("--out", default=None, help="PNG path (default: the JSON path with .png)")
    args = parser.parse_args(argv)
    with open(args.results) as fh:
        result = json.load(fh)
    out = args.out or os.path.splitext(args.results)[0] + ".png"
    print(plot(result, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
