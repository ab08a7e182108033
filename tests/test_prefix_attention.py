"""prefix_attention and eot_project: the eager counterparts against independent loops, every fused
backend against the eager counterparts (output and every gradient), bad inputs, opcheck, compile."""
import math

import pytest
import torch
import torch.nn.functional as F

from guidg_fast import ops
from guidg_fast.ops import _backend
from backends import cpu_backends, cuda_only
from conftest import assert_close

# (K, M, S, P, H, Dh): real text-tower head size, odd sizes, and the degenerate ones (S=1, P=1, M=1, K=1)
ATTN_SHAPES = [
    (3, 5, 8, 17, 8, 64),
    (2, 3, 5, 4, 3, 24),
    (1, 1, 1, 1, 1, 64),
    (1, 4, 1, 3, 2, 24),
    (2, 1, 7, 1, 2, 5),
    (1, 2, 19, 2, 1, 33),
]
# small shapes for the Triton interpreter
ATTN_SHAPES_SMALL = [(2, 3, 5, 4, 2, 24), (1, 1, 1, 1, 1, 64), (1, 2, 17, 18, 1, 16)]  # 2 key tiles each side


def _attn_inputs(shape, dtype=torch.float32, fused_qkv=False, device="cpu"):
    K, M, S, P, H, Dh = shape
    if fused_qkv == "strided_dh":  # the head dimension itself is strided: the kernels must copy
        q, k, v = (torch.randn(K, M, S, Dh, H, dtype=dtype, device=device).transpose(-1, -2) for _ in range(3))
        kp, vp = (torch.randn(K, P, Dh, H, dtype=dtype, device=device).transpose(-1, -2) for _ in range(2))
    elif fused_qkv:  # slices of one (K, M, S, 3, H, Dh) projection output: non-contiguous views
        qkv = torch.randn(K, M, S, 3, H, Dh, dtype=dtype, device=device)
        q, k, v = qkv.unbind(dim=3)
        kvp = torch.randn(K, P, 2, H, Dh, dtype=dtype, device=device)
        kp, vp = kvp.unbind(dim=2)
    else:
        q, k, v = (torch.randn(K, M, S, H, Dh, dtype=dtype, device=device) for _ in range(3))
        kp, vp = (torch.randn(K, P, H, Dh, dtype=dtype, device=device) for _ in range(2))
    # detach() keeps the strides: the fused_qkv leaves stay non-contiguous views
    return [t.detach().requires_grad_(True) for t in (q, k, v, kp, vp)]


def _attn_loop(q, k, v, kp, vp, scale):
    """Independent oracle: one query at a time, keys built by hand."""
    K, M, S, H, Dh = q.shape
    out = []
    for ki in range(K):
        for mi in range(M):
            for s in range(S):
                keys = torch.cat([kp[ki], k[ki, mi, : s + 1]], dim=0)  # (P + s + 1, H, Dh)
                vals = torch.cat([vp[ki], v[ki, mi, : s + 1]], dim=0)
                scores = torch.einsum("jhd,hd->hj", keys, q[ki, mi, s]) * scale
                probs = torch.softmax(scores, dim=-1)
                out.append(torch.einsum("hj,jhd->hd", probs, vals))
    return torch.stack(out).reshape(K, M, S, H, Dh)


def _grads(fn, inputs, grad_out):
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    out.backward(grad_out)
    return out.detach(), [t.grad.detach().clone() for t in inputs]


NAMES = ("q", "k", "v", "k_prefix", "v_prefix")


@pytest.mark.parametrize("shape", [(2, 2, 4, 5, 8, 64), (2, 3, 5, 4, 3, 24), (1, 1, 1, 1, 1, 64), (1, 2, 1, 3, 2, 24)])
def test_prefix_attention_eager_matches_per_query_loop(shape):
    inputs = _attn_inputs(shape, torch.float64)
    scale = 1 / math.sqrt(shape[-1])
    grad_out = torch.randn(inputs[0].shape, dtype=torch.float64)
    out, grads = _grads(lambda *a: ops.prefix_attention_eager(*a), inputs, grad_out)
    want, want_grads = _grads(lambda *a: _attn_loop(*a, scale), inputs, grad_out)
    assert_close(out, want, "out", tol=1e-10)
    for name, g, w in zip(NAMES, grads, want_grads):
        assert_close(g, w, f"grad {name}", tol=1e-10)


def test_prefix_attention_eager_custom_scale_and_views():
    inputs = _attn_inputs((2, 3, 4, 2, 2, 8), torch.float64, fused_qkv=True)
    assert not inputs[0].is_contiguous()
    out = ops.prefix_attention_eager(*inputs, scale=0.3)
    assert_close(out, _attn_loop(*inputs, 0.3), "out", tol=1e-10)


def test_prefix_attention_public_eager_backend():
    inputs = _attn_inputs((2, 3, 4, 2, 2, 8))
    with ops.use_backend("eager"):
        out = ops.prefix_attention(*inputs)
    assert_close(out, ops.prefix_attention_eager(*inputs), "out")


def test_prefix_attention_half_inputs_eager():
    inputs = _attn_inputs((1, 2, 3, 2, 2, 16), torch.bfloat16)
    out = ops.prefix_attention_eager(*inputs)
    assert out.dtype == torch.bfloat16
    want = _attn_loop(*[t.detach().double() for t in inputs], 0.25)
    assert_close(out.float(), want, "out", tol=2e-2)


def test_prefix_attention_bad_inputs():
    q, k, v, kp, vp = (t.detach() for t in _attn_inputs((2, 3, 4, 2, 2, 8)))
    with pytest.raises(ValueError, match="q must be 5-D"):
        ops.prefix_attention(q[0], k, v, kp, vp)
    with pytest.raises(ValueError, match="k must have shape"):
        ops.prefix_attention(q, k[:, :2], v, kp, vp)
    with pytest.raises(ValueError, match="v must have"):
        ops.prefix_attention(q, k, v.double(), kp, vp)
    with pytest.raises(ValueError, match="k_prefix must have shape"):
        ops.prefix_attention(q, k, v, kp[:, :, :1], vp)
    with pytest.raises(ValueError, match="k_prefix must hold P >= 1"):
        ops.prefix_attention(q, k, v, kp[:, :0], vp[:, :0])
    with pytest.raises(ValueError, match="v_prefix must have shape"):
        ops.prefix_attention(q, k, v, kp, vp[:, :1])
    with pytest.raises(ValueError, match="scale must be finite"):
        ops.prefix_attention(q, k, v, kp, vp, scale=float("nan"))
    with pytest.raises(ValueError, match="q must be"):
        ops.prefix_attention(q.long(), k, v, kp, vp)


# ------------------------------------------------------------------------------------------- eot_project

EOT_SHAPES = [(6, 10, 64, 32), (1, 1, 24, 5), (7, 13, 40, 17)]  # (N, S, W, D)


def _eot_inputs(shape, dtype=torch.float32, device="cpu"):
    N, S, W, D = shape
    x = torch.randn(N, S, W, dtype=dtype, device=device)
    eot = torch.randint(0, S, (N,), device=device)
    w = 1 + 0.3 * torch.randn(W, dtype=dtype, device=device)
    b = 0.1 * torch.randn(W, dtype=dtype, device=device)
    proj = torch.randn(W, D, dtype=dtype, device=device) / math.sqrt(W)
    return [t.requires_grad_(True) for t in (x, w, b, proj)], eot


def _eot_loop(x, eot, w, b, proj, eps):
    rows = []
    for n in range(x.shape[0]):
        r = x[n, int(eot[n])]
        mu = r.mean()
        var = ((r - mu) ** 2).mean()
        y = (r - mu) / torch.sqrt(var + eps) * w + b
        z = y @ proj
        rows.append(z / torch.sqrt((z * z).sum()))
    return torch.stack(rows)


@pytest.mark.parametrize("shape", EOT_SHAPES)
def test_eot_project_eager_matches_loop(shape):
    (x, w, b, proj), eot = _eot_inputs(shape, torch.float64)
    g = torch.randn(shape[0], shape[3], dtype=torch.float64)
    inputs = [x, w, b, proj]
    out, grads = _grads(lambda x, w, b, p: ops.eot_project_eager(x, eot, w, b, p), inputs, g)
    want, want_grads = _grads(lambda x, w, b, p: _eot_loop(x, eot, w, b, p, 1e-5), inputs, g)
    assert_close(out, want, "out", tol=1e-10)
    for name, a, e in zip(("x", "ln_weight", "ln_bias", "proj"), grads, want_grads):
        assert_close(a, e, f"grad {name}", tol=1e-10)
    # only the EOT rows of x receive gradient
    mask = torch.zeros(shape[:2], dtype=torch.bool)
    mask[torch.arange(shape[0]), eot] = True
    assert (grads[0][~mask] == 0).all()


def test_eot_project_public_eager_backend():
    (x, w, b, proj), eot = _eot_inputs((4, 6, 16, 8))
    with ops.use_backend("eager"):
        out = ops.eot_project(x, eot, w, b, proj)
    assert_close(out, ops.eot_project_eager(x, eot, w, b, proj), "out")
    assert_close(out.norm(dim=-1), torch.ones(4), "row norms")


def test_eot_project_bad_inputs():
    (x, w, b, proj), eot = _eot_inputs((4, 6, 16, 8))
    x, w, b, proj = (t.detach() for t in (x, w, b, proj))
    with pytest.raises(ValueError, match="x must be 3-D"):
        ops.eot_project(x[0], eot, w, b, proj)
    with pytest.raises(ValueError, match="eot_index must be an int64"):
        ops.eot_project(x, eot.float(), w, b, proj)
    with pytest.raises(ValueError, match="eot_index must have shape"):
        ops.eot_project(x, eot[:2], w, b, proj)
    with pytest.raises(ValueError, match=r"eot_index must hold row indices in \[0, 6\)"):
        ops.eot_project(x, torch.full((4,), 6), w, b, proj)
    with pytest.raises(ValueError, match="ln_weight must have shape"):
        ops.eot_project(x, eot, w[:3], b, proj)
    with pytest.raises(ValueError, match="ln_bias must have"):
        ops.eot_project(x, eot, w, b.double(), proj)
    with pytest.raises(ValueError, match="proj must have shape"):
        ops.eot_project(x, eot, w, b, proj.t())
    with pytest.raises(ValueError, match="eps must be"):
        ops.eot_project(x, eot, w, b, proj, eps=0.0)


# ------------------------------------------------------------------------------------- fused backends


@pytest.fixture
def poison(monkeypatch):
    """Kernels allocate their outputs filled with NaN: an element a kernel forgets to write fails."""
    monkeypatch.setenv("GUIDG_FAST_POISON", "1")


def _attn_shapes(backend):
    return ATTN_SHAPES_SMALL if backend == "triton" else ATTN_SHAPES


@pytest.mark.parametrize("backend", cpu_backends("prefix_attention"))
@pytest.mark.parametrize("fused_qkv", [False, True, "strided_dh"], ids=["dense", "qkv_views", "strided_dh"])
def test_prefix_attention_fused_matches_eager(backend, fused_qkv, poison):
    for shape in _attn_shapes(backend):
        inputs = _attn_inputs(shape, fused_qkv=fused_qkv)
        grad_out = torch.randn(inputs[0].shape)
        with ops.use_backend(backend):
            out, grads = _grads(ops.prefix_attention, inputs, grad_out)
        want, want_grads = _grads(ops.prefix_attention_eager, inputs, grad_out)
        assert_close(out, want, f"out {shape}")
        for name, g, w in zip(NAMES, grads, want_grads):
            assert_close(g, w, f"grad {name} {shape}")


def test_prefix_attention_ext_portable_clone(poison):
    """The C++ CPU kernels are compiled for AVX2 and for the baseline ISA; run the baseline one too."""
    if "ext" not in _backend.available("prefix_attention", "cpu"):
        pytest.skip("guidg_fast._C has no prefix_attention kernel")
    with _backend.cpu_isa_cap("baseline"):
        _check_portable_clone()


def _check_portable_clone():
    for shape in (ATTN_SHAPES[1], ATTN_SHAPES[4], ATTN_SHAPES[5]):
        inputs = _attn_inputs(shape, fused_qkv=True)
        grad_out = torch.randn(inputs[0].shape)
        with ops.use_backend("ext"):
            out, grads = _grads(ops.prefix_attention, inputs, grad_out)
        want, want_grads = _grads(ops.prefix_attention_eager, inputs, grad_out)
        assert_close(out, want, f"out {shape}")
        for name, g, w in zip(NAMES, grads, want_grads):
            assert_close(g, w, f"grad {name} {shape}")


@pytest.mark.parametrize("backend", cpu_backends("prefix_attention"))
def test_prefix_attention_fused_large_scores_and_scale(backend, poison):
    shape = (1, 2, 5, 3, 2, 16)
    inputs = [(t.detach() * 3).requires_grad_(True) for t in _attn_inputs(shape)]
    grad_out = torch.randn(inputs[0].shape)
    with ops.use_backend(backend):
        out, grads = _grads(lambda *a: ops.prefix_attention(*a, scale=0.7), inputs, grad_out)
    want, want_grads = _grads(lambda *a: ops.prefix_attention_eager(*a, scale=0.7), inputs, grad_out)
    assert_close(out, want, "out")
    for name, g, w in zip(NAMES, grads, want_grads):
        assert_close(g, w, f"grad {name}")
    # scores in the thousands: exp() overflows unless the running max is subtracted
    huge = [t.detach() * 20 for t in inputs]
    with ops.use_backend(backend):
        out = ops.prefix_attention(*huge)
    assert_close(out, ops.prefix_attention_eager(*[t.double() for t in huge]), "out (huge scores)")


@pytest.mark.parametrize("backend", cpu_backends("prefix_attention"))
def test_prefix_attention_fused_bf16_inputs(backend):
    inputs = _attn_inputs((1, 2, 3, 2, 2, 16), torch.bfloat16)
    with ops.use_backend(backend):
        out = ops.prefix_attention(*inputs)
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and inputs[3].grad.dtype == torch.bfloat16
    want = ops.prefix_attention_eager(*[t.detach().double() for t in inputs])
    assert_close(out.float(), want, "out", tol=2e-2)


def test_prefix_attention_ext_float64_gradcheck():
    if "ext" not in _backend.available("prefix_attention", "cpu"):
        pytest.skip("guidg_fast._C has no prefix_attention kernel")
    inputs = _attn_inputs((2, 2, 3, 2, 2, 5), torch.float64)
    with ops.use_backend("ext"):
        assert torch.autograd.gradcheck(ops.prefix_attention, inputs)


def test_prefix_attention_opcheck():
    if "ext" not in _backend.available("prefix_attention", "cpu"):
        pytest.skip("guidg_fast._C has no prefix_attention kernel")
    q, k, v, kp, vp = _attn_inputs((2, 3, 4, 2, 2, 8))
    torch.library.opcheck(torch.ops.guidg_fast.prefix_attention.default, (q, k, v, kp, vp, 0.3, "ext"))
    q, k, v, kp, vp = (t.detach() for t in (q, k, v, kp, vp))
    out, lse = _backend.load_extension().prefix_attention_forward(q, k, v, kp, vp, 0.3)
    args = (torch.randn_like(out), q, k, v, kp, vp, out, lse, 0.3)
    torch.library.opcheck(torch.ops.guidg_fast.prefix_attention_backward.default, (*args, "ext"))


@pytest.mark.parametrize("backend", cpu_backends("eot_project"))
def test_eot_project_fused_matches_eager(backend, poison):
    for shape in EOT_SHAPES:
        (x, w, b, proj), eot = _eot_inputs(shape)
        g = torch.randn(shape[0], shape[3])
        inputs = [x, w, b, proj]
        with ops.use_backend(backend):
            out, grads = _grads(lambda x, w, b, p: ops.eot_project(x, eot, w, b, p), inputs, g)
        want, want_grads = _grads(lambda x, w, b, p: ops.eot_project_eager(x, eot, w, b, p), inputs, g)
        assert_close(out, want, f"out {shape}")
        for name, a, e in zip(("x", "ln_weight", "ln_bias", "proj"), grads, want_grads):
            assert_close(a, e, f"grad {name} {shape}")


@pytest.mark.parametrize("backend", cpu_backends("eot_project"))
def test_eot_project_fused_strided_x_and_int32_index(backend, poison):
    N, S, W, D = 5, 7, 24, 6
    base = torch.randn(S, N, W + 3)
    x = base.transpose(0, 1)[:, :, :W].detach().requires_grad_(True)  # (N, S, W) non-contiguous
    _, eot = _eot_inputs((N, S, W, D))
    (_, w, b, proj), _ = _eot_inputs((N, S, W, D))
    g = torch.randn(N, D)
    with ops.use_backend(backend):
        out, grads = _grads(lambda x, w, b, p: ops.eot_project(x, eot.int(), w, b, p, eps=1e-3), [x, w, b, proj], g)
    want, want_grads = _grads(lambda x, w, b, p: ops.eot_project_eager(x, eot, w, b, p, eps=1e-3), [x, w, b, proj], g)
    assert_close(out, want, "out")
    for name, a, e in zip(("x", "ln_weight", "ln_bias", "proj"), grads, want_grads):
        assert_close(a, e, f"grad {name}")


def test_eot_project_ext_float64_gradcheck():
    if "ext" not in _backend.available("eot_project", "cpu"):
        pytest.skip("guidg_fast._C has no eot_project kernel")
    (x, w, b, proj), eot = _eot_inputs((3, 4, 6, 5), torch.float64)
    with ops.use_backend("ext"):
        assert torch.autograd.gradcheck(lambda x, w, b, p: ops.eot_project(x, eot, w, b, p), (x, w, b, proj))


def test_eot_project_opcheck():
    if "ext" not in _backend.available("eot_project", "cpu"):
        pytest.skip("guidg_fast._C has no eot_project kernel")
    (x, w, b, proj), eot = _eot_inputs((4, 5, 16, 8))
    torch.library.opcheck(torch.ops.guidg_fast.eot_project.default, (x, eot, w, b, proj, 1e-5, "ext"))
    x, w, b, proj = (t.detach() for t in (x, w, b, proj))
    out, xhat, rstd, inv_norm = _backend.load_extension().eot_project_forward(x, eot, w, b, proj, 1e-5)
    args = (torch.randn_like(out), out, inv_norm, xhat, rstd, eot, x, w, b, proj)
    torch.library.opcheck(torch.ops.guidg_fast.eot_project_backward.default, (*args, "ext"))


def test_ops_compile_without_graph_breaks():
    """A text-tower tail (attention -> residual -> EOT projection) traces as one graph, forward and backward."""
    backend = "ext" if "ext" in _backend.available("prefix_attention", "cpu") else None
    if backend is None:
        pytest.skip("no fused CPU backend here")
    K, M, S, P, H, Dh = 2, 3, 4, 2, 2, 8
    W = H * Dh
    q, k, v, kp, vp = _attn_inputs((K, M, S, P, H, Dh))
    (_, w, b, proj), eot = _eot_inputs((K * M, S, W, 6))

    def step(q, k, v, kp, vp, w, b, proj):
        att = ops.prefix_attention(q, k, v, kp, vp)
        x = (att + q).reshape(K * M, S, W)
        feats = ops.eot_project(x, eot, w, b, proj)
        return feats.square().sum() + feats[:, 0].sum()

    args = (q, k, v, kp, vp, w, b, proj)
    with ops.use_backend(backend):
        explanation = torch._dynamo.explain(step)(*args)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # inductor adds ~60 s of C++ codegen here
        for t in args:
            t.grad = None
        compiled(*args).backward()
        got = [t.grad.clone() for t in args]
    for t in args:
        t.grad = None
    with ops.use_backend("eager"):
        step(*args).backward()
    for i, (g, e) in enumerate(zip(got, [t.grad for t in args])):
        assert_close(g, e, f"grad {i}")


@cuda_only
def test_prefix_attention_and_eot_project_cuda():
    for shape in ATTN_SHAPES:
        inputs = _attn_inputs(shape, fused_qkv=True, device="cuda")
        grad_out = torch.randn(inputs[0].shape, device="cuda")
        for backend in [b for b in ("ext", "triton") if b in _backend.available("prefix_attention", "cuda")]:
            with ops.use_backend(backend):
                out, grads = _grads(ops.prefix_attention, inputs, grad_out)
            want, want_grads = _grads(ops.prefix_attention_eager, inputs, grad_out)
            assert_close(out, want, f"{backend} out {shape}", tol=1e-4)
            for name, g, w in zip(NAMES, grads, want_grads):
                assert_close(g, w, f"{backend} grad {name} {shape}", tol=1e-4)
    for shape in EOT_SHAPES + [(600, 12, 512, 512)]:
        (x, w, b, proj), eot = _eot_inputs(shape, device="cuda")
        g = torch.randn(shape[0], shape[3], device="cuda")
        for backend in [b for b in ("ext", "triton") if b in _backend.available("eot_project", "cuda")]:
            with ops.use_backend(backend):
                out, grads = _grads(lambda x, w, b, p: ops.eot_project(x, eot, w, b, p), [x, w, b, proj], g)
            want, want_grads = _grads(lambda x, w, b, p: ops.eot_project_eager(x, eot, w, b, p), [x, w, b, proj], g)
            assert_close(out, want, f"{backend} out {shape}", tol=1e-4)
            for name, a, e in zip(("x", "ln_weight", "ln_bias", "proj"), grads, want_grads):
                assert_close(a, e, f"{backend} grad {name} {shape}", tol=1e-4)


# ----------------------------------------------------------------------------------------------
# prefix_attention_packed: every suffix group of a text pass in one call

# (K, P, H, Dh, [(M, S) per group]): the text pass's layout (groups of classes by suffix length),
# odd sizes, one group, S past a key tile, P = 1 and a prefix of exactly one tile
PACKED_CASES = [
    (3, 17, 8, 64, [(4, 3), (5, 4), (2, 5), (1, 9)]),
    (2, 4, 3, 24, [(3, 1), (1, 2), (2, 7)]),
    (1, 1, 1, 33, [(2, 19)]),
    (2, 16, 2, 16, [(1, 1), (3, 18)]),
]


def _packed_inputs(case, dtype=torch.float32):
    K, P, H, Dh, shapes = case
    groups, t = [], 0
    for M, S in shapes:
        groups.append((t, M, S))
        t += K * M * S
    qkv = torch.randn(t, 3, H, Dh, dtype=dtype, requires_grad=True)
    kvp = torch.randn(K, P, 2, H, Dh, dtype=dtype)
    kp, vp = (x.detach().requires_grad_() for x in kvp.unbind(2))  # strided views, as the text pass has them
    return qkv, kp, vp, groups


def _packed_by_groups(qkv, kp, vp, groups):
    """The oracle: the eager prefix attention group by group on slices of qkv."""
    K, _, H, Dh = kp.shape
    outs = []
    for t0, M, S in groups:
        part = qkv[t0 : t0 + K * M * S]
        q, k, v = (part[:, i].reshape(K, M, S, H, Dh) for i in range(3))
        outs.append(ops.prefix_attention_eager(q, k, v, kp, vp).reshape(K * M * S, H, Dh))
    return torch.cat(outs)


@pytest.mark.parametrize("backend", cpu_backends("prefix_attention"))
@pytest.mark.parametrize("case", PACKED_CASES, ids=lambda c: f"K{c[0]}P{c[1]}H{c[2]}D{c[3]}G{len(c[4])}")
def test_packed_matches_per_group_eager(backend, case, monkeypatch):
    if backend == "triton" and case[3] == 64:
        pytest.skip("the Triton interpreter is slow: small heads only")
    monkeypatch.setenv("GUIDG_FAST_POISON", "1")
    qkv, kp, vp, groups = _packed_inputs(case)
    grad_out = torch.randn(qkv.shape[0], case[2], case[3])
    expected = _packed_by_groups(qkv, kp, vp, groups)
    ref_grads = torch.autograd.grad(expected, (qkv, kp, vp), grad_out)
    with ops.use_backend(backend):
        out = ops.prefix_attention_packed(qkv, kp, vp, groups)
    grads = torch.autograd.grad(out, (qkv, kp, vp), grad_out)
    assert_close(out, expected, "out")
    for name, g, r in zip(("dqkv", "dk_prefix", "dv_prefix"), grads, ref_grads):
        assert_close(g, r, name)


@pytest.mark.skipif("ext" not in _backend.available("prefix_attention", "cpu"), reason="guidg_fast._C not built")
def test_packed_cpu_kernels_run_and_gradcheck():
    case = (2, 3, 2, 5, [(2, 2), (1, 3)])
    qkv, kp, vp, groups = _packed_inputs(case, dtype=torch.float64)
    with torch.profiler.profile() as prof, ops.use_backend("ext"):
        ops.prefix_attention_packed(qkv, kp, vp, groups).sum().backward()
    ran = {e.name for e in prof.events()}
    assert {"guidg_fast::prefix_attention_packed", "guidg_fast::prefix_attention_packed_backward"} <= ran
    with ops.use_backend("ext"):
        assert torch.autograd.gradcheck(lambda *a: ops.prefix_attention_packed(*a, groups), (qkv, kp, vp))
    flat = [x for g in groups for x in g]
    torch.library.opcheck(torch.ops.guidg_fast.prefix_attention_packed.default, (qkv, kp, vp, flat, 0.5))
    out, lse = torch.ops.guidg_fast.prefix_attention_packed(qkv.detach(), kp.detach(), vp.detach(), flat, 0.5)
    torch.library.opcheck(torch.ops.guidg_fast.prefix_attention_packed_backward.default,
                          (torch.randn_like(out), qkv.detach(), kp.detach(), vp.detach(), out, lse, flat, 0.5))


def test_packed_bad_inputs():
    qkv, kp, vp, groups = _packed_inputs((2, 3, 2, 8, [(2, 2), (1, 3)]))
    with pytest.raises(ValueError, match="qkv must have shape"):
        ops.prefix_attention_packed(qkv[:, :2], kp, vp, groups)
    with pytest.raises(ValueError, match=r"groups\[1\] must be \(first token 8"):
        ops.prefix_attention_packed(qkv, kp, vp, [(0, 2, 2), (7, 1, 3)])
    with pytest.raises(ValueError, match="groups cover 8 tokens"):
        ops.prefix_attention_packed(qkv, kp, vp, groups[:1])
    with pytest.raises(ValueError, match="k_prefix"):
        ops.prefix_attention_packed(qkv, kp[:, :, :1], vp, groups)
    if "ext" in _backend.available("prefix_attention", "cpu"):
        with pytest.raises(RuntimeError, match="must start at token"):
            _backend.load_extension().prefix_attention_packed_forward(qkv.detach(), kp.detach(), vp.detach(),
                                                                      [0, 2, 2, 9, 1, 3], 0.5)
