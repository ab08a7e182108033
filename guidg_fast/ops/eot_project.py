"""eot_project: EOT rows of the text tower -> ln_final -> text projection -> L2 normalisation.

out[n] = normalize(layer_norm(x[n, eot_index[n]]) @ proj). Only the N EOT rows are read (the text
feature depends on nothing else), so the (N, S, W) hidden states never go through ln_final whole.

Backends:
- ``eager``: ``eot_project_eager`` below (gather, F.layer_norm, matmul, divide by the norm), the
  per-op parity oracle.
- ``ext`` (C++ CPU / CUDA) and ``triton``: gather + layer norm fused per row, the (N, W) x (W, D)
  projection as one GEMM, normalisation fused per row; fused backward. Registered with torch.library
  as ``guidg_fast::fused_eot_project`` / ``guidg_fast::fused_eot_project_backward``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _checks
from . import _backend

SPEC = _backend.register(
    _backend.OpSpec("eot_project", ext_ops=("eot_project_forward", "eot_project_backward"), triton=False)
)


def _check_eot_project(x, eot_index, ln_weight, ln_bias, proj, eps) -> float:
    _checks.check_tensor(x, "x", 3)
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    N, S, W = x.shape
    if min(N, S, W) == 0:
        raise ValueError(f"x must be non-empty (N, S, W), got shape {tuple(x.shape)}")
    if not isinstance(eot_index, torch.Tensor):
        raise ValueError(f"eot_index must be a torch.Tensor of row indices, got {type(eot_index).__name__}")
    if eot_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"eot_index must be an int64 (or int32) tensor, got dtype {eot_index.dtype}")
    if tuple(eot_index.shape) != (N,):
        raise ValueError(f"eot_index must have shape ({N},) = (N,) to match x, got {tuple(eot_index.shape)}")
    if eot_index.device != x.device:
        raise ValueError(f"eot_index must be on x's device {x.device}, got {eot_index.device}")
    lo, hi = (int(t) for t in torch.aminmax(eot_index))
    if lo < 0 or hi >= S:
        raise ValueError(f"eot_index must hold row indices in [0, {S}) (S = {S}), got values in [{lo}, {hi}]")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        _checks.check_tensor(t, name, 1)
        _checks.check_same(t, name, x, "x")
        _checks.check_shape(t, name, (W,), "W, the width of x")
    _checks.check_tensor(proj, "proj", 2)
    _checks.check_same(proj, "proj", x, "x")
    if proj.shape[0] != W or proj.shape[1] == 0:
        raise ValueError(f"proj must have shape ({W}, D) with D >= 1 (W = width of x), got {tuple(proj.shape)}")
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite positive number, got {eps}")
    return eps


def eot_project_eager(x, eot_index, ln_weight, ln_bias, proj, eps=1e-5) -> torch.Tensor:
    """The per-op parity oracle, plain torch autograd."""
    eps = _check_eot_project(x, eot_index, ln_weight, ln_bias, proj, eps)
    return _eot_project_math(x, eot_index, ln_weight, ln_bias, proj, eps)


def _eot_project_math(x, eot_index, ln_weight, ln_bias, proj, eps: float) -> torch.Tensor:
    rows = x[torch.arange(x.shape[0], device=x.device), eot_index.long()]
    y = F.layer_norm(rows, (x.shape[-1],), ln_weight, ln_bias, eps)
    z = y @ proj
    return z / z.norm(dim=-1, keepdim=True)


def eot_project(x, eot_index, ln_weight, ln_bias, proj, eps=1e-5) -> torch.Tensor:
    """(N, D) L2-normalised text features from the EOT rows of the final hidden states x (N, S, W)."""
    eps = _check_eot_project(x, eot_index, ln_weight, ln_bias, proj, eps)
    backend = _backend.choose("eot_project", x.device)
    if backend == "eager":
        return _eot_project_math(x, eot_index, ln_weight, ln_bias, proj, eps)
    return _fused(x, eot_index, ln_weight, ln_bias, proj, eps, backend)


def _fused(x, eot_index, ln_weight, ln_bias, proj, eps, backend):
    raise NotImplementedError  # replaced by the torch.library path once the kernels exist
