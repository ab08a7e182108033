"""A whole GuiDG run, end to end on a real JPEG DomainBed folder: a few iterations of step 1, step 2
and an evaluation pass, the official structure vs guidg-fast's trainer.

official  the official loops (guidg_fast.reference): one expert at a time with full 77-token text
          passes and the image encoder re-run every step; step 2 with CMAttn and the loss on the
          eager ops and per-parameter BMA as in CLIPood; torch DataLoader with min(4, cores)
          workers and PIL transforms as converter_dassl does (step 1 RandomResizedCrop + flip,
          step 2 Resize + CenterCrop + RandAugment, evaluation Resize + CenterCrop); fp16 autocast
          on CUDA (with a GradScaler), fp32 on CPU.
fast      GuiDG.fit_experts / finetune / evaluate (bf16 autocast on CUDA) with ``workers=``; the
          trainer reports its own phases (``phase_times=``). Evaluation is timed twice: the first
          pass decodes into the uint8 cache, later passes (every later evaluation of a run) read it.

The data set is written once (4 domains, 7 classes, natural-looking JPEGs: gradients, noise,
textured class shapes, a style per domain; a 227 px set like PACS and a 640x480 set) under
$GUIDG_FAST_BENCH_DATA or ~/.cache/guidg-fast/bench-data, and reused. Steps 1 and 2 train on the
227 px set of three source domains; evaluation reads the 640x480 set of the fourth.

Reported per side: seconds per step-1 and step-2 iteration, step-2 and evaluation img/s, the share
of each step-2 phase (data wait, encoder forward + backward, guidance, optimizer, BMA), the
encoder's GFLOP/s next to the machine's GEMM rate; and the input pipeline alone (img/s per worker
core: the official PIL transform vs the fast uint8 path where guidg_fast.data.augment exists).
"""
from __future__ import annotations

import contextlib
import math
import os
import time

import torch
import torch.nn.functional as F

from ..harness import Entry, machine_rates

DOMAINS = ("photo", "art_painting", "cartoon", "sketch")
CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
SHAPES = ("disc", "ring", "square", "triangle", "cross", "stripes", "diamond")
PHASES = ("data", "encoder", "guidance", "optimizer", "bma")


# ----------------------------------------------------------------------------- the data set
def data_root() -> str:
    return os.environ.get("GUIDG_FAST_BENCH_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "guidg-fast", "bench-data")


def _mask(shape: str, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """A class shape at a random place and size: (h, w) in [0, 1], soft-edged."""
    cy, cx = (0.3 + 0.4 * torch.rand(2, generator=g)).tolist()
    r = float(0.18 + 0.14 * torch.rand(1, generator=g))
    y = (torch.arange(h).float()[:, None] / h - cy) / r
    x = (torch.arange(w).float()[None, :] / w - cx) / r * (w / h)
    d = {
        "disc": (x**2 + y**2).sqrt(),
        "ring": ((x**2 + y**2).sqrt() - 0.7).abs() + 0.7,
        "square": torch.maximum(x.abs(), y.abs()),
        "triangle": torch.maximum(y, x.abs() * 2 - y),  # apex up, base at y = 1
        "cross": torch.minimum(torch.maximum(x.abs() * 3, y.abs()), torch.maximum(x.abs(), y.abs() * 3)),
        "stripes": torch.maximum(x.abs(), y.abs()),  # a square, cut into bands below
        "diamond": x.abs() + y.abs(),
    }[shape]
    return torch.sigmoid((1.0 - d) * 12)


def render(domain: int, label: int, index: int, h: int, w: int, grain: bool = True) -> torch.Tensor:
    """One (3, h, w) uint8 image: a smooth background gradient with low-frequency blotches and
    grain, the class's shape filled with a class texture, in the domain's style."""
    g = torch.Generator().manual_seed(((domain * 131 + label) * 1009 + index) * 7 + h)
    yy = torch.linspace(0, 1, h)[:, None]
    xx = torch.linspace(0, 1, w)[None, :]
    c0, c1 = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
    angle = float(torch.rand(1, generator=g)) * math.pi
    t = (math.cos(angle) * xx + math.sin(angle) * yy).clamp(0, 1)
    img = c0 * (1 - t) + c1 * t
    blotch = F.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=(h, w), mode="bicubic", align_corners=False)[0]
    img = img * 0.75 + blotch * 0.25
    freq = 6 + 3 * label
    phase = float(torch.rand(1, generator=g)) * 6.28
    texture = 0.5 + 0.5 * torch.sin(freq * 6.28 * (xx * math.cos(label) + yy * math.sin(label)) + phase)
    colour = torch.rand(3, 1, 1, generator=g)
    fill = colour * (0.6 + 0.4 * texture)
    m = _mask(SHAPES[label % len(SHAPES)], h, w, g)
    if SHAPES[label % len(SHAPES)] == "stripes":
        m = m * (torch.sin(yy * 40) > 0).float()
    img = img * (1 - m) + fill * m
    if DOMAINS[domain] == "art_painting":  # saturated, brush-like smears
        img = (img - img.mean(0, keepdim=True)) * 1.6 + img.mean(0, keepdim=True)
        img = F.avg_pool2d(img[None], (1, 7), 1, (0, 3))[0]
    elif DOMAINS[domain] == "cartoon":  # flat colours with dark edges
        img = (img * 5).round() / 5
        edge = (m - F.avg_pool2d(m[None, None], 5, 1, 2)[0, 0]).abs() * 6
        img = img * (1 - edge.clamp(0, 1))
    elif DOMAINS[domain] == "sketch":  # grey pencil lines
        edge = (m - F.avg_pool2d(m[None, None], 5, 1, 2)[0, 0]).abs() * 8
        img = (0.95 - edge.clamp(0, 1) * 0.8 - 0.1 * texture * m).expand(3, h, w)
    if grain:
        img = img + 0.04 * torch.randn(3, h, w, generator=g)  # sensor grain
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def render_large(domain: int, label: int, index: int, h: int, w: int) -> torch.Tensor:
    """A large image: the scene rendered at half size and upscaled (bilinear; 10x cheaper to make),
    the grain added at full size so the pixels stay noisy like a photo's."""
    small = render(domain, label, index, h // 2, w // 2, grain=False).float()[None]
    img = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
    g = torch.Generator().manual_seed(domain * 7919 + label * 104729 + index)
    img = img + 10.0 * torch.randn(3, h, w, generator=g)
    return img.clamp(0, 255).round().to(torch.uint8)


def ensure_data(per_class: int, root: str | None = None) -> dict:
    """Writes (once) ``root/{227,640x480}-n<per_class>/<domain>/<class>/<i>.jpg``; returns both folders.
    A set is reused when its completion marker exists (written last, so a stopped write redoes it)."""
    from PIL import Image

    root = root or data_root()
    out = {}
    for name, (h, w) in (("227", (227, 227)), ("640x480", (480, 640))):
        folder = os.path.join(root, f"{name}-n{per_class}")
        out[name] = folder
        marker = os.path.join(folder, ".complete")
        if os.path.exists(marker):
            continue
        for d, domain in enumerate(DOMAINS):
            for c, cls in enumerate(CLASSES):
                os.makedirs(os.path.join(folder, domain, cls), exist_ok=True)
                for i in range(per_class):
                    pixels = (render(d, c, i, h, w) if h < 400 else render_large(d, c, i, h, w)).permute(1, 2, 0).numpy()
                    path = os.path.join(folder, domain, cls, f"{i:03d}.jpg")
                    Image.fromarray(pixels).save(path + ".tmp.jpg", quality=90)
                    os.replace(path + ".tmp.jpg", path)
        with open(marker, "w") as fh:
            fh.write("ok\n")
    return out


# ----------------------------------------------------------------------------- helpers
def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def workers() -> int:
    return min(4, os.cpu_count() or 1)


class _Timer:
    """Accumulates seconds per phase name (synchronising CUDA at each boundary)."""

    def __init__(self, device):
        self.device, self.times = device, {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        _sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - t0


def vit_flops(arch: str, images: int, backward: bool, cls_last_block: bool = False) -> float:
    """Matmul FLOPs of the vision encoder on ``images`` images (forward, or forward + backward with
    weight gradients = 3x forward): per layer 24 * N * W^2 dense, 4 * N^2 * W attention, patch embed.
    ``cls_last_block``: the last block as backbone.image_embedding runs it (keys and values for every
    token, the rest for the class token only)."""
    from . import _text_common as common

    v = common.text_config(arch)["vision_cfg"]
    size = v["image_size"] if isinstance(v["image_size"], int) else v["image_size"][0]
    n = (size // v["patch_size"]) ** 2 + 1
    W, L = v["width"], v["layers"]
    block = 24 * n * W * W + 4 * n * n * W
    last = (4 * n * W * W + 20 * W * W + 4 * n * W) if cls_last_block else block
    per_image = (L - 1) * block + last + 2 * (n - 1) * W * 3 * v["patch_size"] ** 2
    return per_image * images * (3 if backward else 1)


# ----------------------------------------------------------------------------- the sides
def _autocast(device, dtype):
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def official_run(cfg: dict, folders: dict, device: str) -> dict:
    """The official structure, instrumented with the fast side's phase names."""
    import guidg_fast as gf
    from guidg_fast import CrossModalAttention, ops, reference
    from guidg_fast.data import clip_transform, load_domainbed
    from guidg_fast.data.loaders import domain_balanced_batches
    from torch.utils.data import DataLoader

    cuda = device.startswith("cuda")
    half = torch.float16
    sources, target = list(DOMAINS[:3]), DOMAINS[3]
    torch.manual_seed(0)
    model, _, tokenizer = gf.load_clip(cfg["arch"], device=device)
    model.requires_grad_(False)
    size = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
    classnames = list(CLASSES)
    out = {}

    # step 1: one expert after another, each its own CoOp run (one context, its own domain's loader)
    step1 = clip_transform(size, train=True)
    domains = load_domainbed(folders["227"], domains=sources, transform=step1)
    seconds = 0.0
    experts = []
    for k, d in enumerate(sources):
        learner = gf.ExpertPromptLearner(model, tokenizer, classnames, num_experts=1, n_ctx=16).to(device)
        opt = torch.optim.SGD([learner.ctx], lr=1e-4)
        loader = DataLoader(domains[d], batch_size=cfg["step1_batch"], shuffle=True, num_workers=workers(),
                            drop_last=False, persistent_workers=False)
        it = iter(loader)
        tau = model.logit_scale.exp()
        for i in range(cfg["step1_iterations"] + 1):  # the first (worker start, warm-up) untimed
            _sync(device)
            t0 = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(loader)
                x, y = next(it)
            x, y = x.to(device), y.to(device)
            with _autocast(device, half):
                with torch.no_grad():
                    f = F.normalize(model.encode_image(x).float(), dim=-1)  # re-encoded every step
                text = reference.encode_expert_prompts(model, learner)[0].float()  # full 77-token pass
                loss = F.cross_entropy(tau * f @ text.t(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _sync(device)
            if i > 0:
                seconds += time.perf_counter() - t0
        experts.append(learner)
    out["step1_s_per_iter"] = seconds / (cfg["step1_iterations"] * len(sources))  # per expert-iteration
    out["step1_s_per_iter_all_experts"] = seconds / cfg["step1_iterations"]
    with torch.no_grad(), _autocast(device, half):
        T = torch.stack([reference.encode_expert_prompts(model, e)[0].float() for e in experts])

    # step 2: AdamW on the vision encoder, CMAttn + multi-expert loss on the eager ops, BMA per tensor
    step2 = clip_transform(size, randaugment=True)
    domains = load_domainbed(folders["227"], domains=sources, transform=step2)
    visual = model.visual
    visual.requires_grad_(True).train()
    torch.manual_seed(2)
    attn = CrossModalAttention(int(visual.output_dim), len(classnames)).to(device)
    params = list(visual.parameters()) + list(attn.parameters())
    opt = torch.optim.AdamW(params, lr=5e-6, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    import copy

    averaged = copy.deepcopy(visual).requires_grad_(False)
    avg_params, vparams = list(averaged.parameters()), list(visual.parameters())
    batches = domain_balanced_batches(domains, cfg["batch_per_domain"], seed=0, num_workers=workers())
    timer = _Timer(device)
    n = cfg["step2_iterations"]
    images = 0
    for i in range(n + 1):
        if i == 1:
            timer.times.clear()  # the first step (worker start, warm-up) is not counted
            _sync(device)
            t_start = time.perf_counter()
        with timer("data"):
            x, y, _ = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device)
        with timer("encoder"):
            with _autocast(device, half):
                f = F.normalize(visual(x).float(), dim=-1)
        with timer("guidance"):
            with ops.use_backend("eager"):
                w = attn(f, T).mean(0)
                loss = ops.multi_expert_loss(f, T, y, w, 100.0, margin=0.3)
        with timer("encoder"):
            opt.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler else loss).backward()
        with timer("optimizer"):
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        with timer("bma"):
            reference.bma_update_(avg_params, vparams, 1.0 / (i + 2))
        if i > 0:
            images += x.shape[0]
    _sync(device)
    total = time.perf_counter() - t_start
    del batches
    out.update(_summary_step2(cfg, total, images, timer.times))
    visual.requires_grad_(False).eval()

    # evaluation: the BMA encoder on the target domain's 640x480 images
    evaluation = clip_transform(size)
    target_ds = load_domainbed(folders["640x480"], domains=[target], transform=evaluation)[target]
    loader = DataLoader(target_ds, batch_size=cfg["eval_batch"], num_workers=workers())
    timer = _Timer(device)
    images = 0
    _sync(device)
    t0 = time.perf_counter()
    it = iter(loader)
    with torch.no_grad():
        while True:
            with timer("data"):
                try:
                    x, y = next(it)
                except StopIteration:
                    break
                x = x.to(device)
            with timer("compute"):
                with _autocast(device, half):
                    f = F.normalize(averaged(x).float(), dim=-1)
                with ops.use_backend("eager"):
                    w = attn(f, T).mean(0)
                    reference.ensemble_logits(f, T, w, 100.0).argmax(-1)
            images += x.shape[0]
    total = time.perf_counter() - t0
    out.update(_summary_eval(cfg, total, images, timer.times))
    return out


def fast_run(cfg: dict, folders: dict, device: str) -> dict:
    """guidg-fast's trainer on the same folders."""
    import guidg_fast as gf
    from guidg_fast.backbone import cls_shortcut_ok
    from guidg_fast.data import clip_transform, load_domainbed

    sources, target = list(DOMAINS[:3]), DOMAINS[3]
    trainer = gf.GuiDG(cfg["arch"], classnames=list(CLASSES), domains=sources, device=device, seed=0)
    size = trainer.model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    out = {}
    plain = clip_transform(size)
    step1_sets = load_domainbed(folders["227"], domains=sources, transform=plain)
    _sync(device)
    t0 = time.perf_counter()
    trainer.fit_experts(step1_sets, iterations=cfg["step1_iterations"], batch_size=cfg["step1_batch"])
    _sync(device)
    seconds = time.perf_counter() - t0  # the feature cache's one encoding pass included
    out["step1_s_per_iter_all_experts"] = seconds / cfg["step1_iterations"]
    out["step1_s_per_iter"] = out["step1_s_per_iter_all_experts"] / len(sources)

    step2_sets = load_domainbed(folders["227"], domains=sources, transform=clip_transform(size, randaugment=True))
    n = cfg["step2_iterations"]
    # one untimed step first (allocator, kernels' first calls, the uint8 cache's one decoding pass),
    # as the official side's first step
    trainer.finetune(step2_sets, iterations=1, batch_per_domain=cfg["batch_per_domain"], workers=workers())
    phases: dict = {}
    _sync(device)
    t0 = time.perf_counter()
    trainer.finetune(step2_sets, iterations=n, batch_per_domain=cfg["batch_per_domain"], workers=workers(),
                     phase_times=phases)
    _sync(device)
    total = time.perf_counter() - t0
    # the trainer encodes through backbone.image_embedding: count the FLOPs it really does
    cls = cls_shortcut_ok(trainer.model.visual)
    out.update(_summary_step2(cfg, total, n * cfg["batch_per_domain"] * len(sources), phases, cls))
    out["phases_from"] = "trainer (phase_times)"

    target_ds = load_domainbed(folders["640x480"], domains=[target], transform=plain)[target]
    for label in ("first", "cached"):  # first pass: decode + resize + crop into the uint8 cache
        phases = {}
        _sync(device)
        t0 = time.perf_counter()
        trainer.evaluate({target: target_ds}, batch_size=cfg["eval_batch"], workers=workers(), phase_times=phases)
        _sync(device)
        total = time.perf_counter() - t0
        summary = _summary_eval(cfg, total, len(target_ds), phases, cls)
        if label == "first":
            out["eval_first_pass_img_per_s"] = summary["eval_img_per_s"]
        else:
            out.update(summary)
    return out


def _summary_step2(cfg, total, images, phases, cls_last_block=False) -> dict:
    n = cfg["step2_iterations"]
    counted = sum(phases.get(p, 0.0) for p in PHASES) or 1.0
    return {
        "step2_s_per_iter": total / n,
        "step2_img_per_s": images / total,
        "step2_phase_share": {p: phases.get(p, 0.0) / counted for p in PHASES},
        "step2_encoder_gflop_per_image": vit_flops(cfg["arch"], 1, backward=True, cls_last_block=cls_last_block) / 1e9,
        "step2_encoder_gflops": vit_flops(cfg["arch"], images, backward=True, cls_last_block=cls_last_block)
        / max(phases.get("encoder", 0.0), 1e-9) / 1e9,
    }


def _summary_eval(cfg, total, images, phases, cls_last_block=False) -> dict:
    counted = sum(phases.values()) or 1.0
    return {
        "eval_img_per_s": images / total,
        "eval_phase_share": {p: v / counted for p, v in phases.items()},
        "eval_encoder_gflops": vit_flops(cfg["arch"], images, backward=False, cls_last_block=cls_last_block)
        / max(phases.get("compute", 0.0), 1e-9) / 1e9,
    }


# ----------------------------------------------------------------------------- the input pipeline alone
def pipeline_rates(cfg: dict, folders: dict) -> dict:
    """Decode + transform img/s on one core (one DataLoader worker's work) for the step-2 and the
    evaluation transforms: the official PIL path, and the fast uint8 path where it exists."""
    from PIL import Image

    from guidg_fast.data import clip_transform

    paths = {}
    for name in ("227", "640x480"):
        base = os.path.join(folders[name], DOMAINS[0])
        paths[name] = [os.path.join(base, c, f) for c in sorted(os.listdir(base)) for f in sorted(os.listdir(os.path.join(base, c)))]
    size = cfg["image_size"]
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def rate(fn, files):
            fn(files[0])  # warm
            t0 = time.perf_counter()
            for p in files:
                fn(p)
            return len(files) / (time.perf_counter() - t0)

        step2, evaluation = clip_transform(size, randaugment=True), clip_transform(size)
        out["official_step2_img_per_s_per_core"] = rate(lambda p: step2(Image.open(p).convert("RGB")), paths["227"])
        out["official_eval_img_per_s_per_core"] = rate(lambda p: evaluation(Image.open(p).convert("RGB")), paths["640x480"])
        try:
            from guidg_fast.data import augment  # the fast uint8 path

            BatchedRandAugment, normalize_uint8 = augment.BatchedRandAugment, augment.normalize_uint8
        except (ImportError, AttributeError) as exc:
            out["fast_pipeline"] = f"unavailable (guidg_fast.data.augment: {exc})"
        else:
            from torchvision import transforms as T

            # what the uint8 cache does once per image: decode + the deterministic part of the transform
            once = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                              T.PILToTensor()])
            t0 = time.perf_counter()
            cached = {name: torch.stack([once(Image.open(p).convert("RGB")) for p in files])
                      for name, files in paths.items()}
            out["fast_cache_build_img_per_s_per_core"] = sum(len(f) for f in paths.values()) / (time.perf_counter() - t0)
            aug = BatchedRandAugment()
            gen = torch.Generator().manual_seed(0)
            from guidg_fast.data import CLIP_MEAN, CLIP_STD

            def per_step(batch, augment: bool, rounds: int = 3) -> float:
                t0 = time.perf_counter()
                for _ in range(rounds):  # every step after the cache is built: RandAugment + normalise
                    for b0 in range(0, batch.shape[0], 36):
                        chunk = batch[b0:b0 + 36]
                        normalize_uint8(aug(chunk, gen) if augment else chunk, CLIP_MEAN, CLIP_STD)
                return rounds * batch.shape[0] / (time.perf_counter() - t0)

            per_step(cached["227"][:36], True, rounds=1)  # warm
            out["fast_step2_img_per_s_per_core"] = per_step(cached["227"], True)
            out["fast_eval_img_per_s_per_core"] = per_step(cached["640x480"], False)
    finally:
        torch.set_num_threads(threads)
    return out


# ----------------------------------------------------------------------------- the entry
def config(quick: bool) -> dict:
    import guidg_fast as gf

    if quick:
        return {"arch": gf.TINY_ARCH, "per_class": 1, "step1_iterations": 1, "step1_batch": 8,
                "step2_iterations": 2, "batch_per_domain": 4, "eval_batch": 16, "image_size": 32}
    return {"arch": "ViT-B-16", "per_class": 8, "step1_iterations": 2, "step1_batch": 32,
            "step2_iterations": 3, "batch_per_domain": 12, "eval_batch": 64, "image_size": 224}


def memory(case, provider, device):
    from . import _text_common as common

    # the step-2 encoder step dominates (36 images); the step-1 text pass at C = 7 is small
    return common.vision_step_bytes(case["arch"], 3 * case["batch_per_domain"]) + 1.0e9


def run(device: str, quick: bool, log=print) -> list:
    from ..harness import memory_shortfall, release_memory, skipped_row

    cfg = config(quick)
    case = {"arch": cfg["arch"], "K": 3, "C": len(CLASSES), "B": 3 * cfg["batch_per_domain"],
            "iters": cfg["step2_iterations"]}
    short = memory_shortfall(memory(cfg, "reference", device), device, "one side of the run")
    if short is not None:
        log(f"  [skip] guidg_run {case}: {short}")
        return [skipped_row(ENTRY, case, device, short)]
    t0 = time.perf_counter()
    folders = ensure_data(cfg["per_class"])
    log(f"  data: {folders['227']}, {folders['640x480']} ({time.perf_counter() - t0:.1f} s)")
    sides = {}
    for side, fn in (("reference", official_run), ("fast", fast_run)):
        t0 = time.perf_counter()
        sides[side] = fn(cfg, folders, device)
        release_memory(None, device)
        log(f"  {side}: step 2 {sides[side]['step2_s_per_iter']:.3f} s/iter, eval {sides[side]['eval_img_per_s']:.1f} img/s "
            f"({time.perf_counter() - t0:.1f} s)")
    pipeline = pipeline_rates(cfg, folders)
    gemm = machine_rates(device, quick=True)["gemm_gflops"]
    precision = "bf16 fast / fp16 autocast official" if device.startswith("cuda") else "fp32"
    row = {
        "entry": "guidg_run", "case": case, "device": device, "backend": precision,
        "reference": {"median_ms": sides["reference"]["step2_s_per_iter"] * 1e3, **sides["reference"],
                      "gflops": sides["reference"]["step2_encoder_gflops"]},
        "fast": {"median_ms": sides["fast"]["step2_s_per_iter"] * 1e3, **sides["fast"],
                 "gflops": sides["fast"]["step2_encoder_gflops"]},
        "parity_note": "- (different pipelines)", "pipeline": pipeline, "gemm_gflops": gemm, "workers": workers(),
    }
    row["speedup"] = row["reference"]["median_ms"] / row["fast"]["median_ms"]
    row["summary_md"] = summary_markdown(row)
    log(f"  guidg_run {case}: step 2 {row['reference']['median_ms']:.0f} ms official, {row['fast']['median_ms']:.0f} ms "
        f"fast per iteration ({row['speedup']:.2f}x)")
    return [row]


def summary_markdown(row: dict) -> str:
    r, f, p = row["reference"], row["fast"], row["pipeline"]

    def share(side, key, phase):
        return f"{100 * side[key].get(phase, 0.0):.0f}%"

    lines = [
        f"**guidg_run** ({row['case']['arch']}, {row['backend']}, {row['workers']} loader workers; "
        f"machine GEMM {row['gemm_gflops']:.0f} GFLOP/s; fast phases timed {f.get('phases_from', '?')})",
        "",
        "| | official | fast |",
        "|---|---|---|",
        f"| step 1, s per iteration (all experts) | {r['step1_s_per_iter_all_experts']:.3f} | {f['step1_s_per_iter_all_experts']:.3f} |",
        f"| step 2, s per iteration | {r['step2_s_per_iter']:.3f} | {f['step2_s_per_iter']:.3f} |",
        f"| step 2, img/s | {r['step2_img_per_s']:.1f} | {f['step2_img_per_s']:.1f} |",
    ]
    for phase in PHASES:
        lines.append(f"| step 2 share: {phase} | {share(r, 'step2_phase_share', phase)} | {share(f, 'step2_phase_share', phase)} |")
    lines += [
        f"| step 2 encoder GFLOP per image (fwd + bwd) | {r['step2_encoder_gflop_per_image']:.1f} | "
        f"{f['step2_encoder_gflop_per_image']:.1f} |",
        f"| step 2 encoder GFLOP/s (machine GEMM {row['gemm_gflops']:.0f}) | {r['step2_encoder_gflops']:.3g} | "
        f"{f['step2_encoder_gflops']:.3g} |",
        f"| evaluation, img/s | {r['eval_img_per_s']:.1f} | {f['eval_img_per_s']:.1f} |",
        f"| evaluation share: data | {share(r, 'eval_phase_share', 'data')} | {share(f, 'eval_phase_share', 'data')} |",
        f"| evaluation encoder GFLOP/s | {r['eval_encoder_gflops']:.3g} | {f['eval_encoder_gflops']:.3g} |",
        f"| input pipeline, step 2 (227 px), img/s per core | {p['official_step2_img_per_s_per_core']:.0f} | "
        f"{p.get('fast_step2_img_per_s_per_core', float('nan')):.0f} |",
        f"| input pipeline, evaluation (640x480), img/s per core | {p['official_eval_img_per_s_per_core']:.0f} | "
        f"{p.get('fast_eval_img_per_s_per_core', float('nan')):.0f} |",
        f"| (fast: decode + resize + crop into the uint8 cache, once per image), img/s per core | - | "
        f"{p.get('fast_cache_build_img_per_s_per_core', float('nan')):.0f} |",
        f"| evaluation, first pass (builds the cache), img/s | - | {f.get('eval_first_pass_img_per_s', float('nan')):.1f} |",
    ]
    if p.get("fast_pipeline"):
        lines.append(f"\nfast input pipeline: {p['fast_pipeline']}")
    return "\n".join(lines)


ENTRY = Entry(name="guidg_run", cases=lambda quick: [config(quick)], make=None, run=run, memory=memory)
