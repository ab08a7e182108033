// ensemble_logits: out (B, C) = tau * sum_k w_k f @ T_k^T, per-element math shared by the CPU and
// CUDA launchers.
//
// The launchers reduce every step to three shapes of work around plain GEMMs:
//   mix    out[r, j] = scale * sum_k weights[r, k] * values[k, r, j]   (expert mixing, K terms)
//          batch weights: M = tau * sum_k w_k T_k (then one GEMM f @ M^T / g @ M);
//          per-sample:    out[b, c] = tau * sum_k w[b, k] Y[b, k, c] with Y = f @ T_flat^T, and
//                         grad_f[b, d] = tau * sum_k w[b, k] H[k, b, d] with H = g @ T_k
//   dot    grad_w terms: tau * <T_k[c], G[c]> (batch, G = g^T f), tau * <f[b], H[k, b]> (per-sample)
//   scale  grad_T[k] = (tau * w_k) * G (batch), gw[k, b, c] = (tau * w[b, k]) * g[b, c] (per-sample)
// Every element of a mix is computed in the same order on both devices: first term, then one
// multiply-add per further expert, then the scale.
#pragma once
#include <stdint.h>

#include "common.h"

namespace guidg_fast {

template <typename acc_t>
GF_HOST_DEVICE acc_t ensemble_mix_first(acc_t weight, acc_t value) {
  return weight * value;
}

template <typename acc_t>
GF_HOST_DEVICE acc_t ensemble_mix_next(acc_t acc, acc_t weight, acc_t value) {
  return acc + weight * value;
}

// One element of a mix: scale * sum_k weights[k * weight_stride] * values[k * value_stride].
template <typename scalar_t, typename acc_t>
GF_HOST_DEVICE acc_t ensemble_mix(const scalar_t* values, int64_t value_stride, const scalar_t* weights,
                                  int64_t weight_stride, int64_t K, acc_t scale) {
  acc_t acc = ensemble_mix_first(static_cast<acc_t>(weights[0]), static_cast<acc_t>(values[0]));
  for (int64_t k = 1; k < K; ++k) {
    acc = ensemble_mix_next(acc, static_cast<acc_t>(weights[k * weight_stride]),
                            static_cast<acc_t>(values[k * value_stride]));
  }
  return acc * scale;
}

// A whole row of a mix (CPU): one pass over the row in chunks held in a small local buffer, the
// experts streamed chunk by chunk, so each output element is written once and the inner loops
// vectorise. Element j gets exactly the operations of ensemble_mix.
constexpr int kEnsembleMixChunk = 64;

template <typename scalar_t>
GF_HOST_DEVICE void ensemble_mix_row(scalar_t* out, const scalar_t* values, int64_t value_stride,
                                     const scalar_t* weights, int64_t weight_stride, int64_t K, scalar_t scale,
                                     int64_t n) {
  const scalar_t w0 = weights[0];
  int64_t j0 = 0;
  for (; j0 + kEnsembleMixChunk <= n; j0 += kEnsembleMixChunk) {
    scalar_t acc[kEnsembleMixChunk];
    for (int j = 0; j < kEnsembleMixChunk; ++j) acc[j] = ensemble_mix_first(w0, values[j0 + j]);
    for (int64_t k = 1; k < K; ++k) {
      const scalar_t wk = weights[k * weight_stride];
      const scalar_t* v = values + k * value_stride + j0;
      for (int j = 0; j < kEnsembleMixChunk; ++j) acc[j] = ensemble_mix_next(acc[j], wk, v[j]);
    }
    for (int j = 0; j < kEnsembleMixChunk; ++j) out[j0 + j] = acc[j] * scale;
  }
  for (; j0 < n; ++j0) {
    out[j0] = ensemble_mix<scalar_t, scalar_t>(values + j0, value_stride, weights, weight_stride, K, scale);
  }
}

// Dot product of two rows with four interleaved partial sums (fixed order: deterministic, and a
// shorter rounding chain than one running sum).
template <typename scalar_t, typename acc_t>
GF_HOST_DEVICE acc_t ensemble_dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    s0 += static_cast<acc_t>(a[j]) * static_cast<acc_t>(b[j]);
    s1 += static_cast<acc_t>(a[j + 1]) * static_cast<acc_t>(b[j + 1]);
    s2 += static_cast<acc_t>(a[j + 2]) * static_cast<acc_t>(b[j + 2]);
    s3 += static_cast<acc_t>(a[j + 3]) * static_cast<acc_t>(b[j + 3]);
  }
  for (; j < n; ++j) s0 += static_cast<acc_t>(a[j]) * static_cast<acc_t>(b[j]);
  return (s0 + s1) + (s2 + s3);
}

// Scaled copy: out = (tau * weight) * value, the factor rounded once like the reference's
// weight-times-temperature.
template <typename acc_t>
GF_HOST_DEVICE acc_t ensemble_scale_factor(acc_t weight, acc_t tau) {
  return tau * weight;
}

// Rows of the CPU kernels are cut into blocks this long; the CUDA mix kernel uses it as block size.
constexpr int64_t kEnsembleRowGrain = 16;

}  // namespace guidg_fast
