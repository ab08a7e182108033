"""multi_expert_loss: sum_k w_k CE(tau (f - margin T_k[y]) T_k^T, y) plus the optional UEO term.

No fused kernel yet: every backend routes to the eager reference (``guidg-fast info`` says so).
"""
from __future__ import annotations

import torch

from .. import reference
from . import _backend

SPEC = _backend.register(_backend.OpSpec("multi_expert_loss"))


def multi_expert_loss(f, T, y, w, temperature, margin: float = 0.0, entropy_weight: float = 0.0) -> torch.Tensor:
    _backend.choose("multi_expert_loss", f.device if isinstance(f, torch.Tensor) else "cpu")
    return reference.multi_expert_loss(f, T, y, w, temperature, margin=margin, entropy_weight=entropy_weight)
