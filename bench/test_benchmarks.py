"""pytest-benchmark suites over the same entries as ``guidg-fast bench`` (not part of the default test run).

    pytest bench/test_benchmarks.py --benchmark-only [-k cmattn] [--benchmark-json out.json]
"""
import pytest

from bench.harness import PROVIDERS, load_entry
from bench.run import entry_names

CASES = [
    pytest.param(name, case, provider, id=f"{name}-{'-'.join(f'{k}{v}' for k, v in case.items())}-{provider}")
    for name in entry_names()
    if load_entry(name).run is None  # whole-run entries (guidg_run) are timed by the runner only
    for case in load_entry(name).cases(True)
    for provider in PROVIDERS
]


@pytest.mark.parametrize("name,case,provider", CASES)
def test_entry(benchmark, name, case, provider):
    fn = load_entry(name).make(case, provider, "cpu")
    benchmark.group = f"{name} {case}"
    benchmark(fn)
