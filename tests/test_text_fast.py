"""encode_expert_prompts (shared-prefix pass) against reference.encode_expert_prompts.

Output and ctx gradient, fp32 CPU, relative error < 1e-5, on the tiny open_clip config and on
ViT-B-16's text tower (random init), all class-token positions, generic and class-specific
contexts, K = 1 and K > 1, each backend of prefix_attention. ``algorithm`` runs the pass with the
ops' eager math (the pass's own logic, independent of any kernel); ``ext``/``triton`` run the public
function with that backend forced.
"""
import warnings

import pytest
import torch

import guidg_fast as gf
from guidg_fast import ops, reference, text
from guidg_fast.ops import _backend

from backends import cpu_backends
from conftest import assert_close

# names that tokenize to 1..7 tokens, with underscores, digits and punctuation
TINY_CLASSES = ["dog", "fire_truck", "a very long class name here", "x", "hot-air balloon", "t-shirt", "7up can"]
VIT_CLASSES = [
    "dog", "fire_truck", "alarm clock", "backpack", "batteries", "bottle", "bucket",
    "calculator", "calendar", "candles", "computer", "couch", "curtains", "desk lamp", "drill", "eraser",
    "exit sign", "great white shark", "t-shirt", "a very long class name here",
]
BACKENDS = [pytest.param("algorithm", id="algorithm")] + cpu_backends("encode_expert_prompts")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tests are thousands of small ops: one intra-op thread avoids thread hand-offs that
    dominate on a loaded 2-core machine (the shared-CPU CI box)."""
    import os

    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("GF_TEXT_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(previous)


def _run(model, learner, backend):
    """(features, ctx grad) of the fast pass under ``backend``; checks the fast path really ran."""
    calls = {"prefix_attention": 0, "prefix_attention_packed": 0}
    originals = {name: getattr(ops, name) for name in calls}

    def counting(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)

        return call

    learner.ctx.grad = None
    for name in calls:
        setattr(ops, name, counting(name))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no silent fallback to the reference
            if backend == "algorithm":
                with _backend.use_backend("eager"):
                    out = text.shared_prefix_encode(model, learner)
            else:
                with _backend.use_backend(backend):
                    out = gf.encode_expert_prompts(model, learner)
    finally:
        for name, original in originals.items():
            setattr(ops, name, original)
    assert sum(calls.values()) > 0, "the shared-prefix pass did not run"
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * grad_out).sum().backward()
    grad = learner.ctx.grad.clone()
    learner.ctx.grad = None
    return out.detach(), grad, grad_out


def _reference(model, learner, grad_out):
    learner.ctx.grad = None
    out = reference.encode_expert_prompts(model, learner)
    (out * grad_out).sum().backward()
    grad = learner.ctx.grad.clone()
    learner.ctx.grad = None
    return out.detach(), grad


def _frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def tiny(tiny_clip):
    """A frozen private copy of the session's tiny CLIP (CoOp freezes both encoders)."""
    import copy

    model, _, tokenizer = tiny_clip
    return _frozen(copy.deepcopy(model)), None, tokenizer


def _tiny_variant(**text_overrides):
    """A tiny CLIP whose text tower uses other open_clip block options."""
    import open_clip

    cfg = open_clip.get_model_config(gf.TINY_ARCH) or {}
    if not cfg:
        gf.load_clip(gf.TINY_ARCH)  # registers the config
        cfg = open_clip.get_model_config(gf.TINY_ARCH)
    text_cfg = dict(cfg["text_cfg"], **{k: v for k, v in text_overrides.items() if k != "quick_gelu"})
    torch.manual_seed(3)
    model = open_clip.model.CLIP(
        cfg["embed_dim"], cfg["vision_cfg"], text_cfg, quick_gelu=text_overrides.get("quick_gelu", False)
    )
    with torch.no_grad():  # non-trivial layer-scale / norm parameters, so a skipped piece shows
        for name, p in model.named_parameters():
            if name.endswith("gamma") or name.endswith("head_scale"):
                p.copy_(0.5 + torch.rand_like(p))
    return _frozen(model.eval())


# ----------------------------------------------------------------------------------------------
# prompt layout


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("class_specific", [False, True])
def test_prompt_layout_rebuilds_prompts(tiny_clip, position, class_specific):
    model, _, tokenizer = tiny_clip
    learner = gf.ExpertPromptLearner(
        model, tokenizer, TINY_CLASSES, num_experts=2, n_ctx=5, class_token_position=position,
        class_specific=class_specific,
    )
    source, index = learner.prompt_layout()
    C, L = source.shape
    rows = torch.arange(C).unsqueeze(1).expand(C, L)
    P = learner.shared_prefix_length()
    assert P == {"end": 6, "middle": 3, "front": 1}[position] if not class_specific else P == 1
    for k in range(2):
        ctx = learner.expert_context(k)
        rebuilt = torch.where(
            (source == learner.PREFIX).unsqueeze(-1), learner.token_prefix[rows, index.clamp(max=0)],
            torch.where(
                (source == learner.SUFFIX).unsqueeze(-1),
                learner.token_suffix[rows, index.clamp(0, learner.token_suffix.shape[1] - 1)],
                ctx[rows, index.clamp(0, learner.n_ctx - 1)],
            ),
        )
        assert torch.equal(rebuilt, learner.prompts(k).detach())
        # the shared prefix really is shared by all classes
        assert torch.equal(rebuilt[:, :P], rebuilt[:1, :P].expand(C, -1, -1))


# ----------------------------------------------------------------------------------------------
# parity on the tiny config


_TINY_CASES = [
    ("end", False, 1), ("end", False, 3), ("middle", False, 2), ("front", False, 3),
    ("end", True, 2), ("middle", True, 1), ("front", True, 2),
]
# the Triton interpreter is slow: a subset that still covers every position, CSC, K = 1 and K > 1
_TRITON_CASES = [("end", False, 1), ("middle", False, 2), ("front", True, 2)]


@pytest.mark.parametrize(
    "backend,position,class_specific,K",
    [
        pytest.param(b.values[0], *case, marks=b.marks, id=f"{b.id}-{case[0]}-{'csc' if case[1] else 'generic'}-K{case[2]}")
        for b in BACKENDS
        for case in _TINY_CASES
        if b.id != "triton" or case in _TRITON_CASES
    ],
)
def test_tiny_parity(tiny, backend, position, class_specific, K):
    model, _, tokenizer = tiny
    learner = gf.ExpertPromptLearner(
        model, tokenizer, TINY_CLASSES, num_experts=K, n_ctx=4 if position != "middle" else 5,
        class_token_position=position, class_specific=class_specific,
    )
    out, grad, grad_out = _run(model, learner, backend)
    ref, ref_grad = _reference(model, learner, grad_out)
    assert_close(out, ref, "features")
    assert_close(grad, ref_grad, "ctx grad")
    assert torch.allclose(out.norm(dim=-1), torch.ones(K, len(TINY_CLASSES)), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_parity_ctx_init_and_one_class(tiny, backend):
    model, _, tokenizer = tiny
    learner = gf.ExpertPromptLearner(model, tokenizer, ["fire_truck"], num_experts=2, ctx_init="a photo of a")
    with torch.no_grad():
        learner.ctx.add_(0.05 * torch.randn_like(learner.ctx))
    out, grad, grad_out = _run(model, learner, backend)
    ref, ref_grad = _reference(model, learner, grad_out)
    assert_close(out, ref, "features")
    assert_close(grad, ref_grad, "ctx grad")


@pytest.mark.parametrize(
    "overrides",
    [
        dict(qk_norm=True, scale_heads=True, scale_attn_inner=True, scale_attn=True, scale_fc=True, ls_init_value=0.1),
        dict(block_type="custom"),
        dict(ls_init_value=0.1, quick_gelu=True),
        dict(proj_bias=True),
        dict(proj_type="none"),
        dict(heads=4, mlp_ratio=2.0),
        dict(linear_projection=True),
    ],
    ids=["custom-all", "custom-plain", "layerscale-quickgelu", "proj-bias", "no-proj", "4heads", "linear-proj"],
)
def test_tower_variants(tiny_clip, overrides):
    _, _, tokenizer = tiny_clip
    overrides = dict(overrides)
    linear_projection = overrides.pop("linear_projection", False)
    model = _tiny_variant(**overrides)
    if linear_projection:  # an nn.Linear projection without bias goes through eot_project as weight.t()
        width, dim = model.text_projection.shape
        linear = torch.nn.Linear(width, dim, bias=False)
        with torch.no_grad():
            linear.weight.copy_(model.text_projection.t())
        del model.text_projection
        model.text_projection = linear.requires_grad_(False)
    assert text.fast_path_unsupported_reason(model) is None
    learner = gf.ExpertPromptLearner(model, tokenizer, TINY_CLASSES, num_experts=2, n_ctx=3)
    out, grad, grad_out = _run(model, learner, "algorithm")
    ref, ref_grad = _reference(model, learner, grad_out)
    assert_close(out, ref, "features")
    assert_close(grad, ref_grad, "ctx grad")


# ----------------------------------------------------------------------------------------------
# parity on ViT-B-16's text tower (random init; only the text tower is full size)


@pytest.fixture(scope="module")
def vit_text():
    import open_clip

    cfg = open_clip.get_model_config("ViT-B-16")
    torch.manual_seed(11)
    # a token-sized vision tower: only the text tower is under test, and building it is ~1 s
    vision = dict(image_size=32, layers=1, width=64, patch_size=16, head_width=32)
    model = _frozen(open_clip.model.CLIP(cfg["embed_dim"], vision, cfg["text_cfg"]).eval())
    return model, open_clip.get_tokenizer("ViT-B-16")


_VIT_CASES = [("end", False, 2), ("middle", False, 1), ("front", True, 1)]


@pytest.fixture(scope="module")
def vit_reference(vit_text):
    """Reference outputs per case, computed once (the full-length reference is the slow part)."""
    model, tokenizer = vit_text
    results = {}
    for position, class_specific, K in _VIT_CASES:
        torch.manual_seed(5)
        learner = gf.ExpertPromptLearner(
            model, tokenizer, VIT_CLASSES, num_experts=K, n_ctx=16 if position != "middle" else 6,
            class_token_position=position, class_specific=class_specific,
        )
        grad_out = torch.randn((K, len(VIT_CLASSES), 512), generator=torch.Generator().manual_seed(7))
        results[(position, class_specific, K)] = (learner, grad_out, *_reference(model, learner, grad_out))
    return results


def test_vit_classes_have_many_token_lengths(vit_text):
    _, tokenizer = vit_text
    lengths = {int(t.argmax()) for t in tokenizer([c.replace("_", " ") for c in VIT_CLASSES])}
    assert len(VIT_CLASSES) >= 20 and len(lengths) >= 4


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "triton"])
@pytest.mark.parametrize("case", _VIT_CASES, ids=lambda c: f"{c[0]}-{'csc' if c[1] else 'generic'}-K{c[2]}")
def test_vit_b16_parity(vit_text, vit_reference, backend, case):
    model, _ = vit_text
    learner, grad_out, ref, ref_grad = vit_reference[case]
    out, grad, used_grad_out = _run(model, learner, backend)
    assert torch.equal(used_grad_out, grad_out)
    assert_close(out, ref, "features")
    assert_close(grad, ref_grad, "ctx grad")


# ----------------------------------------------------------------------------------------------
# routing, fallback, bad input


def test_gradient_reaches_each_expert_only(tiny):
    model, _, tokenizer = tiny
    learner = gf.ExpertPromptLearner(model, tokenizer, TINY_CLASSES, num_experts=3, n_ctx=3)
    with _backend.use_backend("eager"):
        out = text.shared_prefix_encode(model, learner)
    out[1].sum().backward()
    grad = learner.ctx.grad
    assert grad[1].abs().sum() > 0
    assert grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0


def test_no_grad_inference_matches(tiny_clip):
    model, _, tokenizer = tiny_clip
    learner = gf.ExpertPromptLearner(model, tokenizer, TINY_CLASSES, num_experts=2, n_ctx=3)
    with torch.no_grad(), _backend.use_backend("eager"):
        out = text.shared_prefix_encode(model, learner)
        ref = reference.encode_expert_prompts(model, learner)
    assert not out.requires_grad
    assert_close(out, ref)


def test_forced_eager_routes_to_reference(tiny_clip, monkeypatch):
    model, _, tokenizer = tiny_clip
    learner = gf.ExpertPromptLearner(model, tokenizer, TINY_CLASSES, num_experts=2, n_ctx=3)
    called = []
    monkeypatch.setattr(text, "shared_prefix_encode", lambda *a: called.append("fast"))
    with _backend.use_backend("eager"):
        out = gf.encode_expert_prompts(model, learner)
    assert not called
    assert_close(out, reference.encode_expert_prompts(model, learner))


def test_unsupported_block_falls_back_with_one_warning(tiny_clip):
    from open_clip.transformer import ResidualAttentionBlock

    class OtherBlock(ResidualAttentionBlock):
        pass

    model, _, tokenizer = tiny_clip
    model = _tiny_variant()
    block = model.transformer.resblocks[1]
    other = OtherBlock.__new__(OtherBlock)
    other.__dict__.update(block.__dict__)
    model.transformer.resblocks[1] = other
    reason = text.fast_path_unsupported_reason(model)
    assert reason is not None and "OtherBlock" in reason
    learner = gf.ExpertPromptLearner(model, tokenizer, TINY_CLASSES, num_experts=2, n_ctx=3)
    text._warned.discard(reason)
    with pytest.warns(RuntimeWarning, match="OtherBlock"):
        out = gf.encode_expert_prompts(model, learner)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        gf.encode_expert_prompts(model, learner)  # once only
    assert_close(out, reference.encode_expert_prompts(model, learner))


def test_unsupported_reasons(tiny_clip):
    assert "scaled cosine" in text.fast_path_unsupported_reason(_tiny_variant(scaled_cosine_attn=True))
    model = _tiny_variant()
    model.transformer.resblocks[0].attn.dropout = 0.1
    assert text.fast_path_unsupported_reason(model.eval()) is None  # inactive in eval mode
    assert "dropout" in text.fast_path_unsupported_reason(model.train())
    model = _tiny_variant()
    model.attn_mask = torch.zeros_like(model.attn_mask)
    assert "causal" in text.fast_path_unsupported_reason(model)


def test_token_prefix_must_be_shared(tiny_clip):
    model, _, tokenizer = tiny_clip
    learner = gf.ExpertPromptLearner(model, tokenizer, TINY_CLASSES, num_experts=2, n_ctx=3)
    with torch.no_grad():
        learner.token_prefix[2] += 1.0
    with pytest.raises(ValueError, match="token_prefix"):
        text.shared_prefix_encode(model, learner)


def test_info_follows_prefix_attention():
    for device in ("cpu", "cuda"):
        assert _backend.describe("encode_expert_prompts", device) == _backend.describe("prefix_attention", device)
