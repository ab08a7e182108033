"""guidance_loss: GuiDG's step-2 guidance in one call -- the CMAttn expert weights, their batch mean
(or the per-sample weights) and the multi-expert loss:

    w    = cross_modal_attention(f.detach(), T.detach(), wv, bv, wt, bt, metric)   (B, K)
    w    = w.mean(0)                                    (weights="batch", the official code's)
    loss = multi_expert_loss(f, T, y, w, temperature, margin, entropy_weight)

Returns (loss, w) with w detached (for logging). Gradients reach f and T through the loss only
(CMAttn sees them detached, as in the official code) and the CMAttn parameters through w.

A composition of the two ops' custom ops (their forward / backward schemas and backends), not a
path of its own: a single C++ autograd node for the whole guidance saved ~0.25 ms of a 17 s ViT-B/16
step-2 iteration on the CPU and ~1 ms of 111 ms on an H100 (bench/gpu/latest.md), both under the
2% a layer must earn.
"""
from __future__ import annotations

from torch import Tensor

from .. import _checks
from . import _backend
from .cmattn import cross_modal_attention
from .multi_expert_loss import multi_expert_loss

SPEC = _backend.register(_backend.OpSpec("guidance_loss", parts=("cmattn", "multi_expert_loss")))

_WEIGHTS = ("batch", "per_sample")


def guidance_loss(f, T, y, wv, bv, wt, bt, temperature, margin: float = 0.0, entropy_weight: float = 0.0,
                  metric: str = "cosine", weights: str = "batch") -> tuple[Tensor, Tensor]:
    """(loss, w): the multi-expert loss under the CMAttn weights of this batch (see the module doc)."""
    if weights not in _WEIGHTS:
        raise ValueError(f"weights must be one of {_WEIGHTS}, got {weights!r}")
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
