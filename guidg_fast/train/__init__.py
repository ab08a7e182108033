"""Step-1 expert training, step-2 guided fine-tuning, evaluation and checkpoints."""
from .guidg import BASELINES, GuiDG, epoch_batch_indices

__all__ = ["BASELINES", "GuiDG", "epoch_batch_indices"]
