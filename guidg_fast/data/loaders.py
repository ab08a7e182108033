"""The trainer's input pipeline: seeded domain-balanced batches and evaluation batches, built by
worker processes from the uint8 cache (``image_cache``) or, for datasets it cannot cache, from
``dataset[i]``.

Every batch is a pure function of (seed, step) -- which samples (``epoch_batch_indices``) and which
augmentation (a generator seeded from (seed, step), never from worker state) -- so a run gives the
same batches with any number of workers, and a resumed run the same as an uninterrupted one.

Where the random part runs: with a uint8 cache, RandAugment runs on whole uint8 batches -- in the
workers on the CPU, or in the training process on the GPU after the (pinned, uint8) batch is
copied there. Uncached datasets apply their own transform per item, in the workers, under a torch
and ``random`` seed made of (seed, step, domain, position).
"""
from __future__ import annotations

import itertools
import math
import random
from typing import Iterator, Mapping, Sequence

import torch
from torch.utils.data import Dataset

# the one place the augmentation implementation is chosen
from .augment import BatchedRandAugment, normalize_uint8
from .image_cache import ImageCacheStore, UInt8Images
from .workers import check_workers, make_loader

__all__ = [
    "DomainBalancedBatches",
    "EvalBatches",
    "EvalFeed",
    "Step2Feed",
    "domain_balanced_batches",
    "epoch_batch_indices",
    "seeded_generator",
]

STEP2_STREAM = 1000  # domain j of step 2 draws its batches from stream 1000 + j
AUGMENT_STREAM = 3000  # the step's batched RandAugment draws
ITEM_STREAM = 4000  # per-item random transforms of uncached datasets


def mix_seed(*parts: int) -> int:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return seed


def seeded_generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


def epoch_batch_indices(n: int, batch: int, step: int, seed: int, stream: int) -> torch.Tensor:
    """Indices of batch ``step`` from a dataset of n items, reshuffled each epoch.

    A pure function of (seed, stream, step): training can resume at any step and see the same batches.
    """
    per_epoch = max(1, math.ceil(n / batch))
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=seeded_generator(seed, stream, epoch))
    idx = perm[pos * batch : (pos + 1) * batch]
    if idx.numel() < batch:  # the last batch of an epoch wraps around to stay full
        idx = torch.cat([idx, perm[: batch - idx.numel()]])
    return idx


class _SeededRNG:
    """torch and ``random`` seeded for one item, the caller's state restored afterwards."""

    def __init__(self, seed: int):
        self.seed = seed % (2**63)

    def __enter__(self):
        self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        self._py = random.getstate()
        torch.manual_seed(self.seed)
        random.seed(self.seed)

    def __exit__(self, *exc):
        random.setstate(self._py)
        return self._fork.__exit__(*exc)


def stack_items(dataset, indices: Sequence[int], seed_parts: tuple | None,
                first_pos: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``first_pos``: the position of ``indices[0]`` in its block (the seed of an item is its position)."""
    images, labels = [], []
    for pos, i in enumerate(indices, start=first_pos):
        if seed_parts is None:
            x, y = dataset[i][:2]
        else:
            with _SeededRNG(mix_seed(*seed_parts, pos)):
                x, y = dataset[i][:2]
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{dataset!r} item {i} is a {type(x).__name__}, not an image tensor; give the dataset a "
                f"transform such as guidg_fast.data.clip_transform()"
            )
        images.append(x)
        labels.append(int(y))
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def _uint8_mode(caches: Sequence[UInt8Images | None]) -> bool:
    """Batches come from the uint8 caches only when every part has one and they agree on size,
    augmentation and normalisation (one batched augmentation for the whole batch)."""
    return all(c is not None for c in caches) and len({c.plan.batch_signature for c in caches}) == 1


class DomainBalancedBatches(Dataset):
    """Item ``step``: ``(x, y, domain)`` with ``batch_per_domain`` samples of every domain,
    domain-major; domain j's samples are ``epoch_batch_indices(n_j, batch_per_domain, step, seed,
    streams[j])``.

    x is normalised float32 -- or, with ``augment_in_workers=False`` and uint8 caches, the cached
    uint8 images un-augmented (the caller augments them, e.g. on the GPU, with ``augmentation``).

    ``rows`` = (start, stop): only those rows of the step's batch (a rank's slice under
    torch.distributed). Uncached items are seeded by their position, so only the slice is loaded;
    a uint8 batch is augmented whole -- one generator draws for the whole batch -- and sliced
    after, so the rows are bitwise the ones a one-process run sees. ``finish`` does the slicing.
    """

    def __init__(self, datasets: Sequence, caches: Sequence[UInt8Images | None], batch_per_domain: int, seed: int,
                 streams: Sequence[int], augment_in_workers: bool = True, rows: tuple[int, int] | None = None):
        self.datasets, self.batch_per_domain, self.seed = list(datasets), int(batch_per_domain), int(seed)
        self.streams = list(streams)
        self.uint8 = _uint8_mode(caches)
        self.caches = list(caches) if self.uint8 else None
        plan = self.caches[0].plan if self.uint8 else None
        self.plan = plan
        self.augmentation = BatchedRandAugment(**plan.randaugment) if plan is not None and plan.randaugment else None
        self.augment_in_workers = augment_in_workers or not self.uint8
        total = self.batch_per_domain * len(self.datasets)
        if rows is not None and not (0 <= rows[0] <= rows[1] <= total):
            raise ValueError(f"rows must be a range (start, stop) inside the batch of {total}, got {rows!r}")
        self.rows = None if rows is None or tuple(rows) == (0, total) else (int(rows[0]), int(rows[1]))

    def __len__(self) -> int:  # unbounded; the sampler decides which steps are read
        return 2**62

    def indices(self, step: int) -> list[torch.Tensor]:
        return [epoch_batch_indices(len(ds), self.batch_per_domain, step, self.seed, s)
                for ds, s in zip(self.datasets, self.streams)]

    def augment_generator(self, step: int) -> torch.Generator:
        return seeded_generator(self.seed, AUGMENT_STREAM, step)

    def finish(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """The random part and the normalisation of a uint8 batch (where ``x`` is: CPU or GPU)."""
        if self.augmentation is not None:
            x = self.augmentation(x, self.augment_generator(step))
        if self.rows is not None:  # [distributed] this rank's rows, after the whole batch's draws
            x = x[self.rows[0] : self.rows[1]]
        return normalize_uint8(x, self.plan.mean, self.plan.std)

    def _row_slice(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.rows is None else t[self.rows[0] : self.rows[1]]

    def __getitem__(self, step: int):
        parts = self.indices(step)
        domain = torch.cat([torch.full((len(idx),), j, dtype=torch.long) for j, idx in enumerate(parts)])
        if self.uint8:
            x = torch.cat([c.images.index_select(0, idx) for c, idx in zip(self.caches, parts)])
            y = torch.cat([c.labels.index_select(0, idx) for c, idx in zip(self.caches, parts)])
            if self.augment_in_workers:
                x = self.finish(x, step)
            return x, self._row_slice(y), self._row_slice(domain)
        lo, hi = self.rows if self.rows is not None else (0, len(domain))
        xs, ys, offset = [], [], 0
        for j, (ds, idx) in enumerate(zip(self.datasets, parts)):
            # [distributed] the part of domain j's block inside [lo, hi), seeded by its block positions
            a, b = max(lo - offset, 0), min(hi - offset, len(idx))
            offset += len(idx)
            if b > a:
                x, y = stack_items(ds, idx[a:b].tolist(), (self.seed, ITEM_STREAM, step, j), first_pos=a)
                xs.append(x)
                ys.append(y)
        return torch.cat(xs), torch.cat(ys), domain[lo:hi]


class _Steps:
    """Sampler of steps start, start + 1, ... (stop None: unbounded)."""

    def __init__(self, start: int, stop: int | None):
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(itertools.count(self.start) if self.stop is None else range(self.start, self.stop))


def _pin(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


class Step2Feed:
    """Step-2 batches ``(x, y)`` on ``device`` for steps [start, stop), built by ``workers`` processes.

    ``datasets`` in the order of their streams (the trainer: sorted names, stream 1000 + j). Caches
    come from ``store`` (built here, by the workers, when missing). On CUDA the uint8 batch is copied
    (pinned, non-blocking) and augmented + normalised on the GPU; on the CPU the workers do it.
    ``rows``: only those rows of every step's batch (see ``DomainBalancedBatches``).
    """

    def __init__(self, datasets: Sequence, batch_per_domain: int, seed: int, device, *, start: int, stop: int,
                 workers: int | None = None, store: ImageCacheStore | None = None,
                 rows: tuple[int, int] | None = None):
        self.device = torch.device(device)
        self.workers = check_workers(workers)
        store = store if store is not None else ImageCacheStore()
        caches = [store.get(ds, self.workers) for ds in datasets]
        on_gpu = self.device.type == "cuda"
        self.items = DomainBalancedBatches(datasets, caches, batch_per_domain, seed,
                                           [STEP2_STREAM + j for j in range(len(datasets))],
                                           augment_in_workers=not on_gpu, rows=rows)
        self.start, self.stop = start, stop
        self.loader = make_loader(self.items, _Steps(start, stop), self.workers, pin_memory=_pin(self.device))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        it = iter(self.loader)
        for step in range(self.start, self.stop):
            x, y, _ = next(it)
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if not self.items.augment_in_workers:
                x = self.items.finish(x, step)
            yield x, y


class EvalBatches(Dataset):
    """Item ``(k, b)``: batch b (``batch_size`` items in order) of dataset k as ``(k, x, y)``;
    x normalised float32, or uint8 from the cache with ``normalize_in_workers=False``."""

    def __init__(self, datasets: Sequence, caches: Sequence[UInt8Images | None], batch_size: int,
                 normalize_in_workers: bool = True):
        self.datasets, self.caches, self.batch_size = list(datasets), list(caches), int(batch_size)
        self.normalize_in_workers = normalize_in_workers

    def keys(self) -> list[tuple[int, int]]:
        return [(k, b) for k, ds in enumerate(self.datasets) for b in range(-(-len(ds) // self.batch_size))]

    def __len__(self) -> int:
        return len(self.keys())

    def __getitem__(self, key):
        k, b = key
        ds, cache = self.datasets[k], self.caches[k]
        start, stop = b * self.batch_size, min(len(ds), (b + 1) * self.batch_size)
        if cache is None:
            x, y = stack_items(ds, range(start, stop), (ITEM_STREAM, k, b))
            return k, x, y
        x, y = cache.images[start:stop], cache.labels[start:stop]
        if self.normalize_in_workers:
            x = normalize_uint8(x, cache.plan.mean, cache.plan.std)
        return k, x, y


class EvalFeed:
    """Batches ``(k, x, y)`` of every dataset in order, normalised on ``device``.

    ``shard`` = (rank, world_size): only every world_size-th batch from the rank-th (whole batches
    round-robin over all datasets' batches: together the ranks see every image once, in the very
    batches one process sees). ``keys``: the (dataset, batch number) of each batch yielded, in order.
    """

    def __init__(self, datasets: Sequence, batch_size: int, device, *, workers: int | None = None,
                 store: ImageCacheStore | None = None, shard: tuple[int, int] | None = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.device = torch.device(device)
        self.workers = check_workers(workers)
        store = store if store is not None else ImageCacheStore()
        self.caches = [store.get(ds, self.workers) for ds in datasets]
        self.items = EvalBatches(datasets, self.caches, batch_size, normalize_in_workers=self.device.type != "cuda")
        self.keys = self.items.keys()
        if shard is not None:
            rank, world = shard
            if not 0 <= rank < world:
                raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard!r}")
            self.keys = self.keys[rank::world]
        self.loader = make_loader(self.items, self.keys, self.workers, pin_memory=_pin(self.device))

    def __iter__(self):
        for k, x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            if x.dtype == torch.uint8:
                plan = self.caches[k].plan
                x = normalize_uint8(x, plan.mean, plan.std)
            yield k, x, y.to(self.device, non_blocking=True)


def domain_balanced_batches(
    datasets: dict,
    batch_per_domain: int,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    image_cache: ImageCacheStore | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Infinite iterator of ``(x, y, domain_index)`` with ``batch_per_domain`` samples of every
    domain per step (domain-major, ``domain_index`` = position in ``datasets``): the trainer's own
    sampler (``DomainBalancedBatches``; domain j uses stream 1000 + j, as the trainer does for its
    sorted domain names).

    Batches -- samples and random transforms -- depend only on ``seed`` and the step, whatever
    ``num_workers``. With ``image_cache`` (an ``ImageCacheStore``) cacheable datasets are read from
    their uint8 cache and RandAugment runs batched; without it every item is ``dataset[i]``.
    """
    if not isinstance(datasets, Mapping) or not datasets:
        raise ValueError("datasets must be a non-empty dict {domain name: dataset}")
    if isinstance(batch_per_domain, bool) or not isinstance(batch_per_domain, int) or batch_per_domain < 1:
        raise ValueError(f"batch_per_domain must be a positive int, got {batch_per_domain!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    for name, ds in datasets.items():
        if len(ds) == 0:
            raise ValueError(f"domain {name!r} has no samples")
    workers = check_workers(num_workers)
    parts = list(datasets.values())
    caches = [image_cache.get(ds, workers) for ds in parts] if image_cache is not None else [None] * len(parts)
    items = DomainBalancedBatches(parts, caches, batch_per_domain, seed,
                                  [STEP2_STREAM + j for j in range(len(parts))])
    return iter(make_loader(items, _Steps(0, None), workers, pin_memory=pin_memory))
