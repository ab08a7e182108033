"""ensemble_logits: (B, C) = sum_k w_k * tau * f @ T_k^T.

No fused kernel yet: every backend routes to the eager reference (``guidg-fast info`` says so).
"""
from __future__ import annotations

import torch

from .. import reference
from . import _backend

SPEC = _backend.register(_backend.OpSpec("ensemble_logits"))


def ensemble_logits(f, T, w, temperature) -> torch.Tensor:
    _backend.choose("ensemble_logits", f.device if isinstance(f, torch.Tensor) else "cpu")
    return reference.ensemble_logits(f, T, w, temperature)
