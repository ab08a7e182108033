"""prefix_attention: causal multi-head attention of M suffix sequences per expert over a shared prefix.

Query s of sequence (k, m) attends to all P prefix keys of expert k and to suffix keys 0..s of (k, m)
(causal). This is the attention of the shared-prefix text pass (GUIDG_SPEC "exact shortcuts" 2): the
prefix keys/values of each expert are computed once and read by all of its M class suffixes.

Backends:
- ``eager``: ``prefix_attention_eager`` below, explicit torch math (concatenate prefix and suffix
  keys, mask, softmax in fp32). It is the parity oracle: the reference has no such op.
- ``ext`` (C++ CPU / CUDA) and ``triton``: flash-attention style kernels (tiles over keys with an
  online softmax, no (S, P + S) score tensor per head in memory), forward saves the log-sum-exp,
  backward recomputes the probabilities from q, k and the LSE. Registered with torch.library as
  ``guidg_fast::fused_prefix_attention`` / ``guidg_fast::fused_prefix_attention_backward``.
"""
from __future__ import annotations

import math
import os

import torch

from .. import _checks
from . import _backend

SPEC = _backend.register(
    _backend.OpSpec(
        "prefix_attention",
        ext_ops=("prefix_attention_forward", "prefix_attention_backward"),
        triton=True,
    )
)


def _check_prefix_attention(q, k, v, k_prefix, v_prefix, scale) -> float:
    """Validates the arguments; returns the softmax scale (default 1/sqrt(Dh))."""
    _checks.check_tensor(q, "q", 5)
    if q.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise ValueError(f"q must be float32, float64, float16 or bfloat16, got {q.dtype}")
    K, M, S, H, Dh = q.shape
    if min(K, M, S, H, Dh) == 0:
        raise ValueError(f"q must be non-empty (K, M, S, H, Dh), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        _checks.check_tensor(t, name, 5)
        _checks.check_same(t, name, q, "q")
        _checks.check_shape(t, name, q.shape, "K experts, M sequences, S suffix tokens, H heads, Dh, like q")
    _checks.check_tensor(k_prefix, "k_prefix", 4)
    _checks.check_same(k_prefix, "k_prefix", q, "q")
    P = k_prefix.shape[1]
    if P < 1:
        raise ValueError(f"k_prefix must hold P >= 1 prefix keys, got shape {tuple(k_prefix.shape)}")
    _checks.check_shape(k_prefix, "k_prefix", (K, P, H, Dh), "K experts, P prefix tokens, H heads, Dh")
    _checks.check_tensor(v_prefix, "v_prefix", 4)
    _checks.check_same(v_prefix, "v_prefix", q, "q")
    _checks.check_shape(v_prefix, "v_prefix", (K, P, H, Dh), "K experts, P prefix tokens, H heads, Dh, like k_prefix")
    if scale is None:
        return 1.0 / math.sqrt(Dh)
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a number, got a tensor of shape {tuple(scale.shape)}")
        scale = scale.item()
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a number or None, got {type(scale).__name__}") from None
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def prefix_attention_eager(q, k, v, k_prefix, v_prefix, scale=None) -> torch.Tensor:
    """The per-op parity oracle: explicit torch math with a materialised (S, P + S) score tensor."""
    scale = _check_prefix_attention(q, k, v, k_prefix, v_prefix, scale)
    return _prefix_attention_math(q, k, v, k_prefix, v_prefix, scale)


def _prefix_attention_math(q, k, v, k_prefix, v_prefix, scale: float) -> torch.Tensor:
    K, M, S, H, Dh = q.shape
    P = k_prefix.shape[1]
    acc = _acc_dtype(q.dtype)
    keys = torch.cat([k_prefix.unsqueeze(1).expand(K, M, P, H, Dh), k], dim=2)  # (K, M, P+S, H, Dh)
    values = torch.cat([v_prefix.unsqueeze(1).expand(K, M, P, H, Dh), v], dim=2)
    qh = q.to(acc).permute(0, 1, 3, 2, 4)  # (K, M, H, S, Dh)
    kh = keys.to(acc).permute(0, 1, 3, 4, 2)  # (K, M, H, Dh, P+S)
    vh = values.to(acc).permute(0, 1, 3, 2, 4)  # (K, M, H, P+S, Dh)
    scores = torch.matmul(qh, kh) * scale  # (K, M, H, S, P+S)
    row = torch.arange(S, device=q.device).unsqueeze(1)
    col = torch.arange(P + S, device=q.device).unsqueeze(0)
    masked = (col - P) > row  # suffix key j is visible to query s iff j <= s
    scores = scores.masked_fill(masked, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, vh)  # (K, M, H, S, Dh)
    return out.permute(0, 1, 3, 2, 4).to(q.dtype)


# The dispatcher queries behind the choice are not traceable: torch.compile runs the choice once
# while tracing and keeps its result as a constant of the graph.
@torch._dynamo.assume_constant_result
def _choose_backend(device: torch.device) -> str:
    return _backend.choose("prefix_attention", device)


def prefix_attention(q, k, v, k_prefix, v_prefix, scale=None) -> torch.Tensor:
    """(K, M, S, H, Dh): causal attention of each suffix over its expert's shared prefix and itself."""
    scale = _check_prefix_attention(q, k, v, k_prefix, v_prefix, scale)
    backend = _choose_backend(q.device)
    if backend == "eager":
        return _prefix_attention_math(q, k, v, k_prefix, v_prefix, scale)
    return _fused(q, k, v, k_prefix, v_prefix, scale, backend)


def _fused(q, k, v, k_prefix, v_prefix, scale, backend):
    dtype = q.dtype
    compute = _backend.kernel_dtype(dtype, backend, q.device)
    if dtype != compute:
        q, k, v, k_prefix, v_prefix = (t.to(compute) for t in (q, k, v, k_prefix, v_prefix))
    out, _ = torch.ops.guidg_fast.fused_prefix_attention(q, k, v, k_prefix, v_prefix, scale, backend)
    return out.to(dtype)


def _poison() -> bool:
    return os.environ.get("GUIDG_FAST_POISON") == "1"


def _kernels():
    from ..kernels import prefix_attention as kernels  # imported late: TRITON_INTERPRET is read at import

    return kernels


def _forward_impl(q, k, v, k_prefix, v_prefix, scale, backend):
    if backend == "ext":
        return torch.ops.guidg_fast.prefix_attention_forward(q, k, v, k_prefix, v_prefix, scale)
    if backend == "triton":
        return _kernels().prefix_attention_forward(q, k, v, k_prefix, v_prefix, scale, poison=_poison())
    raise ValueError(f"backend must be 'ext' or 'triton' for the fused prefix_attention, got {backend!r}")


def _backward_impl(grad_out, q, k, v, k_prefix, v_prefix, out, lse, scale, backend):
    if backend == "ext":
        return torch.ops.guidg_fast.prefix_attention_backward(grad_out, q, k, v, k_prefix, v_prefix, out, lse, scale)
    if backend == "triton":
        return _kernels().prefix_attention_backward(
            grad_out, q, k, v, k_prefix, v_prefix, out, lse, scale, poison=_poison()
        )
    raise ValueError(f"backend must be 'ext' or 'triton' for the fused prefix_attention, got {backend!r}")


@torch.library.custom_op("guidg_fast::fused_prefix_attention", mutates_args=())
def fused_prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor,
    scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (K, M, S, H, Dh), lse (K, M, H, S)) from the ``backend`` kernels; lse carries no gradient."""
    return _forward_impl(q, k, v, k_prefix, v_prefix, scale, backend)


@fused_prefix_attention.register_fake
def _(q, k, v, k_prefix, v_prefix, scale, backend):
    K, M, S, H, Dh = q.shape
    return q.new_empty((K, M, S, H, Dh)), q.new_empty((K, M, H, S))


@torch.library.custom_op("guidg_fast::fused_prefix_attention_backward", mutates_args=())
def fused_prefix_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_prefix: torch.Tensor,
    v_prefix: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dk_prefix, dv_prefix); the prefix gradients are summed over the M sequences."""
    return tuple(_backward_impl(grad_out, q, k, v, k_prefix, v_prefix, out, lse, scale, backend))


@fused_prefix_attention_backward.register_fake
def _(grad_out, q, k, v, k_prefix, v_prefix, out, lse, scale, backend):
    return (
        q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape),
        q.new_empty(k_prefix.shape), q.new_empty(k_prefix.shape),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, k_prefix, v_prefix, scale, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, k_prefix, v_prefix, out, lse)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, grad_out, grad_lse):
    q, k, v, k_prefix, v_prefix, out, lse = ctx.saved_tensors
    grads = fused_prefix_attention_backward(grad_out, q, k, v, k_prefix, v_prefix, out, lse, ctx.scale, ctx.backend)
    return (*grads, None, None)


fused_prefix_attention.register_autograd(_backward, setup_context=_setup_context)

if _backend.ext_has_kernels(SPEC.ext_ops, "cpu"):
    # fake kernels of the raw C++ operators, so they can be traced and opchecked on their own too

    @torch.library.register_fake("guidg_fast::prefix_attention_forward")
    def _(q, k, v, k_prefix, v_prefix, scale):
        K, M, S, H, Dh = q.shape
        return q.new_empty((K, M, S, H, Dh)), q.new_empty((K, M, H, S))

    @torch.library.register_fake("guidg_fast::prefix_attention_backward")
    def _(grad_out, q, k, v, k_prefix, v_prefix, out, lse, scale):
        return (
            q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape),
            q.new_empty(k_prefix.shape), q.new_empty(k_prefix.shape),
        )
