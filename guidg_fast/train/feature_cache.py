"""ImageFeatureCache: frozen-encoder image features, computed once per augmented view.

In step 1 both CLIP encoders are frozen, so an image gives the same feature every epoch as long as
it is seen through the same augmented view (docs/guidg_math.md, "Exact shortcuts" 4). The cache encodes
every image of a dataset once per view (``views`` augmented copies, each drawn with its own seed;
``views=1`` with a deterministic transform is exactly what the official code recomputes on every
step) and serves (B, D) feature batches, so a step-1 iteration costs only the text pass and the
(B, D) x (D, K*C) logits product.

The features live in memory and, with ``path``, in a safetensors file written atomically (temp
file in the same folder + ``os.replace``). The file carries a key made of fingerprints of the
encoder weights, the dataset, the transform and the views/seed settings; a file whose key differs
(other weights, other images, other transform) is stale: it is rebuilt and replaced, never read.

Fingerprints: the encoder's weights are hashed in full (names, shapes, dtypes, bytes). The dataset
is identified by, in this order: ``dataset_key`` if given; ``dataset.fingerprint()``; an
ImageFolder-style ``dataset.samples`` list (paths, labels, file sizes and mtimes); a
``TensorDataset``'s tensors; otherwise the content of every item (loads each item once -- pass a
``dataset_key`` to skip that). The transform by ``transform_key`` if given, else its ``repr``
(torchvision transforms print their parameters; a plain function's repr holds its address and
makes every run rebuild, so give such transforms a ``transform_key``).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..backbone import encode_image
from ..data.workers import check_workers, make_loader

FORMAT_VERSION = "1"


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def module_fingerprint(module: torch.nn.Module) -> str:
    """Hash of every parameter and buffer of ``module`` (names, shapes, dtypes, values)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(type(module).__name__.encode())
    for name, t in module.state_dict(keep_vars=False).items():
        h.update(name.encode())
        _hash_tensor(h, t)
    return h.hexdigest()


def _hash_item(h, item) -> None:
    if isinstance(item, torch.Tensor):
        _hash_tensor(h, item)
    elif isinstance(item, (tuple, list)):
        h.update(f"seq{len(item)}".encode())
        for x in item:
            _hash_item(h, x)
    elif hasattr(item, "tobytes") and hasattr(item, "size") and hasattr(item, "mode"):  # PIL image
        h.update(f"pil|{item.mode}|{item.size}|".encode())
        h.update(item.tobytes())
    elif hasattr(item, "tobytes"):  # numpy
        h.update(f"np|{getattr(item, 'shape', '')}|{getattr(item, 'dtype', '')}|".encode())
        h.update(item.tobytes())
    else:
        h.update(repr(item).encode())


def dataset_fingerprint(dataset) -> str:
    """A key for the images and labels of ``dataset`` (see the module docstring for the order)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{type(dataset).__name__}|{len(dataset)}|".encode())
    if callable(getattr(dataset, "fingerprint", None)):
        h.update(b"fingerprint|" + str(dataset.fingerprint()).encode())
    elif isinstance(getattr(dataset, "samples", None), (list, tuple)):
        h.update(b"samples|")
        for sample in dataset.samples:
            path = sample[0] if isinstance(sample, (tuple, list)) else sample
            h.update(repr(tuple(sample) if isinstance(sample, (tuple, list)) else sample).encode())
            try:
                st = os.stat(path)
                h.update(f"|{st.st_size}|{st.st_mtime_ns}".encode())
            except (OSError, TypeError):
                pass
    elif isinstance(getattr(dataset, "tensors", None), (list, tuple)):
        h.update(b"tensors|")
        for t in dataset.tensors:
            _hash_tensor(h, t)
    else:
        h.update(b"items|")
        for i in range(len(dataset)):
            _hash_item(h, dataset[i])
    return h.hexdigest()


def _split_item(item):
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[0], item[1]
    raise ValueError(f"dataset items must be (image, label) pairs, got {type(item).__name__}")


class ImageFeatureCache:
    """Normalised image features of a frozen CLIP image encoder, one set per augmented view.

    model: an open_clip CLIP (``encode_image``; its ``visual`` tower is fingerprinted).
    dataset: a sequence of (image, label) items; ``transform`` (optional) maps an image to a
        (3, H, W) tensor and may be random: view v of item i is drawn with a seed made of
        (seed, v, i), so views are reproducible and independent of batching.
    views: augmented copies per image (1: the transform is applied once; exact without augmentation).
    path: optional safetensors file; reused when its key matches, rebuilt atomically otherwise.
    device: where the encoder runs (default: the model's device); features are kept on
        ``store_device`` (default: the same device).
    workers: processes that load and transform the images (None: ``default_workers()``; 0: this
        process). A view's augmentation is seeded per item, so the features do not depend on it.
    """

    def __init__(
        self,
        model,
        dataset,
        *,
        transform: Callable | None = None,
        views: int = 1,
        path: str | os.PathLike | None = None,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        store_device: str | torch.device | None = None,
        seed: int = 0,
        dataset_key: str | None = None,
        transform_key: str | None = None,
        dtype: torch.dtype = torch.float32,
        workers: int | None = None,
        distributed=None,
    ):
        if not hasattr(model, "encode_image"):
            raise ValueError(f"model must be a CLIP model with encode_image, got {type(model).__name__}")
        if int(views) < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        if int(views) > 1 and transform is None:
            raise ValueError("views > 1 needs a random transform: without one every view is the same image")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(dataset) == 0:
            raise ValueError("dataset is empty: there are no images to cache")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        self.model = model
        self.dataset = dataset
        self.transform = transform
        self.views = int(views)
        self.path = os.fspath(path) if path is not None else None
        self.batch_size = int(batch_size)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.store_device = torch.device(store_device) if store_device is not None else self.device
        self.seed = int(seed)
        self.dataset_key = dataset_key
        self.transform_key = transform_key
        self.dtype = dtype
        self.workers = check_workers(workers)
        # [distributed] a train.distributed.DistContext: the build is sharded over its ranks (whole
        # batches round-robin, gathered by an exact all-reduce), the file read only when every rank
        # can read it, written by rank 0 alone
        self.distributed = distributed if distributed is not None and distributed.enabled else None
        self.features: torch.Tensor | None = None  # (views, N, D), L2-normalised
        self.labels: torch.Tensor | None = None  # (N,) int64
        self.key: str | None = None
        self.parts: dict | None = None
        self.built = False  # True when the last load_or_build encoded images (False: read from disk)
        self.rebuild_reason: str | None = None

    # -- keys ------------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        encoder = getattr(self.model, "visual", None)
        encoder = self.model if encoder is None else encoder
        transform = self.transform_key if self.transform_key is not None else repr(self.transform)
        return {
            "format": FORMAT_VERSION,
            "encoder": module_fingerprint(encoder),
            "dataset": self.dataset_key if self.dataset_key is not None else dataset_fingerprint(self.dataset),
            "transform": hashlib.blake2b(transform.encode(), digest_size=20).hexdigest(),
            "views": str(self.views),
            "seed": str(self.seed),
            "dtype": str(self.dtype),
        }

    @staticmethod
    def _key(parts: dict) -> str:
        return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=20).hexdigest()

    # -- build / load ----------------------------------------------------------------------------
    def load_or_build(self) -> "ImageFeatureCache":
        """Reads a matching cache file, or encodes all views (and writes the file when ``path`` is set).

        Already in memory with the same key: nothing to do. ``rebuild_reason`` says why the last
        call had to encode (None when nothing was stale).
        """
        parts = self.fingerprint()
        key = self._key(parts)
        self.built = False
        if self.features is not None and self.key == key:
            return self
        self.rebuild_reason = None
        if self.features is not None:
            self.rebuild_reason = "stale in-memory features: " + self._stale_parts(self.parts or {}, parts)
        loaded = self._read(key, parts) if self.path is not None and os.path.exists(self.path) else None
        if self.distributed is not None:  # all ranks read, or all build (the build is collective)
            readable = torch.tensor([float(loaded is not None)], device=self.distributed.device)
            self.distributed.all_reduce_sum_(readable, f"feature cache {self.path!r}: agreeing on read or build")
            if int(readable.item()) < self.distributed.world_size:
                loaded = None
        if loaded is not None:
            self.features, self.labels = loaded
            self.key, self.parts = key, parts
            return self
        self.features, self.labels = self._encode_all()
        self.key, self.parts, self.built = key, parts, True
        if self.path is not None and (self.distributed is None or self.distributed.is_main):
            self._write(key, parts)
        return self

    @staticmethod
    def _stale_parts(old: dict, new: dict) -> str:
        changed = sorted(k for k in new if old.get(k) != new[k])
        return "changed " + ", ".join(changed) if changed else "unknown key"

    def _read(self, key: str, parts: dict):
        from safetensors import safe_open

        try:
            with safe_open(self.path, framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                if meta.get("key") != key:
                    old = json.loads(meta.get("parts", "{}"))
                    self.rebuild_reason = f"stale cache {self.path!r}: " + self._stale_parts(old, parts)
                    return None
                features = fh.get_tensor("features")
                labels = fh.get_tensor("labels")
        except Exception as exc:  # a truncated or foreign file is rebuilt, not trusted
            self.rebuild_reason = f"unreadable cache {self.path!r} ({exc.__class__.__name__})"
            return None
        if features.dim() != 3 or features.shape[0] != self.views or features.shape[1] != len(self.dataset):
            self.rebuild_reason = f"cache {self.path!r} has shape {tuple(features.shape)}"
            return None
        return features.to(self.store_device), labels.to(self.store_device)

    def _write(self, key: str, parts: dict) -> None:
        from safetensors.torch import save_file

        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(self.path) + ".", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            save_file(
                {"features": self.features.detach().to("cpu").contiguous(), "labels": self.labels.to("cpu").contiguous()},
                tmp,
                metadata={"key": key, "parts": json.dumps(parts, sort_keys=True)},
            )
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def _view_item(self, index: int, view: int):
        return _view_item(self.dataset, self.transform, self.seed, index, view)

    @torch.no_grad()
    def _encode_all(self):
        model = self.model
        was_training = model.training
        model.eval()
        N = len(self.dataset)
        features = None
        shard = self.distributed
        # [distributed] zeros where another rank's batches go: the gather below sums them in exactly
        labels = (torch.zeros if shard is not None else torch.empty)(N, dtype=torch.int64)
        items = _ViewBatches(self.dataset, self.transform, self.seed, self.views, self.batch_size)
        # [distributed] whole batches (view-major numbering) round-robin over the ranks
        keys = range(len(items)) if shard is None else range(shard.rank, len(items), shard.world_size)
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        try:
            for view, start, images, y in make_loader(items, keys, self.workers, pin_memory=pin):
                images = images.to(self.device, non_blocking=True)
                if view == 0:
                    labels[start : start + y.shape[0]] = y
                f = F.normalize(encode_image(model, images).float(), dim=-1).to(self.dtype)
                if features is None:
                    empty = torch.zeros if shard is not None else torch.empty
                    features = empty((self.views, N, f.shape[-1]), dtype=self.dtype, device=self.store_device)
                features[view, start : start + y.shape[0]] = f.to(self.store_device)
        finally:
            model.train(was_training)
        if shard is not None:
            features, labels = self._gather_shards(features, labels)
        return features, labels.to(self.store_device)

    def _gather_shards(self, features, labels):
        """Every rank's batches on every rank: each element was written by one rank, zeros elsewhere,
        so the sum all-reduce is the exact concatenation."""
        shard = self.distributed
        if features is None:  # more ranks than batches: this rank encoded nothing
            D = int(self.model.visual.output_dim)
            features = torch.zeros((self.views, len(self.dataset), D), dtype=self.dtype, device=self.store_device)
        on_device = features.to(shard.device), labels.to(shard.device)
        with shard.guard("feature cache build: gathering the ranks' features"):
            for t in on_device:
                shard.all_reduce_sum_(t)
        return on_device[0].to(self.store_device), on_device[1]

    # -- use ---------------------------------------------------------------------------------------
    def _ready(self):
        if self.features is None:
            self.load_or_build()

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def dim(self) -> int:
        self._ready()
        return self.features.shape[-1]

    def view_for_epoch(self, epoch: int) -> int:
        """The view served in ``epoch``: views cycle, so epoch e sees view e % views."""
        return int(epoch) % self.views

    def get(self, indices: torch.Tensor | Sequence[int], view: int = 0, device=None):
        """(features (B, D), labels (B,)) of dataset items ``indices`` in ``view``."""
        self._ready()
        if not 0 <= int(view) < self.views:
            raise ValueError(f"view must be in [0, {self.views}), got {view}")
        idx = torch.as_tensor(indices, dtype=torch.int64, device=self.features.device)
        if idx.dim() != 1:
            raise ValueError(f"indices must be 1-D, got shape {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise ValueError(f"indices must be in [0, {len(self)}), got values in [{int(idx.min())}, {int(idx.max())}]")
        f, y = self.features[int(view)].index_select(0, idx), self.labels.index_select(0, idx)
        if device is not None:
            f, y = f.to(device), y.to(device)
        return f, y


def _view_item(dataset, transform, seed: int, index: int, view: int):
    image, label = _split_item(dataset[index])
    if transform is not None:
        # every (seed, view, item) draws its own augmentation, whatever the batching or worker
        item_seed = (seed * 1_000_003 + view) * 1_000_000_007 + index
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed % (2**63))
            random.seed(item_seed)
            image = transform(image)
        random.setstate(state)
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"dataset item {index} gives a {type(image).__name__} image: pass a transform that makes a tensor")
    return image, int(label)


class _ViewBatches(Dataset):
    """Item j: (view, start, images, labels) of batch j of all views, view-major (built in a worker)."""

    def __init__(self, dataset, transform, seed: int, views: int, batch_size: int):
        self.dataset, self.transform, self.seed, self.batch_size = dataset, transform, seed, batch_size
        self.per_view = -(-len(dataset) // batch_size)
        self.views = views

    def __len__(self) -> int:
        return self.views * self.per_view

    def __getitem__(self, j: int):
        view, b = divmod(j, self.per_view)
        start = b * self.batch_size
        items = [_view_item(self.dataset, self.transform, self.seed, i, view)
                 for i in range(start, min(len(self.dataset), start + self.batch_size))]
        images = torch.stack([im for im, _ in items])
        return view, start, images, torch.tensor([y for _, y in items], dtype=torch.int64)
