"""guidg-fast: fused-kernel engine for GuiDG training and inference.

Public API (names are a contract; see docs/design.md):
    load_clip, ExpertPromptLearner, encode_expert_prompts, CrossModalAttention,
    BetaMovingAverage, wise_ft, ops.<fused ops>, reference.<eager oracle>, GuiDG (trainer, lazy)
"""
__version__ = "0.1.0"

from . import ops, reference
from .attention import CrossModalAttention
from .averaging import BetaMovingAverage, wise_ft
from .backbone import TINY_ARCH, load_clip
from .prompts import ExpertPromptLearner
from .text import encode_expert_prompts

__all__ = [
    "BetaMovingAverage",
    "CrossModalAttention",
    "ExpertPromptLearner",
    "GuiDG",
    "NonFiniteLossError",
    "TINY_ARCH",
    "encode_expert_prompts",
    "load_clip",
    "ops",
    "reference",
    "wise_ft",
]


def __getattr__(name: str):
    # the trainer (and its data/checkpoint imports) loads on first use: `import guidg_fast` stays light
    if name == "GuiDG":
        from .train import GuiDG

        return GuiDG
    if name == "NonFiniteLossError":
        from .train.checkpoint import NonFiniteLossError

        return NonFiniteLossError
    raise AttributeError(f"module 'guidg_fast' has no attribute {name!r}")
