"""Shared pieces of the text-pass bench entries: models, class lists, FLOP count, memory baseline."""
from __future__ import annotations

import torch

# OfficeHome's 65 classes (C = 65 in the design shapes)
OFFICE_HOME = [
    "Alarm_Clock", "Backpack", "Batteries", "Bed", "Bike", "Bottle", "Bucket", "Calculator", "Calendar", "Candles",
    "Chair", "Clipboards", "Computer", "Couch", "Curtains", "Desk_Lamp", "Drill", "Eraser", "Exit_Sign", "Fan",
    "File_Cabinet", "Flipflops", "Flowers", "Folder", "Fork", "Glasses", "Hammer", "Helmet", "Kettle", "Keyboard",
    "Knives", "Lamp_Shade", "Laptop", "Marker", "Monitor", "Mop", "Mouse", "Mug", "Notebook", "Oven", "Pan",
    "Paper_Clip", "Pen", "Pencil", "Postit_Notes", "Printer", "Push_Pin", "Radio", "Refrigerator", "Ruler",
    "Scissors", "Screwdriver", "Shelf", "Sink", "Sneakers", "Soda", "Speaker", "Spoon", "TV", "Table",
    "Telephone", "ToothBrush", "Toys", "Trash_Can", "Webcam",
]


def classnames(C: int) -> list[str]:
    """C class names: OfficeHome for C <= 65, else every (1000 // C)-th ImageNet class (ImageNet-R-sized lists)."""
    if C <= len(OFFICE_HOME):
        return OFFICE_HOME[:C]
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names = list(dict.fromkeys(IMAGENET_CLASSNAMES))
    step = max(1, len(names) // C)
    return names[::step][:C]


def text_model(arch: str, device: str):
    """A random-init CLIP whose text tower is ``arch``'s (the vision tower is token-sized: unused)."""
    import open_clip

    import guidg_fast as gf

    gf.load_clip(gf.TINY_ARCH) if arch == gf.TINY_ARCH else None  # registers the tiny config
    cfg = open_clip.get_model_config(arch)
    vision = dict(image_size=32, layers=1, width=64, patch_size=16, head_width=32)
    model = open_clip.model.CLIP(cfg["embed_dim"], vision, cfg["text_cfg"]).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # CoOp: both encoders frozen, only ctx trains
    return model


def text_config(arch: str) -> dict:
    import open_clip

    import guidg_fast as gf

    if open_clip.get_model_config(arch) is None:
        gf.load_clip(gf.TINY_ARCH)
    return open_clip.get_model_config(arch)


def text_pass_flops(arch: str, C: int, K: int, n_ctx: int = 16, backward: bool = True) -> float:
    """FLOPs the shared-prefix pass does (matmuls and attention; end position, generic context).

    Dense layers: 2 * rows * in * out; attention: 4 * W per (query, visible key) pair (QK^T and PV
    over all heads). Backward with frozen weights computes input gradients only: the dense part
    once more (less layer 0's QKV, whose suffix inputs are frozen), attention twice more (dQ, dK,
    dV, dP). Element-wise work is not counted.
    """
    import open_clip

    cfg = text_config(arch)
    text, D = cfg["text_cfg"], cfg["embed_dim"]
    W, layers = text["width"], text["layers"]
    mlp = int(W * text.get("mlp_ratio", 4.0))
    tokenizer = open_clip.get_tokenizer(arch)
    names = [c.replace("_", " ") for c in classnames(C)]
    prompt = " ".join(["X"] * n_ctx)
    eot = tokenizer([f"{prompt} {c}." for c in names]).argmax(dim=-1)
    P = 1 + n_ctx
    S = eot - P + 1  # suffix tokens per class
    T = K * int(S.sum())
    N = K * C
    qkv, out, ffn = 2 * W * 3 * W, 2 * W * W, 2 * 2 * W * mlp
    dense = (layers - 1) * T * (qkv + out + ffn) + T * qkv + N * (out + ffn)
    dense += K * P * ((layers - 1) * (qkv + out + ffn) + qkv)  # prefix pass
    pairs = K * sum(int(s) * P + int(s) * (int(s) + 1) // 2 for s in S)  # (query, key) pairs per layer
    attention = layers * pairs * 4 * W + (layers - 1) * K * (P * (P + 1) // 2) * 4 * W
    head = N * 2 * W * D
    if not backward:
        return float(dense + attention + head)
    # with a generic context at the end the suffix inputs are frozen: no input gradient of layer 0's QKV
    dense_backward = dense - T * qkv
    return float(dense + dense_backward + 3 * attention + 2 * head)


_RUNTIME_BYTES = 0.4e9  # interpreter + torch + open_clip in a fresh process, before any model


def _param_bytes(cfg: dict, tower: str) -> float:
    """fp32 bytes of a tower's weights (12 * width^2 per layer: QKV, out, 4x MLP), embeddings aside."""
    c = cfg[tower]
    return 4.0 * 12 * c["layers"] * c["width"] ** 2


def text_pass_bytes(arch: str, K: int, C: int, provider: str) -> float:
    """Estimated peak bytes of one expert text pass forward + backward in a fresh process (the
    harness's memory check). The reference keeps every layer's activations of K * C full 77-token
    sequences: ~13 (context, width) fp32 tensors per layer and sequence, calibrated on the committed
    CPU measurements (ViT-B-16 text tower: 5.2 GB at K * C = 195, 14.9 GB at 600, i.e. 24 MB per
    sequence). The fast pass keeps the suffix tokens only: 1.5 MB per sequence measured, 8% of the
    reference's counted here for margin."""
    cfg = text_config(arch)
    text = cfg["text_cfg"]
    per_sequence = 13 * text["layers"] * text.get("context_length", 77) * text["width"] * 4
    if provider == "fast":
        per_sequence *= 0.08
    return _RUNTIME_BYTES + _param_bytes(cfg, "text_cfg") + K * C * per_sequence


def vision_step_bytes(arch: str, B: int) -> float:
    """Estimated peak bytes of a vision-encoder training step on B images in a fresh process: the
    full CLIP's weights, the trained copy with its gradient and two AdamW moments, a BMA copy, and
    ~14 (tokens, width) fp32 activations per layer and image (calibrated on ViT-B/16, 36 images:
    4.9 GB measured on CPU, 6.4 GB estimated)."""
    cfg = text_config(arch)
    vision = cfg["vision_cfg"]
    size = vision["image_size"] if isinstance(vision["image_size"], int) else vision["image_size"][0]
    tokens = (size // vision["patch_size"]) ** 2 + 1
    weights = _param_bytes(cfg, "vision_cfg")
    activations = B * 14 * vision["layers"] * tokens * vision["width"] * 4
    return _RUNTIME_BYTES + _param_bytes(cfg, "text_cfg") + 6 * weights + activations
