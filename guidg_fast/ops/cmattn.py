"""cross_modal_attention (cmattn): per-sample expert weights (B, K) of GuiDG's CMAttn.

    q_h      = f @ wv[h]^T + bv[h]                         (B, D)   every head: ONE (B, D) x (D, H*D) GEMM
    key_{h,k} = sum_c wt[h, c] T[k, c, :] + bt[h]           (D)      every head and expert: ONE batched GEMM
    s_{b,h,k} = cosine(q_{h,b}, key_{h,k})  or  q . key / sqrt(D)
    out[b, k] = mean_h softmax_k(s_{b,h,:})                          ONE fused kernel (scores, softmax, mean)

Backward: one fused kernel turns grad_out (B, K) into dq (B, H, D) and dkey (K, H, D) (score,
softmax and head-mean backward together); GEMMs then give the parameter and input gradients.
f and T get gradients only when they require grad (CrossModalAttention detaches them, so a
training step skips those two GEMMs).

Backends: Triton (kernels/cmattn.py), the C++/CUDA extension (csrc/{cpu,cuda}/cmattn.*), or the
eager reference. With the extension the whole op -- GEMMs, fused kernels and the autograd formula
-- is one C++ operator, ``guidg_fast::cmattn`` (csrc/autograd/cmattn.cpp): at step-2 shapes the
Python composition of the same calls cost a few hundred microseconds per step. On the CPU it runs
the v-projection as (H*D, D) x (D, B) and hands the kernels q in that batch-minor layout. Under
torch.compile the torch.library custom ops ``guidg_fast::fused_cmattn`` /
``guidg_fast::fused_cmattn_backward`` are traced instead (no graph break); for the extension they
call the same C++ halves. Half-precision inputs are computed in fp32 and cast back.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks, reference
from . import _backend

SPEC = _backend.register(_backend.OpSpec("cmattn", ext_ops=("cmattn_forward", "cmattn_backward"), triton=True))

_HALF = (torch.float16, torch.bfloat16)

if _backend.load_extension() is not None:

    @torch.library.register_fake("guidg_fast::cmattn_forward")
    def _cmattn_forward_fake(q, keys, cosine):
        return q.new_empty((q.shape[0], keys.shape[0]))

    @torch.library.register_fake("guidg_fast::cmattn_backward")
    def _cmattn_backward_fake(grad_out, q, keys, cosine):
        return torch.empty_like(q), torch.empty_like(keys)

    @torch.library.register_fake("guidg_fast::cmattn")
    def _cmattn_fake(f, T, wv, bv, wt, bt, cosine):
        return f.new_empty((f.shape[0], T.shape[0]))

    @torch.library.register_fake("guidg_fast::cmattn_fused_forward")
    def _cmattn_fused_forward_fake(f, T, wv, bv, wt, bt, cosine):
        out, q, keys = _fused_cmattn_fake(f, T, wv, bv, wt, bt, "cosine" if cosine else "dotproduct", "ext")
        if f.device.type == "cpu":  # the batch-minor view of an (H*D, B) product, as the CPU kernels use it
            B, H, D = q.shape
            q = q.new_empty((H * D, B)).t().view(B, H, D)
        return out, q, keys

    @torch.library.register_fake("guidg_fast::cmattn_fused_backward")
    def _cmattn_fused_backward_fake(grad_out, f, T, wv, wt, q, keys, cosine, needs):
        return list(_fused_cmattn_backward_fake(grad_out, f, T, wv, wt, q, keys, None, "ext", needs))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def _kernels():
    from ..kernels import cmattn as triton_cmattn  # lazy: importing triton is slow

    return triton_cmattn


def _scores_forward(q: Tensor, keys: Tensor, cosine: bool, backend: str) -> Tensor:
    if backend == "triton":
        return _kernels().cmattn_forward(q, keys, cosine)
    return torch.ops.guidg_fast.cmattn_forward(q, keys, cosine)


def _scores_backward(grad_out: Tensor, q: Tensor, keys: Tensor, cosine: bool, backend: str):
    if backend == "triton":
        return _kernels().cmattn_backward(grad_out, q, keys, cosine)
    return torch.ops.guidg_fast.cmattn_backward(grad_out, q, keys, cosine)


def _check_backend(backend: str) -> None:
    if backend not in ("triton", "ext"):
        raise ValueError(f"backend must be 'triton' or 'ext' for the fused cmattn op, got {backend!r}")


def _forward_impl(f: Tensor, T: Tensor, wv: Tensor, bv: Tensor, wt: Tensor, bt: Tensor, metric: str, backend: str):
    _check_backend(backend)
    if backend == "ext":  # the same composition in C++ (csrc/autograd/cmattn.cpp)
        out, q, keys = torch.ops.guidg_fast.cmattn_fused_forward(f, T, wv, bv, wt, bt, metric == "cosine")
        # on the CPU q is a batch-minor view; inductor expects a custom op's outputs to be contiguous
        return out, q.contiguous(), keys
    out_dtype, dtype = f.dtype, _compute_dtype(f.dtype)
    if dtype != out_dtype:
        f, T, wv, bv, wt, bt = (x.to(dtype) for x in (f, T, wv, bv, wt, bt))
    B, D = f.shape
    K, C, _ = T.shape
    H = wv.shape[0]
    # all heads' v-projections at once: (B, D) x (D, H*D)
    q = torch.addmm(bv.reshape(H * D), f, wv.reshape(H * D, D).t()).view(B, H, D)
    # all heads' class pooling for all experts at once, bias included: (H, C) x (C, D) per expert
    keys = torch.baddbmm(bt.view(1, H, 1), wt.expand(K, H, C), T.contiguous())
    out = _scores_forward(q, keys, metric == "cosine", backend)
    return out.to(out_dtype), q, keys


@torch.library.custom_op("guidg_fast::fused_cmattn", mutates_args=())
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
    if backend == "ext":
        return tuple(torch.ops.guidg_fast.cmattn_fused_backward(grad_out, f, T, wv, wt, q, keys, metric == "cosine", needs))
    dtype, grad_dtype = q.dtype, f.dtype  # every argument shares f's dtype (checked at the boundary)
    if f.dtype != dtype:
        f, T, wv, wt = (x.to(dtype) for x in (f, T, wv, wt))
    B, D = f.shape
    K, C, _ = T.shape
    H = wv.shape[0]
    dq, dkey = _scores_backward(grad_out.to(dtype).contiguous(), q, keys, metric == "cosine", backend)
    dq_flat = dq.view(B, H * D)
    need_f, need_T, need_wv, need_bv, need_wt, need_bt = needs

    def out(grad: Tensor | None) -> Tensor:
        return grad_out.new_empty(0, dtype=grad_dtype) if grad is None else grad.to(grad_dtype)

    return (
        out(dq_flat @ wv.reshape(H * D, D) if need_f else None),
        out(torch.matmul(wt.t(), dkey) if need_T else None),  # (C, H) x (K, H, D) -> (K, C, D)
        out((dq_flat.t() @ f).view(H, D, D) if need_wv else None),  # all heads: (H*D, B) x (B, D)
        out(dq.sum(0) if need_bv else None),
        out(torch.bmm(dkey, T.transpose(1, 2)).sum(0) if need_wt else None),  # (K, H, C) summed over experts
        out(dkey.sum((0, 2)) if need_bt else None),
    )


@torch.library.custom_op("guidg_fast::fused_cmattn_backward", mutates_args=())
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
    grads = torch.ops.guidg_fast.fused_cmattn_backward(grad_out, f, T, wv, wt, q, keys, ctx.metric, ctx.backend, needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None, None)


_fused_cmattn.register_autograd(_backward, setup_context=_setup_context)


class _EagerFusedCmattn(torch.autograd.Function):
    """The same kernels and GEMMs as the custom op, for eager mode: torch.library's Python custom-op
    dispatch costs about as much per call as the fused work itself at step-2 shapes. torch.compile
    traces the custom op instead (see cross_modal_attention)."""

    @staticmethod
    def forward(ctx, f, T, wv, bv, wt, bt, metric, backend):
        out, q, keys = _forward_impl(f, T, wv, bv, wt, bt, metric, backend)
        ctx.save_for_backward(f, T, wv, wt, q, keys)
        ctx.metric, ctx.backend = metric, backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        f, T, wv, wt, q, keys = ctx.saved_tensors
        needs = [bool(n) for n in ctx.needs_input_grad[:6]]
        if not any(needs):
            return (None,) * 8
        grads = _backward_impl(grad_out, f, T, wv, wt, q, keys, ctx.metric, ctx.backend, needs)
        return tuple(g if need else None for g, need in zip(grads, needs)) + (None, None)


@torch.compiler.assume_constant_result
def _choose_backend(device_type: str) -> str:
    # a constant for torch.compile: the choice reads the environment and the dispatcher, not tensors
    return _backend.choose("cmattn", torch.device(device_type))


def cross_modal_attention(f, T, wv, bv, wt, bt, metric: str = "cosine") -> torch.Tensor:
    """Per-sample expert weights (B, K); differentiable w.r.t. every argument that requires grad."""
    _checks.check_cmattn_params(f, T, wv, bv, wt, bt, metric)
    backend = _choose_backend(f.device.type)
    if backend == "eager":
        return reference.cross_modal_attention(f, T, wv, bv, wt, bt, metric)
    if torch.compiler.is_compiling():
        return torch.ops.guidg_fast.fused_cmattn(f, T, wv, bv, wt, bt, metric, backend)[0]
    if backend == "ext":  # GEMMs, kernels and autograd formula all in C++: no per-step Python work
        return torch.ops.guidg_fast.cmattn(f, T, wv, bv, wt, bt, metric == "cosine")
    return _EagerFusedCmattn.apply(f, T, wv, bv, wt, bt, metric, backend)
