"""encode_expert_prompts, forward + backward w.r.t. ctx: shared-prefix pass vs one full-length pass per expert.

ViT-B-16 text tower (random init, frozen), K = 3 experts, n_ctx = 16, class token at the end,
C in {65, 200} (OfficeHome names; 200 ImageNet names). Quick: the tiny config, C = 20.
"""
import torch

import guidg_fast as gf
from . import _text_common as common
from ..harness import Entry
from guidg_fast import ops, reference


def cases(quick):
    if quick:
        return [{"arch": gf.TINY_ARCH, "K": 3, "C": 20}]
    return [{"arch": "ViT-B-16", "K": 3, "C": 65}, {"arch": "ViT-B-16", "K": 3, "C": 200}]


def make(case, provider, device):
    import open_clip

    torch.manual_seed(0)  # same weights and contexts for both providers
    model = common.text_model(case["arch"], device)
    tokenizer = open_clip.get_tokenizer(case["arch"])
    learner = gf.ExpertPromptLearner(model, tokenizer, common.classnames(case["C"]), num_experts=case["K"], n_ctx=16)
    grad_out = torch.randn(case["K"], case["C"], model.text_projection.shape[1], generator=torch.Generator().manual_seed(1)).to(device)
    impl = reference.encode_expert_prompts if provider == "reference" else gf.encode_expert_prompts

    def run():
        learner.ctx.grad = None
        features = impl(model, learner)
        features.backward(grad_out)
        return features.detach(), learner.ctx.grad

    return run


def work(case):
    return {"flops": common.text_pass_flops(case["arch"], case["C"], case["K"])}


ENTRY = Entry(
    name="expert_text", cases=cases, make=make, work=work,
    backend=lambda case, device: ops.choose("prefix_attention", torch.device(device)),
    repeats=2, quick_repeats=2, fast_repeats=7,
    memory=lambda case, provider, device: common.text_pass_bytes(case["arch"], case["K"], case["C"], provider),
)
