"""ExpertPromptLearner: the learnable contexts of K CoOp domain experts and their frozen token buffers."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .backbone import text_tower

POSITIONS = ("end", "middle", "front")


def _token_count(tokenizer, text: str) -> int:
    """Tokens of ``text`` between SOS and EOT (EOT = the largest id, as CLIP's tokenizer)."""
    ids = tokenizer([text])[0]
    return int(ids.argmax()) - 1


class ExpertPromptLearner(nn.Module):
    """Contexts of ``num_experts`` prompt-tuned experts over one class list.

    Prompt text of class c: ``"X X ... X {classname}."`` (n_ctx X's, or the init phrase), with
    underscores in class names turned into spaces. ``ctx`` has shape (K, n_ctx, W) for a generic
    context or (K, C, n_ctx, W) for class-specific contexts. The buffers ``token_prefix`` (SOS
    embedding) and ``token_suffix`` (embeddings after the context) follow the official layout, so an
    official expert's ``prompt_learner`` state dict maps onto one slice of ``ctx``.
    """

    def __init__(
        self,
        model,
        tokenizer,
        classnames: Sequence[str],
        num_experts: int,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_token_position: str = "end",
        class_specific: bool = False,
    ):
        super().__init__()
        if isinstance(classnames, str) or len(classnames) == 0:
            raise ValueError("classnames must be a non-empty sequence of class names")
        if not all(isinstance(c, str) and c.strip() for c in classnames):
            raise ValueError("classnames must all be non-empty strings")
        if len(set(classnames)) != len(classnames):
            raise ValueError("classnames must be unique")
        if int(num_experts) < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if class_token_position not in POSITIONS:
            raise ValueError(f"class_token_position must be one of {POSITIONS}, got {class_token_position!r}")
        tower = text_tower(model)
        width = tower.width
        dtype = tower.token_embedding.weight.dtype
        device = tower.token_embedding.weight.device

        if ctx_init:
            phrase = ctx_init.replace("_", " ").strip()
            n_ctx = _token_count(tokenizer, phrase)
            if n_ctx < 1:
                raise ValueError(f"ctx_init={ctx_init!r} tokenizes to no tokens")
            with torch.no_grad():
                init_ids = tokenizer([phrase]).to(device)
                init = tower.token_embedding(init_ids)[0, 1 : 1 + n_ctx].to(dtype)
            prompt_prefix = phrase
        else:
            if int(n_ctx) < 1:
                raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
            init = None
            prompt_prefix = " ".join(["X"] * int(n_ctx))
        n_ctx = int(n_ctx)
        if n_ctx + 3 > tower.context_length:
            raise ValueError(f"n_ctx={n_ctx} leaves no room for class names in {tower.context_length} tokens")

        K, C = int(num_experts), len(classnames)
        shape = (K, C, n_ctx, width) if class_specific else (K, n_ctx, width)
        if init is None:
            ctx = torch.empty(shape, dtype=dtype, device=device)
            nn.init.normal_(ctx, std=0.02)
        else:
            ctx = init.expand(shape).clone()
        self.ctx = nn.Parameter(ctx)

        names = [name.replace("_", " ") for name in classnames]
        prompts = [f"{prompt_prefix} {name}." for name in names]
        tokenized = tokenizer(prompts).to(device)
        with torch.no_grad():
            embedding = tower.token_embedding(tokenized).to(dtype)
        self.register_buffer("tokenized_prompts", tokenized, persistent=False)
        self.register_buffer("token_prefix", embedding[:, :1, :].clone())
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx :, :].clone())
        self.classnames = list(classnames)
        self.name_lens = [_token_count(tokenizer, name) for name in names]
        self.n_ctx = n_ctx
        self.num_experts = K
        self.num_classes = C
        self.class_token_position = class_token_position
        self.class_specific = bool(class_specific)
        self.prompt_prefix = prompt_prefix

    @property
    def eot_indices(self) -> torch.Tensor:
        return self.tokenized_prompts.argmax(dim=-1)

    def expert_context(self, k: int) -> torch.Tensor:
        """ctx of expert k expanded to (C, n_ctx, W)."""
        ctx = self.ctx[k]
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.num_classes, -1, -1)
        return ctx

    def prompts(self, k: int) -> torch.Tensor:
        """Full-length prompt embeddings (C, L, W) of expert k, built as the official PromptLearner."""
        ctx = self.expert_context(k)
        prefix, suffix = self.token_prefix, self.token_suffix
        if self.class_token_position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)
        half = self.n_ctx // 2
        rows = []
        for i in range(self.num_classes):  # per-class loop, as the official code
            name_len = self.name_lens[i]
            class_i = suffix[i : i + 1, :name_len]
            rest_i = suffix[i : i + 1, name_len:]
            if self.class_token_position == "middle":
                parts = [prefix[i : i + 1], ctx[i : i + 1, :half], class_i, ctx[i : i + 1, half:], rest_i]
            else:  # front
                parts = [prefix[i : i + 1], class_i, ctx[i : i + 1], rest_i]
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows, dim=0)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, classes={self.num_classes}, n_ctx={self.n_ctx}, "
            f"position={self.class_token_position}, class_specific={self.class_specific}"
        )
