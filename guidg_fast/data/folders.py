"""Image-folder datasets in the DomainBed layout: ``root/<domain>/<class>/<image>``.

No DomainBed or Dassl import: a domain is one folder of class sub-folders, read with PIL.
"""
from __future__ import annotations

import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Sequence

from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "DOMAINBED_DATASETS",
    "IMAGE_EXTENSIONS",
    "CorruptImageError",
    "DomainFolder",
    "ImageTooLargeError",
    "MAX_IMAGE_PIXELS",
    "load_domainbed",
    "resolve_dataset",
]

# name -> folder under the data root, domains (DomainBed order), classes and images of the full data
DOMAINBED_DATASETS: dict[str, dict] = {
    "PACS": {
        "folder": "PACS",
        "domains": ["art_painting", "cartoon", "photo", "sketch"],
        "num_classes": 7,
        "images": 9_991,
    },
    "VLCS": {
        "folder": "VLCS",
        "domains": ["Caltech101", "LabelMe", "SUN09", "VOC2007"],
        "num_classes": 5,
        "images": 10_729,
    },
    "OfficeHome": {
        "folder": "office_home",
        "domains": ["Art", "Clipart", "Product", "Real World"],
        "num_classes": 65,
        "images": 15_588,
    },
    "TerraIncognita": {
        "folder": "terra_incognita",
        "domains": ["location_100", "location_38", "location_43", "location_46"],
        "num_classes": 10,
        "images": 24_788,
    },
    "DomainNet": {
        "folder": "domain_net",
        "domains": ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"],
        "num_classes": 345,
        "images": 586_575,
    },
}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


class CorruptImageError(OSError):
    """An image file that PIL cannot decode; the message names the file."""


class ImageTooLargeError(CorruptImageError):
    """An image whose header declares more than MAX_IMAGE_PIXELS pixels (a decompression bomb?)."""


# Images above this many pixels are refused before decoding: a small compressed file can declare a
# huge canvas (a 33 KB PNG of 11000 x 11000 decodes to ~460 MB). PIL's own default only warns
# below twice its limit; this makes it an error (or a skip under skip_corrupt). Raise it here for
# genuinely huge images.
MAX_IMAGE_PIXELS = 89_478_485


def _norm(name: str) -> str:
    return name.lower().replace("_", "").replace(" ", "").replace("-", "")


def resolve_dataset(dataset: str) -> tuple[str, dict]:
    """Look a DomainBed dataset up by its name or folder ('PACS', 'office_home', 'OfficeHome', ...)."""
    if not isinstance(dataset, str):
        raise ValueError(f"dataset must be a str naming one of {sorted(DOMAINBED_DATASETS)}, got {type(dataset).__name__}")
    key = _norm(dataset)
    for name, info in DOMAINBED_DATASETS.items():
        if key in (_norm(name), _norm(info["folder"])):
            return name, info
    raise ValueError(
        f"unknown dataset {dataset!r}; known DomainBed datasets: "
        + ", ".join(f"{n} (folder {i['folder']})" for n, i in DOMAINBED_DATASETS.items())
    )


def _visible_dirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: Path, skipped: list | None = None) -> list[str]:
    """All image files below ``folder`` (recursively, following links), in a deterministic order.

    A folder reached twice through links (a loop, or a link back to an ancestor) is read once,
    so links can neither hang the walk nor multiply samples. Entries with an image name that are
    not regular files (FIFOs, sockets, devices, broken links) would block or fail on open: they
    are left out and reported in ``skipped`` as (path, reason).
    """
    found = []
    visited = set()
    pending = [str(folder)]
    while pending:
        dirpath = pending.pop()
        try:
            real = os.path.realpath(dirpath)
            info = os.stat(real)
        except OSError:
            continue
        key = (info.st_dev, info.st_ino)
        if key in visited:
            continue
        visited.add(key)
        try:
            entries = sorted(os.scandir(dirpath), key=lambda e: e.name)
        except OSError as exc:
            if skipped is not None:
                skipped.append((dirpath, f"unreadable folder: {exc}"))
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append(entry.path)
                continue
            if not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            try:
                mode = os.stat(entry.path).st_mode
            except OSError as exc:
                if skipped is not None:
                    skipped.append((entry.path, f"cannot stat ({exc.strerror or exc}): a broken link?"))
                continue
            if not stat.S_ISREG(mode):
                if skipped is not None:
                    skipped.append((entry.path, "not a regular file (FIFO, socket or device)"))
                continue
            found.append(entry.path)
        pending.extend(reversed(subdirs))  # depth-first in name order, like os.walk
    return found


def _check_pixels(img: Image.Image, path: str) -> None:
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(
            f"image file {path!r} declares {w} x {h} = {w * h:,} pixels, above the limit of {MAX_IMAGE_PIXELS:,} "
            "(guidg_fast.data.folders.MAX_IMAGE_PIXELS; a decompression bomb?)"
        )


def _open_rgb(path: str) -> Image.Image:
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block open() forever
        raise CorruptImageError(f"image file {path!r} is not a regular file (FIFO, socket or device)")
    with Image.open(path) as img:
        _check_pixels(img, path)
        img.load()
        return img.convert("RGB")


def _image_problem(path: str) -> str | None:
    """Full check of one image file (header, checksums, whole decode); the problem, or None."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "not a regular file (FIFO, socket or device)"
        with Image.open(path) as img:
            _check_pixels(img, path)
            img.verify()  # PNG chunk CRCs, structure
        with Image.open(path) as img:
            # JPEG: decode at reduced scale; still walks the whole entropy-coded stream, so
            # truncation is caught at a fraction of the cost of a full-size decode
            img.draft("RGB", (64, 64))
            img.load()
        return None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return f"{type(exc).__name__}: {exc}"


class DomainFolder(Dataset):
    """One domain: ``root/<class>/<image>``; labels follow the sorted class-folder names.

    Returns ``(image, label)`` where image is a PIL RGB image, or ``transform(image)``.

    Unreadable images: by default files are only opened in ``__getitem__``, and a file PIL
    cannot decode raises :class:`CorruptImageError` naming it. With ``skip_corrupt=True`` every
    file is decoded once at construction (threaded; JPEGs at reduced scale) and unreadable ones
    are dropped with a warning, so ``len()`` is final; should a file still fail later (e.g. it
    changed on disk), it is replaced, with a warning, by the next readable image of the same
    class so indices and length stay consistent.

    ``class_folders`` selects (and orders) the class sub-folders to read instead of all of them;
    ``classnames`` gives display names per label (default: the folder names).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        domain: str | None = None,
        transform: Callable | None = None,
        skip_corrupt: bool = False,
        class_folders: Sequence[str] | None = None,
        classnames: Sequence[str] | None = None,
        num_workers: int | None = None,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"domain folder {str(self.root)!r} does not exist or is not a directory")
        self.domain = domain if domain is not None else self.root.name
        self.transform = transform
        self.skip_corrupt = bool(skip_corrupt)
        if class_folders is None:
            class_folders = _visible_dirs(self.root)
        else:
            class_folders = [str(c) for c in class_folders]
            missing = [c for c in class_folders if not (self.root / c).is_dir()]
            if missing:
                raise FileNotFoundError(
                    f"domain {self.domain!r} ({str(self.root)!r}) has no folder for {len(missing)} requested "
                    f"class(es): {_preview(missing)}"
                )
            if len(set(class_folders)) != len(class_folders):
                raise ValueError(f"class_folders for domain {self.domain!r} has duplicates")
        if not class_folders:
            raise ValueError(
                f"domain {self.domain!r} ({str(self.root)!r}) has no class folders; expected "
                f"{str(self.root)}/<class>/<image>"
            )
        self.class_folders = list(class_folders)
        if classnames is None:
            self.classnames = list(self.class_folders)
        else:
            if len(classnames) != len(self.class_folders):
                raise ValueError(
                    f"classnames has {len(classnames)} entries but domain {self.domain!r} has "
                    f"{len(self.class_folders)} class folders"
                )
            self.classnames = [str(c) for c in classnames]

        samples, empty, special = [], [], []
        for label, folder in enumerate(self.class_folders):
            files = _image_files(self.root / folder, special)
            if not files:
                empty.append(folder)
            samples.extend((path, label) for path in files)
        if not samples:
            raise ValueError(
                f"domain {self.domain!r} has no images: no {'/'.join(IMAGE_EXTENSIONS)} files under "
                f"{str(self.root)!r} in its {len(self.class_folders)} class folder(s)"
            )
        if empty:
            warnings.warn(
                f"domain {self.domain!r}: {len(empty)} class folder(s) contain no images: {_preview(empty)}",
                stacklevel=2,
            )
        if special:
            warnings.warn(
                f"domain {self.domain!r}: left out {len(special)} entr{'y' if len(special) == 1 else 'ies'} that are "
                "not readable image files: " + "; ".join(f"{p} ({why})" for p, why in special[:5])
                + (" ..." if len(special) > 5 else ""),
                stacklevel=2,
            )
        self.skipped: list[tuple[str, str]] = list(special)  # (path, reason) of images dropped or replaced
        if self.skip_corrupt:
            samples = self._drop_unreadable(samples, num_workers)
        self.samples: list[tuple[str, int]] = samples

    def _drop_unreadable(self, samples, num_workers):
        workers = num_workers or min(8, (os.cpu_count() or 1) * 2)
        paths = [p for p, _ in samples]
        if workers > 1 and len(paths) > 16:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                problems = list(pool.map(_image_problem, paths, chunksize=64))
        else:
            problems = [_image_problem(p) for p in paths]
        kept = []
        for (path, label), problem in zip(samples, problems):
            if problem is None:
                kept.append((path, label))
            else:
                self.skipped.append((path, problem))
        if self.skipped:
            warnings.warn(
                f"domain {self.domain!r}: skipped {len(self.skipped)} unreadable image file(s) "
                f"(skip_corrupt=True): "
                + "; ".join(f"{p} ({why})" for p, why in self.skipped[:5])
                + (" ..." if len(self.skipped) > 5 else ""),
                stacklevel=3,
            )
        if not kept:
            raise ValueError(f"domain {self.domain!r} ({str(self.root)!r}): none of its images can be read")
        return kept

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    @property
    def targets(self) -> list[int]:  # torchvision ImageFolder name
        return self.labels

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, int]:
        """The untransformed PIL image and label at ``index``."""
        path, label = self.samples[index]
        try:
            return _open_rgb(path), label
        except Exception as exc:
            if not self.skip_corrupt:
                raise CorruptImageError(
                    f"cannot read image file {path!r} (domain {self.domain!r}, class "
                    f"{self.class_folders[label]!r}): {type(exc).__name__}: {exc}. Remove or replace the "
                    f"file, or pass skip_corrupt=True to skip unreadable images"
                ) from exc
            return self._replacement(index, f"{type(exc).__name__}: {exc}")

    def _replacement(self, index: int, reason: str):
        path, label = self.samples[index]
        warnings.warn(
            f"domain {self.domain!r}: image file {path!r} became unreadable after the check at construction "
            f"({reason}); using the next readable image of class {self.class_folders[label]!r} instead",
            stacklevel=3,
        )
        self.skipped.append((path, reason))
        n = len(self.samples)
        for step in range(1, n):
            other_path, other_label = self.samples[(index + step) % n]
            if other_label != label:
                continue
            try:
                return _open_rgb(other_path), label
            except Exception:
                continue
        raise CorruptImageError(
            f"domain {self.domain!r}: image file {path!r} is unreadable ({reason}) and no other image of "
            f"class {self.class_folders[label]!r} can be read"
        )

    def __getitem__(self, index: int):
        image, label = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def __repr__(self) -> str:
        return (
            f"DomainFolder(domain={self.domain!r}, root={str(self.root)!r}, images={len(self)}, "
            f"classes={len(self.classnames)})"
        )


def _preview(items: Sequence, limit: int = 10) -> str:
    items = list(items)
    text = ", ".join(repr(i) for i in items[:limit])
    return text + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _find_domain_folder(base: Path, domain: str, known_domains: Iterable[str] | None) -> Path:
    path = base / domain
    if path.is_dir():
        return path
    if known_domains is not None:
        # OfficeHome ships both as "Real World" (DomainBed) and "Real_World" (Dassl/CoOp copies)
        for entry in _visible_dirs(base):
            if _norm(entry) == _norm(domain):
                return base / entry
    raise FileNotFoundError(
        f"domain folder {str(path)!r} does not exist; folders in {str(base)!r}: {_preview(_visible_dirs(base))}"
    )


def load_domainbed(
    root: str | os.PathLike,
    dataset: str | None = None,
    domains: Sequence[str] | None = None,
    transform: Callable | None = None,
    skip_corrupt: bool = False,
) -> dict[str, DomainFolder]:
    """Load the domains of a DomainBed-layout dataset as ``{domain: DomainFolder}``.

    With ``dataset`` (a name such as 'PACS' or its folder, e.g. 'office_home') the layout is
    ``root/<folder>/<domain>/<class>/<image>`` (``root`` may also be the dataset folder itself)
    and ``domains`` defaults to the dataset's domains. Without it the layout is
    ``root/<domain>/<class>/<image>`` and ``domains`` defaults to every sub-folder of root.
    Every domain must hold the same class folders (labels are indices into the sorted list).
    """
    if isinstance(domains, (str, bytes)):
        raise ValueError(f"domains must be a list of domain names, got the string {domains!r} (use [{domains!r}])")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {str(root)!r} does not exist or is not a directory")
    info = None
    if dataset is not None:
        name, info = resolve_dataset(dataset)
        base = root / info["folder"]
        if not base.is_dir():
            if _norm(root.name) in (_norm(name), _norm(info["folder"])) or any(
                _norm(d) in {_norm(x) for x in info["domains"]} for d in _visible_dirs(root)
            ):
                base = root  # root already is the dataset folder
            else:
                raise FileNotFoundError(
                    f"dataset folder {str(base)!r} for {name} does not exist (expected "
                    f"{str(root)}/{info['folder']}/<domain>/<class>/<image>)"
                )
        known = info["domains"]
        if domains is None:
            domains = list(known)
        else:
            unknown = [d for d in domains if _norm(d) not in {_norm(k) for k in known}]
            if unknown:
                raise ValueError(f"unknown domain(s) {_preview(unknown)} for {name}; its domains are {known}")
    else:
        base = root
        known = None
        if domains is None:
            domains = _visible_dirs(root)
            if not domains:
                raise ValueError(f"data root {str(root)!r} has no domain folders (expected root/<domain>/<class>/<image>)")
    domains = [str(d) for d in domains]
    if not domains:
        raise ValueError("domains is empty; name at least one domain")
    if len(set(domains)) != len(domains):
        raise ValueError(f"domains has duplicates: {domains}")

    result: dict[str, DomainFolder] = {}
    for domain in domains:
        folder = _find_domain_folder(base, domain, known)
        result[domain] = DomainFolder(folder, domain=domain, transform=transform, skip_corrupt=skip_corrupt)

    check_same_classes(result)
    if info is not None:
        first = next(iter(result.values()))
        if len(first.classnames) != info["num_classes"]:
            warnings.warn(
                f"{name}: found {len(first.classnames)} classes, the full dataset has {info['num_classes']} "
                f"(incomplete copy?)",
                stacklevel=2,
            )
        if len(result) == len(info["domains"]) and not skip_corrupt:
            total = sum(len(d) for d in result.values())
            if total != info["images"]:
                warnings.warn(
                    f"{name}: found {total:,} images in {len(result)} domains, the full dataset has "
                    f"{info['images']:,}",
                    stacklevel=2,
                )
    return result


def check_same_classes(domains: dict[str, Dataset]) -> list[str]:
    """The common class list of ``domains``; ValueError naming the domain whose classes differ."""
    reference_domain, reference = None, None
    for domain, ds in domains.items():
        names = getattr(ds, "classnames", None)
        if names is None:
            raise ValueError(f"dataset of domain {domain!r} has no .classnames attribute")
        names = list(names)
        if reference is None:
            reference_domain, reference = domain, names
            continue
        if names != reference:
            missing = [c for c in reference if c not in names]
            extra = [c for c in names if c not in reference]
            detail = []
            if missing:
                detail.append(f"lacks {_preview(missing)}")
            if extra:
                detail.append(f"has extra {_preview(extra)}")
            if not detail:
                detail.append("has the same classes in a different order")
            raise ValueError(
                f"class lists differ between domains: domain {domain!r} " + " and ".join(detail)
                + f" compared with domain {reference_domain!r}"
            )
    return list(reference or [])
