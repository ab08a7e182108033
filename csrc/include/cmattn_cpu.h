// cmattn_fused_forward / cmattn_fused_backward: the device-generic ATen composite
// (csrc/autograd/cmattn.cpp; CUDA, meta / fake tensors, CPU dtypes other than float32 / float64)
// and the CPU whole-op paths (csrc/cpu/cmattn.cpp), which the CPU kernels of those two ops pick
// between. Host only.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>
#include <vector>

namespace guidg_fast {

// The argument checks of the whole op (shapes, dtypes, devices of f, T and the CMAttn parameters).
void cmattn_check_params(const at::Tensor& f, const at::Tensor& T, const at::Tensor& wv, const at::Tensor& bv,
                         const at::Tensor& wt, const at::Tensor& bt);

std::tuple<at::Tensor, at::Tensor, at::Tensor> cmattn_composite_forward(const at::Tensor& f, const at::Tensor& T,
                                                                        const at::Tensor& wv, const at::Tensor& bv,
                                                                        const at::Tensor& wt, const at::Tensor& bt,
                                                                        bool cosine);

std::vector<at::Tensor> cmattn_composite_backward(const at::Tensor& grad_out, const at::Tensor& f,
                                                  const at::Tensor& T, const at::Tensor& wv, const at::Tensor& wt,
                                                  const at::Tensor& q, const at::Tensor& keys, bool cosine,
                                                  std::array<bool, 6> needs);

// Whether cmattn_cpu_forward / cmattn_cpu_backward take these inputs (CPU, float32 or float64, a
// usable BLAS); otherwise the composite's ATen path runs.
bool cmattn_cpu_whole_op(const at::Tensor& f, const at::Tensor& T, const at::Tensor& wv);

// -> (out (B, K), q (B, H, D) batch-minor view of (H*D, B), keys (K, H, D)), as cmattn_fused_forward.
// With stats given, the per-row score statistics (norms, dots) go there for cmattn_cpu_backward,
// which then does not recompute them (the guidance_loss node keeps them between the two).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cmattn_cpu_forward(const at::Tensor& f, const at::Tensor& T,
                                                                  const at::Tensor& wv, const at::Tensor& bv,
                                                                  const at::Tensor& wt, const at::Tensor& bt,
                                                                  bool cosine, at::Tensor* stats = nullptr);

// -> (df, dT, dwv, dbv, dwt, dbt), as cmattn_fused_backward (an unneeded one comes back empty)
std::vector<at::Tensor> cmattn_cpu_backward(const at::Tensor& grad_out, const at::Tensor& f, const at::Tensor& T,
                                            const at::Tensor& wv, const at::Tensor& wt, const at::Tensor& q,
                                            const at::Tensor& keys, bool cosine, std::array<bool, 6> needs,
                                            const at::Tensor& stats = at::Tensor());

}  // namespace guidg_fast
