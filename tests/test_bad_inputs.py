"""Bad inputs raise ValueError naming the argument, in the reference and the fast ops alike."""
import pytest
import torch
import torch.nn.functional as F

import guidg_fast as gf
from guidg_fast import ops, reference

IMPLS = [pytest.param(reference, id="reference"), pytest.param(ops, id="ops")]


def _inputs(B=4, K=3, C=5, D=6, H=2):
    f = F.normalize(torch.randn(B, D), dim=-1)
    T = F.normalize(torch.randn(K, C, D), dim=-1)
    y = torch.randint(0, C, (B,))
    w = torch.rand(K)
    params = (torch.randn(H, D, D), torch.randn(H, D), torch.randn(H, C), torch.randn(H))
    return f, T, y, w, params


@pytest.mark.parametrize("impl", IMPLS)
def test_loss_bad_inputs(impl):
    f, T, y, w, _ = _inputs()
    cases = [
        ((f[0], T, y, w, 100.0), r"^f must be 2-D"),
        ((f, T[0], y, w, 100.0), r"^T must be 3-D"),
        ((f, T[..., :5], y, w, 100.0), r"^T must have shape \(K, C, 6\)"),
        ((f, T, y + 5, w, 100.0), r"^y must hold class indices in \[0, 5\)"),
        ((f, T, y - 1 - y.max(), w, 100.0), r"^y must hold class indices"),
        ((f, T, y.float(), w, 100.0), r"^y must be an int64"),
        ((f, T, y[:2], w, 100.0), r"^y must have shape \(4,\)"),
        ((f, T, y, w[:2], 100.0), r"^w \(batch weights\) must have shape \(3,\)"),
        ((f, T, y, torch.rand(4, 2), 100.0), r"^w \(per-sample weights\) must have shape \(4, 3\)"),
        ((f, T, y, torch.tensor([1.0, float("nan"), 0.0]), 100.0), r"^w contains NaN"),
        ((f, T.double(), y, w, 100.0), r"^T must have f's dtype"),
        ((f, T, y, w, -1.0), r"^temperature must be a finite positive"),
        ((f, T, y, w, float("inf")), r"^temperature"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            impl.multi_expert_loss(*args)


@pytest.mark.parametrize("impl", IMPLS)
def test_ensemble_bad_inputs(impl):
    f, T, _, w, _ = _inputs()
    with pytest.raises(ValueError, match=r"^w \(batch weights\)"):
        impl.ensemble_logits(f, T, torch.rand(2), 100.0)
    with pytest.raises(ValueError, match=r"^f must be 2-D"):
        impl.ensemble_logits(f[None], T, w, 100.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_cmattn_bad_inputs(impl):
    f, T, _, _, (wv, bv, wt, bt) = _inputs()
    with pytest.raises(ValueError, match=r"^wt must have shape \(2, 5\) = \(H, C\): .* built for 7 classes but T has C = 5"):
        impl.cross_modal_attention(f, T, wv, bv, torch.randn(2, 7), bt)
    with pytest.raises(ValueError, match=r"^wv must have shape \(2, 6, 6\)"):
        impl.cross_modal_attention(f, T, wv[:, :5], bv, wt, bt)
    with pytest.raises(ValueError, match=r"^bv must have shape"):
        impl.cross_modal_attention(f, T, wv, bv[:1], wt, bt)
    with pytest.raises(ValueError, match=r"^bt must be 1-D"):
        impl.cross_modal_attention(f, T, wv, bv, wt, bt[None])
    with pytest.raises(ValueError, match=r"^metric must be"):
        impl.cross_modal_attention(f, T, wv, bv, wt, bt, metric="l2")
    with pytest.raises(ValueError, match=r"^f must be a torch.Tensor"):
        impl.cross_modal_attention(f.tolist(), T, wv, bv, wt, bt)


def test_module_class_count_mismatch():
    attn = gf.CrossModalAttention(6, num_classes=7)
    f, T, *_ = _inputs()
    with pytest.raises(ValueError, match="built for 7 classes but T has C = 5"):
        attn(f, T)
