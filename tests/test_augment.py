"""BatchedRandAugment / normalize_uint8 against torchvision (the official step-2 random transform)."""
import math

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from guidg_fast.data.augment import (
    RANDAUGMENT_OPS,
    BatchedRandAugment,
    RandAugmentPlan,
    normalize_uint8,
    randaugment_magnitudes,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SIGNED = {name: signed for name, (_, signed) in v2.RandAugment._AUGMENTATION_SPACE.items()}
BINS = (0, 9, 15, 30)  # first, default, middle, last of torchvision's 31 magnitude bins

# Tolerance for every op: at most 1 uint8 level on any pixel, and on at most 1% of the pixels.
# Why not bit-exact: Color (and, on other backends or ISAs, Contrast / Sharpness / Brightness) blends in
# float32 and truncates to uint8. torchvision blends one image with one Python-scalar factor through
# torch's fused multiply-add path (add_(x, alpha=...)); the batched version blends with per-sample factor
# tensors (a multiply, then an add), and reductions / vector tails can round in a different order. A
# value within a float32 ulp of an integer then truncates to the neighbouring level. Such ties are rare
# (Color on this CPU: ~0.17% of pixels, all others bit-exact), hence the 1% cap (over a batch of one op),
# which keeps a systematic off-by-one (e.g. rounding instead of truncating) from passing. The geometric ops pick source pixels with
# torchvision's own grid and grid_sample, so a wrong pixel would differ by far more than one level.
MAX_LEVELS = 1
MAX_DIFFERING_FRACTION = 0.01


@pytest.fixture(params=["kernel", "torch_ops"])
def cpu_path(request, monkeypatch):
    """Runs a test on each CPU implementation: the C++ kernel (csrc/cpu/randaugment.cpp, the default
    for CPU tensors) and the batched torch ops (the CUDA path), forced onto CPU tensors."""
    import guidg_fast.data.augment as augment_module

    if request.param == "kernel":
        if augment_module._cpu_kernel() is None:
            pytest.skip("guidg_fast._C is not built")
    else:
        monkeypatch.setattr(augment_module, "_cpu_kernel", lambda: None)
    return request.param


def _images(batch, height, width, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=g)
    if batch >= 3:
        x[1] = x[1] // 5 + 90  # narrow range: autocontrast / equalize stretch it
        x[2] = 77  # constant: autocontrast's flat branch, equalize's step == 0 branch
    if batch >= 4:
        x[3, 0] = x[3, 0] // 2  # channels with different ranges
    return x.to(device)


def _torchvision_op(image, name, magnitude, fill):
    """The exact call torchvision's RandAugment makes for one op (interpolation NEAREST, tensor kernel)."""
    randaugment = v2.RandAugment(fill=fill)
    return randaugment._apply_image_or_video_transform(
        image, name, magnitude, interpolation=InterpolationMode.NEAREST, fill=randaugment._fill
    )


def _assert_close_levels(ours, ref, what):
    assert ours.dtype == torch.uint8 and ours.shape == ref.shape, what
    diff = (ours.int() - ref.int()).abs()
    worst = int(diff.max())
    if worst > MAX_LEVELS:
        where = (diff == worst).nonzero()[0].tolist()
        raise AssertionError(f"{what}: {worst} levels apart at {where} (ours {int(ours[tuple(where)])}, "
                             f"torchvision {int(ref[tuple(where)])})")
    fraction = float((diff > 0).float().mean())
    assert fraction <= MAX_DIFFERING_FRACTION, f"{what}: {fraction:.2%} of pixels differ by one level"


def _single_op_plan(op_id, height, width, bins_and_signs):
    table = randaugment_magnitudes(31, height, width)
    magnitudes = [sign * float(table[op_id, b]) for b, sign in bins_and_signs]
    return RandAugmentPlan(
        op_ids=torch.full((len(magnitudes), 1), op_id, dtype=torch.int64),
        magnitudes=torch.tensor(magnitudes, dtype=torch.float64).view(-1, 1),
        image_size=(height, width),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [(31, 47), (64, 64), (2, 5)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", RANDAUGMENT_OPS)
def test_each_op_matches_torchvision(name, size, device, cpu_path):
    height, width = size
    op_id = RANDAUGMENT_OPS.index(name)
    signs = (1, -1) if SIGNED[name] else (1,)
    bins_and_signs = [(b, s) for b in BINS for s in signs]
    plan = _single_op_plan(op_id, height, width, bins_and_signs)
    images = _images(len(bins_and_signs), height, width, seed=op_id, device=device)
    fills = [0, (10, 200, 30)] if name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate") else [0]
    for fill in fills:
        before = images.clone()
        ours = BatchedRandAugment(num_ops=1, fill=fill).apply(images, plan)
        assert torch.equal(images, before), "apply() must not modify its input"
        ref = torch.stack([_torchvision_op(images[i], name, float(plan.magnitudes[i, 0]), fill)
                           for i in range(len(bins_and_signs))])
        _assert_close_levels(ours, ref, f"{name} {height}x{width} fill {fill}, samples (bin, sign) {bins_and_signs}")


def test_op_space_and_magnitudes_match_torchvision():
    space = v2.RandAugment._AUGMENTATION_SPACE
    assert tuple(space) == RANDAUGMENT_OPS
    for height, width in [(224, 224), (31, 47)]:
        table = randaugment_magnitudes(31, height, width)
        for op_id, (name, (magnitudes_fn, _)) in enumerate(space.items()):
            expected = magnitudes_fn(31, height, width)
            if expected is None:
                assert torch.equal(table[op_id], torch.zeros(31, dtype=torch.float64)), name
            else:
                assert table[op_id].tolist() == [float(v) for v in expected], name


def test_draw_distribution_matches_torchvision():
    draws = 20_000
    augment = BatchedRandAugment()  # num_ops=2, magnitude=9
    plan = augment.draw(draws, 224, 224, torch.Generator().manual_seed(1))
    assert plan.op_ids.shape == (draws, 2) and plan.magnitudes.shape == (draws, 2)
    # torchvision's RandAugment: op uniform over 14, independent per round.
    p = 1 / len(RANDAUGMENT_OPS)
    bound = 5 * math.sqrt(draws * p * (1 - p))  # 5 binomial sigmas: ~182 around 1429 per op and round
    for round_index in range(2):
        counts = torch.bincount(plan.op_ids[:, round_index], minlength=len(RANDAUGMENT_OPS))
        assert (counts.double() - draws * p).abs().max() <= bound, counts.tolist()
    # Signed ops: magnitude negated with probability 1/2; unsigned ops keep the table value.
    table = randaugment_magnitudes(31, 224, 224)[:, 9]
    expected = table[plan.op_ids]
    signed = torch.tensor([SIGNED[n] for n in RANDAUGMENT_OPS])[plan.op_ids]
    assert torch.equal(plan.magnitudes.abs(), expected.abs())
    assert bool((plan.magnitudes[~signed] == expected[~signed]).all())
    nonzero_signed = signed & (expected != 0)
    negated = int((plan.magnitudes[nonzero_signed] < 0).sum())
    total = int(nonzero_signed.sum())
    assert abs(negated - total / 2) <= 5 * math.sqrt(total / 4), (negated, total)  # 5 sigmas: ~400 of ~25.7k

    # torchvision's own RandAugment, counted through its op hook: the two frequency tables agree within
    # 5 sigmas of the difference of two independent binomials.
    choices = []

    class _Recorder(v2.RandAugment):
        def _apply_image_or_video_transform(self, image, transform_id, magnitude, interpolation, fill):
            choices.append((transform_id, magnitude))
            return image

    torch.manual_seed(2)
    recorder, image = _Recorder(), torch.zeros(3, 224, 224, dtype=torch.uint8)
    torch_draws = 5_000
    for _ in range(torch_draws):
        recorder(image)
    theirs = torch.bincount(torch.tensor([RANDAUGMENT_OPS.index(n) for n, _ in choices]), minlength=14).double()
    ours = torch.bincount(plan.op_ids.flatten(), minlength=14).double()
    n_theirs, n_ours = len(choices), plan.op_ids.numel()
    sigma = torch.sqrt(p * (1 - p) * torch.tensor(1 / n_theirs + 1 / n_ours))
    assert ((theirs / n_theirs - ours / n_ours).abs() <= 5 * sigma).all(), (theirs.tolist(), ours.tolist())
    their_signed = [(m < 0) for n, m in choices if SIGNED[n] and m != 0]
    their_fraction = sum(their_signed) / len(their_signed)
    sigma = math.sqrt(0.25 * (1 / len(their_signed) + 1 / total))
    assert abs(their_fraction - negated / total) <= 5 * sigma
    their_values = {(n, abs(m)) for n, m in choices}
    assert their_values == {(RANDAUGMENT_OPS[i], abs(float(table[i]))) for i in range(14)}


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_reproducibility(device, cpu_path):
    augment = BatchedRandAugment()
    images = _images(12, 40, 36, seed=3, device=device)
    first = augment(images, torch.Generator().manual_seed(7))
    again = augment(images, torch.Generator().manual_seed(7))
    other = augment(images, torch.Generator().manual_seed(8))
    assert first.device == images.device and first.dtype == torch.uint8 and first.shape == images.shape
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    plan = augment.draw(12, 40, 36, torch.Generator().manual_seed(7))
    assert torch.equal(augment.apply(images, plan), first)


def test_rounds_compose_as_single_ops_in_sequence(cpu_path):
    augment = BatchedRandAugment(num_ops=3)
    images = _images(24, 33, 29, seed=4)
    plan = augment.draw(24, 33, 29, torch.Generator().manual_seed(5))
    combined = augment.apply(images, plan)
    step = images
    single = BatchedRandAugment(num_ops=1)
    for round_index in range(3):
        one = RandAugmentPlan(plan.op_ids[:, round_index:round_index + 1],
                              plan.magnitudes[:, round_index:round_index + 1], plan.image_size)
        step = single.apply(step, one)
    assert torch.equal(combined, step)


def test_strided_inputs_give_the_same_result(cpu_path):
    augment = BatchedRandAugment()
    images = _images(10, 30, 26, seed=6)
    plan = augment.draw(10, 30, 26, torch.Generator().manual_seed(9))
    expected = augment.apply(images, plan)
    wide = torch.zeros(10, 3, 30, 30, dtype=torch.uint8)
    wide[..., 2:28] = images
    for view in (images.contiguous(memory_format=torch.channels_last), wide[..., 2:28]):
        assert torch.equal(augment.apply(view, plan), expected)


def test_empty_batch_and_zero_ops(cpu_path):
    images = _images(4, 8, 8, seed=0)
    none = BatchedRandAugment(num_ops=0)(images, torch.Generator().manual_seed(0))
    assert torch.equal(none, images) and none.data_ptr() != images.data_ptr()
    empty = BatchedRandAugment()(images[:0], torch.Generator().manual_seed(0))
    assert empty.shape == (0, 3, 8, 8)


def test_bad_arguments_are_named():
    g = torch.Generator().manual_seed(0)
    augment = BatchedRandAugment()
    images = _images(2, 8, 8, seed=0)
    with pytest.raises(TypeError, match="images.*uint8"):
        augment(images.float(), g)
    with pytest.raises(TypeError, match="images"):
        augment(images.numpy(), g)
    with pytest.raises(ValueError, match="images.*shape"):
        augment(images[0], g)
    with pytest.raises(ValueError, match="images.*shape"):
        augment(images[:, :1], g)
    with pytest.raises(ValueError, match="images.*shape"):
        augment(torch.cat([images, images[:, :1]], dim=1), g)
    with pytest.raises(TypeError, match="generator"):
        augment(images, 0)
    for kwargs, error, name in [
        ({"num_ops": -1}, ValueError, "num_ops"),
        ({"num_ops": 1.5}, TypeError, "num_ops"),
        ({"num_ops": True}, TypeError, "num_ops"),
        ({"magnitude": 31}, ValueError, "magnitude"),
        ({"magnitude": -1}, ValueError, "magnitude"),
        ({"magnitude": 2.0}, TypeError, "magnitude"),
        ({"num_magnitude_bins": 1}, ValueError, "num_magnitude_bins"),
        ({"fill": 300}, ValueError, "fill"),
        ({"fill": (1, 2)}, ValueError, "fill"),
    ]:
        with pytest.raises(error, match=name):
            BatchedRandAugment(**kwargs)
    plan = augment.draw(2, 8, 8, g)
    with pytest.raises(ValueError, match="plan"):
        augment.apply(_images(2, 8, 9, seed=0), plan)
    with pytest.raises(ValueError, match="plan"):
        augment.apply(_images(3, 8, 8, seed=0), plan)
    with pytest.raises(TypeError, match="plan"):
        augment.apply(images, (plan.op_ids, plan.magnitudes))
    with pytest.raises(ValueError, match="batch_size"):
        augment.draw(-1, 8, 8, g)


@pytest.mark.parametrize("device", DEVICES)
def test_normalize_uint8_matches_totensor_normalize(device):
    images = _images(5, 31, 47, seed=11, device=device)
    ref = v2.functional.normalize(images.float() / 255, list(CLIP_MEAN), list(CLIP_STD))
    ours = normalize_uint8(images, CLIP_MEAN, CLIP_STD)
    assert ours.dtype == torch.float32 and ours.shape == images.shape
    # One multiply-add with scale/offset rounded once vs torchvision's divide, subtract, divide: a few
    # float32 ulps of values up to ~2.2 (ulp 2.4e-7).
    assert float((ours - ref).abs().max()) <= 2e-6
    assert float((ours - ref).abs().max() / ref.abs().max()) < 1e-5
    out = torch.empty_like(ours)
    assert normalize_uint8(images, CLIP_MEAN, CLIP_STD, out=out) is out and torch.equal(out, ours)
    ref64 = (images.double() / 255 - torch.tensor(CLIP_MEAN, dtype=torch.float64, device=device).view(3, 1, 1)) \
        / torch.tensor(CLIP_STD, dtype=torch.float64, device=device).view(3, 1, 1)
    assert float((normalize_uint8(images, CLIP_MEAN, CLIP_STD, dtype=torch.float64) - ref64).abs().max()) < 1e-12
    half = normalize_uint8(images[0], CLIP_MEAN, CLIP_STD, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and float((half.float() - ref[0]).abs().max()) <= 2e-2


def test_normalize_uint8_bad_arguments_are_named():
    images = _images(2, 4, 4, seed=0)
    with pytest.raises(TypeError, match="images.*uint8"):
        normalize_uint8(images.float(), CLIP_MEAN, CLIP_STD)
    with pytest.raises(ValueError, match="images.*shape"):
        normalize_uint8(images[0, 0], CLIP_MEAN, CLIP_STD)
    with pytest.raises(ValueError, match="mean"):
        normalize_uint8(images, CLIP_MEAN[:2], CLIP_STD)
    with pytest.raises(ValueError, match="std"):
        normalize_uint8(images, CLIP_MEAN, (0.2, 0.0, 0.3))
    with pytest.raises(TypeError, match="dtype"):
        normalize_uint8(images, CLIP_MEAN, CLIP_STD, dtype=torch.int32)
    with pytest.raises(ValueError, match="out"):
        normalize_uint8(images, CLIP_MEAN, CLIP_STD, out=torch.empty(2, 3, 4, 5))


def test_pickled_transform_and_threads_give_the_same_result(cpu_path):
    import pickle
    import threading

    augment = BatchedRandAugment(fill=(1, 2, 3))
    images = _images(9, 21, 19, seed=12)
    expected = augment(images, torch.Generator().manual_seed(13))
    copy = pickle.loads(pickle.dumps(augment))  # as DataLoader workers receive it
    assert torch.equal(copy(images, torch.Generator().manual_seed(13)), expected)
    results = [None] * 4

    def work(slot):
        results[slot] = [augment(images, torch.Generator().manual_seed(13)) for _ in range(3)]

    threads = [threading.Thread(target=work, args=(slot,)) for slot in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(r, expected) for rs in results for r in rs)
