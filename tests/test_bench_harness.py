"""The benchmark harness: its timing (reference and fast take turns in blocks, so a slow minute of a
shared machine lands on both sides of a ratio, in a process whose allocator is in a training
process's steady state), its memory check and its report of a failed memory measurement."""
import subprocess
import sys

import pytest

from guidg_fast.bench import harness


def test_time_alternating_takes_turns_and_counts_repeats():
    calls = []
    fns = {"reference": lambda: calls.append("r"), "fast": lambda: calls.append("f")}
    out = harness.time_alternating(fns, "cpu", warmup=1, repeats={"reference": 6, "fast": 9}, rounds=3)
    assert len(out["reference"]["times_ms"]) == 6 and len(out["fast"]["times_ms"]) == 9
    warm, timed = calls[:2], "".join(calls[2:])
    assert warm == ["r", "f"]
    # three rounds, the first callable first in even rounds; each block = 1 untimed + its share
    assert timed == "rrr" + "ffff" + "ffff" + "rrr" + "rrr" + "ffff"
    for t in out.values():
        assert t["q20_ms"] <= t["median_ms"] <= t["q80_ms"]


def test_time_alternating_single_round_is_plain_timing():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    out = harness.time_alternating(fns, "cpu", warmup=0, repeats={"a": 2, "b": 1}, rounds=1)
    assert "".join(calls) == "aaa" + "bb" and len(out["a"]["times_ms"]) == 2


_FAULTS_PER_REFERENCE_CALL = """
import resource, sys
from guidg_fast.bench import harness
from guidg_fast.bench.entries import cmattn_loss
if sys.argv[1] == "settle":
    harness.settle_allocator()
fn = cmattn_loss.make(dict(B=36, K=3, H=4, D=512, C=200, metric="cosine"), "reference", "cpu")
for _ in range(3):
    fn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    fn()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts minor page faults (getrusage on Linux)")
def test_settle_allocator_stops_the_eager_reference_page_faulting(tmp_path):
    # a fresh interpreter (this one's allocator has long been settled by earlier tests); from a
    # temporary cwd, so it imports the installed package. Unsettled, this reference call takes
    # ~2000 minor faults here (its temporaries go back to the kernel after every call).
    proc = subprocess.run([sys.executable, "-c", _FAULTS_PER_REFERENCE_CALL, "settle"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    faults = float(proc.stdout.strip().splitlines()[-1])
    assert faults < 300, f"{faults} minor page faults per reference call after settle_allocator()"


def test_a_killed_memory_child_says_it_was_killed():
    # the child SIGKILLs itself, as the OOM killer would: the report names the signal and the likely cause
    out, why = harness.run_child("import os, signal; print('started'); os.kill(os.getpid(), signal.SIGKILL)", [])
    assert out is None
    assert "signal 9" in why and "SIGKILL" in why and "out of memory" in why


def test_a_failing_memory_child_reports_its_error_text():
    out, why = harness.run_child("raise ValueError('case C=200 is malformed')", [])
    assert out is None and "exit status 1" in why and "ValueError: case C=200 is malformed" in why
    assert harness.run_child("print(41 + 1)", [])[0] == "42"


def test_a_case_that_does_not_fit_is_skipped_with_the_reason(monkeypatch):
    made = []
    entry = harness.Entry(name="huge", cases=lambda quick: [{"C": 1}], make=lambda *a: made.append(a),
                          memory=lambda case, provider, device: 1e9)
    monkeypatch.setattr(harness, "available_memory", lambda device: int(1.5e9))
    seen, log = [], []
    rows = harness.run_entry(entry, "cpu", quick=True, on_row=seen.append, log=log.append)
    assert made == [] and rows == seen and len(rows) == 1
    assert "needs ~1.9 GB" in rows[0]["skipped"] and "1.4 GB available (MemAvailable" in rows[0]["skipped"]
    assert "[skip] huge" in log[0]


def test_guidg_run_quick_reports_both_sides_with_phase_shares(tmp_path, monkeypatch):
    from guidg_fast.bench.entries import guidg_run

    monkeypatch.setenv("GUIDG_FAST_BENCH_DATA", str(tmp_path))
    (row,) = guidg_run.run("cpu", quick=True, log=lambda *a: None)
    assert len(list(tmp_path.glob("640x480-n1/sketch/*/*.jpg"))) == len(guidg_run.CLASSES)
    for side in ("reference", "fast"):
        r = row[side]
        assert r["step2_s_per_iter"] > 0 and r["eval_img_per_s"] > 0 and r["step1_s_per_iter"] > 0
        assert set(r["step2_phase_share"]) == set(guidg_run.PHASES)
        assert abs(sum(r["step2_phase_share"].values()) - 1) < 1e-6
        assert r["step2_phase_share"]["encoder"] > 0 and r["step2_phase_share"]["optimizer"] > 0
        assert abs(sum(r["eval_phase_share"].values()) - 1) < 1e-6
    assert row["pipeline"]["official_step2_img_per_s_per_core"] > 0
    assert row["speedup"] == row["reference"]["median_ms"] / row["fast"]["median_ms"]
    assert "step 2 share: guidance" in row["summary_md"]
