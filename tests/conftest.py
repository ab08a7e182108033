import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-6) -> float:
    """max |a - e| / max |e| over the whole tensor (norm-wise relative error).

    ``floor`` bounds the denominator for tensors that are exactly zero in exact arithmetic (e.g. the
    gradient of a softmax-invariant shift), where only rounding noise remains.
    """
    actual, expected = actual.detach().double(), expected.detach().double()
    if expected.numel() == 0:
        return 0.0
    scale = expected.abs().max().clamp_min(floor)
    return float((actual - expected).abs().max() / scale)


def assert_close(actual, expected, name="output", tol=1e-5, floor=1e-6):
    """Relative-error check that names the first mismatching index when it fails."""
    assert actual is not None, f"{name}: got None"
    assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (unwritten/poisoned output?)"
    err = rel_err(actual, expected, floor)
    if not err < tol:
        diff = (actual.detach().double() - expected.detach().double()).abs()
        idx = torch.nonzero(diff == diff.max())[0].tolist()
        raise AssertionError(
            f"{name}: relative error {err:.3e} >= {tol:.0e}; worst at index {idx}: "
            f"{actual[tuple(idx)].item()} vs {expected[tuple(idx)].item()}"
        )


def assert_low_precision_close(actual, eager, exact, name="output"):
    """A half-precision result against the fp32 (or fp64) result on the same rounded inputs, judged
    relative to the eager reference's own half-precision error: within 3x of it, plus one unit of
    the dtype's precision (flash-attention's rule; a fixed atol would pass a kernel that drops fp32
    accumulation whenever the eager error happens to be large)."""
    assert actual.dtype == eager.dtype, f"{name}: dtype {actual.dtype} != {eager.dtype}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err, eager_err = rel_err(actual, exact), rel_err(eager, exact)
    bound = 3 * eager_err + torch.finfo(actual.dtype).eps
    assert err <= bound, f"{name}: relative error vs fp32 {err:.3e} > {bound:.3e} (eager {actual.dtype}: {eager_err:.3e})"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(scope="session")
def tiny_clip():
    import guidg_fast as gf

    torch.manual_seed(0)
    model, preprocess, tokenizer = gf.load_clip(gf.TINY_ARCH)
    return model, preprocess, tokenizer
