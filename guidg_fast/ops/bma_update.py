"""bma_update_: one call updates every tensor of a module, in place:
averaged[i] <- (averaged[i] + r * tensors[i]) / (1 + r).

Tensors are grouped by (device, dtype); each group is one kernel call (one multi-tensor launch on
CUDA, one parallel_for on CPU). The Triton backend (kernels/bma_update.py) is one launch per group
too: it walks a table of tensor addresses and chunks (CUDA, or CPU under TRITON_INTERPRET=1).
One in-place custom op, ``guidg_fast::bma_update_`` (no backward: the average is never
differentiated); its ``ext`` backend calls guidg_fast._C.bma_update_.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .. import _checks, reference
from . import _backend

SPEC = _backend.register(_backend.OpSpec("bma_update_", ext_ops=("bma_update_",), triton=True))


@torch.library.custom_op("guidg_fast::bma_update_", mutates_args=("averaged_tensors",))
def _fused_bma_update_(averaged_tensors: list[torch.Tensor], tensors: list[torch.Tensor], relative_weight: float,
                       backend: str) -> None:
    if backend == "ext":
        _backend.load_extension().bma_update_(averaged_tensors, tensors, relative_weight)
    elif backend == "triton":
        # imported on first use: TRITON_INTERPRET must be set before the kernel is decorated
        from ..kernels.bma_update import bma_update_forward

        bma_update_forward(averaged_tensors, tensors, relative_weight)
    else:
        raise ValueError(f"backend must be 'ext' or 'triton' for the fused bma_update_, got {backend!r}")


@_fused_bma_update_.register_fake
def _fused_bma_update_fake(averaged_tensors, tensors, relative_weight, backend):
    return None


def bma_update_(averaged_tensors: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], relative_weight: float) -> None:
    averaged_tensors, tensors = list(averaged_tensors), list(tensors)
    _checks.check_tensor_lists(averaged_tensors, tensors)
    r = float(relative_weight)
    if not math.isfinite(r) or r < 0:
        raise ValueError(f"relative_weight must be a finite number >= 0, got {relative_weight}")
    groups: dict = {}
    for avg, val in zip(averaged_tensors, tensors):
        groups.setdefault((avg.device, avg.dtype), ([], []))
        groups[(avg.device, avg.dtype)][0].append(avg)
        groups[(avg.device, avg.dtype)][1].append(val.detach())
    with torch.no_grad():
        for (device, _), (avgs, vals) in groups.items():
            backend = _backend.backend_for("bma_update_", device.type)
            if backend == "eager":
                reference.bma_update_(avgs, vals, r)
                continue
            # the kernels need dense memory; a strided view (rare for parameters) takes the eager path
            dense = [i for i, (a, v) in enumerate(zip(avgs, vals)) if a.is_contiguous() and v.is_contiguous()]
            strided = [i for i in range(len(avgs)) if i not in set(dense)]
            if dense:
                _fused_bma_update_([avgs[i] for i in dense], [vals[i] for i in dense], r, backend)
            if strided:
                reference.bma_update_([avgs[i] for i in strided], [vals[i] for i in strided], r)
