"""cmattn_loss: the guidance part of a step-2 training step, cmattn + multi_expert_loss forward + backward.

Exactly what GuiDG.step2_loss runs after the vision encoder, in batch-weight mode (the official
code's): w = mean_b cmattn(f.detach(), T) (B, K) -> (K,), loss = multi_expert_loss(f, T, y, w) with
CLIPood's margin 0.3, then one backward to f (the encoder's features) and to the four CMAttn
parameters. Fast: ``ops.guidance_loss`` (the call step2_loss makes: the two ops' custom ops
composed). Reference: the two reference ops and the batch mean in one
autograd graph. Shapes: B = 36 (12 images per source domain x 3 experts), K = 3, H = 4 heads,
D = 512 (ViT-B/16), C over the benchmark datasets.
"""
import torch

from ..harness import Entry
from . import cmattn as _cmattn
from guidg_fast import ops, reference

MARGIN = 0.3
TAU = 100.0


def cases(quick):
    return [dict(case) for case in _cmattn.cases(quick)]


def make(case, provider, device, dtype=torch.float32):
    f, T, params, _ = _cmattn._inputs(case, device)
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, case["C"], (case["B"],), generator=g).to(device)
    f, T = f.to(dtype).requires_grad_(), T.to(dtype)
    params = [p.detach().to(dtype).requires_grad_() for p in params]
    if provider == "reference":
        def run():
            w = reference.cross_modal_attention(f.detach(), T, *params, metric=case["metric"]).mean(dim=0)
            loss = reference.multi_expert_loss(f, T, y, w, TAU, margin=MARGIN)
            grads = torch.autograd.grad(loss, [f, *params])
            return (loss.detach(), w.detach(), *grads)
        return run

    def run():
        loss, w = ops.guidance_loss(f, T, y, *params, TAU, margin=MARGIN, metric=case["metric"], weights="batch")
        grads = torch.autograd.grad(loss, [f, *params])
        return (loss.detach(), w, *grads)

    return run


def _backend_label(device):
    d = torch.device(device)
    return f"cmattn:{ops.choose('cmattn', d)}+multi_expert_loss:{ops.choose('multi_expert_loss', d)}"


def oracle(case, device):
    # the CMAttn weights feed the loss through a mean over the batch and a softmax over experts: in
    # fp32 the parameter gradients carry ~1e-5 relative rounding error in the reference too, so
    # parity is measured against the reference in float64
    return make(case, "reference", device, dtype=torch.float64)()


def work(case):
    b, k, c, d = case["B"], case["K"], case["C"], case["D"]
    # cmattn's GEMMs and scores (as in the cmattn entry) + the loss's logits forward and feature gradient
    return {"flops": _cmattn.work(case)["flops"] + 2 * 2.0 * b * k * c * d}


ENTRY = Entry(
    name="cmattn_loss", cases=cases, make=make, work=work, oracle=oracle, repeats=40, quick_repeats=5,
    backend=lambda case, device: _backend_label(device),
)
