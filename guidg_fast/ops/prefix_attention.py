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

import torch

from .. import _checks
from . import _backend

SPEC = _backend.register(
    _backend.OpSpec(
        "prefix_attention",
        ext_ops=("prefix_attention_forward", "prefix_attention_backward"),
        triton=False,
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


def prefix_attention(q, k, v, k_prefix, v_prefix, scale=None) -> torch.Tensor:
    """(K, M, S, H, Dh): causal attention of each suffix over its expert's shared prefix and itself."""
    scale = _check_prefix_attention(q, k, v, k_prefix, v_prefix, scale)
    backend = _backend.choose("prefix_attention", q.device)
    if backend == "eager":
        return _prefix_attention_math(q, k, v, k_prefix, v_prefix, scale)
    return _fused(q, k, v, k_prefix, v_prefix, scale, backend)


def _fused(q, k, v, k_prefix, v_prefix, scale, backend):
    raise NotImplementedError  # replaced by the torch.library path below once the kernels exist
