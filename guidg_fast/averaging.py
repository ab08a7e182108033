"""Weight averaging for step 2: BetaMovingAverage (CLIPood's BMA) and WiSE-FT."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from . import ops


def beta_pdf(x: float, a: float, b: float) -> float:
    """Density of Beta(a, b) at x in (0, 1)."""
    log_norm = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return math.exp((a - 1) * math.log(x) + (b - 1) * math.log1p(-x) - log_norm)


class BetaMovingAverage:
    """Averaged copy of ``module``: alpha_t = BetaPDF(beta, beta)((t + 0.5) / (total_steps + 1)).

    Same semantics as the official GeneralMovingAverage: after step t (t = 1, 2, ...),
    r = alpha_t / sum_{i<t} alpha_i and avg <- (avg + r * theta) / (1 + r); the running sum starts at
    alpha_0. ``update()`` averages every parameter in one ``ops.bma_update_`` call.
    """

    def __init__(self, module: nn.Module, beta: float = 0.1, total_steps: int = 4000):
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if int(total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.model = module
        self.beta = float(beta)
        self.total_steps = int(total_steps)
        self.iter = 0
        self.weight = self.weight_func(0)
        self.weight_sum = self.weight
        self.moving_avg = copy.deepcopy(module)
        for p in self.moving_avg.parameters():
            p.requires_grad_(False)

    def weight_func(self, it: int) -> float:
        return beta_pdf((it + 0.5) / (self.total_steps + 1), self.beta, self.beta)

    @property
    def module(self) -> nn.Module:
        return self.moving_avg

    def update(self) -> None:
        self.iter += 1
        self.weight = self.weight_func(self.iter)
        relative_weight = self.weight / self.weight_sum
        ops.bma_update_(list(self.moving_avg.parameters()), list(self.model.parameters()), relative_weight)
        self.weight_sum += self.weight

    def __call__(self, *args, **kwargs):
        return self.moving_avg(*args, **kwargs)

    def state_dict(self) -> dict:
        return {
            "module": self.moving_avg.state_dict(),
            "iter": self.iter,
            "weight": self.weight,
            "weight_sum": self.weight_sum,
            "beta": self.beta,
            "total_steps": self.total_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.moving_avg.load_state_dict(state["module"])
        self.iter = int(state["iter"])
        self.weight = float(state["weight"])
        self.weight_sum = float(state["weight_sum"])
        self.beta = float(state["beta"])
        self.total_steps = int(state["total_steps"])


def wise_ft(state_a: dict, state_b: dict, alpha: float) -> dict:
    """(1 - alpha) * state_a + alpha * state_b for every floating entry; other entries from state_b."""
    keys_a, keys_b = set(state_a), set(state_b)
    if keys_a != keys_b:
        only_a, only_b = sorted(keys_a - keys_b)[:5], sorted(keys_b - keys_a)[:5]
        raise ValueError(f"state_a and state_b must have the same keys; only in state_a: {only_a}, only in state_b: {only_b}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    mixed = {}
    for key in state_a:
        a, b = state_a[key], state_b[key]
        if isinstance(a, torch.Tensor) and a.shape != b.shape:
            raise ValueError(f"state_a[{key!r}] has shape {tuple(a.shape)} but state_b[{key!r}] has {tuple(b.shape)}")
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            mixed[key] = (1 - alpha) * a + alpha * b.to(a.dtype)
        else:
            mixed[key] = b
    return mixed
