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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(scope="session")
def tiny_clip():
    import guidg_fast as gf

    torch.manual_seed(0)
    model, preprocess, tokenizer = gf.load_clip(gf.TINY_ARCH)
    return model, preprocess, tokenizer
