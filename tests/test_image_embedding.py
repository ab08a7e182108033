"""backbone.image_embedding (the last block run for the class token only) against the encoder's
own forward: the same embedding and the same gradient for every parameter of the vision tower."""
import copy

import pytest
import torch
from open_clip.transformer import VisionTransformer

from guidg_fast.backbone import cls_shortcut_ok, image_embedding

from conftest import assert_close


def _vit(layers=2, width=64, heads=2, image_size=32, patch=8, output_dim=48, **kw):
    torch.manual_seed(layers * 101 + width + image_size)
    return VisionTransformer(image_size=image_size, patch_size=patch, width=width, layers=layers, heads=heads,
                             mlp_ratio=4.0, output_dim=output_dim, **kw)


def _run(fn, visual, images, seed):
    visual.zero_grad(set_to_none=True)
    out = fn(visual, images)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))  # a non-uniform upstream grad
    (out * w).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in visual.named_parameters()}


@pytest.mark.parametrize("cfg", [
    dict(layers=2, width=64, heads=2, image_size=32, patch=8, batch=3),
    dict(layers=1, width=48, heads=3, image_size=40, patch=8, batch=5),     # one block: the last is the first
    dict(layers=3, width=32, heads=1, image_size=28, patch=7, batch=1),      # odd grid (4x4 + class token)
    dict(layers=2, width=64, heads=4, image_size=36, patch=12, batch=7, ls_init_value=0.1),  # LayerScale
    dict(layers=2, width=64, heads=2, image_size=32, patch=8, batch=2, final_ln_after_pool=True),
])
def test_image_embedding_equals_the_encoder_forward_and_backward(cfg):
    cfg = dict(cfg)
    batch = cfg.pop("batch")
    visual = _vit(**cfg).train()
    assert cls_shortcut_ok(visual)
    images = torch.randn(batch, 3, cfg["image_size"], cfg["image_size"], generator=torch.Generator().manual_seed(batch))
    ref_out, ref_grads = _run(lambda v, x: v(x), visual, images, seed=1)
    out, grads = _run(image_embedding, visual, images, seed=1)
    assert_close(out, ref_out, "embedding")
    assert ref_grads.keys() == grads.keys()
    for name, g in ref_grads.items():
        assert_close(grads[name], g, f"grad {name}")


def test_image_embedding_in_eval_mode_without_grad():
    visual = _vit(layers=3).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # nn.MultiheadAttention's inference fast path on the full-sequence blocks
        assert_close(image_embedding(visual, images), visual(images), "embedding (eval)")


def test_layouts_the_shortcut_is_not_written_for_run_the_encoder_itself():
    calls = []

    def counting(visual):
        original = visual.forward

        def forward(x):
            calls.append(1)
            return original(x)
        visual.forward = forward
        return visual

    images = torch.randn(2, 3, 32, 32)
    for kw in (dict(pool_type="avg"), dict(output_tokens=True), dict(attentional_pool=True, attn_pooler_queries=4)):
        visual = counting(_vit(**kw).eval())
        assert not cls_shortcut_ok(visual)
        calls.clear()
        with torch.no_grad():
            out = image_embedding(visual, images)
            assert calls == [1], kw
            expected = visual(images)
        for a, b in zip(out if isinstance(out, tuple) else (out,), expected if isinstance(expected, tuple) else (expected,)):
            assert torch.equal(a, b)
    visual = _vit()
    visual.set_grad_checkpointing(True)
    assert not cls_shortcut_ok(visual)


def test_the_trainer_encodes_through_the_shortcut():
    import guidg_fast as gf

    trainer = gf.GuiDG(gf.TINY_ARCH, classnames=["a", "b"], domains=["d0"], seed=0)
    assert cls_shortcut_ok(trainer.model.visual)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = torch.nn.functional.normalize(trainer.model.visual(images), dim=-1)
        assert_close(trainer.encode_images(images), expected, "encode_images")
        # the BMA copy (a deep copy of the tower) takes the same path
        assert_close(trainer.encode_images(images, copy.deepcopy(trainer.model.visual)), expected, "copy")


def test_feature_cache_encodes_open_clip_models_through_the_shortcut():
    import guidg_fast as gf
    from guidg_fast.backbone import encode_image

    model, _, _ = gf.load_clip(gf.TINY_ARCH)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    seen = []
    original = model.visual.forward
    model.visual.forward = lambda x: seen.append(1) or original(x)
    with torch.no_grad():
        out = encode_image(model, images)
        assert seen == []  # the blocks were run directly, not the tower's forward
        assert_close(out, model.encode_image(images), "encode_image")

    class Wrapped(torch.nn.Module):  # a model with its own encode_image keeps it
        def __init__(self):
            super().__init__()
            self.visual = model.visual

        def encode_image(self, x):
            return torch.zeros(x.shape[0], 5)

    assert torch.equal(encode_image(Wrapped(), images), torch.zeros(3, 5))
