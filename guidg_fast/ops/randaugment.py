"""randaugment_uint8: the CPU kernel behind BatchedRandAugment.apply (csrc/cpu/randaugment.cpp).

Each sample runs its RandAugment rounds in one task on its own buffers (lookup tables and gathers on
uint8); the affine ops gather through source-index maps the caller builds with torchvision's grid
(guidg_fast.data.augment). CUDA tensors take augment.py's batched torch ops instead. It runs in the
data workers and is never differentiated or traced, so it is a plain call of guidg_fast._C (no
torch.library schema).
"""
from __future__ import annotations

import torch

from . import _backend


def kernel_available() -> bool:
    """Whether guidg_fast._C (with the randaugment_uint8 CPU kernel) is loaded."""
    return _backend.ext_has_kernels(("randaugment_uint8",), "cpu")


def randaugment_uint8(images: torch.Tensor, op_ids: torch.Tensor, magnitudes: torch.Tensor,
                      source_maps: torch.Tensor, source_rows: torch.Tensor, fill) -> torch.Tensor:
    """(B, 3, H, W) uint8 CPU images -> a new contiguous uint8 batch after every round of the plan.

    op_ids / source_rows: (B, rounds) int64; magnitudes: (B, rounds) float64; source_maps:
    (maps, H * W) int32 (1 + source pixel, 0 = fill) for ShearX / ShearY / Rotate; fill: 3 levels.
    """
    return _backend.load_extension().randaugment_uint8(images, op_ids, magnitudes, source_maps, source_rows,
                                                       [int(v) for v in fill])
