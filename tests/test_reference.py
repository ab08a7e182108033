"""The eager reference against independent hand computations, forward and backward."""
import math

import pytest
import torch
import torch.nn.functional as F

import guidg_fast as gf
from guidg_fast import reference
from conftest import assert_close


def _cmattn_inputs(B, K, C, D, H, dtype=torch.float64):
    f = F.normalize(torch.randn(B, D, dtype=dtype), dim=-1).requires_grad_()
    T = F.normalize(torch.randn(K, C, D, dtype=dtype), dim=-1).requires_grad_()
    wv = (torch.randn(H, D, D, dtype=dtype) / math.sqrt(D)).requires_grad_()
    bv = (0.1 * torch.randn(H, D, dtype=dtype)).requires_grad_()
    wt = (torch.randn(H, C, dtype=dtype) / math.sqrt(C)).requires_grad_()
    bt = (0.1 * torch.randn(H, dtype=dtype)).requires_grad_()
    return f, T, wv, bv, wt, bt


def _cmattn_by_hand(f, T, wv, bv, wt, bt, metric):
    B, D = f.shape
    K, C, _ = T.shape
    H = wv.shape[0]
    rows = []
    for b in range(B):
        per_head = []
        for h in range(H):
            q = sum(wv[h][:, j] * f[b, j] for j in range(D)) + bv[h]
            scores = []
            for k in range(K):
                key = sum(wt[h, c] * T[k, c] for c in range(C)) + bt[h]
                if metric == "cosine":
                    scores.append(torch.dot(q, key) / (q.norm() * key.norm()))
                else:
                    scores.append(torch.dot(q, key) / math.sqrt(D))
            s = torch.stack(scores)
            e = torch.exp(s - s.max())
            per_head.append(e / e.sum())
        rows.append(torch.stack(per_head).mean(0))
    return torch.stack(rows)


@pytest.mark.parametrize("metric", ["cosine", "dotproduct"])
@pytest.mark.parametrize("B,K,C,D,H", [(3, 2, 4, 5, 2), (1, 1, 1, 3, 1), (2, 3, 5, 4, 4)])
def test_cmattn_matches_per_sample_per_head_loop(metric, B, K, C, D, H):
    inputs = _cmattn_inputs(B, K, C, D, H)
    out = reference.cross_modal_attention(*inputs, metric=metric)
    hand = _cmattn_by_hand(*inputs, metric)
    assert_close(out, hand, "weights", tol=1e-10)
    assert torch.allclose(out.sum(-1), torch.ones(B, dtype=out.dtype))
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), inputs)
    grads_hand = torch.autograd.grad((hand * g).sum(), inputs)
    for name, a, e in zip(["f", "T", "wv", "bv", "wt", "bt"], grads, grads_hand):
        assert_close(a, e, f"grad {name}", tol=1e-10)


def test_cmattn_gradcheck():
    inputs = _cmattn_inputs(2, 3, 4, 5, 2)
    assert torch.autograd.gradcheck(lambda *a: reference.cross_modal_attention(*a, metric="cosine"), inputs)


def _loss_by_hand(f, T, y, w, tau, margin, entropy_weight):
    B = f.shape[0]
    K = T.shape[0]
    total = 0.0
    for k in range(K):
        per_sample = []
        probs = []
        for b in range(B):
            z = tau * (f[b] - margin * T[k, y[b]]) @ T[k].t()
            lse = torch.logsumexp(z, dim=0)
            per_sample.append(lse - z[y[b]])
            probs.append(torch.exp(z - lse))
        ce = torch.stack(per_sample)
        if w.dim() == 1:
            total = total + w[k] * ce.mean()
        else:
            total = total + (w[:, k] * ce).mean()
        if entropy_weight:
            p = torch.stack(probs)
            ent = (-(p * torch.log(p + 1e-5)).sum(1)).mean()
            pm = p.mean(0)
            total = total + entropy_weight * (ent - (-(pm * torch.log(pm + 1e-5)).sum()))
    return total


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("margin,entropy_weight", [(0.0, 0.0), (0.3, 0.0), (0.0, 0.01), (0.3, 0.5)])
def test_multi_expert_loss_matches_hand(per_sample, margin, entropy_weight):
    B, K, C, D = 5, 3, 7, 6
    f = F.normalize(torch.randn(B, D, dtype=torch.float64), dim=-1).requires_grad_()
    T = F.normalize(torch.randn(K, C, D, dtype=torch.float64), dim=-1).requires_grad_()
    y = torch.randint(0, C, (B,))
    w = torch.rand(B, K, dtype=torch.float64) if per_sample else torch.rand(K, dtype=torch.float64)
    w.requires_grad_()
    loss = reference.multi_expert_loss(f, T, y, w, 10.0, margin=margin, entropy_weight=entropy_weight)
    hand = _loss_by_hand(f, T, y, w, 10.0, margin, entropy_weight)
    assert_close(loss, hand, "loss", tol=1e-10)
    for name, a, e in zip(["f", "T", "w"], torch.autograd.grad(loss, (f, T, w)), torch.autograd.grad(hand, (f, T, w))):
        assert_close(a, e, f"grad {name}", tol=1e-10)


def test_multi_expert_loss_equals_cross_entropy_for_one_expert():
    B, C, D = 4, 6, 8
    f = F.normalize(torch.randn(B, D), dim=-1)
    T = F.normalize(torch.randn(1, C, D), dim=-1)
    y = torch.randint(0, C, (B,))
    loss = reference.multi_expert_loss(f, T, y, torch.ones(1), 100.0)
    assert_close(loss, F.cross_entropy(100.0 * f @ T[0].t(), y), "loss", tol=1e-6)


@pytest.mark.parametrize("per_sample", [False, True])
def test_ensemble_logits_matches_hand(per_sample):
    B, K, C, D = 3, 4, 5, 6
    f = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    T = torch.randn(K, C, D, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(B, K) if per_sample else torch.rand(K)).double().requires_grad_()
    out = reference.ensemble_logits(f, T, w, 50.0)
    hand = torch.stack(
        [sum((w[b, k] if per_sample else w[k]) * 50.0 * (T[k] @ f[b]) for k in range(K)) for b in range(B)]
    )
    assert_close(out, hand, "logits", tol=1e-10)
    g = torch.randn_like(out)
    for name, a, e in zip(
        ["f", "T", "w"],
        torch.autograd.grad((out * g).sum(), (f, T, w)),
        torch.autograd.grad((hand * g).sum(), (f, T, w)),
    ):
        assert_close(a, e, f"grad {name}", tol=1e-10)
    if not per_sample:  # the collapse identity the fast path uses
        assert_close(out, 50.0 * f @ torch.einsum("k,kcd->cd", w, T).t(), "collapsed", tol=1e-10)


def test_bma_closed_form_over_steps():
    torch.manual_seed(3)
    module = torch.nn.Linear(5, 4).double()
    total = 7
    bma = gf.BetaMovingAverage(module, beta=0.1, total_steps=total)
    alphas = [gf.averaging.beta_pdf((t + 0.5) / (total + 1), 0.1, 0.1) for t in range(total + 1)]
    history = [[p.detach().clone() for p in module.parameters()]]
    for step in range(1, total + 1):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        history.append([p.detach().clone() for p in module.parameters()])
        bma.update()
        weights = torch.tensor(alphas[: step + 1], dtype=torch.float64)
        for i, avg in enumerate(bma.module.parameters()):
            expected = sum(weights[t] * history[t][i] for t in range(step + 1)) / weights.sum()
            assert_close(avg, expected, f"BMA step {step} param {i}", tol=1e-12)


def test_beta_pdf_matches_known_values():
    # Beta(0.5, 0.5) is the arcsine density 1 / (pi sqrt(x (1 - x)))
    for x in (0.1, 0.5, 0.93):
        assert abs(gf.averaging.beta_pdf(x, 0.5, 0.5) - 1 / (math.pi * math.sqrt(x * (1 - x)))) < 1e-12
    assert abs(gf.averaging.beta_pdf(0.3, 1.0, 1.0) - 1.0) < 1e-12


def test_reference_bma_update_is_the_official_formula():
    a = [torch.randn(3, 4), torch.randn(7)]
    t = [torch.randn(3, 4), torch.randn(7)]
    expected = [(x + 0.25 * y) / 1.25 for x, y in zip(a, t)]
    reference.bma_update_(a, t, 0.25)
    for got, want in zip(a, expected):
        assert torch.equal(got, want)


def test_wise_ft():
    a = {"w": torch.zeros(3), "n": torch.tensor(1)}
    b = {"w": torch.ones(3), "n": torch.tensor(5)}
    mixed = gf.wise_ft(a, b, 0.25)
    assert torch.allclose(mixed["w"], torch.full((3,), 0.25))
    assert int(mixed["n"]) == 5
    with pytest.raises(ValueError, match="same keys"):
        gf.wise_ft(a, {"w": torch.ones(3)}, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        gf.wise_ft(a, b, 1.5)
