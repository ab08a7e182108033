// guidg_fast::guidance_loss: GuiDG's step-2 guidance -- the CMAttn expert weights, their batch mean
// (or the per-sample weights) and the multi-expert loss -- as one C++ autograd node over the same
// kernels the two separate ops use: multi_expert_loss_forward / _backward through the dispatcher,
// cmattn's whole-op CPU kernels called directly on real CPU tensors (so the score statistics of the
// forward serve the backward too), cmattn_fused_forward / _backward through the dispatcher elsewhere.
//
// Why: composed, the two ops plus the batch mean are three autograd nodes and two Python wrappers
// per step; on the 2-core CPU that was ~0.25 ms of a ~1.7 ms guidance step (the same C++ calls made
// directly took ~1.45 ms). One node keeps the kernels and removes the rest.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "cmattn_cpu.h"
#include "dispatch_ops.h"

namespace guidg_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The kernels behind both ops compute in float32 / float64 (guidg_fast.ops.guidance_loss composes
// the two ops for other dtypes); shapes, dtypes and devices of the rest are checked by
// cmattn_fused_forward and multi_expert_loss_forward themselves.
void check_guidance_dtype(const at::Tensor& f) {
  TORCH_CHECK(f.scalar_type() == at::kFloat || f.scalar_type() == at::kDouble,
              "guidance_loss: f must be float32 or float64, got ", f.scalar_type());
}

// A CPU tensor whose data this file may read directly: not a fake / functional / functorch wrapper
// (torch.compile and opcheck trace this node with those; they take the ATen calls below).
bool plain_cpu(const at::Tensor& t) {
  static const c10::DispatchKeySet wrappers({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                             c10::DispatchKey::FuncTorchBatched,
                                             c10::DispatchKey::FuncTorchGradWrapper});
  return t.device().is_cpu() && t.layout() == at::kStrided && (t.key_set() & wrappers).empty();
}

// w = mean over the batch of cmattn's (B, K) weights. On the CPU a plain loop over the 36 x 3
// values: at::mean's dispatch and reduction set-up cost ~15 us there, as much as a small kernel.
at::Tensor batch_mean(const at::Tensor& out) {
  if (!plain_cpu(out) || !out.is_contiguous()) return out.mean(0);
  const int64_t B = out.size(0), K = out.size(1);
  at::Tensor w = at::empty({K}, out.options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "guidance_batch_mean", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p = out.data_ptr<scalar_t>();
    scalar_t* wp = w.data_ptr<scalar_t>();
    for (int64_t k = 0; k < K; ++k) {
      acc_t sum = 0;
      for (int64_t b = 0; b < B; ++b) sum += static_cast<acc_t>(p[b * K + k]);
      wp[k] = static_cast<scalar_t>(sum / static_cast<acc_t>(B));
    }
  });
  return w;
}

// The batch mean's backward: every sample's weights get dw / B, as a contiguous (B, K) tensor.
at::Tensor batch_mean_backward(const at::Tensor& dw, int64_t B) {
  const int64_t K = dw.size(0);
  if (!plain_cpu(dw)) return (dw / static_cast<double>(B)).unsqueeze(0).expand({B, K}).contiguous();
  const at::Tensor d = dw.contiguous();
  at::Tensor g = at::empty({B, K}, d.options());
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "guidance_batch_mean_backward", [&] {
    const scalar_t* dp = d.data_ptr<scalar_t>();
    scalar_t* gp = g.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t k = 0; k < K; ++k) gp[b * K + k] = dp[k] / static_cast<scalar_t>(B);
    }
  });
  return g;
}

// (loss, w, and what the backward needs) without autograd
struct GuidanceForward {
  at::Tensor loss, w, q, keys, lse, ce, o, pbar, y;
  at::Tensor stats;  // cmattn's score statistics, when its CPU whole-op kernels ran directly
};

// Real CPU tensors of the dtype cmattn's whole-op CPU kernels take: this node calls those kernels
// itself (not through the dispatcher, whose op boundary would drop the score statistics the
// backward reuses), after the op's own argument checks.
bool direct_cpu(const at::Tensor& f, const at::Tensor& T, const at::Tensor& wv, const at::Tensor& bv,
                const at::Tensor& wt, const at::Tensor& bt) {
  for (const at::Tensor* t : {&f, &T, &wv, &bv, &wt, &bt}) {
    if (!plain_cpu(*t)) return false;
  }
  return cmattn_cpu_whole_op(f, T, wv);
}

GuidanceForward guidance_forward(const at::Tensor& f, const at::Tensor& T, const at::Tensor& y, const at::Tensor& wv,
                                 const at::Tensor& bv, const at::Tensor& wt, const at::Tensor& bt, double temperature,
                                 double margin, double entropy_weight, bool cosine, bool per_sample, bool need_o) {
  check_guidance_dtype(f);
  GuidanceForward r;
  at::Tensor out;
  // the official code detaches f and T before CMAttn: its parameters alone get gradients there
  if (direct_cpu(f, T, wv, bv, wt, bt)) {
    cmattn_check_params(f, T, wv, bv, wt, bt);
    std::tie(out, r.q, r.keys) = cmattn_cpu_forward(f.detach(), T.detach(), wv, bv, wt, bt, cosine, &r.stats);
  } else {
    std::tie(out, r.q, r.keys) = dispatch::cmattn_fused_forward(f.detach(), T.detach(), wv, bv, wt, bt, cosine);
  }
  r.w = per_sample ? out : batch_mean(out);
  r.y = y.scalar_type() == at::kLong ? y.contiguous() : y.to(at::kLong).contiguous();
  std::tie(r.loss, r.lse, r.ce, r.o, r.pbar) =
      dispatch::loss_forward(f.contiguous(), T.contiguous(), r.y, r.w.contiguous(), temperature, margin, entropy_weight,
                      need_o);
  return r;
}

struct GuidanceFunction : public torch::autograd::Function<GuidanceFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& f, const at::Tensor& T, const at::Tensor& y,
                               const at::Tensor& wv, const at::Tensor& bv, const at::Tensor& wt, const at::Tensor& bt,
                               double temperature, double margin, double entropy_weight, bool cosine,
                               bool per_sample, bool need_o) {
    GuidanceForward r =
        guidance_forward(f, T, y, wv, bv, wt, bt, temperature, margin, entropy_weight, cosine, per_sample, need_o);
    ctx->save_for_backward({f, T, r.y, r.w, r.lse, r.ce, r.o, r.pbar, wv, wt, r.q, r.keys, r.stats});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["margin"] = margin;
    ctx->saved_data["entropy_weight"] = entropy_weight;
    ctx->saved_data["cosine"] = cosine;
    ctx->saved_data["per_sample"] = per_sample;
    ctx->mark_non_differentiable({r.w});
    ctx->set_materialize_grads(false);
    return {r.loss, r.w};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(13);
    const bool need_f = ctx->needs_input_grad(0), need_T = ctx->needs_input_grad(1);
    std::array<bool, 6> needs{false, false, ctx->needs_input_grad(3), ctx->needs_input_grad(4),
                              ctx->needs_input_grad(5), ctx->needs_input_grad(6)};
    const bool need_w = needs[2] || needs[3] || needs[4] || needs[5];
    if (!grads[0].defined() || !(need_f || need_T || need_w)) return result;
    const auto s = ctx->get_saved_variables();
    const at::Tensor &f = s[0], &T = s[1], &y = s[2], &w = s[3];
    const double temperature = ctx->saved_data["temperature"].toDouble();
    const double margin = ctx->saved_data["margin"].toDouble();
    const double entropy_weight = ctx->saved_data["entropy_weight"].toDouble();
    const at::Tensor grad = grads[0].scalar_type() == f.scalar_type() ? grads[0] : grads[0].to(f.scalar_type());
    auto [df, dT, dw] = dispatch::loss_backward(grad, f.contiguous(), T.contiguous(), y, w.contiguous(), s[4], s[5],
                                                s[6], s[7], temperature, margin, entropy_weight, need_f, need_T,
                                                need_w);
    if (need_f) result[0] = df;
    if (need_T) result[1] = dT;
    if (need_w) {
      const at::Tensor grad_out =
          ctx->saved_data["per_sample"].toBool() ? dw.contiguous() : batch_mean_backward(dw, f.size(0));
      const bool cosine = ctx->saved_data["cosine"].toBool();
      auto g = s[12].defined() ? cmattn_cpu_backward(grad_out, f.detach(), T.detach(), s[8], s[9], s[10], s[11], cosine,
                                                     needs, s[12])
                               : dispatch::cmattn_fused_backward(grad_out, f.detach(), T.detach(), s[8], s[9], s[10],
                                                                 s[11], cosine, needs);
      for (int i = 2; i < 6; ++i) {
        if (needs[i]) result[i + 1] = std::move(g[i]);
      }
    }
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> guidance_autograd(const at::Tensor& f, const at::Tensor& T, const at::Tensor& y,
                                                     const at::Tensor& wv, const at::Tensor& bv, const at::Tensor& wt,
                                                     const at::Tensor& bt, double temperature, double margin,
                                                     double entropy_weight, bool cosine, bool per_sample) {
  // o (B, K, D) saves the loss backward a class sweep when it needs sum_c dz T_c (for df, or the
  // margin path of dT), as in multi_expert_loss
  const bool need_rows = f.requires_grad() || (T.requires_grad() && margin != 0.0);
  const bool need_o = entropy_weight == 0.0 && at::GradMode::is_enabled() && need_rows;
  auto out = GuidanceFunction::apply(f, T, y, wv, bv, wt, bt, temperature, margin, entropy_weight, cosine, per_sample,
                                     need_o);
  return {out[0], out[1]};
}

// below autograd (inference mode, or nothing requires grad): the forward alone
std::tuple<at::Tensor, at::Tensor> guidance_plain(const at::Tensor& f, const at::Tensor& T, const at::Tensor& y,
                                                  const at::Tensor& wv, const at::Tensor& bv, const at::Tensor& wt,
                                                  const at::Tensor& bt, double temperature, double margin,
                                                  double entropy_weight, bool cosine, bool per_sample) {
  GuidanceForward r =
      guidance_forward(f, T, y, wv, bv, wt, bt, temperature, margin, entropy_weight, cosine, per_sample, false);
  return {r.loss, r.w};
}

}  // namespace

TORCH_LIBRARY_IMPL(guidg_fast, Autograd, m) { m.impl("guidance_loss", &guidance_autograd); }

TORCH_LIBRARY_IMPL(guidg_fast, CompositeExplicitAutograd, m) { m.impl("guidance_loss", &guidance_plain); }

}  // namespace guidg_fast
