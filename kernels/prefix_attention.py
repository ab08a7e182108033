"""Triton kernels of prefix_attention: causal attention of M suffixes per expert over the expert's
shared prefix, flash-attention style.

One program per (sequence (k, m), head h) holds the block of its S queries. The forward walks the P
prefix keys of expert k, then the suffix keys of (k, m) (causal mask), in tiles of BLOCK_N with an
online softmax (running max and sum in fp32) and stores out and the log-sum-exp of each query. The
backward recomputes the probabilities from q, k and the lse: dq stays in registers; the suffix dK/dV
belong to this program alone (plain stores); the prefix dK/dV of (k, h) are shared by the M sequences
of the expert and are summed with fp32 atomic adds.

Host functions ``prefix_attention_forward`` / ``prefix_attention_backward`` take fp32 tensors whose
last dimension has stride 1 (other strides are passed through, so slices of a fused QKV output run
without a copy). No autograd here: guidg_fast.ops.prefix_attention registers the pair.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import new_output

BLOCK_N = 16  # keys per tile (tl.dot dimensions stay >= 16)
NUM_WARPS = 4


@triton.jit
def _prefix_attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, out_ptr, lse_ptr,
    sq_k, sq_m, sq_s, sq_h,
    sk_k, sk_m, sk_s, sk_h,
    sv_k, sv_m, sv_s, sv_h,
    skp_k, skp_p, skp_h,
    svp_k, svp_p, svp_h,
    M, S, H, P, Dh, scale,
    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    k = pid // M
    m = pid % M
    rows = tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    keys = tl.arange(0, BLOCK_N)
    row_ok = rows < S
    col_ok = cols < Dh
    q = tl.load(
        q_ptr + k * sq_k + m * sq_m + h * sq_h + rows[:, None] * sq_s + cols[None, :],
        mask=row_ok[:, None] & col_ok[None, :], other=0.0,
    )
    m_i = tl.full((BLOCK_S,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_S,), tl.float32)
    acc = tl.zeros((BLOCK_S, BLOCK_D), tl.float32)
    # prefix keys: visible to every query (P >= 1, so every row has a finite max after this loop)
    for j0 in range(0, P, BLOCK_N):
        j = j0 + keys
        key_ok = j < P
        kt = tl.load(kp_ptr + k * skp_k + h * skp_h + j[:, None] * skp_p + cols[None, :],
                     mask=key_ok[:, None] & col_ok[None, :], other=0.0)
        vt = tl.load(vp_ptr + k * svp_k + h * svp_h + j[:, None] * svp_p + cols[None, :],
                     mask=key_ok[:, None] & col_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision="ieee") * scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
        m_i = m_new
    # suffix keys of this sequence, causal
    for j0 in range(0, S, BLOCK_N):
        j = j0 + keys
        key_ok = j < S
        kt = tl.load(k_ptr + k * sk_k + m * sk_m + h * sk_h + j[:, None] * sk_s + cols[None, :],
                     mask=key_ok[:, None] & col_ok[None, :], other=0.0)
        vt = tl.load(v_ptr + k * sv_k + m * sv_m + h * sv_h + j[:, None] * sv_s + cols[None, :],
                     mask=key_ok[:, None] & col_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision="ieee") * scale
        visible = key_ok[None, :] & (j[None, :] <= rows[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
        m_i = m_new
    out = acc / l_i[:, None]
    dense_row = ((k * M + m) * S + rows) * H + h
    tl.store(out_ptr + dense_row[:, None] * Dh + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])
    tl.store(lse_ptr + ((k * M + m) * H + h) * S + rows, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _prefix_attention_backward_kernel(
    q_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, out_ptr, dout_ptr, lse_ptr,
    dq_ptr, dk_ptr, dv_ptr, dkp_ptr, dvp_ptr,
    sq_k, sq_m, sq_s, sq_h,
    sk_k, sk_m, sk_s, sk_h,
    sv_k, sv_m, sv_s, sv_h,
    skp_k, skp_p, skp_h,
    svp_k, svp_p, svp_h,
    M, S, H, P, Dh, scale,
    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    k = pid // M
    m = pid % M
    rows = tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    keys = tl.arange(0, BLOCK_N)
    row_ok = rows < S
    col_ok = cols < Dh
    tile_mask = row_ok[:, None] & col_ok[None, :]
    q = tl.load(q_ptr + k * sq_k + m * sq_m + h * sq_h + rows[:, None] * sq_s + cols[None, :], mask=tile_mask, other=0.0)
    dense_row = ((k * M + m) * S + rows) * H + h
    dense = dense_row[:, None] * Dh + cols[None, :]
    do = tl.load(dout_ptr + dense, mask=tile_mask, other=0.0)
    o = tl.load(out_ptr + dense, mask=tile_mask, other=0.0)
    delta = tl.sum(do * o, axis=1)
    lse = tl.load(lse_ptr + ((k * M + m) * H + h) * S + rows, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_S, BLOCK_D), tl.float32)
    for j0 in range(0, P, BLOCK_N):
        j = j0 + keys
        key_ok = j < P
        kv_mask = key_ok[:, None] & col_ok[None, :]
        kt = tl.load(kp_ptr + k * skp_k + h * skp_h + j[:, None] * skp_p + cols[None, :], mask=kv_mask, other=0.0)
        vt = tl.load(vp_ptr + k * svp_k + h * svp_h + j[:, None] * svp_p + cols[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision="ieee") * scale
        visible = row_ok[:, None] & key_ok[None, :]
        p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vt), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds, kt, input_precision="ieee")
        dkt = tl.dot(tl.trans(ds), q, input_precision="ieee") * scale
        dvt = tl.dot(tl.trans(p), do, input_precision="ieee")
        # the prefix keys of (k, h) are shared by all M sequences of expert k
        prefix = (k * P + j[:, None]) * H * Dh + h * Dh + cols[None, :]
        tl.atomic_add(dkp_ptr + prefix, dkt, mask=kv_mask)
        tl.atomic_add(dvp_ptr + prefix, dvt, mask=kv_mask)
    for j0 in range(0, S, BLOCK_N):
        j = j0 + keys
        key_ok = j < S
        kv_mask = key_ok[:, None] & col_ok[None, :]
        kt = tl.load(k_ptr + k * sk_k + m * sk_m + h * sk_h + j[:, None] * sk_s + cols[None, :], mask=kv_mask, other=0.0)
        vt = tl.load(v_ptr + k * sv_k + m * sv_m + h * sv_h + j[:, None] * sv_s + cols[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision="ieee") * scale
        visible = row_ok[:, None] & key_ok[None, :] & (j[None, :] <= rows[:, None])
        p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vt), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds, kt, input_precision="ieee")
        dkt = tl.dot(tl.trans(ds), q, input_precision="ieee") * scale
        dvt = tl.dot(tl.trans(p), do, input_precision="ieee")
        # each suffix key belongs to this program only
        suffix = (((k * M + m) * S + j[:, None]) * H + h) * Dh + cols[None, :]
        tl.store(dk_ptr + suffix, dkt, mask=kv_mask)
        tl.store(dv_ptr + suffix, dvt, mask=kv_mask)
    tl.store(dq_ptr + dense, dq * scale, mask=tile_mask)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _blocks(S: int, Dh: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(S)), max(16, triton.next_power_of_2(Dh))


def _check_fp32(*tensors):
    for t in tensors:
        if t.dtype != torch.float32:
            raise ValueError(f"the Triton prefix_attention kernels take float32 tensors, got {t.dtype}")


def prefix_attention_forward(q, k, v, k_prefix, v_prefix, scale: float):
    """out (K, M, S, H, Dh) and lse (K, M, H, S), fp32."""
    _check_fp32(q, k, v, k_prefix, v_prefix)
    q, k, v, kp, vp = (_unit_last_stride(t) for t in (q, k, v, k_prefix, v_prefix))
    K, M, S, H, Dh = q.shape
    P = kp.shape[1]
    out = new_output((K, M, S, H, Dh), q, torch.float32)
    lse = new_output((K, M, H, S), q, torch.float32)
    BLOCK_S, BLOCK_D = _blocks(S, Dh)
    _prefix_attention_forward_kernel[(K * M, H)](
        q, k, v, kp, vp, out, lse,
        *q.stride()[:4], *k.stride()[:4], *v.stride()[:4], *kp.stride()[:3], *vp.stride()[:3],
        M, S, H, P, Dh, float(scale),
        BLOCK_S=BLOCK_S, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS,
    )
    return out, lse


def prefix_attention_backward(grad_out, q, k, v, k_prefix, v_prefix, out, lse, scale: float):
    """dq, dk, dv (K, M, S, H, Dh) and dk_prefix, dv_prefix (K, P, H, Dh), fp32."""
    _check_fp32(grad_out, q, k, v, k_prefix, v_prefix, out, lse)
    q, k, v, kp, vp = (_unit_last_stride(t) for t in (q, k, v, k_prefix, v_prefix))
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    K, M, S, H, Dh = q.shape
    P = kp.shape[1]
    dq = new_output((K, M, S, H, Dh), q, torch.float32)
    dk = new_output((K, M, S, H, Dh), q, torch.float32)
    dv = new_output((K, M, S, H, Dh), q, torch.float32)
    # accumulated with atomic adds over the M sequences: must start at zero
    dkp = torch.zeros((K, P, H, Dh), dtype=torch.float32, device=q.device)
    dvp = torch.zeros((K, P, H, Dh), dtype=torch.float32, device=q.device)
    BLOCK_S, BLOCK_D = _blocks(S, Dh)
    _prefix_attention_backward_kernel[(K * M, H)](
        q, k, v, kp, vp, out, grad_out, lse,
        dq, dk, dv, dkp, dvp,
        *q.stride()[:4], *k.stride()[:4], *v.stride()[:4], *kp.stride()[:3], *vp.stride()[:3],
        M, S, H, P, Dh, float(scale),
        BLOCK_S=BLOCK_S, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS,
    )
    return dq, dk, dv, dkp, dvp
