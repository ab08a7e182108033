"""Step-2 throughput on 1 rank ("reference") and on N ranks ("fast") with torch.distributed.

Each provider is a pool of persistent rank processes (spawned once per case, torchrun's environment
variables set by hand, one torch thread per rank on the CPU, gloo; NCCL and one GPU per rank on
CUDA). One timed call = one step-2 iteration of the trainer's distributed path on the same global
batch (the trainer's Step2Iteration: DDP encoder forward on the rank's rows, the feature gather,
the global guidance loss and its backward, the encoder backward, fused AdamW, BMA) on every rank.
Parity compares the first iteration's loss of the two pools: the same global batch, so the same
loss up to fp32 reduction order. The extras give images per second for each pool and the scaling
efficiency (N-rank img/s / (N x 1-rank img/s)).

On CUDA the fast pool has one rank per visible GPU (a one-GPU machine measures 1 vs 1 rank).
"""
import atexit
import os
import socket
import statistics
import time

import torch

from ..harness import Entry

_DOMAINS = ["a", "b", "c"]


def _world(device: str) -> int:
    if device.startswith("cuda"):
        return max(1, torch.cuda.device_count())
    return 2


def cases(quick):
    if quick:
        return [{"arch": "guidg-tiny", "B": 12, "K": 3, "C": 7}]
    return [{"arch": "ViT-B-16", "B": 36, "K": 3, "C": 65}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_loop(rank, world, port, case, device, conn):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
    if world == 1:  # a plain one-process run: no group at all
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(key)
    if not device.startswith("cuda"):
        torch.set_num_threads(1)
    from guidg_fast.averaging import BetaMovingAverage
    from guidg_fast.train import GuiDG, distributed
    from guidg_fast.train.steps import PhaseTimer, Step2Iteration

    model = GuiDG(case["arch"], None, [f"class {i}" for i in range(case["C"])], _DOMAINS[: case["K"]],
                  device="cuda" if device.startswith("cuda") else "cpu", n_ctx=4)
    model.refresh_expert_features()
    visual = model.model.visual.train().requires_grad_(True)
    encode, global_batch, rows = model.step2_distributed(visual, case["B"])
    params = list(visual.parameters()) + list(model.attn.parameters())
    optimizer = torch.optim.AdamW(params, lr=5e-6, weight_decay=0.1, fused=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=1000)
    bma = BetaMovingAverage(visual, total_steps=1000)
    iteration = Step2Iteration(encode, model._guidance_loss, optimizer, scheduler, bma, None, global_batch=global_batch)
    timer = PhaseTimer(None, model.device)
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    g = torch.Generator().manual_seed(1)  # the same global batch in every pool
    x = torch.randn(case["B"], 3, size, size, generator=g)
    y = torch.randint(0, case["C"], (case["B"],), generator=g)
    if rows is not None:
        x, y = x[rows[0] : rows[1]], y[rows[0] : rows[1]]
    x, y = x.to(model.device), y.to(model.device)
    conn.send("ready")
    while True:
        command = conn.recv()
        if command == "stop":
            break
        t0 = time.perf_counter()
        loss = iteration(x, y, timer)
        value = float(loss)  # also waits for the device
        conn.send((value, time.perf_counter() - t0))
    distributed.shutdown()


class _Pool:
    def __init__(self, case, world, device):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        port = _free_port()
        self.conns, self.procs = [], []
        for r in range(world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_rank_loop, args=(r, world, port, case, device, child), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        for c, p in zip(self.conns, self.procs):
            if not c.poll(600) or c.recv() != "ready":
                self.close()
                raise RuntimeError(f"ddp_scaling: rank process {p.pid} did not start (exit code {p.exitcode})")
        self.seconds: list = []

    def step(self):
        for c in self.conns:
            c.send("step")
        replies = [c.recv() for c in self.conns]
        self.seconds.append(max(s for _, s in replies))
        return replies[0][0]

    def close(self):
        for c, p in zip(self.conns, self.procs):
            try:
                c.send("stop")
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


_pools: dict = {}


def _key(case, provider, device):
    return (tuple(sorted(case.items())), provider, device)


def _pool(case, provider, device):
    key = _key(case, provider, device)
    if key not in _pools:
        _pools[key] = _Pool(case, 1 if provider == "reference" else _world(device), device)
    return _pools[key]


@atexit.register
def _close_pools():
    for pool in _pools.values():
        pool.close()
    _pools.clear()


def make(case, provider, device):
    pool = _pool(case, provider, device)

    def run():
        return (torch.tensor(pool.step(), dtype=torch.float64),)

    return run


def extras(case, device, quick):
    out = {"ranks": _world(device)}
    rates = {}
    for provider, label in (("reference", "1_rank"), ("fast", f"{_world(device)}_ranks")):
        pool = _pools.get(_key(case, provider, device))
        if pool is None or not pool.seconds:
            continue
        # the first call builds DDP buckets and warms allocators: the timed calls follow it
        steady = pool.seconds[1:] or pool.seconds
        rates[provider] = case["B"] / statistics.median(steady)
        out[f"img_per_s_{label}"] = rates[provider]
    if len(rates) == 2:
        out["scaling_efficiency"] = rates["fast"] / (_world(device) * rates["reference"])
    for key in [k for k in _pools if k[0] == tuple(sorted(case.items())) and k[2] == device]:
        _pools.pop(key).close()  # free the rank processes before the next entry
    return out


ENTRY = Entry(
    name="ddp_scaling", cases=cases, make=make, extras=extras, repeats=5, quick_repeats=2,
    backend=lambda case, device: f"torch.distributed {'nccl' if device.startswith('cuda') else 'gloo'}, "
                                 f"1 vs {_world(device)} ranks",
)
