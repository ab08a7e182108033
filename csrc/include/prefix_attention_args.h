// Host-side argument checks and stride helpers of prefix_attention, shared by the CPU and CUDA
// launchers (the device-specific checks -- dtypes, the CUDA head-size limit -- stay in each launcher).
#pragma once

#include <ATen/ATen.h>

#include "common.h"
#include "prefix_attention.h"

namespace guidg_fast {
namespace prefix_attention_args {

// The kernels index the last (Dh) dimension with stride 1; any other stride layout is read as is.
inline at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

inline PrefixAttentionShape check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& k_prefix, const at::Tensor& v_prefix) {
  GF_CHECK_DIM(q, 5, "q");
  GF_CHECK_DIM(k, 5, "k");
  GF_CHECK_DIM(v, 5, "v");
  GF_CHECK_DIM(k_prefix, 4, "k_prefix");
  GF_CHECK_DIM(v_prefix, 4, "v_prefix");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), op, ": k and v must have q's shape ", q.sizes(),
              ", got ", k.sizes(), " and ", v.sizes());
  const int64_t K = q.size(0), M = q.size(1), S = q.size(2), H = q.size(3), Dh = q.size(4), P = k_prefix.size(1);
  TORCH_CHECK(P >= 1, op, ": k_prefix must hold P >= 1 prefix keys, got shape ", k_prefix.sizes());
  TORCH_CHECK(k_prefix.sizes() == at::IntArrayRef({K, P, H, Dh}), op, ": k_prefix must have shape (", K, ", P, ", H,
              ", ", Dh, "), got ", k_prefix.sizes());
  TORCH_CHECK(v_prefix.sizes() == k_prefix.sizes(), op, ": v_prefix must have k_prefix's shape ", k_prefix.sizes(),
              ", got ", v_prefix.sizes());
  for (const at::Tensor* t : {&k, &v, &k_prefix, &v_prefix}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": all inputs must have q's dtype ", q.scalar_type(),
                ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), op, ": all inputs must be on q's device ", q.device());
  }
  return {K, M, S, H, Dh, P};
}

inline SuffixStrides suffix_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }
inline PrefixStrides prefix_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

}  // namespace prefix_attention_args
}  // namespace guidg_fast
