// Host-side argument checks of eot_project, shared by the CPU and CUDA launchers (which device and
// which dtypes a launcher takes stay in the launcher).
#pragma once

#include <ATen/ATen.h>

#include "common.h"

namespace guidg_fast {
namespace eot_project {

// x (N, S, W), eot_index (N,) int64, ln_weight / ln_bias (W,), proj (W, D): ranks, sizes, one
// device, x's dtype.
inline void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& eot_index, const at::Tensor& w,
                         const at::Tensor& b, const at::Tensor& proj) {
  GF_CHECK_DIM(x, 3, "x");
  GF_CHECK_DIM(eot_index, 1, "eot_index");
  GF_CHECK_DIM(w, 1, "ln_weight");
  GF_CHECK_DIM(b, 1, "ln_bias");
  GF_CHECK_DIM(proj, 2, "proj");
  TORCH_CHECK(eot_index.scalar_type() == at::kLong, op, ": eot_index must be int64, got ", eot_index.scalar_type());
  TORCH_CHECK(eot_index.size(0) == x.size(0), op, ": eot_index must have shape (N,) = (", x.size(0), ",), got ",
              eot_index.sizes());
  const int64_t W = x.size(2);
  TORCH_CHECK(w.size(0) == W && b.size(0) == W, op, ": ln_weight and ln_bias must have shape (", W, ",)");
  TORCH_CHECK(proj.size(0) == W, op, ": proj must have shape (", W, ", D), got ", proj.sizes());
  for (const at::Tensor* t : {&eot_index, &w, &b, &proj}) {
    TORCH_CHECK(t->device() == x.device(), op, ": all inputs must be on x's device ", x.device());
  }
  for (const at::Tensor* t : {&w, &b, &proj}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ln_weight, ln_bias and proj must have x's dtype ",
                x.scalar_type(), ", got ", t->scalar_type());
  }
}

}  // namespace eot_project
}  // namespace guidg_fast
