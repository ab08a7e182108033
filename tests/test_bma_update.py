"""bma_update_: every backend against the reference, on fresh random tensors of many sizes and dtypes."""
import pytest
import torch

import guidg_fast as gf
from guidg_fast import ops, reference
from guidg_fast.ops import _backend
from backends import cpu_backends, cuda_only, require_ext, run_sm90_compile
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
    before = [a.clone() for a in avg]
    expected = [a.clone() for a in avg]
    reference.bma_update_(expected, val, r)
    with ops.use_backend(backend):
        ops.bma_update_(avg, val, r)
    if dtype in (torch.float32, torch.float64):
        for i, (a, e) in enumerate(zip(avg, expected)):
            assert_close(a, e, f"tensor {i}")
        return
    # float16 / bfloat16: the reference rounds after the product, the sum and the division (a few
    # units in the last place off), the kernels compute in float32 and round once; so the kernels are
    # held to the exact update (float64) within one unit in the last place, element by element
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    for i, (a, a0, v) in enumerate(zip(avg, before, val)):
        exact = (a0.double() + r * v.double()) / (1 + r)
        off = (a.double() - exact).abs() - (eps * exact.abs() + tiny)
        assert not bool((off > 0).any()), f"tensor {i}: {int((off > 0).sum())} elements more than 1 ulp off"


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


@pytest.mark.parametrize("backend", cpu_backends("bma_update_"))
def test_opcheck_bma_update(backend):
    avg, val = [torch.randn(3, 4), torch.randn(5)], [torch.randn(3, 4), torch.randn(5)]
    torch.library.opcheck(torch.ops.guidg_fast.bma_update_.default, (avg, val, 0.3, backend))


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


def test_broken_triton_interpreter_falls_back(monkeypatch):
    # an interpreter that cannot run the probe kernel (triton < 3.6 with NumPy >= 2.4): Triton is
    # not offered on CPU tensors, the reason names the problem, the op still runs on another backend
    pytest.importorskip("triton")
    from guidg_fast.kernels import _probe

    def broken():
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_probe, "interpreter_runs_loops", broken)
    monkeypatch.setattr(_backend, "_interpreter_checked", False)
    monkeypatch.setattr(_backend, "_interpreter_error", None)
    monkeypatch.setattr(_backend, "_available_cache", {})
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(RuntimeWarning, match="cannot run a loop over a runtime bound"):
        assert "triton" not in _backend.available("bma_update_", "cpu")
    with ops.use_backend("triton"):
        with pytest.raises(RuntimeError, match=r"only 0-dimensional arrays.*triton < 3.6 needs numpy < 2.4"):
            ops.bma_update_([torch.zeros(2)], [torch.ones(2)], 1.0)
    avg = [torch.zeros(2)]
    ops.bma_update_(avg, [torch.ones(2)], 1.0)
    assert torch.equal(avg[0], torch.full((2,), 0.5))


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


TRITON_ONLY = [p for p in cpu_backends("bma_update_") if p.id == "triton"]


@pytest.mark.parametrize("backend", TRITON_ONLY)
def test_bma_update_triton_one_launch_per_group(backend, monkeypatch):
    from guidg_fast.kernels import bma_update as kernels

    launches = []
    real = kernels._bma_update_forward_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(kernels, "_bma_update_forward_kernel", Counting())
    avg = [torch.randn(70000), torch.randn(3), torch.randn(5, dtype=torch.float64), torch.randn(2, 2)]
    val = [torch.randn_like(a) for a in avg]
    expected = [a.clone() for a in avg]
    reference.bma_update_(expected, val, 0.2)
    with ops.use_backend(backend):
        ops.bma_update_(avg, val, 0.2)
    # two (device, dtype) groups -> two launches; the float32 group covers 2 + 1 + 1 chunks
    assert sorted(g[0] for g in launches) == [1, 4]
    for i, (a, e) in enumerate(zip(avg, expected)):
        assert_close(a, e, f"tensor {i}")


@pytest.mark.parametrize("backend", TRITON_ONLY)
def test_bma_update_triton_views_of_one_buffer(backend):
    # parameters flattened into one buffer (e.g. FSDP-style): views at odd element offsets
    flat_avg, flat_val = torch.randn(1 + 7 + 12 + 5 + 1), torch.randn(26)
    bounds = [(1, 8), (8, 20), (20, 25)]
    avg = [flat_avg[a:b] for a, b in bounds]
    val = [flat_val[a:b] for a, b in bounds]
    expected = flat_avg.clone()
    reference.bma_update_([expected[a:b] for a, b in bounds], val, 3.0)
    with ops.use_backend(backend):
        ops.bma_update_(avg, val, 3.0)
        ops.bma_update_(avg, val, 3.0)  # second call reuses the cached address table
    reference.bma_update_([expected[a:b] for a, b in bounds], val, 3.0)
    assert flat_avg[0] == expected[0] and flat_avg[25] == expected[25]  # neighbours untouched
    assert_close(flat_avg, expected, "flat buffer")


_BMA_SM90 = r"""
import re
from guidg_fast.kernels import bma_update as kernels
for dtype, acc in ((tl.float32, tl.float32), (tl.bfloat16, tl.float32), (tl.float64, tl.float64)):
    constexprs = {"DTYPE": dtype, "ACC": acc, "ACC_IS_FP32": acc == tl.float32, "CHUNK": kernels._CHUNK,
                  "BLOCK": kernels._BLOCK}
    signature = {"tensor_table_ptr": "*i64", "chunk_table_ptr": "*i64",
                 "weights_ptr": "*fp32" if acc == tl.float32 else "*fp64", "n_tensors": "i32", "n_chunks": "i32"}
    ptx = compile_sm90(kernels._bma_update_forward_kernel, signature, constexprs, num_warps=kernels._NUM_WARPS,
                       enable_fp_fusion=False).asm["ptx"]
    if acc == tl.float32:
        # correctly rounded like the reference; triton < 3.6 always compiles it through libdevice with
        # flush-to-zero (div.rn.ftz: a quotient below 1.2e-38 becomes 0), later ones to plain div.rn
        assert re.search(r"div\.rn(\.ftz)?\.f32", ptx), "division not correctly rounded (the reference's is)"
    assert "fma.rn" not in ptx, "product and sum fused (the reference rounds them separately)"
print("compiled")
"""


def test_bma_update_triton_kernel_compiles_for_gpu(tmp_path):
    run_sm90_compile(_BMA_SM90, tmp_path)


@cuda_only
def test_bma_update_triton_cuda_matches_reference():
    if "triton" not in _backend.available("bma_update_", "cuda"):
        pytest.skip("triton cannot run on CUDA here")
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        avg, val = _pairs(dtype, "cuda")
        expected = [a.clone() for a in avg]
        reference.bma_update_(expected, val, 0.7)
        with ops.use_backend("triton"):
            ops.bma_update_(avg, val, 0.7)
        for a, e in zip(avg, expected):
            assert_close(a.float(), e.float(), tol=1e-5 if dtype != torch.bfloat16 else 1e-2)
