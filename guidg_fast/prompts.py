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

    def prompt_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each token of the full-length prompts comes from, without building them.

        Returns ``(source, index)``, two int64 tensors of shape (C, L): ``prompts(k)[c, t]`` is
        ``token_prefix[c, index]`` when ``source[c, t] == PREFIX``, ``token_suffix[c, index]`` when
        it is ``SUFFIX``, and ``expert_context(k)[c, index]`` (row ``index`` of expert k's context)
        when it is ``CONTEXT``. Same layout as ``prompts`` (official PromptLearner), for every expert.
        """
        C, L, n = self.num_classes, self.tokenized_prompts.shape[1], self.n_ctx
        device = self.tokenized_prompts.device
        t = torch.arange(L, device=device).unsqueeze(0).expand(C, L)
        name_len = torch.tensor(self.name_lens, dtype=torch.int64, device=device).unsqueeze(1)
        # clamp as slicing does when a name fills the suffix (only with over-long, truncated prompts)
        name_len = name_len.clamp(max=self.token_suffix.shape[1])
        source = torch.full((C, L), self.SUFFIX, dtype=torch.int64, device=device)
        index = t - 1 - n  # suffix rows after the context and the class tokens, in every position
        source[:, 0], index[:, 0] = self.PREFIX, 0
        if self.class_token_position == "end":
            in_ctx = (t >= 1) & (t <= n)
            ctx_index = t - 1
        elif self.class_token_position == "middle":
            half = n // 2
            first = (t >= 1) & (t <= half)
            in_class = (t > half) & (t <= half + name_len)
            second = (t > half + name_len) & (t <= n + name_len)
            in_ctx = first | second
            ctx_index = torch.where(first, t - 1, t - 1 - name_len)
            index = torch.where(in_class, t - 1 - half, index)
        else:  # front
            in_class = (t >= 1) & (t <= name_len)
            in_ctx = (t > name_len) & (t <= n + name_len)
            ctx_index = t - 1 - name_len
            index = torch.where(in_class, t - 1, index)
        source = torch.where(in_ctx, torch.full_like(source, self.CONTEXT), source)
        index = torch.where(in_ctx, ctx_index, index)
        return source, index

    def shared_prefix_length(self) -> int:
        """P: leading prompt tokens equal for every class of one expert (SOS + any context before the class).

        ``end`` with a generic context: [SOS, ctx] (1 + n_ctx); ``middle``: SOS + first half of ctx;
        ``front`` and class-specific contexts: SOS only.
        """
        if self.class_specific or self.class_token_position == "front":
            return 1
        if self.class_token_position == "middle":
            return 1 + self.n_ctx // 2
        return 1 + self.n_ctx

    PREFIX, SUFFIX, CONTEXT = 0, 1, 2

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, classes={self.num_classes}, n_ctx={self.n_ctx}, "
            f"position={self.class_token_position}, class_specific={self.class_specific}"
        )
