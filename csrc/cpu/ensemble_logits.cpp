// CPU launcher for ensemble_logits: out (B, C) = tau * sum_k w_k f @ T_k^T.
//
// Batch weights w (K,): one parallel pass mixes the experts, M = tau * sum_k w_k T_k (C, D), then a
// single GEMM f @ M^T replaces the K products of the official code. Per-sample weights w (B, K):
// one GEMM against all experts at once, Y = f @ [T_1; ...; T_K]^T (B, K*C), then one parallel pass
// mixes Y over k. Backward uses the same mix / dot / scale passes around GEMMs (see the header);
// grad_w never builds a (B, K, C) tensor.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

#include "ensemble_logits.h"

namespace guidg_fast {

// The mix loops stream memory; cloned per ISA (GCC function multi-versioning, chosen at load time)
// so that they vectorise with AVX-512/AVX2 where the CPU has them, without -march flags.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define GF_ENSEMBLE_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GF_ENSEMBLE_CPU_CLONES
#endif

// Rows [lo, hi) of a mix: out[r, :n] = scale * sum_k weights[r * weight_row + k] * values[r * value_row + k * value_k + :n]
GF_ENSEMBLE_CPU_CLONES void ensemble_mix_rows_f32(float* out, int64_t out_row, const float* values, int64_t value_row,
                                                  int64_t value_k, const float* weights, int64_t weight_row, int64_t K,
                                                  float scale, int64_t n, int64_t lo, int64_t hi) {
  for (int64_t r = lo; r < hi; ++r) {
    ensemble_mix_row<float>(out + r * out_row, values + r * value_row, value_k, weights + r * weight_row, 1, K, scale, n);
  }
}

GF_ENSEMBLE_CPU_CLONES void ensemble_mix_rows_f64(double* out, int64_t out_row, const double* values, int64_t value_row,
                                                  int64_t value_k, const double* weights, int64_t weight_row, int64_t K,
                                                  double scale, int64_t n, int64_t lo, int64_t hi) {
  for (int64_t r = lo; r < hi; ++r) {
    ensemble_mix_row<double>(out + r * out_row, values + r * value_row, value_k, weights + r * weight_row, 1, K, scale, n);
  }
}

namespace {

template <typename scalar_t>
void mix_rows(scalar_t* out, int64_t out_row, const scalar_t* values, int64_t value_row, int64_t value_k,
              const scalar_t* weights, int64_t weight_row, int64_t K, scalar_t scale, int64_t n, int64_t lo, int64_t hi) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    ensemble_mix_rows_f32(out, out_row, values, value_row, value_k, weights, weight_row, K, scale, n, lo, hi);
  } else {
    ensemble_mix_rows_f64(out, out_row, values, value_row, value_k, weights, weight_row, K, scale, n, lo, hi);
  }
}

// GUIDG_FAST_POISON=1: outputs start as NaN, so an element a kernel forgets to write fails parity.
at::Tensor ensemble_alloc(at::IntArrayRef shape, const at::Tensor& like) {
  const char* poison = std::getenv("GUIDG_FAST_POISON");
  if (poison != nullptr && std::strcmp(poison, "1") == 0) {
    return at::full(shape, std::numeric_limits<double>::quiet_NaN(), like.options());
  }
  return at::empty(shape, like.options());
}

void ensemble_check_cpu(const at::Tensor& f, const at::Tensor& T, const at::Tensor& w) {
  GF_CHECK_DIM(f, 2, "f");
  GF_CHECK_DIM(T, 3, "T");
  TORCH_CHECK(w.dim() == 1 || w.dim() == 2, "w must be (K,) batch weights or (B, K) per-sample weights, got shape ",
              w.sizes());
  for (const auto* x : {&f, &T, &w}) {
    TORCH_CHECK(x->device().is_cpu(), "ensemble_logits (CPU kernel): every input must be a CPU tensor, got ",
                x->device());
  }
  TORCH_CHECK(f.scalar_type() == at::kFloat || f.scalar_type() == at::kDouble,
              "ensemble_logits (CPU kernel): f must be float32 or float64, got ", f.scalar_type());
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

// M = tau * sum_k w_k T_k, (C, D): one streaming pass over T, rows in parallel.
at::Tensor mixed_experts(const at::Tensor& T, const at::Tensor& w, double tau) {
  const int64_t K = T.size(0), C = T.size(1), D = T.size(2);
  auto M = at::empty({C, D}, T.options());
  AT_DISPATCH_FLOATING_TYPES(T.scalar_type(), "ensemble_logits_mix_cpu", [&] {
    const scalar_t* t = T.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* m = M.data_ptr<scalar_t>();
    const auto scale = static_cast<scalar_t>(tau);
    at::parallel_for(0, C, kEnsembleRowGrain, [&](int64_t lo, int64_t hi) {
      mix_rows<scalar_t>(m, D, t, D, C * D, wp, 0, K, scale, D, lo, hi);
    });
  });
  return M;
}

at::Tensor ensemble_logits_forward_cpu(const at::Tensor& f, const at::Tensor& T, const at::Tensor& w,
                                       double temperature) {
  ensemble_check_cpu(f, T, w);
  const int64_t B = f.size(0), D = f.size(1), K = T.size(0), C = T.size(1);
  auto out = ensemble_alloc({B, C}, f);
  if (w.dim() == 1) {
    at::mm_out(out, f, mixed_experts(T, w, temperature).t());
    return out;
  }
  auto Y = at::mm(f, T.view({K * C, D}).t());  // (B, K*C): all experts in one GEMM
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "ensemble_logits_forward_cpu", [&] {
    const scalar_t* y = Y.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const auto scale = static_cast<scalar_t>(temperature);
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      mix_rows<scalar_t>(o, C, y, K * C, C, wp, K, K, scale, C, lo, hi);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ensemble_logits_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& f, const at::Tensor& T, const at::Tensor& w, double temperature,
    bool need_f, bool need_T, bool need_w) {
  ensemble_check_cpu(f, T, w);
  const int64_t B = f.size(0), D = f.size(1), K = T.size(0), C = T.size(1);
  TORCH_CHECK(grad_in.device().is_cpu() && grad_in.scalar_type() == f.scalar_type(),
              "grad must be a CPU tensor of f's dtype, got ", grad_in.device(), " ", grad_in.scalar_type());
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == B && grad_in.size(1) == C, "grad must have shape (", B, ", ", C,
              "), got ", grad_in.sizes());
  const auto grad = grad_in.contiguous();
  // a gradient that is not needed comes back as an empty tensor (one per output: no aliasing)
  at::Tensor grad_f = at::empty({0}, f.options()), grad_T = at::empty({0}, f.options()),
             grad_w = at::empty({0}, f.options());
  const bool per_sample = w.dim() == 2;

  if (!per_sample) {
    if (need_f) {
      grad_f = ensemble_alloc({B, D}, f);
      at::mm_out(grad_f, grad, mixed_experts(T, w, temperature));
    }
    if (need_T || need_w) {
      const auto G = at::mm(grad.t(), f);  // (C, D) = g^T f, shared by every expert
      if (need_T) grad_T = ensemble_alloc({K, C, D}, T);
      auto dots = at::empty({need_w ? K : 0, C}, f.options());
      AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "ensemble_logits_backward_T_cpu", [&] {
        const scalar_t* g = G.data_ptr<scalar_t>();
        const scalar_t* t = T.data_ptr<scalar_t>();
        const scalar_t* wp = w.data_ptr<scalar_t>();
        scalar_t* gt = need_T ? grad_T.data_ptr<scalar_t>() : nullptr;
        scalar_t* dp = need_w ? dots.data_ptr<scalar_t>() : nullptr;
        const auto tau = static_cast<scalar_t>(temperature);
        at::parallel_for(0, C, kEnsembleRowGrain, [&](int64_t lo, int64_t hi) {
          for (int64_t c = lo; c < hi; ++c) {
            const scalar_t* g_row = g + c * D;
            for (int64_t k = 0; k < K; ++k) {
              if (need_T) {
                const scalar_t factor = ensemble_scale_factor<scalar_t>(wp[k], tau);
                scalar_t* out_row = gt + (k * C + c) * D;
                for (int64_t d = 0; d < D; ++d) out_row[d] = factor * g_row[d];
              }
              if (need_w) dp[k * C + c] = tau * ensemble_dot<scalar_t, scalar_t>(t + (k * C + c) * D, g_row, D);
            }
          }
        });
      });
      if (need_w) grad_w = dots.sum(1);
    }
    return {grad_f, grad_T, grad_w};
  }

  if (need_f || need_w) {
    // H[k] = g @ T_k (K, B, D): the per-expert gradient of f, before the weights
    const auto H = at::matmul(grad.unsqueeze(0).expand({K, B, C}), T).contiguous();
    if (need_f) grad_f = ensemble_alloc({B, D}, f);
    if (need_w) grad_w = ensemble_alloc({B, K}, w);
    AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "ensemble_logits_backward_f_cpu", [&] {
      const scalar_t* h = H.data_ptr<scalar_t>();
      const scalar_t* fp = f.data_ptr<scalar_t>();
      const scalar_t* wp = w.data_ptr<scalar_t>();
      scalar_t* gf = need_f ? grad_f.data_ptr<scalar_t>() : nullptr;
      scalar_t* gw = need_w ? grad_w.data_ptr<scalar_t>() : nullptr;
      const auto tau = static_cast<scalar_t>(temperature);
      at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b) {
          if (need_f) mix_rows<scalar_t>(gf, D, h, D, B * D, wp, K, K, tau, D, b, b + 1);
          if (need_w) {
            for (int64_t k = 0; k < K; ++k) {
              gw[b * K + k] = tau * ensemble_dot<scalar_t, scalar_t>(fp + b * D, h + (k * B + b) * D, D);
            }
          }
        }
      });
    });
  }
  if (need_T) {
    // gw[k, b, c] = tau * w[b, k] * g[b, c]; grad_T[k] = gw[k]^T f, all experts in one batched GEMM
    auto gw = at::empty({K, B, C}, f.options());
    AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "ensemble_logits_backward_scale_cpu", [&] {
      const scalar_t* g = grad.data_ptr<scalar_t>();
      const scalar_t* wp = w.data_ptr<scalar_t>();
      scalar_t* out = gw.data_ptr<scalar_t>();
      const auto tau = static_cast<scalar_t>(temperature);
      at::parallel_for(0, K * B, kEnsembleRowGrain, [&](int64_t lo, int64_t hi) {
        for (int64_t kb = lo; kb < hi; ++kb) {
          const int64_t k = kb / B, b = kb % B;
          const scalar_t factor = ensemble_scale_factor<scalar_t>(wp[b * K + k], tau);
          for (int64_t c = 0; c < C; ++c) out[kb * C + c] = factor * g[b * C + c];
        }
      });
    });
    grad_T = ensemble_alloc({K, C, D}, T);
    at::bmm_out(grad_T, gw.transpose(1, 2), f.unsqueeze(0).expand({K, B, D}));
  }
  return {grad_f, grad_T, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(guidg_fast, CPU, m) {
  m.impl("ensemble_logits_forward", &ensemble_logits_forward_cpu);
  m.impl("ensemble_logits_backward", &ensemble_logits_backward_cpu);
}

}  // namespace guidg_fast
