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
