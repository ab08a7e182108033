"""Seeded data protocols: multi-source DG (30/70 per source domain) and few-shot DG (50/50, n-shot)."""
from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.utils.data import Dataset

from .folders import check_same_classes

__all__ = [
    "DGSplit",
    "DomainSubset",
    "domain_seed",
    "dataset_labels",
    "few_shot_split",
    "multi_source_split",
    "split_indices",
    "with_transform",
]


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random partition of ``range(n)`` into ``(first, rest)``.

    ``len(first) == round(fraction * n)``; both parts are sorted; the same ``(n, fraction, seed)``
    always gives the same split (torch.Generator, independent of the global RNG).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(fraction, (int, float)) or not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    generator = torch.Generator().manual_seed(seed % (2**63))
    perm = torch.randperm(n, generator=generator).tolist()
    k = round(float(fraction) * n)
    return sorted(perm[:k]), sorted(perm[k:])


def domain_seed(seed: int, domain: str, purpose: str = "") -> int:
    """A seed for one domain that depends on its name, not on its position or the other domains.

    So the split of a source domain is the same whichever domain is held out as the target.
    """
    return (int(seed) * 1_000_003 + zlib.crc32(f"{domain}\x00{purpose}".encode())) % (2**63)


def dataset_labels(ds: Dataset) -> list[int]:
    """Labels of a dataset without decoding its images when it exposes them."""
    for attr in ("labels", "targets"):
        value = getattr(ds, attr, None)
        if value is not None:
            return [int(v) for v in value]
    samples = getattr(ds, "samples", None)
    if samples is not None:
        return [int(s[1]) for s in samples]
    inner, indices = getattr(ds, "dataset", None), getattr(ds, "indices", None)
    if inner is not None and indices is not None:
        inner_labels = dataset_labels(inner)
        return [inner_labels[i] for i in indices]
    return [int(ds[i][1]) for i in range(len(ds))]


class DomainSubset(Dataset):
    """A view of some samples of one domain's dataset, keeping ``.domain``, ``.classnames``, ``.labels``.

    With ``transform=None`` items come from ``dataset[i]`` (the dataset's own transform). With a
    transform, the raw sample is taken from ``dataset.load(i)`` (DomainFolder, synthetic data,
    DomainSubset have it) and this transform applied instead, so step 1, step 2 and test views of
    the same files can each have their own augmentation.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], domain: str | None = None, labels=None, transform=None):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        n = len(dataset)
        bad = [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise ValueError(f"indices out of range for a dataset of {n} samples: {bad[:5]}")
        self.domain = domain if domain is not None else getattr(dataset, "domain", None)
        self.classnames = list(getattr(dataset, "classnames", []) or [])
        if transform is not None and not callable(getattr(dataset, "load", None)):
            raise ValueError(
                f"dataset of domain {self.domain!r} ({type(dataset).__name__}) has no .load(index) for raw "
                f"samples, so DomainSubset cannot apply its own transform"
            )
        self._transform = transform
        if labels is None:
            all_labels = dataset_labels(dataset)
            labels = [all_labels[i] for i in self.indices]
        self.labels = list(labels)

    @property
    def transform(self):
        return self._transform if self._transform is not None else getattr(self.dataset, "transform", None)

    def load(self, index: int):
        """The raw (untransformed) sample ``(image, label)``."""
        return self.dataset.load(self.indices[index])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        if self._transform is None:
            return self.dataset[self.indices[index]]
        image, label = self.dataset.load(self.indices[index])
        return self._transform(image), label

    def __repr__(self) -> str:
        return f"DomainSubset(domain={self.domain!r}, images={len(self)} of {len(self.dataset)})"


def with_transform(dataset: Dataset, transform) -> DomainSubset:
    """All of ``dataset`` (a domain dataset or DomainSubset) seen through ``transform``."""
    if isinstance(dataset, DomainSubset):
        return DomainSubset(dataset.dataset, dataset.indices, dataset.domain, dataset.labels, transform)
    return DomainSubset(dataset, range(len(dataset)), transform=transform)


@dataclass
class DGSplit:
    """Data for one GuiDG run: per-domain step-1 (expert) and step-2 sets, target test sets."""

    step1: dict[str, Dataset]
    step2: dict[str, Dataset]
    test: dict[str, Dataset]
    classnames: list[str]
    source_domains: list[str]
    target_domains: list[str]
    info: dict = field(default_factory=dict)  # protocol, seed, and (ImageNet-DG) count checks

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def with_transforms(self, step1=None, step2=None, test=None) -> "DGSplit":
        """The same split with its own transform per part (None keeps a part as it is), e.g.
        ``split.with_transforms(clip_transform(train=True), clip_transform(randaugment=True), clip_transform())``."""

        def view(part, transform):
            if transform is None:
                return dict(part)
            return {d: with_transform(ds, transform) for d, ds in part.items()}

        return DGSplit(
            view(self.step1, step1), view(self.step2, step2), view(self.test, test), list(self.classnames),
            list(self.source_domains), list(self.target_domains), dict(self.info),
        )

    def counts(self) -> dict[str, dict[str, int]]:
        """Number of images per part and domain, e.g. for logging."""
        return {
            "step1": {d: len(ds) for d, ds in self.step1.items()},
            "step2": {d: len(ds) for d, ds in self.step2.items()},
            "test": {d: len(ds) for d, ds in self.test.items()},
        }


def _sources_and_targets(domains: dict[str, Dataset], targets) -> tuple[list[str], list[str]]:
    if not isinstance(domains, dict) or not domains:
        raise ValueError("domains must be a non-empty dict {domain name: dataset}")
    if isinstance(targets, str):
        targets = [targets]
    targets = [str(t) for t in targets]
    unknown = [t for t in targets if t not in domains]
    if unknown:
        raise ValueError(f"target domain(s) {unknown} not in domains {list(domains)}")
    if len(set(targets)) != len(targets):
        raise ValueError(f"targets has duplicates: {targets}")
    sources = [d for d in domains if d not in targets]
    if not sources:
        raise ValueError(f"no source domain left: every domain in {list(domains)} is a target")
    for d, ds in domains.items():
        if len(ds) == 0:
            raise ValueError(f"domain {d!r} is empty")
    return sources, targets


def multi_source_split(
    domains: dict[str, Dataset], targets: Sequence[str], seed: int = 0, expert_fraction: float = 0.3
) -> DGSplit:
    """Multi-source DG (docs/guidg_math.md, "Data protocol"): each source domain is split, seeded,
    ``expert_fraction`` (30%) for its step-1 expert and the rest (70%) for step 2; each target
    domain is a test set as a whole."""
    sources, targets = _sources_and_targets(domains, targets)
    if not 0.0 < float(expert_fraction) < 1.0:
        raise ValueError(f"expert_fraction must be in (0, 1), got {expert_fraction!r}")
    classnames = check_same_classes(domains)
    step1, step2 = {}, {}
    for d in sources:
        ds = domains[d]
        first, rest = split_indices(len(ds), expert_fraction, domain_seed(seed, d, "multi_source"))
        labels = dataset_labels(ds)
        step1[d] = DomainSubset(ds, first, d, [labels[i] for i in first])
        step2[d] = DomainSubset(ds, rest, d, [labels[i] for i in rest])
    test = {t: domains[t] for t in targets}
    info = {"protocol": "multi_source", "seed": seed, "expert_fraction": float(expert_fraction)}
    return DGSplit(step1, step2, test, classnames, sources, targets, info)


def _stratified_halves(labels: list[int], seed: int) -> tuple[list[int], list[int]]:
    """Per class a seeded 50/50 split (like CoOp's split_trainval), so both halves hold every class."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    first, second = [], []
    for y in sorted(by_class):
        idx = by_class[y]
        a, b = split_indices(len(idx), 0.5, (seed + 7919 * (y + 1)) % (2**63))
        first.extend(idx[i] for i in a)
        second.extend(idx[i] for i in b)
    return sorted(first), sorted(second)


def _n_per_class(indices: list[int], labels: list[int], n_shot: int, seed: int, short: dict) -> list[int]:
    by_class: dict[int, list[int]] = {}
    for i in indices:
        by_class.setdefault(labels[i], []).append(i)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for y in sorted(by_class):
        idx = by_class[y]
        if len(idx) < n_shot:
            short[y] = min(short.get(y, n_shot), len(idx))
        order = torch.randperm(len(idx), generator=generator).tolist()
        chosen.extend(idx[j] for j in order[:n_shot])
    return sorted(chosen)


def few_shot_split(domains: dict[str, Dataset], targets: Sequence[str], n_shot: int = 16, seed: int = 0) -> DGSplit:
    """Few-shot DG (docs/guidg_math.md, "Data protocol"): per source domain a seeded 50/50 split
    (stratified per class), then ``n_shot`` images per class from each half; the first half feeds
    step 1, the second step 2. A class with fewer than ``n_shot`` images in a half contributes
    all it has (warning), as in the official few-shot sampler. Targets are test sets as a whole."""
    if isinstance(n_shot, bool) or not isinstance(n_shot, int) or n_shot < 1:
        raise ValueError(f"n_shot must be a positive int, got {n_shot!r}")
    sources, targets = _sources_and_targets(domains, targets)
    classnames = check_same_classes(domains)
    step1, step2 = {}, {}
    for d in sources:
        ds = domains[d]
        labels = dataset_labels(ds)
        half1, half2 = _stratified_halves(labels, domain_seed(seed, d, "few_shot_halves"))
        short: dict[int, int] = {}
        pick1 = _n_per_class(half1, labels, n_shot, domain_seed(seed, d, "few_shot_step1"), short)
        pick2 = _n_per_class(half2, labels, n_shot, domain_seed(seed, d, "few_shot_step2"), short)
        missing = sorted(set(range(len(classnames))) - set(labels))
        if short or missing:
            names = [classnames[y] if y < len(classnames) else str(y) for y in sorted(short)]
            msg = f"few_shot_split: domain {d!r} has fewer than {n_shot} images per half for {len(short)} class(es)"
            msg += f" ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}; using all they have)"
            if missing:
                msg += f"; no images at all for {len(missing)} class(es)"
            warnings.warn(msg, stacklevel=2)
        step1[d] = DomainSubset(ds, pick1, d, [labels[i] for i in pick1])
        step2[d] = DomainSubset(ds, pick2, d, [labels[i] for i in pick2])
    test = {t: domains[t] for t in targets}
    info = {"protocol": "few_shot", "seed": seed, "n_shot": n_shot}
    return DGSplit(step1, step2, test, classnames, sources, targets, info)
