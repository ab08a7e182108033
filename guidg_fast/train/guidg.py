"""GuiDG: the high-level trainer. Step 1 trains all K experts in one run; step 2 fine-tunes the vision
encoder under expert guidance; evaluation reports per-domain accuracy. It adds no math of its own:
every computation goes through guidg_fast's ops and encoders.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .. import ops, reference
from ..attention import CrossModalAttention
from ..averaging import BetaMovingAverage, wise_ft
from ..backbone import load_clip
from ..prompts import ExpertPromptLearner
from ..text import encode_expert_prompts
from . import checkpoint
from . import distributed as dist_glue
from .feature_cache import ImageFeatureCache

BASELINES = {
    # margin: CLIPood margin metric softmax; entropy_weight: UEO term; bma: beta moving average of the
    # vision encoder; wise_alpha: WiSE-FT blend with the pretrained encoder after training
    "clipood": {"margin": 0.3, "entropy_weight": 0.0, "bma": True, "wise_alpha": None},
    "erm": {"margin": 0.0, "entropy_weight": 0.0, "bma": False, "wise_alpha": 0.5},
    "ueo": {"margin": 0.0, "entropy_weight": 0.01, "bma": False, "wise_alpha": 0.5},
}
WEIGHT_MODES = ("batch", "sample")


def _seeded_generator(*parts: int) -> torch.Generator:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def epoch_batch_indices(n: int, batch: int, step: int, seed: int, stream: int) -> torch.Tensor:
    """Indices of batch ``step`` from a dataset of n items, reshuffled each epoch.

    A pure function of (seed, stream, step): training can resume at any step and see the same batches.
    """
    per_epoch = max(1, math.ceil(n / batch))
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=_seeded_generator(seed, stream, epoch))
    idx = perm[pos * batch : (pos + 1) * batch]
    if idx.numel() < batch:  # the last batch of an epoch wraps around to stay full
        idx = torch.cat([idx, perm[: batch - idx.numel()]])
    return idx


def _classnames_of(dataset) -> list | None:
    names = getattr(dataset, "classnames", None)
    if names is None and hasattr(dataset, "dataset"):  # torch Subset
        names = getattr(dataset.dataset, "classnames", None)
    return list(names) if names is not None else None


def _stack_items(dataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for i in indices.tolist() if isinstance(indices, torch.Tensor) else indices:
        x, y = dataset[i]
        images.append(x)
        labels.append(int(y))
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


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
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def encode_images(self, images: torch.Tensor, visual=None) -> torch.Tensor:
        visual = visual if visual is not None else self.model.visual
        with self._autocast():
            f = visual(images.to(self.device))
        return F.normalize(f.float(), dim=-1)

    @torch.no_grad()
    def dataset_features(self, dataset, batch_size: int = 64, visual=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen-encoder features of every image of ``dataset`` (one view) and the labels."""
        if self.dist.enabled:  # [distributed] each rank encodes its batches; an exact all-reduce gathers
            return self._dataset_features_sharded(dataset, batch_size, visual)
        feats, labels = [], []
        for start in range(0, len(dataset), batch_size):
            x, y = _stack_items(dataset, range(start, min(len(dataset), start + batch_size)))
            feats.append(self.encode_images(x, visual))
            labels.append(y)
        return torch.cat(feats), torch.cat(labels).to(self.device)

    @torch.no_grad()
    def _dataset_features_sharded(self, dataset, batch_size: int, visual=None):
        n, ctx = len(dataset), self.dist
        feats = labels = None
        for start in dist_glue.batch_starts(n, batch_size, ctx.rank, ctx.world_size):
            x, y = _stack_items(dataset, range(start, min(n, start + batch_size)))
            f = self.encode_images(x, visual)
            if feats is None:
                feats = torch.zeros(n, f.shape[-1], device=self.device)
                labels = torch.zeros(n, dtype=torch.long, device=self.device)
            feats[start : start + f.shape[0]] = f
            labels[start : start + f.shape[0]] = y.to(self.device)
        if feats is None:  # more ranks than batches: this rank encodes nothing
            feats = torch.zeros(n, int(self.model.visual.output_dim), device=self.device)
            labels = torch.zeros(n, dtype=torch.long, device=self.device)
        with ctx.guard("gather of the step-1 image features"):
            ctx.all_reduce_sum_(feats)  # rows are disjoint across ranks: x + 0 sums are exact
            ctx.all_reduce_sum_(labels)
        return feats, labels

    # ------------------------------------------------------------------ step 1
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
    ) -> list:
        """Step 1: all K experts in one run (official: SGD lr 1e-4, cosine schedule, batch 32).

        The frozen image encoder runs once per image and view (exact for one un-augmented view); every
        step is one batched text pass for all experts plus a (B, D) x (D, C) product per expert. The
        cosine schedule is sized to the steps actually run. Returns the per-step loss history.

        ``views`` > 1 with a random ``transform`` (applied to each dataset image) caches that many
        augmented copies of every image; epoch e of a domain uses view e % views. ``cache_dir`` keeps
        the features in safetensors files there (one per domain), reused while the encoder weights,
        the images and the transform are unchanged (see ``ImageFeatureCache``).
        """
        self._check_datasets(datasets, "datasets", need_all_domains=True)
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise ValueError(f"views must be an int >= 1, got {views!r}")
        if views > 1 and transform is None:
            raise ValueError("views > 1 needs a random transform (every view would be the same image)")
        sizes = {d: len(datasets[d]) for d in self.domains}
        caches = None
        if views > 1 or transform is not None or cache_dir is not None:
            caches = {
                d: ImageFeatureCache(
                    self.model, datasets[d], transform=transform, views=views, seed=self.config["seed"] + k,
                    path=os.path.join(cache_dir, f"step1_features_{k}.safetensors") if cache_dir else None,
                    distributed=self.dist,  # [distributed] build sharded over ranks, rank 0 writes
                ).load_or_build()
                for k, d in enumerate(self.domains)
            }
            cached = None
        else:
            cached = {d: self.dataset_features(datasets[d]) for d in self.domains}
        steps = iterations if iterations is not None else epochs * max(math.ceil(n / batch_size) for n in sizes.values())
        if steps < 1:
            raise ValueError(f"iterations must be >= 1, got {steps}")
        optimizer = torch.optim.SGD([self.learner.ctx], lr=lr, momentum=momentum)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        start = 0
        if resume:
            state = checkpoint.load_state(resume)
            if state.get("stage") != "step1":
                raise ValueError(f"resume={resume!r} is not a step-1 state (stage {state.get('stage')!r})")
            with torch.no_grad():
                self.learner.ctx.copy_(state["ctx"].to(self.device))
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            self.history["step1"] = list(state["history"])
            start = int(state["step"])
        bar = _progress(range(start, steps), progress and self.dist.is_main, "step 1 (experts)")
        seed = self.config["seed"]
        for step in bar:
            t0 = time.perf_counter()
            T = encode_expert_prompts(self.model, self.learner)
            loss = T.new_zeros(())
            for k, d in enumerate(self.domains):
                idx = epoch_batch_indices(sizes[d], batch_size, step, seed, stream=k).to(self.device)
                if self.dist.enabled:  # [distributed] this rank's rows of the expert's batch
                    n_global = idx.numel()
                    lo, hi = dist_glue.row_bounds(n_global, self.dist.world_size)[self.dist.rank]
                    idx = idx[lo:hi]
                if caches is None:
                    feats, labels = cached[d]
                    feats, labels = feats[idx], labels[idx]
                else:
                    epoch = step // max(1, math.ceil(sizes[d] / batch_size))
                    feats, labels = caches[d].get(idx, caches[d].view_for_epoch(epoch), device=self.device)
                logits = self.temperature * feats @ T[k].t()
                if self.dist.enabled:  # this rank's share of the batch mean; the shares sum to it
                    loss = loss + F.cross_entropy(logits, labels, reduction="sum") / n_global
                else:
                    loss = loss + F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.dist.enabled:  # [distributed] sum the ctx gradient shares (and the loss) over ranks
                with self.dist.guard(f"step 1 (experts) iteration {step + 1}: all-reduce of the ctx gradient"):
                    loss = _all_reduce_grads_and_loss(self.dist, [self.learner.ctx], loss)
            optimizer.step()
            scheduler.step()
            value = float(loss.detach()) / len(self.domains)
            self.history["step1"].append(value)
            _postfix(bar, value, len(self.domains) * batch_size, time.perf_counter() - t0)
            if callback:
                callback("step1", step, value)
            if checkpoint_dir and checkpoint_every and (step + 1) % checkpoint_every == 0 and self.dist.is_main:
                checkpoint.save_state(
                    os.path.join(checkpoint_dir, "step1_state.pt"),
                    {"stage": "step1", "step": step + 1, "ctx": self.learner.ctx.detach().cpu(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "history": self.history["step1"]},
                )
        self.refresh_expert_features()
        return self.history["step1"]

    @torch.no_grad()
    def refresh_expert_features(self) -> torch.Tensor:
        """Freezes the experts: T (K, C, D) used by step 2 and evaluation."""
        self.expert_features = encode_expert_prompts(self.model, self.learner).detach()
        return self.expert_features

    # ------------------------------------------------------------------ step 2
    def _step2_batch(self, datasets: Mapping, names: list, sizes: dict, batch_per_domain: int, step: int,
                     rows: tuple[int, int] | None = None):
        """The step's global batch, domain-major; ``rows`` = (start, stop): only those rows of it
        (a rank's slice under torch.distributed: only its images are loaded)."""
        xs, ys = [], []
        offset = 0
        for j, d in enumerate(names):
            idx = epoch_batch_indices(sizes[d], batch_per_domain, step, self.config["seed"], stream=1000 + j)
            if rows is not None:  # [distributed] the part of this domain's block inside [start, stop)
                lo, hi = max(rows[0] - offset, 0), min(rows[1] - offset, idx.numel())
                offset += idx.numel()
                idx = idx[lo:hi] if hi > lo else idx[:0]
                if idx.numel() == 0:
                    continue
            x, y = _stack_items(datasets[d], idx)
            xs.append(x)
            ys.append(y)
        return torch.cat(xs).to(self.device), torch.cat(ys).to(self.device)

    def step2_loss(self, x: torch.Tensor, y: torch.Tensor, *, encoder=None, rows: tuple[int, int, int] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The guided loss of one batch and the expert weights used (all through guidg_fast.ops).

        Under torch.distributed, ``x``/``y`` are rows [start, stop) of a global batch of ``total``
        (``rows`` = (start, stop, total)) and ``encoder`` the DDP-wrapped encoder: the loss is the
        global batch's loss (see ``_distributed_features``)."""
        base = BASELINES[self.config["baseline"]]
        T = self.expert_features
        f = self.encode_images(x, encoder)
        if rows is not None:  # [distributed]
            f, y = _distributed_features(self.dist, f, y, rows)
        # CMAttn weights (f and T detached inside, as the official code does), their batch mean in
        # batch mode, and the multi-expert loss: one op (one autograd node with the CPU extension)
        return ops.guidance_loss(
            f, T, y, *self.attn.stacked_parameters(), self.temperature, margin=base["margin"],
            entropy_weight=base["entropy_weight"], metric=self.attn.metric,
            weights="batch" if self.config["weight_mode"] == "batch" else "per_sample",
        )

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
    ) -> list:
        """Step 2: fine-tune the vision encoder under the experts' guidance (AdamW + cosine, domain-balanced
        batches of ``batch_per_domain`` images from every source domain, BMA for clipood, WiSE-FT for erm/ueo).
        """
        self._check_datasets(datasets, "datasets", need_all_domains=False)
        if self.expert_features is None:
            self.refresh_expert_features()
        base = BASELINES[self.config["baseline"]]
        names = sorted(datasets)
        sizes = {d: len(datasets[d]) for d in names}
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
            if state.get("stage") != "step2":
                raise ValueError(f"resume={resume!r} is not a step-2 state (stage {state.get('stage')!r})")
            visual.load_state_dict(state["visual"])
            self.attn.load_state_dict(state["attn"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if bma is not None:
                bma.load_state_dict(state["bma"])
            torch.set_rng_state(state["rng"])
            self.history["step2"] = list(state["history"])
            start = int(state["step"])
        bar = _progress(range(start, steps), progress and self.dist.is_main, "step 2 (fine-tune)")
        visual.train()
        # [distributed] DDP over the encoder with CMAttn's parameters in the same reducer; each rank
        # takes a contiguous slice of the global domain-major batch
        encoder, rows = None, None
        if self.dist.enabled:
            encoder = _ddp_encoder(visual, self.attn, self.dist)
            total = batch_per_domain * len(names)
            rows = (*dist_glue.row_bounds(total, self.dist.world_size)[self.dist.rank], total)
        try:
            for step in bar:
                t0 = time.perf_counter()
                with self.dist.guard(f"step 2 (fine-tune) iteration {step + 1}"):
                    x, y = self._step2_batch(datasets, names, sizes, batch_per_domain, step,
                                             rows=rows[:2] if rows else None)
                    loss, w = self.step2_loss(x, y, encoder=encoder, rows=rows)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
                scheduler.step()
                if bma is not None:
                    bma.update()
                value = float(loss.detach())
                self.history["step2"].append(value)
                _postfix(bar, value, rows[2] if rows else x.shape[0], time.perf_counter() - t0)
                if callback:
                    callback("step2", step, value)
                if checkpoint_dir and checkpoint_every and (step + 1) % checkpoint_every == 0 and self.dist.is_main:
                    checkpoint.save_state(
                        os.path.join(checkpoint_dir, "step2_state.pt"),
                        {"stage": "step2", "step": step + 1, "visual": visual.state_dict(),
                         "attn": self.attn.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "bma": bma.state_dict() if bma else None,
                         "rng": torch.get_rng_state(), "history": self.history["step2"]},
                    )
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

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ensemble logits (B, C) and the batch expert weights (K,) for a batch of images."""
        if self.expert_features is None:
            self.refresh_expert_features()
        f = self.encode_images(images, self.eval_visual)
        w = self.attn(f, self.expert_features).mean(dim=0)
        return ops.ensemble_logits(f, self.expert_features, w, self.temperature), w

    @torch.no_grad()
    def evaluate(self, datasets: Mapping, batch_size: int = 64) -> dict:
        """Top-1 accuracy (%) per domain: the ensemble, each expert alone, and the mean expert weights."""
        self._check_datasets(datasets, "datasets", need_all_domains=False)
        if self.expert_features is None:
            self.refresh_expert_features()
        T = self.expert_features
        results = {}
        ctx = self.dist
        for name, ds in datasets.items():
            correct, per_expert, weights, batches, total = 0, torch.zeros(len(self.domains)), 0.0, 0, 0
            # [distributed] whole batches round-robin over ranks: the same batches as one process
            for start in dist_glue.batch_starts(len(ds), batch_size, ctx.rank, ctx.world_size):
                x, y = _stack_items(ds, range(start, min(len(ds), start + batch_size)))
                y = y.to(self.device)
                f = self.encode_images(x, self.eval_visual)
                w = self.attn(f, T).mean(dim=0)
                logits = ops.ensemble_logits(f, T, w, self.temperature)
                correct += int((logits.argmax(-1) == y).sum())
                for k in range(len(self.domains)):
                    per_expert[k] += int(((f @ T[k].t()).argmax(-1) == y).sum())
                weights = weights + w.cpu()
                batches += 1
                total += y.numel()
            if ctx.enabled:  # [distributed] one all-reduce of the counts (float64: exact for counts < 2^53)
                K = len(self.domains)
                weights = weights if isinstance(weights, torch.Tensor) else torch.zeros(K)  # a rank with no batch
                packed = torch.cat([torch.tensor([correct, batches, total], dtype=torch.float64),
                                    per_expert.double(), weights.double()]).to(self.device)
                with ctx.guard(f"evaluation of {name!r}: all-reduce of the counts"):
                    ctx.all_reduce_sum_(packed)
                packed = packed.cpu()
                correct, batches, total = int(packed[0]), int(packed[1]), int(packed[2])
                per_expert, weights = packed[3 : 3 + K], packed[3 + K :]
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
        os.makedirs(directory, exist_ok=True)
        checkpoint.save_tensors(os.path.join(directory, "weights.safetensors"), tensors)
        checkpoint.save_json(os.path.join(directory, "config.json"), {"format": "guidg-fast/1", **self.config})
        self.dist.barrier("save: the model folder is written")

    @classmethod
    def load(cls, directory: str, device: str | torch.device = "cpu", classnames: Sequence[str] | None = None) -> "GuiDG":
        config = checkpoint.load_json(os.path.join(directory, "config.json"))
        if config.get("format") != "guidg-fast/1":
            raise ValueError(f"{directory!r} is not a guidg-fast checkpoint (format {config.get('format')!r})")
        if classnames is not None and list(classnames) != config["classnames"]:
            raise ValueError(
                f"checkpoint {directory!r} was trained for {len(config['classnames'])} classes "
                f"{config['classnames'][:5]}..., not the {len(classnames)} classes {list(classnames)[:5]}... given"
            )
        kwargs = {k: v for k, v in config.items() if k not in ("format", "arch", "pretrained", "classnames", "domains")}
        obj = cls(config["arch"], config["pretrained"], config["classnames"], config["domains"], device=device, **kwargs)
        tensors = checkpoint.load_tensors(os.path.join(directory, "weights.safetensors"), device=obj.device)
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
    ctx.all_reduce_sum_(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()
    return flat[-1]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` (undoes DDP's 1/world averaging for the encoder)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _distributed_features(ctx, f_local: torch.Tensor, y_local: torch.Tensor, rows: tuple[int, int, int]):
    """The global batch's (f, y) on every rank, differentiable only w.r.t. this rank's rows.

    The guidance loss is a function of the whole batch (batch-mean CMAttn weights, a batch-mean
    loss), so per-rank losses averaged by DDP would be another function. Instead each rank computes
    the global loss on the assembled f; backward gives it its own rows' share of the encoder gradient,
    which the x world_size below turns, after DDP's averaging, into the sum of the shares = the
    one-process gradient. CMAttn sees detached f on every rank: its gradient is the full one on each
    rank already, and DDP's average of identical values leaves it unchanged.
    """
    start, stop, total = rows
    f_local = _ScaleGrad.apply(f_local, float(ctx.world_size))
    f = ctx.assemble_rows(f_local, start, total, "all-reduce of the step-2 image features")
    y = ctx.assemble_rows(y_local, start, total, "all-reduce of the step-2 labels")
    return f, y


class _EncoderAndAttention(torch.nn.Module):
    """The module DDP wraps: the vision encoder's forward, CMAttn's parameters in the same reducer."""

    def __init__(self, visual, attn):
        super().__init__()
        self.visual, self.attn = visual, attn

    def forward(self, x):
        return self.visual(x)


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


def _postfix(bar, loss: float, images: int, seconds: float) -> None:
    # refresh=False: the numbers show at the bar's next redraw (set_postfix would force one per step)
    if hasattr(bar, "set_postfix"):
        bar.set_postfix(loss=f"{loss:.4f}", img_per_s=f"{images / max(seconds, 1e-9):.0f}", refresh=False)
