// CPU launcher for ensemble_logits: out (B, C) = tau * sum_k w_k f @ T_k^T.
//
// Batch weights w (K,): the experts are mixed once, M = tau * sum_k w_k T_k (C, D), and a single
// product f @ M^T replaces the K products of the official code. float32 on AVX-512 CPUs: one fused
// pass, tile by tile (M stays in L1); otherwise one parallel mixing pass, then one GEMM. Per-sample weights w (B, K):
// one GEMM against all experts at once, Y = f @ [T_1; ...; T_K]^T (B, K*C), then one parallel pass
// mixes Y over k. Backward uses the same mix / dot / scale passes around GEMMs (see the header);
// grad_w never builds a (B, K, C) tensor.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>
#include <algorithm>

#include "ensemble_logits.h"
#include "ensemble_logits_args.h"
#include "outputs.h"
#include "cpu_isa.h"
#include "launchers.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define GF_ENSEMBLE_AVX512_TILES 1
#endif

namespace guidg_fast {

// The mix loops stream memory; compiled per ISA and picked per call (cpu_isa.h) so that they
// vectorise with AVX-512/AVX2 where the CPU has them, without -march flags.

// Rows [lo, hi) of a mix: out[r, :n] = scale * sum_k weights[r * weight_row + k] * values[r * value_row + k * value_k + :n]
GF_ISA_INLINE void ensemble_mix_rows_f32_body(float* out, int64_t out_row, const float* values, int64_t value_row,
                                                  int64_t value_k, const float* weights, int64_t weight_row, int64_t K,
                                                  float scale, int64_t n, int64_t lo, int64_t hi) {
  for (int64_t r = lo; r < hi; ++r) {
    ensemble_mix_row<float>(out + r * out_row, values + r * value_row, value_k, weights + r * weight_row, 1, K, scale, n);
  }
}
GF_ISA_DISPATCH(void, ensemble_mix_rows_f32, (float* out, int64_t out_row, const float* values, int64_t value_row, int64_t value_k, const float* weights, int64_t weight_row, int64_t K, float scale, int64_t n, int64_t lo, int64_t hi), (out, out_row, values, value_row, value_k, weights, weight_row, K, scale, n, lo, hi))

GF_ISA_INLINE void ensemble_mix_rows_f64_body(double* out, int64_t out_row, const double* values, int64_t value_row,
                                                  int64_t value_k, const double* weights, int64_t weight_row, int64_t K,
                                                  double scale, int64_t n, int64_t lo, int64_t hi) {
  for (int64_t r = lo; r < hi; ++r) {
    ensemble_mix_row<double>(out + r * out_row, values + r * value_row, value_k, weights + r * weight_row, 1, K, scale, n);
  }
}
GF_ISA_DISPATCH(void, ensemble_mix_rows_f64, (double* out, int64_t out_row, const double* values, int64_t value_row, int64_t value_k, const double* weights, int64_t weight_row, int64_t K, double scale, int64_t n, int64_t lo, int64_t hi), (out, out_row, values, value_row, value_k, weights, weight_row, K, scale, n, lo, hi))

#ifdef GF_ENSEMBLE_AVX512_TILES
// Fused forward for batch weights, float32 on AVX-512 CPUs: the experts are mixed for a tile of
// kEnsembleTileRows classes into a small buffer that stays in L1 (M = tau * sum_k w_k T_k never goes
// to memory), and the tile is immediately multiplied with f, held transposed in panels of
// kEnsemblePanel samples: acc[i, b] += M[i, d] * f^T[d, b].
constexpr int kEnsembleTileRows = 4;
constexpr int kEnsemblePanel = 48;  // three 16-lane vectors

__attribute__((target("avx512f"))) void ensemble_tile_avx512(const float* mixed, int64_t D, const float* panel,
                                                              float* acc) {
  __m512 a[kEnsembleTileRows][3];
  for (int i = 0; i < kEnsembleTileRows; ++i) {
    for (int v = 0; v < 3; ++v) a[i][v] = _mm512_setzero_ps();
  }
  for (int64_t d = 0; d < D; ++d) {
    const float* p = panel + d * kEnsemblePanel;
    const __m512 p0 = _mm512_loadu_ps(p), p1 = _mm512_loadu_ps(p + 16), p2 = _mm512_loadu_ps(p + 32);
    for (int i = 0; i < kEnsembleTileRows; ++i) {
      const __m512 m = _mm512_set1_ps(mixed[i * D + d]);
      a[i][0] = _mm512_fmadd_ps(m, p0, a[i][0]);
      a[i][1] = _mm512_fmadd_ps(m, p1, a[i][1]);
      a[i][2] = _mm512_fmadd_ps(m, p2, a[i][2]);
    }
  }
  for (int i = 0; i < kEnsembleTileRows; ++i) {
    for (int v = 0; v < 3; ++v) _mm512_storeu_ps(acc + i * kEnsemblePanel + 16 * v, a[i][v]);
  }
}
#endif

namespace {

// the AVX-512 tile path runs where cpu_isa() (GUIDG_FAST_CPU_ISA) allows AVX-512
bool ensemble_avx512_tiles_enabled() {
#ifdef GF_ENSEMBLE_AVX512_TILES
  return cpu_isa() == Isa::kAvx512;
#else
  return false;
#endif
}

template <typename scalar_t>
void mix_rows(scalar_t* out, int64_t out_row, const scalar_t* values, int64_t value_row, int64_t value_k,
              const scalar_t* weights, int64_t weight_row, int64_t K, scalar_t scale, int64_t n, int64_t lo, int64_t hi) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    ensemble_mix_rows_f32(out, out_row, values, value_row, value_k, weights, weight_row, K, scale, n, lo, hi);
  } else {
    ensemble_mix_rows_f64(out, out_row, values, value_row, value_k, weights, weight_row, K, scale, n, lo, hi);
  }
}

void ensemble_check_cpu(const at::Tensor& f, const at::Tensor& T, const at::Tensor& w) {
  TORCH_CHECK(f.device().is_cpu(), "ensemble_logits (CPU kernel): every input must be a CPU tensor, got ", f.device());
  TORCH_CHECK(f.scalar_type() == at::kFloat || f.scalar_type() == at::kDouble,
              "ensemble_logits (CPU kernel): f must be float32 or float64, got ", f.scalar_type());
  ensemble_logits::check_inputs(f, T, w);
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

#ifdef GF_ENSEMBLE_AVX512_TILES
void ensemble_forward_tiles_avx512(at::Tensor& out, const at::Tensor& f, const at::Tensor& T, const at::Tensor& w,
                                   double temperature) {
  const int64_t B = f.size(0), D = f.size(1), K = T.size(0), C = T.size(1);
  const int64_t n_panels = (B + kEnsemblePanel - 1) / kEnsemblePanel;
  // f^T in zero-padded panels (n_panels, D, kEnsemblePanel): B * D values, negligible next to T
  auto panels = at::zeros({n_panels, D, kEnsemblePanel}, f.options());
  {
    const float* fp = f.data_ptr<float>();
    float* pp = panels.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      float* dst = pp + (b / kEnsemblePanel) * D * kEnsemblePanel + b % kEnsemblePanel;
      for (int64_t d = 0; d < D; ++d) dst[d * kEnsemblePanel] = fp[b * D + d];
    }
  }
  const float* t = T.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* pp = panels.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const auto scale = static_cast<float>(temperature);
  const int64_t n_tiles = (C + kEnsembleTileRows - 1) / kEnsembleTileRows;
  at::parallel_for(0, n_tiles, kEnsembleRowGrain, [&](int64_t lo, int64_t hi) {
    std::vector<float> mixed(kEnsembleTileRows * D, 0.f);
    alignas(64) float acc[kEnsembleTileRows * kEnsemblePanel];
    for (int64_t tile = lo; tile < hi; ++tile) {
      const int64_t c0 = tile * kEnsembleTileRows, rows = std::min<int64_t>(kEnsembleTileRows, C - c0);
      ensemble_mix_rows_f32(mixed.data(), D, t + c0 * D, D, C * D, wp, 0, K, scale, D, 0, rows);
      std::fill(mixed.begin() + rows * D, mixed.end(), 0.f);  // a partial last tile multiplies zeros
      for (int64_t p = 0; p < n_panels; ++p) {
        ensemble_tile_avx512(mixed.data(), D, pp + p * D * kEnsemblePanel, acc);
        const int64_t cols = std::min<int64_t>(kEnsemblePanel, B - p * kEnsemblePanel);
        for (int64_t i = 0; i < rows; ++i) {
          for (int64_t j = 0; j < cols; ++j) o[(p * kEnsemblePanel + j) * C + c0 + i] = acc[i * kEnsemblePanel + j];
        }
      }
    }
  });
}
#endif

}  // namespace

at::Tensor ensemble_logits_forward_cpu(const at::Tensor& f, const at::Tensor& T, const at::Tensor& w,
                                       double temperature) {
  ensemble_check_cpu(f, T, w);
  const int64_t B = f.size(0), D = f.size(1), K = T.size(0), C = T.size(1);
  auto out = new_output({B, C}, f.options());
  if (w.dim() == 1) {
#ifdef GF_ENSEMBLE_AVX512_TILES
    if (f.scalar_type() == at::kFloat && ensemble_avx512_tiles_enabled()) {
      ensemble_forward_tiles_avx512(out, f, T, w, temperature);
      return out;
    }
#endif
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
  ensemble_logits::check_grad(grad_in, f, T);
  const auto grad = grad_in.contiguous();
  // a gradient that is not needed comes back as an empty tensor (one per output: no aliasing)
  at::Tensor grad_f = at::empty({0}, f.options()), grad_T = at::empty({0}, f.options()),
             grad_w = at::empty({0}, f.options());
  const bool per_sample = w.dim() == 2;

  if (!per_sample) {
    if (need_f) {
      grad_f = new_output({B, D}, f.options());
      at::mm_out(grad_f, grad, mixed_experts(T, w, temperature));
    }
    if (need_T || need_w) {
      const auto G = at::mm(grad.t(), f);  // (C, D) = g^T f, shared by every expert
      if (need_T) grad_T = new_output({K, C, D}, T.options());
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
    if (need_f) grad_f = new_output({B, D}, f.options());
    if (need_w) grad_w = new_output({B, K}, w.options());
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
    grad_T = new_output({K, C, D}, T.options());
    at::bmm_out(grad_T, gw.transpose(1, 2), f.unsqueeze(0).expand({K, B, D}));
  }
  return {grad_f, grad_T, grad_w};
}

}  // namespace guidg_fast
