"""torch.distributed (gloo, CPU): a 2-rank run equals a 1-rank run with the same global batch.

Two rank processes are spawned (torch.multiprocessing, spawn start method) with torchrun's
environment variables, so the trainer creates its own group exactly as under torchrun. One torch
thread per rank. Tolerance for 1-rank vs 2-rank: rtol 1e-5 / atol 1e-6 (the trainer tests' fp32
tolerance). The two runs compute the same function but not in the same order: each rank encodes
a slice of the batch (other GEMM shapes), and DDP sums gradient shares across ranks where one
process sums inside one GEMM, so results differ by fp32 rounding (~1e-7 relative per step).
Between ranks of one run, and between a resumed and an uninterrupted 2-rank run, the same kernels
run on the same shapes: those are compared bitwise.

RandAugment: step 2 also runs on small JPEG folders through clip_transform(randaugment=True) (the
uint8 cache, batched RandAugment drawn from one generator per (seed, step) for the whole global
batch): 2 ranks must train like 1 rank there too, and the rows each rank's feed gives must be
bitwise the rows of the one-process batch (augmented and uncached paths).
"""
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

C = 4
DOMAINS = ["a", "b", "c"]
RTOL, ATOL = 1e-5, 1e-6
STEP2_LR, STEP2_STEPS = 1e-3, 3


class ShiftedImages(torch.utils.data.Dataset):
    """Random images whose mean encodes the class (as in test_trainer)."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, C, (n,), generator=g)
        self.x = 0.3 * torch.randn(n, 3, 32, 32, generator=g) + self.y.view(-1, 1, 1, 1).float()
        self.classnames = [f"class {i}" for i in range(C)]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _data(offset, n=(7, 9, 8)):
    return {d: ShiftedImages(n[i], offset + i) for i, d in enumerate(DOMAINS)}


def _model(**kw):
    import guidg_fast as gf
    from guidg_fast.train import GuiDG

    return GuiDG(gf.TINY_ARCH, None, [f"class {i}" for i in range(C)], DOMAINS, n_ctx=2, **kw)


JPEG_CLASSES = ["circle", "square", "triangle"]
JPEG_DOMAINS = ["art", "photo"]


def _write_jpegs(root):
    """Two domains x 3 classes x 3 JPEGs of odd sizes: resize, crop and RandAugment all change them."""
    from PIL import Image

    for d_i, d in enumerate(JPEG_DOMAINS):
        for c_i, c in enumerate(JPEG_CLASSES):
            os.makedirs(os.path.join(root, d, c), exist_ok=True)
            for i in range(3):
                g = torch.Generator().manual_seed(100 * d_i + 10 * c_i + i)
                h, w = 34 + 2 * i, 40 + 3 * c_i
                img = (torch.rand(3, 1, 1, generator=g) * 0.6 + 0.4 * torch.rand(3, h, w, generator=g)) * 255
                Image.fromarray(img.byte().permute(1, 2, 0).numpy()).save(os.path.join(root, d, c, f"{i}.jpg"), quality=90)
    return root


def _jpeg_data(root, randaugment=True):
    from guidg_fast.data import DomainFolder, clip_transform

    return {d: DomainFolder(os.path.join(root, d), transform=clip_transform(32, randaugment=randaugment))
            for d in JPEG_DOMAINS}


def _state(module):
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def parity_work(out: str) -> dict:
    """Step 1, step 2 (+ BMA), evaluation and a resume, as one process or as one rank of several.
    Batch sizes are chosen so that 2 ranks get uneven slices (5 and 9 rows, 3 evaluation batches)."""
    import guidg_fast as gf
    from guidg_fast.train import GuiDG

    res = {}
    m1 = _model()
    res["step1_loss"] = m1.fit_experts(_data(0), iterations=3, batch_size=5, lr=5e-2, workers=0)
    res["ctx"] = m1.learner.ctx.detach().clone()

    m2 = _model()
    # the uninterrupted run leaves its state after step 2 behind (rank 0 writes it) for the resume below
    # one worker process per rank (the default under 2 ranks on 2 cores) here; in-process elsewhere
    res["step2_loss"] = m2.finetune(_data(10), iterations=STEP2_STEPS, batch_per_domain=3, lr=STEP2_LR,
                                    checkpoint_dir=out, checkpoint_every=2, workers=1)
    res["visual"], res["attn"], res["bma"] = _state(m2.model.visual), _state(m2.attn), _state(m2.eval_visual)
    res["eval"] = m2.evaluate({"t": ShiftedImages(11, 99)}, batch_size=4, workers=0)
    res["world_size"] = m2.dist.world_size

    from guidg_fast.train.guidg import STEP2_STATE

    resumed = _model()
    resumed.finetune(_data(10), iterations=STEP2_STEPS, batch_per_domain=3, lr=STEP2_LR,
                     resume=os.path.join(out, STEP2_STATE), workers=0)
    res["resumed_loss"] = resumed.history["step2"]
    res["resumed_visual"], res["resumed_bma"] = _state(resumed.model.visual), _state(resumed.eval_visual)
    m2.save(os.path.join(out, "model"))

    # RandAugment on the uint8 path: 2 domains x 3 = 6 images a step, 3 rows per rank
    m3 = GuiDG(gf.TINY_ARCH, None, JPEG_CLASSES, JPEG_DOMAINS, n_ctx=2)
    res["aug_loss"] = m3.finetune(_jpeg_data(os.path.join(out, "jpeg")), iterations=STEP2_STEPS,
                                  batch_per_domain=3, lr=STEP2_LR, workers=0)
    res["aug_visual"], res["aug_bma"] = _state(m3.model.visual), _state(m3.eval_visual)
    return res


def killed_work(out: str) -> dict:
    """Rank 1 is killed (SIGKILL) in step 2; rank 0 must stop with an error naming it."""
    import signal

    from guidg_fast.train.distributed import DistributedError

    model = _model(dist_timeout=5.0)
    rank = model.dist.rank

    def die(stage, step, loss):
        if rank == 1 and step == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    t0 = time.monotonic()
    try:
        model.finetune(_data(10), iterations=50, batch_per_domain=2, lr=1e-3, callback=die, workers=0)
    except DistributedError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - t0}
    return {"error": None, "seconds": time.monotonic() - t0}


def _rank_main(rank, world, port, work_name, out):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    result = globals()[work_name](out)
    torch.save(result, os.path.join(out, f"result{rank}.pt"))
    from guidg_fast.train import distributed

    distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(work_name: str, out, world: int = 2, timeout: float = 120.0) -> list:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, work_name, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def _load(out, rank):
    path = os.path.join(out, f"result{rank}.pt")
    assert os.path.exists(path), f"rank {rank} wrote no result"
    return torch.load(path, weights_only=False)


def _close(a: dict, b: dict, what: str, atol: float = ATOL):
    assert a.keys() == b.keys()
    bad = []
    for k in a:
        x, y = a[k].double(), b[k].double()
        if k.endswith("attn.in_proj_bias"):
            # the key bias (middle third) has a gradient of exactly zero in exact arithmetic (softmax
            # over keys ignores the constant q . b_k), so what it gets is rounding noise, which AdamW
            # normalises to steps of +-lr: two runs that round differently differ by up to
            # 2 * lr * steps there. The query and value biases are compared at the fp32 tolerance.
            width = x.shape[0] // 3
            kx, ky = x[width : 2 * width], y[width : 2 * width]
            if (kx - ky).abs().max().item() > 2 * STEP2_LR * STEP2_STEPS + ATOL:
                bad.append(f"{k}: key bias moved more than AdamW's noise bound")
            x, y = torch.cat([x[:width], x[2 * width :]]), torch.cat([y[:width], y[2 * width :]])
        err = ((x - y).abs() - RTOL * y.abs()).max().item() if x.numel() else 0.0
        if err > atol:
            bad.append(f"{k}: max excess {err:.2e} at {((x - y).abs() - RTOL * y.abs()).argmax().item()} of {tuple(x.shape)}")
    assert not bad, f"{what}: " + "; ".join(bad)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp2")
    _write_jpegs(os.path.join(out, "jpeg"))
    codes = _spawn("parity_work", out)
    assert codes == [0, 0], f"rank exit codes {codes}"
    return out, _load(out, 0), _load(out, 1)


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp1")
    _write_jpegs(os.path.join(out, "jpeg"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return parity_work(str(out))
    finally:
        torch.set_num_threads(threads)


def test_ranks_agree_bitwise(two_rank_run):
    _, r0, r1 = two_rank_run
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["step1_loss"] == r1["step1_loss"] and r0["step2_loss"] == r1["step2_loss"]
    assert torch.equal(r0["ctx"], r1["ctx"])
    for part in ("visual", "attn", "bma"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), (part, k)
    assert r0["eval"] == r1["eval"]


def test_two_ranks_equal_one_rank(two_rank_run, one_rank_run):
    _, r0, _ = two_rank_run
    one = one_rank_run
    assert one["world_size"] == 1
    torch.testing.assert_close(r0["ctx"], one["ctx"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.tensor(r0["step1_loss"]), torch.tensor(one["step1_loss"]), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.tensor(r0["step2_loss"]), torch.tensor(one["step2_loss"]), rtol=RTOL, atol=ATOL)
    _close(r0["visual"], one["visual"], "encoder")
    _close(r0["attn"], one["attn"], "CMAttn")
    _close(r0["bma"], one["bma"], "BMA encoder")


def test_two_ranks_equal_one_rank_with_randaugment(two_rank_run, one_rank_run):
    _, r0, r1 = two_rank_run
    one = one_rank_run
    assert r0["aug_loss"] == r1["aug_loss"]
    torch.testing.assert_close(torch.tensor(r0["aug_loss"]), torch.tensor(one["aug_loss"]), rtol=RTOL, atol=ATOL)
    # AdamW divides each gradient by its running RMS, so an element whose gradient is small next to
    # its fp32 rounding noise (1 vs 2 ranks round differently) moves by a different fraction of lr:
    # on these JPEG images a few such elements differ by ~1e-5 (1% of lr) after 3 steps. The bound
    # here is 5% of lr per element; a wrong batch or augmentation moves every element by ~lr and
    # the losses by ~1e-2. 99% of the elements must still agree at the fp32 tolerance (measured: 99.89%).
    _close(r0["aug_visual"], one["aug_visual"], "encoder (RandAugment)", atol=0.05 * STEP2_LR)
    _close(r0["aug_bma"], one["aug_bma"], "BMA encoder (RandAugment)", atol=0.05 * STEP2_LR)
    x = torch.cat([v.double().flatten() for v in r0["aug_visual"].values()])
    y = torch.cat([v.double().flatten() for v in one["aug_visual"].values()])
    within = ((x - y).abs() <= ATOL + RTOL * y.abs()).double().mean().item()
    assert within > 0.99, f"only {within:.4%} of the encoder's elements agree at the fp32 tolerance"


@pytest.mark.parametrize("randaugment", [True, False])
@pytest.mark.parametrize("cached", [True, False])
def test_rank_rows_are_the_rows_of_the_one_process_batch(tmp_path, randaugment, cached):
    """Each rank's feed (rows=) gives bitwise its rows of the batch one process gets, with the
    whole batch's RandAugment draws (uint8 cache) or per-position item seeds (uncached)."""
    from guidg_fast.data import ImageCacheStore
    from guidg_fast.data.loaders import Step2Feed
    from guidg_fast.train.distributed import row_bounds

    datasets = list(_jpeg_data(_write_jpegs(str(tmp_path / "jpeg")), randaugment).values())
    if not cached:  # a plain wrapper: no load(), so no uint8 cache; the dataset's own transform per item
        datasets = [torch.utils.data.Subset(ds, range(len(ds))) for ds in datasets]

    def feed(rows=None):
        f = Step2Feed(datasets, 3, 5, "cpu", start=0, stop=3, workers=0, store=ImageCacheStore(), rows=rows)
        assert f.items.uint8 == cached and (f.items.augmentation is not None) == (cached and randaugment)
        return [(x.clone(), y.clone()) for x, y in f]

    full = feed()
    for world in (2, 4):
        parts = [feed(rows) for rows in row_bounds(6, world)]
        for step, (x, y) in enumerate(full):
            assert torch.equal(torch.cat([p[step][0] for p in parts]), x), (world, step)
            assert torch.equal(torch.cat([p[step][1] for p in parts]), y), (world, step)
    if randaugment and cached:  # the augmentation is on (else the test would not test the draws' split)
        plain = Step2Feed(list(_jpeg_data(str(tmp_path / "jpeg"), False).values()), 3, 5, "cpu", start=0, stop=1,
                          workers=0, store=ImageCacheStore())
        assert not torch.equal(next(iter(plain))[0], full[0][0])


def test_evaluation_counts_every_image_once(two_rank_run, one_rank_run):
    _, r0, _ = two_rank_run
    a, b = r0["eval"]["t"], one_rank_run["eval"]["t"]
    assert a["images"] == b["images"] == 11  # 3 batches of 4, 4, 3 on 2 ranks: each image once
    # the same weights (1-rank vs 2-rank within fp32 tolerance) give the same predictions here
    assert a["ensemble"] == b["ensemble"] and a["experts"] == b["experts"]
    for d in DOMAINS:
        assert abs(a["weights"][d] - b["weights"][d]) < 1e-5


def test_resume_equals_uninterrupted_distributed_run(two_rank_run):
    _, r0, _ = two_rank_run
    assert r0["resumed_loss"] == r0["step2_loss"]
    for part, ref in (("resumed_visual", "visual"), ("resumed_bma", "bma")):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r0[ref][k]), (part, k)


def test_rank_zero_alone_writes_the_model_folder(two_rank_run):
    out, _, _ = two_rank_run
    from guidg_fast.train import GuiDG

    assert sorted(os.listdir(os.path.join(out, "model"))) == ["config.json", "weights.safetensors"]
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]
    GuiDG.load(os.path.join(out, "model"))


def test_killed_rank_gives_a_clear_error_within_the_timeout(tmp_path):
    t0 = time.monotonic()
    codes = _spawn("killed_work", tmp_path, timeout=90.0)
    wall = time.monotonic() - t0
    assert codes[1] == -9, f"rank 1 should have been killed, exit codes {codes}"
    assert codes[0] == 0, f"rank 0 did not stop cleanly (exit code {codes[0]}; None = hung)"
    result = _load(tmp_path, 0)
    assert result["error"] is not None, "rank 0 finished 50 steps without its peer"
    assert "rank 1" in result["error"] and "step 2" in result["error"], result["error"]
    # the error comes within the 5 s collective timeout plus the heartbeat check (~2 s)
    assert result["seconds"] < 5.0 + 10.0, result
    assert wall < 90.0
