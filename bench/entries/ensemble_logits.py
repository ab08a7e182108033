"""ensemble_logits: GuiDG inference logits tau * sum_k w_k f @ T_k^T for ViT-B/16 features.

Main cases: inference forward (no grad), B = 36, K = 3 experts, D = 512, batch weights (the official
inference), C over the benchmark datasets' class counts. Extra full-mode cases: per-sample weights
and a forward + backward training-style call (gradients to f and w, T frozen as in step 2).
"""
import torch
import torch.nn.functional as F

from ..harness import Entry
from guidg_fast import ops, reference

TAU = 100.0


def cases(quick):
    classes = (7, 65) if quick else (7, 65, 200, 345, 1000)
    rows = [{"B": 36, "K": 3, "D": 512, "C": c, "weights": "batch", "mode": "inference"} for c in classes]
    if not quick:
        rows.append({"B": 36, "K": 3, "D": 512, "C": 1000, "weights": "per_sample", "mode": "inference"})
        rows.append({"B": 36, "K": 3, "D": 512, "C": 1000, "weights": "batch", "mode": "train"})
        rows.append({"B": 36, "K": 3, "D": 512, "C": 1000, "weights": "per_sample", "mode": "train"})
    return rows


def make(case, provider, device):
    B, K, D, C = case["B"], case["K"], case["D"], case["C"]
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(B, D, generator=g), dim=-1).to(device)
    T = F.normalize(torch.randn(K, C, D, generator=g), dim=-1).to(device)
    shape = (B, K) if case["weights"] == "per_sample" else (K,)
    w = torch.softmax(torch.randn(shape, generator=g), dim=-1).to(device)
    impl = reference.ensemble_logits if provider == "reference" else ops.ensemble_logits

    if case["mode"] == "inference":
        def run():
            with torch.no_grad():
                return (impl(f, T, w, TAU),)

        return run

    upstream = torch.randn(B, C, generator=g).to(device)

    def run():
        f_ = f.detach().requires_grad_()
        w_ = w.detach().requires_grad_()
        out = impl(f_, T, w_, TAU)
        out.backward(upstream)
        return out.detach(), f_.grad, w_.grad

    return run


def work(case):
    # the math of the op as the official code computes it (K products); the fused backends do less
    B, K, D, C = case["B"], case["K"], case["D"], case["C"]
    flops = 2 * B * K * C * D
    return {"flops": flops * (3 if case["mode"] == "train" else 1)}


ENTRY = Entry(
    name="ensemble_logits", cases=cases, make=make, work=work,
    backend=lambda case, device: ops.choose("ensemble_logits", torch.device(device)),
    repeats=50, quick_repeats=10,
)
