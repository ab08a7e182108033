"""Runs bench entries fast vs reference and writes JSON + a markdown table.

    python -m bench [--quick] [--only NAME ...] [--device cpu|cuda] [--out DIR] [--no-memory]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import pkgutil
import sys

import torch

from . import entries
from .harness import load_entry, machine_info, machine_rates, run_entry


def entry_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(entries.__path__) if not m.name.startswith("_"))


def _fmt_case(case: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in case.items())


def _fmt_parity(row: dict) -> str:
    if row.get("parity_vs"):  # against a float64 oracle; the fp32 reference's own error beside it
        return f"{row['parity_max_rel_err']:.1e} vs fp64 (reference {row['reference_rel_err']:.1e})"
    return f"{row['parity_max_rel_err']:.1e}"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| entry | case | backend | reference ms | fast ms | speedup | parity (max rel err) | memory ratio | fast GFLOP/s or GB/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = r["fast"].get("gflops")
        rate_s = f"{rate:.1f} GFLOP/s" if rate is not None else (
            f"{r['fast']['gbps']:.1f} GB/s" if r["fast"].get("gbps") is not None else "-"
        )
        mem = f"{r['memory_ratio']:.1f}x" if r.get("memory_ratio") else "-"
        lines.append(
            f"| {r['entry']} | {_fmt_case(r['case'])} | {r['backend']} | {r['reference']['median_ms']:.2f} | "
            f"{r['fast']['median_ms']:.2f} | {r['speedup']:.2f}x | {_fmt_parity(r)} | {mem} | {rate_s} |"
        )
    return "\n".join(lines)


def _write_json(path: str, args, rates: dict, rows: list, complete: bool) -> dict:
    result = {
        "machine": machine_info(args.device),
        "rates": rates,
        "quick": args.quick,
        "complete": complete,
        "rows": [{**r, "reference": {k: v for k, v in r["reference"].items() if k != "times_ms"},
                  "fast": {k: v for k, v in r["fast"].items() if k != "times_ms"}} for r in rows],
    }
    with open(path + ".tmp", "w") as fh:
        json.dump(result, fh, indent=2)
    os.replace(path + ".tmp", path)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small cases and few repeats (CI smoke run)")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help=f"entries to run (of {entry_names()})")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--out", default="bench/results", help="folder for the JSON results (default: bench/results)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements (faster)")
    parser.add_argument("--max-parity-err", type=float, default=None, metavar="TOL",
                        help="exit with status 1 if any entry's fast and reference outputs differ by more than "
                             "TOL (max relative error; default: report only)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    names = args.only or entry_names()
    unknown = sorted(set(names) - set(entry_names()))
    if unknown:
        parser.error(f"unknown entries {unknown}; known: {entry_names()}")
    rates = machine_rates(args.device, args.quick)
    print(f"machine: fp32 GEMM {rates['gemm_gflops']:.1f} GFLOP/s, copy {rates['copy_gbps']:.1f} GB/s")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench-{args.device}-{stamp}.json")
    rows = []
    for name in names:
        print(f"[{name}]")
        rows += run_entry(load_entry(name), args.device, args.quick, measure_memory=not args.no_memory)
        # rewritten after every entry: a run that is stopped part-way keeps what it measured
        result = _write_json(path, args, rates, rows, complete=name == names[-1])
    table = markdown_table(rows)
    with open(os.path.splitext(path)[0] + ".md", "w") as fh:
        fh.write(table + "\n")
    print()
    print(table)
    print(f"\nresults: {path}")
    try:
        from .plot import plot

        print(f"plot:    {plot(result, os.path.splitext(path)[0] + '.png')}")
    except ImportError as exc:  # matplotlib is optional: the JSON and the table are the results
        print(f"plot skipped ({exc}); pip install matplotlib to get the PNG")
    if args.max_parity_err is not None:
        bad = [r for r in rows if not r["parity_max_rel_err"] <= args.max_parity_err]
        for r in bad:
            print(f"PARITY FAILED: {r['entry']} {_fmt_case(r['case'])}: max relative error "
                  f"{r['parity_max_rel_err']:.2e} > {args.max_parity_err:.0e}", file=sys.stderr)
        if bad:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
