"""The trainer's input pipeline: worker-count-independent seeded batches, the uint8 image cache
(keys, rebuilds, no image work after the first pass), pinned memory, phase timing, and the
compiled / bf16 step iterations against eager fp32."""
import os

import pytest
import torch
from PIL import Image, ImageDraw

import guidg_fast as gf
from guidg_fast.data import DomainFolder, ImageCacheStore, clip_transform, domain_balanced_batches
from guidg_fast.data.loaders import STEP2_STREAM, DomainBalancedBatches, EvalFeed, Step2Feed
from guidg_fast import reference
from guidg_fast.train import GuiDG
from guidg_fast.train.guidg import STEP2_STATE
from conftest import rel_err

CLASSES = ["circle", "square", "triangle"]
DOMAINS = ["art", "photo"]
SIZE = 32  # the tiny arch's input side


def _natural_image(seed: int, size) -> Image.Image:
    """A gradient, noise and a filled shape: real JPEG content (not flat colour) that resize,
    crop and RandAugment all change."""
    g = torch.Generator().manual_seed(seed)
    w, h = size
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.rand(3, generator=g).view(3, 1, 1)
    img = 0.5 * base + 0.3 * torch.stack([xx, yy, 1 - xx]) + 0.15 * torch.rand(3, h, w, generator=g)
    pil = Image.fromarray((img.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(pil)
    x0, y0 = int(torch.randint(0, w // 2, (), generator=g)), int(torch.randint(0, h // 2, (), generator=g))
    colour = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=g))
    shape = seed % 3
    if shape == 0:
        draw.ellipse([x0, y0, x0 + w // 3, y0 + h // 3], fill=colour)
    elif shape == 1:
        draw.rectangle([x0, y0, x0 + w // 3, y0 + h // 3], fill=colour)
    else:
        draw.polygon([(x0, y0 + h // 3), (x0 + w // 6, y0), (x0 + w // 3, y0 + h // 3)], fill=colour)
    return pil


def _jpeg_domains(root, per_class=4):
    for d_i, d in enumerate(DOMAINS):
        for c_i, c in enumerate(CLASSES):
            folder = root / d / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                seed = 1000 * d_i + 100 * c_i + i
                size = (40 + 3 * (seed % 5), 34 + 2 * (seed % 4))  # odd, varied sizes: resize + crop matter
                _natural_image(seed, size).save(folder / f"{i:03d}.jpg", quality=90)
    return root


def _folders(root, transform):
    return {d: DomainFolder(root / d, transform=transform) for d in DOMAINS}


@pytest.fixture
def jpeg_root(tmp_path):
    return _jpeg_domains(tmp_path / "data")


def _steps(feed):
    return [(x.clone(), y.clone()) for x, y in feed]


@pytest.mark.parametrize("randaugment", [True, False])
def test_step2_batches_are_the_same_for_any_worker_count(jpeg_root, randaugment):
    datasets = list(_folders(jpeg_root, clip_transform(SIZE, randaugment=randaugment)).values())
    runs = {}
    for workers in (0, 1, 2):
        store = ImageCacheStore()
        feed = Step2Feed(datasets, 3, 7, "cpu", start=0, stop=5, workers=workers, store=store)
        assert feed.items.uint8  # clip_transform folders go through the uint8 cache
        runs[workers] = _steps(feed)
    for workers in (1, 2):
        for step, ((xa, ya), (xb, yb)) in enumerate(zip(runs[0], runs[workers])):
            assert torch.equal(xa, xb) and torch.equal(ya, yb), f"workers={workers} step {step}"
    x0, y0 = runs[0][0]
    assert x0.shape == (6, 3, SIZE, SIZE) and x0.dtype == torch.float32 and y0.dtype == torch.long
    # a later start (a resumed run) sees the same batches
    tail = _steps(Step2Feed(datasets, 3, 7, "cpu", start=3, stop=5, workers=2, store=ImageCacheStore()))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(runs[0][3:], tail))
    if randaugment:  # the augmentation is random across steps and samples, but seeded
        a, b = runs[0][0][0], runs[0][1][0]
        assert not torch.equal(a, b)


def test_uncached_datasets_are_seeded_per_step_and_position():
    class Jitter(torch.utils.data.Dataset):  # a dataset with its own random transform, no files
        def __len__(self):
            return 9

        def __getitem__(self, i):
            return torch.full((3, 4, 4), float(i)) + torch.rand(3, 4, 4), i % 3

    datasets = [Jitter(), Jitter()]
    runs = [_steps(Step2Feed(datasets, 2, 1, "cpu", start=0, stop=4, workers=w)) for w in (0, 2)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(*runs))
    x, _ = runs[0][0]
    assert not torch.equal(x[0] - x[0].floor(), x[2] - x[2].floor())  # a different draw per item


def test_domain_balanced_batches_is_the_trainers_sampler(jpeg_root):
    datasets = _folders(jpeg_root, clip_transform(SIZE))
    it = domain_balanced_batches(datasets, batch_per_domain=2, seed=3, num_workers=1)
    items = DomainBalancedBatches(list(datasets.values()), [None, None], 2, 3, [STEP2_STREAM, STEP2_STREAM + 1])
    for step in range(3):
        x, y, d = next(it)
        ex, ey, ed = items[step]
        assert torch.equal(x, ex) and torch.equal(y, ey) and d.tolist() == [0, 0, 1, 1]


def test_cached_evaluation_batches_equal_the_dataset_transform(jpeg_root):
    transform = clip_transform(SIZE)
    ds = DomainFolder(jpeg_root / "art", transform=transform)
    batches = list(EvalFeed([ds], 5, "cpu", workers=1, store=ImageCacheStore()))
    x = torch.cat([b[1] for b in batches])
    want = torch.stack([ds[i][0] for i in range(len(ds))])
    # same ops in the same order (PIL resize/crop, /255, -mean, /std): the same floats
    assert torch.equal(x, want)
    assert torch.cat([b[2] for b in batches]).tolist() == ds.labels


def test_uint8_cache_file_is_reused_and_rebuilt_on_changes(jpeg_root, tmp_path):
    cache_dir = tmp_path / "cache"
    ds = DomainFolder(jpeg_root / "photo", transform=clip_transform(SIZE))
    first = ImageCacheStore(cache_dir).get(ds, workers=1)
    assert first.built and first.path is not None and os.path.exists(first.path)
    again = ImageCacheStore(cache_dir).get(ds, workers=1)  # a new process would do this: read the file
    assert not again.built and torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    # a file's content (size and mtime) changes: rebuilt, and the new pixels are in the cache
    path = ds.samples[2][0]
    _natural_image(777, (50, 50)).save(path, quality=80)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = ImageCacheStore(cache_dir).get(ds, workers=0)
    assert changed.built and changed.rebuild_reason and "stale" in changed.rebuild_reason
    assert not torch.equal(changed.images[2], first.images[2]) and torch.equal(changed.images[3], first.images[3])
    # only the mtime changes (same bytes): still rebuilt (the key holds mtimes)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert ImageCacheStore(cache_dir).get(ds, workers=0).built
    # another transform: another cache
    other = ImageCacheStore(cache_dir).get(DomainFolder(jpeg_root / "photo", transform=clip_transform(24)), workers=0)
    assert other.built and other.images.shape[-2:] == (24, 24)
    # in memory, the same rules: reused while unchanged, rebuilt after a change
    store = ImageCacheStore()
    assert store.get(ds, 0).built and not store.get(ds, 0).built
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert store.get(ds, 0).built


def test_datasets_without_files_are_cached_in_memory_by_identity():
    domains = gf.data.SyntheticDomains(num_classes=3, images_per_class=2, image_size=16, seed=0,
                                       transform=clip_transform(SIZE)).datasets
    ds = next(iter(domains.values()))
    store = ImageCacheStore()
    a = store.get(ds, 0)
    assert a.built and a.path is None and not store.get(ds, 0).built
    want = torch.stack([ds[i][0] for i in range(len(ds))])
    got = torch.cat([b[1] for b in EvalFeed([ds], 4, "cpu", workers=0, store=store)])
    assert torch.equal(got, want)


def _trainer(**kw):
    torch.manual_seed(0)
    return GuiDG(gf.TINY_ARCH, None, CLASSES, DOMAINS, n_ctx=2, **kw)


def test_evaluation_after_the_first_pass_opens_no_image_file(jpeg_root, monkeypatch):
    datasets = _folders(jpeg_root, clip_transform(SIZE))
    model = _trainer()
    opened = []
    real_open = Image.open

    def counting_open(*args, **kwargs):
        opened.append(args[0])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    first = model.evaluate(datasets, batch_size=5, workers=0)
    assert len(opened) == sum(len(d) for d in datasets.values())
    opened.clear()
    phases = {}
    second = model.evaluate(datasets, batch_size=5, workers=0, phase_times=phases)
    assert opened == [] and second == first
    assert set(phases) == {"data", "compute"} and all(v >= 0 for v in phases.values())
    # with workers and a cache folder: the second trainer reads the memory-mapped file, builds nothing
    monkeypatch.setattr(Image, "open", real_open)
    cache = str(jpeg_root.parent / "cache")
    assert model.evaluate(datasets, batch_size=5, workers=2, image_cache=cache) == first
    model._image_stores.clear()  # as a new process: the caches come from the memory-mapped files
    assert not any(model.image_cache(cache).get(ds, 0).built for ds in datasets.values())
    assert model.evaluate(datasets, batch_size=5, workers=2, image_cache=cache) == first


def test_step2_resume_with_workers_equals_uninterrupted(jpeg_root, tmp_path):
    datasets = _folders(jpeg_root, clip_transform(SIZE, randaugment=True))

    def run(workers=2, **kw):
        m = _trainer()
        m.refresh_expert_features()
        m.finetune(datasets, iterations=4, batch_per_domain=2, lr=1e-3, workers=workers, **kw)
        return m

    phases = {}
    full = run(workers=0, phase_times=phases)  # in process: also the reference for the worker runs
    assert set(phases) == {"data", "encoder", "guidance", "optimizer", "bma"} and all(v > 0 for v in phases.values())
    run(checkpoint_dir=str(tmp_path), checkpoint_every=2)
    resumed = run(resume=str(tmp_path / STEP2_STATE))
    assert full.history["step2"] == resumed.history["step2"]
    for (k, a), b in zip(full.eval_visual.state_dict().items(), resumed.eval_visual.state_dict().values()):
        assert torch.equal(a, b), k


def test_pinned_memory_only_with_cuda(jpeg_root):
    datasets = list(_folders(jpeg_root, clip_transform(SIZE)).values())
    assert not Step2Feed(datasets, 2, 0, "cpu", start=0, stop=1, workers=1).loader.pin_memory
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the pinned path needs one")
    feed = Step2Feed(datasets, 2, 0, "cuda", start=0, stop=2, workers=1)
    assert feed.loader.pin_memory
    x, y, _ = next(iter(feed.loader))
    assert x.is_pinned() and x.dtype == torch.uint8  # uint8 to the GPU; augmented + normalised there
    gx, gy = next(iter(feed))
    assert gx.is_cuda and gx.dtype == torch.float32 and gy.is_cuda


def test_bad_pipeline_arguments(jpeg_root):
    model = _trainer()
    datasets = _folders(jpeg_root, clip_transform(SIZE))
    with pytest.raises(ValueError, match="workers"):
        model.evaluate(datasets, workers=-1)
    with pytest.raises(ValueError, match="precision"):
        _trainer(precision="fp16")
    with pytest.raises(ValueError, match="compile"):
        model.finetune(datasets, iterations=1, compile="yes")
    with pytest.raises(ValueError, match="phase_times"):
        model.finetune(datasets, iterations=1, phase_times=[])


class _ShiftedImages(torch.utils.data.Dataset):
    """Tensor images whose mean encodes the class: no files, the uncached worker path."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, len(CLASSES), (n,), generator=g)
        self.x = 0.3 * torch.randn(n, 3, SIZE, SIZE, generator=g) + self.y.view(-1, 1, 1, 1).float()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _run(steps=5, **kw):
    m = _trainer(precision=kw.pop("precision", None))
    data = {d: _ShiftedImages(8, i) for i, d in enumerate(DOMAINS)}
    m.fit_experts(data, iterations=steps, batch_size=4, lr=5e-2, workers=0, **kw)
    m.finetune(data, iterations=steps, batch_per_domain=3, lr=1e-3, workers=0, **kw)
    return m


def test_compiled_steps_equal_eager():
    # aot_eager: dynamo + AOT autograd trace the same graphs (fixed shapes, the custom ops' fake
    # and autograd registrations, the optimizer step) that inductor / CUDA graphs compile, without
    # a minute of C++ codegen for a ViT on a 2-core machine (the per-op tests compile with inductor)
    torch._dynamo.reset()
    eager = _run()
    compiled = _run(compile={"backend": "aot_eager"})
    torch._dynamo.reset()
    for stage in ("step1", "step2"):
        err = rel_err(torch.tensor(compiled.history[stage]), torch.tensor(eager.history[stage]))
        assert err < 1e-5, f"{stage} losses: relative error {err:.2e}"
    assert rel_err(compiled.learner.ctx, eager.learner.ctx) < 1e-5
    # weights: AdamW moves each entry by about lr per step whatever its gradient's size, so entries
    # whose gradient is rounding noise (e.g. the attention key bias: exactly zero by shift
    # invariance) may move differently; bound the difference by 5% of the largest possible move
    max_move = 5 * 1e-3
    for (k, a), b in zip(eager.eval_visual.state_dict().items(), compiled.eval_visual.state_dict().values()):
        diff = float((a - b).abs().max())
        assert diff <= 0.05 * max_move, f"{k}: differs by {diff:.2e}"


def test_compile_modes():
    from guidg_fast.train.steps import compile_options

    assert compile_options(True, torch.device("cuda")) == {"mode": "reduce-overhead"}  # CUDA graphs
    assert compile_options(True, torch.device("cpu")) == {}
    assert compile_options(False, torch.device("cuda")) is None


def test_bf16_error_is_within_3x_of_eager_bf16():
    from guidg_fast.train.guidg import BASELINES

    g = _trainer(precision="fp32", weight_mode="batch")
    g.refresh_expert_features()
    visual = g.model.visual
    visual.requires_grad_(True)
    params = list(visual.parameters()) + list(g.attn.parameters())
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(9, 3, SIZE, SIZE, generator=gen)
    y = torch.randint(0, len(CLASSES), (9,), generator=gen)

    def grads(loss_fn):
        loss = loss_fn()
        return [loss.detach()] + list(torch.autograd.grad(loss, params, allow_unused=True))

    def eager_loss():  # the same computation through the reference ops
        base, T = BASELINES[g.config["baseline"]], g.expert_features
        f = g.encode_images(x)
        w = reference.cross_modal_attention(f.detach(), T, *g.attn.stacked_parameters(), metric=g.attn.metric)
        return reference.multi_expert_loss(f, T, y, w.mean(dim=0), g.temperature, margin=base["margin"],
                                           entropy_weight=base["entropy_weight"])

    want = grads(lambda: g.step2_loss(x, y)[0])
    g.precision = "bf16"  # CPU autocast bf16; weights stay fp32
    fast = grads(lambda: g.step2_loss(x, y)[0])
    eager = grads(eager_loss)
    assert all(p.dtype == torch.float32 for p in params)
    for i, (w_, f_, e_) in enumerate(zip(want, fast, eager)):
        if w_ is None:
            continue
        fast_err, eager_err = rel_err(f_, w_), rel_err(e_, w_)
        assert eager_err > 0 or fast_err == 0, f"entry {i}: bf16 autocast did not change anything"
        assert fast_err <= 3 * eager_err + 1e-6, f"entry {i}: bf16 error {fast_err:.2e} vs eager bf16 {eager_err:.2e}"
