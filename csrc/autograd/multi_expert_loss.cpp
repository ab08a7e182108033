// multi_expert_loss as one C++ op with its autograd formula over the fused forward / backward
// kernels of the tensor's device (csrc/cpu or csrc/cuda, through the dispatcher).
//
// Why: at step-2 shapes the fused loss is a few hundred microseconds; a Python autograd.Function
// around the same two kernels costs about as much again in interpreter and engine time. The eager
// path of guidg_fast.ops.multi_expert_loss calls guidg_fast::multi_expert_loss (this file);
// torch.compile traces the Python custom op, which calls the same two kernels.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "dispatch_ops.h"

#include <tuple>

namespace guidg_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// the kernels compute in fp32 or fp64: fp16 / bf16 inputs go in as fp32
at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor as_compute(const at::Tensor& x, at::ScalarType dtype) {
  return (x.scalar_type() == dtype ? x : x.to(dtype)).contiguous();
}

at::Tensor as_labels(const at::Tensor& y) { return (y.scalar_type() == at::kLong ? y : y.to(at::kLong)).contiguous(); }

at::Tensor cast(const at::Tensor& x, int64_t dtype) {
  const auto t = static_cast<at::ScalarType>(dtype);
  return x.scalar_type() == t ? x : x.to(t);
}

struct MultiExpertLossFunction : public torch::autograd::Function<MultiExpertLossFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& f, const at::Tensor& T, const at::Tensor& y,
                            const at::Tensor& w, double temperature, double margin, double entropy_weight,
                            bool need_o) {
    const at::ScalarType dtype = compute_dtype(f.scalar_type());
    const at::Tensor fc = as_compute(f, dtype), Tc = as_compute(T, dtype), wc = as_compute(w, dtype);
    const at::Tensor yc = as_labels(y);
    auto [loss, lse, ce, o, pbar] = dispatch::loss_forward(fc, Tc, yc, wc, temperature, margin, entropy_weight, need_o);
    ctx->save_for_backward({fc, Tc, yc, wc, lse, ce, o, pbar});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["margin"] = margin;
    ctx->saved_data["entropy_weight"] = entropy_weight;
    ctx->saved_data["f_dtype"] = static_cast<int64_t>(f.scalar_type());
    ctx->saved_data["T_dtype"] = static_cast<int64_t>(T.scalar_type());
    ctx->saved_data["w_dtype"] = static_cast<int64_t>(w.scalar_type());
    ctx->set_materialize_grads(false);
    return loss.scalar_type() == f.scalar_type() ? loss : loss.to(f.scalar_type());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(8);
    const bool need_f = ctx->needs_input_grad(0), need_T = ctx->needs_input_grad(1), need_w = ctx->needs_input_grad(3);
    if (!grads[0].defined() || !(need_f || need_T || need_w)) return result;
    const auto s = ctx->get_saved_variables();
    const at::Tensor grad = as_compute(grads[0], s[0].scalar_type());
    auto [df, dT, dw] = dispatch::loss_backward(grad, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7],
                                      ctx->saved_data["temperature"].toDouble(), ctx->saved_data["margin"].toDouble(),
                                      ctx->saved_data["entropy_weight"].toDouble(), need_f, need_T, need_w);
    if (need_f) result[0] = cast(df, ctx->saved_data["f_dtype"].toInt());
    if (need_T) result[1] = cast(dT, ctx->saved_data["T_dtype"].toInt());
    if (need_w) result[3] = cast(dw, ctx->saved_data["w_dtype"].toInt());
    return result;
  }
};

at::Tensor multi_expert_loss_autograd(const at::Tensor& f, const at::Tensor& T, const at::Tensor& y,
                                      const at::Tensor& w, double temperature, double margin, double entropy_weight) {
  // o (B, K, D) turns the CE backward into an elementwise step (no second class sweep); it is
  // needed when the backward needs sum_c dz T_c: for df, or for the margin path of dT
  const bool need_rows = f.requires_grad() || (T.requires_grad() && margin != 0.0);
  const bool need_o = entropy_weight == 0.0 && at::GradMode::is_enabled() && need_rows;
  return MultiExpertLossFunction::apply(f, T, y, w, temperature, margin, entropy_weight, need_o);
}

// below autograd (inference mode, or inputs that need no gradient): the forward alone
at::Tensor multi_expert_loss_plain(const at::Tensor& f, const at::Tensor& T, const at::Tensor& y, const at::Tensor& w,
                                   double temperature, double margin, double entropy_weight) {
  const at::ScalarType dtype = compute_dtype(f.scalar_type());
  const at::Tensor loss = std::get<0>(dispatch::loss_forward(as_compute(f, dtype), as_compute(T, dtype), as_labels(y),
                                                   as_compute(w, dtype), temperature, margin, entropy_weight, false));
  return loss.scalar_type() == f.scalar_type() ? loss : loss.to(f.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(guidg_fast, Autograd, m) { m.impl("multi_expert_loss", &multi_expert_loss_autograd); }

TORCH_LIBRARY_IMPL(guidg_fast, CompositeExplicitAutograd, m) { m.impl("multi_expert_loss", &multi_expert_loss_plain); }

}  // namespace guidg_fast
