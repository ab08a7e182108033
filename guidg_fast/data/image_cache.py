"""The uint8 image cache: decode + the deterministic part of a transform, once per image.

A dataset whose ``transform`` is a torchvision ``Compose`` of the shape ``clip_transform`` builds
(``[ToPIL] Resize CenterCrop [RandAugment] ToTensor Normalize``) and that gives raw samples with
``load(i)`` (DomainFolder, DomainSubset, the synthetic domains) is split into

- the deterministic part (decode, Resize, CenterCrop): run once per image, by the worker processes,
  and kept as a (N, 3, H, W) uint8 tensor -- in memory, or in a memory-mapped file under a cache
  folder;
- the random part (RandAugment), applied per step to uint8 batches (see ``loaders``);
- ToTensor + Normalize, applied per batch in one pass (normalize_uint8: a few float32 ulps from ToTensor + Normalize).

Keys. A dataset backed by files (``samples`` lists, also through DomainSubset) is keyed by its file
list, every file's size and mtime, and the deterministic transform's ``repr``; any change rebuilds
(the file of a cache folder is replaced atomically). Datasets without files (synthetic, tensors)
are cached in memory only, keyed by object identity (a weak reference: a new dataset object is
a new cache). Datasets of any other kind go through the workers uncached.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from .workers import make_loader

__all__ = ["TransformPlan", "UInt8Images", "ImageCacheStore", "transform_plan", "dataset_plan", "source_files"]

FORMAT_VERSION = "1"
MAX_IN_MEMORY_BYTES = 16 * 2**30  # above this a cache needs a folder (memory-mapped file)
BUILD_BATCH = 64


@dataclass(frozen=True)
class TransformPlan:
    """How one dataset transform splits into cached / random / per-batch parts."""

    deterministic: Callable  # raw image -> PIL image of ``size``
    size: tuple  # (H, W)
    randaugment: dict | None  # BatchedRandAugment kwargs, None without RandAugment
    mean: tuple
    std: tuple
    key: str  # identifies the deterministic part (the cache key's transform part)

    @property
    def batch_signature(self) -> tuple:
        """Datasets with equal signatures can share one batched augmentation and normalisation."""
        ra = tuple(sorted(self.randaugment.items())) if self.randaugment else None
        return (self.size, ra, self.mean, self.std)


def _is_to_pil(step) -> bool:
    return type(step).__name__ == "_ToPIL" and type(step).__module__.endswith("data.transforms")


def transform_plan(transform) -> TransformPlan | None:
    """The split of ``transform``, or None when it is not of the cacheable shape."""
    if not isinstance(transform, T.Compose):
        return None
    steps = list(transform.transforms)
    prefix = []
    while steps and (_is_to_pil(steps[0]) or isinstance(steps[0], (T.Resize, T.CenterCrop))):
        prefix.append(steps.pop(0))
    if not prefix or not isinstance(prefix[-1], T.CenterCrop):
        return None  # without a final center crop the cached images have no common size
    randaugment = None
    if steps and isinstance(steps[0], T.RandAugment):
        ra = steps.pop(0)
        if ra.interpolation != T.InterpolationMode.NEAREST:
            return None
        fill = ra.fill if ra.fill is not None else 0
        randaugment = {"num_ops": int(ra.num_ops), "magnitude": int(ra.magnitude),
                       "num_magnitude_bins": int(ra.num_magnitude_bins), "fill": fill}
    if len(steps) != 2 or not isinstance(steps[0], T.ToTensor) or not isinstance(steps[1], T.Normalize):
        return None
    size = tuple(int(s) for s in prefix[-1].size)
    if len(size) == 1:
        size = (size[0], size[0])
    deterministic = T.Compose(prefix)
    return TransformPlan(deterministic, size, randaugment, tuple(float(m) for m in steps[1].mean),
                         tuple(float(s) for s in steps[1].std), f"u8/{FORMAT_VERSION}|{deterministic!r}")


def dataset_plan(dataset) -> TransformPlan | None:
    """The plan of a dataset's own transform when its raw samples can be read (``load``)."""
    if not callable(getattr(dataset, "load", None)):
        return None
    return transform_plan(getattr(dataset, "transform", None))


def source_files(dataset) -> list[str] | None:
    """The image file of every item of ``dataset``, in order, or None when it has no files."""
    inner, indices = getattr(dataset, "dataset", None), getattr(dataset, "indices", None)
    if inner is not None and indices is not None:
        files = source_files(inner)
        return None if files is None else [files[int(i)] for i in indices]
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, (list, tuple)) and len(samples) == len(dataset):
        files = [s[0] if isinstance(s, (tuple, list)) else s for s in samples]
        if all(isinstance(f, (str, os.PathLike)) for f in files):
            return [os.fspath(f) for f in files]
    return None


def _digest(*chunks: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for c in chunks:
        h.update(c.encode())
        h.update(b"\x00")
    return h.hexdigest()


def _files_state(files: list[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for path in files:
        try:
            st = os.stat(path)
            h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\x00".encode())
        except OSError:
            h.update(f"{path}|missing\x00".encode())
    return h.hexdigest()


@dataclass
class UInt8Images:
    """The cached deterministic images of one dataset: images (N, 3, H, W) uint8, labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor
    plan: TransformPlan
    key: str
    path: str | None = None  # the memory-mapped file, None in memory
    built: bool = False  # True when the last lookup decoded the images
    rebuild_reason: str | None = None
    _owner: object = field(default=None, repr=False)  # weakref for identity-keyed caches

    def __len__(self) -> int:
        return self.images.shape[0]


class _DeterministicBatches(Dataset):
    """Item b: the deterministic images and labels of items [b * batch, (b + 1) * batch)."""

    def __init__(self, dataset, plan: TransformPlan, batch: int):
        self.dataset, self.plan, self.batch = dataset, plan, batch

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch)

    def __getitem__(self, b: int):
        start, stop = b * self.batch, min(len(self.dataset), (b + 1) * self.batch)
        images = torch.empty((stop - start, 3, *self.plan.size), dtype=torch.uint8)
        labels = torch.empty(stop - start, dtype=torch.int64)
        for j, i in enumerate(range(start, stop)):
            image, label = self.dataset.load(i)
            pil = self.plan.deterministic(image)
            x = TF.pil_to_tensor(pil)
            if tuple(x.shape) != (3, *self.plan.size):
                raise ValueError(f"item {i} of {self.dataset!r} becomes an image of shape {tuple(x.shape)} after "
                                 f"{self.plan.deterministic!r}, expected (3, {self.plan.size[0]}, {self.plan.size[1]})")
            images[j] = x
            labels[j] = int(label)
        return start, images, labels


def _build_into(dataset, plan: TransformPlan, images: torch.Tensor, workers: int) -> torch.Tensor:
    labels = torch.empty(len(dataset), dtype=torch.int64)
    items = _DeterministicBatches(dataset, plan, BUILD_BATCH)
    for start, x, y in make_loader(items, range(len(items)), workers, pin_memory=False):
        images[start : start + x.shape[0]] = x
        labels[start : start + y.shape[0]] = y
    return labels


def _in_memory(dataset, plan, key, workers, nbytes: int, too_big: str, **extra):
    """The dataset's uint8 images built into memory, or None (with a warning) above MAX_IN_MEMORY_BYTES."""
    if nbytes > MAX_IN_MEMORY_BYTES:
        warnings.warn(f"{dataset!r}: a uint8 cache would take {nbytes / 2**30:.1f} GiB of memory; {too_big}",
                      stacklevel=4)
        return None
    images = torch.empty((len(dataset), 3, *plan.size), dtype=torch.uint8)
    labels = _build_into(dataset, plan, images, workers)
    return UInt8Images(images, labels, plan, key, built=True, **extra)


class ImageCacheStore:
    """Finds, builds and remembers the uint8 caches of datasets (see the module docstring).

    ``cache_dir``: folder for memory-mapped cache files (None: in memory). Caches found once stay in
    this store, so a second evaluation of the same files reads no image file.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
        self._memo: dict[str, UInt8Images] = {}

    def get(self, dataset, workers: int, plan: TransformPlan | None = None) -> UInt8Images | None:
        """The dataset's cache (built if missing or stale), or None when the dataset is not cacheable."""
        plan = plan if plan is not None else dataset_plan(dataset)
        if plan is None or len(dataset) == 0:
            return None
        files = source_files(dataset)
        nbytes = len(dataset) * 3 * plan.size[0] * plan.size[1]
        if files is None:
            slot = _digest("object", str(id(dataset)), plan.key)
            key = _digest(slot, str(len(dataset)))
            cached = self._memo.get(slot)
            if cached is not None and cached.key == key and cached._owner() is dataset:
                cached.built = False
                return cached
            entry = _in_memory(dataset, plan, key, workers, nbytes, "its images go through the workers uncached",
                               _owner=weakref.ref(dataset))
            if entry is not None:
                self._memo[slot] = entry
            return entry
        slot = _digest("files", *files, plan.key)
        key = _digest(slot, _files_state(files))
        cached = self._memo.get(slot)
        if cached is not None and cached.key == key:
            cached.built = False
            return cached
        reason = "stale: an image file's size or mtime changed" if cached is not None else None
        if self.cache_dir is None:
            entry = _in_memory(dataset, plan, key, workers, nbytes, "pass a cache folder (cache_dir=, --image-cache) "
                               "to memory-map it. Uncached for now", rebuild_reason=reason)
            if entry is None:
                return None
        else:
            entry = self._file_cache(dataset, plan, slot, key, workers)
        self._memo[slot] = entry
        return entry

    # -- memory-mapped files ------------------------------------------------------------------------
    def _paths(self, slot: str) -> tuple[str, str]:
        base = os.path.join(self.cache_dir, f"images-{slot}")
        return base + ".u8", base + ".json"

    def _file_cache(self, dataset, plan, slot, key, workers) -> UInt8Images:
        data_path, meta_path = self._paths(slot)
        shape = (len(dataset), 3, *plan.size)
        reason = None
        try:
            with open(meta_path) as fh:
                meta = json.load(fh)
            if meta.get("key") != key:
                reason = f"stale cache {data_path!r}: an image file or the transform changed"
            elif tuple(meta.get("shape", ())) != shape or os.path.getsize(data_path) != _numel(shape):
                reason = f"cache {data_path!r} does not hold {shape}"
            else:
                images = _map(data_path, shape)
                labels = torch.tensor(meta["labels"], dtype=torch.int64)
                return UInt8Images(images, labels, plan, key, path=data_path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:  # unreadable: rebuilt, never trusted
            reason = f"unreadable cache {meta_path!r} ({exc.__class__.__name__})"
        os.makedirs(self.cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(data_path) + ".", suffix=".tmp", dir=self.cache_dir)
        try:
            os.ftruncate(fd, _numel(shape))
            os.close(fd)
            target = torch.from_file(tmp, shared=True, size=_numel(shape), dtype=torch.uint8).view(shape)
            labels = _build_into(dataset, plan, target, workers)
            del target  # unmapped: its pages are flushed to the file
            # data first, then the key: a crash in between leaves a file whose key does not match
            os.replace(tmp, data_path)
            _write_json_atomic(meta_path, {"key": key, "shape": list(shape), "transform": plan.key,
                                           "labels": labels.tolist()})
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return UInt8Images(_map(data_path, shape), labels, plan, key, path=data_path, built=True, rebuild_reason=reason)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _map(path: str, shape) -> torch.Tensor:
    # shared=False: a private read-only-in-practice mapping; pages are shared with forked workers
    return torch.from_file(path, shared=False, size=_numel(shape), dtype=torch.uint8).view(shape)


def _write_json_atomic(path: str, obj) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
