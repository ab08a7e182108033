"""prefix_attention: causal multi-head attention of M suffix sequences per expert over a shared prefix.

Query s of sequence (k, m) attends to all P prefix keys of expert k and to suffix keys 0..s of (k, m)
(causal). This is the attention of the shared-prefix text pass (docs/guidg_math.md, "Exact shortcuts" 2): the
prefix keys/values of each expert are computed once and read by all of its M class suffixes.

Backends:
- ``eager``: ``prefix_attention_eager`` below, explicit torch math (concatenate prefix and suffix
  keys, mask, softmax in fp32). It is the parity oracle: the reference has no such op.
- ``ext`` (C++ CPU / CUDA) and ``triton``: flash-attention style kernels (tiles over keys with an
  online softmax, no (S, P + S) score tensor per head in memory), forward saves the log-sum-exp,
  backward recomputes the probabilities from q, k and the LSE. Registered with torch.library as
  ``guidg_fast::prefix_attention`` / ``guidg_fast::prefix_attention_backward`` (the op's only schemas;
  ext calls guidg_fast._C.prefix_attention_forward / _backward).
"""
from __future__ import annotations

import math

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
    return _scale_value(scale, Dh)


def _scale_value(scale, Dh: int) -> float:
    """The softmax scale: 1/sqrt(Dh) by default, else a finite number (or one-element tensor)."""
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


def prefix_attention(q, k, v, k_prefix, v_prefix, scale=None) -> torch.Tensor:
    """(K, M, S, H, Dh): causal attention of each suffix over its expert's shared prefix and itself."""
    scale = _check_prefix_attention(q, k, v, k_prefix, v_prefix, scale)
    backend = _backend.backend_for("prefix_attention", q.device.type)
    if backend == "eager":
        return _prefix_attention_math(q, k, v, k_prefix, v_prefix, scale)
    return _fused(q, k, v, k_prefix, v_prefix, scale, backend)


def _fused(q, k, v, k_prefix, v_prefix, scale, backend):
    dtype = q.dtype
    compute = _backend.kernel_dtype(dtype, backend, q.device)
    if dtype != compute:
        q, k, v, k_prefix, v_prefix = (t.to(compute) for t in (q, k, v, k_prefix, v_prefix))
    out, _ = torch.ops.guidg_fast.prefix_attention(q, k, v, k_prefix, v_prefix, scale, backend)
    return out.to(dtype)


def _kernels():
    from ..kernels import prefix_attention as kernels  # imported late: TRITON_INTERPRET is read at import

    return kernels


def _forward_impl(q, k, v, k_prefix, v_prefix, scale, backend):
    if backend == "ext":
        return _backend.load_extension().prefix_attention_forward(q, k, v, k_prefix, v_prefix, scale)
    if backend == "triton":
        return _kernels().prefix_attention_forward(q, k, v, k_prefix, v_prefix, scale)
    raise ValueError(f"backend must be 'ext' or 'triton' for the fused prefix_attention, got {backend!r}")


def _backward_impl(grad_out, q, k, v, k_prefix, v_prefix, out, lse, scale, backend):
    if backend == "ext":
        return _backend.load_extension().prefix_attention_backward(grad_out, q, k, v, k_prefix, v_prefix, out, lse,
                                                                   scale)
    if backend == "triton":
        return _kernels().prefix_attention_backward(
            grad_out, q, k, v, k_prefix, v_prefix, out, lse, scale
        )
    raise ValueError(f"backend must be 'ext' or 'triton' for the fused prefix_attention, got {backend!r}")


@torch.library.custom_op("guidg_fast::prefix_attention", mutates_args=())
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


@torch.library.custom_op("guidg_fast::prefix_attention_backward", mutates_args=())
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

# ----------------------------------------------------------------------------------------------
# Packed: every suffix group of a text pass in one call


def _check_packed(qkv, k_prefix, v_prefix, groups, scale):
    _checks.check_tensor(qkv, "qkv", 4)
    if qkv.shape[1] != 3:
        raise ValueError(f"qkv must have shape (T, 3, H, Dh) (the fused QKV projection), got {tuple(qkv.shape)}")
    T, _, H, Dh = qkv.shape
    for name, t in (("k_prefix", k_prefix), ("v_prefix", v_prefix)):
        _checks.check_tensor(t, name, 4)
        _checks.check_same(t, name, qkv, "qkv")
    K, P = k_prefix.shape[:2]
    if min(T, H, Dh, K, P) == 0:
        raise ValueError(f"qkv and k_prefix must be non-empty, got {tuple(qkv.shape)} and {tuple(k_prefix.shape)}")
    _checks.check_shape(k_prefix, "k_prefix", (K, P, H, Dh), "K experts, P prefix tokens, H heads, Dh")
    _checks.check_shape(v_prefix, "v_prefix", (K, P, H, Dh), "like k_prefix")
    groups = [tuple(int(x) for x in g) for g in groups]
    start = 0
    for i, g in enumerate(groups):
        if len(g) != 3 or g[0] != start or g[1] < 1 or g[2] < 1:
            raise ValueError(
                f"groups[{i}] must be (first token {start}, M >= 1, S >= 1): groups run back to back over the "
                f"T packed tokens, K * M * S tokens each; got {g}"
            )
        start += K * g[1] * g[2]
    if start != T:  # also an empty list of groups (T >= 1 here)
        raise ValueError(f"groups cover {start} tokens (K * M * S each, K = {K}) but qkv has T = {T}")
    if qkv.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise ValueError(f"qkv must be float32, float64, float16 or bfloat16, got {qkv.dtype}")
    return groups, _scale_value(scale, Dh)


def _packed_cpu_kernels() -> bool:
    return _backend.ext_has_kernels(("prefix_attention_packed_forward", "prefix_attention_packed_backward"), "cpu")


def prefix_attention_packed(qkv, k_prefix, v_prefix, groups, scale=None) -> torch.Tensor:
    """prefix_attention over every suffix group of a text pass at once.

    qkv (T, 3, H, Dh): the fused QKV projection of T packed suffix tokens; groups: (first token, M, S)
    per group, back to back: tokens first .. first + K*M*S - 1 are that group's (K, M, S) suffixes.
    Returns out (T, H, Dh), group by group as prefix_attention would (K, M, S, H, Dh). With the C++
    extension on the CPU (fp32 / fp64) one call covers all groups and the backward writes one
    (T, 3, H, Dh) gradient; elsewhere it is prefix_attention per group.
    """
    groups, scale = _check_packed(qkv, k_prefix, v_prefix, groups, scale)
    K = k_prefix.shape[0]
    backend = _backend.backend_for("prefix_attention", qkv.device.type)
    if (backend == "ext" and qkv.device.type == "cpu" and qkv.dtype in (torch.float32, torch.float64)
            and _packed_cpu_kernels()):
        flat = [x for g in groups for x in g]
        return torch.ops.guidg_fast.prefix_attention_packed(qkv, k_prefix, v_prefix, flat, scale)[0]
    T, _, H, Dh = qkv.shape
    sizes = [K * M * S for _, M, S in groups]
    outs = []
    # split (not slicing): its backward is one cat, where each slice's would be a full-size zero fill
    for (_, M, S), part in zip(groups, qkv.split(sizes)):
        q, k, v = (part[:, i].view(K, M, S, H, Dh) for i in range(3))
        outs.append(prefix_attention(q, k, v, k_prefix, v_prefix, scale=scale).reshape(K * M * S, H, Dh))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


# The packed layout's only kernels are the C++ CPU ones (guidg_fast._C), so this pair has no backend
# argument. Measured on the CPU step-1 iteration (ViT-B-16, K = 3, C = 200): see
# csrc/cpu/prefix_attention.cpp's packed section.
@torch.library.custom_op("guidg_fast::prefix_attention_packed", mutates_args=())
def fused_prefix_attention_packed(
    qkv: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor, groups: list[int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (T, H, Dh), lse (T * H,)); groups is the flat [first token, M, S] list; lse has no gradient."""
    return tuple(_backend.load_extension().prefix_attention_packed_forward(qkv, k_prefix, v_prefix, groups, scale))


@fused_prefix_attention_packed.register_fake
def _(qkv, k_prefix, v_prefix, groups, scale):
    T, _, H, Dh = qkv.shape
    return qkv.new_empty((T, H, Dh)), qkv.new_empty((T * H,))


@torch.library.custom_op("guidg_fast::prefix_attention_packed_backward", mutates_args=())
def fused_prefix_attention_packed_backward(
    grad_out: torch.Tensor, qkv: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, groups: list[int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dqkv (T, 3, H, Dh), dk_prefix, dv_prefix); the prefix gradients are summed over all groups."""
    return tuple(_backend.load_extension().prefix_attention_packed_backward(
        grad_out.contiguous(), qkv, k_prefix, v_prefix, out, lse, groups, scale
    ))


@fused_prefix_attention_packed_backward.register_fake
def _(grad_out, qkv, k_prefix, v_prefix, out, lse, groups, scale):
    return qkv.new_empty(qkv.shape), qkv.new_empty(k_prefix.shape), qkv.new_empty(k_prefix.shape)


def _packed_setup_context(ctx, inputs, output):
    qkv, k_prefix, v_prefix, groups, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, k_prefix, v_prefix, out, lse)
    ctx.groups, ctx.scale = groups, scale


def _packed_backward(ctx, grad_out, _grad_lse):
    qkv, k_prefix, v_prefix, out, lse = ctx.saved_tensors
    dqkv, dkp, dvp = fused_prefix_attention_packed_backward(grad_out, qkv, k_prefix, v_prefix, out, lse, ctx.groups,
                                                            ctx.scale)
    return dqkv, dkp, dvp, None, None


fused_prefix_attention_packed.register_autograd(_packed_backward, setup_context=_packed_setup_context)
