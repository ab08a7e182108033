"""cross_modal_attention (cmattn): per-sample expert weights (B, K) of GuiDG's CMAttn.

    q_h      = f @ wv[h]^T + bv[h]                         (B, D)   every head: ONE (B, D) x (D, H*D) GEMM
    key_{h,k} = sum_c wt[h, c] T[k, c, :] + bt[h]           (D)      every head and expert: ONE batched GEMM
    s_{b,h,k} = cosine(q_{h,b}, key_{h,k})  or  q . key / sqrt(D)
    out[b, k] = mean_h softmax_k(s_{b,h,:})                          ONE fused kernel (scores, softmax, mean)

Backward: one fused kernel turns grad_out (B, K) into dq (B, H, D) and dkey (K, H, D) (score,
softmax and head-mean backward together); GEMMs then give the parameter and input gradients.
f and T get gradients only when they require grad (CrossModalAttention detaches them, so a
training step skips those two GEMMs).

Backends: Triton (kernels/cmattn.py) or the C++/CUDA extension (csrc/{cpu,cuda}/cmattn.*) for the
fused score step, the eager reference otherwise. The GEMMs around it are written once, below
(_projections / _projection_grads), for both backends. One torch.library custom op pair,
``guidg_fast::cmattn`` / ``guidg_fast::cmattn_backward`` (the op's only schemas), with one
register_fake each and one autograd registration, serves eager mode and torch.compile alike; its
``ext`` backend calls guidg_fast._C.cmattn_forward / cmattn_backward. Half-precision inputs are
computed in fp32 and cast back.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks, reference
from . import _backend

SPEC = _backend.register(_backend.OpSpec("cmattn", ext_ops=("cmattn_forward", "cmattn_backward"), triton=True))

_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def _kernels():
    from ..kernels import cmattn as triton_cmattn  # lazy: importing triton is slow

    return triton_cmattn


def _scores_forward(q: Tensor, keys: Tensor, cosine: bool, backend: str) -> Tensor:
    if backend == "triton":
        return _kernels().cmattn_forward(q, keys, cosine)
    return _backend.load_extension().cmattn_forward(q, keys, cosine)


def _scores_backward(grad_out: Tensor, q: Tensor, keys: Tensor, cosine: bool, backend: str):
    if backend == "triton":
        return _kernels().cmattn_backward(grad_out, q, keys, cosine)
    return _backend.load_extension().cmattn_backward(grad_out, q, keys, cosine)


def _check_backend(backend: str) -> None:
    if backend not in ("triton", "ext"):
        raise ValueError(f"backend must be 'triton' or 'ext' for the fused cmattn op, got {backend!r}")


def _projections(f: Tensor, T: Tensor, wv: Tensor, bv: Tensor, wt: Tensor, bt: Tensor):
    """(q (B, H, D), keys (K, H, D)): every head's v-projection in one GEMM and every head's class
    pooling keys = wt T + bt for every expert in one batched GEMM (reference.py loops per head and
    expert)."""
    B, D = f.shape
    K, C, _ = T.shape
    H = wv.shape[0]
    q = torch.addmm(bv.reshape(H * D), f, wv.reshape(H * D, D).t()).view(B, H, D)
    keys = torch.baddbmm(bt.view(1, H, 1), wt.expand(K, H, C), T.contiguous())
    return q, keys


def _projection_grads(dq: Tensor, dkey: Tensor, f: Tensor, T: Tensor, wv: Tensor, wt: Tensor, needs):
    """The gradients of _projections' inputs (df, dT, dwv, dbv, dwt, dbt) from dq and dkey; None
    where needs says no."""
    B, D = f.shape
    H = wv.shape[0]
    dq_flat = dq.view(B, H * D)
    need_f, need_T, need_wv, need_bv, need_wt, need_bt = needs
    return (
        dq_flat @ wv.reshape(H * D, D) if need_f else None,
        torch.matmul(wt.t(), dkey) if need_T else None,  # (C, H) x (K, H, D) -> (K, C, D)
        (dq_flat.t() @ f).view(H, D, D) if need_wv else None,  # all heads: (H*D, B) x (B, D)
        dq.sum(0) if need_bv else None,
        torch.bmm(dkey, T.transpose(1, 2)).sum(0) if need_wt else None,  # (K, H, C) summed over experts
        dkey.sum((0, 2)) if need_bt else None,
    )


def _forward_impl(f: Tensor, T: Tensor, wv: Tensor, bv: Tensor, wt: Tensor, bt: Tensor, metric: str, backend: str):
    _check_backend(backend)
    out_dtype, dtype = f.dtype, _compute_dtype(f.dtype)
    if dtype != out_dtype:
        f, T, wv, bv, wt, bt = (x.to(dtype) for x in (f, T, wv, bv, wt, bt))
    q, keys = _projections(f, T, wv, bv, wt, bt)
    out = _scores_forward(q, keys, metric == "cosine", backend)
    return out.to(out_dtype), q, keys


@torch.library.custom_op("guidg_fast::cmattn", mutates_args=())
def _fused_cmattn(
    f: Tensor, T: Tensor, wv: Tensor, bv: Tensor, wt: Tensor, bt: Tensor, metric: str, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(out (B, K), q (B, H, D), keys (K, H, D)); q and keys are the activations saved for backward."""
    return _forward_impl(f, T, wv, bv, wt, bt, metric, backend)


@_fused_cmattn.register_fake
def _fused_cmattn_fake(f, T, wv, bv, wt, bt, metric, backend):
    dtype = _compute_dtype(f.dtype)
    B, D = f.shape
    K, H = T.shape[0], wv.shape[0]
    return f.new_empty((B, K)), f.new_empty((B, H, D), dtype=dtype), f.new_empty((K, H, D), dtype=dtype)


def _backward_impl(grad_out, f, T, wv, wt, q, keys, metric: str, backend: str, needs):
    _check_backend(backend)
    dtype, grad_dtype = q.dtype, f.dtype  # every argument shares f's dtype (checked at the boundary)
    if f.dtype != dtype:
        f, T, wv, wt = (x.to(dtype) for x in (f, T, wv, wt))
    dq, dkey = _scores_backward(grad_out.to(dtype).contiguous(), q, keys, metric == "cosine", backend)
    grads = _projection_grads(dq, dkey, f, T, wv, wt, needs)
    return tuple(grad_out.new_empty(0, dtype=grad_dtype) if g is None else g.to(grad_dtype) for g in grads)


@torch.library.custom_op("guidg_fast::cmattn_backward", mutates_args=())
def _fused_cmattn_backward(
    grad_out: Tensor, f: Tensor, T: Tensor, wv: Tensor, wt: Tensor, q: Tensor, keys: Tensor,
    metric: str, backend: str, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (df, dT, dwv, dbv, dwt, dbt); one not asked for in ``needs`` comes back empty."""
    return _backward_impl(grad_out, f, T, wv, wt, q, keys, metric, backend, needs)


@_fused_cmattn_backward.register_fake
def _fused_cmattn_backward_fake(grad_out, f, T, wv, wt, q, keys, metric, backend, needs):
    B, D = f.shape
    K, C, _ = T.shape
    H = wv.shape[0]
    shapes = [(B, D), (K, C, D), (H, D, D), (H, D), (H, C), (H,)]
    return tuple(f.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    f, T, wv, bv, wt, bt, metric, backend = inputs
    _, q, keys = output
    ctx.mark_non_differentiable(q, keys)
    ctx.set_materialize_grads(False)  # q and keys never get gradients: no zero tensors for them
    ctx.save_for_backward(f, T, wv, wt, q, keys)
    ctx.metric, ctx.backend = metric, backend


def _backward(ctx, grad_out, _grad_q, _grad_keys):
    f, T, wv, wt, q, keys = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:6]]
    if grad_out is None or not any(needs):  # None: the weights were not used (grads are not materialised)
        return (None,) * 8
    grads = torch.ops.guidg_fast.cmattn_backward(grad_out, f, T, wv, wt, q, keys, ctx.metric, ctx.backend, needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None, None)


_fused_cmattn.register_autograd(_backward, setup_context=_setup_context)


def cross_modal_attention(f, T, wv, bv, wt, bt, metric: str = "cosine") -> torch.Tensor:
    """Per-sample expert weights (B, K); differentiable w.r.t. every argument that requires grad."""
    _checks.check_cmattn_params(f, T, wv, bv, wt, bt, metric)
    backend = _backend.backend_for("cmattn", f.device.type)
    if backend == "eager":
        return reference.cross_modal_attention(f, T, wv, bv, wt, bt, metric)
    return torch.ops.guidg_fast.cmattn(f, T, wv, bv, wt, bt, metric, backend)[0]
