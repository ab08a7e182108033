"""multi_expert_loss: sum_k w_k CE(tau (f - margin T_k[y]) T_k^T, y) plus the optional UEO term.

    z_bk = tau (f_b - margin T_k[y_b]) . T_k^T                      (C logits of expert k)
    loss = sum_k sum_b a_bk CE(z_bk, y_b)                           a_bk = w_k / B or w_bk / B
         + entropy_weight sum_k [ mean_b H(p_bk) - H(mean_b p_bk) ]  p = softmax(z), H(p) = -sum p log(p + 1e-5)

How the fused backends (Triton, C++ CPU, CUDA) compute it without ever holding the (B, K, C)
logits: every kernel walks the classes of one expert in tiles and recomputes a tile's logits from
f and T when it needs them (a (rows x D) by (D x classes) product).

Forward
  pass 1, per (expert, block of rows), sweeping class tiles: an online log-sum-exp (running max and
    rescaled running sum) gives lse_bk and CE_bk = lse_bk - z_{b,y_b}. When a gradient will be
    needed and the entropy term is off, the same sweep also accumulates o_bk = sum_c p_bc T_k[c]
    (B x K x D, whatever C) flash-attention style (rescaled whenever the running max moves): the
    CE gradient through the logits is then sum_c dz_bc T_k[c] = grad a_bk (o_bk - T_k[y_b]), with
    no second sweep. (Without o the backward makes that sweep itself.)
    (Triton: when (expert, row block) pairs are too few to fill the GPU, e.g. B = 36, K = 3, the
    classes are also split across programs; each split keeps its own running max / sum / target
    logit (and unnormalised o, which caps the splits at C / D so that these partials stay no
    larger than the logits they replace), and a merge kernel combines them through their LSEs.)
  pass 2, only with the entropy term, per (expert, class tile), sweeping all rows: with lse from
    pass 1, p = exp(z - lse) gives the per-class column sums -> pbar_k = mean_b p_bk (kept for the
    backward) and sum_b sum_c -p log(p + eps); each program adds its classes' share of
    mean_b H(p_b) - H(pbar_k) to a per-program partial, so no atomics are needed.
  a final reduction sums a_bk CE_bk and the entropy partials into the scalar loss.
Backward (q_bk = sum_c dz_bc T_k[c], dz the gradient of the loss w.r.t. the logits)
  rows, per block of rows: q from o when the forward kept it, else one class sweep that accumulates
    A = sum_c (a p + ew p u) T_c and, with the entropy term, O = sum_c p T_c and r = sum_c p u,
    where u_bc = dE/dp_bc needs pbar from forward pass 2; then q = grad (A - a T_y - ew r O).
    df_b = tau sum_k q_bk, and dw = grad CE / B (summed over the batch for batch weights).
  experts (only when T requires grad), per (expert, class tile), sweeping all rows: recompute p,
    dz_bc = grad (a (p - [c = y]) + ew p (u - r)), dT_kc = tau sum_b dz_bc g_b, plus the margin
    path through the gathered T_k[y_b]: dT_k[y_b] -= margin tau q_bk (a one-hot product inside the
    tile that owns class y_b, so again no atomics).
The temperature is a constant (as in the official code): a tensor temperature is read as a number.
Under torch.compile a tensor temperature goes into the fused op as a tensor and is read there, so
tracing needs no .item() (no graph break); its value is checked when the op runs.

Schemas: the custom op pair ``guidg_fast::multi_expert_loss`` / ``guidg_fast::multi_expert_loss_backward``
(one register_fake each, one autograd registration); its ``ext`` backend calls
guidg_fast._C.multi_expert_loss_forward / _backward.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _checks, reference
from . import _backend

SPEC = _backend.register(
    _backend.OpSpec("multi_expert_loss", ext_ops=("multi_expert_loss_forward", "multi_expert_loss_backward"), triton=True)
)

_COMPUTE_DTYPES = (torch.float32, torch.float64)


def _kernels():
    from ..kernels import multi_expert_loss as kernels

    return kernels


def _temperature(temperature: float, temperature_tensor) -> float:
    return temperature if temperature_tensor is None else _checks.check_temperature(temperature_tensor)


def _forward_impl(backend, f, T, y, w, temperature, margin, entropy_weight, need_o):
    if backend == "triton":
        return _kernels().multi_expert_loss_forward(f, T, y, w, temperature, margin, entropy_weight, need_o)
    if backend == "ext":
        return _backend.load_extension().multi_expert_loss_forward(f, T, y, w, temperature, margin, entropy_weight,
                                                                   need_o)
    raise RuntimeError(f"multi_expert_loss has no backend {backend!r}")


def _backward_impl(backend, grad, f, T, y, w, lse, ce, o, pbar, temperature, margin, entropy_weight, need_f, need_T, need_w):
    args = (grad, f, T, y, w, lse, ce, o, pbar, temperature, margin, entropy_weight, need_f, need_T, need_w)
    if backend == "triton":
        return _kernels().multi_expert_loss_backward(*args)
    if backend == "ext":
        return _backend.load_extension().multi_expert_loss_backward(*args)
    raise RuntimeError(f"multi_expert_loss_backward has no backend {backend!r}")


def _forward_shapes(f, T, entropy_weight, need_o):
    B, D = f.shape
    K, C, _ = T.shape
    has_o = need_o and entropy_weight == 0.0
    return (), (B, K), (B, K), ((B, K, D) if has_o else (0,)), ((K, C) if entropy_weight != 0.0 else (0,))


@torch.library.custom_op("guidg_fast::multi_expert_loss", mutates_args=())
def fused_multi_expert_loss(
    f: torch.Tensor, T: torch.Tensor, y: torch.Tensor, w: torch.Tensor, temperature: float,
    temperature_tensor: Optional[torch.Tensor], margin: float, entropy_weight: float, backend: str, need_o: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse (B, K), ce (B, K), o (B, K, D) or empty, pbar (K, C) or empty); see the module docstring.

    temperature_tensor, when given, replaces temperature (a tensor temperature under torch.compile)."""
    tau = _temperature(temperature, temperature_tensor)
    return tuple(_forward_impl(backend, f, T, y, w, tau, margin, entropy_weight, need_o))


@fused_multi_expert_loss.register_fake
def _fused_fake(f, T, y, w, temperature, temperature_tensor, margin, entropy_weight, backend, need_o):
    return tuple(f.new_empty(shape) for shape in _forward_shapes(f, T, entropy_weight, need_o))


@torch.library.custom_op("guidg_fast::multi_expert_loss_backward", mutates_args=())
def fused_multi_expert_loss_backward(
    grad: torch.Tensor, f: torch.Tensor, T: torch.Tensor, y: torch.Tensor, w: torch.Tensor, lse: torch.Tensor,
    ce: torch.Tensor, o: torch.Tensor, pbar: torch.Tensor, temperature: float,
    temperature_tensor: Optional[torch.Tensor], margin: float, entropy_weight: float, backend: str, need_f: bool,
    need_T: bool, need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(df (B, D), dT (K, C, D), dw like w); a gradient that is not needed comes back empty."""
    tau = _temperature(temperature, temperature_tensor)
    return tuple(
        _backward_impl(backend, grad, f, T, y, w, lse, ce, o, pbar, tau, margin, entropy_weight, need_f, need_T, need_w)
    )


@fused_multi_expert_loss_backward.register_fake
def _fused_backward_fake(grad, f, T, y, w, lse, ce, o, pbar, temperature, temperature_tensor, margin, entropy_weight,
                         backend, need_f, need_T, need_w):
    return (
        f.new_empty(f.shape if need_f else (0,)),
        T.new_empty(T.shape if need_T else (0,)),
        w.new_empty(w.shape if need_w else (0,)),
    )


def _setup_context(ctx, inputs, output):
    f, T, y, w, temperature, temperature_tensor, margin, entropy_weight, backend, _ = inputs
    _, lse, ce, o, pbar = output
    ctx.save_for_backward(f, T, y, w, lse, ce, o, pbar, temperature_tensor)
    ctx.constants = (temperature, margin, entropy_weight, backend)
    ctx.mark_non_differentiable(lse, ce, o, pbar)


def _backward(ctx, grad_loss, *_):
    f, T, y, w, lse, ce, o, pbar, temperature_tensor = ctx.saved_tensors
    temperature, margin, entropy_weight, backend = ctx.constants
    need_f, need_T, _, need_w = ctx.needs_input_grad[:4]
    df, dT, dw = fused_multi_expert_loss_backward(
        grad_loss, f, T, y, w, lse, ce, o, pbar, temperature, temperature_tensor, margin, entropy_weight, backend,
        need_f, need_T, need_w,
    )
    return (df if need_f else None, dT if need_T else None, None, dw if need_w else None) + (None,) * 6


fused_multi_expert_loss.register_autograd(_backward, setup_context=_setup_context)


def multi_expert_loss(f, T, y, w, temperature, margin: float = 0.0, entropy_weight: float = 0.0) -> torch.Tensor:
    compiling = torch.compiler.is_compiling()
    device_type = f.device.type if isinstance(f, torch.Tensor) else "cpu"
    backend = _backend.backend_for("multi_expert_loss", device_type)
    # label range and finite weights read data: checked eagerly, inside the op when traced
    _, _, _, _, tau, margin, entropy_weight = _checks.check_multi_expert_loss_args(
        f, T, y, w, temperature, margin, entropy_weight, check_values=not compiling, defer_temperature=compiling,
    )
    if backend == "eager":
        return reference.multi_expert_loss(f, T, y, w, temperature, margin=margin, entropy_weight=entropy_weight)
    tau_tensor = None
    if tau is None:  # a tensor temperature while tracing: read inside the fused op
        tau, tau_tensor = 1.0, temperature.detach().reshape(())
    dtype = f.dtype if f.dtype in _COMPUTE_DTYPES else torch.float32  # fp16 / bf16 compute in fp32
    f_c, T_c, w_c = (x.to(dtype).contiguous() for x in (f, T, w))
    y_c = y.to(torch.int64).contiguous()
    # o (B, K, D) turns the CE backward into an elementwise step (no second class sweep); it is
    # needed when the backward needs sum_c dz T_c: for df, or for the margin path of dT
    need_rows = f.requires_grad or (T.requires_grad and margin != 0.0)
    need_o = entropy_weight == 0.0 and torch.is_grad_enabled() and need_rows
    loss = fused_multi_expert_loss(f_c, T_c, y_c, w_c, tau, tau_tensor, margin, entropy_weight, backend, need_o)[0]
    return loss if loss.dtype == f.dtype else loss.to(f.dtype)
