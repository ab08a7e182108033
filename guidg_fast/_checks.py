"""Argument validation shared by the reference and every fast op.

Each error is a ValueError that names the argument and says what was expected, so a bad call fails
at the API boundary rather than deep inside a kernel.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def _describe(x: torch.Tensor) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"


def check_tensor(x, name: str, ndim: int | Sequence[int] | None = None, floating: bool = True) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in dims:
            want = " or ".join(f"{d}-D" for d in dims)
            raise ValueError(f"{name} must be {want}, got {_describe(x)}")
    if floating and not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {_describe(x)}")
    return x


def check_same(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {x.device}")
    if x.is_floating_point() and x.dtype != ref.dtype:
        raise ValueError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {x.dtype}")


def check_shape(x: torch.Tensor, name: str, expected: Sequence[int], meaning: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({meaning}), got {tuple(x.shape)}")


def check_finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def check_temperature(temperature) -> float:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar, got shape {tuple(temperature.shape)}")
        temperature = float(temperature.detach())
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite positive number, got {temperature}")
    return temperature


def check_features(f, T) -> tuple[int, int, int, int]:
    """f (B, D) image features, T (K, C, D) expert text features. Returns B, K, C, D."""
    check_tensor(f, "f", 2)
    check_tensor(T, "T", 3)
    check_same(T, "T", f, "f")
    B, D = f.shape
    K, C, D_t = T.shape
    if D_t != D:
        raise ValueError(f"T must have shape (K, C, {D}) to match f (B, D={D}), got {tuple(T.shape)}")
    if B == 0 or K == 0 or C == 0 or D == 0:
        raise ValueError(f"f and T must be non-empty, got f {tuple(f.shape)} and T {tuple(T.shape)}")
    return B, K, C, D


def check_expert_weights(w, B: int, K: int, ref: torch.Tensor) -> torch.Tensor:
    """w (K,) batch weights or (B, K) per-sample weights."""
    check_tensor(w, "w", (1, 2))
    check_same(w, "w", ref, "f")
    if w.dim() == 1 and w.shape[0] != K:
        raise ValueError(f"w (batch weights) must have shape ({K},) = (K,), got {tuple(w.shape)}")
    if w.dim() == 2 and tuple(w.shape) != (B, K):
        raise ValueError(f"w (per-sample weights) must have shape ({B}, {K}) = (B, K), got {tuple(w.shape)}")
    check_finite(w.detach(), "w")
    return w


def check_labels(y, B: int, C: int, device: torch.device) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"y must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"y must be an int64 (or int32) tensor of class indices, got dtype {y.dtype}")
    if tuple(y.shape) != (B,):
        raise ValueError(f"y must have shape ({B},) = (B,), got {tuple(y.shape)}")
    if y.device != device:
        raise ValueError(f"y must be on f's device {device}, got {y.device}")
    lo, hi = (int(v) for v in torch.aminmax(y))
    if lo < 0 or hi >= C:
        raise ValueError(f"y must hold class indices in [0, {C}) (C = {C} classes in T), got values in [{lo}, {hi}]")
    return y


def check_cmattn_params(f, T, wv, bv, wt, bt, metric: str) -> tuple[int, int, int, int, int]:
    """Returns B, K, C, D, H."""
    B, K, C, D = check_features(f, T)
    check_tensor(wv, "wv", 3)
    H = wv.shape[0]
    if H == 0:
        raise ValueError(f"wv must hold at least one attention head (H >= 1), got shape {tuple(wv.shape)}")
    check_shape(wv, "wv", (H, D, D), "H heads of linear_v weights, D x D")
    check_tensor(bv, "bv", 2)
    check_shape(bv, "bv", (H, D), "H heads of linear_v biases")
    check_tensor(wt, "wt", 2)
    if wt.shape[0] == H and wt.shape[1] != C:
        raise ValueError(
            f"wt must have shape ({H}, {C}) = (H, C): the attention module was built for {wt.shape[1]} classes "
            f"but T has C = {C}"
        )
    check_shape(wt, "wt", (H, C), "H heads of linear_t weights over C classes")
    check_tensor(bt, "bt", 1)
    check_shape(bt, "bt", (H,), "H heads of linear_t biases")
    for name, p in (("wv", wv), ("bv", bv), ("wt", wt), ("bt", bt)):
        check_same(p, name, f, "f")
    if metric not in ("cosine", "dotproduct"):
        raise ValueError(f"metric must be 'cosine' or 'dotproduct', got {metric!r}")
    return B, K, C, D, H


def check_tensor_lists(averaged_tensors, tensors) -> None:
    averaged_tensors = list(averaged_tensors)
    tensors = list(tensors)
    if len(averaged_tensors) != len(tensors):
        raise ValueError(
            f"averaged_tensors and tensors must have the same length, got {len(averaged_tensors)} and {len(tensors)}"
        )
    for i, (a, t) in enumerate(zip(averaged_tensors, tensors)):
        check_tensor(a, f"averaged_tensors[{i}]")
        check_tensor(t, f"tensors[{i}]")
        if a.shape != t.shape:
            raise ValueError(f"averaged_tensors[{i}] has shape {tuple(a.shape)} but tensors[{i}] has {tuple(t.shape)}")
        check_same(t, f"tensors[{i}]", a, f"averaged_tensors[{i}]")


def check_multi_expert_loss_args(f, T, y, w, temperature, margin, entropy_weight, check_values: bool = True,
                                 defer_temperature: bool | None = None):
    """Every check of ``ops.multi_expert_loss``; returns (B, K, C, D, tau, margin, entropy_weight).

    ``check_values=False`` skips the checks that read the label and weight values: under
    torch.compile they would force a graph break (the fused op checks shapes, dtypes and devices
    while tracing and its kernels bound-check the labels), and the CPU extension op checks them
    itself. ``defer_temperature`` (default: ``not check_values``) leaves a tensor temperature
    unread: tau comes back None and the fused op reads it.
    """
    if defer_temperature is None:
        defer_temperature = not check_values
    B, K, C, D = check_features(f, T)
    if check_values:
        check_labels(y, B, C, f.device)
        check_expert_weights(w, B, K, f)
    else:
        if not isinstance(y, torch.Tensor):
            raise ValueError(f"y must be a torch.Tensor of class indices, got {type(y).__name__}")
        if y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"y must be an int64 (or int32) tensor of class indices, got dtype {y.dtype}")
        if tuple(y.shape) != (B,):
            raise ValueError(f"y must have shape ({B},) = (B,), got {tuple(y.shape)}")
        if y.device != f.device:
            raise ValueError(f"y must be on f's device {f.device}, got {y.device}")
        check_tensor(w, "w", (1, 2))
        check_same(w, "w", f, "f")
        if w.dim() == 1 and w.shape[0] != K:
            raise ValueError(f"w (batch weights) must have shape ({K},) = (K,), got {tuple(w.shape)}")
        if w.dim() == 2 and tuple(w.shape) != (B, K):
            raise ValueError(f"w (per-sample weights) must have shape ({B}, {K}) = (B, K), got {tuple(w.shape)}")
    if defer_temperature and isinstance(temperature, torch.Tensor):
        # a tensor temperature is read (and its value checked) inside the fused op while tracing
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar, got shape {tuple(temperature.shape)}")
        tau = None
    else:
        tau = check_temperature(temperature)
    values = []
    for name, value in (("margin", margin), ("entropy_weight", entropy_weight)):
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
            value = value.detach().item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        values.append(float(value))
    return B, K, C, D, tau, values[0], values[1]


def name_non_finite(named_tensors, fallback: str = "w") -> str:
    """The first of the caller's tensors holding NaN or Inf, for an error about a derived value."""
    for name, t in named_tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
            return name
    return fallback


def check_count(value, name: str, minimum: int = 1) -> int:
    """An int >= minimum (batch sizes, step counts)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def check_learning_rate(lr, name: str = "lr") -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {lr!r}")
    return float(lr)


def check_dataset_labels(labels: torch.Tensor, C: int, what: str, offset: int = 0) -> None:
    """Labels of a dataset (or of a batch starting at item ``offset``) in [0, C); names the dataset and item."""
    if labels.numel() == 0:
        return
    bad = (labels < 0) | (labels >= C)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{what} has label {int(labels[i])} at item {offset + i}, outside [0, {C}) for the model's {C} classes"
        )
