"""Runs the bench entries fast vs reference; writes the results into --out as the run goes.

    guidg-fast bench [--quick] [--only NAME ...] [--device cpu|cuda] [--out DIR] [--no-memory]
    (the same as python -m guidg_fast.bench)

Into --out: latest.json and latest.md (this run's rows merged over the rows already there from
earlier runs of the same device and mode, each row naming its run), latest.png, and history.jsonl
(one line appended per entry case per run, with the machine and the versions). Both latest files
are rewritten after every case, so a run that is stopped or killed part-way keeps what it measured.
How the bench measures: bench/README.md.
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

# shown first in the table and the summary: the whole-run comparison the other entries explain
FIRST = ("guidg_run",)


def entry_names() -> list[str]:
    names = sorted(m.name for m in pkgutil.iter_modules(entries.__path__) if not m.name.startswith("_"))
    return [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]


def _fmt_case(case: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in case.items())


def _fmt_parity(row: dict) -> str:
    if row.get("parity_max_rel_err") is None:
        return row.get("parity_note", "-")
    if row.get("parity_vs"):  # against a float64 oracle; the fp32 reference's own error beside it
        return f"{row['parity_max_rel_err']:.1e} vs fp64 (reference {row['reference_rel_err']:.1e})"
    return f"{row['parity_max_rel_err']:.1e}"


def _ordered(rows: list[dict]) -> list[dict]:
    rank = {n: i for i, n in enumerate(FIRST)}
    return sorted(rows, key=lambda r: rank.get(r["entry"], len(FIRST)))  # stable: the rest keep their order


def markdown_table(rows: list[dict], skipped: list[dict] = ()) -> str:
    lines = [
        "| entry | case | backend | reference ms | fast ms | speedup | parity (max rel err) | memory ratio | fast GFLOP/s or GB/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes, sections = [], []
    for r in _ordered(rows):
        if r.get("skipped"):
            continue
        rate = r["fast"].get("gflops")
        rate_s = f"{rate:.1f} GFLOP/s" if rate is not None else (
            f"{r['fast']['gbps']:.1f} GB/s" if r["fast"].get("gbps") is not None else "-"
        )
        mem = f"{r['memory_ratio']:.1f}x" if r.get("memory_ratio") else "-"
        lines.append(
            f"| {r['entry']} | {_fmt_case(r['case'])} | {r['backend']} | {r['reference']['median_ms']:.2f} | "
            f"{r['fast']['median_ms']:.2f} | {r['speedup']:.2f}x | {_fmt_parity(r)} | {mem} | {rate_s} |"
        )
        for provider in ("reference", "fast"):
            if r[provider].get("peak_note"):
                notes.append(f"- memory, {r['entry']} {_fmt_case(r['case'])} {provider}: {r[provider]['peak_note']}")
        if r.get("summary_md"):
            sections.append(r["summary_md"])
    for r in list(skipped) + [r for r in rows if r.get("skipped")]:
        notes.append(f"- skipped, {r['entry']} {_fmt_case(r['case'])}: {r['skipped']}")
    out = "\n".join(lines)
    if notes:
        out += "\n\n" + "\n".join(dict.fromkeys(notes))
    if sections:
        out += "\n\n" + "\n\n".join(sections)
    return out


def _strip(row: dict) -> dict:
    """A row without its raw timings (the JSON keeps medians and quantiles)."""
    out = dict(row)
    for provider in ("reference", "fast"):
        if isinstance(out.get(provider), dict):
            out[provider] = {k: v for k, v in out[provider].items() if k != "times_ms"}
    return out


def _row_key(row: dict) -> str:
    # a forced backend (GUIDG_FAST_BACKEND=ext) is a second row beside the default one, not a rerun
    return json.dumps([row["entry"], row["case"], row.get("forced_backend")], sort_keys=True)


def machine_key(machine: dict, device: str) -> str:
    """The machine a row was measured on, in a few words (the history's grouping key)."""
    if device.startswith("cuda"):
        return machine.get("gpu") or "cuda"
    cpu = machine.get("cpu_model") or machine.get("processor") or "cpu"
    return f"{cpu}, {machine.get('cpu_count')} cores, {machine.get('torch_threads')} threads"


def _git_commit() -> str | None:
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _atomic_write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(path + ".tmp", path)


class Results:
    """latest.json / latest.md / history.jsonl in one folder, updated row by row."""

    def __init__(self, out: str, device: str, quick: bool, machine: dict, rates: dict, run: str, date: str):
        self.out, self.device, self.quick, self.machine, self.rates = out, device, quick, machine, rates
        self.run, self.date = run, date
        self.json_path = os.path.join(out, "latest.json")
        self.md_path = os.path.join(out, "latest.md")
        self.history_path = os.path.join(out, "history.jsonl")
        os.makedirs(out, exist_ok=True)
        self.rows: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.skipped: list[dict] = []
        if os.path.exists(self.json_path):
            with open(self.json_path) as fh:
                old = json.load(fh)
            # rows of earlier runs stay where this run does not remeasure them (same device and mode)
            if old.get("device", device) == device and bool(old.get("quick")) == quick:
                self.rows = {_row_key(r): r for r in old.get("rows", []) if "speedup" in r}
                self.runs = {k: v for k, v in old.get("runs", {}).items()
                             if any(r.get("run") == k for r in self.rows.values())}
        self.versions = {k: machine.get(k) for k in ("python", "torch", "triton")}
        self.versions["guidg_fast"] = _git_commit()
        self.runs[run] = {"date": date, "rates": rates, "machine": machine_key(machine, device),
                          "versions": self.versions, "entries": []}
        self.complete = False

    def add(self, row: dict) -> None:
        row = {**_strip(row), "run": self.run, "run_rates": self.rates}
        forced = os.environ.get("GUIDG_FAST_BACKEND")
        if forced:
            row["forced_backend"] = forced
        with open(self.history_path, "a") as fh:
            fh.write(json.dumps({"run": self.run, "date": self.date, "machine": machine_key(self.machine, self.device),
                                 "versions": self.versions, "quick": self.quick,
                                 **{k: v for k, v in row.items() if k not in ("run", "run_rates")},
                                 "rates": self.rates}) + "\n")
        if row["entry"] not in self.runs[self.run]["entries"]:
            self.runs[self.run]["entries"].append(row["entry"])
        if row.get("skipped"):
            self.skipped.append(row)  # a measured row of an earlier run stays in latest
        else:
            self.rows[_row_key(row)] = row
        self.write()

    def result(self) -> dict:
        return {"device": self.device, "machine": self.machine, "rates": self.rates, "quick": self.quick,
                "run": self.run, "complete": self.complete, "runs": self.runs,
                "rows": _ordered(list(self.rows.values())), "skipped": self.skipped}

    def write(self) -> None:
        result = self.result()
        _atomic_write(self.json_path, json.dumps(result, indent=2) + "\n")
        _atomic_write(self.md_path, self.markdown(result) + "\n")

    def markdown(self, result: dict) -> str:
        entries_of: dict[str, list] = {}
        for r in result["rows"] + result["skipped"]:
            entries_of.setdefault(r.get("run"), [])
            if r["entry"] not in entries_of[r.get("run")]:
                entries_of[r.get("run")].append(r["entry"])
        head = [f"Runs whose rows are shown (`guidg-fast bench`, {'quick' if self.quick else 'full'}, {self.device}; "
                "every run's rows are in history.jsonl):"]
        for run, info in sorted(self.runs.items()):
            if run not in entries_of:
                continue
            rates = info.get("rates") or {}
            line = (f"- `{run}` ({info.get('date', '?')}, {info.get('machine', '?')}, torch "
                    f"{(info.get('versions') or {}).get('torch', '?')}; fp32 GEMM {rates.get('gemm_gflops', float('nan')):.1f} "
                    f"GFLOP/s, copy {rates.get('copy_gbps', float('nan')):.1f} GB/s): {', '.join(entries_of[run])}")
            if run == self.run and not self.complete:
                line += " (in progress)"
            for note in info.get("notes", []):
                line += f"\n  - {note}"
            head.append(line)
        return "\n".join(head) + "\n\n" + markdown_table(result["rows"], result["skipped"])

    def finish(self) -> dict:
        self.complete = True
        self.write()
        return self.result()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="guidg-fast bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small cases and few repeats (CI smoke run)")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help=f"entries to run (of {entry_names()})")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--out", default="bench/results",
                        help="folder for latest.{json,md,png} and history.jsonl (default: bench/results)")
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
    names = [n for n in entry_names() if n in names]
    os.environ["GUIDG_FAST_BENCH_OUT"] = os.path.abspath(args.out)  # entries that cache data put it here
    rates = machine_rates(args.device, args.quick)
    print(f"machine: fp32 GEMM {rates['gemm_gflops']:.1f} GFLOP/s, copy {rates['copy_gbps']:.1f} GB/s")
    now = _dt.datetime.now()
    run = f"bench-{args.device}-{now.strftime('%Y%m%d-%H%M%S')}"
    results = Results(args.out, args.device, args.quick, machine_info(args.device), rates, run,
                      now.isoformat(timespec="seconds"))
    rows = []
    for name in names:
        print(f"[{name}]", flush=True)
        rows += run_entry(load_entry(name), args.device, args.quick, measure_memory=not args.no_memory,
                          on_row=results.add)
    result = results.finish()
    print()
    print(markdown_table(rows))
    print(f"\nresults: {results.json_path} ({results.md_path}, {results.history_path})")
    try:
        from .plot import plot

        print(f"plot:    {plot(result, os.path.join(args.out, 'latest.png'))}")
    except ImportError as exc:  # matplotlib is optional: the JSON and the table are the results
        print(f"plot skipped ({exc}); pip install matplotlib to get the PNG")
    if args.max_parity_err is not None:
        bad = [r for r in rows if r.get("parity_max_rel_err") is not None
               and not r["parity_max_rel_err"] <= args.max_parity_err]
        for r in bad:
            print(f"PARITY FAILED: {r['entry']} {_fmt_case(r['case'])}: max relative error "
                  f"{r['parity_max_rel_err']:.2e} > {args.max_parity_err:.0e}", file=sys.stderr)
        if bad:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
