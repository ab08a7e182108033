"""Worker processes for data work: one DataLoader recipe for every image path of the trainer."""
from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["default_workers", "check_workers", "make_loader"]

PREFETCH_BATCHES = 2  # per worker: enough to hide a step's jitter, small enough for (B, 3, 224, 224) floats


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers() -> int:
    """Worker processes when none are asked for: one core stays with the training process, at most 8
    (beyond that decode/augment of a 36-image batch is no longer the bottleneck), at least 1 so the
    training process never decodes images itself. Under torchrun the node's cores are split between
    its ranks (LOCAL_WORLD_SIZE): each rank's workers get their share."""
    try:
        ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks_here = 1
    return max(1, min(8, _cores() // ranks_here - 1))


def check_workers(workers) -> int:
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0 (0: in the training process) or None, got {workers!r}")
    return workers


def _one_thread_per_worker(_worker_id: int) -> None:
    # N workers x the default intra-op pool oversubscribe the cores (measured: ToTensor/Normalize
    # 10x slower with 2 OpenMP threads per worker next to another job)
    torch.set_num_threads(1)


def make_loader(items: Dataset, keys, workers: int, pin_memory: bool) -> DataLoader:
    """A loader whose every item is already a whole batch (``items[key]``), in the order of ``keys``.

    The batch content is a pure function of its key, so the number of workers never changes it.
    """
    return DataLoader(
        items,
        batch_size=None,
        sampler=keys,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=PREFETCH_BATCHES if workers > 0 else None,
        worker_init_fn=_one_thread_per_worker if workers > 0 else None,
    )
