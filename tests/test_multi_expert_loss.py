"""multi_expert_loss: every fused backend against guidg_fast.reference, forward and every gradient.

Outputs of the kernels are NaN-poisoned (GUIDG_FAST_POISON=1) so an element no kernel writes fails
the finiteness check of assert_close. Triton runs under TRITON_INTERPRET=1 with small shapes.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from guidg_fast import ops, reference
from guidg_fast.ops import _backend
from backends import cpu_backends, cuda_only, require_ext
from conftest import assert_close, assert_low_precision_close

mel_module = importlib.import_module("guidg_fast.ops.multi_expert_loss")

EXT_BUILT = ops.extension_status()["built"]

# (B, K, C, D): a GuiDG-like shape, one-of-everything, one class over several row blocks (all
# gradients exactly zero), odd sizes that are no multiple of any block
SHAPES = {
    "ext": [(12, 3, 65, 40), (1, 1, 1, 3), (36, 3, 1, 40), (7, 2, 1000, 45), (70, 2, 300, 19)],
    "triton": [(12, 3, 7, 24), (1, 1, 1, 3), (19, 2, 1, 20), (19, 2, 40, 16)],  # last: 2 class splits
    "cuda": [(36, 3, 1000, 512), (1, 1, 1, 3), (70, 2, 345, 37)],
}
CONFIGS = [(0.0, 0.0), (0.3, 0.0), (0.0, 0.01), (0.3, 0.5)]  # (margin, entropy_weight)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("GUIDG_FAST_POISON", "1")


def _inputs(B, K, C, D, per_sample, dtype=torch.float32, device="cpu", requires=("f", "T", "w")):
    f = F.normalize(torch.randn(B, D, dtype=dtype), dim=-1).to(device).requires_grad_("f" in requires)
    T = F.normalize(torch.randn(K, C, D, dtype=dtype), dim=-1).to(device).requires_grad_("T" in requires)
    y = torch.randint(0, C, (B,)).to(device)
    w = (torch.rand(B, K, dtype=dtype) if per_sample else torch.rand(K, dtype=dtype)).to(device)
    return f, T, y, w.requires_grad_("w" in requires)


def _loss_and_grads(impl, f, T, y, w, tau, margin, ew, backend=None):
    with ops.use_backend(backend):
        loss = impl.multi_expert_loss(f, T, y, w, tau, margin=margin, entropy_weight=ew)
    wrt = [x for x in (f, T, w) if x.requires_grad]
    return loss, torch.autograd.grad(loss, wrt) if wrt else ()


def _check_against_reference(backend, shape, per_sample, margin, ew, tau=20.0, device="cpu", requires=("f", "T", "w")):
    f, T, y, w = _inputs(*shape, per_sample, device=device, requires=requires)
    loss, grads = _loss_and_grads(ops, f, T, y, w, tau, margin, ew, backend)
    ref_loss, ref_grads = _loss_and_grads(reference, f, T, y, w, tau, margin, ew)
    where = f"{backend} (B, K, C, D) = {shape}, per_sample={per_sample}, margin={margin}, ew={ew}"
    assert loss.grad_fn is not None or not grads
    assert_close(loss, ref_loss, f"loss, {where}")
    names = [n for n, x in zip("fTw", (f, T, w)) if x.requires_grad]
    for name, got, want in zip(names, grads, ref_grads):
        # C = 1: softmax over one class is 1, so the f and T gradients are exactly 0 and only the
        # rounding of z - lse is left (z recomputed in another order on a GPU); measure that noise
        # against the scale these gradients have for C > 1, tau * max|w| (|f| = |T| = 1)
        floor = tau * float(w.detach().abs().max()) if shape[2] == 1 and name in "fT" else 1e-6
        assert_close(got, want, f"grad {name}, {where}", floor=floor)


@pytest.mark.parametrize("margin,ew", CONFIGS, ids=[f"m{m}-e{e}" for m, e in CONFIGS])
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch_w", "sample_w"])
@pytest.mark.parametrize("backend", cpu_backends("multi_expert_loss"))
def test_matches_reference(backend, per_sample, margin, ew):
    for shape in SHAPES[backend]:
        _check_against_reference(backend, shape, per_sample, margin, ew)


@pytest.mark.parametrize("requires", [("T",), ("f",), ("w",), ("f", "w")], ids=lambda r: "+".join(r))
@pytest.mark.parametrize("backend", cpu_backends("multi_expert_loss"))
def test_gradient_subsets(backend, requires):
    """Each gradient alone (e.g. T alone needs the per-row pass for the margin and entropy terms)."""
    for margin, ew in ((0.3, 0.0), (0.0, 0.02), (0.3, 0.02)):
        _check_against_reference(backend, SHAPES["triton"][0], True, margin, ew, requires=requires)


@pytest.mark.parametrize("backend", cpu_backends("multi_expert_loss"))
def test_backward_without_o(backend):
    """A forward run without o (need_o=False): the backward sweeps the classes itself."""
    for per_sample, margin in ((False, 0.3), (True, 0.0)):
        f, T, y, w = _inputs(*SHAPES["triton"][-1], per_sample)
        loss = mel_module.fused_multi_expert_loss(f, T, y, w, 20.0, None, margin, 0.0, backend, False)[0]
        assert loss.grad_fn is not None
        ref = reference.multi_expert_loss(f, T, y, w, 20.0, margin=margin)
        assert_close(loss, ref, "loss")
        for name, got, want in zip("fTw", torch.autograd.grad(loss, (f, T, w)), torch.autograd.grad(ref, (f, T, w))):
            assert_close(got, want, f"grad {name}")


@pytest.mark.parametrize("backend", cpu_backends("multi_expert_loss"))
def test_real_temperature_and_no_grad(backend):
    # tau = 100 (CLIP's logit scale) as a 0-d tensor; forward only under no_grad
    f, T, y, w = _inputs(16, 3, 20, 32, False)
    tau = torch.tensor(100.0)
    with torch.no_grad(), ops.use_backend(backend):
        loss = ops.multi_expert_loss(f, T, y, w, tau, margin=0.3, entropy_weight=0.01)
    assert_close(loss, reference.multi_expert_loss(f, T, y, w, 100.0, margin=0.3, entropy_weight=0.01), "loss")
    _check_against_reference(backend, (16, 3, 20, 32), False, 0.3, 0.0, tau=100.0)


@pytest.mark.parametrize("backend", cpu_backends("multi_expert_loss"))
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch_w", "sample_w"])
def test_bfloat16_matches_float32_and_int32_labels(backend, per_sample):
    # bf16 computes in fp32 and casts back: loss and every gradient against the fp32 reference on the
    # same bf16-rounded inputs, within 3x of the eager bf16 reference's own error (conftest)
    f, T, y, w = (x.detach().bfloat16() if x.is_floating_point() else x for x in _inputs(9, 2, 17, 24, per_sample))
    args = [x.requires_grad_() for x in (f, T, w)]

    def run(impl, f, T, w, labels, backend=None):
        f, T, w = (x.detach().clone().requires_grad_() for x in (f, T, w))
        with ops.use_backend(backend):
            loss = impl.multi_expert_loss(f, T, labels, w, 20.0, margin=0.3, entropy_weight=0.01)
        return loss, torch.autograd.grad(loss, (f, T, w))

    loss, grads = run(ops, *args, y.int(), backend)
    exact_loss, exact = run(reference, *[a.float() for a in args], y)
    eager_loss, eager = run(reference, *args, y)
    assert loss.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    assert_low_precision_close(loss, eager_loss, exact_loss, "loss")
    for name, got, e, x in zip("fTw", grads, eager, exact):
        assert_low_precision_close(got, e, x, f"grad {name}")


@pytest.mark.parametrize("backend", cpu_backends("multi_expert_loss"))
@pytest.mark.parametrize("margin,ew", [(0.3, 0.0), (0.0, 0.02)])
def test_upstream_gradient_scales_every_gradient(backend, margin, ew):
    # (loss * 3.7).backward(): the backward must use the upstream gradient, not assume 1
    for per_sample in (False, True):
        f, T, y, w = _inputs(7, 3, 11, 24, per_sample)
        grads = {}
        for impl, name in ((ops, "fast"), (reference, "reference")):
            leaves = [x.detach().clone().requires_grad_() for x in (f, T, w)]
            with ops.use_backend(backend if impl is ops else None):
                (impl.multi_expert_loss(leaves[0], leaves[1], y, leaves[2], 20.0, margin=margin,
                                        entropy_weight=ew) * 3.7).backward()
            grads[name] = [x.grad for x in leaves]
        for n, got, want in zip("fTw", grads["fast"], grads["reference"]):
            assert_close(got, want, f"grad {n} (per_sample={per_sample})")


@pytest.mark.skipif(not EXT_BUILT, reason="guidg_fast._C not built")
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch_w", "sample_w"])
def test_gradcheck_float64_ext(per_sample):
    f, T, y, w = _inputs(4, 2, 5, 6, per_sample, dtype=torch.float64)
    fn = lambda f, T, w: ops.multi_expert_loss(f, T, y, w, 3.0, margin=0.3, entropy_weight=0.2)  # noqa: E731
    with ops.use_backend("ext"):
        assert torch.autograd.gradcheck(fn, (f, T, w))


def test_fast_path_uses_the_fused_op():
    backend = ops.choose("multi_expert_loss", torch.device("cpu"))
    if backend != "ext":
        pytest.skip("no C++ extension kernels on CPU here")
    f, T, y, w = _inputs(5, 3, 7, 6, False)
    with torch.profiler.profile() as prof:
        loss = ops.multi_expert_loss(f, T, y, w, 20.0, margin=0.3)
        loss.backward()
    ran = {event.name for event in prof.events()}
    # the custom op pair (eager and torch.compile alike) around the extension's kernels, which are
    # plain functions of guidg_fast._C (no dispatcher operators of their own)
    for op in ("guidg_fast::multi_expert_loss", "guidg_fast::multi_expert_loss_backward"):
        assert op in ran, f"{op} did not run: {sorted(n for n in ran if 'guidg' in n)}"


def test_extension_kernels_registered_when_required():
    if require_ext():
        assert "ext" in _backend.available("multi_expert_loss", "cpu")
        assert ops.choose("multi_expert_loss", torch.device("cpu")) in ("ext", "triton")
    elif not EXT_BUILT:
        pytest.skip("guidg_fast._C not built")


def test_bad_inputs_name_the_argument():
    f, T, y, w = _inputs(4, 3, 5, 6, False)
    with pytest.raises(ValueError, match=r"^margin must be a finite number"):
        ops.multi_expert_loss(f, T, y, w, 10.0, margin=float("nan"))
    with pytest.raises(ValueError, match=r"^entropy_weight must be a finite number"):
        ops.multi_expert_loss(f, T, y, w, 10.0, entropy_weight="0.1")
    with pytest.raises(ValueError, match=r"^temperature must be a scalar"):
        ops.multi_expert_loss(f, T, y, w, torch.ones(2))
    with pytest.raises(ValueError, match=r"^y must hold class indices"):
        ops.multi_expert_loss(f, T, y + 5, w, 10.0)
    # the static checks used while tracing under torch.compile (no reads of tensor values)
    from guidg_fast import _checks

    with pytest.raises(ValueError, match=r"^w \(per-sample weights\) must have shape \(4, 3\)"):
        _checks.check_multi_expert_loss_args(f, T, y, torch.rand(4, 2), 1.0, 0.0, 0.0, check_values=False)
    with pytest.raises(ValueError, match=r"^y must have shape \(4,\)"):
        _checks.check_multi_expert_loss_args(f, T, y[:3], w, 1.0, 0.0, 0.0, check_values=False)
    with pytest.raises(ValueError, match=r"^y must be an int64"):
        _checks.check_multi_expert_loss_args(f, T, y.float(), w, 1.0, 0.0, 0.0, check_values=False)


@pytest.mark.skipif(not EXT_BUILT, reason="guidg_fast._C not built")
def test_ext_kernel_checks_labels_and_weights():
    # the CPU kernel checks the values itself (under torch.compile ops.multi_expert_loss leaves the
    # data-reading checks to it): ValueErrors worded as guidg_fast._checks words them
    f, T, y, w = _inputs(4, 2, 5, 6, False)
    op = _backend.load_extension().multi_expert_loss_forward
    with pytest.raises(ValueError, match=r"^y must hold class indices in \[0, 5\)"):
        op(f.detach(), T.detach(), y + 5, w.detach(), 1.0, 0.0, 0.0, False)
    with pytest.raises(ValueError, match=r"^y must hold class indices in \[0, 5\)"):
        op(f.detach(), T.detach(), y - 6, w.detach(), 1.0, 0.0, 0.0, False)
    for bad in (float("nan"), float("inf")):
        w_bad = w.detach().clone()
        w_bad[1] = bad
        with pytest.raises(ValueError, match=r"^w contains NaN or Inf values"):
            op(f.detach(), T.detach(), y, w_bad, 1.0, 0.0, 0.0, False)
    w_rows = torch.rand(4, 2, dtype=torch.float64)
    w_rows[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^w contains NaN or Inf values"):
        op(f.detach().double(), T.detach().double(), y, w_rows, 1.0, 0.0, 0.0, False)


def _opcheck_backends():
    return [b for b in ("ext", "triton") if b in _backend.available("multi_expert_loss", "cpu")]


@pytest.mark.parametrize("margin,ew", [(0.3, 0.0), (0.0, 0.05)])
def test_opcheck(margin, ew):
    backends = _opcheck_backends()
    if not backends:
        pytest.skip("no fused backend on CPU here")
    f, T, y, w = _inputs(5, 2, 6, 16, True)
    for backend in backends:
        tau = torch.tensor(10.0)
        torch.library.opcheck(mel_module.fused_multi_expert_loss, (f, T, y, w, 10.0, None, margin, ew, backend, ew == 0.0))
        torch.library.opcheck(mel_module.fused_multi_expert_loss, (f, T, y, w, 1.0, tau, margin, ew, backend, ew == 0.0))
        fwd = mel_module.fused_multi_expert_loss(f, T, y, w, 10.0, None, margin, ew, backend, ew == 0.0)
        grad = torch.ones((), dtype=f.dtype)
        args = (grad, f.detach(), T.detach(), y, w.detach(), *[x.detach() for x in fwd[1:]], 10.0, None, margin, ew, backend)
        torch.library.opcheck(mel_module.fused_multi_expert_loss_backward, args + (True, True, True))


def test_torch_compile_training_step_has_no_graph_break():
    """A step-2-like training step (encoder -> normalise -> expert weights -> loss) under inductor."""
    if not _opcheck_backends():
        pytest.skip("no fused backend on CPU here")
    torch._dynamo.reset()
    B, K, C, D, E = 6, 3, 11, 16, 10
    torch.manual_seed(0)
    encoder = torch.nn.Linear(E, D)
    attn_logits = torch.nn.Parameter(torch.randn(B, K))
    T = F.normalize(torch.randn(K, C, D), dim=-1).requires_grad_()
    x = torch.randn(B, E)
    y = torch.randint(0, C, (B,))

    logit_scale = torch.tensor(30.0).log()  # frozen, as CLIP's; tau = logit_scale.exp() is a tensor

    def step(x, y, T):
        f = F.normalize(encoder(x), dim=-1)
        w = attn_logits.softmax(dim=-1)  # per-sample expert weights
        return ops.multi_expert_loss(f, T, y, w, logit_scale.exp(), margin=0.3, entropy_weight=0.01)

    explanation = torch._dynamo.explain(step)(x, y, T)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    params = [encoder.weight, encoder.bias, attn_logits, T]
    eager = step(x, y, T)
    eager_grads = torch.autograd.grad(eager, params)
    with torch.no_grad():
        f = F.normalize(encoder(x), dim=-1)
    ref_loss = reference.multi_expert_loss(f, T, y, attn_logits.softmax(-1), logit_scale.exp(), margin=0.3,
                                          entropy_weight=0.01)
    assert_close(eager, ref_loss, "eager loss")
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    loss = compiled(x, y, T)
    grads = torch.autograd.grad(loss, params)
    assert_close(loss, eager, "compiled loss")
    for name, got, want in zip(["encoder.weight", "encoder.bias", "attn_logits", "T"], grads, eager_grads):
        assert_close(got, want, f"compiled grad {name}")


@cuda_only
@pytest.mark.parametrize("backend", ["ext", "triton"])
@pytest.mark.parametrize("margin,ew", CONFIGS, ids=[f"m{m}-e{e}" for m, e in CONFIGS])
def test_cuda_matches_reference(backend, margin, ew):
    if backend not in _backend.available("multi_expert_loss", "cuda"):
        pytest.skip(f"{backend} cannot run on CUDA here")
    for per_sample in (False, True):
        for shape in SHAPES["cuda"]:
            _check_against_reference(backend, shape, per_sample, margin, ew, tau=50.0, device="cuda")


@cuda_only
def test_cuda_default_backend_float64_and_bf16():
    f, T, y, w = _inputs(36, 3, 200, 512, False, dtype=torch.float64, device="cuda")
    loss, grads = _loss_and_grads(ops, f, T, y, w, 100.0, 0.3, 0.0)
    ref_loss, ref_grads = _loss_and_grads(reference, f, T, y, w, 100.0, 0.3, 0.0)
    assert_close(loss, ref_loss, "loss fp64", tol=1e-10)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, "grad fp64", tol=1e-10)
    fb, Tb, wb = (x.detach().bfloat16().requires_grad_() for x in (f, T, w))
    lb = ops.multi_expert_loss(fb, Tb, y, wb, 100.0, margin=0.3)
    grads_b = torch.autograd.grad(lb, (fb, Tb, wb))
    exact = [x.detach().float().requires_grad_() for x in (fb, Tb, wb)]
    exact_loss = reference.multi_expert_loss(exact[0], exact[1], y, exact[2], 100.0, margin=0.3)
    eager = [x.detach().requires_grad_() for x in (fb, Tb, wb)]
    eager_loss = reference.multi_expert_loss(eager[0], eager[1], y, eager[2], 100.0, margin=0.3)
    assert_low_precision_close(lb, eager_loss, exact_loss, "loss bf16")
    for name, got, e, x in zip("fTw", grads_b, torch.autograd.grad(eager_loss, eager),
                               torch.autograd.grad(exact_loss, exact)):
        assert_low_precision_close(got, e, x, f"grad {name} bf16")


@pytest.mark.skipif(not EXT_BUILT, reason="guidg_fast._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "per_sample"])
@pytest.mark.parametrize("margin", [0.0, 0.3])
def test_cpu_many_classes_split_forward(dtype, per_sample, margin, monkeypatch):
    # one expert's features above 1 MB (C * D * 4 bytes): the CPU forward that keeps o runs
    # (expert, row block, class split) tasks and merges the splits; with T requiring grad the
    # backward also sweeps the classes again against its lse
    monkeypatch.setenv("GUIDG_FAST_POISON", "1")
    torch.manual_seed(5)
    f, T, y, w = _inputs(5, 2, 2100, 128, per_sample, dtype=dtype)
    y[0], y[1] = 0, 2099  # first and last class: the targets sit in the first and the last split
    loss, grads = _loss_and_grads(ops, f, T, y, w, 100.0, margin, 0.0, backend="ext")
    ref_loss, ref_grads = _loss_and_grads(reference, f, T, y, w, 100.0, margin, 0.0)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert_close(loss, ref_loss, "loss", tol=tol)
    for name, g, r in zip(("df", "dT", "dw"), grads, ref_grads):
        assert_close(g, r, name, tol=tol)
