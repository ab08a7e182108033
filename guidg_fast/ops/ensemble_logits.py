"""ensemble_logits: (B, C) = sum_k w_k * tau * f @ T_k^T, the GuiDG inference logits.

w is (K,) batch weights (the official inference: w = mean_b CMAttn(f, T)) or (B, K) per-sample
weights. The official code runs K products, stacks them into (B, K, C) and mixes with einsum. The
fused backends instead:
  batch weights   mix the experts once, M = tau * sum_k w_k T_k, then ONE (B, D) x (D, C) product
                  (Triton: M is built tile by tile in registers inside the GEMM kernel; C++ CPU,
                  float32 on AVX-512: the same fused tile pass, M never leaves L1; otherwise a
                  mixing pass, then one GEMM);
  per-sample      one product against all experts (reduction over k and d) and the mix over k,
                  without storing (B, K, C) (Triton: fully fused; C++/CUDA: one GEMM + one mix pass).
Backward (fused too): grad_T[k] = w_k * tau * g^T f, grad_f = tau * g @ M (batch) or
tau * sum_k w[:, k] * (g @ T_k) (per-sample), grad_w[k] = <T_k, tau g^T f> (batch) or
grad_w[b, k] = tau * f[b] . (g @ T_k)[b] (per-sample): no (B, K, C) tensor either.

Backends: Triton (kernels/ensemble_logits.py; CUDA, or CPU under TRITON_INTERPRET=1), the C++/CUDA
extension (csrc/*/ensemble_logits.*, guidg_fast._C.ensemble_logits_forward / _backward), or the eager
reference; the fused ones run inside the custom op pair ``guidg_fast::ensemble_logits`` /
``guidg_fast::ensemble_logits_backward``. The temperature is a constant of the
op (no gradient), as in the official code where logit_scale is frozen.
"""
from __future__ import annotations

import torch

from .. import _checks, reference
from . import _backend

SPEC = _backend.register(
    _backend.OpSpec(
        "ensemble_logits",
        ext_ops=("ensemble_logits_forward", "ensemble_logits_backward"),
        triton=True,
    )
)


def _triton_kernels():
    # imported on first use: TRITON_INTERPRET must be set before the kernels are decorated
    from ..kernels import ensemble_logits as kernels

    return kernels


def _forward_kernel(f, T, w, temperature: float, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _triton_kernels().ensemble_logits_forward(f, T, w, temperature)
    if backend == "ext":
        return _backend.load_extension().ensemble_logits_forward(f, T, w, temperature)
    raise ValueError(f"ensemble_logits: backend must be 'triton' or 'ext', got {backend!r}")


@torch.library.custom_op("guidg_fast::ensemble_logits", mutates_args=())
def _fused_ensemble_logits(f: torch.Tensor, T: torch.Tensor, w: torch.Tensor, temperature: float,
                           backend: str) -> torch.Tensor:
    return _forward_kernel(f, T, w, temperature, backend)


@_fused_ensemble_logits.register_fake
def _fused_ensemble_logits_fake(f, T, w, temperature, backend):
    return f.new_empty((f.shape[0], T.shape[1]))


@torch.library.custom_op("guidg_fast::ensemble_logits_backward", mutates_args=())
def _fused_ensemble_logits_backward(
    grad: torch.Tensor, f: torch.Tensor, T: torch.Tensor, w: torch.Tensor, temperature: float, backend: str,
    need_f: bool, need_T: bool, need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_f, grad_T, grad_w); a gradient that is not needed comes back as an empty (0,) tensor."""
    grad = grad.contiguous()
    if backend == "triton":
        grads = _triton_kernels().ensemble_logits_backward(grad, f, T, w, temperature, need_f, need_T, need_w)
        return tuple(g if g is not None else f.new_empty(0) for g in grads)
    if backend == "ext":
        return tuple(_backend.load_extension().ensemble_logits_backward(grad, f, T, w, temperature, need_f, need_T, need_w))
    raise ValueError(f"ensemble_logits_backward: backend must be 'triton' or 'ext', got {backend!r}")


@_fused_ensemble_logits_backward.register_fake
def _fused_ensemble_logits_backward_fake(grad, f, T, w, temperature, backend, need_f, need_T, need_w):
    return (
        f.new_empty(f.shape if need_f else (0,)),
        T.new_empty(T.shape if need_T else (0,)),
        w.new_empty(w.shape if need_w else (0,)),
    )


def _setup_context(ctx, inputs, output):
    f, T, w, temperature, backend = inputs
    ctx.save_for_backward(f, T, w)
    ctx.temperature = temperature
    ctx.backend = backend


def _backward(ctx, grad):
    f, T, w = ctx.saved_tensors
    need_f, need_T, need_w = ctx.needs_input_grad[:3]
    grad_f, grad_T, grad_w = torch.ops.guidg_fast.ensemble_logits_backward(
        grad, f, T, w, ctx.temperature, ctx.backend, need_f, need_T, need_w
    )
    return (grad_f if need_f else None, grad_T if need_T else None, grad_w if need_w else None, None, None)


_fused_ensemble_logits.register_autograd(_backward, setup_context=_setup_context)


def _check_weights(w, B: int, K: int, f: torch.Tensor) -> None:
    if not torch.compiler.is_compiling():
        _checks.check_expert_weights(w, B, K, f)
        return
    # traced: every shape check, but not the finite-value check, which reads data (a graph break)
    _checks.check_tensor(w, "w", (1, 2))
    _checks.check_same(w, "w", f, "f")
    expected = (K,) if w.dim() == 1 else (B, K)
    if tuple(w.shape) != expected:
        kind = "batch weights" if w.dim() == 1 else "per-sample weights"
        raise ValueError(f"w ({kind}) must have shape {expected}, got {tuple(w.shape)}")


def _compute_dtype(dtype: torch.dtype, backend: str, device_type: str) -> torch.dtype:
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32  # fp32 accumulation; the result is cast back
    if dtype == torch.float64 and backend == "ext" and device_type == "cuda":
        raise RuntimeError(
            "ensemble_logits: the CUDA extension kernel is float32 only; use the triton or eager backend for float64"
        )
    return dtype


def ensemble_logits(f, T, w, temperature) -> torch.Tensor:
    """(B, C) = sum_k w_k * tau * f @ T_k^T; f (B, D), T (K, C, D), w (K,) or (B, K)."""
    B, K, C, D = _checks.check_features(f, T)
    _check_weights(w, B, K, f)
    tau = _checks.check_temperature(temperature)
    backend = _backend.backend_for("ensemble_logits", f.device.type)
    if backend == "eager":
        return reference.ensemble_logits(f, T, w, tau)
    dtype = f.dtype
    compute = _compute_dtype(dtype, backend, f.device.type)
    f_, T_, w_ = ((x if x.dtype == compute else x.to(compute)).contiguous() for x in (f, T, w))
    out = torch.ops.guidg_fast.ensemble_logits(f_, T_, w_, tau, backend)
    return out if out.dtype == dtype else out.to(dtype)
