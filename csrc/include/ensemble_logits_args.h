// Host-side argument checks of ensemble_logits, shared by the CPU and CUDA launchers (which device
// and which dtypes a launcher takes stay in the launcher).
#pragma once

#include <ATen/ATen.h>

#include "common.h"

namespace guidg_fast {
namespace ensemble_logits {

// f (B, D), T (K, C, D), w (K,) or (B, K): ranks, one device, f's dtype, contiguity and sizes.
inline void check_inputs(const at::Tensor& f, const at::Tensor& T, const at::Tensor& w) {
  GF_CHECK_DIM(f, 2, "f");
  GF_CHECK_DIM(T, 3, "T");
  TORCH_CHECK(w.dim() == 1 || w.dim() == 2, "w must be (K,) batch weights or (B, K) per-sample weights, got shape ",
              w.sizes());
  GF_CHECK_SAME_DEVICE(T, f, "T", "f");
  GF_CHECK_SAME_DEVICE(w, f, "w", "f");
  TORCH_CHECK(T.scalar_type() == f.scalar_type(), "T must have f's dtype ", f.scalar_type(), ", got ", T.scalar_type());
  TORCH_CHECK(w.scalar_type() == f.scalar_type(), "w must have f's dtype ", f.scalar_type(), ", got ", w.scalar_type());
  GF_CHECK_CONTIGUOUS(f, "f");
  GF_CHECK_CONTIGUOUS(T, "T");
  GF_CHECK_CONTIGUOUS(w, "w");
  const int64_t B = f.size(0), D = f.size(1), K = T.size(0);
  TORCH_CHECK(T.size(2) == D, "T must have shape (K, C, ", D, ") to match f, got ", T.sizes());
  TORCH_CHECK(K > 0 && T.size(1) > 0 && B > 0 && D > 0, "f and T must be non-empty, got f ", f.sizes(), " and T ",
              T.sizes());
  if (w.dim() == 1) {
    TORCH_CHECK(w.size(0) == K, "w (batch weights) must have shape (", K, ",) = (K,), got ", w.sizes());
  } else {
    TORCH_CHECK(w.size(0) == B && w.size(1) == K, "w (per-sample weights) must have shape (", B, ", ", K,
                ") = (B, K), got ", w.sizes());
  }
}

// grad (B, C) of the backward: f's device and dtype.
inline void check_grad(const at::Tensor& grad, const at::Tensor& f, const at::Tensor& T) {
  const int64_t B = f.size(0), C = T.size(1);
  GF_CHECK_SAME_DEVICE(grad, f, "grad", "f");
  TORCH_CHECK(grad.scalar_type() == f.scalar_type(), "grad must have f's dtype ", f.scalar_type(), ", got ",
              grad.scalar_type());
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == B && grad.size(1) == C, "grad must have shape (", B, ", ", C,
              "), got ", grad.sizes());
}

}  // namespace ensemble_logits
}  // namespace guidg_fast
