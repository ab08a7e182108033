// Host-side argument checks of cmattn's score kernels, shared by the CPU and CUDA launchers (the
// device-specific checks -- which device, the CUDA kernel's expert limit -- stay in each launcher).
#pragma once

#include <ATen/ATen.h>

#include "common.h"

namespace guidg_fast {
namespace cmattn {

// q (B, H, D), keys (K, H, D): one device, ranks, contiguity, float32 / float64, matching sizes.
inline void check_inputs(const at::Tensor& q, const at::Tensor& keys, const char* op) {
  GF_CHECK_SAME_DEVICE(q, keys, "q", "keys");
  GF_CHECK_DIM(q, 3, "q (B, H, D)");
  GF_CHECK_DIM(keys, 3, "keys (K, H, D)");
  GF_CHECK_CONTIGUOUS(q, "q");
  GF_CHECK_CONTIGUOUS(keys, "keys");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, op,
              ": q must be float32 or float64 (cast half precision up first), got ", q.scalar_type());
  TORCH_CHECK(keys.scalar_type() == q.scalar_type(), op, ": keys must have q's dtype ", q.scalar_type(), ", got ",
              keys.scalar_type());
  TORCH_CHECK(keys.size(1) == q.size(1) && keys.size(2) == q.size(2), op, ": keys must have shape (K, ", q.size(1),
              ", ", q.size(2), ") to match q (B, H, D) = ", q.sizes(), ", got ", keys.sizes());
  TORCH_CHECK(q.size(0) > 0 && keys.size(0) > 0 && q.size(1) > 0 && q.size(2) > 0, op,
              ": q and keys must be non-empty, got ", q.sizes(), " and ", keys.sizes());
}

// grad_out (B, K) of the backward, on q's device, in q's dtype, contiguous.
inline void check_grad_out(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& keys) {
  const int64_t B = q.size(0), K = keys.size(0);
  GF_CHECK_SAME_DEVICE(grad_out, q, "grad_out", "q");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({B, K}), "cmattn_backward: grad_out must have shape (", B, ", ", K,
              ") = (B, K), got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type(), "cmattn_backward: grad_out must have q's dtype ",
              q.scalar_type(), ", got ", grad_out.scalar_type());
  GF_CHECK_CONTIGUOUS(grad_out, "grad_out");
}

}  // namespace cmattn
}  // namespace guidg_fast
