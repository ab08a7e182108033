"""bma_update_: every backend against the reference, on fresh random tensors of many sizes and dtypes."""
import pytest
import torch

import guidg_fast as gf
from guidg_fast import ops, reference
from guidg_fast.ops import _backend
from backends import cpu_backends, cuda_only, require_ext
from conftest import assert_close

SIZES = [(1,), (7,), (3, 5), (65536 * 2 + 3,), (4, 3, 3, 2), (0,)]


def _pairs(dtype, device="cpu"):
    avg = [torch.randn(s, dtype=dtype, device=device) for s in SIZES]
    val = [torch.randn(s, dtype=dtype, device=device) for s in SIZES]
    return avg, val


@pytest.mark.parametrize("backend", cpu_backends("bma_update_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r", [0.0, 0.37, 5.0])
def test_bma_update_matches_reference(backend, dtype, r):
    avg, val = _pairs(dtype)
    expected = [a.clone() for a in avg]
    reference.bma_update_(expected, val, r)
    with ops.use_backend(backend):
        ops.bma_update_(avg, val, r)
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2
    for i, (a, e) in enumerate(zip(avg, expected)):
        assert_close(a.float(), e.float(), f"tensor {i}", tol=tol)


@pytest.mark.parametrize("backend", cpu_backends("bma_update_"))
def test_bma_update_mixed_groups_and_strided(backend):
    avg = [torch.randn(5, 4), torch.randn(9, dtype=torch.float64), torch.randn(4, 6).t()]
    val = [torch.randn(5, 4), torch.randn(9, dtype=torch.float64), torch.randn(6, 4)]
    expected = [a.clone() for a in avg]
    reference.bma_update_(expected, val, 0.5)
    with ops.use_backend(backend):
        ops.bma_update_(avg, val, 0.5)
    for i, (a, e) in enumerate(zip(avg, expected)):
        assert_close(a, e, f"tensor {i}")


def test_extension_is_built_when_required():
    status = ops.extension_status()
    if require_ext():
        assert status["built"], status["error"]
        assert status["with_cuda"], "CI must compile the CUDA kernels into guidg_fast._C"
        assert "ext" in _backend.available("bma_update_", "cpu")
    elif not status["built"]:
        pytest.skip("guidg_fast._C not built")


@pytest.mark.skipif(not ops.extension_status()["built"], reason="guidg_fast._C not built")
def test_opcheck_bma_update():
    avg, val = [torch.randn(3, 4), torch.randn(5)], [torch.randn(3, 4), torch.randn(5)]
    torch.library.opcheck(torch.ops.guidg_fast.bma_update_.default, (avg, val, 0.3))


def test_beta_moving_average_uses_one_call(monkeypatch):
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    calls = []
    real = ops.bma_update_
    monkeypatch.setattr(ops, "bma_update_", lambda a, t, r: calls.append(len(list(a))) or real(a, t, r))
    bma = gf.BetaMovingAverage(module, total_steps=10)
    bma.update()
    assert calls == [4]


def test_bma_update_bad_inputs():
    with pytest.raises(ValueError, match="same length"):
        ops.bma_update_([torch.zeros(2)], [], 0.1)
    with pytest.raises(ValueError, match=r"averaged_tensors\[0\] has shape"):
        ops.bma_update_([torch.zeros(2)], [torch.zeros(3)], 0.1)
    with pytest.raises(ValueError, match=r"tensors\[0\] must have"):
        ops.bma_update_([torch.zeros(2)], [torch.zeros(2, dtype=torch.float64)], 0.1)
    with pytest.raises(ValueError, match="relative_weight"):
        ops.bma_update_([torch.zeros(2)], [torch.zeros(2)], float("nan"))


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with ops.use_backend("triton"):
        with pytest.raises(RuntimeError, match="cannot run bma_update_"):
            ops.bma_update_([torch.zeros(2)], [torch.zeros(2)], 0.1)
    with pytest.raises(ValueError, match="backend"):
        with ops.use_backend("fortran"):
            pass


@cuda_only
def test_bma_update_cuda_matches_reference():
    for dtype in (torch.float32, torch.bfloat16):
        avg, val = _pairs(dtype, "cuda")
        expected = [a.clone() for a in avg]
        reference.bma_update_(expected, val, 0.7)
        ops.bma_update_(avg, val, 0.7)
        for a, e in zip(avg, expected):
            assert_close(a.float(), e.float(), tol=1e-5 if dtype == torch.float32 else 1e-2)
