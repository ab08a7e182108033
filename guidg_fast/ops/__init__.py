"""Fused ops of GuiDG. Each op picks its backend per call (see ``_backend``)."""
from ._backend import BACKENDS, choose, describe, extension_status, use_backend
from .bma_update import bma_update_
from .cmattn import cross_modal_attention
from .ensemble_logits import ensemble_logits
from .guidance import guidance_loss
from .multi_expert_loss import multi_expert_loss
from .prefix_attention import prefix_attention, prefix_attention_eager, prefix_attention_packed
from .eot_project import eot_project, eot_project_eager


__all__ = [
    "BACKENDS",
    "bma_update_",
    "choose",
    "cross_modal_attention",
    "describe",
    "ensemble_logits",
    "eot_project",
    "eot_project_eager",
    "extension_status",
    "guidance_loss",
    "multi_expert_loss",
    "prefix_attention",
    "prefix_attention_eager",
    "prefix_attention_packed",
    "use_backend",
]
