"""The eager reference: GuiDG's math with the official code's loop structure.

Every function here follows the official TL-UESTC/GuiDG implementation step by step (one expert at
a time, full 77-token text passes, one head at a time, one parameter tensor at a time). It is the
parity oracle for every fast path and the honest baseline for every benchmark, so it must stay
slow in the same places the official code is slow. Signatures match ``guidg_fast.ops``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from . import _checks
from .backbone import text_tower


def encode_expert_prompts(model, learner) -> torch.Tensor:
    """(K, C, D) normalised text features: one full-length text pass per expert, as the official code."""
    tower = text_tower(model)
    tokenized = learner.tokenized_prompts
    eot = tokenized.argmax(dim=-1)
    features = []
    for k in range(learner.num_experts):
        prompts = learner.prompts(k)  # (C, L, W): [SOS, ctx_k, class tokens, '.', EOT, pad...]
        x = prompts + tower.positional_embedding.to(prompts.dtype)
        x = tower.transformer(x, attn_mask=tower.attn_mask)
        x = tower.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        x = tower.project(x)
        features.append(x / x.norm(dim=-1, keepdim=True))
    return torch.stack(features, dim=0)


def _cosine_or_dot(q: torch.Tensor, keys: torch.Tensor, metric: str) -> torch.Tensor:
    # q (B, D), keys (B, K, D) -> (B, K), as the official compute_attn
    B, K, D = keys.shape
    if metric == "cosine":
        return F.cosine_similarity(q.view(B, 1, -1), keys, dim=-1)
    return torch.sum(q.view(B, 1, -1) * keys, dim=-1) / (D ** 0.5)


def cross_modal_attention(f, T, wv, bv, wt, bt, metric: str = "cosine") -> torch.Tensor:
    """Per-sample expert weights (B, K): per head, per expert loops as in the official CMAttn.

    No detaching here: the CrossModalAttention module detaches f and T as the official code does,
    the functional form differentiates through every argument that requires grad.
    """
    B, K, C, D, H = _checks.check_cmattn_params(f, T, wv, bv, wt, bt, metric)
    attns = []
    for h in range(H):
        v_emb = f @ wv[h].t() + bv[h]  # linear_v
        t_emb = []
        for k in range(K):
            t_emb.append(T[k].t() @ wt[h] + bt[h])  # linear_t over classes: (D,)
        t_emb = torch.stack(t_emb, dim=0).repeat(B, 1, 1)  # (B, K, D)
        score = _cosine_or_dot(v_emb, t_emb, metric).softmax(dim=1)
        attns.append(score)
    return torch.stack(attns, dim=-1).mean(dim=-1)


def _entropy_regulariser(logits: torch.Tensor) -> torch.Tensor:
    # official ent_loss: mean_b H(p_b) - H(mean_b p_b), H(p) = -sum p log(p + 1e-5)
    p = logits.softmax(dim=1)
    eps = 1e-5
    mean_entropy = torch.sum(-p * torch.log(p + eps), dim=1).mean()
    p_mean = p.mean(dim=0)
    entropy_of_mean = torch.sum(-p_mean * torch.log(p_mean + eps))
    return mean_entropy - entropy_of_mean


def multi_expert_loss(f, T, y, w, temperature, margin: float = 0.0, entropy_weight: float = 0.0) -> torch.Tensor:
    """sum_k w_k CE(tau (f - margin T_k[y]) T_k^T, y) [+ entropy_weight * sum_k ent_loss], per expert."""
    B, K, C, D = _checks.check_features(f, T)
    _checks.check_labels(y, B, C, f.device)
    y = y.long()  # int32 labels are accepted, as by the fused backends; cross_entropy wants int64
    _checks.check_expert_weights(w, B, K, f)
    tau = _checks.check_temperature(temperature)
    loss = f.new_zeros(())
    for k in range(K):
        f_cur = f.clone()
        if margin != 0.0:
            f_cur = f_cur - margin * T[k][y]
        logits = tau * (f_cur @ T[k].t())
        if w.dim() == 1:
            loss = loss + F.cross_entropy(logits, y) * w[k]
        else:
            loss = loss + (F.cross_entropy(logits, y, reduction="none") * w[:, k]).mean()
        if entropy_weight != 0.0:
            loss = loss + entropy_weight * _entropy_regulariser(logits)
    return loss


def ensemble_logits(f, T, w, temperature) -> torch.Tensor:
    """(B, C) = sum_k w_k * tau * f @ T_k^T, stacked per expert and mixed with einsum (official)."""
    B, K, C, D = _checks.check_features(f, T)
    _checks.check_expert_weights(w, B, K, f)
    tau = _checks.check_temperature(temperature)
    ys = torch.stack([tau * (f @ T[k].t()) for k in range(K)], dim=1)  # (B, K, C)
    weights = w.repeat(B, 1) if w.dim() == 1 else w
    return torch.einsum("bkc,bk->bc", ys, weights)


@torch.no_grad()
def bma_update_(averaged_tensors: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], relative_weight: float) -> None:
    """avg <- (avg + r * theta) / (1 + r), one tensor at a time (official GeneralMovingAverage)."""
    averaged_tensors, tensors = list(averaged_tensors), list(tensors)
    _checks.check_tensor_lists(averaged_tensors, tensors)
    r = float(relative_weight)
    for avg, param in zip(averaged_tensors, tensors):
        avg.copy_((avg + r * param) / (1 + r))
