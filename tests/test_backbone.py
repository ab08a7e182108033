"""load_clip: random init, local checkpoint round trips, and clear errors without network."""
import pytest
import torch

import guidg_fast as gf


def _encode(model):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 32, 32, generator=g)
    text = torch.randint(1, 1000, (2, 77), generator=g)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(text)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_checkpoint_round_trip(tmp_path, suffix):
    torch.manual_seed(1)
    model, preprocess, tokenizer = gf.load_clip(gf.TINY_ARCH)
    path = tmp_path / f"tiny{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    torch.manual_seed(2)  # a different random init, overwritten by the file
    loaded, _, _ = gf.load_clip(gf.TINY_ARCH, pretrained=str(path))
    for a, b in zip(_encode(model), _encode(loaded)):
        assert torch.equal(a, b)
    assert callable(preprocess) and tokenizer(["a dog"]).shape == (1, 77)


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        gf.load_clip(gf.TINY_ARCH, pretrained=str(missing))


def test_wrong_architecture_checkpoint(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="does not match arch"):
        gf.load_clip(gf.TINY_ARCH, pretrained=str(path))


def test_uncached_tag_is_an_error_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="ViT-B-16/openai"):
        gf.load_clip("ViT-B-16", pretrained="openai", cache_dir=str(tmp_path))


def test_unknown_arch_and_tag():
    with pytest.raises(ValueError, match="arch="):
        gf.load_clip("ViT-Z-99")
    with pytest.raises(ValueError, match="not-a-tag"):
        gf.load_clip(gf.TINY_ARCH, pretrained="not-a-tag")
