// Host-side argument checks of multi_expert_loss, shared by the CPU and CUDA launchers (the device
// specific checks -- CPU-only tensors, CUDA grid limits -- stay in each launcher).
#pragma once

#include <ATen/ATen.h>

#include "common.h"

namespace guidg_fast {
namespace multi_expert_loss {

struct Shapes {
  int64_t B, K, C, D;
  bool per_sample;
};

// f (B, D), T (K, C, D), y (B,) int64, w (K,) or (B, K): ranks, contiguity, dtypes, devices and sizes.
inline Shapes check_inputs(const at::Tensor& f, const at::Tensor& T, const at::Tensor& y, const at::Tensor& w) {
  GF_CHECK_DIM(f, 2, "f");
  GF_CHECK_DIM(T, 3, "T");
  GF_CHECK_DIM(y, 1, "y");
  TORCH_CHECK(w.dim() == 1 || w.dim() == 2, "w must be 1-D (K,) or 2-D (B, K), got shape ", w.sizes());
  GF_CHECK_CONTIGUOUS(f, "f");
  GF_CHECK_CONTIGUOUS(T, "T");
  GF_CHECK_CONTIGUOUS(y, "y");
  GF_CHECK_CONTIGUOUS(w, "w");
  GF_CHECK_FLOATING(f, "f");
  TORCH_CHECK(T.scalar_type() == f.scalar_type() && w.scalar_type() == f.scalar_type(),
              "T and w must have f's dtype ", f.scalar_type(), ", got ", T.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(y.scalar_type() == at::kLong, "y must be int64, got ", y.scalar_type());
  GF_CHECK_SAME_DEVICE(T, f, "T", "f");
  GF_CHECK_SAME_DEVICE(y, f, "y", "f");
  GF_CHECK_SAME_DEVICE(w, f, "w", "f");
  Shapes s{f.size(0), T.size(0), T.size(1), f.size(1), w.dim() == 2};
  TORCH_CHECK(T.size(2) == s.D, "T must have shape (K, C, ", s.D, "), got ", T.sizes());
  TORCH_CHECK(s.B > 0 && s.K > 0 && s.C > 0 && s.D > 0, "f and T must be non-empty, got ", f.sizes(), " and ", T.sizes());
  TORCH_CHECK(y.size(0) == s.B, "y must have shape (", s.B, ",), got ", y.sizes());
  if (s.per_sample) {
    TORCH_CHECK(w.size(0) == s.B && w.size(1) == s.K, "w (per-sample weights) must have shape (", s.B, ", ", s.K,
                "), got ", w.sizes());
  } else {
    TORCH_CHECK(w.size(0) == s.K, "w (batch weights) must have shape (", s.K, ",), got ", w.sizes());
  }
  return s;
}

}  // namespace multi_expert_loss
}  // namespace guidg_fast
