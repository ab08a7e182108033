"""cmattn: cross-modal attention forward + backward as in a step-2 training step.

B = 36 images (12 per source domain, 3 experts), H = 4 heads, D = 512 (ViT-B/16), C classes of
the DomainBed / ImageNet-DG datasets. f and T are detached (as CrossModalAttention does), so the
gradients are those of the module's parameters: wv, bv, wt, bt.
"""
import torch
import torch.nn.functional as F

from ..harness import Entry
from guidg_fast import ops, reference

B, K, H, D = 36, 3, 4, 512


def cases(quick):
    classes = (7, 65) if quick else (7, 65, 200, 345, 1000)
    return [{"B": B, "K": K, "H": H, "D": D, "C": c, "metric": "cosine"} for c in classes]


def _inputs(case, device):
    g = torch.Generator().manual_seed(0)
    b, k, h, d, c = case["B"], case["K"], case["H"], case["D"], case["C"]
    f = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    T = F.normalize(torch.randn(k, c, d, generator=g), dim=-1)
    # nn.Linear's default init, as CrossModalAttention starts from
    wv = (torch.rand(h, d, d, generator=g) * 2 - 1) / d**0.5
    bv = (torch.rand(h, d, generator=g) * 2 - 1) / d**0.5
    wt = (torch.rand(h, c, generator=g) * 2 - 1) / c**0.5
    bt = (torch.rand(h, generator=g) * 2 - 1) / c**0.5
    grad_out = torch.randn(b, k, generator=g)
    params = [p.to(device).requires_grad_() for p in (wv, bv, wt, bt)]
    return f.to(device), T.to(device), params, grad_out.to(device)


def make(case, provider, device):
    f, T, params, grad_out = _inputs(case, device)
    impl = reference.cross_modal_attention if provider == "reference" else ops.cross_modal_attention

    def run():
        out = impl(f, T, *params, metric=case["metric"])
        grads = torch.autograd.grad(out, params, grad_out)
        return (out, *grads)

    return run


def work(case):
    b, k, h, d, c = case["B"], case["K"], case["H"], case["D"], case["C"]
    # forward: v-projection + class pooling + scores; backward: dWv + dwt + scores again
    gemm = 2 * b * d * h * d + 2 * h * c * k * d
    return {"flops": 2 * gemm + 3 * 2 * b * h * k * d}


ENTRY = Entry(
    name="cmattn", cases=cases, make=make, work=work,
    backend=lambda case, device: ops.choose("cmattn", torch.device(device)),
)
