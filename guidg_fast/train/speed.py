"""Side-by-side timing of a few training iterations: the fast path vs the official structure.

Used by ``guidg-fast demo`` to show, in the same run, how much faster each step is on the same work.
Neither mode changes the trainer's weights (no optimizer step; BMA runs on a scratch copy).
"""
from __future__ import annotations

import time
from typing import Mapping

import torch
import torch.nn.functional as F

from .. import ops, reference
from ..averaging import BetaMovingAverage
from ..text import encode_expert_prompts
from ..data.loaders import DomainBalancedBatches, STEP2_STREAM, stack_items
from .guidg import GuiDG, epoch_batch_indices


def _median_time(fn, iterations: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def step1_speed(trainer: GuiDG, datasets: Mapping, batch_size: int = 32, iterations: int = 3) -> dict:
    """One step-1 iteration: cached features + one batched text pass (fast) vs image re-encode + one
    full-length text pass per expert (official)."""
    model, learner, tau = trainer.model, trainer.learner, trainer.temperature
    batches = []
    for k, d in enumerate(trainer.domains):
        idx = epoch_batch_indices(len(datasets[d]), batch_size, 0, trainer.config["seed"], stream=k)
        x, y = stack_items(datasets[d], idx.tolist(), None)
        batches.append((x.to(trainer.device), y.to(trainer.device)))
    cached = [trainer.encode_images(x) for x, _ in batches]

    def fast():
        T = encode_expert_prompts(model, learner)
        loss = sum(F.cross_entropy(tau * cached[k] @ T[k].t(), y) for k, (_, y) in enumerate(batches))
        loss.backward()
        learner.ctx.grad = None

    def official():
        for k, (x, y) in enumerate(batches):  # one expert at a time, as K separate runs
            with torch.no_grad():
                f = trainer.encode_images(x)
            T = reference.encode_expert_prompts(model, learner)
            F.cross_entropy(tau * f @ T[k].t(), y).backward()
        learner.ctx.grad = None

    t_fast, t_ref = _median_time(fast, iterations), _median_time(official, iterations)
    return {"fast_s": t_fast, "reference_s": t_ref, "speedup": t_ref / t_fast}


def step2_speed(trainer: GuiDG, datasets: Mapping, batch_per_domain: int = 12, iterations: int = 3) -> dict:
    """One step-2 iteration without the optimizer (identical in both): encoder forward/backward, CMAttn,
    multi-expert loss, BMA — fused ops (fast) vs the eager reference ops and per-tensor BMA (official)."""
    if trainer.expert_features is None:
        trainer.refresh_expert_features()
    names = sorted(datasets)
    parts = [datasets[d] for d in names]
    batches = DomainBalancedBatches(parts, [trainer.image_cache().get(ds, 0) for ds in parts], batch_per_domain,
                                    trainer.config["seed"], [STEP2_STREAM + j for j in range(len(parts))])
    x, y, _ = batches[0]
    x, y = x.to(trainer.device), y.to(trainer.device)
    visual = trainer.model.visual
    bma = BetaMovingAverage(visual, total_steps=100)
    params = list(visual.parameters())

    def run(backend, bma_update):
        def step():
            visual.requires_grad_(True)
            with ops.use_backend(backend):
                loss, _ = trainer.step2_loss(x, y)
            loss.backward()
            bma_update(list(bma.moving_avg.parameters()), params, 0.01)
            for p in params + list(trainer.attn.parameters()):
                p.grad = None
            visual.requires_grad_(False)

        return step

    t_fast = _median_time(run(None, ops.bma_update_), iterations)
    t_ref = _median_time(run("eager", reference.bma_update_), iterations)
    return {"fast_s": t_fast, "reference_s": t_ref, "speedup": t_ref / t_fast}
