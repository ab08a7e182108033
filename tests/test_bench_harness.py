"""The benchmark harness's timing: reference and fast take turns in blocks (a slow minute of a
shared machine then lands on both sides of a ratio), in a process whose allocator is in a training
process's steady state."""
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
