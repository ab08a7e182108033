"""ensemble_logits: every fused backend against the reference, forward and all gradients.

The oracle is guidg_fast.reference run in float64 on the same values, so the fp32 tolerance measures
the fused kernels' own error. Outputs are poisoned (GUIDG_FAST_POISON=1: NaN-filled before a kernel
runs), so an element a kernel does not write fails the finite check in assert_close.
"""
import pytest
import torch
import torch.nn.functional as F

from guidg_fast import ops, reference
from guidg_fast.ops import _backend
from backends import cpu_backends, cuda_only, run_sm90_compile
from conftest import assert_close

TAU = 100.0

# (B, K, C, D): a real shape, odd shapes (B=1, K=1, C=1, odd D), and C=1000 for the C++ kernels
EXT_SHAPES = [(36, 3, 65, 512), (1, 1, 1, 17), (5, 3, 7, 33), (3, 2, 1000, 31), (36, 3, 1000, 512), (97, 2, 11, 40)]
# the Triton interpreter is slow: small shapes, still crossing every tile edge (B > 16, C > 32, D > 64)
TRITON_SHAPES = [(1, 1, 1, 17), (5, 3, 7, 33), (20, 2, 40, 70)]


def _shapes(backend):
    return EXT_SHAPES if backend == "ext" else TRITON_SHAPES


def _inputs(B, K, C, D, per_sample, dtype=torch.float32, device="cpu"):
    f = F.normalize(torch.randn(B, D, dtype=dtype, device=device), dim=-1)
    T = F.normalize(torch.randn(K, C, D, dtype=dtype, device=device), dim=-1)
    w = torch.softmax(torch.randn(B, K) if per_sample else torch.randn(K), dim=-1).to(dtype=dtype, device=device)
    return f, T, w


def _run(fn, f, T, w, grad, need=(True, True, True)):
    leaves = [x.detach().clone().requires_grad_(n) for x, n in zip((f, T, w), need)]
    out = fn(*leaves, TAU)
    out.backward(grad)
    return out, [x.grad for x in leaves]


def _check(backend, f, T, w, need=(True, True, True), tol=1e-5):
    grad = torch.randn(f.shape[0], T.shape[1], dtype=f.dtype, device=f.device)
    ref_out, ref_grads = _run(reference.ensemble_logits, f.double(), T.double(), w.double(), grad.double(), need)
    with ops.use_backend(backend):
        out, grads = _run(ops.ensemble_logits, f, T, w, grad, need)
    assert out.dtype == f.dtype
    assert_close(out, ref_out, "output", tol=tol)
    for name, g, r, n in zip(("grad f", "grad T", "grad w"), grads, ref_grads, need):
        if n:
            assert_close(g, r, name, tol=tol)
        else:
            assert g is None


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setenv("GUIDG_FAST_POISON", "1")


@pytest.mark.parametrize("backend", cpu_backends("ensemble_logits"))
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "per_sample"])
def test_ensemble_logits_matches_reference(backend, per_sample, poison):
    for shape in _shapes(backend):
        _check(backend, *_inputs(*shape, per_sample))


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_ensemble_logits_ext_mix_then_gemm_path(poison, isa):
    # float32 batch weights take a fused AVX-512 tile path where the CPU has it; check the portable
    # path (mix, then one GEMM) too, with its AVX2 and baseline row loops
    if "ext" not in _backend.available("ensemble_logits", "cpu"):
        pytest.skip("guidg_fast._C not built")
    with _backend.cpu_isa_cap(isa):
        for shape in EXT_SHAPES:
            _check("ext", *_inputs(*shape, per_sample=False))


@pytest.mark.parametrize("backend", cpu_backends("ensemble_logits"))
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "per_sample"])
@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True), (True, False, True)],
                         ids=["f", "T", "w", "f+w"])
def test_ensemble_logits_partial_gradients(backend, per_sample, need, poison):
    # e.g. step 2 freezes T: the kernels skip the gradients nobody asked for
    _check(backend, *_inputs(5, 3, 7, 33, per_sample), need=need)


@pytest.mark.parametrize("backend", cpu_backends("ensemble_logits"))
def test_ensemble_logits_low_precision_inputs(backend):
    f, T, w = _inputs(6, 3, 20, 48, per_sample=False)
    expected = reference.ensemble_logits(f, T, w, TAU)
    with ops.use_backend(backend):
        out = ops.ensemble_logits(f.bfloat16(), T.bfloat16(), w.bfloat16(), TAU)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), expected, tol=2e-2)


@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "per_sample"])
def test_ensemble_logits_gradcheck_float64(per_sample):
    if "ext" not in _backend.available("ensemble_logits", "cpu"):
        pytest.skip("guidg_fast._C not built")
    f, T, w = (x.requires_grad_() for x in _inputs(3, 2, 5, 7, per_sample, dtype=torch.float64))
    with ops.use_backend("ext"):
        assert torch.autograd.gradcheck(lambda a, b, c: ops.ensemble_logits(a, b, c, 3.0), (f, T, w))


@pytest.mark.parametrize("backend", cpu_backends("ensemble_logits"))
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "per_sample"])
def test_opcheck_ensemble_logits(backend, per_sample):
    f, T, w = _inputs(3, 2, 5, 17, per_sample)
    f.requires_grad_()
    T.requires_grad_()
    torch.library.opcheck(torch.ops.guidg_fast.ensemble_logits.default, (f, T, w, TAU, backend))
    g = torch.randn(3, 5)
    torch.library.opcheck(
        torch.ops.guidg_fast.ensemble_logits_backward.default, (g, f.detach(), T.detach(), w, TAU, backend, True, False, True)
    )


@pytest.mark.parametrize("backend", cpu_backends("ensemble_logits"))
def test_ensemble_logits_compiles_without_graph_break(backend):
    f, T, w = _inputs(4, 3, 6, 20, per_sample=False)
    ws = torch.rand(4, 3)

    def step(f, T, w, ws):
        # inference (batch weights) and a per-sample training-style loss with backward
        logits = ops.ensemble_logits(f, T, w, TAU)
        loss = F.cross_entropy(ops.ensemble_logits(f, T, ws, TAU), torch.arange(4) % 6)
        return logits, loss

    with ops.use_backend(backend):
        explanation = torch._dynamo.explain(step)(f, T, w, ws)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        leaves = [x.clone().requires_grad_() for x in (f, T, w, ws)]
        logits, loss = compiled(*leaves)
        loss.backward()
        eager_leaves = [x.clone().requires_grad_() for x in (f, T, w, ws)]
        e_logits, e_loss = step(*eager_leaves)
        e_loss.backward()
    torch._dynamo.reset()
    assert_close(logits, e_logits, "compiled logits")
    assert_close(loss, e_loss, "compiled loss")
    for name, a, b in zip(("f", "T", "ws"), leaves[:2] + leaves[3:], eager_leaves[:2] + eager_leaves[3:]):
        assert_close(a.grad, b.grad, f"compiled grad {name}")  # (w feeds only the logits, not the loss)


def test_ensemble_logits_ext_kernels_reject_bad_inputs():
    if "ext" not in _backend.available("ensemble_logits", "cpu"):
        pytest.skip("guidg_fast._C not built")
    f, T, w = _inputs(3, 2, 5, 8, per_sample=False)
    with pytest.raises(RuntimeError, match="T must have shape"):
        _backend.load_extension().ensemble_logits_forward(f, T[..., :7].contiguous(), w, TAU)
    with pytest.raises(RuntimeError, match=r"w \(per-sample weights\) must have shape"):
        _backend.load_extension().ensemble_logits_forward(f, T, torch.rand(2, 2), TAU)
    with pytest.raises(RuntimeError, match="f must be contiguous"):
        _backend.load_extension().ensemble_logits_forward(torch.rand(8, 3).t(), T, w, TAU)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        _backend.load_extension().ensemble_logits_backward(torch.rand(3, 4), f, T, w, TAU, True, True, True)


def test_ensemble_logits_bad_inputs():
    f, T, w = _inputs(4, 3, 5, 6, per_sample=False)
    cases = [
        ((f, T, torch.rand(4, 2), TAU), r"^w \(per-sample weights\) must have shape \(4, 3\)"),
        ((f, T, w.double(), TAU), r"^w must have f's dtype"),
        ((f, T.double(), w, TAU), r"^T must have f's dtype"),
        ((f, T, w, 0.0), r"^temperature must be a finite positive"),
        ((f, T, torch.tensor([1.0, float("nan"), 0.0]), TAU), r"^w contains NaN"),
        ((f, T[:, :, :5], w, TAU), r"^T must have shape \(K, C, 6\)"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            ops.ensemble_logits(*args)


def test_forced_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    f, T, w = _inputs(2, 2, 3, 4, per_sample=False)
    with ops.use_backend("triton"):
        with pytest.raises(RuntimeError, match="cannot run ensemble_logits"):
            ops.ensemble_logits(f, T, w, TAU)


_ENSEMBLE_SM90 = r"""
from guidg_fast.kernels import ensemble_logits as k
ints, floats = {"B", "K", "C", "D", "stride_wb"}, {"tau"}
for kernel, flags in ((k._ensemble_logits_forward_kernel, {}),
                      (k._ensemble_logits_backward_kernel, {"STORE_F": True, "STORE_W": True}),
                      (k._ensemble_logits_backward_T_kernel, {"STORE_T": True, "STORE_W": True})):
    for per_sample in (False, True):
        constexprs = {"PER_SAMPLE": per_sample, "ACC": tl.float32, "BLOCK_B": 64, "BLOCK_C": k._BLOCK_C,
                      "BLOCK_D": k._BLOCK_D, **flags}
        signature = {n: "i32" if n in ints else "fp32" if n in floats else "*fp32"
                     for n in kernel.arg_names if n not in constexprs}
        assert compile_sm90(kernel, signature, constexprs, num_warps=4).asm.get("cubin")
print("compiled")
"""


def test_triton_kernels_compile_for_gpu(tmp_path):
    run_sm90_compile(_ENSEMBLE_SM90, tmp_path)


@cuda_only
@pytest.mark.parametrize("backend", ["triton", "ext"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "per_sample"])
def test_ensemble_logits_cuda_matches_reference(backend, per_sample, poison):
    if backend not in _backend.available("ensemble_logits", "cuda"):
        pytest.skip(f"{backend} cannot run on CUDA here")
    for shape in EXT_SHAPES:
        _check(backend, *_inputs(*shape, per_sample, device="cuda"))
