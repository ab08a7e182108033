"""Domain-balanced batches: every step holds the same number of samples from every domain."""
from __future__ import annotations

import bisect
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["DomainBalancedBatchSampler", "domain_balanced_batches"]


class DomainBalancedBatchSampler(Sampler[list[int]]):
    """Infinite batches of indices into the concatenation of ``sizes`` domains.

    Each batch takes ``batch_per_domain`` indices from every domain, domain-major. Each domain walks
    through its own random permutation and draws a new one when it is used up (every sample once per
    epoch of its domain; a domain smaller than the batch wraps). Given ``seed`` the stream is fixed.
    """

    def __init__(self, sizes: list[int], batch_per_domain: int, seed: int):
        self.sizes = list(sizes)
        self.offsets = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)
        self.batch_per_domain = batch_per_domain
        self.seed = seed

    def __iter__(self) -> Iterator[list[int]]:
        generators = [torch.Generator().manual_seed((self.seed * 1_000_003 + 7 * k) % (2**63)) for k in range(len(self.sizes))]
        perms = [torch.randperm(n, generator=g).tolist() for n, g in zip(self.sizes, generators)]
        cursors = [0] * len(self.sizes)
        while True:
            batch = []
            for k, n in enumerate(self.sizes):
                for _ in range(self.batch_per_domain):
                    if cursors[k] == n:
                        perms[k] = torch.randperm(n, generator=generators[k]).tolist()
                        cursors[k] = 0
                    batch.append(self.offsets[k] + perms[k][cursors[k]])
                    cursors[k] += 1
            yield batch

    def __len__(self) -> int:  # infinite; DataLoader only needs this for len(loader)
        raise TypeError("DomainBalancedBatchSampler is infinite")


class _TaggedConcat(Dataset):
    """Concatenated domains; items are (x, y, domain_index)."""

    def __init__(self, datasets: list[Dataset], offsets: list[int]):
        self.datasets = datasets
        self.offsets = offsets

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int):
        k = bisect.bisect_right(self.offsets, index) - 1
        item = self.datasets[k][index - self.offsets[k]]
        return item[0], item[1], k


def _collate(items):
    xs = [it[0] for it in items]
    if not all(isinstance(x, torch.Tensor) for x in xs):
        kinds = sorted({type(x).__name__ for x in xs})
        raise TypeError(
            f"domain_balanced_batches needs datasets that return image tensors, got {kinds}; "
            f"give the datasets a transform such as guidg_fast.data.clip_transform()"
        )
    x = torch.stack(xs)
    y = torch.as_tensor([int(it[1]) for it in items], dtype=torch.long)
    d = torch.as_tensor([it[2] for it in items], dtype=torch.long)
    return x, y, d


def domain_balanced_batches(
    datasets: dict[str, Dataset],
    batch_per_domain: int,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Infinite iterator of ``(x, y, domain_index)`` with ``batch_per_domain`` samples of every
    domain per step (domain-major, ``domain_index`` = position in ``datasets``).

    Which samples come when depends only on ``seed`` (each domain reshuffled per epoch of that
    domain). Random transforms draw from the global torch RNG when ``num_workers == 0`` (seed it
    with torch.manual_seed for identical runs); with ``num_workers > 0`` the workers are seeded
    from ``seed`` (DataLoader generator), so the same ``seed`` and ``num_workers`` repeat a run.
    """
    if not isinstance(datasets, dict) or not datasets:
        raise ValueError("datasets must be a non-empty dict {domain name: dataset}")
    if isinstance(batch_per_domain, bool) or not isinstance(batch_per_domain, int) or batch_per_domain < 1:
        raise ValueError(f"batch_per_domain must be a positive int, got {batch_per_domain!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    sizes = []
    for name, ds in datasets.items():
        if len(ds) == 0:
            raise ValueError(f"domain {name!r} has no samples")
        sizes.append(len(ds))
    sampler = DomainBalancedBatchSampler(sizes, batch_per_domain, seed)
    tagged = _TaggedConcat(list(datasets.values()), sampler.offsets)
    loader = DataLoader(
        tagged,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed % (2**63)),
        persistent_workers=num_workers > 0,
    )
    return iter(loader)
