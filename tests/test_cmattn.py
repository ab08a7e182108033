"""cmattn (cross-modal attention): every fused backend against the eager reference, forward and every
gradient, cosine and dot product, odd shapes, poisoned outputs, torch.compile and opcheck."""
import pytest
import torch
import torch.nn.functional as F

import guidg_fast as gf
from guidg_fast import ops, reference
from guidg_fast.ops import _backend
from backends import cpu_backends, cuda_only, run_sm90_compile
from conftest import assert_close, assert_low_precision_close

NAMES = ("f", "T", "wv", "bv", "wt", "bt")
METRICS = ("cosine", "dotproduct")
# (B, K, C, D, H): B = 1, K = 1, C = 1, D off every block size, B over one Triton batch block,
# K padded to the next power of two, D across two Triton D-blocks
SMALL_SHAPES = [(6, 3, 7, 40, 4), (7, 2, 9, 130, 8), (1, 1, 1, 17, 1), (5, 2, 3, 33, 2), (3, 5, 1, 130, 3),
                (17, 3, 4, 24, 2)]
# the real step-2 shape, C = 1000 (ImageNet) and a batch big enough for the C++ kernels to split work
# across threads: C++ only, the Triton interpreter is too slow there
LARGE_SHAPES = [(36, 3, 65, 512, 4), (9, 3, 1000, 96, 4), (300, 3, 5, 512, 4)]
SHAPES = [pytest.param(s, id="x".join(map(str, s))) for s in SMALL_SHAPES + LARGE_SHAPES]


def _inputs(shape, dtype=torch.float32, device="cpu", grad_features=True):
    B, K, C, D, H = shape
    f = F.normalize(torch.randn(B, D, dtype=dtype), dim=-1)
    T = F.normalize(torch.randn(K, C, D, dtype=dtype), dim=-1)
    wv = (torch.rand(H, D, D, dtype=dtype) * 2 - 1) / D**0.5
    bv = (torch.rand(H, D, dtype=dtype) * 2 - 1) / D**0.5
    wt = (torch.rand(H, C, dtype=dtype) * 2 - 1) * 3 / C**0.5
    bt = (torch.rand(H, dtype=dtype) * 2 - 1) / C**0.5
    args = [x.to(device) for x in (f, T, wv, bv, wt, bt)]
    return [x.requires_grad_(grad_features or i >= 2) for i, x in enumerate(args)]


def _forward_backward(fn, args, metric, grad_out):
    args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    out = fn(*args, metric=metric)
    wanted = [a for a in args if a.requires_grad]
    grads = dict(zip([n for n, a in zip(NAMES, args) if a.requires_grad], torch.autograd.grad(out, wanted, grad_out)))
    return out, grads


def _check_parity(out, grads, ref_out, ref_grads, metric, tol=1e-5):
    assert_close(out, ref_out, "out", tol=tol)
    assert grads.keys() == ref_grads.keys()
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for name, ref in ref_grads.items():
        if metric == "dotproduct" and name == "bt":
            # d(q.key)/d bt = sum(q) is the same for every expert, and softmax is shift invariant: this
            # gradient is exactly 0 in exact arithmetic, so both sides hold only rounding noise.
            assert float(ref.abs().max()) < 1e-5 * max(scale, 1e-6)
            assert float((grads[name] - ref).abs().max()) < 1e-5 * max(scale, 1e-6), name
            continue
        assert_close(grads[name], ref, f"grad {name}", tol=tol)


def _run_parity(backend, shape, metric, device="cpu", grad_features=True, args=None):
    args = args if args is not None else _inputs(shape, device=device, grad_features=grad_features)
    grad_out = torch.randn(shape[0], shape[1], device=device)
    ref_out, ref_grads = _forward_backward(reference.cross_modal_attention, args, metric, grad_out)
    with ops.use_backend(backend):
        out, grads = _forward_backward(ops.cross_modal_attention, args, metric, grad_out)
    _check_parity(out, grads, ref_out, ref_grads, metric)


@pytest.mark.parametrize("backend", cpu_backends("cmattn"))
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", SHAPES)
def test_cmattn_matches_reference(backend, metric, shape, monkeypatch):
    if backend == "triton" and shape in LARGE_SHAPES:
        pytest.skip("large shapes run on the C++ backend only (the Triton interpreter is slow)")
    monkeypatch.setenv("GUIDG_FAST_POISON", "1")  # every kernel output starts as NaN
    _run_parity(backend, shape, metric)


@pytest.mark.parametrize("backend", cpu_backends("cmattn"))
@pytest.mark.parametrize("metric", METRICS)
def test_cmattn_parameters_only(backend, metric, monkeypatch):
    # the training case: f and T detached, only the attention parameters get gradients
    monkeypatch.setenv("GUIDG_FAST_POISON", "1")
    _run_parity(backend, (6, 3, 5, 40, 4), metric, grad_features=False)


@pytest.mark.parametrize("backend", cpu_backends("cmattn"))
def test_cmattn_zero_norms_follow_torch_cosine(backend, monkeypatch):
    # q_{b,0} = 0 (head 0 projects to zero) and key_{h,0} = 0 (expert 0's text features are zero, no
    # bias): cosine's eps clamp and its zero-norm gradient rule must match F.cosine_similarity
    monkeypatch.setenv("GUIDG_FAST_POISON", "1")
    shape = (4, 3, 5, 24, 3)
    args = _inputs(shape)
    with torch.no_grad():
        args[1][0].zero_()
        args[2][0].zero_()
        args[3][0].zero_()
        args[5].zero_()
    _run_parity(backend, shape, "cosine", args=args)


def test_cmattn_backward_skips_unneeded_gradients():
    if "ext" not in _backend.available("cmattn", "cpu"):
        pytest.skip("guidg_fast._C not built")
    args = _inputs((3, 2, 4, 8, 2))
    out, q, keys = torch.ops.guidg_fast.cmattn(*args, "cosine", "ext")
    grads = torch.ops.guidg_fast.cmattn_backward(
        torch.ones_like(out), args[0], args[1], args[2], args[4], q, keys, "cosine", "ext",
        [False, False, True, True, True, True],
    )
    assert [tuple(g.shape) for g in grads] == [(0,), (0,), (2, 8, 8), (2, 8), (2, 4), (2,)]


@pytest.mark.parametrize("backend", cpu_backends("cmattn"))
@pytest.mark.parametrize("metric", METRICS)
def test_cross_modal_attention_module_matches_reference(backend, metric):
    B, K, C, D, H = 7, 3, 6, 40, 4
    attn = gf.CrossModalAttention(D, num_classes=C, num_heads=H, metric=metric)
    f = F.normalize(torch.randn(B, D), dim=-1).requires_grad_()
    T = F.normalize(torch.randn(K, C, D), dim=-1).requires_grad_()
    grad_out = torch.randn(B, K)
    expected = reference.cross_modal_attention(f.detach(), T.detach(), *attn.stacked_parameters(), metric=metric)
    ref_grads = torch.autograd.grad(expected, list(attn.parameters()), grad_out)
    with ops.use_backend(backend):
        w = attn(f, T)
    grads = torch.autograd.grad(w, list(attn.parameters()), grad_out, retain_graph=True)
    assert_close(w, expected, "out")
    for (name, _), g, r in zip(attn.named_parameters(), grads, ref_grads):
        if metric == "dotproduct" and name == "bt":  # exactly 0 in exact math (a shift of every key)
            assert float((g - r).abs().max()) < 1e-6
            continue
        assert_close(g, r, name)
    w.sum().backward()
    assert f.grad is None and T.grad is None


@pytest.mark.parametrize("backend", cpu_backends("cmattn"))
@pytest.mark.parametrize("metric", METRICS)
def test_cmattn_gradcheck_float64(backend, metric):
    # the interpreter is slow: Triton gets fewer elements and gradcheck's random-projection mode
    shape, fast = ((3, 3, 4, 6, 2), False) if backend == "ext" else ((2, 3, 2, 5, 2), True)
    args = _inputs(shape, dtype=torch.float64)
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda *a: ops.cross_modal_attention(*a, metric=metric), args, fast_mode=fast
        )


@pytest.mark.parametrize("backend", cpu_backends("cmattn"))
def test_cmattn_bfloat16_matches_float32(backend):
    # bf16 inputs compute in fp32 and cast back: the output and every gradient are judged against the
    # fp32 reference on the same (bf16-rounded) values, relative to the eager reference's own bf16
    # error (flash-attention's rule: within 3x of it, plus one bf16 ulp of the largest value)
    args = _inputs((5, 3, 7, 32, 4), dtype=torch.bfloat16)
    grad_out = torch.randn(5, 3).bfloat16()
    with ops.use_backend(backend):
        out, grads = _forward_backward(ops.cross_modal_attention, args, "cosine", grad_out)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads.values())
    exact_out, exact = _forward_backward(reference.cross_modal_attention, [a.float() for a in args], "cosine",
                                         grad_out.float())
    eager_out, eager = _forward_backward(reference.cross_modal_attention, args, "cosine", grad_out)
    assert_low_precision_close(out, eager_out, exact_out, "out")
    for name in NAMES:
        assert_low_precision_close(grads[name], eager[name], exact[name], f"grad {name}")


@pytest.mark.parametrize("backend", cpu_backends("cmattn"))
def test_opcheck_fused_cmattn(backend):
    for metric in METRICS:
        args = _inputs((3, 2, 4, 20, 2))
        torch.library.opcheck(torch.ops.guidg_fast.cmattn.default, (*args, metric, backend))
        out, q, keys = torch.ops.guidg_fast.cmattn(*[a.detach() for a in args], metric, backend)
        bwd_args = (torch.randn_like(out), args[0].detach(), args[1].detach(), args[2].detach(), args[4].detach(),
                    q, keys, metric, backend, [True, False, True, True, False, True])
        torch.library.opcheck(torch.ops.guidg_fast.cmattn_backward.default, bwd_args)


@pytest.mark.skipif("ext" not in _backend.available("cmattn", "cpu"), reason="guidg_fast._C not built")
def test_cpu_kernels_reject_other_q_strides():
    q = torch.randn(4, 3, 8).transpose(0, 1)
    with pytest.raises(RuntimeError, match="q must be contiguous"):
        _backend.load_extension().cmattn_forward(q, torch.randn(2, 4, 8), True)


@pytest.mark.skipif("ext" not in _backend.available("cmattn", "cpu"), reason="guidg_fast._C not built")
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_cmattn_cpu_isa_paths_match_reference(isa, monkeypatch):
    # the head loops' AVX2 and baseline builds (cpu_isa.h), at the step-2 shape and an odd one
    monkeypatch.setenv("GUIDG_FAST_POISON", "1")
    with _backend.cpu_isa_cap(isa):
        for shape in ((36, 3, 65, 512, 4), (7, 2, 9, 130, 8)):
            for metric in METRICS:
                _run_parity("ext", shape, metric)


def test_cmattn_compiles_without_graph_breaks():
    # a training step as step 2 runs it: detached features, loss weighted by the expert weights
    B, K, C, D, H = 5, 3, 7, 24, 2
    attn = gf.CrossModalAttention(D, C, num_heads=H)
    f = F.normalize(torch.randn(B, D), dim=-1)
    T = F.normalize(torch.randn(K, C, D), dim=-1)
    per_expert_loss = torch.rand(B, K)

    def step(f, T):
        return (attn(f, T) * per_expert_loss).sum()

    explained = torch._dynamo.explain(step)(f, T)
    assert explained.graph_break_count == 0, explained.break_reasons
    if ops.choose("cmattn", torch.device("cpu")) != "eager":
        assert "torch.ops.guidg_fast.cmattn(" in "".join(g.code for g in explained.graphs)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    loss = compiled(f, T)
    loss.backward()
    grads = [p.grad.clone() for p in attn.parameters()]
    attn.zero_grad()
    eager_loss = step(f, T)
    eager_loss.backward()
    assert_close(loss, eager_loss, "loss")
    for (name, p), g in zip(attn.named_parameters(), grads):
        assert_close(g, p.grad, name)


def test_cmattn_bad_inputs():
    f, T, wv, bv, wt, bt = (a.detach() for a in _inputs((3, 2, 4, 8, 2)))
    with pytest.raises(ValueError, match="wv"):
        ops.cross_modal_attention(f, T, wv[:, :4], bv, wt, bt)
    with pytest.raises(ValueError, match="wt"):
        ops.cross_modal_attention(f, T, wv, bv, wt[:, :3], bt)
    with pytest.raises(ValueError, match="bv"):
        ops.cross_modal_attention(f, T, wv, bv.double(), wt, bt)
    with pytest.raises(ValueError, match="T"):
        ops.cross_modal_attention(f, T[..., :5], wv, bv, wt, bt)
    with pytest.raises(ValueError, match="metric"):
        ops.cross_modal_attention(f, T, wv, bv, wt, bt, metric="euclidean")


def test_cmattn_forced_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with ops.use_backend("triton"):
        with pytest.raises(RuntimeError, match="cannot run cmattn"):
            ops.cross_modal_attention(*_inputs((2, 2, 3, 8, 1)))


# The interpreter does not lower kernels to GPU code: compile both for sm_90 ahead of time (no GPU
# needed), so type and layout errors that only the real compiler sees fail here, not on a GPU run.
_CMATTN_SM90 = r"""
from guidg_fast.kernels import cmattn as kernels
for acc, ptr, cosine in ((tl.float32, "*fp32", True), (tl.float64, "*fp64", False)):
    for kern, ptrs in ((kernels._cmattn_forward_kernel, 3), (kernels._cmattn_backward_kernel, 5)):
        consts = dict(COSINE=cosine, SQRT_D=512 ** 0.5, EPS=kernels.COSINE_EPS, BLOCK_B=16, BLOCK_K=4,
                      BLOCK_D=128, ACC=acc)
        runtime = [n for n in kern.arg_names if n not in consts]
        compile_sm90(kern, {n: (ptr if i < ptrs else "i32") for i, n in enumerate(runtime)}, consts, num_warps=4)
print("compiled")
"""


def test_cmattn_triton_kernels_compile_for_gpu(tmp_path):
    run_sm90_compile(_CMATTN_SM90, tmp_path)


@cuda_only
@pytest.mark.parametrize("backend", ["triton", "ext"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", SMALL_SHAPES + LARGE_SHAPES + [(36, 3, 1000, 512, 4)])
def test_cmattn_cuda_matches_reference(backend, metric, shape, monkeypatch):
    if backend not in _backend.available("cmattn", "cuda"):
        pytest.skip(f"{backend} cannot run cmattn on CUDA here")
    monkeypatch.setenv("GUIDG_FAST_POISON", "1")
    # fp32 parity on GPU: keep cuBLAS off tf32 in the reference and the fast path alike
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    _run_parity(backend, shape, metric, device="cuda")
