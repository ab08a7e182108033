"""ExpertPromptLearner and reference.encode_expert_prompts against open_clip's own encode_text."""
import pytest
import torch
import torch.nn.functional as F

import guidg_fast as gf
from guidg_fast import reference
from conftest import assert_close

CLASSES = ["dog", "fire_truck", "a very long class name here", "x"]


def _x_context(model, tokenizer, learner):
    """Context vectors equal to the embedding of the token 'X', so prompts equal real token text."""
    x_id = tokenizer(["X"])[0, 1]
    with torch.no_grad():
        emb = model.token_embedding.weight[x_id]
        learner.ctx.copy_(emb.expand_as(learner.ctx))


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("class_specific", [False, True])
def test_reference_equals_encode_text_on_token_prompts(tiny_clip, position, class_specific):
    model, _, tokenizer = tiny_clip
    n = 4
    learner = gf.ExpertPromptLearner(
        model, tokenizer, CLASSES, num_experts=2, n_ctx=n, class_token_position=position, class_specific=class_specific
    )
    _x_context(model, tokenizer, learner)
    out = reference.encode_expert_prompts(model, learner)
    names = [c.replace("_", " ") for c in CLASSES]
    xs = " ".join(["X"] * n)
    half = " ".join(["X"] * (n // 2))
    if position == "end":
        texts = [f"{xs} {c}." for c in names]
    elif position == "front":
        texts = [f"{c} {xs}." for c in names]
    else:
        texts = [f"{half} {c} {half}." for c in names]
    with torch.no_grad():
        expected = model.encode_text(tokenizer(texts), normalize=True)
    assert out.shape == (2, len(CLASSES), expected.shape[-1])
    for k in range(2):
        assert_close(out[k], expected, f"expert {k}")


def test_reference_gradient_reaches_each_expert_only(tiny_clip):
    model, _, tokenizer = tiny_clip
    learner = gf.ExpertPromptLearner(model, tokenizer, CLASSES, num_experts=3, n_ctx=3)
    out = reference.encode_expert_prompts(model, learner)
    out[1].sum().backward()
    grad = learner.ctx.grad
    assert grad[1].abs().sum() > 0
    assert grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0
    assert torch.allclose(out.norm(dim=-1), torch.ones(out.shape[:2]), atol=1e-5)


def test_learner_layout_and_ctx_init(tiny_clip):
    model, _, tokenizer = tiny_clip
    learner = gf.ExpertPromptLearner(model, tokenizer, CLASSES, num_experts=2, ctx_init="a photo of a")
    assert learner.n_ctx == 4 and learner.ctx.shape == (2, 4, model.token_embedding.weight.shape[1])
    ids = tokenizer(["a photo of a"])[0, 1:5]
    assert torch.equal(learner.ctx[0].detach(), model.token_embedding.weight[ids].detach())
    assert learner.name_lens[0] == 1 and learner.name_lens[1] == 2  # "fire truck" is two tokens
    prompts = learner.prompts(0)
    assert prompts.shape == (len(CLASSES), 77, learner.ctx.shape[-1])
    # the buffers reproduce the token embedding of the prompt text
    with torch.no_grad():
        emb = model.token_embedding(tokenizer([f"a photo of a {c.replace('_', ' ')}." for c in CLASSES]))
    assert torch.equal(prompts.detach(), emb)
    csc = gf.ExpertPromptLearner(model, tokenizer, CLASSES, num_experts=3, n_ctx=5, class_specific=True)
    assert csc.ctx.shape == (3, len(CLASSES), 5, learner.ctx.shape[-1])
    assert set(dict(csc.named_parameters())) == {"ctx"}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(classnames=[]), "classnames"),
        (dict(classnames=["a", "a"]), "unique"),
        (dict(num_experts=0), "num_experts"),
        (dict(class_token_position="left"), "class_token_position"),
        (dict(n_ctx=0), "n_ctx"),
        (dict(n_ctx=80), "n_ctx"),
    ],
)
def test_learner_bad_arguments(tiny_clip, kwargs, match):
    model, _, tokenizer = tiny_clip
    args = dict(classnames=["a", "b"], num_experts=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        gf.ExpertPromptLearner(model, tokenizer, **args)


def test_non_clip_model_is_rejected(tiny_clip):
    _, _, tokenizer = tiny_clip
    with pytest.raises(ValueError, match="text tower"):
        gf.ExpertPromptLearner(torch.nn.Linear(2, 2), tokenizer, ["a"], num_experts=1)


def test_public_encode_expert_prompts_matches_reference(tiny_clip):
    # gf.encode_expert_prompts is the shared-prefix fast pass; tests/test_text_fast.py covers it in depth
    model, _, tokenizer = tiny_clip
    learner = gf.ExpertPromptLearner(model, tokenizer, CLASSES, num_experts=2, n_ctx=2)
    assert_close(gf.encode_expert_prompts(model, learner), reference.encode_expert_prompts(model, learner))
