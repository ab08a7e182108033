"""GuiDG: the high-level trainer. Step 1 trains all K experts in one run; step 2 fine-tunes the vision
encoder under expert guidance; evaluation reports per-domain accuracy. It adds no math of its own:
every computation goes through guidg_fast's ops and encoders.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .. import _checks, ops
from ..attention import CrossModalAttention
from ..averaging import BetaMovingAverage, wise_ft
from ..backbone import image_embedding, load_clip
from ..data.image_cache import ImageCacheStore
from ..data.loaders import EvalFeed, Step2Feed, epoch_batch_indices
from ..data.workers import check_workers
from ..prompts import ExpertPromptLearner
from ..text import encode_expert_prompts
from . import checkpoint
from . import distributed as dist_glue
from .feature_cache import ImageFeatureCache
from .host_memory import steady_heap
from .steps import EVAL_PHASES, STEP2_PHASES, PhaseTimer, Step1Iteration, Step2Iteration, check_precision, compile_options

BASELINES = {
    # margin: CLIPood margin metric softmax; entropy_weight: UEO term; bma: beta moving average of the
    # vision encoder; wise_alpha: WiSE-FT blend with the pretrained encoder after training
    "clipood": {"margin": 0.3, "entropy_weight": 0.0, "bma": True, "wise_alpha": None},
    "erm": {"margin": 0.0, "entropy_weight": 0.0, "bma": False, "wise_alpha": 0.5},
    "ueo": {"margin": 0.0, "entropy_weight": 0.01, "bma": False, "wise_alpha": 0.5},
}
WEIGHT_MODES = ("batch", "sample")
STEP1_STATE = "step1_state.safetensors"
STEP2_STATE = "step2_state.safetensors"
_NAN_CAUSES = ("NaN or Inf values in the input images, a learning rate too large for the data (lr={lr}), or a "
               "temperature (logit scale {tau:g}) so large that the logits overflow")


def _classnames_of(dataset) -> list | None:
    names = getattr(dataset, "classnames", None)
    if names is None and hasattr(dataset, "dataset"):  # torch Subset
        names = getattr(dataset.dataset, "classnames", None)
    return list(names) if names is not None else None


def _on_steady_heap(method):
    """Runs a training/evaluation entry point with the CPU heap kept steady (host_memory.py)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with steady_heap(self.device):
            return method(self, *args, **kwargs)

    return run


class GuiDG:
    """GuiDG on an open_clip backbone: ``fit_experts`` (step 1), ``finetune`` (step 2), ``evaluate``."""

    def __init__(
        self,
        arch: str = "ViT-B-16",
        pretrained: str | None = None,
        classnames: Sequence[str] | None = None,
        domains: Sequence[str] | None = None,
        *,
        device: str | torch.device = "cpu",
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_token_position: str = "end",
        class_specific: bool = False,
        num_heads: int = 4,
        metric: str = "cosine",
        baseline: str = "clipood",
        weight_mode: str = "batch",
        seed: int = 0,
        precision: str | None = None,
        dist_timeout: float | None = None,
    ):
        if not classnames:
            raise ValueError("classnames must be a non-empty list of class names")
        if not domains or isinstance(domains, str):
            raise ValueError("domains must be a non-empty list of source-domain names (one expert each)")
        if len(set(domains)) != len(domains):
            raise ValueError(f"domains must be unique, got {list(domains)}")
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {sorted(BASELINES)}, got {baseline!r}")
        if weight_mode not in WEIGHT_MODES:
            raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {weight_mode!r}")
        self.config = {
            "arch": arch,
            "pretrained": None if pretrained is None else str(pretrained),
            "classnames": list(classnames),
            "domains": list(domains),
            "n_ctx": n_ctx,
            "ctx_init": ctx_init,
            "class_token_position": class_token_position,
            "class_specific": class_specific,
            "num_heads": num_heads,
            "metric": metric,
            "baseline": baseline,
            "weight_mode": weight_mode,
            "seed": seed,
        }
        # [distributed] the initialised group, or one made from torchrun's environment; "cuda" becomes
        # cuda:LOCAL_RANK. Every rank builds the same model from the same seed (DDP checks it too).
        self.dist = dist_glue.setup(device, timeout_s=dist_timeout)
        self.device = self.dist.device
        # a run-time choice, not part of the saved config: a model trained in bf16 on a GPU loads in fp32 on a CPU
        self.precision = check_precision(precision, self.device)
        torch.manual_seed(seed)
        self.model, self.preprocess, self.tokenizer = load_clip(arch, pretrained, self.device)
        self.model.requires_grad_(False)
        self.learner = ExpertPromptLearner(
            self.model, self.tokenizer, classnames, num_experts=len(domains), n_ctx=n_ctx, ctx_init=ctx_init,
            class_token_position=class_token_position, class_specific=class_specific,
        ).to(self.device)
        dim = int(self.model.visual.output_dim)
        self.attn = CrossModalAttention(dim, len(classnames), num_heads=num_heads, metric=metric).to(self.device)
        self.temperature = float(self.model.logit_scale.detach().exp())
        self._pretrained_visual = {k: v.detach().clone() for k, v in self.model.visual.state_dict().items()}
        self.eval_visual = self.model.visual  # replaced by the BMA / WiSE-FT encoder after step 2
        self.expert_features: torch.Tensor | None = None
        self.history: dict = {"step1": [], "step2": []}
        self._image_stores: dict = {}  # cache folder (None: memory) -> ImageCacheStore

    # ------------------------------------------------------------------ helpers
    @property
    def classnames(self) -> list:
        return self.config["classnames"]

    @property
    def domains(self) -> list:
        return self.config["domains"]

    def _check_datasets(self, datasets: Mapping, what: str, need_all_domains: bool) -> None:
        if not isinstance(datasets, Mapping) or not datasets:
            raise ValueError(f"{what} must be a non-empty dict domain -> dataset")
        if need_all_domains and set(datasets) != set(self.domains):
            raise ValueError(
                f"{what} must hold exactly the source domains {self.domains} (one expert each), got {sorted(datasets)}"
            )
        for name, ds in datasets.items():
            if len(ds) == 0:
                raise ValueError(f"{what}[{name!r}] is empty")
            names = _classnames_of(ds)
            if names is not None and names != self.classnames:
                raise ValueError(
                    f"{what}[{name!r}] has classes {names[:5]}{'...' if len(names) > 5 else ''} "
                    f"({len(names)}), but this model was built for {self.classnames[:5]}... ({len(self.classnames)})"
                )

    def _autocast(self):
        # bf16 autocast: parameters (and so the optimizer's master weights) stay fp32
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def image_cache(self, folder: str | None = None) -> ImageCacheStore:
        """The uint8 image caches of this trainer: in memory (folder None) or memory-mapped files in
        ``folder``; kept for the trainer's life, so later passes over the same files decode nothing."""
        key = None if folder is None else os.path.abspath(os.fspath(folder))
        if key not in self._image_stores:
            self._image_stores[key] = ImageCacheStore(key)
        return self._image_stores[key]

    def encode_images(self, images: torch.Tensor, visual=None) -> torch.Tensor:
        visual = visual if visual is not None else self.model.visual
        with self._autocast():
            f = image_embedding(visual, images.to(self.device))
        return F.normalize(f.float(), dim=-1)

    @torch.no_grad()
    def dataset_features(self, dataset, batch_size: int = 64, visual=None, *, workers: int | None = None,
                         image_cache: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen-encoder features of every image of ``dataset`` (one view) and the labels."""
        if self.dist.enabled:  # [distributed] each rank encodes its batches; an exact all-reduce gathers
            return self._dataset_features_sharded(dataset, batch_size, visual, workers, image_cache)
        feats, labels = [], []
        feed = EvalFeed([dataset], batch_size, self.device, workers=workers, store=self.image_cache(image_cache))
        for _, x, y in feed:
            feats.append(self.encode_images(x, visual))
            labels.append(y)
        return torch.cat(feats), torch.cat(labels).to(self.device)

    @torch.no_grad()
    def _dataset_features_sharded(self, dataset, batch_size: int, visual, workers, image_cache):
        n, ctx = len(dataset), self.dist
        feats = torch.zeros(n, int(self.model.visual.output_dim), device=self.device)
        labels = torch.zeros(n, dtype=torch.long, device=self.device)
        feed = EvalFeed([dataset], batch_size, self.device, workers=workers, store=self.image_cache(image_cache),
                        shard=(ctx.rank, ctx.world_size))
        for (_, b), (_, x, y) in zip(feed.keys, feed):
            start = b * batch_size
            feats[start : start + x.shape[0]] = self.encode_images(x, visual)
            labels[start : start + x.shape[0]] = y
        # rows are disjoint across ranks, zeros elsewhere: x + 0 sums are exact
        ctx.all_reduce_sum_(feats, "gather of the step-1 image features")
        ctx.all_reduce_sum_(labels, "gather of the step-1 labels")
        return feats, labels

    # ------------------------------------------------------------------ step 1
    @_on_steady_heap
    def fit_experts(
        self,
        datasets: Mapping,
        *,
        iterations: int | None = None,
        epochs: int = 31,
        batch_size: int = 32,
        lr: float = 1e-4,
        momentum: float = 0.0,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 0,
        resume: str | None = None,
        progress: bool = False,
        callback: Callable | None = None,
        views: int = 1,
        transform: Callable | None = None,
        cache_dir: str | None = None,
        workers: int | None = None,
        compile: bool | dict = False,
    ) -> list:
        """Step 1: all K experts in one run (official: SGD lr 1e-4, cosine schedule, batch 32).

        The frozen image encoder runs once per image and view (exact for one un-augmented view); every
        step is one batched text pass for all experts plus a (B, D) x (D, C) product per expert. The
        cosine schedule is sized to the steps actually run. Returns the per-step loss history.

        ``views`` > 1 with a random ``transform`` (applied to each dataset image) caches that many
        augmented copies of every image; epoch e of a domain uses view e % views. ``cache_dir`` keeps
        the features in safetensors files there (one per domain), reused while the encoder weights,
        the images and the transform are unchanged (see ``ImageFeatureCache``).

        ``workers``: data worker processes for the feature pass (None: ``default_workers()``; 0: in
        this process). ``compile``: the iteration (text pass, logits, loss, SGD) under torch.compile
        (True: "reduce-overhead" on CUDA, the default mode on CPU; a dict: torch.compile options).
        """
        self._check_datasets(datasets, "datasets", need_all_domains=True)
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise ValueError(f"views must be an int >= 1, got {views!r}")
        if views > 1 and transform is None:
            raise ValueError("views > 1 needs a random transform (every view would be the same image)")
        batch_size = _checks.check_count(batch_size, "batch_size")
        _checks.check_learning_rate(lr, "lr")
        workers = check_workers(workers)
        options = compile_options(compile, self.device)
        sizes = {d: len(datasets[d]) for d in self.domains}
        caches = None
        if views > 1 or transform is not None or cache_dir is not None:
            caches = {
                d: ImageFeatureCache(
                    self.model, datasets[d], transform=transform, views=views, seed=self.config["seed"] + k,
                    path=os.path.join(cache_dir, f"step1_features_{k}.safetensors") if cache_dir else None,
                    workers=workers,
                    distributed=self.dist,  # [distributed] build sharded over ranks, rank 0 writes
                ).load_or_build()
                for k, d in enumerate(self.domains)
            }
            cached = None
        else:
            cached = {d: self.dataset_features(datasets[d], workers=workers) for d in self.domains}
        for d in self.domains:
            _checks.check_dataset_labels(cached[d][1] if caches is None else caches[d].labels, len(self.classnames),
                                         f"datasets[{d!r}]")
        steps = iterations if iterations is not None else epochs * max(math.ceil(n / batch_size) for n in sizes.values())
        if steps < 1:
            raise ValueError(f"iterations must be >= 1, got {steps}")
        optimizer = torch.optim.SGD([self.learner.ctx], lr=lr, momentum=momentum)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        start = 0
        if resume:
            state = checkpoint.load_state(resume)
            start = checkpoint.check_resume_state(state, resume, "step1", steps, ("ctx", "optimizer", "scheduler", "history"))
            if tuple(state["ctx"].shape) != tuple(self.learner.ctx.shape):
                raise ValueError(f"resume state {resume!r} has contexts of shape {tuple(state['ctx'].shape)}, "
                                 f"this model's are {tuple(self.learner.ctx.shape)}")
            with torch.no_grad():
                self.learner.ctx.copy_(state["ctx"].to(self.device))
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            self.history["step1"] = list(state["history"])
        guard = checkpoint.LossGuard("step 1", _NAN_CAUSES.format(lr=lr, tau=self.temperature))
        bar = _progress(range(start, steps), progress and self.dist.is_main, "step 1 (experts)")
        seed = self.config["seed"]
        loss_fn, reduce_grads, rows = self._step1_loss, None, None
        if self.dist.enabled:  # [distributed] each rank its rows of every expert's batch, ctx grads summed
            rows = dist_glue.row_bounds(batch_size, self.dist.world_size)[self.dist.rank]
            loss_fn = functools.partial(self._step1_loss, global_batch=batch_size)
            reduce_grads = functools.partial(_all_reduce_grads_and_loss, self.dist, [self.learner.ctx])
        iteration = Step1Iteration(loss_fn, optimizer, scheduler, options, reduce_grads=reduce_grads)
        log = _LossLog(bar)
        for step in bar:
            batches = []
            for k, d in enumerate(self.domains):
                idx = epoch_batch_indices(sizes[d], batch_size, step, seed, stream=k).to(self.device)
                if rows is not None:
                    idx = idx[rows[0] : rows[1]]
                if caches is None:
                    feats, labels = cached[d]
                    batches.append((feats[idx], labels[idx]))
                else:
                    epoch = step // max(1, math.ceil(sizes[d] / batch_size))
                    batches.append(caches[d].get(idx, caches[d].view_for_epoch(epoch), device=self.device))
            with self.dist.guard(f"step 1 (experts) iteration {step + 1}"):
                loss = iteration(batches)
            guard.observe(step, loss)
            saving = bool(checkpoint_dir and checkpoint_every and (step + 1) % checkpoint_every == 0)
            if callback or saving or guard.due(step) or step == steps - 1 or log.due():
                values = [v / len(self.domains) for v in guard.drain()]
                self.history["step1"].extend(values)
                log.show(bar, values[-1], len(values) * len(self.domains) * batch_size)
                if callback:
                    callback("step1", step, values[-1])
            if saving or guard.due(step):
                guard.check(step)  # never checkpoint a state after a NaN loss
            if saving and self.dist.is_main:  # [distributed] rank 0 writes
                path = os.path.join(checkpoint_dir, STEP1_STATE)
                checkpoint.save_state(
                    path,
                    {"stage": "step1", "step": step + 1, "total_steps": steps, "ctx": self.learner.ctx.detach().cpu(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "history": self.history["step1"]},
                )
                guard.checkpoint = path
        guard.check(steps - 1)
        self.refresh_expert_features()
        return self.history["step1"]

    def _step1_loss(self, batches, global_batch: int | None = None) -> torch.Tensor:
        """Sum over experts of the cross entropy of expert k's logits on domain k's cached features.

        ``global_batch`` (torch.distributed): the batches are this rank's rows of batches of that
        size; the loss is this rank's share of the batch means (the ranks' shares sum to them)."""
        T = encode_expert_prompts(self.model, self.learner)
        loss = T.new_zeros(())
        for k, (feats, labels) in enumerate(batches):
            logits = self.temperature * feats @ T[k].t()
            if global_batch is None:
                loss = loss + F.cross_entropy(logits, labels)
            else:
                loss = loss + F.cross_entropy(logits, labels, reduction="sum") / global_batch
        return loss

    @torch.no_grad()
    def refresh_expert_features(self) -> torch.Tensor:
        """Freezes the experts: T (K, C, D) used by step 2 and evaluation."""
        self.expert_features = encode_expert_prompts(self.model, self.learner).detach()
        return self.expert_features

    # ------------------------------------------------------------------ step 2
    def step2_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The guided loss of one batch and the expert weights used (all through guidg_fast.ops)."""
        return self._guidance_loss(self.encode_images(x), y)

    def _guidance_loss(self, f: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        base = BASELINES[self.config["baseline"]]
        T = self.expert_features
        # CMAttn weights (f and T detached inside, as the official code does), their batch mean in
        # batch mode, and the multi-expert loss: ops.guidance_loss (the two fused ops composed)
        return ops.guidance_loss(
            f, T, y, *self.attn.stacked_parameters(), self.temperature, margin=base["margin"],
            entropy_weight=base["entropy_weight"], metric=self.attn.metric,
            weights="batch" if self.config["weight_mode"] == "batch" else "per_sample",
        )

    @_on_steady_heap
    def finetune(
        self,
        datasets: Mapping,
        *,
        iterations: int | None = None,
        epochs: int = 10,
        iters_per_epoch: int = 400,
        batch_per_domain: int = 12,
        lr: float = 5e-6,
        weight_decay: float = 0.1,
        beta: float = 0.1,
        wise_alpha: float | None = None,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 0,
        resume: str | None = None,
        progress: bool = False,
        callback: Callable | None = None,
        workers: int | None = None,
        compile: bool | dict = False,
        phase_times: dict | None = None,
        image_cache: str | None = None,
    ) -> list:
        """Step 2: fine-tune the vision encoder under the experts' guidance (AdamW + cosine, domain-balanced
        batches of ``batch_per_domain`` images from every source domain, BMA for clipood, WiSE-FT for erm/ueo).

        Input: ``workers`` processes (None: ``default_workers()``) build each step's batch; datasets
        with a cacheable transform (``clip_transform``) are decoded and resized once into a uint8
        cache (memory, or memory-mapped files in the folder ``image_cache``) and RandAugment runs on
        uint8 batches (on the GPU on CUDA). Batches and augmentations depend only on (seed, step).
        ``compile``: the iteration under torch.compile (see ``fit_experts``). ``phase_times``: a dict
        that receives seconds per phase (data, encoder, guidance, optimizer, bma).
        """
        self._check_datasets(datasets, "datasets", need_all_domains=False)
        if self.expert_features is None:
            self.refresh_expert_features()
        batch_per_domain = _checks.check_count(batch_per_domain, "batch_per_domain")
        _checks.check_learning_rate(lr, "lr")
        base = BASELINES[self.config["baseline"]]
        workers = check_workers(workers)
        options = compile_options(compile, self.device)
        timer = PhaseTimer(phase_times, self.device, STEP2_PHASES)
        names = sorted(datasets)
        total = batch_per_domain * len(names)
        if total < self.dist.world_size:
            raise ValueError(f"batch_per_domain x domains = {total} images per step cannot be split over "
                             f"{self.dist.world_size} ranks: every rank needs at least one")
        steps = iterations if iterations is not None else epochs * iters_per_epoch
        if steps < 1:
            raise ValueError(f"iterations must be >= 1, got {steps}")
        visual = self.model.visual
        visual.requires_grad_(True)
        params = list(visual.parameters()) + list(self.attn.parameters())
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        bma = BetaMovingAverage(visual, beta=beta, total_steps=steps) if base["bma"] else None
        start = 0
        if resume:
            state = checkpoint.load_state(resume)
            start = checkpoint.check_resume_state(
                state, resume, "step2", steps, ("visual", "attn", "optimizer", "scheduler", "rng", "history"))
            visual.load_state_dict(state["visual"])
            self.attn.load_state_dict(state["attn"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if bma is not None:
                bma.load_state_dict(state["bma"])
            torch.set_rng_state(state["rng"])
            self.history["step2"] = list(state["history"])
        guard = checkpoint.LossGuard("step 2", _NAN_CAUSES.format(lr=lr, tau=self.temperature))
        # [distributed] DDP over the encoder (CMAttn's parameters in the same reducer); each rank
        # loads and encodes its contiguous slice of the global domain-major batch
        encode, global_batch, rows = self.step2_distributed(visual, total)
        feed = Step2Feed([datasets[d] for d in names], batch_per_domain, self.config["seed"], self.device,
                         start=start, stop=steps, workers=workers, store=self.image_cache(image_cache), rows=rows)
        iteration = Step2Iteration(encode, self._guidance_loss, optimizer, scheduler, bma, options,
                                   global_batch=global_batch)
        bar = _progress(range(start, steps), progress and self.dist.is_main, "step 2 (fine-tune)")
        visual.train()
        try:
            batches = timer.time_iter(feed)
            log = _LossLog(bar)
            for step in bar:
                x, y = next(batches)
                with self.dist.guard(f"step 2 (fine-tune) iteration {step + 1}"):
                    loss = iteration(x, y, timer)
                guard.observe(step, loss)
                saving = bool(checkpoint_dir and checkpoint_every and (step + 1) % checkpoint_every == 0)
                if callback or saving or guard.due(step) or step == steps - 1 or log.due():
                    values = guard.drain()
                    self.history["step2"].extend(values)
                    log.show(bar, values[-1], len(values) * total)
                    if callback:
                        callback("step2", step, values[-1])
                if saving or guard.due(step):
                    guard.check(step)  # never checkpoint a state after a NaN loss
                if saving and self.dist.is_main:  # [distributed] rank 0 writes
                    path = os.path.join(checkpoint_dir, STEP2_STATE)
                    checkpoint.save_state(
                        path,
                        {"stage": "step2", "step": step + 1, "total_steps": steps, "visual": visual.state_dict(),
                         "attn": self.attn.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "bma": bma.state_dict() if bma else None,
                         "rng": torch.get_rng_state(), "history": self.history["step2"]},
                    )
                    guard.checkpoint = path
            guard.check(steps - 1)
        finally:
            visual.eval()
            visual.requires_grad_(False)
        alpha = wise_alpha if wise_alpha is not None else base["wise_alpha"]
        if bma is not None:
            self.eval_visual = bma.module
        elif alpha is not None:
            import copy

            blended = copy.deepcopy(visual)  # a separate copy: training weights stay as trained
            blended.load_state_dict(wise_ft(self._pretrained_visual, visual.state_dict(), alpha))
            self.eval_visual = blended
        else:
            self.eval_visual = visual
        self.eval_visual.eval()
        if self.dist.enabled:  # [distributed] every rank computed the same BMA / WiSE-FT: make it bitwise rank 0's
            self.dist.broadcast_module_(self.eval_visual, what="broadcast of the step-2 encoder")
            self.dist.broadcast_module_(self.attn, what="broadcast of CMAttn")
        return self.history["step2"]

    def step2_distributed(self, visual, total: int):
        """Step 2's pieces for this process: (encode, global_batch, rows). One process: the plain
        encoder, no gather, the whole batch. Under torch.distributed: the DDP-wrapped encoder (made
        now: it broadcasts rank 0's weights), the feature gather of ``Step2Iteration`` and this
        rank's rows [start, stop) of the global batch of ``total``."""
        if not self.dist.enabled:
            return self.encode_images, None, None
        encoder = _ddp_encoder(visual, self.attn, self.dist)
        start, stop = dist_glue.row_bounds(total, self.dist.world_size)[self.dist.rank]
        return (functools.partial(self.encode_images, visual=encoder),
                dist_glue.GlobalBatch(self.dist, start, stop, total), (start, stop))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ensemble logits (B, C) and the batch expert weights (K,) for a batch of images."""
        if self.expert_features is None:
            self.refresh_expert_features()
        f = self.encode_images(images, self.eval_visual)
        w = self.attn(f, self.expert_features).mean(dim=0)
        return ops.ensemble_logits(f, self.expert_features, w, self.temperature), w

    @_on_steady_heap
    @torch.no_grad()
    def evaluate(self, datasets: Mapping, batch_size: int = 64, *, workers: int | None = None,
                 phase_times: dict | None = None, image_cache: str | None = None) -> dict:
        """Top-1 accuracy (%) per domain: the ensemble, each expert alone, and the mean expert weights.

        ``workers``, ``image_cache``: as in ``finetune`` (evaluation transforms are wholly
        deterministic: after the first pass over a dataset no image file is read again).
        ``phase_times``: a dict that receives seconds per phase (data, compute).
        """
        self._check_datasets(datasets, "datasets", need_all_domains=False)
        batch_size = _checks.check_count(batch_size, "batch_size")
        if self.expert_features is None:
            self.refresh_expert_features()
        T = self.expert_features
        timer = PhaseTimer(phase_times, self.device, EVAL_PHASES)
        names = list(datasets)
        K = len(self.domains)
        tallies = {n: {"correct": 0, "experts": torch.zeros(K), "weights": torch.zeros(K), "batches": 0, "total": 0}
                   for n in names}
        ctx = self.dist
        # [distributed] whole batches round-robin over ranks: the batches of one process, each image once
        feed = EvalFeed([datasets[n] for n in names], batch_size, self.device, workers=workers,
                        store=self.image_cache(image_cache), shard=(ctx.rank, ctx.world_size) if ctx.enabled else None)
        for (_, b), (k_ds, x, y) in zip(feed.keys, timer.time_iter(feed)):
            with timer("compute"):
                tally = tallies[names[k_ds]]
                _checks.check_dataset_labels(y, len(self.classnames), f"datasets[{names[k_ds]!r}]",
                                             offset=b * batch_size)
                f = self.encode_images(x, self.eval_visual)
                w = self.attn(f, T).mean(dim=0)
                logits = ops.ensemble_logits(f, T, w, self.temperature)
                tally["correct"] += int((logits.argmax(-1) == y).sum())
                for k in range(K):
                    tally["experts"][k] += int(((f @ T[k].t()).argmax(-1) == y).sum())
                tally["weights"] += w.float().cpu()
                tally["batches"] += 1
                tally["total"] += y.numel()
        if ctx.enabled:  # [distributed] one all-reduce of every dataset's counts (float64: exact below 2^53)
            packed = torch.cat([torch.cat([torch.tensor([t["correct"], t["batches"], t["total"]], dtype=torch.float64),
                                           t["experts"].double(), t["weights"].double()])
                                for t in (tallies[n] for n in names)]).to(self.device)
            ctx.all_reduce_sum_(packed, "evaluation: all-reduce of the counts")
            for name, row in zip(names, packed.cpu().view(len(names), 3 + 2 * K)):
                tallies[name] = {"correct": int(row[0]), "batches": int(row[1]), "total": int(row[2]),
                                 "experts": row[3 : 3 + K], "weights": row[3 + K :]}
        results = {}
        for name in names:
            t = tallies[name]
            correct, per_expert, weights, batches, total = t["correct"], t["experts"], t["weights"], t["batches"], t["total"]
            results[name] = {
                "ensemble": 100.0 * correct / total,
                "experts": {d: 100.0 * float(per_expert[k]) / total for k, d in enumerate(self.domains)},
                "weights": {d: float(weights[k] / batches) for k, d in enumerate(self.domains)},
                "images": total,
            }
        return results

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str) -> None:
        """config.json + weights.safetensors (experts' contexts, CMAttn, the evaluation vision encoder;
        the whole backbone too when it was randomly initialised, so loading reproduces predictions).
        Under torch.distributed rank 0 writes; the others wait until the folder is complete."""
        if not self.dist.is_main:  # [distributed]
            self.dist.barrier("save: waiting for rank 0 to write the model folder")
            return
        tensors = {"learner.ctx": self.learner.ctx}
        tensors.update({f"attn.{k}": v for k, v in self.attn.state_dict().items()})
        tensors.update({f"eval_visual.{k}": v for k, v in self.eval_visual.state_dict().items()})
        if self.config["pretrained"] is None:
            tensors.update({f"model.{k}": v for k, v in self.model.state_dict().items()})
        if self.expert_features is not None:
            tensors["expert_features"] = self.expert_features
        # one unit: a temporary folder swapped in whole; the config records the weights' digest
        weights = checkpoint._safetensors_bytes(tensors, None)
        config = {"format": "guidg-fast/1", **self.config, "weights_sha256": checkpoint.weights_digest(weights)}
        checkpoint.write_model_folder(directory, {
            "weights.safetensors": weights,
            "config.json": (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
        })
        self.dist.barrier("save: the model folder is written")

    @classmethod
    def load(cls, directory: str, device: str | torch.device = "cpu", classnames: Sequence[str] | None = None,
             precision: str | None = None) -> "GuiDG":
        config_path = os.path.join(directory, "config.json")
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"model folder {str(directory)!r} does not exist or is not a folder")
        config = checkpoint.load_json(config_path)
        if config.get("format") != "guidg-fast/1":
            raise ValueError(f"{directory!r} is not a guidg-fast checkpoint (format {config.get('format')!r})")
        digest = config.pop("weights_sha256", None)
        missing = [k for k in ("arch", "pretrained", "classnames", "domains") if k not in config]
        if missing:
            raise ValueError(f"{config_path!r} lacks the entries {missing}: not a complete guidg-fast model config")
        weights_path = os.path.join(directory, "weights.safetensors")
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"model folder {str(directory)!r} has no weights.safetensors")
        with open(weights_path, "rb") as fh:
            weights = fh.read()
        if digest is not None and checkpoint.weights_digest(weights) != digest:
            raise ValueError(
                f"{weights_path!r} does not match {config_path!r} (weights digest differs): the folder mixes two saves "
                "or the weights were changed; save the model again"
            )
        if classnames is not None and list(classnames) != config["classnames"]:
            raise ValueError(
                f"checkpoint {directory!r} was trained for {len(config['classnames'])} classes "
                f"{config['classnames'][:5]}..., not the {len(classnames)} classes {list(classnames)[:5]}... given"
            )
        kwargs = {k: v for k, v in config.items() if k not in ("format", "arch", "pretrained", "classnames", "domains")}
        try:
            obj = cls(config["arch"], config["pretrained"], config["classnames"], config["domains"], device=device,
                      precision=precision, **kwargs)
        except TypeError as exc:  # an unknown or misspelt config entry
            raise ValueError(f"{config_path!r} does not describe a GuiDG model: {exc}") from exc
        tensors = checkpoint._read_safetensors(weights_path, "weights file", data=weights, device=obj.device)[0]
        if "learner.ctx" not in tensors:
            raise ValueError(f"{weights_path!r} has no 'learner.ctx' entry: not the weights of a guidg-fast model")
        if "model." + next(iter(obj.model.state_dict())) in tensors:
            obj.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if tensors["learner.ctx"].shape != obj.learner.ctx.shape:
            raise ValueError(
                f"checkpoint contexts have shape {tuple(tensors['learner.ctx'].shape)}, expected {tuple(obj.learner.ctx.shape)}"
            )
        with torch.no_grad():
            obj.learner.ctx.copy_(tensors["learner.ctx"])
        obj.attn.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("attn.")})
        visual_state = {k[12:]: v for k, v in tensors.items() if k.startswith("eval_visual.")}
        if visual_state:
            import copy

            obj.eval_visual = copy.deepcopy(obj.model.visual)
            obj.eval_visual.load_state_dict(visual_state)
            obj.eval_visual.eval()
        if "expert_features" in tensors:
            expected = (len(obj.domains), len(obj.classnames), int(obj.model.visual.output_dim))
            if tuple(tensors["expert_features"].shape) != expected:
                raise ValueError(
                    f"{weights_path!r} holds expert_features of shape {tuple(tensors['expert_features'].shape)}, "
                    f"expected {expected} (K experts, C classes, D)"
                )
            obj.expert_features = tensors["expert_features"]
        return obj

    def load_official_expert(self, domain: str, path: str) -> None:
        """Loads an official GuiDG/CoOp ``prompt_learner`` state dict (phase-1 ``best*.pth``) into one expert."""
        if domain not in self.domains:
            raise ValueError(f"domain {domain!r} is not one of this model's experts {self.domains}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if "ctx" not in state:
            raise ValueError(f"{path!r} has no 'ctx' entry: not a prompt_learner state dict")
        prefix = state.get("token_prefix")
        if prefix is not None and prefix.shape[0] != len(self.classnames):
            raise ValueError(
                f"{path!r} was trained for {prefix.shape[0]} classes, this model has {len(self.classnames)}: another class set"
            )
        k = self.domains.index(domain)
        expected = tuple(self.learner.ctx.shape[1:])
        if tuple(state["ctx"].shape) != expected:
            raise ValueError(f"{path!r} has ctx of shape {tuple(state['ctx'].shape)}, expected {expected}")
        with torch.no_grad():
            self.learner.ctx[k].copy_(state["ctx"].to(self.learner.ctx))
        self.expert_features = None


# ---------------------------------------------------------------------- distributed hooks
def _all_reduce_grads_and_loss(ctx, params: list, loss: torch.Tensor) -> torch.Tensor:
    """Sums the ranks' gradient shares of ``params`` and their loss shares in one all-reduce."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1).to(grads[0].dtype)])
    ctx.all_reduce_sum_(flat, "all-reduce of the gradient")
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()
    return flat[-1]


class _EncoderAndAttention(torch.nn.Module):
    """The module DDP wraps: the vision encoder's forward, CMAttn's parameters in the same reducer."""

    def __init__(self, visual, attn):
        super().__init__()
        self.visual, self.attn = visual, attn

    def forward(self, x):
        return image_embedding(self.visual, x)


def _ddp_encoder(visual, attn, ctx):
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    with ctx.guard("DDP setup (weight broadcast from rank 0)"):
        return DistributedDataParallel(_EncoderAndAttention(visual, attn), device_ids=device_ids)


# Seconds between progress-bar redraws: a terminal gets tqdm's usual 0.1 s; a file or pipe (a
# log, CI) gets one line every 10 s instead of a redraw per step.
_REDRAW_TTY_S = 0.1
_REDRAW_LOG_S = 10.0


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    import sys

    from tqdm import tqdm

    stream = sys.stderr
    interactive = hasattr(stream, "isatty") and stream.isatty()
    return tqdm(iterable, desc=desc, dynamic_ncols=True, file=stream,
                mininterval=_REDRAW_TTY_S if interactive else _REDRAW_LOG_S)


class _LossLog:
    """When the training loops read their losses to the host. Reading a loss waits for the device to
    finish the step, and the next step's launches then cannot overlap it, so the loops read the
    pending losses in one transfer only when something needs them: a callback (every step), a
    checkpoint, the NaN check, the last step, or the progress bar's next update (at most one per
    ``interval`` seconds)."""

    def __init__(self, bar):
        self.interval = _LOSS_READ_S if hasattr(bar, "set_postfix") else float("inf")
        self.last = time.perf_counter()

    def due(self) -> bool:
        return time.perf_counter() - self.last >= self.interval

    def show(self, bar, loss: float, images: int) -> None:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        # refresh=False: the numbers show at the bar's next redraw (set_postfix would force one)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss:.4f}", img_per_s=f"{images / max(seconds, 1e-9):.0f}", refresh=False)


# The progress bar's loss and img/s are read from the device at most this often (seconds).
_LOSS_READ_S = 1.0
