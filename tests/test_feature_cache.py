"""ImageFeatureCache: exact features, views, disk round trip, stale-key rebuilds, atomic writes."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from guidg_fast.train.feature_cache import ImageFeatureCache, dataset_fingerprint

from conftest import assert_close


class FlipNoise:
    """A random tensor augmentation (torch RNG), with a stable repr."""

    def __init__(self, noise=0.1):
        self.noise = noise

    def __call__(self, x):
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x + self.noise * torch.randn_like(x)

    def __repr__(self):
        return f"FlipNoise(noise={self.noise})"


class CountingModel(torch.nn.Module):
    """Wraps a CLIP model, counting images sent through encode_image."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.visual = model.visual
        self.encoded = 0

    def encode_image(self, x, normalize=False):
        self.encoded += x.shape[0]
        return self.inner.encode_image(x, normalize=normalize)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small ops only: one intra-op thread avoids thread hand-offs on a loaded 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def model(tiny_clip):
    import copy

    return CountingModel(copy.deepcopy(tiny_clip[0])).eval()  # tests change its weights


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(11, 3, 32, 32, generator=g), torch.arange(11) % 3)


def test_views1_is_exact(model, data):
    cache = ImageFeatureCache(model, data, batch_size=4).load_or_build()
    assert cache.features.shape == (1, 11, 64) and cache.built
    with torch.no_grad():
        direct = F.normalize(model.inner.encode_image(data.tensors[0]), dim=-1)
    assert_close(cache.features[0], direct, "features")
    f, y = cache.get(torch.tensor([3, 0, 10]))
    assert_close(f, direct[[3, 0, 10]])
    assert torch.equal(y, torch.tensor([0, 0, 1]))


def test_views_are_seeded_and_differ(model, data):
    a = ImageFeatureCache(model, data, transform=FlipNoise(), views=3, batch_size=4, seed=5).load_or_build()
    b = ImageFeatureCache(model, data, transform=FlipNoise(), views=3, batch_size=7, seed=5).load_or_build()
    # independent of batching up to rounding: the encoder's GEMMs with 4 vs 7 rows may round differently
    # (AVX2-only CPUs: up to ~1e-7 on these unit-norm features), so not bitwise
    torch.testing.assert_close(a.features, b.features, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a.features[0], a.features[1])
    c = ImageFeatureCache(model, data, transform=FlipNoise(), views=3, seed=6).load_or_build()
    assert not torch.allclose(a.features, c.features)
    # view v of item i is the transform drawn with its own seed: reproduce one by hand
    image, _ = a._view_item(4, 2)
    with torch.no_grad():
        f = F.normalize(model.inner.encode_image(image[None]), dim=-1)[0]
    assert_close(a.features[2, 4], f)
    assert [a.view_for_epoch(e) for e in range(5)] == [0, 1, 2, 0, 1]


def test_disk_round_trip_and_atomic_write(model, data, tmp_path):
    path = tmp_path / "sub" / "feats.safetensors"
    first = ImageFeatureCache(model, data, path=path, batch_size=5).load_or_build()
    assert first.built and model.encoded == 11 and path.exists()
    assert sorted(os.listdir(path.parent)) == ["feats.safetensors"]  # no temp file left
    second = ImageFeatureCache(model, data, path=path).load_or_build()
    assert not second.built and model.encoded == 11  # read, not re-encoded
    assert torch.equal(second.features, first.features) and torch.equal(second.labels, first.labels)


def test_stale_cache_is_rebuilt(model, data, tmp_path):
    path = tmp_path / "feats.safetensors"
    base = ImageFeatureCache(model, data, path=path).load_or_build()
    # other model weights
    with torch.no_grad():
        model.visual.proj.add_(0.05 * torch.randn_like(model.visual.proj))
    cache = ImageFeatureCache(model, data, path=path).load_or_build()
    assert cache.built and "encoder" in cache.rebuild_reason
    assert not torch.allclose(cache.features, base.features)
    # other images
    other = TensorDataset(data.tensors[0] + 1.0, data.tensors[1])
    cache = ImageFeatureCache(model, other, path=path).load_or_build()
    assert cache.built and "dataset" in cache.rebuild_reason
    # other transform / views
    cache = ImageFeatureCache(model, other, path=path, transform=FlipNoise(), views=2).load_or_build()
    assert cache.built and "transform" in cache.rebuild_reason and "views" in cache.rebuild_reason
    cache = ImageFeatureCache(model, other, path=path, transform=FlipNoise(0.2), views=2).load_or_build()
    assert cache.built and cache.rebuild_reason.endswith("transform")
    # unchanged: read back
    again = ImageFeatureCache(model, other, path=path, transform=FlipNoise(0.2), views=2).load_or_build()
    assert not again.built and torch.equal(again.features, cache.features)
    # in memory: a weight change is noticed on the next load_or_build
    with torch.no_grad():
        model.visual.proj.add_(0.05 * torch.randn_like(model.visual.proj))
    assert again.load_or_build().built and "encoder" in again.rebuild_reason


def test_corrupt_file_is_rebuilt_and_failed_write_keeps_old_file(model, data, tmp_path, monkeypatch):
    path = tmp_path / "feats.safetensors"
    path.write_bytes(b"not a safetensors file")
    cache = ImageFeatureCache(model, data, path=path).load_or_build()
    assert cache.built and "unreadable" in cache.rebuild_reason
    good = path.read_bytes()

    import safetensors.torch

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with torch.no_grad():
        model.visual.proj.add_(0.05 * torch.randn_like(model.visual.proj))
    with pytest.raises(OSError, match="disk full"):
        ImageFeatureCache(model, data, path=path).load_or_build()
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["feats.safetensors"]


def test_dataset_fingerprints(tmp_path):
    a = TensorDataset(torch.zeros(2, 3), torch.zeros(2))
    b = TensorDataset(torch.zeros(2, 3), torch.ones(2))
    assert dataset_fingerprint(a) != dataset_fingerprint(b)

    class Items:
        def __init__(self, v):
            self.v = v

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.full((3,), float(self.v + i)), i

    assert dataset_fingerprint(Items(0)) == dataset_fingerprint(Items(0)) != dataset_fingerprint(Items(1))

    class Folder:
        def __init__(self, samples):
            self.samples = samples

        def __len__(self):
            return len(self.samples)

    f = tmp_path / "a.png"
    f.write_bytes(b"x")
    before = dataset_fingerprint(Folder([(str(f), 0)]))
    assert before != dataset_fingerprint(Folder([(str(f), 1)]))
    f.write_bytes(b"xy")  # the file changed on disk
    assert before != dataset_fingerprint(Folder([(str(f), 0)]))


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(views=0), "views"), (dict(views=2), "random transform"), (dict(batch_size=0), "batch_size")],
)
def test_bad_arguments(model, data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageFeatureCache(model, data, **kwargs)


def test_bad_use(model, data):
    with pytest.raises(ValueError, match="empty"):
        ImageFeatureCache(model, TensorDataset(torch.zeros(0, 3, 32, 32), torch.zeros(0)))
    with pytest.raises(ValueError, match="encode_image"):
        ImageFeatureCache(torch.nn.Linear(2, 2), data)
    cache = ImageFeatureCache(model, data)
    with pytest.raises(ValueError, match="indices"):
        cache.get([0, 11])
    with pytest.raises(ValueError, match="view"):
        cache.get([0], view=1)
    images_only = [(torch.zeros(3, 32, 32).numpy(), 0)]
    with pytest.raises(ValueError, match="transform"):
        ImageFeatureCache(model, images_only).load_or_build()
