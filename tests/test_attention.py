"""CrossModalAttention module: official state_dict layout, detached inputs, same function as the reference."""
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
