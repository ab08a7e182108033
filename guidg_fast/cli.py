"""The ``guidg-fast`` command."""
from __future__ import annotations

import argparse
import json
import sys
import time


def _versions() -> dict:
    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    for name, module in (("triton", "triton"), ("open_clip", "open_clip")):
        try:
            out[name] = __import__(module).__version__
        except Exception as exc:  # report, do not fail: info is a diagnostic
            out[name] = f"not available ({exc.__class__.__name__})"
    out["cuda_available"] = torch.cuda.is_available()
    return out


def info_dict() -> dict:
    from . import __version__, ops
    from .ops import _backend
    from . import text  # noqa: F401  registers encode_expert_prompts

    backends = {
        name: {"cpu": _backend.describe(name, "cpu"), "cuda": _backend.describe(name, "cuda")}
        for name in _backend.REGISTRY
    }
    return {
        "guidg_fast": __version__,
        **_versions(),
        "extension": ops.extension_status(),
        "forced_backend": _backend.forced_backend(),
        "backends": backends,
    }


def cmd_info(args) -> int:
    data = info_dict()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    ext = data["extension"]
    print(f"guidg-fast {data['guidg_fast']}")
    print(f"python {data['python']}  torch {data['torch']} (CUDA {data['torch_cuda']}, "
          f"GPU available: {data['cuda_available']})  triton {data['triton']}  open_clip {data['open_clip']}")
    if ext["built"]:
        print(f"extension guidg_fast._C: built, CUDA kernels {'compiled in' if ext['with_cuda'] else 'NOT compiled'}")
    else:
        print(f"extension guidg_fast._C: NOT built ({ext['error']})")
    if data["forced_backend"]:
        print(f"forced backend (GUIDG_FAST_BACKEND): {data['forced_backend']}")
    print(f"{'op':<24}{'CPU backend':<30}{'CUDA backend'}")
    for name, where in data["backends"].items():
        print(f"{name:<24}{where['cpu']:<30}{where['cuda']}")
    return 0


def cmd_demo(args) -> int:
    """A tiny GuiDG run on random data: a few step-1 updates of all experts, then guided step-2 updates."""
    import torch

    import guidg_fast as gf

    torch.manual_seed(args.seed)
    cmd_info(argparse.Namespace(json=False))
    print()
    model, _, tokenizer = gf.load_clip(gf.TINY_ARCH)
    classnames = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    K, C, B = 3, len(classnames), 12
    learner = gf.ExpertPromptLearner(model, tokenizer, classnames, num_experts=K, n_ctx=4)
    tau = float(model.logit_scale.detach().exp())
    # step 1: every expert on its own domain's (random) frozen image features
    feats = torch.nn.functional.normalize(torch.randn(K, B, model.text_projection.shape[1]), dim=-1)
    labels = torch.randint(0, C, (K, B))
    opt = torch.optim.SGD([learner.ctx], lr=args.lr)
    t0 = time.perf_counter()
    for it in range(args.steps):
        T = gf.encode_expert_prompts(model, learner)
        loss = sum(torch.nn.functional.cross_entropy(tau * feats[k] @ T[k].t(), labels[k]) for k in range(K))
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step 1 iter {it}: summed expert loss {loss.item():.4f}")
    print(f"step 1: {args.steps} iterations in {time.perf_counter() - t0:.2f} s")
    # step 2: guided fine-tuning of the vision encoder
    with torch.no_grad():
        T = gf.encode_expert_prompts(model, learner)
    attn = gf.CrossModalAttention(T.shape[-1], C)
    bma = gf.BetaMovingAverage(model.visual, beta=0.1, total_steps=args.steps)
    params = list(model.visual.parameters()) + list(attn.parameters())
    opt2 = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
    images = torch.randn(B, 3, 32, 32)
    y = torch.randint(0, C, (B,))
    t0 = time.perf_counter()
    for it in range(args.steps):
        f = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        w = attn(f, T).mean(dim=0)
        loss = gf.ops.multi_expert_loss(f, T, y, w, tau, margin=0.3)
        opt2.zero_grad()
        loss.backward()
        opt2.step()
        bma.update()
        print(f"step 2 iter {it}: loss {loss.item():.4f}  expert weights {[round(v, 3) for v in w.tolist()]}")
    print(f"step 2: {args.steps} iterations in {time.perf_counter() - t0:.2f} s")
    with torch.no_grad():
        f = torch.nn.functional.normalize(bma.module(images), dim=-1)
        w = attn(f, T).mean(dim=0)
        acc = (gf.ops.ensemble_logits(f, T, w, tau).argmax(-1) == y).float().mean().item()
    print(f"ensemble top-1 on the step-2 batch (BMA weights): {100 * acc:.1f}%")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guidg-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, extension build, and the backend each op uses on CPU and CUDA")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON (default: a table)")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("demo", help="a tiny two-step GuiDG run on the CPU (random-init tiny CLIP)")
    p.add_argument("--steps", type=int, default=3, help="iterations of each step (default: 3)")
    p.add_argument("--lr", type=float, default=2e-3, help="step-1 SGD learning rate (default: 2e-3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
