"""What each CPU step-2 layer is worth: the step-2 encoder step (forward, backward, fused AdamW) at
ViT-B-16 with and without the class-token last block (backbone.image_embedding) and the steady
heap (train/host_memory.py). Each variant runs in a process of its own (a heap's state would
leak from one variant into the next), the variants one after another, ``--rounds`` times in
rotation so that drift in the machine's speed falls on all of them alike.

    python -m bench.ablate_step2 [--arch ViT-B-16] [--batch 36] [--rounds 2] [--steps 2]

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


VARIANTS = {  # name: (class-token last block, steady heap)
    "plain": (False, False),
    "class-token last block": (True, False),
    "steady heap": (False, True),
    "both (the trainer)": (True, True),
}


def one_variant(arch: str, batch: int, steps: int, cls: bool, steady: bool) -> list:
    """[(seconds, page faults)] of ``steps`` timed steps after one untimed one, in this process."""
    import guidg_fast as gf
    from guidg_fast.backbone import image_embedding
    from guidg_fast.train.host_memory import steady_heap

    torch.manual_seed(0)
    model, _, _ = gf.load_clip(arch)
    visual = model.visual.train().requires_grad_(True)
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    x = torch.randn(batch, 3, size, size)
    direction = torch.randn(int(visual.output_dim))
    opt = torch.optim.AdamW(visual.parameters(), lr=1e-12, fused=True)  # tiny lr: the weights stay put
    encode = (lambda: image_embedding(visual, x)) if cls else (lambda: visual(x))
    out = []
    with steady_heap("cpu") if steady else contextlib.nullcontext():
        for i in range(steps + 1):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            (F.normalize(encode(), dim=-1) @ direction).sum().backward()
            opt.step()
            dt = time.perf_counter() - t0
            if i > 0:
                out.append((dt, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0))
    return out


def main(argv=None) -> None:
    import json
    import subprocess
    import sys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--batch", type=int, default=36)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # the child's part
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(one_variant(args.arch, args.batch, args.steps, *VARIANTS[args.variant])))
        return
    times = {name: [] for name in VARIANTS}
    faults = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name in VARIANTS:
            proc = subprocess.run([sys.executable, "-m", "bench.ablate_step2", "--arch", args.arch, "--batch",
                                   str(args.batch), "--steps", str(args.steps), "--variant", name],
                                  capture_output=True, text=True, check=True)
            for dt, df in json.loads(proc.stdout.strip().splitlines()[-1]):
                times[name].append(dt)
                faults[name].append(df)
            print(f"round {r} {name}: " + ", ".join(f"{t:.2f} s" for t in times[name][-args.steps:]), flush=True)
    base = statistics.median(times["plain"])
    print(f"\n{args.arch}, {args.batch} images, {torch.get_num_threads()} threads, median of "
          f"{args.rounds} x {args.steps} steps, one process per variant and round:")
    for name in VARIANTS:
        m = statistics.median(times[name])
        print(f"  {name:24s} {m:7.2f} s/step  ({base / m:.3f}x; spread {min(times[name]):.2f}-{max(times[name]):.2f} s, "
              f"page faults {statistics.median(faults[name]):.0f})")


if __name__ == "__main__":
    main()
