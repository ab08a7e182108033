"""Triton kernels of eot_project: out[n] = normalize(layer_norm(x[n, eot_index[n]]) @ proj).

Row passes are fused kernels (one program per row): gather + layer norm, normalisation, and their
backward (the layer-norm backward writes straight into the EOT row of dx); the (N, W) x (W, D)
projection and its two backward products are torch.matmul GEMMs in between; the ln_weight /
ln_bias gradients are column sums over the rows, one program per column block (no atomics).

Host functions ``eot_project_forward`` / ``eot_project_backward`` take fp32 tensors. No autograd here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import new_output

NUM_WARPS = 4
BLOCK_COLS = 64  # columns per program of the parameter-gradient reduction
BLOCK_ROWS = 16


@triton.jit
def _eot_project_forward_kernel(
    x_ptr, eot_ptr, w_ptr, b_ptr, xhat_ptr, y_ptr, rstd_ptr,
    sx_n, sx_s, S, W, eps,
    BLOCK_W: tl.constexpr,
):
    n = tl.program_id(0)
    cols = tl.arange(0, BLOCK_W)
    ok = cols < W
    row = tl.load(eot_ptr + n)
    row = tl.minimum(tl.maximum(row, 0), S - 1)  # the host checked the range; never read out of bounds
    x = tl.load(x_ptr + n * sx_n + row * sx_s + cols, mask=ok, other=0.0)
    mean = tl.sum(x, axis=0) / W
    diff = tl.where(ok, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / W + eps)
    xhat = diff * rstd
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    b = tl.load(b_ptr + cols, mask=ok, other=0.0)
    tl.store(xhat_ptr + n * W + cols, xhat, mask=ok)
    tl.store(y_ptr + n * W + cols, xhat * w + b, mask=ok)
    tl.store(rstd_ptr + n, rstd)


@triton.jit
def _eot_project_normalize_kernel(z_ptr, out_ptr, inv_ptr, D, BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    z = tl.load(z_ptr + n * D + cols, mask=ok, other=0.0)
    inv = 1.0 / tl.sqrt(tl.sum(z * z, axis=0))
    tl.store(out_ptr + n * D + cols, z * inv, mask=ok)
    tl.store(inv_ptr + n, inv)


@triton.jit
def _eot_project_normalize_backward_kernel(
    g_ptr, out_ptr, inv_ptr, xhat_ptr, w_ptr, b_ptr, gz_ptr, y_ptr, D, W,
    BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """gz = (g - out <g, out>) / |z| per row, and y = xhat * w + b again for the dproj GEMM."""
    n = tl.program_id(0)
    cd = tl.arange(0, BLOCK_D)
    okd = cd < D
    g = tl.load(g_ptr + n * D + cd, mask=okd, other=0.0)
    o = tl.load(out_ptr + n * D + cd, mask=okd, other=0.0)
    inv = tl.load(inv_ptr + n)
    tl.store(gz_ptr + n * D + cd, (g - o * tl.sum(g * o, axis=0)) * inv, mask=okd)
    cw = tl.arange(0, BLOCK_W)
    okw = cw < W
    xhat = tl.load(xhat_ptr + n * W + cw, mask=okw, other=0.0)
    w = tl.load(w_ptr + cw, mask=okw, other=0.0)
    b = tl.load(b_ptr + cw, mask=okw, other=0.0)
    tl.store(y_ptr + n * W + cw, xhat * w + b, mask=okw)


@triton.jit
def _eot_project_backward_kernel(
    gy_ptr, xhat_ptr, w_ptr, rstd_ptr, eot_ptr, dx_ptr, S, W,
    BLOCK_W: tl.constexpr,
):
    """Layer-norm backward of one EOT row, written into dx[n, eot_index[n]] (dx is zero elsewhere)."""
    n = tl.program_id(0)
    cols = tl.arange(0, BLOCK_W)
    ok = cols < W
    gy = tl.load(gy_ptr + n * W + cols, mask=ok, other=0.0)
    xhat = tl.load(xhat_ptr + n * W + cols, mask=ok, other=0.0)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    rstd = tl.load(rstd_ptr + n)
    gx = gy * w
    mean_g = tl.sum(gx, axis=0) / W
    mean_gx = tl.sum(gx * xhat, axis=0) / W
    dx = rstd * (gx - mean_g - xhat * mean_gx)
    row = tl.minimum(tl.maximum(tl.load(eot_ptr + n), 0), S - 1)
    tl.store(dx_ptr + (n * S + row) * W + cols, dx, mask=ok)


@triton.jit
def _eot_project_param_grad_kernel(
    gy_ptr, xhat_ptr, dw_ptr, db_ptr, N, W,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """d ln_weight = sum_n gy * xhat, d ln_bias = sum_n gy, one program per column block."""
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    ok = cols < W
    dw = tl.zeros((BLOCK_COLS,), tl.float32)
    db = tl.zeros((BLOCK_COLS,), tl.float32)
    for r0 in range(0, N, BLOCK_ROWS):
        rows = r0 + tl.arange(0, BLOCK_ROWS)
        mask = (rows < N)[:, None] & ok[None, :]
        gy = tl.load(gy_ptr + rows[:, None] * W + cols[None, :], mask=mask, other=0.0)
        xhat = tl.load(xhat_ptr + rows[:, None] * W + cols[None, :], mask=mask, other=0.0)
        dw += tl.sum(gy * xhat, axis=0)
        db += tl.sum(gy, axis=0)
    tl.store(dw_ptr + cols, dw, mask=ok)
    tl.store(db_ptr + cols, db, mask=ok)


def _check_fp32(*tensors):
    for t in tensors:
        if t.dtype != torch.float32:
            raise ValueError(f"the Triton eot_project kernels take float32 tensors, got {t.dtype}")


def eot_project_forward(x, eot_index, ln_weight, ln_bias, proj, eps: float):
    """out (N, D), xhat (N, W), rstd (N,), inv_norm (N,)."""
    _check_fp32(x, ln_weight, ln_bias, proj)
    if x.stride(2) != 1:
        x = x.contiguous()
    eot_index = eot_index.contiguous()
    ln_weight, ln_bias = ln_weight.contiguous(), ln_bias.contiguous()
    N, S, W = x.shape
    D = proj.shape[1]
    xhat = new_output((N, W), x, torch.float32)
    y = new_output((N, W), x, torch.float32)
    rstd = new_output((N,), x, torch.float32)
    BLOCK_W = triton.next_power_of_2(W)
    _eot_project_forward_kernel[(N,)](
        x, eot_index, ln_weight, ln_bias, xhat, y, rstd, x.stride(0), x.stride(1), S, W, float(eps),
        BLOCK_W=BLOCK_W, num_warps=NUM_WARPS,
    )
    z = torch.matmul(y, proj).contiguous()
    out = new_output((N, D), x, torch.float32)
    inv_norm = new_output((N,), x, torch.float32)
    _eot_project_normalize_kernel[(N,)](z, out, inv_norm, D, BLOCK_D=triton.next_power_of_2(D), num_warps=NUM_WARPS)
    return out, xhat, rstd, inv_norm


def eot_project_backward(grad_out, out, inv_norm, xhat, rstd, eot_index, x, ln_weight, ln_bias, proj):
    """dx (N, S, W) (zero except the EOT rows), d ln_weight, d ln_bias, d proj."""
    _check_fp32(grad_out, out, inv_norm, xhat, rstd, x, ln_weight, ln_bias, proj)
    grad_out, out, inv_norm = grad_out.contiguous(), out.contiguous(), inv_norm.contiguous()
    xhat, rstd, eot_index = xhat.contiguous(), rstd.contiguous(), eot_index.contiguous()
    ln_weight, ln_bias = ln_weight.contiguous(), ln_bias.contiguous()
    N, S, W = x.shape
    D = proj.shape[1]
    BLOCK_W, BLOCK_D = triton.next_power_of_2(W), triton.next_power_of_2(D)
    gz = new_output((N, D), x, torch.float32)
    y = new_output((N, W), x, torch.float32)
    _eot_project_normalize_backward_kernel[(N,)](
        grad_out, out, inv_norm, xhat, ln_weight, ln_bias, gz, y, D, W,
        BLOCK_D=BLOCK_D, BLOCK_W=BLOCK_W, num_warps=NUM_WARPS,
    )
    dproj = torch.matmul(y.t(), gz)
    gy = torch.matmul(gz, proj.t()).contiguous()
    dx = torch.zeros((N, S, W), dtype=torch.float32, device=x.device)
    _eot_project_backward_kernel[(N,)](gy, xhat, ln_weight, rstd, eot_index, dx, S, W, BLOCK_W=BLOCK_W,
                                       num_warps=NUM_WARPS)
    dw = new_output((W,), x, torch.float32)
    db = new_output((W,), x, torch.float32)
    _eot_project_param_grad_kernel[(triton.cdiv(W, BLOCK_COLS),)](
        gy, xhat, dw, db, N, W, BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS, num_warps=NUM_WARPS,
    )
    return dx, dw, db, dproj
