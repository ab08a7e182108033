"""Triton kernels for cmattn: the fused score / softmax-over-experts / mean-over-heads step of
GuiDG's cross-modal attention. No autograd here (see guidg_fast/ops/cmattn.py).

q (B, H, D) holds every head's v-projection, keys (K, H, D) every head's pooled expert key. The
math (torch cosine_similarity semantics, eps = 1e-8, clamp outside autograd) is written out in
csrc/include/cmattn.h; these kernels follow it step by step.

One launch per direction for all heads and experts:
  forward : a program per block of BLOCK_B samples walks every head; out (B, K)
  backward: a program per (head, D-block) walks the whole batch, recomputing the scores of each
            batch block (they need the full D) and writing its slice of dq and dkey; dkey sums over
            the batch inside one program, so there are no atomics and the result is deterministic.
Scores use row products rather than tl.dot: K is tiny (one expert per source domain), so a
16-wide padded dot would waste most of its work, and fp32 stays exact (no tf32). Experts are walked
one at a time with 2-D tiles only: a 3-D broadcast-and-reduce version passed in the interpreter
but doubled dq on an H200 (triton 3.6) once the batch block reached 16 rows.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import new_output

COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    # IEEE-rounded square root, like torch's; sqrt_rn is fp32-only, fp64 sqrt is always rounded
    if ACC == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _row_scores(q_ptr, key_ptr, h, rb, mask_b, rk, rd, K, H, D,
                COSINE: tl.constexpr, SQRT_D: tl.constexpr, EPS: tl.constexpr, BLOCK_B: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """Scores (BLOCK_B, BLOCK_K) of head h, with the dots, ||q|| and ||key|| they came from.

    Only 2-D tiles: the experts are walked one by one (K is tiny) and each expert's dot column is
    placed with a select, so no 3-D broadcast-and-reduce is left for the compiler to lay out.
    """
    dot = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
    q_sq = tl.zeros((BLOCK_B,), dtype=ACC)
    k_sq = tl.zeros((BLOCK_K,), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + rd
        mask_d = cols < D
        q = tl.load(q_ptr + (rb[:, None] * H + h) * D + cols[None, :],
                    mask=mask_b[:, None] & mask_d[None, :], other=0.0).to(ACC)
        q_sq += tl.sum(q * q, axis=1)
        for k in tl.static_range(BLOCK_K):
            key_k = tl.load(key_ptr + (k * H + h) * D + cols, mask=mask_d & (k < K), other=0.0).to(ACC)
            dot += tl.where(rk[None, :] == k, tl.sum(q * key_k[None, :], axis=1)[:, None], 0.0)
            k_sq += tl.where(rk == k, tl.sum(key_k * key_k, axis=0), 0.0)
    q_norm = _sqrt(q_sq, ACC)
    k_norm = _sqrt(k_sq, ACC)
    if COSINE:
        s = dot / (tl.maximum(q_norm, EPS)[:, None] * tl.maximum(k_norm, EPS)[None, :])
    else:
        s = dot / SQRT_D
    return s, dot, q_norm, k_norm


@triton.jit
def _softmax_experts(s, mask_k):
    s = tl.where(mask_k[None, :], s, float("-inf"))
    e = tl.exp(s - tl.max(s, axis=1)[:, None])
    e = tl.where(mask_k[None, :], e, 0.0)
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _cmattn_forward_kernel(q_ptr, key_ptr, out_ptr, B, K, H, D,
                           COSINE: tl.constexpr, SQRT_D: tl.constexpr, EPS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rk = tl.arange(0, BLOCK_K)
    rd = tl.arange(0, BLOCK_D)
    mask_b = rb < B
    mask_k = rk < K
    acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC)
    for h in range(0, H):
        s, dot, q_norm, k_norm = _row_scores(q_ptr, key_ptr, h, rb, mask_b, rk, rd, K, H, D,
                                             COSINE, SQRT_D, EPS, BLOCK_B, BLOCK_K, BLOCK_D, ACC)
        acc += _softmax_experts(s, mask_k)
    out = acc / H
    tl.store(out_ptr + rb[:, None] * K + rk[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask_b[:, None] & mask_k[None, :])


@triton.jit
def _cmattn_backward_kernel(grad_ptr, q_ptr, key_ptr, dq_ptr, dkey_ptr, B, K, H, D,
                            COSINE: tl.constexpr, SQRT_D: tl.constexpr, EPS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    h = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = cols < D
    rk = tl.arange(0, BLOCK_K)
    rd = tl.arange(0, BLOCK_D)
    mask_k = rk < K
    key_chunk = tl.load(key_ptr + (rk[:, None] * H + h) * D + cols[None, :],
                        mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(ACC)
    dkey = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
    key_term = tl.zeros((BLOCK_K,), dtype=ACC)  # sum_b ds dot / max(||q||, eps)
    k_norm = tl.zeros((BLOCK_K,), dtype=ACC)
    for b0 in range(0, B, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)
        mask_b = rb < B
        s, dot, q_norm, k_norm = _row_scores(q_ptr, key_ptr, h, rb, mask_b, rk, rd, K, H, D,
                                             COSINE, SQRT_D, EPS, BLOCK_B, BLOCK_K, BLOCK_D, ACC)
        a = _softmax_experts(s, mask_k)
        g = tl.load(grad_ptr + rb[:, None] * K + rk[None, :], mask=mask_b[:, None] & mask_k[None, :],
                    other=0.0).to(ACC) / H
        ds = a * (g - tl.sum(a * g, axis=1)[:, None])
        q_chunk = tl.load(q_ptr + (rb[:, None] * H + h) * D + cols[None, :],
                          mask=mask_b[:, None] & mask_d[None, :], other=0.0).to(ACC)
        if COSINE:
            mq = tl.maximum(q_norm, EPS)
            mk = tl.maximum(k_norm, EPS)
            coef = ds / (mq[:, None] * mk[None, :])
            inv_nq = tl.where(q_norm == 0.0, 0.0, 1.0 / tl.where(q_norm == 0.0, 1.0, q_norm))
            q_weight = -tl.sum(ds * dot / mk[None, :], axis=1) / (mq * mq) * inv_nq
            key_term += tl.sum(ds * dot / mq[:, None], axis=0)
            dq = q_weight[:, None] * q_chunk
        else:
            coef = ds / SQRT_D
            dq = tl.zeros((BLOCK_B, BLOCK_D), dtype=ACC)
        # dq += coef @ key, dkey += coef^T @ q, one expert at a time (2-D tiles only)
        for k in tl.static_range(BLOCK_K):
            sel = rk == k
            coef_k = tl.sum(tl.where(sel[None, :], coef, 0.0), axis=1)
            key_k = tl.sum(tl.where(sel[:, None], key_chunk, 0.0), axis=0)
            dq += coef_k[:, None] * key_k[None, :]
            dkey += tl.where(sel[:, None], tl.sum(coef_k[:, None] * q_chunk, axis=0)[None, :], 0.0)
        tl.store(dq_ptr + (rb[:, None] * H + h) * D + cols[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=mask_b[:, None] & mask_d[None, :])
    if COSINE:
        mk = tl.maximum(k_norm, EPS)
        inv_nk = tl.where(k_norm == 0.0, 0.0, 1.0 / tl.where(k_norm == 0.0, 1.0, k_norm))
        dkey += (-key_term / (mk * mk) * inv_nk)[:, None] * key_chunk
    tl.store(dkey_ptr + (rk[:, None] * H + h) * D + cols[None, :], dkey.to(dkey_ptr.dtype.element_ty),
             mask=mask_k[:, None] & mask_d[None, :])


def _blocks(B: int, K: int, D: int) -> tuple[int, int, int]:
    """One pinned config: BLOCK_K covers every expert, BLOCK_D <= 128, BLOCK_B <= 16 rows."""
    block_k = max(2, triton.next_power_of_2(K))
    block_d = max(16, min(128, triton.next_power_of_2(D)))
    block_b = max(1, min(16, triton.next_power_of_2(B)))
    return block_b, block_k, block_d


def _check(q: torch.Tensor, keys: torch.Tensor) -> None:
    if q.dim() != 3 or keys.dim() != 3 or keys.shape[1:] != q.shape[1:]:
        raise ValueError(f"q must be (B, H, D) and keys (K, H, D), got {tuple(q.shape)} and {tuple(keys.shape)}")
    if not (q.is_contiguous() and keys.is_contiguous()):
        raise ValueError("q and keys must be contiguous")
    if q.dtype not in (torch.float32, torch.float64) or keys.dtype != q.dtype:
        raise ValueError(f"q and keys must share a float32/float64 dtype, got {q.dtype} and {keys.dtype}")


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def cmattn_forward(q: torch.Tensor, keys: torch.Tensor, cosine: bool) -> torch.Tensor:
    """out (B, K) = mean_h softmax_k(score(q[:, h], keys[k, h]))."""
    _check(q, keys)
    B, H, D = q.shape
    K = keys.shape[0]
    out = new_output((B, K), q)
    block_b, block_k, block_d = _blocks(B, K, D)
    _cmattn_forward_kernel[(triton.cdiv(B, block_b),)](
        q, keys, out, B, K, H, D,
        COSINE=bool(cosine), SQRT_D=math.sqrt(D), EPS=COSINE_EPS, BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_D=block_d, ACC=_acc(q.dtype),
        num_warps=4,
    )
    return out


def cmattn_backward(grad_out: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, cosine: bool):
    """(dq (B, H, D), dkey (K, H, D)) for the upstream gradient grad_out (B, K)."""
    _check(q, keys)
    B, H, D = q.shape
    K = keys.shape[0]
    grad_out = grad_out.to(q.dtype).contiguous()
    if tuple(grad_out.shape) != (B, K):
        raise ValueError(f"grad_out must have shape ({B}, {K}) = (B, K), got {tuple(grad_out.shape)}")
    dq = new_output((B, H, D), q)
    dkey = new_output((K, H, D), keys)
    block_b, block_k, block_d = _blocks(B, K, D)
    _cmattn_backward_kernel[(H, triton.cdiv(D, block_d))](
        grad_out, q, keys, dq, dkey, B, K, H, D,
        COSINE=bool(cosine), SQRT_D=math.sqrt(D), EPS=COSINE_EPS, BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_D=block_d, ACC=_acc(q.dtype),
        num_warps=4,
    )
    return dq, dkey
