"""eot_project, forward + backward, at the text-feature shapes of ViT-B-16 (W = D = 512): K = 3 experts
x C classes = N sequences of S suffix rows; fused kernels against the eager counterpart
``ops.eot_project_eager`` (gather, F.layer_norm, matmul, divide by the norm, torch autograd)."""
import torch

from ..harness import Entry
from guidg_fast import ops


def cases(quick):
    if quick:
        return [{"N": 60, "S": 10, "W": 512, "D": 512}]
    return [{"N": 600, "S": 10, "W": 512, "D": 512}, {"N": 195, "S": 10, "W": 512, "D": 512}]


def make(case, provider, device):
    g = torch.Generator().manual_seed(0)
    N, S, W, D = case["N"], case["S"], case["W"], case["D"]
    x = torch.randn(N, S, W, generator=g).to(device).requires_grad_(True)
    eot = torch.randint(0, S, (N,), generator=g).to(device)
    w = (1 + 0.1 * torch.randn(W, generator=g)).to(device).requires_grad_(True)
    b = (0.1 * torch.randn(W, generator=g)).to(device).requires_grad_(True)
    proj = (torch.randn(W, D, generator=g) / W**0.5).to(device).requires_grad_(True)
    grad_out = torch.randn(N, D, generator=g).to(device)
    fn = ops.eot_project_eager if provider == "reference" else ops.eot_project

    def run():
        for t in (x, w, b, proj):
            t.grad = None
        out = fn(x, eot, w, b, proj)
        out.backward(grad_out)
        return out.detach(), x.grad, w.grad, b.grad, proj.grad

    return run


def work(case):
    N, S, W, D = case["N"], case["S"], case["W"], case["D"]
    return {"flops": 3 * 2 * N * W * D}  # the three GEMMs dominate


ENTRY = Entry(
    name="eot_project", cases=cases, make=make, work=work,
    backend=lambda case, device: ops.choose("eot_project", torch.device(device)),
)
