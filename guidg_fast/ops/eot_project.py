"""eot_project: EOT rows of the text tower -> ln_final -> text projection -> L2 normalisation.

out[n] = normalize(layer_norm(x[n, eot_index[n]]) @ proj). Only the N EOT rows are read (the text
feature depends on nothing else), so the (N, S, W) hidden states never go through ln_final whole.

Backends:
- ``eager``: ``eot_project_eager`` below (gather, F.layer_norm, matmul, divide by the norm), the
  per-op parity oracle.
- ``ext`` (C++ CPU / CUDA) and ``triton``: gather + layer norm fused per row, the (N, W) x (W, D)
  projection as one GEMM, normalisation fused per row; fused backward. Registered with torch.library
  as ``guidg_fast::eot_project`` / ``guidg_fast::eot_project_backward`` (the op's only schemas; ext
  calls guidg_fast._C.eot_project_forward / _backward).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _checks
from . import _backend

SPEC = _backend.register(
    _backend.OpSpec("eot_project", ext_ops=("eot_project_forward", "eot_project_backward"), triton=True)
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
    # a data-dependent check reads the tensor on the host: skipped while torch.compile traces (the C++
    # kernels check the rows again)
    if not torch.compiler.is_compiling():
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
    backend = _backend.backend_for("eot_project", x.device.type)
    if backend == "eager":
        return _eot_project_math(x, eot_index, ln_weight, ln_bias, proj, eps)
    return _fused(x, eot_index, ln_weight, ln_bias, proj, eps, backend)


def _fused(x, eot_index, ln_weight, ln_bias, proj, eps, backend):
    dtype = x.dtype
    compute = _backend.kernel_dtype(dtype, backend, x.device)
    if dtype != compute:
        x, ln_weight, ln_bias, proj = (t.to(compute) for t in (x, ln_weight, ln_bias, proj))
    out = torch.ops.guidg_fast.eot_project(x, eot_index.long(), ln_weight, ln_bias, proj, eps, backend)[0]
    return out.to(dtype)


def _kernels():
    from ..kernels import eot_project as kernels  # imported late: TRITON_INTERPRET is read at import

    return kernels


@torch.library.custom_op("guidg_fast::eot_project", mutates_args=())
def fused_eot_project(
    x: torch.Tensor, eot_index: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, proj: torch.Tensor,
    eps: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (N, D), xhat (N, W), rstd (N,), inv_norm (N,)); only out carries gradient."""
    if backend == "ext":
        return tuple(_backend.load_extension().eot_project_forward(x, eot_index, ln_weight, ln_bias, proj, eps))
    if backend == "triton":
        return tuple(_kernels().eot_project_forward(x, eot_index, ln_weight, ln_bias, proj, eps))
    raise ValueError(f"backend must be 'ext' or 'triton' for the fused eot_project, got {backend!r}")


def _forward_fake(x, eot_index, ln_weight, ln_bias, proj, eps, *backend):
    N, _, W = x.shape
    return x.new_empty((N, proj.shape[1])), x.new_empty((N, W)), x.new_empty((N,)), x.new_empty((N,))


fused_eot_project.register_fake(_forward_fake)


@torch.library.custom_op("guidg_fast::eot_project_backward", mutates_args=())
def fused_eot_project_backward(
    grad_out: torch.Tensor, out: torch.Tensor, inv_norm: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor,
    eot_index: torch.Tensor, x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, proj: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (N, S, W), d ln_weight, d ln_bias, d proj); dx is zero outside the EOT rows."""
    args = (grad_out, out, inv_norm, xhat, rstd, eot_index, x, ln_weight, ln_bias, proj)
    if backend == "ext":
        return tuple(_backend.load_extension().eot_project_backward(*args))
    if backend == "triton":
        return tuple(_kernels().eot_project_backward(*args))
    raise ValueError(f"backend must be 'ext' or 'triton' for the fused eot_project, got {backend!r}")


def _backward_fake(grad_out, out, inv_norm, xhat, rstd, eot_index, x, ln_weight, ln_bias, proj, *backend):
    return x.new_empty(x.shape), x.new_empty(ln_weight.shape), x.new_empty(ln_bias.shape), x.new_empty(proj.shape)


fused_eot_project_backward.register_fake(_backward_fake)


def _setup_context(ctx, inputs, output):
    x, eot_index, ln_weight, ln_bias, proj, eps, backend = inputs
    out, xhat, rstd, inv_norm = output
    ctx.mark_non_differentiable(xhat, rstd, inv_norm)
    ctx.save_for_backward(out, inv_norm, xhat, rstd, eot_index, x, ln_weight, ln_bias, proj)
    ctx.backend = backend


def _backward(ctx, grad_out, *unused):
    grads = fused_eot_project_backward(grad_out, *ctx.saved_tensors, ctx.backend)
    dx, dw, db, dproj = grads
    return dx, None, dw, db, dproj, None, None


fused_eot_project.register_autograd(_backward, setup_context=_setup_context)
