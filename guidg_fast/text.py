"""encode_expert_prompts: (K, C, D) normalised text features of all experts in one shared-prefix pass.

The reference runs one full 77-token text pass per expert. This pass computes the same features
with three exact identities of a causal text tower (docs/guidg_math.md, "Exact shortcuts" 1-3):

1. EOT truncation: a class's feature depends only on its tokens 0..EOT, so every token after its
   own EOT is dropped. Classes are grouped by their suffix length (one group per distinct EOT
   position) and all groups are packed into one token matrix, so no padding is computed at all.
2. Shared prefix: the first P prompt tokens are the same for every class of expert k
   (``learner.shared_prefix_length()``: [SOS, ctx_k] for ``end``, SOS + first half of ctx_k for
   ``middle``, SOS only for ``front`` and class-specific contexts). Their hidden states and the
   keys/values of every layer are computed once per expert (prefix pass: K x P tokens). Each class
   suffix (positions P..EOT) attends to its expert's prefix keys/values and causally to itself
   (``ops.prefix_attention``).
3. All K experts run together: the dense layers (QKV, out_proj, MLP) are single torch matmuls over
   the suffix tokens of all experts and classes; in the last layer only the EOT rows go through
   out_proj and the MLP, and only they go through ln_final, the projection and the normalisation
   (``ops.eot_project``).

Backend: the pass follows ``prefix_attention`` (``guidg-fast info`` lists it under
``encode_expert_prompts``): each fused op picks its own backend (Triton, C++/CUDA extension, or its
eager math when no kernel can run -- the pass stays exact and shared-prefix either way). Forcing
``eager`` (GUIDG_FAST_BACKEND=eager or ``ops.use_backend("eager")``) routes the whole call to
``reference.encode_expert_prompts``, the official full-length loop.

Supported text towers: open_clip's standard causal tower with ``ResidualAttentionBlock``
(``nn.MultiheadAttention`` without bias_k/bias_v/add_zero_attn) or ``CustomResidualAttentionBlock``
(qk_norm, scale_heads, scale_attn_inner, scale_attn, scale_fc, layer scale, QuickGELU or GELU), any
width/head count. Anything else -- scaled cosine attention, an unknown block type, active dropout in
training mode, a non-causal mask -- falls back to the reference (which runs the tower's own forward)
with a one-time RuntimeWarning naming the reason; ``fast_path_unsupported_reason(model)`` tells it
without running anything.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops, reference
from .backbone import text_tower
from .ops import _backend

# the pass has no kernel of its own: it runs where prefix_attention's fused kernels run
_PREFIX_SPEC = _backend.REGISTRY["prefix_attention"]
SPEC = _backend.register(
    _backend.OpSpec(
        "encode_expert_prompts",
        ext_ops=tuple(_PREFIX_SPEC.ext_ops),
        triton=bool(_PREFIX_SPEC.triton),
        notes={"follows": "prefix_attention"},
    )
)
_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------
# Which towers the pass can run


def _dropout_active(module: nn.Module) -> bool:
    if not module.training:
        return False
    for m in module.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            return True
        if isinstance(m, nn.MultiheadAttention) and m.dropout > 0:
            return True
    return False


def _block_unsupported_reason(block: nn.Module) -> str | None:
    from open_clip.transformer import Attention, CustomResidualAttentionBlock, ResidualAttentionBlock

    if type(block) is ResidualAttentionBlock:
        if hasattr(block, "ln_1_kv"):
            return "cross-attention blocks (ln_1_kv) are not a causal text tower"
        attn = block.attn
        if not isinstance(attn, nn.MultiheadAttention):
            return f"attention module {type(attn).__name__} is not nn.MultiheadAttention"
        if not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
            return "nn.MultiheadAttention with separate kdim/vdim projections"
        if attn.bias_k is not None or attn.bias_v is not None or attn.add_zero_attn:
            return "nn.MultiheadAttention with bias_k/bias_v/add_zero_attn"
    elif type(block) is CustomResidualAttentionBlock:
        attn = block.attn
        if type(attn) is not Attention:
            return f"attention module {type(attn).__name__} is not open_clip's Attention"
        if attn.scaled_cosine:
            return "scaled cosine attention"
    else:
        return f"unknown residual block type {type(block).__name__}"
    if _dropout_active(block):
        return "dropout is active (training mode with p > 0)"
    return None


def _mask_is_causal(mask: torch.Tensor, length: int) -> bool:
    if mask.dim() != 2 or mask.shape[0] < length or mask.shape[1] < length:
        return False
    m = mask[:length, :length]
    upper = torch.ones(length, length, dtype=torch.bool, device=m.device).triu(1)
    if m.dtype == torch.bool:
        return bool(torch.equal(m, upper))
    return bool(torch.isneginf(m[upper]).all() and (m[~upper] == 0).all())


def fast_path_unsupported_reason(model) -> str | None:
    """Why the shared-prefix pass cannot run this model's text tower (None: it can)."""
    tower = text_tower(model)
    blocks = getattr(tower.transformer, "resblocks", None)
    if blocks is None or len(blocks) == 0:
        return f"text transformer {type(tower.transformer).__name__} has no resblocks"
    for i, block in enumerate(blocks):
        reason = _block_unsupported_reason(block)
        if reason is not None:
            return f"text block {i}: {reason}"
    if not _mask_is_causal(tower.attn_mask, tower.context_length):
        return "the text attn_mask is not the standard causal mask"
    return None


# ----------------------------------------------------------------------------------------------
# One residual block, split into what the pass needs


@dataclass
class _Block:
    """Per-token pieces of a residual block around its attention core."""

    block: nn.Module
    custom: bool
    heads: int
    head_dim: int
    scale: float

    @classmethod
    def wrap(cls, block: nn.Module) -> "_Block":
        attn = block.attn
        custom = not isinstance(attn, nn.MultiheadAttention)
        width = attn.in_proj_weight.shape[1]
        heads = attn.num_heads
        head_dim = width // heads
        scale = float(attn.scale) if custom else head_dim ** -0.5
        return cls(block, custom, heads, head_dim, scale)

    def packed_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """ln_1 and the QKV projection of tokens x (..., W) -> (..., 3, H, Dh), one GEMM for all three
        (no per-head q / k norm: only for blocks where ``custom`` is False)."""
        attn = self.block.attn
        qkv = F.linear(self.block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        return qkv.view(x.shape[:-1] + (3, self.heads, self.head_dim))

    def qkv(self, x: torch.Tensor):
        """ln_1 and the QKV projection of tokens x (..., W) -> q, k, v (..., H, Dh).

        One GEMM for all three; q, k, v are strided views of its output (the attention kernels
        take any strides with a unit last stride).
        """
        attn = self.block.attn
        h = self.block.ln_1(x)
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(x.shape[:-1] + (3, self.heads, self.head_dim)).unbind(-3)
        if self.custom:  # qk_norm (Identity when off) acts per head on the last dim
            q, k = attn.ln_q(q), attn.ln_k(k)
        return q, k, v

    def attention_residual(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """x + ls_1(out_proj(attention output o (..., H, Dh))), as the block does it."""
        attn = self.block.attn
        if self.custom and attn.head_scale is not None:
            o = o * attn.head_scale.view(self.heads, 1).to(o.dtype)
        o = o.reshape(o.shape[:-2] + (self.heads * self.head_dim,))
        if self.custom:
            o = attn.out_drop(attn.out_proj(attn.ln_inner(o)))
            o = self.block.ln_attn(o)
        else:
            o = attn.out_proj(o)
        return x + self.block.ls_1(o)

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block.ls_2(self.block.mlp(self.block.ln_2(x)))


# ----------------------------------------------------------------------------------------------
# The token plan of one learner (indices only; rebuilt when the learner's layout changes)


@dataclass
class _Plan:
    P: int  # shared prefix length
    suffix_columns: int  # token_suffix columns any suffix reads
    suffix_reads_context: bool  # whether any suffix token is a context token
    prefix_rows: torch.Tensor  # (K, P) rows of the token bank
    token_rows: torch.Tensor  # (T,) bank row of each packed suffix token
    token_positions: torch.Tensor  # (T,) position of each packed suffix token
    groups: list  # (first packed token, classes in group, suffix length S) per group
    eot_tokens: torch.Tensor  # (K*C,) packed token of each EOT, in packed (group, k, class) order
    output_order: torch.Tensor  # (K*C,) packed EOT of (k, c), row-major over (K, C)


def _build_plan(learner, device) -> _Plan:
    K, C, n = learner.num_experts, learner.num_classes, learner.n_ctx
    source, index = learner.prompt_layout()
    source, index = source.cpu(), index.cpu()
    eot = learner.tokenized_prompts.argmax(dim=-1).cpu()
    P = learner.shared_prefix_length()
    # the prefix must be identical for all classes (token_prefix values are checked per call)
    if not (torch.equal(source[:, :P], source[:1, :P].expand(C, P)) and torch.equal(index[:, :P], index[:1, :P].expand(C, P))):
        raise AssertionError("prompt layout has no shared prefix of the expected length")  # layout bug
    if int(eot.min()) < P:
        raise ValueError(f"a prompt ends (EOT at {int(eot.min())}) inside the shared prefix of {P} tokens")
    is_suffix = source == learner.SUFFIX
    used = torch.arange(source.shape[1]).unsqueeze(0) <= eot.unsqueeze(1)
    suffix_columns = int(index[is_suffix & used].max()) + 1 if bool((is_suffix & used).any()) else 1
    suffix_base = C
    ctx_base = C + C * suffix_columns

    def bank_rows(k: int, c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        src, idx = source[c, t], index[c, t]
        ctx_row = (k * C + c) * n + idx if learner.class_specific else k * n + idx
        return torch.where(
            src == learner.PREFIX, c, torch.where(src == learner.SUFFIX, suffix_base + c * suffix_columns + idx, ctx_base + ctx_row)
        )

    t_prefix = torch.arange(P)
    c0 = torch.zeros(P, dtype=torch.int64)
    prefix_rows = torch.stack([bank_rows(k, c0, t_prefix) for k in range(K)])

    lengths = eot - P + 1  # suffix tokens of each class, EOT included
    token_rows, token_positions, groups, eot_tokens, eot_key = [], [], [], [], []
    start = 0
    for S in sorted(set(lengths.tolist())):
        classes = torch.nonzero(lengths == S).flatten()
        Cg = classes.numel()
        t = P + torch.arange(S)
        cc = classes.view(Cg, 1).expand(Cg, S)
        tt = t.view(1, S).expand(Cg, S)
        for k in range(K):
            token_rows.append(bank_rows(k, cc, tt).flatten())
            token_positions.append(tt.flatten())
            eot_tokens.append(start + (k * Cg + torch.arange(Cg)) * S + S - 1)
            eot_key.append(k * C + classes)
        groups.append((start, Cg, S))
        start += K * Cg * S
    eot_key = torch.cat(eot_key)
    output_order = torch.empty_like(eot_key)
    output_order[eot_key] = torch.arange(eot_key.numel())
    to = dict(device=device)
    return _Plan(
        P=P,
        suffix_columns=suffix_columns,
        suffix_reads_context=bool((torch.cat(token_rows) >= ctx_base).any()),
        prefix_rows=prefix_rows.to(**to),
        token_rows=torch.cat(token_rows).to(**to),
        token_positions=torch.cat(token_positions).to(**to),
        groups=groups,
        eot_tokens=torch.cat(eot_tokens).to(**to),
        output_order=output_order.to(**to),
    )


def _plan(learner, device) -> _Plan:
    tokens = learner.tokenized_prompts
    key = (
        str(device), tokens.data_ptr(), tokens._version, tuple(learner.ctx.shape), learner.class_token_position,
        learner.class_specific, learner.n_ctx, tuple(learner.name_lens), learner.num_experts,
    )
    cached = getattr(learner, "_shared_prefix_plan", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = _build_plan(learner, device)
    object.__setattr__(learner, "_shared_prefix_plan", (key, plan))  # plain attribute, not a buffer
    return plan


# ----------------------------------------------------------------------------------------------
# The pass


def _eot_head(tower, x: torch.Tensor) -> torch.Tensor:
    """ln_final + projection + L2 normalisation of the EOT rows x (N, W) -> (N, D)."""
    ln, proj = tower.ln_final, tower.text_projection
    ln_ok = (
        isinstance(ln, nn.LayerNorm) and ln.elementwise_affine and ln.bias is not None
        and tuple(ln.normalized_shape) == (x.shape[-1],)
    )
    if isinstance(proj, nn.Linear) and proj.bias is None:
        proj = proj.weight.t()
    if ln_ok and isinstance(proj, torch.Tensor) and proj.dim() == 2:
        eot = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        return ops.eot_project(x.unsqueeze(1), eot, ln.weight, ln.bias, proj, eps=ln.eps)
    # projection with a bias, no projection, or another final norm: the same math in plain torch
    y = tower.project(tower.ln_final(x))
    return y / y.norm(dim=-1, keepdim=True)


def shared_prefix_encode(model, learner) -> torch.Tensor:
    """The shared-prefix pass itself (no backend routing): (K, C, D) normalised features."""
    tower = text_tower(model)
    blocks = [_Block.wrap(b) for b in tower.transformer.resblocks]
    ctx = learner.ctx
    K, C, W = learner.num_experts, learner.num_classes, tower.width
    plan = _plan(learner, ctx.device)
    P = plan.P
    prefix_buf = learner.token_prefix
    if not torch.equal(prefix_buf, prefix_buf[:1].expand_as(prefix_buf)):
        raise ValueError("learner.token_prefix rows differ between classes: the SOS prefix is not shared")
    frozen = torch.cat([prefix_buf[:, 0], learner.token_suffix[:, : plan.suffix_columns].reshape(-1, W)])
    bank = torch.cat([frozen, ctx.reshape(-1, W)])  # rows: SOS per class, suffix tokens, context tokens
    pos = tower.positional_embedding.to(bank.dtype)

    # prefix pass: K sequences of P tokens, causal; keeps every layer's keys/values
    xp = bank[plan.prefix_rows] + pos[:P]  # (K, P, W)
    prefix_kv = []
    for i, blk in enumerate(blocks):
        q, k, v = blk.qkv(xp)  # (K, P, H, Dh)
        prefix_kv.append((k, v))
        if i == len(blocks) - 1:
            break  # the last layer's prefix outputs are never read
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=blk.scale
        ).transpose(1, 2)
        xp = blk.mlp_residual(blk.attention_residual(xp, o))

    # suffix pass: all groups of all experts packed in one (T, W) token matrix. Suffixes without
    # context tokens (``end``, generic ctx) read only frozen rows: gathering them from the frozen
    # part of the bank keeps autograd from back-propagating into those inputs at all.
    source = bank if plan.suffix_reads_context else frozen
    x = source.index_select(0, plan.token_rows) + pos.index_select(0, plan.token_positions)
    last = len(blocks) - 1
    for i, blk in enumerate(blocks):
        kp, vp = prefix_kv[i]
        # every group in one call; blocks with per-head q / k norms stack their normalised q, k, v first
        qkv = blk.packed_qkv(x) if not blk.custom else torch.stack(blk.qkv(x), dim=1)  # (T, 3, H, Dh)
        o = ops.prefix_attention_packed(qkv, kp, vp, plan.groups, scale=blk.scale)
        if i == last:  # only the EOT rows feed the output
            x, o = x.index_select(0, plan.eot_tokens), o.index_select(0, plan.eot_tokens)
        x = blk.mlp_residual(blk.attention_residual(x, o))

    features = _eot_head(tower, x)  # (K*C, D) in packed order
    return features.index_select(0, plan.output_order).view(K, C, -1)


def _check_learner_ctx(learner) -> None:
    # the shared-prefix plan indexes ctx rows by (expert, class, token): a ctx of another shape
    # would be read from the wrong rows instead of failing
    ctx = getattr(learner, "ctx", None)
    if not isinstance(ctx, torch.Tensor):
        raise ValueError(f"learner.ctx must be a tensor, got {type(ctx).__name__}")
    K, C, n = learner.num_experts, learner.num_classes, learner.n_ctx
    W = learner.token_prefix.shape[-1]
    expected = (K, C, n, W) if learner.class_specific else (K, n, W)
    if tuple(ctx.shape) != expected:
        meaning = "K experts, C classes, n_ctx tokens, width" if learner.class_specific else "K experts, n_ctx tokens, width"
        raise ValueError(f"learner.ctx must have shape {expected} ({meaning}), got {tuple(ctx.shape)}")


def encode_expert_prompts(model, learner) -> torch.Tensor:
    """(K, C, D) normalised text features of all experts, differentiable w.r.t. ``learner.ctx``."""
    _check_learner_ctx(learner)
    forced = _backend.forced_backend()
    if forced is not None:
        _backend.choose("encode_expert_prompts", learner.ctx.device)  # a forced backend that cannot run raises
    if forced == "eager":
        return reference.encode_expert_prompts(model, learner)
    reason = fast_path_unsupported_reason(model)
    if reason is not None:
        _warn_once(
            reason,
            f"encode_expert_prompts: the shared-prefix pass cannot run this text tower ({reason}); "
            "falling back to the reference (one full-length pass per expert)",
        )
        return reference.encode_expert_prompts(model, learner)
    return shared_prefix_encode(model, learner)
