"""Stand-in for ``guidg_fast.data.augment`` (branch ``aug``) with the same API, until it lands.

The input pipeline calls RandAugment and normalisation only through the two names below (imported
once, in ``guidg_fast.data.loaders``), so replacing this module by the real one is one import line.
Per-sample torchvision v2 RandAugment on uint8 tensors: correct, not batched, not fast.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

__all__ = ["BatchedRandAugment", "normalize_uint8"]


class BatchedRandAugment:
    """RandAugment of every image of a uint8 batch (B, 3, H, W), each with its own draw.

    The draws come from ``generator`` (a CPU torch.Generator) only: the same generator state gives
    the same augmentations whatever process, device or batch position runs them.
    """

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31, fill=0):
        self.num_ops, self.magnitude, self.num_magnitude_bins, self.fill = num_ops, magnitude, num_magnitude_bins, fill
        self._op = v2.RandAugment(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=num_magnitude_bins, fill=fill)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a uint8 tensor (B, 3, H, W), got {getattr(images, 'dtype', type(images))} "
                             f"{tuple(getattr(images, 'shape', ()))}")
        seeds = torch.randint(0, 2**62, (images.shape[0],), generator=generator).tolist()
        out = torch.empty_like(images)
        for i, seed in enumerate(seeds):
            # v2.RandAugment draws from the global CPU RNG: give each sample its own seeded draw
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                out[i] = self._op(images[i])
        return out

    def __repr__(self) -> str:
        return (f"BatchedRandAugment(num_ops={self.num_ops}, magnitude={self.magnitude}, "
                f"num_magnitude_bins={self.num_magnitude_bins}, fill={self.fill})")


def normalize_uint8(images: torch.Tensor, mean, std, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(images / 255 - mean) / std per channel, in the op order of ToTensor + Normalize."""
    x = images.to(dtype).div(255)
    mean_t = torch.as_tensor(mean, dtype=dtype, device=x.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=dtype, device=x.device).view(-1, 1, 1)
    return x.sub_(mean_t).div_(std_t)
