"""One step-1 iteration for all K experts: forward, loss, backward, SGD step on the contexts.

fast: cached image features (ImageFeatureCache, built once outside the timed call) + the
shared-prefix text pass of all experts + (B, D) x (D, C) logits per expert + CE + backward + SGD.
reference (official structure): every step re-encodes the K*B images with the frozen image encoder
and runs K full-length (77-token) text passes, then the same loss, backward and SGD step.
ViT-B-16 (random init), K = 3, C = 200, B = 32 images per expert. Quick: tiny config, C = 20, B = 8.
"""
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import guidg_fast as gf
from . import _text_common as common
from ..harness import Entry
from guidg_fast import ops, reference
from guidg_fast.train.feature_cache import ImageFeatureCache


def cases(quick):
    if quick:
        return [{"arch": gf.TINY_ARCH, "K": 3, "C": 20, "B": 8}]
    return [{"arch": "ViT-B-16", "K": 3, "C": 200, "B": 32}]


def make(case, provider, device):
    K, C, B = case["K"], case["C"], case["B"]
    torch.manual_seed(0)  # same weights, contexts and images for both providers
    model, _, tokenizer = gf.load_clip(case["arch"], device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    learner = gf.ExpertPromptLearner(model, tokenizer, common.classnames(C), num_experts=K, n_ctx=16)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    g = torch.Generator().manual_seed(1)
    images = torch.randn(K, B, 3, size, size, generator=g).to(device)  # batch k comes from domain k
    labels = torch.randint(0, C, (K, B), generator=g).to(device)
    tau = model.logit_scale.exp().detach()
    optimizer = torch.optim.SGD([learner.ctx], lr=1e-4)

    if provider == "reference":

        def run():
            optimizer.zero_grad(set_to_none=True)
            text = reference.encode_expert_prompts(model, learner)  # K full-length passes
            loss = 0.0
            for k in range(K):  # one expert run after another, as the official scripts
                with torch.no_grad():
                    f = F.normalize(model.encode_image(images[k]), dim=-1)
                loss = loss + F.cross_entropy(tau * f @ text[k].t(), labels[k])
            loss.backward()
            grad = learner.ctx.grad.clone()
            optimizer.step()
            return loss.detach(), grad

        return run

    dataset = TensorDataset(images.flatten(0, 1).cpu(), labels.flatten().cpu())
    cache = ImageFeatureCache(model, dataset, batch_size=32, device=device).load_or_build()
    batch = torch.arange(K * B, device=device)

    def run():
        optimizer.zero_grad(set_to_none=True)
        text = gf.encode_expert_prompts(model, learner)  # (K, C, D), one shared-prefix pass
        f, y = cache.get(batch, view=0)
        logits = tau * torch.bmm(f.view(K, B, -1), text.transpose(1, 2))  # (K, B, C)
        loss = F.cross_entropy(logits.flatten(0, 1), y, reduction="none").view(K, B).mean(dim=1).sum()
        loss.backward()
        grad = learner.ctx.grad.clone()
        optimizer.step()
        return loss.detach(), grad

    return run


def work(case):
    K, C, B = case["K"], case["C"], case["B"]
    D = common.text_config(case["arch"])["embed_dim"]
    return {"flops": common.text_pass_flops(case["arch"], C, K) + 2 * 2 * K * B * C * D}


def memory(case, provider, device):
    """The text pass (the reference's dominates: ~15 GB at K * C = 600) plus the vision tower, the
    images and, for fast, the feature cache (common.text_pass_bytes)."""
    images = case["K"] * case["B"] * 3 * 224 * 224 * 4
    return common.text_pass_bytes(case["arch"], case["K"], case["C"], provider) + 0.4e9 + 2 * images


ENTRY = Entry(
    name="step1_iteration", cases=cases, make=make, work=work,
    backend=lambda case, device: ops.choose("prefix_attention", torch.device(device)),
    repeats=2, quick_repeats=2, fast_repeats=7,
    memory=memory,
)
