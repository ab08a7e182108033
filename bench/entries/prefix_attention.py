"""prefix_attention, forward + backward, at the shared-prefix text pass shapes of ViT-B-16 (W = 512,
H = 8 heads of Dh = 64, K = 3 experts, P = 17 prefix tokens [SOS + 16 ctx], S = 8 suffix tokens,
M = 200 classes), fused kernels (the default backend: ext, or Triton on CUDA without a CUDA build) against the eager counterpart
``ops.prefix_attention_eager`` (the reference has no such op: it runs full 77-token passes).

The q/k/v inputs are slices of one fused QKV projection output, as in the text pass.
"""
import torch

from ..harness import Entry
from guidg_fast import ops


def cases(quick):
    if quick:
        return [{"K": 3, "M": 20, "S": 8, "P": 17, "H": 8, "Dh": 64}]
    return [
        {"K": 3, "M": 200, "S": 8, "P": 17, "H": 8, "Dh": 64},
        {"K": 3, "M": 65, "S": 8, "P": 17, "H": 8, "Dh": 64},
    ]


def _inputs(case, device):
    g = torch.Generator().manual_seed(0)
    K, M, S, P, H, Dh = (case[n] for n in ("K", "M", "S", "P", "H", "Dh"))
    qkv = torch.randn(K, M, S, 3, H, Dh, generator=g).to(device)
    kvp = torch.randn(K, P, 2, H, Dh, generator=g).to(device)
    grad_out = torch.randn(K, M, S, H, Dh, generator=g).to(device)
    return qkv.requires_grad_(True), kvp.requires_grad_(True), grad_out


def make(case, provider, device):
    qkv, kvp, grad_out = _inputs(case, device)
    fn = ops.prefix_attention_eager if provider == "reference" else ops.prefix_attention

    def run():
        qkv.grad = kvp.grad = None
        q, k, v = qkv.unbind(dim=3)
        kp, vp = kvp.unbind(dim=2)
        out = fn(q, k, v, kp, vp)
        out.backward(grad_out)
        return out.detach(), qkv.grad, kvp.grad

    return run


def work(case):
    K, M, S, P, H, Dh = (case[n] for n in ("K", "M", "S", "P", "H", "Dh"))
    keys = sum(P + s + 1 for s in range(S))  # (query, key) pairs of one (k, m, h)
    # forward: QK^T and PV (2 * 2 * Dh per pair); backward: QK^T, dO V^T, dQ, dK, dV (5 * 2 * Dh)
    return {"flops": K * M * H * keys * Dh * 2 * (2 + 5)}


ENTRY = Entry(
    name="prefix_attention", cases=cases, make=make, work=work,
    backend=lambda case, device: ops.choose("prefix_attention", torch.device(device)),
)
