// Calls of the extension's own kernel operators through the dispatcher, so that each device (and
// the meta / fake tensors of tracing) gets its own implementation. Shared by the C++ autograd ops
// in csrc/autograd. Host only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <tuple>
#include <vector>

namespace guidg_fast {
namespace dispatch {

using CmattnForward = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using LossForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LossBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// guidg_fast::cmattn_fused_forward -> (out (B, K), q (B, H, D), keys (K, H, D))
inline CmattnForward cmattn_fused_forward(const at::Tensor& f, const at::Tensor& T, const at::Tensor& wv,
                                          const at::Tensor& bv, const at::Tensor& wt, const at::Tensor& bt,
                                          bool cosine) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("guidg_fast::cmattn_fused_forward", "")
                             .typed<CmattnForward(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(f, T, wv, bv, wt, bt, cosine);
}

// guidg_fast::cmattn_fused_backward -> (df, dT, dwv, dbv, dwt, dbt), empty where not in needs
inline std::vector<at::Tensor> cmattn_fused_backward(const at::Tensor& grad_out, const at::Tensor& f,
                                                     const at::Tensor& T, const at::Tensor& wv, const at::Tensor& wt,
                                                     const at::Tensor& q, const at::Tensor& keys, bool cosine,
                                                     std::array<bool, 6> needs) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("guidg_fast::cmattn_fused_backward", "")
          .typed<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                                         std::array<bool, 6>)>();
  return op.call(grad_out, f, T, wv, wt, q, keys, cosine, needs);
}

// guidg_fast::multi_expert_loss_forward -> (loss, lse, ce, o, pbar)
inline LossForward loss_forward(const at::Tensor& f, const at::Tensor& T, const at::Tensor& y, const at::Tensor& w,
                                double temperature, double margin, double entropy_weight, bool need_o) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("guidg_fast::multi_expert_loss_forward", "")
                             .typed<LossForward(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, double, double, double, bool)>();
  return op.call(f, T, y, w, temperature, margin, entropy_weight, need_o);
}

// guidg_fast::multi_expert_loss_backward -> (df, dT, dw), empty where not needed
inline LossBackward loss_backward(const at::Tensor& grad, const at::Tensor& f, const at::Tensor& T,
                                  const at::Tensor& y, const at::Tensor& w, const at::Tensor& lse, const at::Tensor& ce,
                                  const at::Tensor& o, const at::Tensor& pbar, double temperature, double margin,
                                  double entropy_weight, bool need_f, bool need_T, bool need_w) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("guidg_fast::multi_expert_loss_backward", "")
          .typed<LossBackward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, double, double, double, bool, bool, bool)>();
  return op.call(grad, f, T, y, w, lse, ce, o, pbar, temperature, margin, entropy_weight, need_f, need_T, need_w);
}

}  // namespace dispatch
}  // namespace guidg_fast
