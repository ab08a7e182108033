"""CrossModalAttention module: official state_dict layout, detached inputs, same function as the reference."""
import pytest
import torch
import torch.nn.functional as F

import guidg_fast as gf
from guidg_fast import reference
from conftest import assert_close


def test_state_dict_layout_and_official_load():
    attn = gf.CrossModalAttention(8, num_classes=5, num_heads=4)
    keys = set(attn.state_dict())
    expected = {f"layers.{h}.{n}.{p}" for h in range(4) for n in ("linear_v", "linear_t") for p in ("weight", "bias")}
    assert keys == expected
    assert attn.state_dict()["layers.2.linear_t.weight"].shape == (1, 5)
    official = {k: torch.randn_like(v) for k, v in attn.state_dict().items()}
    attn.load_state_dict(official)
    wv, bv, wt, bt = attn.stacked_parameters()
    assert torch.equal(wv[3], official["layers.3.linear_v.weight"])
    assert torch.equal(wt[1], official["layers.1.linear_t.weight"][0])
    assert torch.equal(bt, torch.cat([official[f"layers.{h}.linear_t.bias"] for h in range(4)]))


def test_forward_detaches_and_matches_reference():
    attn = gf.CrossModalAttention(8, num_classes=5, num_heads=3, metric="dotproduct")
    f = F.normalize(torch.randn(6, 8), dim=-1).requires_grad_()
    T = F.normalize(torch.randn(2, 5, 8), dim=-1).requires_grad_()
    w = attn(f, T)
    assert_close(w, reference.cross_modal_attention(f, T, *attn.stacked_parameters(), metric="dotproduct"))
    w.mean(0)[0].backward()
    assert f.grad is None and T.grad is None
    assert all(p.grad is not None for p in attn.parameters())
    # list input, as the official call passes one (C, D) tensor per expert
    assert_close(attn(f, [T[0], T[1]]), w)


def test_parameters_are_stored_stacked():
    # the fused op gets the stored parameters themselves (no per-step stack), in the official order
    torch.manual_seed(0)
    attn = gf.CrossModalAttention(8, num_classes=5, num_heads=3)
    wv, bv, wt, bt = attn.stacked_parameters()
    assert [p is q for p, q in zip((wv, bv, wt, bt), attn.parameters())] == [True] * 4
    assert (wv.shape, bv.shape, wt.shape, bt.shape) == ((3, 8, 8), (3, 8), (3, 5), (3,))
    keys = list(attn.state_dict())
    assert keys[:4] == ["layers.0.linear_v.weight", "layers.0.linear_v.bias", "layers.0.linear_t.weight",
                        "layers.0.linear_t.bias"]
    # nn.Linear's initialisation, head by head, as the per-head modules had
    torch.manual_seed(0)
    heads = [(torch.nn.Linear(8, 8), torch.nn.Linear(5, 1)) for _ in range(3)]
    assert torch.equal(wv[1], heads[1][0].weight) and torch.equal(bt[2], heads[2][1].bias[0])
    # an official state_dict (plain per-head tensors) round-trips, a missing head is reported
    state = {k: torch.randn_like(v) for k, v in attn.state_dict().items()}
    other = gf.CrossModalAttention(8, num_classes=5, num_heads=3)
    other.load_state_dict(state)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    del state["layers.2.linear_v.bias"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*layers\.2\.linear_v\.bias"):
        other.load_state_dict(state)
    state["layers.2.linear_v.bias"] = torch.randn(8)
    state["layers.3.linear_v.bias"] = torch.randn(8)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*layers\.3\.linear_v\.bias"):
        other.load_state_dict(state)
    del state["layers.3.linear_v.bias"]
    state["layers.1.linear_t.weight"] = torch.randn(1, 6)
    with pytest.raises(RuntimeError, match=r"size mismatch for layers\.0\.linear_t\.weight|size mismatch for layers\.1"):
        other.load_state_dict(state)
