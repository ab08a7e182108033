"""A one-launch check that Triton's CPU interpreter (TRITON_INTERPRET=1) can run this package's
kernels: every one of them loops over a runtime bound (heads, experts, class tiles), and the
interpreter of triton < 3.6 turns that bound into a Python int by a conversion NumPy >= 2.4 refuses
(triton-lang/triton#9171). guidg_fast.ops._backend runs it once before offering Triton on CPU
tensors, so such an install falls back to the other backends with a warning instead of failing
inside a kernel.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _loop_probe_kernel(out_ptr, n):
    acc = tl.zeros((1,), dtype=tl.int32)
    for _ in range(0, n):
        acc += 1
    tl.store(out_ptr + tl.arange(0, 1), acc)


def interpreter_runs_loops() -> bool:
    out = torch.zeros(1, dtype=torch.int32)
    _loop_probe_kernel[(1,)](out, 3)
    return int(out[0]) == 3
