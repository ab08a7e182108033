"""Synthetic multi-domain data generated in code: shapes in per-domain styles, for tests and demos.

The class (a shape or pattern) is the only thing shared across domains; each domain draws it in its
own style (palette, filled / outlined, background, texture, noise), so a model that learns the
shapes on some domains can recognise them on a held-out one, while pixel statistics shift.
"""
from __future__ import annotations

import math
import os
import zlib
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .transforms import CLIP_MEAN, CLIP_STD

__all__ = ["SHAPE_CLASSES", "SYNTHETIC_STYLES", "SyntheticDomainDataset", "SyntheticDomains"]

SHAPE_CLASSES = (
    "circle", "square", "triangle", "cross", "ring", "stripes",
    "dots", "star", "diamond", "crescent", "arrow", "checkerboard",
)

# Named domain styles; any other domain name gets a style drawn from a generator seeded by its name.
#   mode: "filled" | "outline" | "outlined_fill";  palette: how fill colours are drawn
#   background: "gradient" | "paper" | "blotches" | "flat";  texture: amplitude of blotchy fill texture
SYNTHETIC_STYLES = {
    "photo": dict(mode="filled", palette="natural", background="gradient", texture=0.0, noise=0.04, shading=0.35, line=0),
    "sketch": dict(mode="outline", palette="graphite", background="paper", texture=0.0, noise=0.03, shading=0.0, line=2),
    "painting": dict(mode="filled", palette="warm", background="blotches", texture=0.35, noise=0.05, shading=0.0, line=0),
    "cartoon": dict(mode="outlined_fill", palette="bright", background="flat", texture=0.0, noise=0.0, shading=0.0, line=2),
}


def _random_style(name: str) -> dict:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]  # noqa: E731
    return dict(
        mode=pick(["filled", "outline", "outlined_fill"]),
        palette=pick(["natural", "warm", "bright", "cool"]),
        background=pick(["gradient", "paper", "blotches", "flat"]),
        texture=float(torch.rand(1, generator=g)) * 0.3,
        noise=float(torch.rand(1, generator=g)) * 0.06,
        shading=float(torch.rand(1, generator=g)) * 0.3,
        line=int(torch.randint(2, 4, (1,), generator=g)),
    )


def _shape_mask(name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Boolean mask of a unit-size shape in local coordinates (x, y roughly in [-1, 1])."""
    rho = torch.sqrt(x * x + y * y)
    ax, ay = x.abs(), y.abs()
    if name == "circle":
        return rho <= 0.9
    if name == "square":
        return torch.maximum(ax, ay) <= 0.72
    if name == "triangle":
        inside = torch.ones_like(x, dtype=torch.bool)
        for angle in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3):
            inside &= (x * math.cos(angle) + y * math.sin(angle)) <= 0.45
        return inside
    if name == "cross":
        return ((ax <= 0.24) & (ay <= 0.9)) | ((ay <= 0.24) & (ax <= 0.9))
    if name == "ring":
        return (rho <= 0.92) & (rho >= 0.55)
    if name == "stripes":
        return (ay <= 0.85) & (ax <= 0.9) & (torch.remainder(x + 0.9, 0.6) < 0.3)
    if name == "dots":
        mask = torch.zeros_like(x, dtype=torch.bool)
        for cx, cy in ((-0.55, -0.55), (0.55, -0.55), (-0.55, 0.55), (0.55, 0.55), (0.0, 0.0)):
            mask |= (x - cx) ** 2 + (y - cy) ** 2 <= 0.27**2
        return mask
    if name == "star":
        theta = torch.atan2(y, x) + math.pi / 2
        # radius of a 5-pointed star outline as a function of angle
        sector = torch.remainder(theta, 2 * math.pi / 5) - math.pi / 5
        r_edge = 0.42 + 0.5 * (1 - sector.abs() / (math.pi / 5)) ** 2
        return rho <= r_edge
    if name == "diamond":
        return ax + ay <= 0.95
    if name == "crescent":
        return (rho <= 0.9) & ((x - 0.38) ** 2 + (y + 0.1) ** 2 > 0.7**2)
    if name == "arrow":
        shaft = (ay <= 0.18) & (x >= -0.9) & (x <= 0.2)
        head = (x >= 0.1) & (x <= 0.9) & (ay <= 0.8 * (0.9 - x))
        return shaft | head
    if name == "checkerboard":
        inside = torch.maximum(ax, ay) <= 0.84
        cells = torch.floor((x + 0.84) / 0.56) + torch.floor((y + 0.84) / 0.56)
        return inside & (torch.remainder(cells, 2) == 0)
    raise ValueError(f"unknown shape {name!r}")


def _palette_colour(palette: str, g: torch.Generator) -> torch.Tensor:
    u = torch.rand(3, generator=g)
    if palette == "natural":  # muted, mid-range colours
        return 0.25 + 0.5 * u
    if palette == "graphite":
        return torch.full((3,), 0.05 + 0.25 * float(u[0]))
    if palette == "warm":  # reds, oranges, ochres
        return torch.stack([0.6 + 0.4 * u[0], 0.25 + 0.45 * u[1], 0.05 + 0.25 * u[2]])
    if palette == "cool":
        return torch.stack([0.05 + 0.3 * u[0], 0.3 + 0.5 * u[1], 0.6 + 0.4 * u[2]])
    if palette == "bright":  # saturated primaries / secondaries
        choices = torch.tensor(
            [[0.95, 0.1, 0.1], [0.1, 0.35, 0.95], [0.98, 0.85, 0.05], [0.1, 0.8, 0.2], [0.9, 0.2, 0.85], [1.0, 0.5, 0.0]]
        )
        return choices[int(torch.randint(len(choices), (1,), generator=g))]
    raise ValueError(f"unknown palette {palette!r}")


def _blotches(size: int, g: torch.Generator, cells: int = 5) -> torch.Tensor:
    """Smooth random field in [-1, 1] of shape (1, size, size)."""
    coarse = torch.rand(1, 1, cells, cells, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0].clamp(-1, 1)


def _edges(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Pixels of ``mask`` within ``width`` pixels of its border (an outline drawn inside the shape)."""
    m = mask.float()[None, None]
    eroded = -F.max_pool2d(-m, kernel_size=2 * width + 1, stride=1, padding=width)
    return (m - eroded)[0, 0] > 0.5


def _render(shape: str, style: dict, size: int, g: torch.Generator) -> torch.Tensor:
    """One (3, size, size) image in [0, 1]; drawn at 2x and box-filtered for smooth edges."""
    big = 2 * size
    lin = (torch.arange(big, dtype=torch.float32) + 0.5) / big * 2 - 1
    v, u = torch.meshgrid(lin, lin, indexing="ij")
    cx, cy = (torch.rand(2, generator=g) * 0.3 - 0.15).tolist()
    scale = 0.55 + 0.17 * float(torch.rand(1, generator=g))
    angle = (float(torch.rand(1, generator=g)) * 2 - 1) * 0.26
    ca, sa = math.cos(angle), math.sin(angle)
    du, dv = u - cx, v - cy
    x = (ca * du + sa * dv) / scale
    y = (-sa * du + ca * dv) / scale
    mask = _shape_mask(shape, x, y)

    # background
    kind = style["background"]
    if kind == "gradient":
        c0, c1 = _palette_colour("natural", g), _palette_colour("natural", g)
        t = ((u + v) / 4 + 0.5)[None]
        background = c0[:, None, None] * (1 - t) + c1[:, None, None] * t
    elif kind == "paper":
        background = torch.full((3, big, big), 0.92 + 0.06 * float(torch.rand(1, generator=g)))
        background = background + 0.03 * _blotches(big, g, 8)
    elif kind == "blotches":
        base = _palette_colour("warm", g) * 0.6 + 0.3
        background = base[:, None, None] + 0.25 * _blotches(big, g, 4) * torch.tensor([1.0, 0.8, 0.5])[:, None, None]
    elif kind == "flat":
        background = _palette_colour("bright", g)[:, None, None].expand(3, big, big) * 0.35 + 0.6
    else:
        raise ValueError(f"unknown background {kind!r}")

    # fill, kept apart from the background in brightness so that the shape stays visible
    colour = _palette_colour(style["palette"], g)
    luma = torch.tensor([0.299, 0.587, 0.114])
    bg_luma, fill_luma = float((background.mean(dim=(1, 2)) * luma).sum()), float((colour * luma).sum())
    if abs(fill_luma - bg_luma) < 0.25:
        colour = (colour + (0.3 if bg_luma < 0.5 else -0.3)).clamp(0, 1)
    fill = colour[:, None, None].expand(3, big, big).clone()
    if style["shading"] > 0:
        fill = fill * (1 - style["shading"] * (y.clamp(-1, 1)[None] + 1) / 2)
    if style["texture"] > 0:
        fill = fill + style["texture"] * _blotches(big, g, 6)
    line_colour = torch.zeros(3) if style["mode"] == "outlined_fill" else colour
    line = _edges(mask, style["line"]) if style["mode"] in ("outline", "outlined_fill") else None

    image = background.clone()
    if style["mode"] in ("filled", "outlined_fill"):
        image = torch.where(mask[None], fill, image)
    if line is not None:
        image = torch.where(line[None], line_colour[:, None, None].expand(3, big, big), image)
    image = F.avg_pool2d(image[None], 2)[0]
    if style["noise"] > 0:
        image = image + style["noise"] * torch.randn(image.shape, generator=g)
    return image.clamp(0, 1)


class SyntheticDomainDataset(Dataset):
    """One synthetic domain: ``(image, label)`` with image a (3, S, S) float tensor."""

    def __init__(self, images: torch.Tensor, labels: list[int], classnames: list[str], domain: str, transform=None):
        self.images = images
        self.labels = list(labels)
        self.classnames = list(classnames)
        self.domain = domain
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int):
        """The untransformed ``(image, label)``."""
        return self.images[index], self.labels[index]

    def __getitem__(self, index: int):
        x = self.images[index]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[index]

    def __repr__(self) -> str:
        return f"SyntheticDomainDataset(domain={self.domain!r}, images={len(self)}, classes={len(self.classnames)})"


def _clip_normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=x.dtype)[:, None, None]
    return (x - mean) / std


class SyntheticDomains:
    """Shapes and patterns drawn in a different style per domain, generated in code.

    ``.datasets`` maps each domain to a dataset of ``(image, label)``; images are (3, S, S) floats
    in [0, 1], CLIP-normalised with ``transform="clip"``, or ``transform(image)`` for a callable
    (e.g. ``clip_transform(image_size=S, train=True)``). ``.classnames`` are the shape words.
    Known styles: photo (filled, shaded, gradient background), sketch (grey outline on paper),
    painting (textured warm fill on blotchy background), cartoon (flat bright fill, thick black
    outline, flat background); other domain names get a style seeded by the name. Deterministic
    per ``seed``; each domain's images depend only on (seed, domain name).
    """

    def __init__(
        self,
        num_classes: int = 7,
        domains: Sequence[str] = ("photo", "sketch", "painting", "cartoon"),
        images_per_class: int = 24,
        image_size: int = 32,
        seed: int = 0,
        transform: str | Callable | None = None,
    ):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= len(SHAPE_CLASSES):
            raise ValueError(f"num_classes must be an int in [2, {len(SHAPE_CLASSES)}], got {num_classes!r}")
        if isinstance(domains, str) or not domains:
            raise ValueError(f"domains must be a non-empty sequence of names, got {domains!r}")
        domains = [str(d) for d in domains]
        if len(set(domains)) != len(domains):
            raise ValueError(f"domains has duplicates: {domains}")
        if isinstance(images_per_class, bool) or not isinstance(images_per_class, int) or images_per_class < 1:
            raise ValueError(f"images_per_class must be a positive int, got {images_per_class!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
        if transform == "clip":
            transform = _clip_normalize
        elif transform is not None and not callable(transform):
            raise ValueError(f"transform must be None, 'clip' or a callable, got {transform!r}")
        self.classnames = list(SHAPE_CLASSES[:num_classes])
        self.domains = domains
        self.image_size = image_size
        self.seed = seed
        self.styles = {d: dict(SYNTHETIC_STYLES.get(d) or _random_style(d)) for d in domains}
        self.datasets: dict[str, SyntheticDomainDataset] = {}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny tensors: intra-op threads only add overhead (and contention)
        try:
            for d in domains:
                g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(d.encode())) % (2**63))
                images, labels = [], []
                for _ in range(images_per_class):
                    for label, shape in enumerate(self.classnames):
                        images.append(_render(shape, self.styles[d], image_size, g))
                        labels.append(label)
                self.datasets[d] = SyntheticDomainDataset(torch.stack(images), labels, self.classnames, d, transform)
        finally:
            torch.set_num_threads(threads)

    def write_folder(self, root: str | os.PathLike) -> Path:
        """Write the images as PNG files in the DomainBed layout ``root/<domain>/<class>/<n>.png``."""
        from torchvision.utils import save_image

        root = Path(root)
        for d, ds in self.datasets.items():
            for i, (image, label) in enumerate(zip(ds.images, ds.labels)):
                folder = root / d / self.classnames[label]
                folder.mkdir(parents=True, exist_ok=True)
                save_image(image, folder / f"{i:05d}.png")
        return root
