"""Triton kernel of bma_update_: averaged[i] <- (averaged[i] + r * tensors[i]) / (1 + r), in place,
for every tensor of one (device, dtype) group in ONE launch (multi-tensor apply).

The launch walks two int64 tables built on the host:
  tensor table  [avg addresses (n) | value addresses (n) | numels (n)]
  chunk table   [tensor index (m) | first element (m)], one program per chunk of _CHUNK elements
Each program turns its tensor's address back into a typed pointer (int64 -> pointer cast, which the
GPU backends and the CPU interpreter both support), so tensors need not share storage and no data is
copied or concatenated. The step is computed like the reference: the product and the sum rounded
separately (no FMA contraction on GPU), then a correctly rounded division by 1 + r rounded once on
the host, all in float32 (float64 for float64 tensors).

Pure kernel + launch helper: no autograd, no module state except a small cache of device tables.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

_CHUNK = 1 << 16  # elements per program, as in the C++/CUDA launchers
_BLOCK = 2048  # elements per loop step inside a program
_NUM_WARPS = 8

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}

# Device tables keyed by (device, dtype, addresses, numels): rebuilding them costs a host->device
# copy per call, and a training loop averages the same parameters every step. The key holds the
# whole table content, so a hit is always exact.
_TABLE_CACHE: OrderedDict = OrderedDict()
_TABLE_CACHE_SIZE = 8


@triton.jit
def _bma_update_forward_kernel(
    tensor_table_ptr, chunk_table_ptr, weights_ptr,
    n_tensors, n_chunks,
    DTYPE: tl.constexpr, ACC: tl.constexpr, ACC_IS_FP32: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    t = tl.load(chunk_table_ptr + chunk)
    start = tl.load(chunk_table_ptr + n_chunks + chunk)
    avg_ptr = tl.load(tensor_table_ptr + t).to(tl.pointer_type(DTYPE))
    val_ptr = tl.load(tensor_table_ptr + n_tensors + t).to(tl.pointer_type(DTYPE))
    numel = tl.load(tensor_table_ptr + 2 * n_tensors + t)
    relative_weight = tl.load(weights_ptr)
    denominator = tl.load(weights_ptr + 1)
    for step in range(0, CHUNK, BLOCK):
        offs = start + step + tl.arange(0, BLOCK)
        mask = offs < numel
        avg = tl.load(avg_ptr + offs, mask=mask, other=0.0).to(ACC)
        val = tl.load(val_ptr + offs, mask=mask, other=0.0).to(ACC)
        new = avg + relative_weight * val
        if ACC_IS_FP32:  # fp32 `/` lowers to an approximate division on NVIDIA GPUs
            new = tl.div_rn(new, denominator)
        else:
            new = new / denominator
        tl.store(avg_ptr + offs, new.to(DTYPE), mask=mask)


def _tables(averaged, tensors, device):
    addresses = [a.data_ptr() for a in averaged] + [t.data_ptr() for t in tensors]
    numels = [a.numel() for a in averaged]
    key = (str(device), averaged[0].dtype, tuple(addresses), tuple(numels))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit
    chunk_tensor, chunk_start = [], []
    for i, n in enumerate(numels):
        for s in range(0, n, _CHUNK):
            chunk_tensor.append(i)
            chunk_start.append(s)
    tensor_table = torch.tensor(addresses + numels, dtype=torch.int64).to(device)
    chunk_table = torch.tensor(chunk_tensor + chunk_start, dtype=torch.int64).to(device)
    value = (tensor_table, chunk_table, len(chunk_tensor))
    _TABLE_CACHE[key] = value
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return value


def bma_update_forward(averaged, tensors, relative_weight: float) -> None:
    """One launch over every (averaged[i], tensors[i]) pair; all on one device, one dtype, contiguous."""
    averaged, tensors = list(averaged), list(tensors)
    if not averaged:
        return
    dtype, device = averaged[0].dtype, averaged[0].device
    if dtype not in _TL_DTYPES:
        raise ValueError(f"bma_update_ (Triton): unsupported dtype {dtype}")
    for i, (a, t) in enumerate(zip(averaged, tensors)):
        if a.dtype != dtype or t.dtype != dtype or a.device != device or t.device != device:
            raise ValueError(f"bma_update_ (Triton): averaged_tensors[{i}] and tensors[{i}] must be {dtype} on {device}")
        if not (a.is_contiguous() and t.is_contiguous()):
            raise ValueError(f"bma_update_ (Triton): averaged_tensors[{i}] and tensors[{i}] must be contiguous")
        if a.numel() != t.numel():
            raise ValueError(f"bma_update_ (Triton): averaged_tensors[{i}] and tensors[{i}] differ in size")
    tensor_table, chunk_table, n_chunks = _tables(averaged, tensors, device)
    if n_chunks == 0:
        return
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    r = float(relative_weight)
    # r and 1 + r rounded once to the accumulation type, like the reference's scalar arguments
    weights = torch.tensor([r, 1.0 + r], dtype=acc).to(device)
    extra = {"enable_fp_fusion": False} if device.type == "cuda" else {}
    _bma_update_forward_kernel[(n_chunks,)](
        tensor_table, chunk_table, weights, len(averaged), n_chunks,
        DTYPE=_TL_DTYPES[dtype], ACC=_TL_DTYPES[acc], ACC_IS_FP32=acc == torch.float32, CHUNK=_CHUNK, BLOCK=_BLOCK,
        num_warps=_NUM_WARPS, **extra,
    )
