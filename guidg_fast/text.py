"""encode_expert_prompts: (K, C, D) normalised text features of all experts.

The shared-prefix fast pass is not built yet: this routes to the reference (one full-length pass
per expert), and ``guidg-fast info`` reports it as eager.
"""
from __future__ import annotations

import torch

from . import reference
from .ops import _backend

SPEC = _backend.register(_backend.OpSpec("encode_expert_prompts"))


def encode_expert_prompts(model, learner) -> torch.Tensor:
    _backend.choose("encode_expert_prompts", learner.ctx.device)
    return reference.encode_expert_prompts(model, learner)
