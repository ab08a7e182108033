"""Benchmark harness: every entry is timed fast vs reference in one run, with parity and memory.

An entry module in ``bench/entries/`` defines ``ENTRY = Entry(...)``:
  name      the op / workload name (one name across layers: cmattn, multi_expert_loss, ...)
  cases     cases(quick: bool) -> list of dicts (shapes); quick mode must stay small
  make      make(case, provider, device) -> a zero-argument callable that runs the whole measured
            work (e.g. forward + backward) and returns a tuple of tensors (outputs, gradients) that
            are compared between providers for the parity figure
  work      work(case) -> {"flops": float} and/or {"bytes": float} moved per call
  backend   backend(case, device) -> the backend name the fast provider runs (e.g. ops.choose(...))
  memory    memory(case, provider, device) -> estimated peak bytes of one call of that provider in a
            fresh process (model included); cases that do not fit the free memory are skipped
Providers are "reference" (guidg_fast.reference, official loop structure) and "fast".
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

PROVIDERS = ("reference", "fast")
TIMING_ROUNDS = 4  # blocks per provider in a full run (time_alternating)


@dataclass
class Entry:
    name: str
    cases: Callable[[bool], list]
    make: Callable[[dict, str, str], Callable[[], tuple]]
    work: Callable[[dict], dict] = field(default=lambda case: {})
    backend: Callable[[dict, str], str] = field(default=lambda case, device: "?")
    repeats: int = 10
    quick_repeats: int = 3
    # repeats of the fast path where they differ from ``repeats`` (an entry whose reference takes a
    # minute per call can still give its fast path a steadier median)
    fast_repeats: int | None = None
    # extras(case, device, quick) -> dict merged into the row (e.g. a breakdown of an end-to-end step)
    extras: Callable[[dict, str, bool], dict] | None = None
    # oracle(case, device) -> the outputs computed by the reference in float64. Where an entry's
    # outputs are ill-conditioned in fp32 (the fp32 reference itself is ~1e-5 off), parity is the
    # fast path against this oracle, and the fp32 reference's own error is reported beside it.
    oracle: Callable[[dict, str], tuple] | None = None
    # memory(case, provider, device) -> estimated peak bytes of one call in a fresh process, model
    # and inputs included. None: the entry's cases are small (well under 1 GB) and are not checked.
    memory: Callable[[dict, str, str], float] | None = None
    # release() drops what the entry module caches between calls (models), before a memory child
    release: Callable[[], None] | None = None
    # run(device, quick, log) -> rows: an entry that is not one callable per provider (a whole
    # training run with its own phases); it does its own timing and writes rows run_entry's way
    run: Callable[[str, bool, Callable], list] | None = None


_PACKAGE = __package__ or "bench"  # "bench" in a checkout, "guidg_fast.bench" when installed


def load_entry(name: str) -> Entry:
    return importlib.import_module(f"{_PACKAGE}.entries.{name}").ENTRY


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable, device: str, warmup: int = 1, repeats: int = 10) -> dict:
    """Median and 20/80% quantiles in milliseconds (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


def _summary(times: list) -> dict:
    """Median and 20/80% quantiles of timings in milliseconds (and the sorted timings)."""
    times = sorted(times)
    q = lambda p: times[min(len(times) - 1, int(round(p * (len(times) - 1))))]  # noqa: E731
    return {"median_ms": statistics.median(times), "q20_ms": q(0.2), "q80_ms": q(0.8), "times_ms": times}


def time_alternating(fns: dict, device: str, warmup: int, repeats: dict, rounds: int) -> dict:
    """time_fn for several callables on the same machine state: each runs its repeats in ``rounds``
    blocks, the callables taking turns (and turns at going first), so a slow minute of a shared
    machine lands on every side of a ratio instead of one. Each block starts with one untimed call
    (the other callable has just used the caches). Returns time_fn's dict per callable."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            count = repeats[name] // rounds + (1 if r < repeats[name] % rounds else 0)
            if count == 0:
                continue
            fns[name]()
            _sync(device)
            times[name] += time_fn(fns[name], device, warmup=0, repeats=count)["times_ms"]
    return {name: _summary(t) for name, t in times.items()}


def max_rel_err(a: tuple, b: tuple) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        if x is None or y is None:
            continue
        x, y = x.detach().double().cpu(), y.detach().double().cpu()
        scale = max(float(y.abs().max()), 1e-6) if y.numel() else 1.0
        worst = max(worst, float((x - y).abs().max()) / scale if y.numel() else 0.0)
    return worst


def _proc_kib(path: str, key: str) -> int | None:
    """Bytes of a ``key: N kB`` line of a /proc file (Linux), or None where it cannot be read."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _maxrss_bytes() -> int:
    """Peak RSS of this process in bytes.

    On Linux this reads VmHWM: ``ru_maxrss`` also counts the RSS of the parent at the moment it
    spawned this process, so a child of a big parent (the bench runner after timing a case) would
    report the parent's size as its own peak.
    """
    peak = _proc_kib("/proc/self/status", "VmHWM:")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> None:
    """Lower the peak-RSS mark to the current RSS (Linux: write 5 to /proc/self/clear_refs), so that
    the memory freed after building the inputs (model init temporaries) does not hide the call's peak."""
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_memory_child(entry_name: str, case: dict, provider: str, device: str) -> int:
    """Extra peak memory (bytes) of one call, measured in this process (run it in a fresh one)."""
    entry = load_entry(entry_name)
    fn = entry.make(case, provider, device)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    _reset_peak_rss()
    base = _maxrss_bytes()
    fn()
    return max(0, _maxrss_bytes() - base)


GiB = 1024**3
# left free beside a case's estimate: the OS, the page cache a run touches, the estimates' error
MEMORY_HEADROOM = 1 * GiB


def available_memory(device: str) -> int | None:
    """Bytes a new allocation can get now: MemAvailable (Linux) on CPU, the free device memory on
    CUDA; None where it cannot be read (the memory check is then skipped)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    return _proc_kib("/proc/meminfo", "MemAvailable:")


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release_memory(entry: "Entry | None" = None, device: str = "cpu") -> None:
    """Hands memory this process no longer uses back to the OS before a memory child (or the next
    case) needs it: the entry's cached models, garbage, CUDA's cached blocks and glibc's free heap
    pages. With the allocator settled (settle_allocator) glibc keeps freed blocks up to 32 MiB in its
    heap, and after a ViT-B/16 text pass at C = 200 that heap held gigabytes; malloc_trim returns
    the free pages inside it too, not only those at its top."""
    if entry is not None and entry.release is not None:
        entry.release()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    _malloc_trim()


def memory_shortfall(need: float | None, device: str, what: str) -> str | None:
    """None when ``need`` bytes fit the free memory (less MEMORY_HEADROOM), else the reason to skip."""
    if need is None:
        return None
    free = available_memory(device)
    if free is None or need <= free - MEMORY_HEADROOM:
        return None
    source = "free CUDA memory" if device.startswith("cuda") else "MemAvailable"
    return (f"{what} needs ~{need / GiB:.1f} GB, {free / GiB:.1f} GB available ({source}, "
            f"{MEMORY_HEADROOM / GiB:.0f} GB kept free)")


def describe_child_failure(returncode: int, stderr: str) -> str:
    """Why a child process failed, in words: its exit signal (SIGKILL is almost always the kernel's
    out-of-memory killer) or the last lines of its error output."""
    import signal

    sig = -returncode if returncode < 0 else (returncode - 128 if returncode > 128 else None)
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "unknown signal"
        why = f"killed by signal {sig} ({name})"
        if sig == signal.SIGKILL:
            why += ": most likely out of memory (the kernel's OOM killer; see dmesg)"
        tail = stderr.strip().splitlines()[-3:]
        return why + (f"; last output: {' | '.join(tail)}" if tail else "")
    tail = [line for line in stderr.strip().splitlines() if line.strip()][-3:]
    if not tail:
        return f"exit status {returncode}, no error output"
    return f"exit status {returncode}: " + " | ".join(tail)


def run_child(code: str, args: list[str], timeout: float = 1800) -> tuple[str | None, str | None]:
    """Runs ``python -c code *args`` from the repository root; returns (its last stdout line, None)
    or (None, why it failed)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=root, timeout=timeout,
            env={**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")},
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return None, describe_child_failure(proc.returncode, proc.stderr)
    return lines[-1], None


def peak_memory(entry_name: str, case: dict, provider: str, device: str, log=print) -> tuple[int | None, str | None]:
    """Runs ``peak_memory_child`` in a fresh interpreter so earlier allocations do not hide the peak
    (on CUDA the caching allocator's own peak counter is exact, so it runs in this process).
    Returns (bytes, None), or (None, why there is no measurement)."""
    entry = load_entry(entry_name)
    need = entry.memory(case, provider, device) if entry.memory is not None else None
    short = memory_shortfall(need, device, f"the {provider} call")
    if short is not None:
        return None, "skipped: " + short
    if device.startswith("cuda"):
        release_memory(entry, device)
        try:
            return peak_memory_child(entry_name, case, provider, device), None
        except torch.cuda.OutOfMemoryError as exc:
            return None, f"CUDA out of memory: {str(exc).splitlines()[0]}"
    code = (
        f"import json,sys; from {_PACKAGE}.harness import peak_memory_child; "
        "a=json.loads(sys.argv[1]); print(peak_memory_child(a['e'], a['c'], a['p'], a['d']))"
    )
    out, why = run_child(code, [json.dumps({"e": entry_name, "c": case, "p": provider, "d": device})])
    if why is not None:
        if need is not None:
            why += f" (estimated need ~{need / GiB:.1f} GB)"
        return None, "measurement failed: " + why
    return int(out), None


# glibc's malloc serves a request above its mmap threshold (128 KiB at start) with a fresh mapping and
# raises the threshold (to at most 32 MiB) when such a block is freed, and it returns free memory at
# the top of the heap to the kernel above twice the threshold. A process early in its life therefore
# hands the few-MB temporaries of an eager step back to the kernel after every call and page-faults
# them in again on the next: measured here, the cmattn_loss reference at C = 200 took ~2000 minor
# page faults per call and ran 20-30% slower than in a process that had once freed a large block,
# while the fast path (pooled outputs) took none. A training process is in the second state: the
# vision encoder's activations are tens of MB each. So the timings are taken there, whatever ran
# before in this process (machine_rates's 16 MB GEMM operands happened to settle full runs; quick
# runs, callers of run_entry and ad-hoc timing scripts were not).
_SETTLE_BYTES = 31 * 1024 * 1024  # below glibc's 32 MiB cap on the dynamic threshold
_allocator_settled = False


def settle_allocator() -> None:
    """Puts glibc's malloc into the steady state of a long-running training process (see above):
    one large block allocated and freed raises its mmap and trim thresholds for good. Once
    per process; harmless under other allocators."""
    global _allocator_settled
    if _allocator_settled:
        return
    block = torch.empty(_SETTLE_BYTES // 4, dtype=torch.float32)  # mapped, never touched
    del block
    _allocator_settled = True


def machine_rates(device: str, quick: bool) -> dict:
    """The machine's own fp32 GEMM rate (GFLOP/s) and copy bandwidth (GB/s), measured now."""
    n = (1024 if quick else 2048) * (4 if device.startswith("cuda") else 1)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    gemm = time_fn(lambda: a @ b, device, warmup=2, repeats=5 if quick else 10)
    src = torch.randn(32 * 1024 * 1024 // 4 * (1 if quick else 4), device=device)
    dst = torch.empty_like(src)
    copy = time_fn(lambda: dst.copy_(src), device, warmup=2, repeats=5 if quick else 10)
    return {
        "gemm_gflops": 2 * n**3 / (gemm["median_ms"] * 1e-3) / 1e9,
        "copy_gbps": 2 * src.numel() * 4 / (copy["median_ms"] * 1e-3) / 1e9,
        "gemm_n": n,
    }


def skipped_row(entry: Entry, case: dict, device: str, reason: str) -> dict:
    return {"entry": entry.name, "case": case, "device": device, "skipped": reason}


def run_entry(entry: Entry, device: str, quick: bool, measure_memory: bool = True, log=print,
              on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Times every case of ``entry``; ``on_row(row)`` is called as each case finishes (the runner
    writes its results there, so a run stopped part-way keeps what it measured). A case whose
    estimated memory does not fit is skipped with a row that says why (``row["skipped"]``)."""
    if entry.run is not None:
        rows = entry.run(device, quick, log)
        for row in rows:
            if on_row is not None:
                on_row(row)
        return rows
    rows = []
    for case in entry.cases(quick):
        release_memory(entry, device)  # what the previous case left in this process's heap
        need = None
        if entry.memory is not None:
            need = sum(entry.memory(case, provider, device) for provider in PROVIDERS)
        short = memory_shortfall(need, device, "timing both providers")
        if short is not None:
            log(f"  [skip] {entry.name} {case}: {short}")
            row = skipped_row(entry, case, device, short)
            rows.append(row)
            if on_row is not None:
                on_row(row)
            continue
        row = {"entry": entry.name, "case": case, "device": device, "backend": entry.backend(case, device)}
        settle_allocator()
        fns = {provider: entry.make(case, provider, device) for provider in PROVIDERS}
        outputs = {provider: fn() for provider, fn in fns.items()}
        repeats = {}
        for provider in PROVIDERS:
            n = entry.quick_repeats if quick else entry.repeats
            if provider == "fast" and entry.fast_repeats is not None and not quick:
                n = entry.fast_repeats
            if device.startswith("cuda"):  # GPU calls take milliseconds: more repeats, steadier medians
                n = max(n, 10 if quick else 30)
            repeats[provider] = n
        # full runs: reference and fast take turns in TIMING_ROUNDS blocks (time_alternating)
        timings = time_alternating(fns, device, warmup=2 if device.startswith("cuda") else 1, repeats=repeats,
                                   rounds=1 if quick else TIMING_ROUNDS)
        del fns
        for provider in PROVIDERS:
            row[provider] = timings[provider]
        row["speedup"] = row["reference"]["median_ms"] / row["fast"]["median_ms"]
        if entry.oracle is not None:
            exact = entry.oracle(case, device)
            row["parity_max_rel_err"] = max_rel_err(outputs["fast"], exact)
            row["parity_vs"] = "float64 reference"
            row["reference_rel_err"] = max_rel_err(outputs["reference"], exact)
            del exact
        else:
            row["parity_max_rel_err"] = max_rel_err(outputs["fast"], outputs["reference"])
        del outputs
        work = entry.work(case)
        for key, unit, scale in (("flops", "gflops", 1e9), ("bytes", "gbps", 1e9)):
            if key in work:
                for provider in PROVIDERS:
                    row[provider][unit] = work[key] / (row[provider]["median_ms"] * 1e-3) / scale
        if entry.extras is not None:
            row.update(entry.extras(case, device, quick))
        if measure_memory:
            # after the timing and the extras, with this process's memory handed back: the child
            # runs beside this process, and both must fit
            release_memory(entry, device)
            for provider in PROVIDERS:
                peak, why = peak_memory(entry.name, case, provider, device)
                row[provider]["peak_bytes"] = peak
                if why is not None:
                    row[provider]["peak_note"] = why
                    log(f"  [memory] {entry.name} {case} {provider}: {why}")
        ref_mem, fast_mem = row["reference"].get("peak_bytes"), row["fast"].get("peak_bytes")
        if ref_mem and fast_mem:
            row["memory_ratio"] = ref_mem / max(fast_mem, 1)
        log(
            f"  {entry.name} {case}: reference {row['reference']['median_ms']:.2f} ms, fast "
            f"{row['fast']['median_ms']:.2f} ms ({row['backend']}), speedup {row['speedup']:.2f}x, "
            f"parity {row['parity_max_rel_err']:.1e}"
        )
        rows.append(row)
        if on_row is not None:
            on_row(row)
    release_memory(entry, device)
    return rows


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
    except OSError:
        info["cpu_model"] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info
