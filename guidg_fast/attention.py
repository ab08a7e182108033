"""CrossModalAttention: GuiDG's CMAttn module with the official parameter layout."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from . import ops


class _Head(nn.Module):
    # one official head; only used to initialise the stacked parameters as nn.Linear would
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.linear_v = nn.Linear(dim, dim)
        self.linear_t = nn.Linear(num_classes, 1)


# official state_dict names per head -> (stacked parameter, how one head's tensor sits in it)
_OFFICIAL = (("linear_v.weight", "wv"), ("linear_v.bias", "bv"), ("linear_t.weight", "wt"), ("linear_t.bias", "bt"))


class CrossModalAttention(nn.Module):
    """Per-sample expert weights from image features f (B, D) and expert text features T (K, C, D).

    The H heads' parameters are stored stacked -- ``wv`` (H, D, D), ``bv`` (H, D), ``wt`` (H, C),
    ``bt`` (H,) -- the layout the fused op takes, so a training step does not copy them together
    (a 4 MB stack and its backward at D = 512). ``state_dict`` still has the official keys
    ``layers.{h}.linear_v.weight/bias`` and ``layers.{h}.linear_t.weight/bias`` and loads them, so
    official checkpoints load and ours load in the official code. ``forward`` detaches f and T (the
    official code does): only this module's parameters get gradients through the weights.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int = 4, metric: str = "cosine"):
        super().__init__()
        if metric not in ("cosine", "dotproduct"):
            raise ValueError(f"metric must be 'cosine' or 'dotproduct', got {metric!r}")
        if dim < 1 or num_classes < 1 or num_heads < 1:
            raise ValueError(f"dim, num_classes and num_heads must be >= 1, got {dim}, {num_classes}, {num_heads}")
        self.dim, self.num_classes, self.num_heads, self.metric = dim, num_classes, num_heads, metric
        heads = [_Head(dim, num_classes) for _ in range(num_heads)]  # nn.Linear's init, head by head
        self.wv = nn.Parameter(torch.stack([h.linear_v.weight.detach() for h in heads]))
        self.bv = nn.Parameter(torch.stack([h.linear_v.bias.detach() for h in heads]))
        self.wt = nn.Parameter(torch.stack([h.linear_t.weight.detach()[0] for h in heads]))
        self.bt = nn.Parameter(torch.cat([h.linear_t.bias.detach() for h in heads]))
        self.register_state_dict_post_hook(_to_official)
        self.register_load_state_dict_pre_hook(_from_official)

    def stacked_parameters(self):
        """(wv (H, D, D), bv (H, D), wt (H, C), bt (H,)): the stored parameters themselves."""
        return self.wv, self.bv, self.wt, self.bt

    def forward(self, f: torch.Tensor, T: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        if not isinstance(T, torch.Tensor):
            T = torch.stack([t.detach() for t in T], dim=0)
        return ops.cross_modal_attention(f.detach(), T.detach(), *self.stacked_parameters(), metric=self.metric)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_classes={self.num_classes}, num_heads={self.num_heads}, metric={self.metric!r}"


def _head_view(name: str, stacked: torch.Tensor, h: int) -> torch.Tensor:
    # head h's tensor in the official shape: linear_t.weight is (1, C), its bias (1,)
    return stacked[h].unsqueeze(0) if name in ("wt", "bt") else stacked[h]


def _to_official(module, state_dict, prefix, local_metadata):
    # the official order: head by head, linear_v then linear_t
    stacked = {name: state_dict.pop(prefix + name) for _, name in _OFFICIAL}
    for h in range(module.num_heads):
        for official, name in _OFFICIAL:
            state_dict[f"{prefix}layers.{h}.{official}"] = _head_view(name, stacked[name], h)


def _from_official(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    # official per-head keys -> the stacked parameters; keys already stacked (none in our own
    # state_dicts, which are official) pass through
    for official, name in _OFFICIAL:
        keys = [f"{prefix}layers.{h}.{official}" for h in range(module.num_heads)]
        present = [k for k in keys if k in state_dict]
        if not present:
            continue
        if len(present) != len(keys):
            missing_keys.extend(k for k in keys if k not in state_dict)
            for k in present:
                state_dict.pop(k)
            continue
        parts = [state_dict.pop(k) for k in keys]
        expected = _head_view(name, getattr(module, name).detach(), 0).shape
        bad = [(k, tuple(p.shape)) for k, p in zip(keys, parts) if p.shape != expected]
        if bad:
            error_msgs.append(f"size mismatch for {bad[0][0]}: copying a param with shape {bad[0][1]} from checkpoint, "
                              f"the shape in current model is {tuple(expected)}.")
            continue
        state_dict[prefix + name] = torch.cat(parts) if name in ("wt", "bt") else torch.stack(parts)
    extra = sorted(k for k in state_dict if k.startswith(prefix + "layers."))
    for k in extra:  # heads beyond num_heads, or names the official module does not have
        unexpected_keys.append(k)
        state_dict.pop(k)
