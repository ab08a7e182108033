"""multi_expert_loss forward + backward as in step-2 training: grads to f and w, T frozen, margin 0.3.

B = 36 (12 per source domain x 3), K = 3 experts, D = 512 (ViT-B/16), C over the benchmark datasets.
"""
import torch
import torch.nn.functional as F

from ..harness import Entry
from guidg_fast import ops, reference

B, K, D = 36, 3, 512
MARGIN = 0.3
TAU = 100.0


def cases(quick):
    classes = (7, 65) if quick else (7, 65, 200, 345, 1000)
    return [{"B": B, "K": K, "C": c, "D": D} for c in classes]


def make(case, provider, device):
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(case["B"], case["D"], generator=g), dim=-1).to(device).requires_grad_()
    T = F.normalize(torch.randn(case["K"], case["C"], case["D"], generator=g), dim=-1).to(device)
    y = torch.randint(0, case["C"], (case["B"],), generator=g).to(device)
    w = torch.softmax(torch.randn(case["K"], generator=g), dim=0).to(device).requires_grad_()
    impl = reference.multi_expert_loss if provider == "reference" else ops.multi_expert_loss

    def run():
        loss = impl(f, T, y, w, TAU, margin=MARGIN)
        df, dw = torch.autograd.grad(loss, (f, w))
        return loss.detach(), df, dw

    return run


def work(case):
    # the reference's two (B x D) @ (D x C) products per expert: logits forward, feature gradient backward
    return {"flops": 2 * 2.0 * case["B"] * case["K"] * case["C"] * case["D"]}


ENTRY = Entry(
    name="multi_expert_loss", cases=cases, make=make, work=work,
    backend=lambda case, device: ops.choose("multi_expert_loss", torch.device(device)),
)
