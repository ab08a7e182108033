"""guidance_loss: GuiDG's step-2 guidance in one call -- the CMAttn expert weights, their batch mean
(or the per-sample weights) and the multi-expert loss:

    w    = cross_modal_attention(f.detach(), T.detach(), wv, bv, wt, bt, metric)   (B, K)
    w    = w.mean(0)                                    (weights="batch", the official code's)
    loss = multi_expert_loss(f, T, y, w, temperature, margin, entropy_weight)

Returns (loss, w) with w detached (for logging). Gradients reach f and T through the loss only
(CMAttn sees them detached, as in the official code) and the CMAttn parameters through w.

With the C++ extension on CPU float32 / float64 tensors this is one operator with one autograd
node, ``guidg_fast::guidance_loss`` (csrc/autograd/guidance.cpp), over the same kernels as the two
ops; composed, the batch mean and the three autograd nodes cost ~0.25 ms of a ~1.7 ms step on the
2-core CPU. Everywhere else (CUDA until the fused node has been checked on a GPU, Triton, other
dtypes, torch.compile) it composes ``ops.cross_modal_attention`` and ``ops.multi_expert_loss``,
whose own backends apply.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from . import _backend
from .cmattn import cross_modal_attention
from .multi_expert_loss import multi_expert_loss

_WEIGHTS = ("batch", "per_sample")

if _backend.load_extension() is not None:

    @torch.library.register_fake("guidg_fast::guidance_loss")
    def _guidance_loss_fake(f, T, y, wv, bv, wt, bt, temperature, margin, entropy_weight, cosine, per_sample):
        B, K = f.shape[0], T.shape[0]
        return f.new_empty(()), f.new_empty((B, K) if per_sample else (K,))


def _fused(f: Tensor, device_type: str) -> bool:
    if device_type != "cpu" or f.dtype not in (torch.float32, torch.float64) or torch.compiler.is_compiling():
        return False
    if _backend.forced_backend() not in (None, "ext"):
        return False
    return "ext" in _backend.available("cmattn", "cpu") and "ext" in _backend.available("multi_expert_loss", "cpu")


def guidance_loss(f, T, y, wv, bv, wt, bt, temperature, margin: float = 0.0, entropy_weight: float = 0.0,
                  metric: str = "cosine", weights: str = "batch") -> tuple[Tensor, Tensor]:
    """(loss, w): the multi-expert loss under the CMAttn weights of this batch (see the module doc)."""
    if weights not in _WEIGHTS:
        raise ValueError(f"weights must be one of {_WEIGHTS}, got {weights!r}")
    device_type = f.device.type if isinstance(f, Tensor) else None
    if _fused(f, device_type):
        # shapes, dtypes and devices here; the kernel checks label range and finite weights itself
        tau, margin, entropy_weight = _checks.check_guidance_args(
            f, T, y, wv, bv, wt, bt, temperature, margin, entropy_weight, metric, weights == "per_sample"
        )
        try:
            return torch.ops.guidg_fast.guidance_loss(
                f, T, y, wv, bv, wt, bt, tau, margin, entropy_weight, metric == "cosine", weights == "per_sample"
            )
        except ValueError as exc:
            _rename_weight_error(exc, f, T, wv, bv, wt, bt)
            raise
    _checks.check_cmattn_params(f, T, wv, bv, wt, bt, metric)
    w = cross_modal_attention(f.detach(), T.detach(), wv, bv, wt, bt, metric=metric)
    if weights == "batch":
        w = w.mean(dim=0)
    try:
        loss = multi_expert_loss(f, T, y, w, temperature, margin=margin, entropy_weight=entropy_weight)
    except ValueError as exc:
        _rename_weight_error(exc, f, T, wv, bv, wt, bt)
        raise
    return loss, w.detach()


def _rename_weight_error(exc: ValueError, f, T, wv, bv, wt, bt) -> None:
    # w is computed here, not passed: name the caller's argument its NaN/Inf came from
    if not str(exc).startswith("w contains NaN or Inf"):
        return
    name = _checks.name_non_finite((("f", f), ("T", T), ("wv", wv), ("bv", bv), ("wt", wt), ("bt", bt)), "f or T")
    raise ValueError(
        f"{name} contains NaN or Inf values (the expert weights CMAttn computes from f, T and its parameters "
        "are not finite)"
    ) from None
