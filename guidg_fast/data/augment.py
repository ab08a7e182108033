"""Batched RandAugment on uint8 image tensors: the random part of the official step-2 transform.

The official step-2 transform is Resize(bicubic) + CenterCrop + ``torchvision.transforms.RandAugment()``
+ ToTensor + Normalize. The deterministic part is cached as uint8 tensors; this module applies the
random part to whole batches with torch ops, so it runs the same on CPU and CUDA tensors:

- ``BatchedRandAugment.draw`` draws every sample's ops and signed magnitudes from one CPU
  ``torch.Generator`` with torchvision's distribution (op uniform over the 14-op space, signed ops
  negated with probability 1/2, magnitudes from torchvision's augmentation space at the image size),
  so a (seed, batch) pair gives the same plan on any device and with any number of workers;
- ``BatchedRandAugment.apply`` sorts the samples of each round by op (and magnitude) and runs every op
  once on its group with per-sample magnitudes. ShearX / ShearY / Rotate: a source-index map per
  inverse matrix, from torchvision's own grid construction (bmm) and ``grid_sample(nearest)`` on a map
  of pixel numbers, so the same source pixel is picked; cached (a fixed magnitude gives 10 matrices per
  image size) and applied as one uint8 gather. TranslateX / Y: whole-pixel shifts as slice copies.
  Brightness / Color / Contrast / Sharpness / AutoContrast: torchvision's float32 math with per-sample
  factor tensors; Posterize: a bit mask; Solarize: sign arithmetic on int16; Equalize: one bincount
  histogram for all (sample, channel) rows and a lookup-table gather.
- CPU tensors (when guidg_fast._C is built) take the C++ kernel instead
  (``guidg_fast.ops.randaugment``, csrc/cpu/randaugment.cpp): one task per sample runs its rounds with
  lookup tables and gathers on uint8, through the same cached source-index maps; it is bit-exact with
  torchvision for every op (Color included: it reproduces torchvision's fused multiply-add exactly).
- ``normalize_uint8`` turns the uint8 result into the normalised float batch (one widening copy and an
  in-place multiply-add).
"""
from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from numbers import Real

import torch
import torch.nn.functional as F

__all__ = ["RANDAUGMENT_OPS", "BatchedRandAugment", "RandAugmentPlan", "normalize_uint8", "randaugment_magnitudes"]

# torchvision's RandAugment op space, in its order (op ids index this tuple).
RANDAUGMENT_OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
_SIGNED = torch.tensor([name in {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
                                 "Color", "Contrast", "Sharpness"} for name in RANDAUGMENT_OPS])
_OP_ID = {name: i for i, name in enumerate(RANDAUGMENT_OPS)}
# The affine ops sample a float32 map of flat pixel indices; above 2**24 pixels they are not exact.
_MAX_PIXELS = 2**24 - 1


@functools.lru_cache(maxsize=64)
def _magnitude_column(num_magnitude_bins: int, magnitude: int, height: int, width: int) -> torch.Tensor:
    return randaugment_magnitudes(num_magnitude_bins, height, width)[:, magnitude].clone()


def randaugment_magnitudes(num_magnitude_bins: int, height: int, width: int) -> torch.Tensor:
    """(14, num_magnitude_bins) float64: torchvision's RandAugment magnitude for each op and bin.

    The values are those of torchvision's augmentation space (computed in float32 as it computes them,
    then widened); ops without a magnitude (Identity, AutoContrast, Equalize) get 0, as torchvision
    passes 0.0 to them.
    """
    bins = num_magnitude_bins
    table = torch.zeros(len(RANDAUGMENT_OPS), bins, dtype=torch.float64)

    def put(name: str, values: torch.Tensor) -> None:
        table[_OP_ID[name]] = values.to(torch.float64)

    for name in ("ShearX", "ShearY"):
        put(name, torch.linspace(0.0, 0.3, bins))
    put("TranslateX", torch.linspace(0.0, 150.0 / 331.0 * width, bins))
    put("TranslateY", torch.linspace(0.0, 150.0 / 331.0 * height, bins))
    put("Rotate", torch.linspace(0.0, 30.0, bins))
    for name in ("Brightness", "Color", "Contrast", "Sharpness"):
        put(name, torch.linspace(0.0, 0.9, bins))
    put("Posterize", (8 - (torch.arange(bins) / ((bins - 1) / 4))).round().int())
    put("Solarize", torch.linspace(1.0, 0.0, bins))
    return table


@dataclass(frozen=True)
class RandAugmentPlan:
    """Per-sample RandAugment draws for one batch.

    op_ids: (B, num_ops) int64 indices into ``RANDAUGMENT_OPS``, round by round;
    magnitudes: (B, num_ops) float64, the signed magnitude torchvision would pass to each op;
    image_size: (H, W) the magnitudes were drawn for (translations scale with it).
    """

    op_ids: torch.Tensor
    magnitudes: torch.Tensor
    image_size: tuple[int, int]

    @property
    def op_names(self) -> list[list[str]]:
        return [[RANDAUGMENT_OPS[i] for i in row] for row in self.op_ids.tolist()]


def _check_int(name: str, value, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _check_images(images, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"{name} must be a uint8 tensor, got dtype {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must have shape (B, 3, H, W), got {tuple(images.shape)}")


def _check_generator(generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")


def _parse_fill(fill) -> tuple[int, int, int]:
    """Fill as three uint8 levels, rounded as torchvision rounds a float fill for uint8 images."""
    values = list(fill) if isinstance(fill, (tuple, list)) else [fill]
    if len(values) not in (1, 3) or not all(isinstance(v, Real) and not isinstance(v, bool) for v in values):
        raise ValueError(f"fill must be a number or a sequence of 1 or 3 numbers, got {fill!r}")
    if not all(0 <= v <= 255 for v in values):
        raise ValueError(f"fill must lie in [0, 255] for uint8 images, got {fill!r}")
    levels = torch.tensor([float(v) for v in values], dtype=torch.float32).round().to(torch.uint8).tolist()
    return tuple(levels * 3) if len(levels) == 1 else tuple(levels)


def _cpu_kernel():
    """guidg_fast.ops.randaugment.randaugment_uint8, or None when the extension is not built (then CPU
    tensors take the batched torch ops too). Tests replace it to run the torch path on CPU."""
    from ..ops import randaugment

    return randaugment.randaugment_uint8 if randaugment.kernel_available() else None


# --- affine ops -------------------------------------------------------------------------------------

def _inverse_affine_matrix(center, angle: float, translate, shear) -> tuple[float, ...]:
    """Inverse of T * C * R(angle) * Shear(shear) * C^-1 (unit scale), as the 2x3 row-major matrix
    torchvision's tensor affine samples with. Evaluated in Python doubles in torchvision's order so
    the float32 matrix is the same to the last bit."""
    rot = math.radians(angle)
    sx, sy = math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    cos_sy, tan_sx = math.cos(sy), math.tan(sx)
    a = math.cos(rot - sy) / cos_sy
    b = -(a * tan_sx + math.sin(rot))
    c = math.sin(rot - sy) / cos_sy
    d = math.cos(rot) - c * tan_sx
    m0, m1, m3, m4 = d, -b, -c, a
    cx_tx, cy_ty = cx + tx, cy + ty
    m2 = 0.0 + (cx - m0 * cx_tx - m1 * cy_ty)
    m5 = 0.0 + (cy - m3 * cx_tx - m4 * cy_ty)
    return (m0, m1, m2, m3, m4, m5)


def _affine_matrix_for(op_id: int, magnitude: float, height: int, width: int) -> tuple[float, ...]:
    """The inverse matrix torchvision's RandAugment uses for an affine op at a signed magnitude."""
    name = RANDAUGMENT_OPS[op_id]
    if name in ("ShearX", "ShearY"):
        # torchvision shears about the top-left corner (center=[0, 0] in pixel coordinates, i.e.
        # (-W/2, -H/2) relative to the image centre) by atan(magnitude) degrees.
        degrees = math.degrees(math.atan(magnitude))
        shear = (degrees, 0.0) if name == "ShearX" else (0.0, degrees)
        return _inverse_affine_matrix((-width * 0.5, -height * 0.5), 0.0, (0.0, 0.0), shear)
    if name in ("TranslateX", "TranslateY"):
        pixels = float(int(magnitude))  # torchvision truncates the translation to whole pixels
        translate = (pixels, 0.0) if name == "TranslateX" else (0.0, pixels)
        return _inverse_affine_matrix((0.0, 0.0), 0.0, translate, (0.0, 0.0))
    # Rotate: torchvision reduces the angle to [0, 360) and the grid convention needs -angle.
    angle = magnitude % 360
    return _inverse_affine_matrix((0.0, 0.0), -angle, (0.0, 0.0), (0.0, 0.0))


def _source_indices(matrices: list[tuple[float, ...]], height: int, width: int,
                    device: torch.device) -> torch.Tensor:
    """(len(matrices), H*W) int32: for each inverse matrix and output pixel, 1 + the flat index of the
    source pixel nearest sampling picks, or 0 where it falls outside the image (the fill)."""
    base = torch.empty(1, height, width, 3, dtype=torch.float32, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width, device=device))
    base[..., 1].copy_(torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height,
                                      device=device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    base = base.view(1, height * width, 3)
    half_size = torch.tensor([0.5 * width, 0.5 * height], dtype=torch.float32, device=device)
    # The grid as torchvision's _affine_grid builds it: the pixel-centred base grid times the matrix
    # rescaled to [-1, 1], one (1, HW, 3) x (1, 3, 2) bmm per matrix, the very call (and shapes) torchvision
    # makes, so every backend rounds the grid as it does for torchvision. Built once per matrix (cached).
    grids = []
    for matrix in matrices:
        theta = torch.tensor(matrix, dtype=torch.float32, device=device).view(1, 2, 3)
        grids.append(base.bmm(theta.transpose(1, 2).div_(half_size)))
    grid = torch.cat(grids).view(len(matrices), height, width, 2)
    # Sampling a map of pixel numbers with the kernel torchvision samples the image with picks the same
    # source pixel (and makes the same out-of-bounds decision) for one channel's cost; zero padding
    # marks the fill.
    pixel_numbers = torch.arange(1, height * width + 1, dtype=torch.float32, device=device)
    pixel_numbers = pixel_numbers.view(1, 1, height, width).expand(len(matrices), 1, height, width)
    sources = F.grid_sample(pixel_numbers, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return sources.view(len(matrices), height * width).to(torch.int32)


class _SourceIndexCache:
    """Source-index maps by (device, H, W, matrix). RandAugment at a fixed magnitude uses only 10
    affine matrices per image size (5 ops x 2 signs), so after the first batches no grid is built."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._maps: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def lookup(self, matrices: list[tuple[float, ...]], height: int, width: int,
               device: torch.device) -> torch.Tensor:
        with self._lock:
            return self._lookup(matrices, height, width, device)

    def _lookup(self, matrices, height, width, device) -> torch.Tensor:
        keys = [(str(device), height, width, matrix) for matrix in matrices]
        missing = list(dict.fromkeys(key for key in keys if key not in self._maps))
        if missing:
            built = _source_indices([key[3] for key in missing], height, width, device)
            for key, sources in zip(missing, built):
                self._maps[key] = sources
        for key in keys:
            self._maps.move_to_end(key)
        rows = [self._maps[key] for key in keys]
        while len(self._maps) > max(self.capacity, len(set(keys))):
            self._maps.popitem(last=False)
        return torch.stack(rows)


def _row_starts(count: int, stride: int, device) -> torch.Tensor:
    return torch.arange(0, count * stride, stride, dtype=torch.int32, device=device)


def _warp(x: torch.Tensor, op_ids: list[int], magnitudes: list[float], fill: torch.Tensor,
          cache: _SourceIndexCache) -> torch.Tensor:
    """ShearX / ShearY / Rotate: gather every sample's source pixels through its cached index map."""
    n, channels, height, width = x.shape
    pixels = height * width
    matrices = [_affine_matrix_for(op_id, m, height, width) for op_id, m in zip(op_ids, magnitudes)]
    sources = cache.lookup(matrices, height, width, x.device)
    # Each (sample, channel) row gets the fill level in front, so source number 0 reads the fill.
    padded = x.new_empty(n, channels, pixels + 1)
    padded[:, :, 0] = fill
    padded[:, :, 1:] = x.view(n, channels, pixels)
    flat_index = sources.view(n, 1, pixels) + _row_starts(n * channels, pixels + 1, x.device).view(n, channels, 1)
    torch.index_select(padded.view(-1), 0, flat_index.view(-1), out=x.view(-1))  # padded holds the input
    return x


def _translate(x: torch.Tensor, op_ids: list[int], magnitudes: list[float], fill: torch.Tensor,
               cache: _SourceIndexCache) -> torch.Tensor:
    """TranslateX / TranslateY. torchvision's grid for a whole-pixel translation t puts every output
    pixel within float32 rounding of source pixel (j - t), far from a rounding tie, so nearest sampling is
    exactly a shift with the fill coming in: done as slice copies, one per distinct shift."""
    n, channels, height, width = x.shape
    out = torch.empty_like(x)
    out[:] = fill.view(1, channels, 1, 1)
    shifts = [(int(m), 0) if op_id == _OP_ID["TranslateX"] else (0, int(m)) for op_id, m in zip(op_ids, magnitudes)]
    # apply() sorts each op's samples by magnitude, so equal shifts are contiguous runs: one copy per run.
    run_start = 0
    for position in range(1, n + 1):
        if position < n and shifts[position] == shifts[run_start]:
            continue
        (dx, dy), run = shifts[run_start], slice(run_start, position)
        run_start = position
        if abs(dx) >= width or abs(dy) >= height:
            continue  # everything moved out: all fill
        rows = slice(max(dy, 0), height + min(dy, 0)), slice(max(-dy, 0), height + min(-dy, 0))
        cols = slice(max(dx, 0), width + min(dx, 0)), slice(max(-dx, 0), width + min(-dx, 0))
        out[run, :, rows[0], cols[0]] = x[run, :, rows[1], cols[1]]
    return out


# --- point and colour ops ---------------------------------------------------------------------------

def _store(values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Truncate float values already clamped to [0, 255] into the uint8 ``out``, as ``.to(torch.uint8)``
    does; through int16 because torch's direct float->uint8 cast is an unvectorised loop (~10x slower on
    CPU). The point ops write over their input (apply() hands them a slice of its own round buffer)."""
    return out.copy_(values.to(torch.int16))


def _per_sample(values: list[float], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1, 1)


def _factors(magnitudes: list[float], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample blend factor 1 + m and its complement (n, 1, 1, 1), each rounded to float32 from the
    double torchvision computes (it passes ``1.0 + magnitude`` and blends with ``1.0 - ratio``)."""
    ratios = [1.0 + m for m in magnitudes]
    return _per_sample(ratios, device), _per_sample([1.0 - r for r in ratios], device)


def _grayscale_floor(x: torch.Tensor) -> torch.Tensor:
    """(n, H, W) float32 luma, floored, with torchvision's coefficients and op order."""
    r, g, b = x.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_()


def _brightness(x: torch.Tensor, magnitudes: list[float]) -> torch.Tensor:
    factor, _ = _factors(magnitudes, x.device)
    return _store(x.to(torch.float32).mul_(factor).clamp_(0, 255), x)


def _color(x: torch.Tensor, magnitudes: list[float]) -> torch.Tensor:
    ratio, complement = _factors(magnitudes, x.device)
    # torchvision blends as fma(gray, 1 - ratio, image * ratio) (add_ with alpha: one rounding); here it
    # is a multiply and an add, so ~0.2% of the pixels land one level apart. An exact float64 emulation
    # of the fma costs 3-10x this op (float64 temporaries), which the 1-level tolerance does not justify.
    gray = _grayscale_floor(x).unsqueeze_(1).mul_(complement)
    return _store(x.to(torch.float32).mul_(ratio).add_(gray).clamp_(0, 255), x)


def _contrast(x: torch.Tensor, magnitudes: list[float]) -> torch.Tensor:
    ratio, complement = _factors(magnitudes, x.device)
    offset = _grayscale_floor(x).mean(dim=(1, 2)).view(-1, 1, 1, 1).mul_(complement)
    return _store(x.to(torch.float32).mul_(ratio).add_(offset).clamp_(0, 255), x)


def _sharpness(x: torch.Tensor, magnitudes: list[float]) -> torch.Tensor:
    n, channels, height, width = x.shape
    if height <= 2 or width <= 2:
        return x  # torchvision leaves such images as they are
    _, complement = _factors(magnitudes, x.device)
    out = x.to(torch.float32)
    # The 3x3 kernel (1 1 1 / 1 5 1 / 1 1 1) / 13 as a separable box sum plus 4x the centre: the sums are
    # exact integers and S/13 is never within 1/26 of a half, so rounding gives torchvision's blurred
    # levels exactly, whatever order its conv accumulates in.
    rows = out[..., :, :-2] + out[..., :, 1:-1]
    rows.add_(out[..., :, 2:])
    box = rows[..., :-2, :] + rows[..., 1:-1, :]
    box.add_(rows[..., 2:, :])
    centre = out[..., 1:-1, 1:-1]
    blurred = box.add_(centre, alpha=4).mul_(1.0 / 13.0).round_()
    centre.add_(blurred.sub_(centre).mul_(complement))
    return _store(out.clamp_(0, 255), x)


def _posterize(x: torch.Tensor, magnitudes: list[float]) -> torch.Tensor:
    masks = []
    for magnitude in magnitudes:
        bits = int(magnitude)
        if not 0 <= bits <= 8:
            raise ValueError(f"plan.magnitudes: Posterize needs 0..8 bits, got {magnitude}")
        masks.append(255 if bits == 8 else ((1 << bits) - 1) << (8 - bits))
    return x.bitwise_and_(torch.tensor(masks, dtype=torch.uint8, device=x.device).view(-1, 1, 1, 1))


def _solarize(x: torch.Tensor, magnitudes: list[float]) -> torch.Tensor:
    # torchvision inverts where image >= 255 * magnitude, compared in float32; for integer levels that is
    # level >= ceil(threshold) (256 or more: nothing inverted).
    thresholds = torch.tensor([255.0 * m for m in magnitudes], dtype=torch.float32).ceil_().clamp_(0, 256)
    thresholds = thresholds.to(torch.int16).to(x.device).view(-1, 1, 1, 1)
    # Sign arithmetic instead of a comparison (torch's uint8 compare-to-bool loop is ~10x slower):
    # (v - t) >> 15 is -1 below the threshold and 0 from it on, so its complement is the 0 / 255 mask,
    # and 255 - v == v ^ 255 for uint8.
    invert = (x.to(torch.int16) - thresholds).bitwise_right_shift_(15).bitwise_not_().to(torch.uint8)
    return x.bitwise_xor_(invert)


def _autocontrast(x: torch.Tensor, magnitudes: list[float]) -> torch.Tensor:
    minimum = x.amin(dim=(2, 3), keepdim=True).to(torch.float32)
    maximum = x.amax(dim=(2, 3), keepdim=True).to(torch.float32)
    flat = maximum == minimum
    inv_scale = maximum.sub_(minimum).mul_(1.0 / 255)
    # torch.where rather than masked assignment: no host sync on CUDA.
    minimum = torch.where(flat, 0.0, minimum)
    inv_scale = torch.where(flat, 1.0, inv_scale)
    return _store(x.to(torch.float32).sub_(minimum).div_(inv_scale).clamp_(0, 255), x)


def _equalize(x: torch.Tensor, magnitudes: list[float]) -> torch.Tensor:
    n, channels, height, width = x.shape
    rows = n * channels
    index = (x + _row_starts(rows, 256, x.device).view(n, channels, 1, 1)).view(-1)
    hist = torch.bincount(index, minlength=rows * 256).view(rows, 256)
    cum_hist = hist.cumsum(dim=1)
    # PIL's scheme as torchvision implements it: step = (pixels not at the top level) // 255,
    # lut[k] = (cum_hist[k - 1] + step // 2) // step, identity where step == 0.
    top_level = cum_hist.argmax(dim=1, keepdim=True)
    step = (height * width - hist.gather(1, top_level)).div_(255, rounding_mode="floor")
    lut = cum_hist[:, :-1].add(step // 2).div_(step.clamp(min=1), rounding_mode="floor").clamp_(0, 255)
    lut = torch.cat([lut.new_zeros(rows, 1), lut], dim=1)
    identity = torch.arange(256, dtype=lut.dtype, device=x.device).expand(rows, 256)
    lut = torch.where(step != 0, lut, identity).to(torch.uint8)
    torch.index_select(lut.view(-1), 0, index, out=x.view(-1))
    return x


_GEOMETRIC_OPS = {
    _OP_ID["ShearX"]: _warp,
    _OP_ID["ShearY"]: _warp,
    _OP_ID["TranslateX"]: _translate,
    _OP_ID["TranslateY"]: _translate,
    _OP_ID["Rotate"]: _warp,
}
_POINT_OPS = {
    _OP_ID["Brightness"]: _brightness,
    _OP_ID["Color"]: _color,
    _OP_ID["Contrast"]: _contrast,
    _OP_ID["Sharpness"]: _sharpness,
    _OP_ID["Posterize"]: _posterize,
    _OP_ID["Solarize"]: _solarize,
    _OP_ID["AutoContrast"]: _autocontrast,
    _OP_ID["Equalize"]: _equalize,
}


class BatchedRandAugment:
    """torchvision's ``RandAugment(num_ops, magnitude, num_magnitude_bins, interpolation=NEAREST, fill)``
    applied to uint8 batches (B, 3, H, W), every sample with its own draws.

    ``__call__(images, generator)`` = ``apply(images, draw(B, H, W, generator))``. All randomness comes
    from the CPU ``generator``; the result is a new contiguous uint8 tensor on the images' device.
    Every op matches torchvision.transforms.v2.functional's tensor kernel to within one uint8 level
    (see tests/test_augment.py for where and why it is not bit-exact).
    """

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31, fill=0) -> None:
        self.num_magnitude_bins = _check_int("num_magnitude_bins", num_magnitude_bins, 2)
        self.num_ops = _check_int("num_ops", num_ops, 0)
        self.magnitude = _check_int("magnitude", magnitude, 0, num_magnitude_bins - 1)
        self.fill = _parse_fill(fill)
        self._init_state()

    def _init_state(self) -> None:
        self._source_indices = _SourceIndexCache()
        # Per-thread ping-pong buffers for the rounds: fresh 5 MB tensors every round cost more in page
        # faults (glibc hands large blocks back to the kernel) than the copies themselves.
        self._thread_state = threading.local()

    def __getstate__(self) -> dict:
        # Caches, buffers and the lock stay behind (DataLoader workers pickle the transform).
        return {k: v for k, v in self.__dict__.items() if k not in ("_source_indices", "_thread_state")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_state()

    def _round_buffers(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (images.device, tuple(images.shape))
        buffers = getattr(self._thread_state, "buffers", None)
        if buffers is None or buffers[0] != key:
            buffers = (key, torch.empty(images.shape, dtype=torch.uint8, device=images.device),
                       torch.empty(images.shape, dtype=torch.uint8, device=images.device))
            self._thread_state.buffers = buffers
        return buffers[1], buffers[2]

    def __repr__(self) -> str:
        return (f"BatchedRandAugment(num_ops={self.num_ops}, magnitude={self.magnitude}, "
                f"num_magnitude_bins={self.num_magnitude_bins}, fill={self.fill})")

    def draw(self, batch_size: int, height: int, width: int, generator: torch.Generator) -> RandAugmentPlan:
        """Each sample's ops and signed magnitudes: op uniform over the 14 ops, a signed op's magnitude
        negated with probability 1/2 (torchvision: ``torch.rand(()) <= 0.5``)."""
        _check_int("batch_size", batch_size, 0)
        _check_int("height", height, 1)
        _check_int("width", width, 1)
        _check_generator(generator)
        shape = (batch_size, self.num_ops)
        op_ids = torch.randint(len(RANDAUGMENT_OPS), shape, generator=generator)
        negate = torch.rand(shape, generator=generator) <= 0.5
        magnitudes = _magnitude_column(self.num_magnitude_bins, self.magnitude, height, width)[op_ids]
        magnitudes = torch.where(negate & _SIGNED[op_ids], -magnitudes, magnitudes)
        return RandAugmentPlan(op_ids=op_ids, magnitudes=magnitudes, image_size=(height, width))

    def apply(self, images: torch.Tensor, plan: RandAugmentPlan) -> torch.Tensor:
        """Run a plan's rounds on ``images`` (uint8 (B, 3, H, W), any device, any strides)."""
        _check_images(images)
        if not isinstance(plan, RandAugmentPlan):
            raise TypeError(f"plan must be a RandAugmentPlan (from draw()), got {type(plan).__name__}")
        batch, _, height, width = images.shape
        op_ids, magnitudes = plan.op_ids, plan.magnitudes
        if op_ids.dim() != 2 or op_ids.shape[0] != batch or magnitudes.shape != op_ids.shape:
            raise ValueError(f"plan.op_ids and plan.magnitudes must both have shape ({batch}, rounds) for "
                             f"{batch} images, got {tuple(op_ids.shape)} and {tuple(magnitudes.shape)}")
        if tuple(plan.image_size) != (height, width):
            raise ValueError(f"plan was drawn for images of size {tuple(plan.image_size)}, "
                             f"images are {height}x{width}")
        if op_ids.numel() and (op_ids.min() < 0 or op_ids.max() >= len(RANDAUGMENT_OPS)):
            raise ValueError(f"plan.op_ids must lie in [0, {len(RANDAUGMENT_OPS)})")
        if height * width > _MAX_PIXELS:
            raise ValueError(f"images: at most {_MAX_PIXELS} pixels per image, got {height}x{width}")
        if batch == 0 or op_ids.shape[1] == 0:
            return images.clone(memory_format=torch.contiguous_format)

        if images.device.type == "cpu" and _cpu_kernel() is not None:
            return self._apply_cpu_kernel(images, op_ids, magnitudes)

        device = images.device
        fill = torch.tensor(self.fill, dtype=torch.uint8, device=device).view(1, 3)
        op_ids, magnitudes = op_ids.cpu(), magnitudes.cpu().to(torch.float64)
        x = images
        buffers = self._round_buffers(images)
        holder = torch.arange(batch)  # x[i] holds sample holder[i]; sorting by op keeps groups contiguous
        for round_index in range(op_ids.shape[1]):
            # By op, and within an op by magnitude (so equal translations are contiguous runs).
            order = torch.argsort(magnitudes[holder, round_index], stable=True)
            order = order[torch.argsort(op_ids[holder[order], round_index], stable=True)]
            holder = holder[order]
            x = torch.index_select(x, 0, order.to(device), out=buffers[round_index % 2])
            round_ops = op_ids[holder, round_index]
            round_magnitudes = magnitudes[holder, round_index].tolist()
            ends = torch.bincount(round_ops, minlength=len(RANDAUGMENT_OPS)).cumsum(0).tolist()
            starts = [0] + ends[:-1]
            for op_id in range(1, len(RANDAUGMENT_OPS)):
                lo, hi = starts[op_id], ends[op_id]
                if hi == lo:
                    continue
                group = x[lo:hi]
                if op_id in _GEOMETRIC_OPS:
                    result = _GEOMETRIC_OPS[op_id](group, round_ops[lo:hi].tolist(), round_magnitudes[lo:hi],
                                                   fill, self._source_indices)
                else:
                    result = _POINT_OPS[op_id](group, round_magnitudes[lo:hi])
                if result.data_ptr() != group.data_ptr():  # ops that cannot work in place (translate)
                    group.copy_(result)
        return x.index_select(0, torch.argsort(holder).to(device))

    def _apply_cpu_kernel(self, images: torch.Tensor, op_ids: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
        """CPU: one C++ task per sample (csrc/cpu/randaugment.cpp); the affine ops gather through the
        same cached source-index maps as the torch path, one map per distinct matrix."""
        batch, _, height, width = images.shape
        op_ids = op_ids.to(torch.int64).contiguous()
        magnitudes = magnitudes.to(torch.float64).contiguous()
        source_rows = torch.full(op_ids.shape, -1, dtype=torch.int64)
        affine = (op_ids == _OP_ID["ShearX"]) | (op_ids == _OP_ID["ShearY"]) | (op_ids == _OP_ID["Rotate"])
        positions = affine.nonzero().tolist()
        if positions:
            ids, values = op_ids.tolist(), magnitudes.tolist()
            keys = [(ids[i][r], values[i][r]) for i, r in positions]
            distinct = list(dict.fromkeys(keys))
            row_of = {key: row for row, key in enumerate(distinct)}
            matrices = [_affine_matrix_for(op_id, m, height, width) for op_id, m in distinct]
            source_maps = self._source_indices.lookup(matrices, height, width, images.device)
            source_rows[affine] = torch.tensor([row_of[key] for key in keys], dtype=torch.int64)
        else:
            source_maps = torch.empty(0, height * width, dtype=torch.int32)
        return _cpu_kernel()(images.contiguous(), op_ids, magnitudes, source_maps, source_rows, self.fill)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        _check_images(images)
        _check_generator(generator)
        batch, _, height, width = images.shape
        return self.apply(images, self.draw(batch, height, width, generator))


def normalize_uint8(images: torch.Tensor, mean, std, dtype: torch.dtype = torch.float32,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """(images / 255 - mean) / std per channel (dim -3) for uint8 images (..., C, H, W), as
    ``images * (1 / (255 std)) + (-mean / std)``: one widening copy and one in-place multiply-add pass.

    ``out`` (optional, shape of ``images``, floating dtype, e.g. a pinned staging buffer) receives the
    result instead of a new tensor. float64 computes in float64, every other dtype in float32.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be a uint8 tensor, got dtype {images.dtype}")
    if images.dim() < 3:
        raise ValueError(f"images must have shape (..., C, H, W), got {tuple(images.shape)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != images.shape or out.dtype != dtype:
            raise ValueError(f"out must be a {dtype} tensor of shape {tuple(images.shape)}, got "
                             f"{(out.dtype, tuple(out.shape)) if isinstance(out, torch.Tensor) else type(out).__name__}")
        if out.device != images.device:
            raise ValueError(f"out must be on {images.device}, got {out.device}")
    channels = images.shape[-3]
    mean64 = torch.as_tensor(mean, dtype=torch.float64).flatten()
    std64 = torch.as_tensor(std, dtype=torch.float64).flatten()
    for name, values in (("mean", mean64), ("std", std64)):
        if values.numel() != channels:
            raise ValueError(f"{name} must have one value per channel ({channels}), got {values.numel()}")
    if not bool((std64 > 0).all()):
        raise ValueError(f"std must be positive, got {std64.tolist()}")
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    # Scale and offset formed in float64 and rounded once: within a few ulps of ToTensor + Normalize.
    scale = (1.0 / (255.0 * std64)).to(dtype=compute, device=images.device).view(channels, 1, 1)
    offset = (-mean64 / std64).to(dtype=compute, device=images.device).view(channels, 1, 1)
    # A mixed uint8 x float multiply (or addcmul) takes torch's slow dynamic-cast loop; widening first
    # keeps both passes vectorised (2.3 ms vs 5.9 ms for 36 x 3 x 224 x 224 on one core).
    if out is not None and compute == dtype:
        return out.copy_(images).mul_(scale).add_(offset)
    result = images.to(compute).mul_(scale).add_(offset)
    if out is not None:
        return out.copy_(result)
    return result if compute == dtype else result.to(dtype)
