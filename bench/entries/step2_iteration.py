"""One step-2 iteration with every GuiDG part: vision encoder forward+backward, CMAttn, multi-expert
loss, AdamW and BMA — the trainer's calls (fast: ops.guidance_loss, ops.bma_update_) vs the eager
reference ops and per-tensor BMA (reference).

The extras report what share of the iteration the GuiDG-specific parts (CMAttn + loss + BMA) take
next to the encoder's own forward+backward, for both providers.
"""
import copy

import torch
import torch.nn.functional as F

from ..harness import Entry, time_fn
from . import _text_common as common
from . import cmattn_loss
from guidg_fast import CrossModalAttention, ops, reference
from guidg_fast.averaging import BetaMovingAverage


def cases(quick):
    if quick:
        return [{"arch": "guidg-tiny", "B": 36, "K": 3, "C": 65}]
    return [{"arch": "ViT-B-16", "B": 36, "K": 3, "C": 65}]


_models = {}


def _setup(case, device):
    import guidg_fast as gf

    key = (case["arch"], device)
    if key not in _models:
        torch.manual_seed(0)
        model, _, _ = gf.load_clip(case["arch"], device=device)
        _models[key] = model
    model = _models[key]
    visual = copy.deepcopy(model.visual).train().requires_grad_(True)
    size = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(case["B"], 3, size, size, generator=g).to(device)
    y = torch.randint(0, case["C"], (case["B"],), generator=g).to(device)
    D = model.visual.output_dim
    T = F.normalize(torch.randn(case["K"], case["C"], D, generator=g), dim=-1).to(device)
    torch.manual_seed(2)  # the same CMAttn init for both providers
    attn = CrossModalAttention(D, case["C"]).to(device)
    return visual, attn, x, y, T


def _guidg_parts(provider, attn, f, y, T):
    """The guided loss as each side computes it: the trainer's one call (GuiDG.step2_loss ->
    ops.guidance_loss) for fast, the CMAttn module, batch mean and loss on the eager ops (the
    reference's per-head / per-expert loops) for reference."""
    if provider == "reference":
        with ops.use_backend("eager"):
            w = attn(f, T).mean(0)
            return ops.multi_expert_loss(f, T, y, w, 100.0, margin=0.3)
    loss, _ = ops.guidance_loss(f, T, y, *attn.stacked_parameters(), 100.0, margin=0.3, metric=attn.metric)
    return loss


def make(case, provider, device):
    visual, attn, x, y, T = _setup(case, device)
    params = list(visual.parameters()) + list(attn.parameters())
    opt = torch.optim.AdamW(params, lr=5e-6, weight_decay=0.1, fused=True)
    bma = BetaMovingAverage(visual, total_steps=100)
    update = reference.bma_update_ if provider == "reference" else ops.bma_update_
    vparams = list(visual.parameters())

    def run():
        f = F.normalize(visual(x), dim=-1)
        loss = _guidg_parts(provider, attn, f, y, T)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update(list(bma.moving_avg.parameters()), vparams, 0.01)
        return (loss.detach(),)

    return run


def extras(case, device, quick):
    visual, attn, x, y, T = _setup(case, device)
    repeats = 2 if quick else 3
    out = {}

    def encoder():
        f = visual(x)
        f.sum().backward()
        visual.zero_grad(set_to_none=True)

    out["encoder_fwd_bwd_ms"] = time_fn(encoder, device, warmup=1, repeats=repeats)["median_ms"]
    with torch.no_grad():
        f0 = F.normalize(visual(x), dim=-1)
    vparams = list(visual.parameters())
    bma = BetaMovingAverage(visual, total_steps=100)
    for provider in ("reference", "fast"):
        update = reference.bma_update_ if provider == "reference" else ops.bma_update_

        def parts():
            f = f0.clone().requires_grad_(True)
            loss = _guidg_parts(provider, attn, f, y, T)
            loss.backward()
            attn.zero_grad(set_to_none=True)
            update(list(bma.moving_avg.parameters()), vparams, 0.01)

        ms = time_fn(parts, device, warmup=1, repeats=max(repeats, 5))["median_ms"]
        out[f"guidg_parts_{provider}_ms"] = ms
        out[f"guidg_parts_{provider}_share_of_encoder"] = ms / out["encoder_fwd_bwd_ms"]
    return out


def _backend_label(device):
    d = torch.device(device)
    loss = cmattn_loss._backend_label(device)  # guidance_loss: the two ops' backends
    return f"{loss}+bma_update_:{ops.choose('bma_update_', d)}"


ENTRY = Entry(
    name="step2_iteration", cases=cases, make=make, extras=extras, repeats=3, quick_repeats=2,
    backend=lambda case, device: _backend_label(device),
    memory=lambda case, provider, device: common.vision_step_bytes(case["arch"], case["B"]),
    release=_models.clear,
)
