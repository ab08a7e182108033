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
        print(f"extension guidg_fast._C: built, CUDA kernels {'compiled in' if ext['with_cuda'] else 'NOT compiled'}, "
              f"CPU loops {ext['cpu_isa']} (GUIDG_FAST_CPU_ISA caps them)")
    else:
        print(f"extension guidg_fast._C: NOT built ({ext['error']})")
    if data["forced_backend"]:
        print(f"forced backend (GUIDG_FAST_BACKEND): {data['forced_backend']}")
    print(f"{'op':<24}{'CPU backend':<42}{'CUDA backend'}")
    for name, where in data["backends"].items():
        print(f"{name:<24}{where['cpu']:<42}{where['cuda']}")
    return 0


_current_run = None  # the run folder of the command in progress (for the Ctrl-C message)


def _resolve_image_size(args) -> None:
    """--image-size defaults to the architecture's; a size the architecture cannot take fails now."""
    from .backbone import arch_image_size

    if not hasattr(args, "image_size") or not hasattr(args, "arch"):
        return
    native = arch_image_size(args.arch)
    if args.image_size is None:
        args.image_size = native or 224
    elif args.image_size < 1:
        raise SystemExit(f"--image-size must be >= 1, got {args.image_size}")
    elif native is not None and args.image_size != native:
        raise SystemExit(
            f"--image-size {args.image_size} does not fit --arch {args.arch}, whose vision tower takes {native} x "
            f"{native} images (its position embeddings are sized for it); drop --image-size or pass {native}"
        )


def _interrupted(argv: list) -> int:
    import os
    import shlex

    from .train import distributed
    from .train.guidg import STEP1_STATE, STEP2_STATE

    if not distributed.is_main_process():  # [distributed] rank 0 speaks for the run
        return 130
    print("\ninterrupted (Ctrl-C).", file=sys.stderr)
    run = _current_run
    states = [] if run is None else [os.path.join(run.path, n) for n in (STEP2_STATE, STEP1_STATE)
                                      if os.path.isfile(os.path.join(run.path, n))]
    command = argv[:1]
    if not states or command[0] not in ("train-experts", "finetune"):
        where = f" Run folder: {run.path}." if run is not None else ""
        print(f"No resumable checkpoint was written.{where}", file=sys.stderr)
        return 130
    state = states[0] if command[0] == "finetune" else states[-1]
    rest, skip = [], False
    for a in argv[1:]:  # drop an earlier --resume / --out; they are set below
        if skip:
            skip = False
            continue
        if a in ("--resume", "--out"):
            skip = True
            continue
        if a.startswith(("--resume=", "--out=")):
            continue
        rest.append(a)
    resume = shlex.join([*command, *rest, "--resume", state, "--out", run.path])
    if distributed.launched_by_torchrun():  # [distributed] the same launch again (its options are torchrun's, not ours)
        resume = f"torchrun <the same torchrun options> -m guidg_fast {resume}"
    else:
        resume = f"guidg-fast {resume}"
    print(f"last checkpoint: {state}\nresume with:\n  {resume}", file=sys.stderr)
    return 130


class _RunDir:
    """A run folder with a log file (everything printed) and a metrics JSON."""

    def __init__(self, path: str | None, command: str):
        import io
        import os

        from .train import distributed

        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.path = path or os.path.join("runs", f"{command}-{stamp}")
        # [distributed] rank 0 alone prints and writes the folder; the other ranks keep silent (a
        # default folder name from rank 0's clock is still the one written: only rank 0 makes it)
        self.writes = distributed.is_main_process()
        global _current_run
        _current_run = self
        if self.writes:
            os.makedirs(self.path, exist_ok=True)
            self._log = open(os.path.join(self.path, "log.txt"), "a")
        else:
            self._log = io.StringIO()
        self.metrics: dict = {"command": command, "started": stamp}

    def print(self, *parts) -> None:
        if not self.writes:
            return
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def record_distributed(self, model, global_batch: int | None) -> None:
        """world_size and the per-rank batch into metrics.json and the log."""
        from .train import distributed

        record = distributed.batch_record(model.dist, global_batch) if global_batch else {
            "world_size": model.dist.world_size, "backend": model.dist.backend}
        self.metrics["distributed"] = record
        self.print("distributed: " + ", ".join(f"{k} {v}" for k, v in record.items()))

    def save_metrics(self) -> str:
        import os

        from .train.checkpoint import save_json

        path = os.path.join(self.path, "metrics.json")
        if self.writes:
            save_json(path, self.metrics)
        return path


def _load_split(args, raw_step1: bool = False):
    """The data of a run (synthetic demo domains, DomainBed folders or ImageNet-DG under --data) with the official
    transforms: one un-augmented view for step 1 (exact feature cache), RandAugment for step 2.
    ``raw_step1``: step-1 images stay untransformed (the feature cache applies the augmentation)."""
    from . import data

    if data.is_imagenet_dg(args.dataset):
        split = _imagenet_dg_split(args)
    else:
        if args.data == "synthetic":
            domains = data.SyntheticDomains(
                num_classes=args.synthetic_classes, images_per_class=args.synthetic_images,
                image_size=args.image_size, seed=args.seed,
            ).datasets
        else:
            domains = data.load_domainbed(args.data, dataset=args.dataset, skip_corrupt=args.skip_corrupt)
        target = args.target or sorted(domains)[-1]
        if target not in domains:
            raise SystemExit(f"--target {target!r} is not one of the domains {sorted(domains)}")
        if args.n_shot:
            split = data.few_shot_split(domains, [target], n_shot=args.n_shot, seed=args.seed)
        else:
            split = data.multi_source_split(domains, [target], seed=args.seed)
    plain = data.clip_transform(args.image_size)
    return split.with_transforms(None if raw_step1 else plain, data.clip_transform(args.image_size, randaugment=True), plain)


def _imagenet_dg_split(args):
    """The few-shot ImageNet-DG split from the dataset folders under --data (see imagenet_dg_roots)."""
    from . import data

    if args.data == "synthetic":
        raise SystemExit("--dataset ImageNet-DG needs --data ROOT, the folder holding the ImageNet-DG datasets")
    n_shot = IMAGENET_DG_SHOTS if args.n_shot is None else args.n_shot
    if n_shot < 1:
        raise SystemExit(f"--n-shot must be >= 1 for ImageNet-DG (a few-shot protocol), got {n_shot}")
    target = args.target or data.imagenet_dg.IMAGENET_DG_TARGETS[0]
    try:
        roots = data.imagenet_dg_roots(args.data, target)
        return data.build_imagenet_dg(**roots, target=target, n_shot=n_shot, seed=args.seed,
                                      skip_corrupt=args.skip_corrupt)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"--data {args.data} --dataset ImageNet-DG --target {target}: {exc}") from exc


def _evaluation_sets(split, image_size: int, with_sources: bool) -> dict:
    """The targets' test sets and, ``with_sources``, the sources' step-2 images seen through the
    evaluation transform: the split's step-2 sets carry RandAugment, which scores must not."""
    from .data import clip_transform, with_transform

    datasets = dict(split.test)
    if with_sources:
        plain = clip_transform(image_size)
        datasets.update({d: with_transform(ds, plain) for d, ds in split.step2.items()})
    return datasets


def _new_model(args, split):
    from .train import GuiDG

    return GuiDG(
        args.arch, args.pretrained, split.classnames, split.source_domains, device=args.device, n_ctx=args.n_ctx,
        class_token_position=args.position, class_specific=args.csc, baseline=args.baseline,
        weight_mode=args.weight_mode, seed=args.seed, precision=args.precision,
    )


def _pipeline(args) -> dict:
    """The input-pipeline options every training / evaluation call takes."""
    return {"workers": args.workers, "image_cache": args.image_cache}


def _report(run, results: dict, split) -> None:
    run.print(f"{'domain':<16}{'role':<8}{'ensemble':>10}  " + "  ".join(f"{d[:10]:>10}" for d in split.source_domains))
    for name, r in results.items():
        role = "target" if name in split.target_domains else "source"
        experts = "  ".join(f"{r['experts'][d]:>10.1f}" for d in split.source_domains)
        run.print(f"{name:<16}{role:<8}{r['ensemble']:>10.1f}  {experts}")
    first = next(iter(results.values()))
    run.print("mean expert weights: " + ", ".join(f"{d}={w:.3f}" for d, w in first["weights"].items()))


def _callback(run, every: int):
    def log(stage, step, loss):
        if every and (step + 1) % every == 0:
            run._log.write(f"{stage} step {step + 1}: loss {loss:.5f}\n")
            run._log.flush()

    return log


def cmd_train_experts(args) -> int:
    import os

    from .data import clip_transform

    if args.views < 1:
        raise SystemExit(f"--views must be >= 1, got {args.views}")
    run = _RunDir(args.out, "train-experts")
    split = _load_split(args, raw_step1=args.views > 1)
    model = _new_model(args, split)
    run.print(f"step 1: {len(split.source_domains)} experts {split.source_domains}, {len(split.classnames)} classes")
    run.record_distributed(model, args.batch_size)  # [distributed] rows of each expert's batch per rank
    losses = model.fit_experts(
        split.step1, iterations=args.iterations, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        checkpoint_dir=run.path, checkpoint_every=args.checkpoint_every, resume=args.resume, progress=True,
        callback=_callback(run, args.log_every), views=args.views,
        transform=clip_transform(args.image_size, train=True) if args.views > 1 else None,
        cache_dir=args.feature_cache, workers=args.workers, compile=args.compile,
    )
    model.save(os.path.join(run.path, "model"))
    run.metrics.update({"step1_loss": losses, "model": os.path.join(run.path, "model")})
    run.print(f"saved {os.path.join(run.path, 'model')}; metrics {run.save_metrics()}")
    return 0


def cmd_finetune(args) -> int:
    import os

    from .train import GuiDG

    run = _RunDir(args.out, "finetune")
    split = _load_split(args)
    model = GuiDG.load(args.model, device=args.device, classnames=split.classnames, precision=args.precision)
    model.config.update(baseline=args.baseline, weight_mode=args.weight_mode)  # step-2 choices (see --baseline)
    run.record_distributed(model, args.batch_per_domain * len(split.step2))  # [distributed]
    losses = model.finetune(
        split.step2, iterations=args.iterations, epochs=args.epochs, batch_per_domain=args.batch_per_domain,
        lr=args.lr, checkpoint_dir=run.path, checkpoint_every=args.checkpoint_every, resume=args.resume,
        progress=True, callback=_callback(run, args.log_every), compile=args.compile, **_pipeline(args),
    )
    model.save(os.path.join(run.path, "model"))
    results = model.evaluate(split.test, **_pipeline(args))
    _report(run, results, split)
    run.metrics.update({"step2_loss": losses, "accuracy": results, "model": os.path.join(run.path, "model")})
    run.print(f"saved {os.path.join(run.path, 'model')}; metrics {run.save_metrics()}")
    return 0


def cmd_evaluate(args) -> int:
    from .train import GuiDG

    run = _RunDir(args.out, "evaluate")
    split = _load_split(args)
    model = GuiDG.load(args.model, device=args.device, classnames=split.classnames, precision=args.precision)
    run.record_distributed(model, None)  # [distributed] evaluation batches round-robin over ranks
    results = model.evaluate(_evaluation_sets(split, args.image_size, args.with_sources), **_pipeline(args))
    _report(run, results, split)
    run.metrics["accuracy"] = results
    run.print(f"metrics {run.save_metrics()}")
    return 0


def cmd_demo(args) -> int:
    """Both GuiDG steps on the synthetic domains with a tiny CLIP on the CPU, with measured speedups."""
    import os

    import torch

    from .train.speed import step1_speed, step2_speed

    run = _RunDir(args.out, "demo")
    torch.manual_seed(args.seed)
    split = _load_split(args)
    model = _new_model(args, split)
    run.print(
        f"GuiDG demo: {args.arch} (random init), synthetic domains {sorted(split.step1) + split.target_domains}, "
        f"target (held out) = {split.target_domains[0]}, {len(split.classnames)} classes: {', '.join(split.classnames)}"
    )
    t0 = time.perf_counter()
    model.fit_experts(
        split.step1, iterations=args.step1_iterations, batch_size=args.batch_size, lr=args.step1_lr, progress=True,
        callback=_callback(run, args.log_every), workers=args.workers, compile=args.compile,
    )
    run.print(f"step 1 done in {time.perf_counter() - t0:.1f} s: loss {model.history['step1'][0]:.3f} -> "
              f"{model.history['step1'][-1]:.3f}")
    t0 = time.perf_counter()
    model.finetune(
        split.step2, iterations=args.step2_iterations, batch_per_domain=args.batch_per_domain, lr=args.step2_lr,
        progress=True, callback=_callback(run, args.log_every), compile=args.compile, **_pipeline(args),
    )
    run.print(f"step 2 done in {time.perf_counter() - t0:.1f} s: loss {model.history['step2'][0]:.3f} -> "
              f"{model.history['step2'][-1]:.3f}")
    results = model.evaluate(_evaluation_sets(split, args.image_size, args.with_sources), **_pipeline(args))
    run.print(f"\ntop-1 accuracy (%), chance = {100.0 / len(split.classnames):.1f}:")
    _report(run, results, split)
    run.print("\nspeed on the same work, measured now (median of a few iterations):")
    s1 = step1_speed(model, split.step1, batch_size=args.batch_size, iterations=args.speed_iterations)
    run.print(f"  step 1 iteration: fast {s1['fast_s'] * 1e3:.1f} ms vs official structure "
              f"{s1['reference_s'] * 1e3:.1f} ms -> {s1['speedup']:.1f}x")
    s2 = step2_speed(model, split.step2, batch_per_domain=args.batch_per_domain, iterations=args.speed_iterations)
    run.print(f"  step 2 iteration: fast {s2['fast_s'] * 1e3:.1f} ms vs official structure "
              f"{s2['reference_s'] * 1e3:.1f} ms -> {s2['speedup']:.2f}x (the vision encoder dominates here)")
    model.save(os.path.join(run.path, "model"))
    run.metrics.update({
        "accuracy": results, "step1_loss": model.history["step1"], "step2_loss": model.history["step2"],
        "speed": {"step1": s1, "step2": s2}, "backends": info_dict()["backends"],
    })
    run.save_metrics()
    run.print(f"\nrun folder {run.path} (log.txt, metrics.json, model/)")
    return 0


def cmd_bench(args) -> int:
    from .bench.run import main as bench_main

    return bench_main(args.bench_args)

IMAGENET_DG_SHOTS = 16  # the official ImageNet-DG protocol: 16 images per class and half

# options that describe the model itself: in finetune / evaluate the saved model (--model DIR) fixes them
_SAVED_MODEL_OPTIONS = {"arch": "arch", "pretrained": "pretrained", "n_ctx": "n_ctx",
                        "position": "class_token_position", "csc": "class_specific"}
# step-2 choices recorded in the model: finetune may change them, evaluate has no use for them
_STEP2_OPTIONS = {"baseline": "baseline", "weight_mode": "weight_mode"}


def _saved_model_config(directory: str) -> dict:
    import os

    from .train.checkpoint import load_json

    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"--model {directory!r} is not a model folder (no config.json): pass the model/ folder "
                         "that train-experts or finetune wrote into its run folder")
    try:
        return load_json(path)
    except ValueError as exc:
        raise SystemExit(f"--model {directory!r}: {exc}") from exc


def _apply_saved_model(args) -> None:
    """finetune / evaluate: the model options come from --model; a value given that differs is an error."""
    if getattr(args, "model", None) is None:
        return
    config = _saved_model_config(args.model)
    fixed = dict(_SAVED_MODEL_OPTIONS)
    if args.command == "evaluate":
        fixed.update(_STEP2_OPTIONS)
    conflicts = []
    for option, key in fixed.items():
        given, saved = getattr(args, option), config.get(key)
        if given is not None and given != saved:
            conflicts.append(f"--{option.replace('_', '-')} {given} (the model has {saved})")
        setattr(args, option, saved)
    if conflicts:
        raise SystemExit(
            f"{args.command}: {'; '.join(conflicts)}. These options are fixed by the saved model "
            f"--model {args.model}: drop them, or train a new model with train-experts"
        )
    for option, key in _STEP2_OPTIONS.items():  # finetune: a choice not given is the recorded one
        if getattr(args, option) is None:
            setattr(args, option, config.get(key))


def _add_data_options(p) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic",
                   help="'synthetic' (generated in code), a DomainBed root folder, or with --dataset ImageNet-DG the "
                        "folder of the ImageNet-DG datasets (ImageNet/{i,s,v2,a,r} as in the official README, or "
                        "CoOp's imagenet/, imagenet-sketch/, imagenetv2/, imagenet-adversarial/, "
                        "imagenet-rendition/) (default: synthetic)")
    g.add_argument("--dataset", default=None,
                   help="DomainBed dataset under --data: PACS, VLCS, OfficeHome, TerraIncognita, DomainNet; or "
                        "ImageNet-DG (sources imagenet, imagenet_sketch, imagenet_v2; few-shot) "
                        "(default: none, --data holds the domain folders itself)")
    g.add_argument("--target", default=None,
                   help="held-out target domain; for ImageNet-DG imagenet_a, imagenet_r (200 classes each: the "
                        "sources keep those) or imagenet_val (1000), also written imagenet-r, r, val "
                        "(default: the last domain by name; ImageNet-DG: imagenet_a)")
    g.add_argument("--n-shot", type=int, default=None,
                   help="few-shot protocol: images per class per half of each source domain (default: "
                        f"{IMAGENET_DG_SHOTS} for ImageNet-DG, else 0 = the 30/70 multi-source split)")
    g.add_argument("--image-size", type=int, default=None,
                   help="image side in pixels (default: the one the architecture was built for, e.g. 224 for "
                        "ViT-B-16; finetune / evaluate: the saved model's)")
    g.add_argument("--skip-corrupt", action="store_true",
                   help="skip unreadable image files with a warning (default: an error naming the file)")
    g.add_argument("--synthetic-classes", type=int, default=7, help="classes of the synthetic data (default: 7)")
    g.add_argument("--synthetic-images", type=int, default=24,
                   help="images per class and domain of the synthetic data (default: 24)")


def _add_model_options(p, *, demo: bool = False, saved: str | None = None) -> None:
    """The model options. ``saved`` (finetune / evaluate): the model comes from --model, so the
    options it fixes are not listed; they are still accepted, and checked against the saved model,
    so that a command line written for train-experts keeps working as long as it agrees."""
    from .backbone import TINY_ARCH

    if saved is None:
        g = p.add_argument_group("model")
        g.add_argument("--arch", default=TINY_ARCH if demo else "ViT-B-16",
                       help=f"open_clip architecture (default: {TINY_ARCH if demo else 'ViT-B-16'})")
        g.add_argument("--pretrained", default=None,
                       help="local weights file or cached open_clip tag (default: none = random init)")
        g.add_argument("--n-ctx", type=int, default=4 if demo else 16,
                       help=f"learned context tokens per expert (default: {4 if demo else 16})")
        g.add_argument("--position", default="end", choices=["end", "middle", "front"],
                       help="class token position (default: end)")
        g.add_argument("--csc", action="store_true", help="class-specific contexts (default: one generic context)")
        g.add_argument("--baseline", default="clipood", choices=["clipood", "erm", "ueo"],
                       help="step-2 baseline, recorded in the model for finetune (default: clipood = margin 0.3 + BMA)")
        g.add_argument("--weight-mode", default="batch", choices=["batch", "sample"],
                       help="step-2 expert weights, recorded in the model for finetune: batch mean (official) or "
                            "per sample (paper Eq. 20) (default: batch)")
        return
    hidden = dict(default=None, help=argparse.SUPPRESS)
    step2_listed = saved == "finetune"
    fixed = "--arch, --pretrained, --n-ctx, --position, --csc" + ("" if step2_listed else ", --baseline, --weight-mode")
    g = p.add_argument_group(
        "model", f"The model is the one saved in --model DIR (its config.json): {fixed} are fixed by it. They "
                 "are accepted with the saved value only; another value is an error.")
    g.add_argument("--arch", **hidden)
    g.add_argument("--pretrained", **hidden)
    g.add_argument("--n-ctx", type=int, **hidden)
    g.add_argument("--position", choices=["end", "middle", "front"], **hidden)
    g.add_argument("--csc", action="store_true", **hidden)
    if step2_listed:
        g.add_argument("--baseline", default=None, choices=["clipood", "erm", "ueo"],
                       help="step-2 baseline: clipood = margin 0.3 + BMA, erm, ueo (default: the one recorded in "
                            "the model, i.e. given to train-experts)")
        g.add_argument("--weight-mode", default=None, choices=["batch", "sample"],
                       help="expert weights: batch mean (official) or per sample (paper Eq. 20) (default: the one "
                            "recorded in the model)")
    else:
        g.add_argument("--baseline", choices=["clipood", "erm", "ueo"], **hidden)
        g.add_argument("--weight-mode", choices=["batch", "sample"], **hidden)


def _add_common(p, *, demo: bool = False, saved: str | None = None) -> None:
    from .data.workers import default_workers

    _add_data_options(p)
    _add_model_options(p, demo=demo, saved=saved)
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    g.add_argument("--seed", type=int, default=0, help="seed of splits, init and batches (default: 0)")
    g.add_argument("--out", default=None, help="run folder (default: runs/<command>-<time>)")
    g.add_argument("--log-every", type=int, default=1, help="write the loss to log.txt every N steps (default: 1)")
    g.add_argument("--precision", default=None, choices=["bf16", "fp32"],
                   help="encoder compute precision; weights stay fp32 (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--compile", action="store_true",
                   help="training iterations under torch.compile (CUDA graphs on CUDA) (default: eager)")
    g = p.add_argument_group("input pipeline")
    g.add_argument("--workers", type=int, default=default_workers(),
                   help=f"data worker processes; 0 = in the training process (default: cores - 1, 1 to 8; "
                        f"here {default_workers()})")
    g.add_argument("--image-cache", default=None, metavar="DIR",
                   help="keep decoded, resized images as memory-mapped uint8 files in DIR, reused while files and "
                        "transform are unchanged (default: none, in memory)")
    g.add_argument("--dist-timeout", type=float, default=None, metavar="S",
                   help="under torchrun: seconds a collective may wait for the other ranks before the run stops "
                        "with an error naming the rank that died (default: $GUIDG_FAST_DIST_TIMEOUT or 600)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guidg-fast",
        description="GuiDG (domain-expert prompt guidance for CLIP) with fused kernels. "
        "Every option is listed with its default under `guidg-fast COMMAND --help`.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, extension build, and the backend each op uses on CPU and CUDA")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON (default: a table)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="both steps on synthetic domains with a tiny CLIP on the CPU, with speedups")
    _add_common(p, demo=True)
    p.add_argument("--step1-iterations", type=int, default=300, help="step-1 iterations (default: 300)")
    p.add_argument("--step2-iterations", type=int, default=800, help="step-2 iterations (default: 800)")
    p.add_argument("--batch-size", type=int, default=32, help="step-1 images per expert per step (default: 32)")
    p.add_argument("--batch-per-domain", type=int, default=12, help="step-2 images per source domain (default: 12)")
    p.add_argument("--step1-lr", type=float, default=0.2, help="step-1 SGD learning rate (default: 0.2)")
    p.add_argument("--step2-lr", type=float, default=1e-3, help="step-2 AdamW learning rate (default: 1e-3)")
    p.add_argument("--speed-iterations", type=int, default=3, help="iterations timed per mode (default: 3)")
    p.add_argument("--targets-only", dest="with_sources", action="store_false",
                   help="report only the held-out target (default: sources' step-2 images too)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train-experts", help="step 1: train one prompt expert per source domain, all in one run")
    _add_common(p)
    p.add_argument("--iterations", type=int, default=None, help="steps (default: epochs x steps per epoch)")
    p.add_argument("--epochs", type=int, default=31, help="epochs when --iterations is not given (default: 31)")
    p.add_argument("--batch-size", type=int, default=32, help="images per expert per step (default: 32)")
    p.add_argument("--lr", type=float, default=1e-4, help="SGD learning rate (default: 1e-4, official)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="save resumable state every N steps (default: 100)")
    p.add_argument("--resume", default=None, help="step1_state.safetensors (in a run folder) to continue from (default: none)")
    p.add_argument("--views", type=int, default=1,
                   help="augmented views cached per image (random crop + flip, official step-1 augmentation); "
                        "1 = one un-augmented view, exact (default: 1)")
    p.add_argument("--feature-cache", default=None, metavar="DIR",
                   help="keep the frozen image features in safetensors files in DIR, reused while weights, "
                        "images and transform are unchanged (default: none, in memory)")
    p.set_defaults(func=cmd_train_experts)

    p = sub.add_parser("finetune", help="step 2: fine-tune the vision encoder under expert guidance")
    _add_common(p, saved="finetune")
    p.add_argument("--model", required=True, help="model folder written by train-experts (required)")
    p.add_argument("--iterations", type=int, default=None, help="steps (default: epochs x 400)")
    p.add_argument("--epochs", type=int, default=10, help="epochs of 400 steps (default: 10)")
    p.add_argument("--batch-per-domain", type=int, default=12, help="images per source domain per step (default: 12)")
    p.add_argument("--lr", type=float, default=5e-6, help="AdamW learning rate (default: 5e-6, official)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="save resumable state every N steps (default: 100)")
    p.add_argument("--resume", default=None, help="step2_state.safetensors (in a run folder) to continue from (default: none)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="top-1 per target domain: ensemble, each expert, mean expert weights")
    _add_common(p, saved="evaluate")
    p.add_argument("--model", required=True, help="model folder written by train-experts or finetune (required)")
    p.add_argument("--with-sources", action="store_true",
                   help="also evaluate the sources' step-2 images, with the evaluation transform "
                        "(default: the targets only)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("bench", help="benchmarks fast vs eager reference (see `guidg-fast bench --help`)",
                       add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="options of the benchmark runner")
    p.set_defaults(func=cmd_bench)
    return parser

def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # everything after `bench` (also --help and other leading options) belongs to the bench runner
        return int(cmd_bench(argparse.Namespace(bench_args=argv[1:])) or 0)
    args = build_parser().parse_args(argv)
    global _current_run
    _current_run = None
    _apply_saved_model(args)
    _resolve_image_size(args)
    from .train import distributed

    torchrun = hasattr(args, "dist_timeout") and distributed.launched_by_torchrun()
    try:
        if torchrun:  # [distributed] one group per process, made before any work (the run folder needs the rank)
            distributed.setup(args.device, timeout_s=args.dist_timeout)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return _interrupted(argv)
    finally:
        if torchrun:
            distributed.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
