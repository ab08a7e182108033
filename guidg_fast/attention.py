"""CrossModalAttention: GuiDG's CMAttn module with the official parameter layout."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from . import ops


class _Head(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.linear_v = nn.Linear(dim, dim)
        self.linear_t = nn.Linear(num_classes, 1)


class CrossModalAttention(nn.Module):
    """Per-sample expert weights from image features f (B, D) and expert text features T (K, C, D).

    state_dict keys are ``layers.{h}.linear_v.weight/bias`` and ``layers.{h}.linear_t.weight/bias``,
    as in the official code, so its checkpoints load. ``forward`` detaches f and T (the official
    code does): only this module's parameters get gradients through the weights.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int = 4, metric: str = "cosine"):
        super().__init__()
        if metric not in ("cosine", "dotproduct"):
            raise ValueError(f"metric must be 'cosine' or 'dotproduct', got {metric!r}")
        if dim < 1 or num_classes < 1 or num_heads < 1:
            raise ValueError(f"dim, num_classes and num_heads must be >= 1, got {dim}, {num_classes}, {num_heads}")
        self.dim, self.num_classes, self.num_heads, self.metric = dim, num_classes, num_heads, metric
        self.layers = nn.ModuleList(_Head(dim, num_classes) for _ in range(num_heads))

    def stacked_parameters(self):
        """(wv (H, D, D), bv (H, D), wt (H, C), bt (H,)) as differentiable stacks of the heads."""
        wv = torch.stack([h.linear_v.weight for h in self.layers])
        bv = torch.stack([h.linear_v.bias for h in self.layers])
        wt = torch.stack([h.linear_t.weight[0] for h in self.layers])
        bt = torch.cat([h.linear_t.bias for h in self.layers])
        return wv, bv, wt, bt

    def forward(self, f: torch.Tensor, T: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        if not isinstance(T, torch.Tensor):
            T = torch.stack([t.detach() for t in T], dim=0)
        return ops.cross_modal_attention(f.detach(), T.detach(), *self.stacked_parameters(), metric=self.metric)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_classes={self.num_classes}, num_heads={self.num_heads}, metric={self.metric!r}"
