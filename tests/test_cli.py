"""The guidg-fast command in-process: ImageNet-DG end to end on a tiny folder tree, the options of
finetune / evaluate that the saved model fixes, the evaluation transform of --with-sources, help texts."""
import argparse
import contextlib
import io
import json
import re
import warnings

import pytest
import torch
from PIL import Image

from guidg_fast import cli
from guidg_fast.data import clip_transform
from guidg_fast.data.image_cache import transform_plan
from guidg_fast.train import GuiDG

TINY = ["--arch", "guidg-tiny", "--n-ctx", "2"]
FAST = ["--workers", "0"]

# four ImageNet classes; ImageNet-R gets the first three (a 200-class target in miniature)
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
NAMES = ["tench", "goldfish", "great white shark", "tiger shark"]


def _jpeg(path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (36, 44, 3), generator=g, dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.numpy()).save(path, quality=90)


def _imagenet_dg_tree(root) -> None:
    """root/ImageNet/{i/train, i/val, s, v2 (numbered folders, as ImageNetV2 ships), r} + classnames.txt,
    the layout of the official GuiDG README."""
    base = root / "ImageNet"
    seed = 0
    for c, wnid in enumerate(WNIDS):
        for k in range(4):
            seed += 1
            _jpeg(base / "i" / "train" / wnid / f"{wnid}_{k}.JPEG", seed)
            _jpeg(base / "s" / wnid / f"sketch_{k}.jpg", seed + 1000)
            _jpeg(base / "v2" / str(c) / f"v2_{k}.jpeg", seed + 2000)
        _jpeg(base / "i" / "val" / wnid / f"val_{wnid}.JPEG", seed + 3000)
        if c < 3:
            for k in range(2):
                _jpeg(base / "r" / wnid / f"art_{k}.jpg", seed + 4000 + k)
    (base / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(WNIDS, NAMES)))


def _parse(argv):
    args = cli.build_parser().parse_args(argv)
    cli._apply_saved_model(args)
    cli._resolve_image_size(args)
    return args


def test_imagenet_dg_split_from_one_root(tmp_path):
    _imagenet_dg_tree(tmp_path)
    args = _parse(["train-experts", "--data", str(tmp_path), "--dataset", "ImageNet-DG", "--target", "imagenet-r",
                   "--n-shot", "2", *TINY])
    split = cli._load_split(args)
    assert split.source_domains == ["imagenet", "imagenet_sketch", "imagenet_v2"]
    assert split.target_domains == ["imagenet_r"]
    assert split.classnames == NAMES[:3]  # only the target's classes, named from classnames.txt
    assert split.counts() == {"step1": dict.fromkeys(split.source_domains, 6),
                              "step2": dict.fromkeys(split.source_domains, 6), "test": {"imagenet_r": 6}}
    for d in split.source_domains:
        first, second = split.step1[d], split.step2[d]
        assert not set(first.indices) & set(second.indices)  # the two halves are disjoint
        assert set(first.labels) == set(second.labels) == {0, 1, 2}
    # ImageNetV2's numbered folders map to the sorted wnids: folder 0 is n01440764 (label 0)
    v2 = split.step1["imagenet_v2"].dataset
    assert all(("/v2/0/" in str(path)) == (label == 0) for path, label in v2.samples)
    # --n-shot defaults to the official 16 for ImageNet-DG (here every image a half has)
    args = _parse(["train-experts", "--data", str(tmp_path), "--dataset", "imagenet_dg", "--target", "r", *TINY])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer than 16 images per half: all of them, with a warning
        assert cli._load_split(args).info["n_shot"] == 16


def test_imagenet_dg_coop_folder_names(tmp_path):
    """CoOp's DATASETS.md layout under --data: imagenet/images/{train,val}, imagenet-sketch/images,
    imagenetv2/imagenetv2-matched-frequency-format-val, imagenet-rendition/imagenet-r."""
    _imagenet_dg_tree(tmp_path / "official")
    official, root = tmp_path / "official" / "ImageNet", tmp_path / "coop"
    (root / "imagenet").mkdir(parents=True)
    (official / "i").rename(root / "imagenet" / "images")
    (root / "imagenet-sketch").mkdir()
    (official / "s").rename(root / "imagenet-sketch" / "images")
    (root / "imagenetv2").mkdir()
    (official / "v2").rename(root / "imagenetv2" / "imagenetv2-matched-frequency-format-val")
    (root / "imagenet-rendition").mkdir()
    (official / "r").rename(root / "imagenet-rendition" / "imagenet-r")
    (official / "classnames.txt").rename(root / "imagenet" / "classnames.txt")
    args = _parse(["train-experts", "--data", str(root), "--dataset", "ImageNet-DG", "--target", "imagenet_r",
                   "--n-shot", "2", *TINY])
    split = cli._load_split(args)
    assert split.classnames == NAMES[:3] and split.counts()["step2"] == dict.fromkeys(split.source_domains, 6)
    assert split.info["roots"]["imagenet_r"] == str(root / "imagenet-rendition" / "imagenet-r")


def test_imagenet_dg_bad_input_names_the_problem(tmp_path):
    _imagenet_dg_tree(tmp_path)
    with pytest.raises(SystemExit, match="imagenet_a, imagenet_r, imagenet_val|unknown ImageNet-DG target"):
        cli._load_split(_parse(["train-experts", "--data", str(tmp_path), "--dataset", "ImageNet-DG",
                                "--target", "imagenet-x", *TINY]))
    with pytest.raises(SystemExit, match=r"lacks the folder\(s\) a/imagenet-a"):
        cli._load_split(_parse(["train-experts", "--data", str(tmp_path), "--dataset", "ImageNet-DG", *TINY]))
    with pytest.raises(SystemExit, match="--n-shot must be >= 1"):
        cli._load_split(_parse(["train-experts", "--data", str(tmp_path), "--dataset", "ImageNet-DG",
                                "--target", "r", "--n-shot", "0", *TINY]))


def test_imagenet_dg_train_finetune_evaluate(tmp_path):
    _imagenet_dg_tree(tmp_path / "data")
    data = ["--data", str(tmp_path / "data"), "--dataset", "ImageNet-DG", "--target", "imagenet-r", "--n-shot", "2"]
    assert cli.main(["train-experts", *data, *TINY, *FAST, "--iterations", "2", "--batch-size", "4",
                     "--out", str(tmp_path / "s1")]) == 0
    config = json.loads((tmp_path / "s1" / "model" / "config.json").read_text())
    assert config["classnames"] == NAMES[:3]
    assert config["domains"] == ["imagenet", "imagenet_sketch", "imagenet_v2"]
    # no model options from here on: the saved model's architecture (and its 32 x 32 images) apply
    assert cli.main(["finetune", *data, *FAST, "--model", str(tmp_path / "s1" / "model"), "--iterations", "2",
                     "--batch-per-domain", "2", "--out", str(tmp_path / "s2")]) == 0
    assert cli.main(["evaluate", *data, *FAST, "--model", str(tmp_path / "s2" / "model"), "--with-sources",
                     "--out", str(tmp_path / "ev")]) == 0
    accuracy = json.loads((tmp_path / "ev" / "metrics.json").read_text())["accuracy"]
    assert {d: r["images"] for d, r in accuracy.items()} == {
        "imagenet_r": 6, "imagenet": 6, "imagenet_sketch": 6, "imagenet_v2": 6}
    assert set(accuracy["imagenet_r"]["experts"]) == set(config["domains"])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("s1")
    assert cli.main(["train-experts", *TINY, *FAST, "--synthetic-images", "3", "--iterations", "1",
                     "--batch-size", "4", "--out", str(out)]) == 0
    return str(out / "model")


def _visible_options(command: str) -> dict:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {s: a for a in sub._actions if a.help != argparse.SUPPRESS for s in a.option_strings}


def _help(argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    return out.getvalue()


def test_finetune_and_evaluate_list_only_what_applies():
    model_options = {"--arch", "--pretrained", "--n-ctx", "--position", "--csc"}
    assert model_options | {"--baseline", "--weight-mode"} <= set(_visible_options("train-experts"))
    finetune = _visible_options("finetune")
    assert not model_options & set(finetune) and {"--baseline", "--weight-mode"} <= set(finetune)
    assert not (model_options | {"--baseline", "--weight-mode"}) & set(_visible_options("evaluate"))
    for command in ("finetune", "evaluate"):
        text = " ".join(_help([command, "--help"]).split())
        assert "--arch, --pretrained, --n-ctx, --position, --csc" in text and "are fixed by it" in text


@pytest.mark.parametrize("command, option, value", [
    ("evaluate", "--arch", "ViT-B-32"), ("finetune", "--n-ctx", "16"), ("evaluate", "--baseline", "erm"),
    ("finetune", "--csc", None),
])
def test_option_conflicting_with_the_saved_model_is_an_error(tiny_model, tmp_path, command, option, value):
    given = [option] + ([value] if value is not None else [])
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--model", tiny_model, *given, "--out", str(tmp_path / "run")])
    message = str(exc.value)
    assert f"{option} {value if value is not None else True}" in message and "fixed by the saved model" in message
    assert {"--arch": "guidg-tiny", "--n-ctx": "2", "--baseline": "clipood", "--csc": "False"}[option] in message
    assert not (tmp_path / "run").exists()  # refused before any work


def test_image_size_follows_the_saved_model(tiny_model, tmp_path):
    args = _parse(["evaluate", "--model", tiny_model])
    assert (args.arch, args.image_size, args.n_ctx) == ("guidg-tiny", 32, 2)
    with pytest.raises(SystemExit, match="--image-size 224 does not fit --arch guidg-tiny"):
        _parse(["finetune", "--model", tiny_model, "--image-size", "224"])


def test_not_a_model_folder_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="is not a model folder"):
        cli.main(["evaluate", "--model", str(tmp_path), "--out", str(tmp_path / "run")])


def test_finetune_baseline_overrides_the_recorded_one(tiny_model, tmp_path):
    assert json.loads(open(f"{tiny_model}/config.json").read())["baseline"] == "clipood"
    # agreeing model options are accepted (command lines written for train-experts keep working)
    assert cli.main(["finetune", "--model", tiny_model, *TINY, *FAST, "--synthetic-images", "3", "--baseline", "erm",
                     "--iterations", "1", "--batch-per-domain", "2", "--out", str(tmp_path / "s2")]) == 0
    config = json.loads((tmp_path / "s2" / "model" / "config.json").read_text())
    assert config["baseline"] == "erm" and config["weight_mode"] == "batch"


def test_evaluate_with_sources_uses_the_evaluation_transform(tiny_model, tmp_path, monkeypatch):
    seen = {}
    evaluate = GuiDG.evaluate

    def spy(self, datasets, *a, **k):
        seen.update(datasets)
        return evaluate(self, datasets, *a, **k)

    monkeypatch.setattr(GuiDG, "evaluate", spy)
    assert cli.main(["evaluate", "--model", tiny_model, *FAST, "--synthetic-images", "3", "--with-sources",
                     "--out", str(tmp_path / "ev")]) == 0
    sources = [d for d in seen if d != "sketch"]  # the synthetic target is the last domain by name
    assert sorted(sources) == ["cartoon", "painting", "photo"]
    plain = clip_transform(32)
    for d in sources:
        ds = seen[d]
        assert transform_plan(ds.transform).randaugment is None, d  # no RandAugment: the step-2 sets have it
        image, _ = ds.load(0)
        assert torch.equal(ds[0][0], plain(image)) and torch.equal(ds[0][0], ds[0][0])
    accuracy = json.loads((tmp_path / "ev" / "metrics.json").read_text())["accuracy"]
    assert set(accuracy) == set(seen)


def test_every_option_documents_its_default():
    for command in ("demo", "train-experts", "finetune", "evaluate", "info"):
        for option, action in _visible_options(command).items():
            if isinstance(action, argparse._HelpAction):
                continue
            assert "default" in action.help or "required" in action.help, (command, option)


def test_bench_help_names_its_commands_and_defaults():
    text = _help(["bench", "--help"])
    flat = " ".join(text.split())
    assert "guidg-fast bench" in flat and "python -m guidg_fast.bench" in flat and "python -m bench" not in flat
    # an option's entry runs from its line ("  --name ...") to the next option's
    entries = re.split(r"\n(?=  -)", text.split("options:", 1)[1])
    names = {e.split()[0].rstrip(",") for e in entries if e.strip()}
    assert names >= {"-h", "--quick", "--only", "--device", "--out", "--no-memory", "--max-parity-err"}
    for entry in entries:
        if entry.strip() and not entry.strip().startswith("-h"):
            assert "default" in entry, entry
