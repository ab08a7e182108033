"""CLIP backbone over open_clip, loaded from local weights only.

``load_clip`` never touches the network unless the caller opts in with ``allow_download=True``:
``pretrained=None`` gives a random-init model, a path loads a local checkpoint file, and an
open_clip tag loads only if its file is already in the local cache.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

_CONFIG_DIR = Path(__file__).parent / "configs"
TINY_ARCH = "guidg-tiny"  # a 2-layer, width-64 CLIP for tests and the CPU demo
_registered = False


def _register_configs() -> None:
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


def _read_state_dict(path: Path, trust_torchscript: bool) -> dict:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from .train.checkpoint import load_tensors

        try:
            state = load_tensors(str(path))
        except ValueError as exc:
            raise ValueError(f"pretrained={str(path)!r}: {exc}") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            if not _is_torchscript(path):
                raise ValueError(
                    f"pretrained={str(path)!r} could not be read as a weights file (a torch.save state dict, "
                    f".bin or .safetensors): {exc.__class__.__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                ) from exc
            # TorchScript archives (OpenAI's original .pt) are code: refused unless trusted
            if not trust_torchscript:
                raise ValueError(
                    f"pretrained={str(path)!r} is a TorchScript archive (OpenAI's original .pt files are), i.e. code: "
                    "pass trust_torchscript=True to load it knowingly, or convert it once to .safetensors."
                ) from exc
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"pretrained={str(path)!r} does not hold a state dict (got {type(state).__name__})")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _is_torchscript(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _cached_tag_file(arch: str, tag: str, cache_dir: str | None) -> str | None:
    """The local file of an open_clip pretrained tag if it is already cached, else None."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        known = open_clip.list_pretrained_tags_by_model(arch)
        raise ValueError(f"pretrained={tag!r} is neither a file nor a known open_clip tag for {arch} (tags: {known})")
    hf_hub = cfg.get("hf_hub", "")
    if hf_hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, _, filename = hf_hub.rstrip("/").partition("/")[0], None, None
        parts = hf_hub.rstrip("/").split("/")
        repo_id = "/".join(parts[:2])
        subfolder = "/".join(parts[2:])
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            filename = f"{subfolder}/{name}" if subfolder else name
            found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.exists(found):
                return found
    url = cfg.get("url", "")
    if url:
        root = cache_dir or os.path.expanduser("~/.cache/clip")
        candidate = os.path.join(root, os.path.basename(url))
        if os.path.exists(candidate):
            return candidate
    return None


def load_clip(
    arch: str = "ViT-B-16",
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    *,
    allow_download: bool = False,
    cache_dir: str | None = None,
    trust_torchscript: bool = False,
    **model_kwargs,
):
    """Returns (model, preprocess, tokenizer).

    pretrained: None (random init), a local .pt/.bin/.safetensors file, or an open_clip tag that is
    already cached. OpenAI weights loaded from a file need the ``-quickgelu`` architecture.
    """
    import open_clip

    _register_configs()
    if arch not in open_clip.list_models():
        raise ValueError(f"arch={arch!r} is not an open_clip architecture (e.g. 'ViT-B-16', '{TINY_ARCH}')")
    if pretrained is None:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, **model_kwargs)
    elif (os.path.sep in str(pretrained) or Path(str(pretrained)).suffix in (".pt", ".bin", ".pth", ".safetensors")
          or Path(str(pretrained)).is_dir()):
        path = Path(pretrained)
        if path.is_dir():
            raise ValueError(f"pretrained={str(path)!r} is a folder; pass the weights file in it "
                             "(.safetensors, .pt, .pth or .bin)")
        if not path.is_file():
            raise FileNotFoundError(f"pretrained checkpoint file {str(path)!r} does not exist")
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, **model_kwargs)
        state = _read_state_dict(path, trust_torchscript)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # position_ids style buffers are harmless; anything else is a wrong architecture
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(
                f"pretrained={str(path)!r} does not match arch={arch!r}: missing keys {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                f"{'...' if len(unexpected) > 5 else ''}"
            )
    else:
        tag = str(pretrained)
        if not allow_download and _cached_tag_file(arch, tag, cache_dir) is None:
            raise FileNotFoundError(
                f"open_clip weights {arch}/{tag} are not in the local cache and downloads are off: "
                "pass a local checkpoint file, or allow_download=True on a machine with network access"
            )
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=tag, cache_dir=cache_dir, **model_kwargs
        )
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(arch)
    return model, preprocess, tokenizer


def arch_image_size(arch: str) -> int | None:
    """The input image side an open_clip architecture's vision tower was built for (None if unknown)."""
    import open_clip

    _register_configs()
    cfg = open_clip.get_model_config(arch) or {}
    size = (cfg.get("vision_cfg") or {}).get("image_size")
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else None
    return int(size) if isinstance(size, int) else None


@dataclass
class TextTower:
    """The parts of a standard causal CLIP text tower that prompt encoding needs."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: object
    attn_mask: torch.Tensor | None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if self.text_projection is None:
            return x
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection

    @property
    def width(self) -> int:
        return self.token_embedding.weight.shape[1]

    @property
    def context_length(self) -> int:
        return self.positional_embedding.shape[0]


def text_tower(model) -> TextTower:
    """Validates that ``model`` has open_clip's standard causal text tower and returns its parts."""
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    absent = [name for name in needed if not hasattr(model, name)]
    if absent:
        raise ValueError(
            f"model ({type(model).__name__}) has no standard CLIP text tower (missing {absent}); "
            "guidg_fast supports open_clip CLIP models with the built-in causal text transformer"
        )
    pool = getattr(model, "text_pool_type", "argmax")
    if pool != "argmax":
        raise ValueError(f"model's text tower pools with {pool!r}; guidg_fast needs EOT-argmax pooling")
    if not getattr(model.transformer, "batch_first", True):
        raise ValueError("model's text transformer is sequence-first; guidg_fast expects open_clip's batch-first layout")
    attn_mask = getattr(model, "attn_mask", None)
    if attn_mask is None:
        raise ValueError("model's text tower has no causal attn_mask; guidg_fast needs a causal text tower")
    return TextTower(
        token_embedding=model.token_embedding,
        positional_embedding=model.positional_embedding,
        transformer=model.transformer,
        ln_final=model.ln_final,
        text_projection=model.text_projection,
        attn_mask=attn_mask,
    )


# ----------------------------------------------------------------------------- image embedding
# The pooled image embedding reads only the class token of the last block's output, and every
# op after the last block's attention is per-token: so the last block's queries, attention output,
# residuals, LayerNorm and MLP run for the class token alone; its keys and values still see every
# token. The same function and the same gradients (the skipped rows feed nothing), 6.9% fewer
# encoder FLOPs at ViT-B/16 (last block: qkv + out + MLP 9216 -> kv 1536 GEMM columns per token).
# Measured: bench/README.md, "class-token last block".
def cls_shortcut_ok(visual) -> bool:
    """True when ``visual`` is open_clip's plain VisionTransformer pooled at the class token (the
    layout the shortcut is written for); anything else runs its own forward."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if type(visual) is not VisionTransformer:
        return False
    tr = visual.transformer
    blocks = getattr(tr, "resblocks", None)
    if (visual.attn_pool is not None or visual.pool_type != "tok" or visual.output_tokens
            or not getattr(tr, "batch_first", False) or getattr(tr, "grad_checkpointing", False)
            or blocks is None or len(blocks) == 0):
        return False
    last = blocks[-1]
    return (type(last) is ResidualAttentionBlock and isinstance(last.attn, nn.MultiheadAttention)
            and not hasattr(last, "ln_1_kv") and last.attn.batch_first)


def image_embedding(visual, images: torch.Tensor) -> torch.Tensor:
    """``visual(images)`` (the projected class-token embedding, (B, D)) with the last block run
    for the class token only where ``cls_shortcut_ok(visual)``."""
    if not cls_shortcut_ok(visual):
        return visual(images)
    x = visual._embeds(images)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    last = blocks[-1]
    h = last.ln_1(x)
    cls = last.attn(h[:, :1], h, h, need_weights=False)[0]  # one query; keys and values of every token
    t = x[:, :1] + last.ls_1(cls)
    t = t + last.ls_2(last.mlp(last.ln_2(t)))
    pooled = visual.ln_post(t[:, 0])  # ln_post is per token: pooling before or after it is the same
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled


def encode_image(model, images: torch.Tensor) -> torch.Tensor:
    """``model.encode_image(images)`` (unnormalised) through ``image_embedding`` when ``model`` is an
    open_clip CLIP whose ``encode_image`` is open_clip's own; any other model's own method otherwise."""
    import open_clip

    own = getattr(type(model), "encode_image", None)
    if isinstance(model, (open_clip.CLIP, open_clip.CustomTextCLIP)) and own in (
            open_clip.CLIP.encode_image, open_clip.CustomTextCLIP.encode_image):
        return image_embedding(model.visual, images)
    return model.encode_image(images)
