"""The benchmark harness's timing: reference and fast take turns in blocks (a slow minute of a
shared machine then lands on both sides of a ratio)."""
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
