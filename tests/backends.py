"""Which backends each op can run here, for parametrising parity tests."""
import os

import pytest
import torch

from guidg_fast.ops import _backend


def cpu_backends(op: str):
    """Every fused backend of ``op`` that can run on CPU tensors here (Triton only in interpreter mode)."""
    params = []
    spec = _backend.REGISTRY[op]
    for backend in ("ext", "triton") if spec.triton else ("ext",):
        runnable = backend in _backend.available(op, "cpu")
        reason = f"{backend} cannot run {op} on CPU here"
        if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
            reason = "set TRITON_INTERPRET=1 to run Triton kernels on the CPU"
        params.append(pytest.param(backend, marks=pytest.mark.skipif(not runnable, reason=reason), id=backend))
    return params


def require_ext() -> bool:
    """CI sets GUIDG_FAST_REQUIRE_EXT=1: then a missing extension fails instead of skipping."""
    return os.environ.get("GUIDG_FAST_REQUIRE_EXT") == "1"


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
