"""Data layer: DomainBed folders, the GuiDG split protocols, ImageNet-DG, synthetic demo data.

No DomainBed or Dassl dependency; folders are read with PIL, splits are seeded with torch.Generator.
"""
from .augment import RANDAUGMENT_OPS, BatchedRandAugment, RandAugmentPlan, normalize_uint8, randaugment_magnitudes
from .folders import DOMAINBED_DATASETS, IMAGE_EXTENSIONS, CorruptImageError, DomainFolder, check_same_classes, load_domainbed
from .imagenet_dg import IMAGENET_DG_FULL, build_imagenet_dg, imagenet_dg_roots, is_imagenet_dg, read_classnames
from .image_cache import ImageCacheStore
from .loaders import domain_balanced_batches
from .workers import default_workers
from .splits import DGSplit, DomainSubset, few_shot_split, multi_source_split, split_indices, with_transform
from .synthetic import SHAPE_CLASSES, SyntheticDomains
from .transforms import CLIP_MEAN, CLIP_STD, clip_transform

__all__ = [
    "RANDAUGMENT_OPS",
    "BatchedRandAugment",
    "RandAugmentPlan",
    "normalize_uint8",
    "randaugment_magnitudes",
    "CLIP_MEAN",
    "CLIP_STD",
    "DOMAINBED_DATASETS",
    "IMAGENET_DG_FULL",
    "IMAGE_EXTENSIONS",
    "SHAPE_CLASSES",
    "CorruptImageError",
    "DGSplit",
    "DomainFolder",
    "DomainSubset",
    "ImageCacheStore",
    "SyntheticDomains",
    "build_imagenet_dg",
    "check_same_classes",
    "clip_transform",
    "default_workers",
    "domain_balanced_batches",
    "few_shot_split",
    "load_domainbed",
    "imagenet_dg_roots",
    "is_imagenet_dg",
    "multi_source_split",
    "read_classnames",
    "split_indices",
    "with_transform",
]
