"""ops.guidance_loss: cmattn + batch mean (or per-sample weights) + multi_expert_loss in one call, a
composition of the two ops' custom ops -- against the reference composition, forward and backward
(f, T and every CMAttn parameter, under an upstream gradient other than 1), bf16 against fp32."""
import pytest
import torch
import torch.nn.functional as F

from guidg_fast import ops, reference
from guidg_fast.ops import _backend
from backends import cpu_backends, cuda_only
from conftest import assert_low_precision_close

LOSSES = [(0.3, 0.0), (0.0, 0.0), (0.0, 0.01)]  # (margin, entropy_weight): clipood, erm, ueo
SHAPES = [(36, 3, 200, 512, 4), (5, 2, 7, 33, 3), (1, 1, 1, 8, 1), (19, 4, 65, 40, 2)]  # B, K, C, D, H
SMALL = SHAPES[1:3]  # what the Triton interpreter runs
# the backends of both parts (each skipped where it cannot run on the CPU here)
BACKENDS = [pytest.param(a.values[0], marks=a.marks + b.marks, id=a.id)
            for a, b in zip(cpu_backends("cmattn"), cpu_backends("multi_expert_loss"))]
UPSTREAM = 3.7  # (loss * 3.7).backward(): the backward must use the upstream gradient, not assume 1


def _inputs(shape, dtype, device="cpu", seed=0):
    B, K, C, D, H = shape
    g = torch.Generator().manual_seed(seed)
    f = F.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=-1)
    T = F.normalize(torch.randn(K, C, D, generator=g, dtype=dtype), dim=-1)
    y = torch.randint(0, C, (B,), generator=g)
    params = [torch.randn(H, D, D, generator=g, dtype=dtype) * 0.05, torch.randn(H, D, generator=g, dtype=dtype) * 0.1,
              torch.randn(H, C, generator=g, dtype=dtype) * 0.2, torch.randn(H, generator=g, dtype=dtype) * 0.1]
    return (f.to(device).requires_grad_(), T.to(device).requires_grad_(), y.to(device),
            [p.to(device).requires_grad_() for p in params])


def _run(impl, f, T, y, params, metric, weights, margin, ew):
    """(loss, w, gradients of UPSTREAM * loss w.r.t. f, T and the CMAttn parameters)."""
    f, T = f.detach().clone().requires_grad_(), T.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in params]
    if impl is reference:
        w = reference.cross_modal_attention(f.detach(), T.detach(), *params, metric)
        if weights == "batch":
            w = w.mean(dim=0)
        loss = reference.multi_expert_loss(f, T, y, w, 100.0, margin=margin, entropy_weight=ew)
        w = w.detach()
    else:
        loss, w = ops.guidance_loss(f, T, y, *params, 100.0, margin=margin, entropy_weight=ew, metric=metric,
                                    weights=weights)
        assert not w.requires_grad
    return loss, w, torch.autograd.grad(loss * UPSTREAM, [f, T, *params])


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-6)


NAMES = ("df", "dT", "dwv", "dbv", "dwt", "dbt")


@pytest.mark.parametrize("backend", BACKENDS[:1])  # ext: fp64 kernels (Triton's loss accumulates in fp32)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("metric", ["cosine", "dotproduct"])
@pytest.mark.parametrize("weights", ["batch", "per_sample"])
@pytest.mark.parametrize("margin,ew", LOSSES, ids=["clipood", "erm", "ueo"])
def test_matches_reference_float64(backend, shape, metric, weights, margin, ew, monkeypatch):
    monkeypatch.setenv("GUIDG_FAST_POISON", "1")
    f, T, y, params = _inputs(shape, torch.float64)
    with ops.use_backend(backend):
        loss, w, grads = _run(ops, f, T, y, params, metric, weights, margin, ew)
    ref_loss, ref_w, ref_grads = _run(reference, f, T, y, params, metric, weights, margin, ew)
    assert _rel(loss, ref_loss) < 1e-12 and _rel(w, ref_w) < 1e-12
    for name, g, r in zip(NAMES, grads, ref_grads):
        if metric == "dotproduct" and name == "dbt":  # exactly 0 in exact math (a shift of every key)
            assert float((g - r).abs().max()) < 1e-10
            continue
        assert _rel(g, r) < 1e-10, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights", ["batch", "per_sample"])
@pytest.mark.parametrize("margin,ew", LOSSES, ids=["clipood", "erm", "ueo"])
def test_float32_against_float64(backend, weights, margin, ew, monkeypatch):
    # through the batch mean and the softmax over experts the CMAttn parameter gradients are
    # ill-conditioned in fp32 (the fp32 reference is itself ~1e-5..1e-4 off float64 there): the fast
    # path must be as close to float64 as the fp32 reference is, and within 1e-5 where that is
    monkeypatch.setenv("GUIDG_FAST_POISON", "1")
    for shape in (SHAPES[:2] if backend == "ext" else SMALL[:1]):
        f, T, y, params = _inputs(shape, torch.float32)
        with ops.use_backend(backend):
            loss, w, grads = _run(ops, f, T, y, params, "cosine", weights, margin, ew)
        ref_loss, ref_w, ref_grads = _run(reference, f, T, y, params, "cosine", weights, margin, ew)
        f64, T64, p64 = f.double(), T.double(), [p.double() for p in params]
        exact_loss, exact_w, exact_grads = _run(reference, f64, T64, y, p64, "cosine", weights, margin, ew)
        for name, got, ref, exact in zip(("loss", "w", *NAMES), (loss, w, *grads), (ref_loss, ref_w, *ref_grads),
                                         (exact_loss, exact_w, *exact_grads)):
            err, ref_err = _rel(got.double(), exact), _rel(ref.double(), exact)
            assert err <= max(2 * ref_err, 1e-5), f"{name}: {err:.2e} vs float64 (fp32 reference {ref_err:.2e})"


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("eager", id="eager")])
def test_bfloat16_matches_float32(backend):
    # bf16 inputs compute in fp32 inside each part and cast back: loss, w and every gradient against
    # fp32 on the same bf16-rounded inputs, within 3x of the eager bf16 reference's own error
    f, T, y, params = _inputs((7, 3, 11, 24, 2), torch.bfloat16, seed=3)
    with ops.use_backend(backend):
        loss, w, grads = _run(ops, f, T, y, params, "cosine", "batch", 0.3, 0.0)
    assert loss.dtype == torch.bfloat16 and w.shape == (3,)
    exact = _run(reference, f.float(), T.float(), y, [p.float() for p in params], "cosine", "batch", 0.3, 0.0)
    eager = _run(reference, f, T, y, params, "cosine", "batch", 0.3, 0.0)
    for name, got, e, x in zip(("loss", "w", *NAMES), (loss, w, *grads), (eager[0], eager[1], *eager[2]),
                               (exact[0], exact[1], *exact[2])):
        assert_low_precision_close(got, e, x, name)


def test_guidance_bad_inputs():
    f, T, y, params = _inputs((4, 2, 5, 16, 2), torch.float32, seed=2)
    with pytest.raises(ValueError, match=r"^weights must be one of"):
        ops.guidance_loss(f, T, y, *params, 100.0, weights="mean")
    with pytest.raises(ValueError, match=r"^y must hold class indices in \[0, 5\)"):
        ops.guidance_loss(f, T, y + 5, *params, 100.0)
    with pytest.raises(ValueError, match=r"^wt must have shape \(2, 5\)"):
        ops.guidance_loss(f, T, y, params[0], params[1], params[2][:, :4], params[3], 100.0)
    with pytest.raises(ValueError, match=r"^metric must be 'cosine' or 'dotproduct'"):
        ops.guidance_loss(f, T, y, *params, 100.0, metric="l2")
    with pytest.raises(ValueError, match=r"^temperature must be a finite positive"):
        ops.guidance_loss(f, T, y, *params, -1.0)
    with pytest.raises(ValueError, match=r"^y must have shape \(4,\)"):
        ops.guidance_loss(f, T, y[:3], *params, 100.0)


def _bad(f_, T_, y_, p, **kw):
    args = dict(f=f_, T=T_, y=y_, wv=p[0], bv=p[1], wt=p[2], bt=p[3], temperature=100.0)
    args.update(kw)
    return args


# each bad argument fails with an error that names it
BAD_GUIDANCE = [
    (lambda f, T, y, p: _bad(f, T, y, p, f=f.detach().numpy()), r"^f must be a torch.Tensor"),
    (lambda f, T, y, p: _bad(f, T, y, p, f=f[None]), r"^f must be 2-D"),
    (lambda f, T, y, p: _bad(f, T, y, p, f=f.long()), r"^f must be a floating-point tensor"),
    (lambda f, T, y, p: _bad(f, T, y, p, T=T[..., :8]), r"^T must have shape \(K, C, 16\)"),
    (lambda f, T, y, p: _bad(f, T, y, p, T=T.double()), r"^T must have f's dtype"),
    (lambda f, T, y, p: _bad(f, T, y, p, f=f[:0]), r"^f and T must be non-empty"),
    (lambda f, T, y, p: _bad(f, T, y, p, wv=p[0][:, :8]), r"^wv must have shape \(2, 16, 16\)"),
    (lambda f, T, y, p: _bad(f, T, y, p, wv=p[0].double()), r"^wv must have f's dtype"),
    (lambda f, T, y, p: _bad(f, T, y, p, bv=p[1][:1]), r"^bv must have shape \(2, 16\)"),
    (lambda f, T, y, p: _bad(f, T, y, p, bt=p[3][None]), r"^bt must be 1-D"),
    (lambda f, T, y, p: _bad(f, T, y, p, y=y.float()), r"^y must be an int64 \(or int32\) tensor"),
    (lambda f, T, y, p: _bad(f, T, y, p, y=[0, 1]), r"^y must be a torch.Tensor"),
    (lambda f, T, y, p: _bad(f, T, y, p, temperature=float("inf")), r"^temperature must be a finite positive"),
    (lambda f, T, y, p: _bad(f, T, y, p, margin=float("nan")), r"^margin must be a finite number"),
    (lambda f, T, y, p: _bad(f, T, y, p, entropy_weight=True), r"^entropy_weight must be a finite number"),
]


@pytest.mark.parametrize("make,message", BAD_GUIDANCE, ids=[m for _, m in BAD_GUIDANCE])
def test_guidance_bad_inputs_name_the_argument(make, message):
    f, T, y, params = _inputs((4, 2, 5, 16, 2), torch.float32, seed=2)
    with pytest.raises(ValueError, match=message):
        ops.guidance_loss(**make(f, T, y, params))


def test_guidance_accepts_int32_labels_and_tensor_scalars():
    f, T, y, params = _inputs((4, 2, 5, 16, 2), torch.float64, seed=3)
    loss, w = ops.guidance_loss(f, T, y, *params, 100.0, margin=0.3)
    loss2, w2 = ops.guidance_loss(f, T, y.int(), *params, torch.tensor(100.0),
                                  margin=torch.tensor(0.3, dtype=torch.float64))
    assert _rel(loss2, loss) < 1e-12 and _rel(w2, w) < 1e-12


@cuda_only
@pytest.mark.parametrize("weights", ["batch", "per_sample"])
def test_guidance_cuda_matches_reference(weights):
    f, T, y, params = _inputs((36, 3, 65, 512, 4), torch.float64, device="cuda")
    loss, w, grads = _run(ops, f, T, y, params, "cosine", weights, 0.3, 0.0)
    ref_loss, ref_w, ref_grads = _run(reference, f, T, y, params, "cosine", weights, 0.3, 0.0)
    assert _rel(loss, ref_loss) < 1e-10 and _rel(w, ref_w) < 1e-10
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert _rel(g, r) < 1e-10, name
