// cmattn as one C++ op with its autograd formula: the v-projection and class-pooling GEMMs, the
// fused score kernel of the tensor's device (csrc/cpu or csrc/cuda, through the dispatcher) and the
// backward GEMMs, composed in C++.
//
// Why: at step-2 shapes (B = 36, K = 3, H = 4, D = 512) the whole op is ~1 ms of GEMMs and
// microseconds of fused work; a Python autograd.Function that composes the same calls adds a few
// hundred microseconds of interpreter and dispatch time per step, on the CPU as on a GPU (where it
// is all of the op's time). The eager path of guidg_fast.ops.cross_modal_attention calls
// guidg_fast::cmattn (this file); torch.compile traces the Python custom op, whose extension
// backend calls cmattn_fused_forward / cmattn_fused_backward (also this file), so both paths run
// the same code.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "cmattn_cpu.h"
#include "common.h"
#include "dispatch_ops.h"

namespace guidg_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// fp16 / bf16 compute in fp32 (as the score kernels do); other dtypes as they are
at::Tensor compute(const at::Tensor& x, at::ScalarType dtype) { return x.scalar_type() == dtype ? x : x.to(dtype); }

at::Tensor scores_forward(const at::Tensor& q, const at::Tensor& keys, bool cosine) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("guidg_fast::cmattn_forward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(q, keys, cosine);
}

std::tuple<at::Tensor, at::Tensor> scores_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                   const at::Tensor& keys, bool cosine) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("guidg_fast::cmattn_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(grad_out, q, keys, cosine);
}

struct Dims {
  int64_t B, K, C, D, H;
};

// Shapes, dtypes and devices of (f, T, wv, bv, wt, bt); guidg_fast.ops checks the same with
// Python messages first, this guards direct torch.ops calls.
Dims check_params(const at::Tensor& f, const at::Tensor& T, const at::Tensor& wv, const at::Tensor& bv,
                  const at::Tensor& wt, const at::Tensor& bt) {
  GF_CHECK_DIM(f, 2, "f (B, D)");
  GF_CHECK_DIM(T, 3, "T (K, C, D)");
  GF_CHECK_DIM(wv, 3, "wv (H, D, D)");
  GF_CHECK_DIM(bv, 2, "bv (H, D)");
  GF_CHECK_DIM(wt, 2, "wt (H, C)");
  GF_CHECK_DIM(bt, 1, "bt (H,)");
  GF_CHECK_FLOATING(f, "f");
  const Dims d{f.size(0), T.size(0), T.size(1), f.size(1), wv.size(0)};
  TORCH_CHECK(T.size(2) == d.D, "T must have shape (K, C, ", d.D, ") to match f (B, D), got ", T.sizes());
  TORCH_CHECK(wv.size(1) == d.D && wv.size(2) == d.D, "wv must have shape (H, ", d.D, ", ", d.D, "), got ", wv.sizes());
  TORCH_CHECK(bv.size(0) == d.H && bv.size(1) == d.D, "bv must have shape (", d.H, ", ", d.D, "), got ", bv.sizes());
  TORCH_CHECK(wt.size(0) == d.H && wt.size(1) == d.C, "wt must have shape (", d.H, ", ", d.C, ") = (H, C), got ",
              wt.sizes());
  TORCH_CHECK(bt.size(0) == d.H, "bt must have shape (", d.H, ",), got ", bt.sizes());
  TORCH_CHECK(d.B > 0 && d.K > 0 && d.C > 0 && d.D > 0 && d.H > 0, "cmattn: f, T and wv must be non-empty, got ",
              f.sizes(), ", ", T.sizes(), " and ", wv.sizes());
  const std::array<std::pair<const at::Tensor*, const char*>, 5> others = {
      {{&T, "T"}, {&wv, "wv"}, {&bv, "bv"}, {&wt, "wt"}, {&bt, "bt"}}};
  for (const auto& [x, name] : others) {
    TORCH_CHECK(x->scalar_type() == f.scalar_type(), name, " must have f's dtype ", f.scalar_type(), ", got ",
                x->scalar_type());
    TORCH_CHECK(x->device() == f.device(), name, " must be on f's device ", f.device(), ", got ", x->device());
  }
  return d;
}

}  // namespace

void cmattn_check_params(const at::Tensor& f, const at::Tensor& T, const at::Tensor& wv, const at::Tensor& bv,
                         const at::Tensor& wt, const at::Tensor& bt) {
  check_params(f, T, wv, bv, wt, bt);
}

// -> (out (B, K) in f's dtype, q (B, H, D), keys (K, H, D)); q and keys (compute dtype) feed the backward
std::tuple<at::Tensor, at::Tensor, at::Tensor> cmattn_composite_forward(const at::Tensor& f_in, const at::Tensor& T_in,
                                                                    const at::Tensor& wv_in, const at::Tensor& bv_in,
                                                                    const at::Tensor& wt_in, const at::Tensor& bt_in,
                                                                    bool cosine) {
  at::NoGradGuard no_grad;  // raw values: the callers own the autograd
  const Dims d = check_params(f_in, T_in, wv_in, bv_in, wt_in, bt_in);
  const at::ScalarType dtype = is_half(f_in.scalar_type()) ? at::kFloat : f_in.scalar_type();
  const at::Tensor f = compute(f_in, dtype), T = compute(T_in, dtype).contiguous();
  // every head's v-projection at once, bias included: (B, D) x (D, H*D). On the CPU as
  // (H*D, D) x (D, B), the faster shape for a few dozen rows (~20% at B = 36, D = 512); q is then
  // the batch-minor view of that (H*D, B) result, which the CPU score kernels read as it is.
  const at::Tensor wv = compute(wv_in, dtype).reshape({d.H * d.D, d.D}), bv = compute(bv_in, dtype);
  at::Tensor q = f.device().is_cpu()
                     ? at::addmm(bv.reshape({d.H * d.D, 1}), wv, f.t()).t().view({d.B, d.H, d.D})
                     : at::addmm(bv.reshape({d.H * d.D}), f, wv.t()).view({d.B, d.H, d.D});
  // every head's class pooling for every expert, bias included: (H, C) x (C, D) per expert
  at::Tensor keys =
      at::baddbmm(compute(bt_in, dtype).view({1, d.H, 1}), compute(wt_in, dtype).expand({d.K, d.H, d.C}), T);
  at::Tensor out = scores_forward(q, keys, cosine);
  return {out.scalar_type() == f_in.scalar_type() ? out : out.to(f_in.scalar_type()), q, keys};
}

// -> (df, dT, dwv, dbv, dwt, dbt) in f's dtype; one not asked for in needs comes back empty
std::vector<at::Tensor> cmattn_composite_backward(const at::Tensor& grad_out, const at::Tensor& f_in,
                                              const at::Tensor& T_in, const at::Tensor& wv_in,
                                              const at::Tensor& wt_in, const at::Tensor& q, const at::Tensor& keys,
                                              bool cosine, std::array<bool, 6> needs) {
  at::NoGradGuard no_grad;
  GF_CHECK_DIM(q, 3, "q (B, H, D)");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const at::ScalarType dtype = q.scalar_type(), grad_dtype = f_in.scalar_type();
  const at::Tensor f = compute(f_in, dtype), T = compute(T_in, dtype).contiguous();
  at::Tensor dq, dkey;
  std::tie(dq, dkey) = scores_backward(compute(grad_out, dtype).contiguous(), q, keys, cosine);
  const at::Tensor dq_flat = dq.view({B, H * D});
  auto out = [&](bool need, auto&& make) {
    if (!need) return at::empty({0}, f_in.options());
    at::Tensor g = make();
    return g.scalar_type() == grad_dtype ? g : g.to(grad_dtype);
  };
  return {
      out(needs[0], [&] { return at::mm(dq_flat, compute(wv_in, dtype).reshape({H * D, D})); }),
      out(needs[1], [&] { return at::matmul(compute(wt_in, dtype).t(), dkey); }),  // (C, H) x (K, H, D) -> (K, C, D)
      out(needs[2], [&] { return at::mm(dq_flat.t(), f).view({H, D, D}); }),      // all heads: (H*D, B) x (B, D)
      out(needs[3], [&] { return dq.sum(0); }),
      out(needs[4], [&] { return at::bmm(dkey, T.transpose(1, 2)).sum(0); }),  // (K, H, C) summed over experts
      out(needs[5], [&] { return dkey.sum(at::IntArrayRef{0, 2}); }),
  };
}

namespace {

struct CmattnFunction : public torch::autograd::Function<CmattnFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& f, const at::Tensor& T, const at::Tensor& wv,
                            const at::Tensor& bv, const at::Tensor& wt, const at::Tensor& bt, bool cosine) {
    auto [out, q, keys] = dispatch::cmattn_fused_forward(f, T, wv, bv, wt, bt, cosine);
    ctx->save_for_backward({f, T, wv, wt, q, keys});
    ctx->saved_data["cosine"] = cosine;
    ctx->set_materialize_grads(false);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(7);
    std::array<bool, 6> needs{};
    bool any = false;
    for (size_t i = 0; i < needs.size(); ++i) any |= (needs[i] = ctx->needs_input_grad(i));
    if (!grads[0].defined() || !any) return result;  // undefined: the output was not used
    const auto saved = ctx->get_saved_variables();
    auto g = dispatch::cmattn_fused_backward(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
                                   ctx->saved_data["cosine"].toBool(), needs);
    for (size_t i = 0; i < needs.size(); ++i) {
      if (needs[i]) result[i] = std::move(g[i]);
    }
    return result;
  }
};

at::Tensor cmattn_autograd(const at::Tensor& f, const at::Tensor& T, const at::Tensor& wv, const at::Tensor& bv,
                           const at::Tensor& wt, const at::Tensor& bt, bool cosine) {
  return CmattnFunction::apply(f, T, wv, bv, wt, bt, cosine);
}

// below autograd (inference mode, or inputs that need no gradient): the forward alone
at::Tensor cmattn_plain(const at::Tensor& f, const at::Tensor& T, const at::Tensor& wv, const at::Tensor& bv,
                        const at::Tensor& wt, const at::Tensor& bt, bool cosine) {
  return std::get<0>(dispatch::cmattn_fused_forward(f, T, wv, bv, wt, bt, cosine));
}

}  // namespace

TORCH_LIBRARY_IMPL(guidg_fast, Autograd, m) { m.impl("cmattn", &cmattn_autograd); }

TORCH_LIBRARY_IMPL(guidg_fast, CompositeExplicitAutograd, m) {
  m.impl("cmattn", &cmattn_plain);
  m.impl("cmattn_fused_forward", &cmattn_composite_forward);
  m.impl("cmattn_fused_backward", &cmattn_composite_backward);
}

}  // namespace guidg_fast
