"""ImageNet-DG (GuiDG's few-shot DG benchmark) from plain folders, aligned by WordNet id.

Sources: ImageNet train, ImageNet-Sketch, ImageNet-V2; one target: ImageNet-A (200 classes),
ImageNet-R (200 classes) or ImageNet val (1000 classes). For a 200-class target only the source
images of its 200 WordNet ids are used. Expected folders (as in the official README):

    imagenet_root/train/<wnid>/*.JPEG, imagenet_root/val/<wnid>/*.JPEG   (or imagenet_root/<wnid>/)
    sketch_root/<wnid>/                  (also sketch_root/images/<wnid>/, the CoOp layout)
    v2_root/<wnid>/ or v2_root/<0..999>/ (ImageNetV2's own layout: folder i = i-th sorted wnid)
    a_root/<wnid>/, r_root/<wnid>/        (one level of nesting such as imagenet-r/imagenet-r/ is found)

Class names come from a ``classnames.txt`` ("<wnid> <name>" per line, the CoOp file) in the
target root, the ImageNet root, its train folder or its parent, else the wnids are used.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Callable

from .folders import DomainFolder, _preview, _visible_dirs
from .splits import DGSplit, few_shot_split

__all__ = [
    "IMAGENET_DG_FULL",
    "IMAGENET_DG_SOURCES",
    "IMAGENET_DG_TARGETS",
    "build_imagenet_dg",
    "imagenet_dg_roots",
    "is_imagenet_dg",
    "read_classnames",
]

IMAGENET_DG_SOURCES = ("imagenet", "imagenet_sketch", "imagenet_v2")
IMAGENET_DG_TARGETS = ("imagenet_a", "imagenet_r", "imagenet_val")
_TARGET_ALIASES = {
    "a": "imagenet_a", "imageneta": "imagenet_a",
    "r": "imagenet_r", "imagenetr": "imagenet_r",
    "val": "imagenet_val", "ival": "imagenet_val", "imagenetval": "imagenet_val", "imagenet": "imagenet_val",
}

# (classes, images) of the full public datasets (ImageNet-1k train/val, ImageNet-Sketch, ImageNetV2
# matched-frequency, ImageNet-A, ImageNet-R); used to check a full copy when one is present.
IMAGENET_DG_FULL = {
    "imagenet": (1000, 1_281_167),
    "imagenet_val": (1000, 50_000),
    "imagenet_sketch": (1000, 50_889),
    "imagenet_v2": (1000, 10_000),
    "imagenet_a": (200, 7_500),
    "imagenet_r": (200, 30_000),
}

_WNID = re.compile(r"n\d{8}")


def _is_wnid_root(path: Path) -> bool:
    return any(_WNID.fullmatch(d) for d in _visible_dirs(path))


def _is_index_root(path: Path) -> bool:
    dirs = _visible_dirs(path)
    return bool(dirs) and all(d.isdigit() for d in dirs)


def _class_root(path, argument: str, allow_index: bool = False) -> Path:
    """The folder that holds the class folders of one domain (descending one level if needed)."""
    if path is None:
        raise ValueError(f"{argument} is required")
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{argument}={str(path)!r} does not exist or is not a directory")
    ok = lambda p: _is_wnid_root(p) or (allow_index and _is_index_root(p))  # noqa: E731
    if ok(path):
        return path
    below = [path / d for d in _visible_dirs(path) if ok(path / d)]
    if len(below) == 1:
        return below[0]
    raise FileNotFoundError(
        f"{argument}={str(path)!r} holds no WordNet-id class folders (n########)"
        + (" or numbered class folders (0..999)" if allow_index else "")
        + f"; its folders: {_preview(_visible_dirs(path))}"
    )


def read_classnames(path) -> dict[str, str]:
    """``{wnid: name}`` from a file of "<wnid> <name>" lines (CoOp's classnames.txt)."""
    names = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            parts = line.strip().split(maxsplit=1)
            if len(parts) == 2 and _WNID.fullmatch(parts[0]):
                names[parts[0]] = parts[1].strip()
    return names


def _normalise_target(target: str) -> str:
    key = str(target).lower().replace("-", "").replace("_", "").replace("/", "").replace(" ", "")
    if key in {t.replace("_", "") for t in IMAGENET_DG_TARGETS}:
        return {t.replace("_", ""): t for t in IMAGENET_DG_TARGETS}[key]
    if key in _TARGET_ALIASES:
        return _TARGET_ALIASES[key]
    raise ValueError(f"unknown ImageNet-DG target {target!r}; choose one of {list(IMAGENET_DG_TARGETS)}")


# folder names of each dataset under one ImageNet-DG root: the official GuiDG layout (a, i, r, s, v2
# under DomainBed's data/ImageNet/) first, then the CoOp DATASETS.md names
_ROOT_FOLDERS = {
    "imagenet_root": ("i", "imagenet"),
    "sketch_root": ("s", "imagenet-sketch", "imagenet_sketch", "sketch"),
    "v2_root": ("v2", "imagenetv2", "imagenet-v2", "imagenet_v2"),
    "a_root": ("a", "imagenet-a", "imagenet_a", "imagenet-adversarial"),
    "r_root": ("r", "imagenet-r", "imagenet_r", "imagenet-rendition"),
}


def is_imagenet_dg(dataset) -> bool:
    """Whether a dataset name (e.g. a ``--dataset`` value) means ImageNet-DG."""
    return isinstance(dataset, str) and dataset.lower().replace("-", "").replace("_", "") == "imagenetdg"


def imagenet_dg_roots(root, target: str = "imagenet_a") -> dict:
    """The folders of the ImageNet-DG datasets under one root, as ``build_imagenet_dg`` keywords.

    ``root`` (or its ``ImageNet/`` folder, the official layout inside DomainBed's data folder)
    holds one folder per dataset, named as in the official README or in CoOp's DATASETS.md
    (case-insensitive):

        i/ or imagenet/                     ImageNet, with train/ and val/ (CoOp: imagenet/images/train/)
        s/ or imagenet-sketch/              ImageNet-Sketch
        v2/ or imagenetv2/                  ImageNet-V2
        a/ or imagenet-a/ or imagenet-adversarial/   ImageNet-A (needed for that target only)
        r/ or imagenet-r/ or imagenet-rendition/     ImageNet-R (needed for that target only)
    """
    target = _normalise_target(target)
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"ImageNet-DG root {str(base)!r} does not exist or is not a directory")
    for name in _visible_dirs(base):
        if name.lower() == "imagenet" and not (base / name / "train").is_dir() and not (base / name / "images").is_dir():
            base = base / name  # root/ImageNet/{a,i,r,s,v2}: DomainBed's data folder was given
            break
    present = {d.lower(): base / d for d in _visible_dirs(base)}
    needed = ["imagenet_root", "sketch_root", "v2_root"]
    if target != "imagenet_val":
        needed.append("a_root" if target == "imagenet_a" else "r_root")
    roots, missing = {}, []
    for argument in needed:
        found = next((present[n] for n in _ROOT_FOLDERS[argument] if n in present), None)
        if found is None:
            missing.append("/".join(_ROOT_FOLDERS[argument][:3]))
        roots[argument] = found
    if missing:
        raise FileNotFoundError(
            f"ImageNet-DG root {str(base)!r} (target {target}) lacks the folder(s) {', '.join(missing)}; "
            f"its folders: {_preview(_visible_dirs(base))}"
        )
    imagenet = roots["imagenet_root"]
    if not (imagenet / "train").is_dir() and (imagenet / "images" / "train").is_dir():
        roots["imagenet_root"] = imagenet / "images"  # CoOp: imagenet/images/{train,val}
    return roots


def build_imagenet_dg(
    imagenet_root,
    sketch_root,
    v2_root,
    a_root=None,
    r_root=None,
    target: str = "imagenet_a",
    n_shot: int = 16,
    seed: int = 0,
    transform: Callable | None = None,
    classnames_file=None,
    skip_corrupt: bool = False,
) -> DGSplit:
    """ImageNet-DG few-shot split: sources ImageNet (train), ImageNet-Sketch, ImageNet-V2; the
    target (ImageNet-A / -R / val) is the test set. Per source domain a seeded, per-class 50/50
    split, then ``n_shot`` images per class from each half (step 1 / step 2); see few_shot_split.

    With full datasets the step sets hold n_shot*C images for ImageNet and ImageNet-Sketch and
    min(n_shot, 5)*C for ImageNet-V2 (10 images per class, 5 per half); the test set holds 7,500
    (A), 30,000 (R) or 50,000 (val) images; with the val target the sources are loaded whole and
    compared with their full sizes too. ``split.info["count_check"]`` records these checks
    (``{name: {"found", "expected", "ok"}}``) and a mismatch warns.
    """
    target = _normalise_target(target)
    imagenet_root = Path(imagenet_root)
    if not imagenet_root.is_dir():
        raise FileNotFoundError(f"imagenet_root={str(imagenet_root)!r} does not exist or is not a directory")
    if (imagenet_root / "train").is_dir():
        train_root = _class_root(imagenet_root / "train", "imagenet_root/train")
        val_dir = imagenet_root / "val"
    else:
        train_root = _class_root(imagenet_root, "imagenet_root")
        val_dir = None
    sketch = _class_root(sketch_root, "sketch_root")
    v2 = _class_root(v2_root, "v2_root", allow_index=True)

    train_wnids = sorted(d for d in _visible_dirs(train_root) if _WNID.fullmatch(d))
    if target == "imagenet_val":
        if val_dir is None or not val_dir.is_dir():
            raise FileNotFoundError(
                f"target 'imagenet_val' needs {str(imagenet_root / 'val')!r} with one folder per WordNet id "
                f"(imagenet_root must then hold train/ and val/)"
            )
        if not _is_wnid_root(val_dir):
            raise FileNotFoundError(
                f"{str(val_dir)!r} has no WordNet-id class folders; sort the validation images into val/<wnid>/ "
                f"(a flat val folder with a label file is not supported)"
            )
        target_root = val_dir
        wnids = list(train_wnids)
    else:
        argument = "a_root" if target == "imagenet_a" else "r_root"
        root = a_root if target == "imagenet_a" else r_root
        if root is None:
            raise ValueError(f"target {target!r} needs {argument}")
        target_root = _class_root(root, argument)
        wnids = sorted(d for d in _visible_dirs(target_root) if _WNID.fullmatch(d))
        unknown = [w for w in wnids if w not in set(train_wnids)]
        if unknown:
            raise ValueError(
                f"{argument}={str(target_root)!r} has class folders that ImageNet train lacks: {_preview(unknown)}"
            )

    # class names: explicit file, else the first classnames.txt found near the data
    names: dict[str, str] = {}
    given_target = None if target == "imagenet_val" else Path(a_root if target == "imagenet_a" else r_root)
    near = [target_root, given_target, imagenet_root, train_root, imagenet_root.parent]
    candidates = [classnames_file] if classnames_file is not None else [p / "classnames.txt" for p in near if p is not None]
    source_file = None
    for candidate in candidates:
        if candidate is not None and Path(candidate).is_file():
            names, source_file = read_classnames(candidate), str(candidate)
            break
    if classnames_file is not None and source_file is None:
        raise FileNotFoundError(f"classnames_file={str(classnames_file)!r} does not exist")
    unnamed = [w for w in wnids if w not in names]
    if source_file is not None and unnamed:
        warnings.warn(f"{source_file} names no class for {len(unnamed)} wnid(s) ({_preview(unnamed, 5)}); using the wnid", stacklevel=2)
    classnames = [names.get(w, w) for w in wnids]

    # ImageNetV2 ships numbered folders: folder i is the i-th class in sorted-wnid order
    if _is_wnid_root(v2):
        v2_folders = list(wnids)
    else:
        n_v2 = len(_visible_dirs(v2))
        if n_v2 != len(train_wnids):
            raise ValueError(
                f"v2_root={str(v2)!r} uses numbered class folders ({n_v2}) that map to the sorted ImageNet wnids, "
                f"but ImageNet train has {len(train_wnids)} class folders; the mapping needs all of them"
            )
        index = {w: i for i, w in enumerate(train_wnids)}
        v2_folders = [str(index[w]) for w in wnids]

    common = dict(transform=transform, skip_corrupt=skip_corrupt, classnames=classnames)
    domains = {
        "imagenet": DomainFolder(train_root, "imagenet", class_folders=wnids, **common),
        "imagenet_sketch": DomainFolder(sketch, "imagenet_sketch", class_folders=wnids, **common),
        "imagenet_v2": DomainFolder(v2, "imagenet_v2", class_folders=v2_folders, **common),
        target: DomainFolder(target_root, target, class_folders=wnids, **common),
    }
    for d in domains.values():
        d.wnids = list(wnids)

    with warnings.catch_warnings():
        # ImageNet-V2 has 10 images per class: fewer than n_shot per half is expected there
        warnings.filterwarnings("ignore", message="few_shot_split: domain 'imagenet_v2'")
        split = few_shot_split(domains, [target], n_shot=n_shot, seed=seed)
    split.info.update(
        benchmark="ImageNet-DG", target=target, wnids=list(wnids), classnames_file=source_file,
        roots={d: str(ds.root) for d, ds in domains.items()},
        count_check=_count_check(domains, target, wnids, split, n_shot, train_root, sketch, v2),
    )
    return split


def _count_check(domains, target, wnids, split, n_shot, train_root, sketch, v2) -> dict:
    """Compare with the full public datasets where the folders look complete; warn on a mismatch."""
    check = {}
    full_classes = {
        "imagenet": len(_visible_dirs(train_root)),
        "imagenet_sketch": len(_visible_dirs(sketch)),
        "imagenet_v2": len(_visible_dirs(v2)),
        target: len(wnids),
    }
    for name, ds in domains.items():
        classes, images = IMAGENET_DG_FULL[name]
        complete = full_classes[name] == classes
        # a 200-class target loads only 200 classes of the sources: their totals are not comparable
        loaded_all = len(wnids) == classes or name == target
        if complete and loaded_all:
            check[name] = {"found": len(ds), "expected": images, "ok": len(ds) == images}
            if len(ds) != images:
                warnings.warn(
                    f"ImageNet-DG: {name} has {len(ds):,} images in {classes} classes; the full dataset has {images:,}",
                    stacklevel=3,
                )
    if all(full_classes[n] == IMAGENET_DG_FULL[n][0] for n in full_classes):
        # n_shot per class and half, or all a half holds: ImageNet-V2 has 10 images per class (5 per half)
        C = len(wnids)
        expected = {}
        for name in ("imagenet", "imagenet_sketch", "imagenet_v2"):
            classes, images = IMAGENET_DG_FULL[name]
            expected[name] = min(n_shot, (images // classes) // 2) * C
        for part in ("step1", "step2"):
            for name, n in expected.items():
                found = len(getattr(split, part)[name])
                check[f"{part}/{name}"] = {"found": found, "expected": n, "ok": found == n}
                if found != n:
                    warnings.warn(f"ImageNet-DG: {part} of {name} has {found} images, expected {n}", stacklevel=3)
    return check
