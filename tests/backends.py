"""Which backends each op can run here, for parametrising parity tests."""
import os
import subprocess
import sys

import pytest
import torch

from guidg_fast.ops import _backend


def cpu_backends(op: str):
    """Every fused backend of ``op`` that can run on CPU tensors here (Triton only in interpreter mode)."""
    params = []
    spec = _backend.REGISTRY[op]
    for backend in ("ext", "triton") if spec.triton else ("ext",):
        runnable = backend in _backend.available(op, "cpu")
        reason = f"{backend} cannot run {op} on CPU here: {_backend._why_not(spec, backend, 'cpu')}"
        if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
            reason = "set TRITON_INTERPRET=1 to run Triton kernels on the CPU"
        params.append(pytest.param(backend, marks=pytest.mark.skipif(not runnable, reason=reason), id=backend))
    return params


def require_ext() -> bool:
    """CI sets GUIDG_FAST_REQUIRE_EXT=1: then a missing extension fails instead of skipping."""
    return os.environ.get("GUIDG_FAST_REQUIRE_EXT") == "1"


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# compile_sm90(kernel, signature, constexprs, **options) for the scripts of run_sm90_compile:
# constexprs go to ASTSource keyed by argument index, which every Triton since 3.3 reads (3.5
# ignores name keys)
_SM90_PRELUDE = r"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_sm90(kernel, signature, constexprs, **options):
    names = list(kernel.arg_names)
    full = {n: "constexpr" if n in constexprs else signature[n] for n in names}
    keyed = {(names.index(n),): v for n, v in constexprs.items()}
    return triton.compile(ASTSource(fn=kernel, signature=full, constexprs=keyed), target=GPUTarget("cuda", 90, 32),
                          options=options)
"""


def run_sm90_compile(body: str, tmp_path) -> None:
    """Compile Triton kernels for an H100 (sm_90) without a GPU: the interpreter never lowers
    kernels, so type and layout errors only the real compiler sees fail here, not on a GPU run.

    ``body`` is Python that calls ``compile_sm90(kernel, signature, constexprs, **options)`` (types
    of the runtime arguments and values of the compile-time ones, by name), asserts on the results
    and prints "compiled". It runs in a fresh process with TRITON_INTERPRET=0: in the test process
    the kernels may be interpreter wrappers, and the interpreter of triton < 3.6 leaves
    triton.language patched once it has run a kernel. Skips without Triton's NVIDIA backend.
    """
    pytest.importorskip("triton")
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("triton has no NVIDIA backend here")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    # cwd away from the checkout: `python -c` puts the cwd first on sys.path, and the source tree's
    # guidg_fast has no kernels/ subpackage (setup.py maps it from ./kernels when installing)
    proc = subprocess.run([sys.executable, "-c", _SM90_PRELUDE + body], capture_output=True, text=True, env=env,
                          timeout=600, cwd=str(tmp_path))
    if proc.returncode != 0 and "ptxas" in proc.stderr:
        pytest.skip(f"no NVIDIA assembler here: {proc.stderr[-500:]}")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
