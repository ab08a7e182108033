"""steady_heap: inside it a large CPU block freed and allocated again takes no page faults (glibc
keeps it); outside it every such block is mapped and faulted in afresh; the trainer runs in it."""
import resource

import pytest
import torch

from guidg_fast.train import host_memory
from guidg_fast.train.host_memory import steady_heap

pytestmark = pytest.mark.skipif(host_memory._glibc() is None, reason="glibc malloc settings (another C library here)")

_BLOCK = 48 * 1024 * 1024  # above glibc's largest mmap threshold (32 MiB): always mapped by default


def _faults_of_reallocating(rounds=3):
    counts = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.ones(_BLOCK // 4)  # touched: every page is faulted in unless the memory is reused
        del block
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts


def _rss_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def test_freed_blocks_stay_in_the_process_inside_and_are_returned_on_leaving():
    pages = _BLOCK // 4096
    with steady_heap("cpu"):
        with steady_heap("cpu"):  # nested: the inner exit keeps the outer block's settings
            _faults_of_reallocating(1)
        counts = _faults_of_reallocating(8)
        # reused, not faulted in again: a small allocation in between may split the freed block
        # (a fresh block then) in a round or two, so the median round is judged, not every round
        # (mapped afresh, every round takes ~pages faults)
        later = sorted(counts[1:])
        assert later[len(later) // 2] < pages // 20, counts
        held = _rss_bytes()
    # leaving returns the free memory (malloc_trim): the freed blocks no longer count in the RSS
    assert _rss_bytes() < held - _BLOCK // 2, (held, _rss_bytes())


def test_other_devices_are_left_alone():
    with steady_heap("meta"):
        assert host_memory._depth == 0


def test_trainer_entry_points_run_on_the_steady_heap(monkeypatch):
    import contextlib

    import guidg_fast as gf
    from guidg_fast.train import guidg

    entered = []

    @contextlib.contextmanager
    def recording(device):
        entered.append(torch.device(device).type)
        with steady_heap(device):
            yield

    monkeypatch.setattr(guidg, "steady_heap", recording)
    trainer = gf.GuiDG(gf.TINY_ARCH, classnames=["a", "b"], domains=["d0"], n_ctx=2, seed=0)
    g = torch.Generator().manual_seed(0)
    data = {"d0": [(torch.randn(3, 32, 32, generator=g), i % 2) for i in range(4)]}
    trainer.fit_experts(data, iterations=1, batch_size=4, progress=False)
    trainer.finetune(data, iterations=1, batch_per_domain=2, progress=False)
    trainer.evaluate(data, batch_size=4)
    assert entered == ["cpu", "cpu", "cpu"] and host_memory._depth == 0
