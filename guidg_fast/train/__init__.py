"""Step-1 expert training, step-2 guided fine-tuning, evaluation and checkpoints."""
from .checkpoint import NonFiniteLossError
from .feature_cache import ImageFeatureCache
from .guidg import BASELINES, GuiDG, epoch_batch_indices

__all__ = ["BASELINES", "GuiDG", "ImageFeatureCache", "NonFiniteLossError", "epoch_batch_indices"]
