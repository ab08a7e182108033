"""cross_modal_attention (cmattn): per-sample expert weights (B, K) of GuiDG's CMAttn.

No fused kernel yet: every backend routes to the eager reference (``guidg-fast info`` says so).
"""
from __future__ import annotations

import torch

from .. import _checks, reference
from . import _backend

SPEC = _backend.register(_backend.OpSpec("cmattn"))


def cross_modal_attention(f, T, wv, bv, wt, bt, metric: str = "cosine") -> torch.Tensor:
    _checks.check_cmattn_params(f, T, wv, bv, wt, bt, metric)
    _backend.choose("cmattn", f.device)
    return reference.cross_modal_attention(f, T, wv, bv, wt, bt, metric)
