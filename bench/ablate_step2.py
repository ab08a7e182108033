"""What each CPU step-2 layer is worth: the step-2 encoder step (forward, backward, fused AdamW) at
ViT-B-16 with and without the class-token last block (backbone.image_embedding) and the steady
heap (train/host_memory.py), the four variants in rotation so that drift in the machine's speed
falls on all of them alike.

    python -m bench.ablate_step2 [--arch ViT-B-16] [--batch 36] [--rounds 3]

Prints the median seconds per step of each variant and its ratio to the plain one (the numbers
quoted in the layers' header comments and in bench/README.md).
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time

import torch
import torch.nn.functional as F


def main(argv=None) -> None:
    import guidg_fast as gf
    from guidg_fast.backbone import image_embedding
    from guidg_fast.train.host_memory import steady_heap

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--batch", type=int, default=36)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, _, _ = gf.load_clip(args.arch)
    visual = model.visual.train().requires_grad_(True)
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    x = torch.randn(args.batch, 3, size, size)
    direction = torch.randn(int(visual.output_dim))
    opt = torch.optim.AdamW(visual.parameters(), lr=1e-12, fused=True)  # tiny lr: the weights stay put

    def step(encode):
        opt.zero_grad(set_to_none=True)
        f = F.normalize(encode(), dim=-1)
        (f @ direction).sum().backward()
        opt.step()

    variants = {
        "plain (visual(x), glibc defaults)": (lambda: visual(x), False),
        "class-token last block": (lambda: image_embedding(visual, x), False),
        "steady heap": (lambda: visual(x), True),
        "both (the trainer)": (lambda: image_embedding(visual, x), True),
    }
    times = {name: [] for name in variants}
    faults = {name: [] for name in variants}
    for r in range(args.rounds + 1):  # round 0 warms every variant (first-touch, the optimizer state)
        for name, (encode, steady) in variants.items():
            with steady_heap("cpu") if steady else contextlib.nullcontext():
                if steady:
                    step(encode)  # the heap's first step inside the block fills it: untimed
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                step(encode)
                dt = time.perf_counter() - t0
                df = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            if r > 0:
                times[name].append(dt)
                faults[name].append(df)
            print(f"round {r} {name}: {dt:.2f} s, {df} page faults", flush=True)
    base = statistics.median(times["plain (visual(x), glibc defaults)"])
    print(f"\n{args.arch}, {args.batch} images, {torch.get_num_threads()} threads, median of {args.rounds}:")
    for name in variants:
        m = statistics.median(times[name])
        print(f"  {name:36s} {m:7.2f} s/step  ({base / m:.3f}x; spread {min(times[name]):.2f}-{max(times[name]):.2f} s, "
              f"page faults {statistics.median(faults[name]):.0f})")


if __name__ == "__main__":
    main()
