"""One training iteration of each step, eager or under torch.compile, with optional phase timing.

Step 2 is split at the normalised image features f (B, D): the encoder pass, then the guidance
loss on a detached copy of f whose gradient is sent back through the encoder. The arithmetic is
the one of a single backward (the same ops, the same gradients), and the two parts can be timed
and compiled separately; with ``compile`` each part is one graph with fixed shapes (CUDA graphs
on CUDA, mode "reduce-overhead").
"""
from __future__ import annotations

import contextlib
import time

import torch

PRECISIONS = ("bf16", "fp32")
STEP2_PHASES = ("data", "encoder", "guidance", "optimizer", "bma")
EVAL_PHASES = ("data", "compute")


def check_precision(precision, device: torch.device) -> str:
    if precision is None:
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or None (bf16 on CUDA, fp32 on CPU), got {precision!r}")
    return precision


def compile_options(compile, device: torch.device) -> dict | None:
    """torch.compile kwargs for ``compile=`` (False/None: eager; True: the default for the device;
    a dict: passed to torch.compile as given, e.g. {"backend": "aot_eager"})."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return {"mode": "reduce-overhead"} if device.type == "cuda" else {}
    if isinstance(compile, dict):
        return dict(compile)
    raise ValueError(f"compile must be a bool or a dict of torch.compile options, got {compile!r}")


class PhaseTimer:
    """Accumulates seconds per phase into ``totals``; synchronises the device at each boundary so a
    phase's queued GPU work is charged to it. ``totals=None``: no timing and no synchronisation."""

    def __init__(self, totals: dict | None, device: torch.device, names=()):
        if totals is not None and not isinstance(totals, dict):
            raise ValueError(f"phase_times must be a dict (or None), got {type(totals).__name__}")
        self.totals, self.device = totals, device
        if totals is not None:
            for name in names:
                totals.setdefault(name, 0.0)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.totals is None:
            yield
            return
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def time_iter(self, iterator, name: str = "data"):
        """Yields the items of ``iterator``, charging the wait for each to phase ``name``."""
        it = iter(iterator)
        while True:
            with self(name):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item


def tensor_lr(optimizer: torch.optim.Optimizer) -> None:
    """lr as a 0-d tensor: a compiled optimizer step then reads the scheduled lr instead of
    recompiling for every new float."""
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]))


class Step1Iteration:
    """Step 1: the experts' text pass, every domain's logits and cross entropy, SGD.

    ``reduce_grads`` (torch.distributed): called between backward and the SGD step with the loss;
    sums the ranks' gradient and loss shares and returns the summed loss.
    """

    def __init__(self, loss_fn, optimizer, scheduler, options: dict | None, reduce_grads=None):
        self.optimizer, self.scheduler = optimizer, scheduler
        self.reduce_grads = reduce_grads
        self.loss_fn = torch.compile(loss_fn, **options) if options is not None else loss_fn
        if options is not None:
            tensor_lr(optimizer)
            self._step = torch.compile(optimizer.step, **options)
        else:
            self._step = optimizer.step

    def __call__(self, batches) -> torch.Tensor:
        loss = self.loss_fn(batches)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.reduce_grads is not None:
            loss = self.reduce_grads(loss)
        self._step()
        self.scheduler.step()
        return loss.detach()


class Step2Iteration:
    """Step 2: encoder forward, guidance loss forward + backward, encoder backward, AdamW, BMA.

    BMA stays one eager ``ops.bma_update_`` call for all tensors: its weight changes every step,
    and compiled it would specialise on that float (a recompile per step) to save one call.

    ``global_batch`` (torch.distributed; a ``distributed.GlobalBatch``): x, y are this rank's rows
    of the step's batch; between the encoder and the guidance loss the ranks' features are gathered,
    every rank computes the loss of the whole batch (it depends on the whole batch: batch-mean
    expert weights and loss), and the encoder backward gets this rank's rows of its gradient.
    """

    def __init__(self, encode, guidance, optimizer, scheduler, bma, options: dict | None, global_batch=None):
        self.optimizer, self.scheduler, self.bma = optimizer, scheduler, bma
        self.global_batch = global_batch
        if options is not None:
            tensor_lr(optimizer)
            encode = torch.compile(encode, **options)
            guidance = torch.compile(guidance, **options)
            self._step = torch.compile(optimizer.step, **options)
        else:
            self._step = optimizer.step
        self.encode, self.guidance = encode, guidance

    def __call__(self, x, y, timer: PhaseTimer) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with timer("encoder"):
            f = self.encode(x)
        if self.global_batch is not None:
            with timer("gather"):
                f_all, y = self.global_batch.gather(f, y)
        else:
            f_all = f
        with timer("guidance"):
            f_leaf = f_all.detach().requires_grad_(True)
            loss, _ = self.guidance(f_leaf, y)
            loss.backward()
        with timer("encoder"):
            f.backward(f_leaf.grad if self.global_batch is None else self.global_batch.local_grad(f_leaf.grad))
        with timer("optimizer"):
            self._step()
            self.scheduler.step()
        if self.bma is not None:
            with timer("bma"):
                self.bma.update()
        return loss.detach()
