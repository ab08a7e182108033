"""Triton kernels of ensemble_logits: out (B, C) = tau * sum_k w_k f @ T_k^T.

Batch weights w (K,): the experts collapse to one matrix M = sum_k w_k T_k, built tile by tile in
registers right before the dot, so T is read once and the output is one (B, D) x (D, C) product.
Per-sample weights w (B, K): one product with a reduction of length K * D, whose left operand
w[b, k] * f[b, :] is formed on the fly; no (B, K, C) tensor is ever stored.

Backward (g = dL/d out):
  grad_f = tau * sum_k w_k (g @ T_k)                 one kernel over (B, D) tiles
  grad_T[k] = tau * (w_k * g)^T f                    one kernel over (C, D) tiles
  grad_w[k] = <T_k, tau g^T f>         (batch)       partial sums in the grad_T kernel
  grad_w[b, k] = tau * f[b] . (g @ T_k)[b]  (per-sample)  partial sums in the grad_f kernel
The partial sums (one per tile) are added on the host in a fixed order (deterministic, no atomics).

No autograd here: guidg_fast/ops/ensemble_logits.py wires these into torch.library.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._launch import new_output

# One pinned config (no autotuning): tl.dot needs every dimension >= 16.
_BLOCK_C = 32
_BLOCK_D = 64
_MAX_BLOCK_B = 64


def _block_b(B: int) -> int:
    return max(16, min(_MAX_BLOCK_B, triton.next_power_of_2(B)))


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _ensemble_logits_forward_kernel(
    f_ptr, T_ptr, w_ptr, out_ptr,
    B, K, C, D, tau,
    stride_wb,  # 0 for batch weights
    PER_SAMPLE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_b = offs_b < B
    mask_c = offs_c < C
    acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        f_tile = tl.load(f_ptr + offs_b[:, None] * D + offs_d[None, :],
                         mask=mask_b[:, None] & mask_d[None, :], other=0.0).to(ACC)
        t_mask = mask_c[:, None] & mask_d[None, :]
        t_offs = offs_c[:, None] * D + offs_d[None, :]
        if PER_SAMPLE:
            for k in range(K):
                w_k = tl.load(w_ptr + offs_b * stride_wb + k, mask=mask_b, other=0.0).to(ACC)
                t_tile = tl.load(T_ptr + k * C * D + t_offs, mask=t_mask, other=0.0).to(ACC)
                acc += tl.dot(f_tile * w_k[:, None], tl.trans(t_tile), input_precision="ieee", out_dtype=ACC)
        else:
            mixed = tl.zeros((BLOCK_C, BLOCK_D), dtype=ACC)
            for k in range(K):
                w_k = tl.load(w_ptr + k).to(ACC)
                t_tile = tl.load(T_ptr + k * C * D + t_offs, mask=t_mask, other=0.0).to(ACC)
                mixed += w_k * t_tile
            acc += tl.dot(f_tile, tl.trans(mixed), input_precision="ieee", out_dtype=ACC)
    acc = acc * tau
    tl.store(out_ptr + offs_b[:, None] * C + offs_c[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_b[:, None] & mask_c[None, :])


@triton.jit
def _ensemble_logits_backward_kernel(
    g_ptr, f_ptr, T_ptr, w_ptr, grad_f_ptr, grad_w_part_ptr,
    B, K, C, D, tau,
    stride_wb,
    PER_SAMPLE: tl.constexpr, STORE_F: tl.constexpr, STORE_W: tl.constexpr, ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grad_f tile (BLOCK_B, BLOCK_D) = tau * sum_k w_k (g @ T_k); per-sample mode also writes the
    partial grad_w[b, k] of this D tile into grad_w_part (num_d_tiles, B, K)."""
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_b = offs_b < B
    mask_d = offs_d < D
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=ACC)
    if PER_SAMPLE:
        f_tile = tl.load(f_ptr + offs_b[:, None] * D + offs_d[None, :],
                         mask=mask_b[:, None] & mask_d[None, :], other=0.0).to(ACC)
        for k in range(K):
            h = tl.zeros((BLOCK_B, BLOCK_D), dtype=ACC)  # (g @ T_k) on this tile
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                mask_c = offs_c < C
                g_tile = tl.load(g_ptr + offs_b[:, None] * C + offs_c[None, :],
                                 mask=mask_b[:, None] & mask_c[None, :], other=0.0).to(ACC)
                t_tile = tl.load(T_ptr + k * C * D + offs_c[:, None] * D + offs_d[None, :],
                                 mask=mask_c[:, None] & mask_d[None, :], other=0.0).to(ACC)
                h += tl.dot(g_tile, t_tile, input_precision="ieee", out_dtype=ACC)
            w_k = tl.load(w_ptr + offs_b * stride_wb + k, mask=mask_b, other=0.0).to(ACC)
            acc += w_k[:, None] * h
            if STORE_W:
                part = tl.sum(f_tile * h, axis=1) * tau
                tl.store(grad_w_part_ptr + (pid_d * B + offs_b) * K + k, part.to(grad_w_part_ptr.dtype.element_ty), mask=mask_b)
    else:
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            g_tile = tl.load(g_ptr + offs_b[:, None] * C + offs_c[None, :],
                             mask=mask_b[:, None] & mask_c[None, :], other=0.0).to(ACC)
            t_offs = offs_c[:, None] * D + offs_d[None, :]
            t_mask = mask_c[:, None] & mask_d[None, :]
            mixed = tl.zeros((BLOCK_C, BLOCK_D), dtype=ACC)
            for k in range(K):
                w_k = tl.load(w_ptr + k).to(ACC)
                mixed += w_k * tl.load(T_ptr + k * C * D + t_offs, mask=t_mask, other=0.0).to(ACC)
            acc += tl.dot(g_tile, mixed, input_precision="ieee", out_dtype=ACC)
    if STORE_F:
        acc = acc * tau
        tl.store(grad_f_ptr + offs_b[:, None] * D + offs_d[None, :], acc.to(grad_f_ptr.dtype.element_ty),
                 mask=mask_b[:, None] & mask_d[None, :])


@triton.jit
def _ensemble_logits_backward_T_kernel(
    g_ptr, f_ptr, T_ptr, w_ptr, grad_T_ptr, grad_w_part_ptr,
    B, K, C, D, tau,
    stride_wb,
    PER_SAMPLE: tl.constexpr, STORE_T: tl.constexpr, STORE_W: tl.constexpr, ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grad_T[k] tile (BLOCK_C, BLOCK_D) = tau * (w_k * g)^T f; batch mode also writes this tile's
    partial grad_w[k] = <T_k, tau g^T f> into grad_w_part (num_tiles, K)."""
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    tile = pid_c * tl.num_programs(1) + pid_d
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_c = offs_c < C
    mask_d = offs_d < D
    t_offs = offs_c[:, None] * D + offs_d[None, :]
    t_mask = mask_c[:, None] & mask_d[None, :]
    if PER_SAMPLE:
        for k in range(K):
            acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=ACC)
            for b0 in range(0, B, BLOCK_B):
                offs_b = b0 + tl.arange(0, BLOCK_B)
                mask_b = offs_b < B
                g_tile = tl.load(g_ptr + offs_b[:, None] * C + offs_c[None, :],
                                 mask=mask_b[:, None] & mask_c[None, :], other=0.0).to(ACC)
                f_tile = tl.load(f_ptr + offs_b[:, None] * D + offs_d[None, :],
                                 mask=mask_b[:, None] & mask_d[None, :], other=0.0).to(ACC)
                w_k = tl.load(w_ptr + offs_b * stride_wb + k, mask=mask_b, other=0.0).to(ACC)
                acc += tl.dot(tl.trans(g_tile * w_k[:, None]), f_tile, input_precision="ieee", out_dtype=ACC)
            acc = acc * tau
            tl.store(grad_T_ptr + k * C * D + t_offs, acc.to(grad_T_ptr.dtype.element_ty), mask=t_mask)
    else:
        acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=ACC)  # tau * g^T f on this tile
        for b0 in range(0, B, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            mask_b = offs_b < B
            g_tile = tl.load(g_ptr + offs_b[:, None] * C + offs_c[None, :],
                             mask=mask_b[:, None] & mask_c[None, :], other=0.0).to(ACC)
            f_tile = tl.load(f_ptr + offs_b[:, None] * D + offs_d[None, :],
                             mask=mask_b[:, None] & mask_d[None, :], other=0.0).to(ACC)
            acc += tl.dot(tl.trans(g_tile), f_tile, input_precision="ieee", out_dtype=ACC)
        acc = acc * tau
        for k in range(K):
            w_k = tl.load(w_ptr + k).to(ACC)
            if STORE_T:
                tl.store(grad_T_ptr + k * C * D + t_offs, (w_k * acc).to(grad_T_ptr.dtype.element_ty), mask=t_mask)
            if STORE_W:
                t_tile = tl.load(T_ptr + k * C * D + t_offs, mask=t_mask, other=0.0).to(ACC)
                part = tl.sum(tl.sum(t_tile * acc, axis=1), axis=0)
                tl.store(grad_w_part_ptr + tile * K + k, part.to(grad_w_part_ptr.dtype.element_ty))


def _grid_dims(B, C, D):
    block_b = _block_b(B)
    return block_b, triton.cdiv(B, block_b), triton.cdiv(C, _BLOCK_C), triton.cdiv(D, _BLOCK_D)


def ensemble_logits_forward(f: torch.Tensor, T: torch.Tensor, w: torch.Tensor, temperature: float) -> torch.Tensor:
    """f (B, D), T (K, C, D), w (K,) or (B, K), all contiguous, one dtype -> (B, C)."""
    B, D = f.shape
    K, C, _ = T.shape
    per_sample = w.dim() == 2
    out = new_output((B, C), f)
    block_b, n_b, n_c, _ = _grid_dims(B, C, D)
    _ensemble_logits_forward_kernel[(n_b, n_c)](
        f, T, w, out, B, K, C, D, float(temperature), K if per_sample else 0,
        PER_SAMPLE=per_sample, ACC=_acc_dtype(f.dtype),
        BLOCK_B=block_b, BLOCK_C=_BLOCK_C, BLOCK_D=_BLOCK_D,
    )
    return out


def ensemble_logits_backward(grad: torch.Tensor, f: torch.Tensor, T: torch.Tensor, w: torch.Tensor,
                             temperature: float, need_f: bool = True, need_T: bool = True, need_w: bool = True):
    """(grad_f, grad_T, grad_w); a gradient that is not needed comes back as None."""
    B, D = f.shape
    K, C, _ = T.shape
    per_sample = w.dim() == 2
    tau = float(temperature)
    acc = _acc_dtype(f.dtype)
    block_b, n_b, n_c, n_d = _grid_dims(B, C, D)
    stride_wb = K if per_sample else 0
    grad_f = grad_T = grad_w = None
    # per-sample grad_w comes out of the grad_f kernel, batch grad_w out of the grad_T kernel
    run_f = need_f or (need_w and per_sample)
    run_T = need_T or (need_w and not per_sample)
    if run_f:
        grad_f = new_output((B, D), f) if need_f else f.new_empty(0)
        part = (new_output((n_d, B, K), f) if need_w and per_sample else f.new_empty(0))
        _ensemble_logits_backward_kernel[(n_b, n_d)](
            grad, f, T, w, grad_f, part, B, K, C, D, tau, stride_wb,
            PER_SAMPLE=per_sample, STORE_F=need_f, STORE_W=need_w and per_sample, ACC=acc,
            BLOCK_B=block_b, BLOCK_C=_BLOCK_C, BLOCK_D=_BLOCK_D,
        )
        if need_w and per_sample:
            grad_w = part.sum(0)
        if not need_f:
            grad_f = None
    if run_T:
        grad_T = new_output((K, C, D), T) if need_T else T.new_empty(0)
        part = new_output((n_c * n_d, K), f) if need_w and not per_sample else f.new_empty(0)
        _ensemble_logits_backward_T_kernel[(n_c, n_d)](
            grad, f, T, w, grad_T, part, B, K, C, D, tau, stride_wb,
            PER_SAMPLE=per_sample, STORE_T=need_T, STORE_W=need_w and not per_sample, ACC=acc,
            BLOCK_B=block_b, BLOCK_C=_BLOCK_C, BLOCK_D=_BLOCK_D,
        )
        if need_w and not per_sample:
            grad_w = part.sum(0)
        if not need_T:
            grad_T = None
    return grad_f, grad_T, grad_w
