"""bma_update_ over the parameters of a ViT-B-16 vision tower (152 tensors, ~86M values)."""
import torch

from ..harness import Entry
from guidg_fast import ops, reference


def _tensors(case, device):
    import open_clip

    if case["model"] == "ViT-B-16":
        torch.manual_seed(0)  # same random weights for every provider, so the parity figure means something
        model = open_clip.create_model("ViT-B-16", pretrained=None).visual
        params = [p.detach().to(device) for p in model.parameters()]
    else:  # quick: a few tensors of the same kind of sizes
        g = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=g).to(device) for s in ((768, 768), (3072, 768), (768,), (50, 768))]
    averaged = [p.clone() for p in params]
    return averaged, params


def cases(quick):
    return [{"model": "small"}] if quick else [{"model": "ViT-B-16"}]


def make(case, provider, device):
    averaged, params = _tensors(case, device)
    impl = reference.bma_update_ if provider == "reference" else ops.bma_update_

    def run():
        impl(averaged, params, 0.01)
        return (averaged[0],)

    return run


def work(case):
    n = 86_192_640 if case["model"] == "ViT-B-16" else 768 * 768 + 3072 * 768 + 768 + 50 * 768
    return {"bytes": 3 * 4 * n}  # read avg, read theta, write avg (fp32)


ENTRY = Entry(
    name="bma_update_", cases=cases, make=make, work=work,
    backend=lambda case, device: ops.choose("bma_update_", torch.device(device)),
)
