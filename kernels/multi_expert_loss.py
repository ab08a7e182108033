"""Triton kernels of multi_expert_loss (the pass structure is described in
guidg_fast/ops/multi_expert_loss.py; the per-logit math matches csrc/include/multi_expert_loss.h).

Kernels tile (rows x classes x D): a program holds BLOCK_B margin-shifted feature rows (or one class
tile of T_k) with the whole feature width (BLOCK_D = next power of two >= D) and sweeps the other
axis in tiles, so the (B, K, C) logits never exist in memory. Accumulation is fp32 (float64 and
half inputs are computed in fp32); dots use input_precision="ieee" so results match the fp32
reference on GPUs too (no TF32). One pinned config, no autotuning.

Host functions ``multi_expert_loss_forward`` / ``multi_expert_loss_backward`` take and return the
same tensors as the C++ kernels guidg_fast._C.multi_expert_loss_forward / _backward. No autograd.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._launch import new_output

ENTROPY_EPS = tl.constexpr(1e-5)
BLOCK_B = 16  # feature rows per program / per step (>= 16: tl.dot minimum)
BLOCK_C = 16  # classes per tile
BLOCK_REDUCE = 256
# Programs the forward aims for: with few (expert, row block) pairs (B = 36, K = 3: 9) the classes
# are split across programs as well (flash-decoding style) and the splits merged by their LSEs.
TARGET_PROGRAMS = 128


def _class_splits(C: int, programs: int, max_splits: int) -> tuple[int, int]:
    """(number of class splits, classes per split, a multiple of BLOCK_C) for the forward pass."""
    tiles = triton.cdiv(C, BLOCK_C)
    want = max(1, min(tiles, max_splits, TARGET_PROGRAMS // max(1, programs)))
    chunk = triton.cdiv(tiles, want) * BLOCK_C
    return triton.cdiv(C, chunk), chunk


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _num_warps(block_d: int) -> int:
    return 4 if block_d <= 128 else 8


@triton.jit
def _shifted_rows(f_ptr, T_ptr, expert_base, yv, rows, row_mask, offs_d, d_mask, D, margin, HAS_MARGIN: tl.constexpr):
    # g_b = f_b - margin T_k[y_b] for a block of rows (zeros in masked rows / columns)
    mask = row_mask[:, None] & d_mask[None, :]
    g = tl.load(f_ptr + rows[:, None].to(tl.int64) * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_MARGIN:
        ty = tl.load(T_ptr + expert_base + yv[:, None].to(tl.int64) * D + offs_d[None, :], mask=mask, other=0.0)
        g = g - margin * ty.to(tl.float32)
    return g


@triton.jit
def _load_class_tile(T_ptr, expert_base, cols, c_mask, offs_d, d_mask, D):
    mask = c_mask[:, None] & d_mask[None, :]
    return tl.load(T_ptr + expert_base + cols[:, None].to(tl.int64) * D + offs_d[None, :], mask=mask, other=0.0).to(
        tl.float32
    )


@triton.jit
def _entropy_term_grad(p):
    # h'(p) = d/dp [-p log(p + eps)]
    q = p + ENTROPY_EPS
    return -tl.log(q) - p / q


@triton.jit
def _multi_expert_loss_forward_kernel(
    f_ptr, T_ptr, y_ptr, lse_ptr, ce_ptr, o_ptr, part_max_ptr, part_sum_ptr, part_target_ptr, part_o_ptr,
    B, K, C, D, tau, margin, chunk,
    HAS_MARGIN: tl.constexpr, NEED_O: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Pass 1, program (k, row block, class split): online log-sum-exp over the class tiles of its
    split -> lse, CE (and o); with several splits (SPLIT), the running max / sum / target logit /
    unnormalised o of each split instead, merged by _multi_expert_loss_merge_kernel."""
    k = tl.program_id(0)
    split = tl.program_id(2)
    c_begin = split * chunk
    c_end = tl.minimum(C, c_begin + chunk)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    expert_base = k.to(tl.int64) * C * D
    yv = tl.load(y_ptr + rows, mask=row_mask, other=0)
    g = _shifted_rows(f_ptr, T_ptr, expert_base, yv, rows, row_mask, offs_d, d_mask, D, margin, HAS_MARGIN)
    run_max = tl.full([BLOCK_B], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_B], tl.float32)
    target = tl.zeros([BLOCK_B], tl.float32)
    acc_o = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    for c0 in range(c_begin, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        c_mask = cols < c_end
        t = _load_class_tile(T_ptr, expert_base, cols, c_mask, offs_d, d_mask, D)
        z = tl.dot(g, tl.trans(t), input_precision="ieee") * tau
        z = tl.where(c_mask[None, :], z, float("-inf"))
        target += tl.sum(tl.where(cols[None, :] == yv[:, None], z, 0.0), axis=1)
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        alpha = tl.exp(run_max - new_max)  # 0 on the first tile
        e = tl.exp(z - new_max[:, None])
        run_sum = run_sum * alpha + tl.sum(e, axis=1)
        if NEED_O:
            acc_o = acc_o * alpha[:, None] + tl.dot(e, t, input_precision="ieee")
        run_max = new_max
    out = rows.to(tl.int64) * K + k
    if SPLIT:
        part = split.to(tl.int64) * B * K + out  # (split, b, k)
        tl.store(part_max_ptr + part, run_max, mask=row_mask)
        tl.store(part_sum_ptr + part, run_sum, mask=row_mask)
        tl.store(part_target_ptr + part, target, mask=row_mask)
        if NEED_O:
            tl.store(part_o_ptr + part[:, None] * D + offs_d[None, :], acc_o, mask=row_mask[:, None] & d_mask[None, :])
    else:
        lse = run_max + tl.log(run_sum)
        tl.store(lse_ptr + out, lse, mask=row_mask)
        tl.store(ce_ptr + out, lse - target, mask=row_mask)
        if NEED_O:
            o = acc_o / run_sum[:, None]
            tl.store(o_ptr + out[:, None] * D + offs_d[None, :], o, mask=row_mask[:, None] & d_mask[None, :])


@triton.jit
def _multi_expert_loss_merge_kernel(
    part_max_ptr, part_sum_ptr, part_target_ptr, part_o_ptr, lse_ptr, ce_ptr, o_ptr,
    B, K, D, n_split,
    NEED_O: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (k, row block): merges the class splits of pass 1 through their log-sum-exps:
    M = max_s m_s, l = sum_s l_s e^(m_s - M), o = sum_s o_s e^(m_s - M) / l, lse = M + log l."""
    k = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    offs_d = tl.arange(0, BLOCK_D)
    mask2 = row_mask[:, None] & (offs_d < D)[None, :]
    out = rows.to(tl.int64) * K + k
    run_max = tl.full([BLOCK_B], float("-inf"), tl.float32)
    for s in range(0, n_split):
        part = s * B * K + out
        run_max = tl.maximum(run_max, tl.load(part_max_ptr + part, mask=row_mask, other=0.0))
    run_sum = tl.zeros([BLOCK_B], tl.float32)
    target = tl.zeros([BLOCK_B], tl.float32)
    acc_o = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    for s in range(0, n_split):
        part = s * B * K + out
        scale = tl.exp(tl.load(part_max_ptr + part, mask=row_mask, other=0.0) - run_max)
        run_sum += scale * tl.load(part_sum_ptr + part, mask=row_mask, other=1.0)  # 1: no log(0) in masked rows
        target += tl.load(part_target_ptr + part, mask=row_mask, other=0.0)
        if NEED_O:
            acc_o += scale[:, None] * tl.load(part_o_ptr + part[:, None] * D + offs_d[None, :], mask=mask2, other=0.0)
    lse = run_max + tl.log(run_sum)
    tl.store(lse_ptr + out, lse, mask=row_mask)
    tl.store(ce_ptr + out, lse - target, mask=row_mask)
    if NEED_O:
        tl.store(o_ptr + out[:, None] * D + offs_d[None, :], acc_o / run_sum[:, None], mask=mask2)


@triton.jit
def _multi_expert_loss_entropy_kernel(
    f_ptr, T_ptr, y_ptr, lse_ptr, pbar_ptr, partial_ptr,
    B, K, C, D, tau, margin, inv_batch,
    HAS_MARGIN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Pass 2 (entropy term), program (k, class tile) over all rows: pbar and this tile's share of
    mean_b H(p_b) - H(pbar_k)."""
    k = tl.program_id(0)
    tile = tl.program_id(1)
    cols = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cols < C
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    expert_base = k.to(tl.int64) * C * D
    t = _load_class_tile(T_ptr, expert_base, cols, c_mask, offs_d, d_mask, D)
    colsum = tl.zeros([BLOCK_C], tl.float32)
    row_entropy = tl.zeros([BLOCK_C], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        yv = tl.load(y_ptr + rows, mask=row_mask, other=0)
        g = _shifted_rows(f_ptr, T_ptr, expert_base, yv, rows, row_mask, offs_d, d_mask, D, margin, HAS_MARGIN)
        lse = tl.load(lse_ptr + rows.to(tl.int64) * K + k, mask=row_mask, other=0.0)
        z = tl.dot(g, tl.trans(t), input_precision="ieee") * tau
        p = tl.exp(z - lse[:, None])
        p = tl.where(row_mask[:, None] & c_mask[None, :], p, 0.0)
        colsum += tl.sum(p, axis=0)
        row_entropy += tl.sum(-p * tl.log(p + ENTROPY_EPS), axis=0)
    pbar = colsum * inv_batch
    tl.store(pbar_ptr + k * C + cols, pbar, mask=c_mask)
    mean_entropy = tl.where(c_mask, -pbar * tl.log(pbar + ENTROPY_EPS), 0.0)
    partial = tl.sum(row_entropy, axis=0) * inv_batch - tl.sum(mean_entropy, axis=0)
    tl.store(partial_ptr + k * tl.num_programs(1) + tile, partial)


@triton.jit
def _multi_expert_loss_finalize_kernel(
    ce_ptr, w_ptr, partial_ptr, loss_ptr,
    B, K, n_partial, inv_batch, entropy_weight,
    PER_SAMPLE: tl.constexpr, HAS_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program: loss = sum_{b,k} w CE / B + entropy_weight * sum(partials), in a fixed order."""
    acc = tl.zeros([BLOCK], tl.float32)
    for i0 in range(0, B * K, BLOCK):
        idx = i0 + tl.arange(0, BLOCK)
        mask = idx < B * K
        ce = tl.load(ce_ptr + idx, mask=mask, other=0.0)
        if PER_SAMPLE:
            wv = tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        else:
            wv = tl.load(w_ptr + idx % K, mask=mask, other=0.0).to(tl.float32)
        acc += wv * ce
    loss = tl.sum(acc, axis=0) * inv_batch
    if HAS_ENTROPY:
        ent = tl.zeros([BLOCK], tl.float32)
        for i0 in range(0, n_partial, BLOCK):
            idx = i0 + tl.arange(0, BLOCK)
            ent += tl.load(partial_ptr + idx, mask=idx < n_partial, other=0.0)
        loss += entropy_weight * tl.sum(ent, axis=0)
    tl.store(loss_ptr, loss)


@triton.jit
def _multi_expert_loss_backward_kernel(
    grad_ptr, f_ptr, T_ptr, y_ptr, w_ptr, lse_ptr, ce_ptr, o_ptr, pbar_ptr, q_ptr, r_ptr, df_ptr, dw_ptr,
    B, K, C, D, tau, margin, inv_batch, entropy_weight,
    PER_SAMPLE: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_ENTROPY: tl.constexpr, NEED_ROWS: tl.constexpr,
    SWEEP: tl.constexpr, NEED_F: tl.constexpr, STORE_Q: tl.constexpr, STORE_R: tl.constexpr, NEED_W: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (row block), looping over experts: q_bk = sum_c dz_bc T_k[c] (from o, or by a class
    sweep when the forward kept no o), df = tau sum_k q, dw."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    mask2 = row_mask[:, None] & d_mask[None, :]
    grad = tl.load(grad_ptr).to(tl.float32)
    yv = tl.load(y_ptr + rows, mask=row_mask, other=0)
    f = tl.load(f_ptr + rows64[:, None] * D + offs_d[None, :], mask=mask2, other=0.0).to(tl.float32)
    df = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    for k in range(0, K):
        expert_base = (k * C).to(tl.int64) * D
        if PER_SAMPLE:
            a = tl.load(w_ptr + rows64 * K + k, mask=row_mask, other=0.0).to(tl.float32) * inv_batch
        else:
            a = tl.load(w_ptr + k + rows64 * 0, mask=row_mask, other=0.0).to(tl.float32) * inv_batch
        out_bk = rows64 * K + k
        if NEED_ROWS:
            ty = tl.load(T_ptr + expert_base + yv[:, None].to(tl.int64) * D + offs_d[None, :], mask=mask2, other=0.0)
            ty = ty.to(tl.float32)
            if SWEEP:
                # one class sweep: A = sum_c (a p + ew p u) T_c (+ O = sum_c p T_c, r = sum_c p u)
                g = f
                if HAS_MARGIN:
                    g = f - margin * ty
                lse = tl.load(lse_ptr + out_bk, mask=row_mask, other=0.0)
                acc_a = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
                acc_o = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
                r = tl.zeros([BLOCK_B], tl.float32)
                for c0 in range(0, C, BLOCK_C):
                    cols = c0 + tl.arange(0, BLOCK_C)
                    c_mask = cols < C
                    t = _load_class_tile(T_ptr, expert_base, cols, c_mask, offs_d, d_mask, D)
                    z = tl.dot(g, tl.trans(t), input_precision="ieee") * tau
                    p = tl.where(c_mask[None, :], tl.exp(z - lse[:, None]), 0.0)
                    if HAS_ENTROPY:
                        pbar = tl.load(pbar_ptr + k * C + cols, mask=c_mask, other=0.0)
                        pu = p * (_entropy_term_grad(p) - _entropy_term_grad(pbar)[None, :]) * inv_batch
                        r += tl.sum(pu, axis=1)
                        acc_a += tl.dot(a[:, None] * p + entropy_weight * pu, t, input_precision="ieee")
                        acc_o += tl.dot(p, t, input_precision="ieee")
                    else:
                        acc_a += tl.dot(a[:, None] * p, t, input_precision="ieee")
                q = grad * (acc_a - a[:, None] * ty - (entropy_weight * r)[:, None] * acc_o)
                if STORE_R:
                    tl.store(r_ptr + out_bk, r, mask=row_mask)
            else:
                o = tl.load(o_ptr + out_bk[:, None] * D + offs_d[None, :], mask=mask2, other=0.0)
                q = (grad * a)[:, None] * (o - ty)
            if STORE_Q:
                tl.store(q_ptr + out_bk[:, None] * D + offs_d[None, :], q, mask=mask2)
            df += q
        if NEED_W:
            if PER_SAMPLE:
                ce = tl.load(ce_ptr + out_bk, mask=row_mask, other=0.0)
                tl.store(dw_ptr + out_bk, grad * ce * inv_batch, mask=row_mask)
    if NEED_F:
        tl.store(df_ptr + rows64[:, None] * D + offs_d[None, :], tau * df, mask=mask2)
    if NEED_W:
        if not PER_SAMPLE:
            if pid == 0:
                ks = tl.arange(0, BLOCK_K)
                k_mask = ks < K
                acc = tl.zeros([BLOCK_K], tl.float32)
                for b0 in range(0, B, BLOCK_B):
                    rr = b0 + tl.arange(0, BLOCK_B)
                    m = (rr < B)[:, None] & k_mask[None, :]
                    acc += tl.sum(tl.load(ce_ptr + rr[:, None] * K + ks[None, :], mask=m, other=0.0), axis=0)
                tl.store(dw_ptr + ks, grad * acc * inv_batch, mask=k_mask)


@triton.jit
def _multi_expert_loss_backward_expert_kernel(
    grad_ptr, f_ptr, T_ptr, y_ptr, w_ptr, lse_ptr, pbar_ptr, q_ptr, r_ptr, dT_ptr,
    B, K, C, D, tau, margin, inv_batch, entropy_weight,
    PER_SAMPLE: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_ENTROPY: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (k, class tile) over all rows: dT_kc = tau sum_b dz_bc g_b - margin tau sum_{y_b = c} q_bk."""
    k = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cols < C
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    expert_base = k.to(tl.int64) * C * D
    t = _load_class_tile(T_ptr, expert_base, cols, c_mask, offs_d, d_mask, D)
    grad = tl.load(grad_ptr).to(tl.float32)
    if HAS_ENTROPY:
        pbar_grad = _entropy_term_grad(tl.load(pbar_ptr + k * C + cols, mask=c_mask, other=0.0))
    acc = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        rows64 = rows.to(tl.int64)
        yv = tl.load(y_ptr + rows, mask=row_mask, other=0)
        g = _shifted_rows(f_ptr, T_ptr, expert_base, yv, rows, row_mask, offs_d, d_mask, D, margin, HAS_MARGIN)
        lse = tl.load(lse_ptr + rows64 * K + k, mask=row_mask, other=0.0)
        if PER_SAMPLE:
            a = tl.load(w_ptr + rows64 * K + k, mask=row_mask, other=0.0).to(tl.float32) * inv_batch
        else:
            a = tl.load(w_ptr + k + rows64 * 0, mask=row_mask, other=0.0).to(tl.float32) * inv_batch
        z = tl.dot(g, tl.trans(t), input_precision="ieee") * tau
        p = tl.exp(z - lse[:, None])
        is_target = cols[None, :] == yv[:, None]
        dz = a[:, None] * (p - tl.where(is_target, 1.0, 0.0))
        if HAS_ENTROPY:
            r = tl.load(r_ptr + rows64 * K + k, mask=row_mask, other=0.0)
            u = (_entropy_term_grad(p) - pbar_grad[None, :]) * inv_batch
            dz += entropy_weight * p * (u - r[:, None])
        dz = tl.where(row_mask[:, None] & c_mask[None, :], grad * dz, 0.0)
        acc += tl.dot(tl.trans(dz), g, input_precision="ieee")
        if HAS_MARGIN:
            # the path through the gathered T_k[y_b], as a one-hot product inside this class tile
            q = tl.load(q_ptr + (rows64 * K + k)[:, None] * D + offs_d[None, :],
                        mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            hit = tl.where(is_target & row_mask[:, None], 1.0, 0.0)
            acc -= margin * tl.dot(tl.trans(hit), q, input_precision="ieee")
    out = (k * C + cols).to(tl.int64)
    tl.store(dT_ptr + out[:, None] * D + offs_d[None, :], tau * acc, mask=c_mask[:, None] & d_mask[None, :])


def _as_compute(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous()


def _arg(x: torch.Tensor, spare: torch.Tensor) -> torch.Tensor:
    """A pointer argument the kernel does not touch may be an empty tensor (null data pointer, which
    the GPU launcher rejects): pass a real one-element buffer instead."""
    return x if x.numel() > 0 else spare


def multi_expert_loss_forward(f, T, y, w, temperature: float, margin: float, entropy_weight: float, need_o: bool):
    """(loss, lse (B, K), ce (B, K), o (B, K, D) or empty, pbar (K, C) or empty), in f's dtype."""
    out_dtype = f.dtype
    f, T, w = _as_compute(f), _as_compute(T), _as_compute(w)
    y = y.to(torch.int64).contiguous()
    B, D = f.shape
    K, C, _ = T.shape
    entropy = entropy_weight != 0.0
    need_o = need_o and not entropy
    block_d = _block_d(D)
    warps = _num_warps(block_d)
    loss = new_output((), f, torch.float32)
    lse = new_output((B, K), f, torch.float32)
    ce = new_output((B, K), f, torch.float32)
    o = new_output((B, K, D), f, torch.float32) if need_o else f.new_empty((0,))
    pbar = new_output((K, C), f, torch.float32) if entropy else f.new_empty((0,))
    inv_batch = 1.0 / B
    spare = torch.empty((1,), dtype=torch.float32, device=f.device)
    row_blocks = triton.cdiv(B, BLOCK_B)
    # per-split partial o (B, K, D) each: at most C / D splits, so they hold no more than the logits
    n_split, chunk = _class_splits(C, K * row_blocks, max(1, C // D) if need_o else C)
    split = n_split > 1
    if split:  # per-split running max, sum, target logit (and unnormalised o), merged below
        part = torch.empty((3, n_split, B, K), dtype=torch.float32, device=f.device)
        part_o = torch.empty((n_split, B, K, D), dtype=torch.float32, device=f.device) if need_o else spare
        part_max, part_sum, part_target = part[0], part[1], part[2]
    else:
        part_max = part_sum = part_target = part_o = spare
    _multi_expert_loss_forward_kernel[(K, row_blocks, n_split)](
        f, T, y, lse, ce, _arg(o, spare), part_max, part_sum, part_target, part_o,
        B, K, C, D, float(temperature), float(margin), chunk,
        HAS_MARGIN=margin != 0.0, NEED_O=need_o, SPLIT=split,
        BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, BLOCK_D=block_d, num_warps=warps,
    )
    if split:
        _multi_expert_loss_merge_kernel[(K, row_blocks)](
            part_max, part_sum, part_target, part_o, lse, ce, _arg(o, spare), B, K, D, n_split,
            NEED_O=need_o, BLOCK_B=BLOCK_B, BLOCK_D=block_d, num_warps=warps,
        )
    n_tiles = triton.cdiv(C, BLOCK_C)
    partial = new_output((K * n_tiles,), f, torch.float32) if entropy else spare
    if entropy:
        _multi_expert_loss_entropy_kernel[(K, n_tiles)](
            f, T, y, lse, pbar, partial, B, K, C, D, float(temperature), float(margin), inv_batch,
            HAS_MARGIN=margin != 0.0, BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, BLOCK_D=block_d, num_warps=warps,
        )
    _multi_expert_loss_finalize_kernel[(1,)](
        ce, w, partial, loss, B, K, partial.numel(), inv_batch, float(entropy_weight),
        PER_SAMPLE=w.dim() == 2, HAS_ENTROPY=entropy, BLOCK=BLOCK_REDUCE,
    )
    return tuple(x.to(out_dtype) for x in (loss, lse, ce, o, pbar))


def multi_expert_loss_backward(grad, f, T, y, w, lse, ce, o, pbar, temperature: float, margin: float,
                               entropy_weight: float, need_f: bool, need_T: bool, need_w: bool):
    """(df (B, D), dT (K, C, D), dw like w), in f's dtype; a gradient not needed comes back empty."""
    out_dtype = f.dtype
    grad, f, T, w, lse, ce, o, pbar = (_as_compute(x) for x in (grad, f, T, w, lse, ce, o, pbar))
    y = y.to(torch.int64).contiguous()
    B, D = f.shape
    K, C, _ = T.shape
    entropy = entropy_weight != 0.0
    has_margin = margin != 0.0
    # q (and r) per row: for df, for the margin path of dT, and r for the entropy part of dT
    need_rows = need_f or (need_T and (has_margin or entropy))
    # o from the forward (CE only) saves the backward a class sweep; empty: the backward sweeps
    sweep = entropy or o.numel() == 0
    if not sweep and tuple(o.shape) != (B, K, D):
        raise RuntimeError(f"multi_expert_loss_backward: o must be empty or (B, K, D), got {tuple(o.shape)}")
    block_d = _block_d(D)
    warps = _num_warps(block_d)
    inv_batch = 1.0 / B
    df = new_output((B, D), f, torch.float32) if need_f else f.new_empty((0,))
    dT = new_output((K, C, D), f, torch.float32) if need_T else f.new_empty((0,))
    dw = new_output(tuple(w.shape), f, torch.float32) if need_w else f.new_empty((0,))
    store_q = need_T and has_margin
    store_r = need_T and entropy
    q = torch.empty((B, K, D), dtype=torch.float32, device=f.device) if store_q else f.new_empty((0,))
    r = torch.empty((B, K), dtype=torch.float32, device=f.device) if store_r else f.new_empty((0,))
    spare = torch.empty((1,), dtype=torch.float32, device=f.device)
    o, pbar, q, r, df_arg, dT_arg, dw_arg = (_arg(x, spare) for x in (o, pbar, q, r, df, dT, dw))
    if need_rows or need_w:
        _multi_expert_loss_backward_kernel[(triton.cdiv(B, BLOCK_B),)](
            grad, f, T, y, w, lse, ce, o, pbar, q, r, df_arg, dw_arg,
            B, K, C, D, float(temperature), float(margin), inv_batch, float(entropy_weight),
            PER_SAMPLE=w.dim() == 2, HAS_MARGIN=has_margin, HAS_ENTROPY=entropy, NEED_ROWS=need_rows, SWEEP=sweep,
            NEED_F=need_f,
            STORE_Q=store_q, STORE_R=store_r, NEED_W=need_w,
            BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, BLOCK_D=block_d, BLOCK_K=max(2, triton.next_power_of_2(K)),
            num_warps=warps,
        )
    if need_T:
        _multi_expert_loss_backward_expert_kernel[(K, triton.cdiv(C, BLOCK_C))](
            grad, f, T, y, w, lse, pbar, q, r, dT_arg,
            B, K, C, D, float(temperature), float(margin), inv_batch, float(entropy_weight),
            PER_SAMPLE=w.dim() == 2, HAS_MARGIN=has_margin, HAS_ENTROPY=entropy,
            BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, BLOCK_D=block_d, num_warps=warps,
        )
    return tuple(x.to(out_dtype) for x in (df, dT, dw))
