"""CLIP image transforms as the official GuiDG code uses them (step 1, step 2, evaluation)."""
from __future__ import annotations

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

__all__ = ["CLIP_MEAN", "CLIP_STD", "clip_transform", "to_pil"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_pil(image) -> Image.Image:
    """PIL RGB image from a PIL image or a (3|1, H, W) tensor (uint8, or float in [0, 1])."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"image tensor must have shape (3, H, W) or (1, H, W), got {tuple(image.shape)}")
        if image.dtype != torch.uint8:
            image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        return TF.to_pil_image(image.cpu()).convert("RGB")
    raise ValueError(f"image must be a PIL image or a tensor, got {type(image).__name__}")


class _ToPIL:
    def __call__(self, image):
        return to_pil(image)

    def __repr__(self) -> str:
        return "ToPIL()"


def clip_transform(image_size: int = 224, train: bool = False, randaugment: bool = False) -> T.Compose:
    """The CLIP preprocessing used by GuiDG, for PIL images or (C, H, W) image tensors.

    - evaluation (default): Resize(image_size, bicubic) + CenterCrop, as CLIP's own preprocess;
    - ``train=True`` (official step 1): RandomResizedCrop(image_size, scale=(0.7, 1)) + horizontal flip;
    - ``randaugment=True`` (official step 2): Resize(bicubic) + CenterCrop + RandAugment
      (with ``train=True`` as well: the step-1 crop and flip followed by RandAugment);
    then ToTensor and Normalize with the CLIP mean / std.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    steps: list = [_ToPIL()]
    if train:
        steps += [T.RandomResizedCrop(image_size, scale=(0.7, 1.0)), T.RandomHorizontalFlip()]
    else:
        steps += [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    if randaugment:
        steps.append(T.RandAugment())
    steps += [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    return T.Compose(steps)
