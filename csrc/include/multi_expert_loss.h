// multi_expert_loss: per-logit math shared by the CPU and CUDA launchers (the Triton kernels in
// kernels/multi_expert_loss.py spell out the same formulas).
//
// For expert k and sample b, with g_b = f_b - margin * T_k[y_b] and z_bc = tau * g_b . T_k[c]:
//   CE_bk = lse_bk - z_{b,y_b},  p_bc = exp(z_bc - lse_bk)
//   loss  = sum_{b,k} a_bk CE_bk + entropy_weight * sum_k [ mean_b H(p_b) - H(pbar_k) ]
// where a_bk = w_k / B (batch weights) or w_bk / B (per-sample weights), H(p) = -sum p log(p + eps)
// and pbar_k = mean_b p_b. The logit gradient is
//   dz_bc = grad * ( a_bk (p_bc - [c == y_b]) + entropy_weight * p_bc (u_bc - r_bk) ),
//   u_bc  = (h'(p_bc) - h'(pbar_kc)) / B,  h'(p) = -log(p + eps) - p / (p + eps),  r_bk = sum_c p_bc u_bc.
#pragma once
#include <cmath>

#include "common.h"

namespace guidg_fast {
namespace multi_expert_loss {

// eps of the official entropy regulariser: H(p) = -sum p log(p + 1e-5)
constexpr double kEntropyEps = 1e-5;

// Classes per tile in the CPU GEMM sweeps and per CUDA block iteration.
constexpr int64_t kCpuClassTile = 256;
constexpr int kCudaThreads = 256;
constexpr int kCudaWarps = kCudaThreads / 32;
constexpr int kCudaClassesPerWarp = 4;
constexpr int kCudaClassTile = kCudaWarps * kCudaClassesPerWarp;  // classes per forward / row-sweep step
constexpr int kCudaExpertGradClasses = 8;                        // classes per block of the T-gradient kernel

// Loss weight of (b, k): the batch weight w_k or the per-sample weight w_bk, times the 1/B of the batch mean.
template <typename acc_t, typename scalar_t>
GF_HOST_DEVICE acc_t sample_weight(const scalar_t* w, bool per_sample, int64_t b, int64_t k, int64_t K, acc_t inv_batch) {
  return static_cast<acc_t>(per_sample ? w[b * K + k] : w[k]) * inv_batch;
}

// Margin-shifted image feature, one element: f_b[d] - margin * T_k[y_b][d]. With margin 0 this is f
// exactly, as in the reference (which skips the subtraction).
template <typename acc_t>
GF_HOST_DEVICE acc_t shifted_feature(acc_t f, acc_t t_target, acc_t margin) {
  return margin != acc_t(0) ? f - margin * t_target : f;
}

// exp / log in the accumulation type on host and device alike.
template <typename acc_t>
GF_HOST_DEVICE acc_t exp_acc(acc_t x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
template <typename acc_t>
GF_HOST_DEVICE acc_t log_acc(acc_t x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}

// Online log-sum-exp over class tiles: the running max and the running sum of exp(z - max); the
// caller adds a tile's exp(z - max) to sum after rescale().
template <typename acc_t>
struct OnlineLse {
  acc_t max;
  acc_t sum;

  GF_HOST_DEVICE void init() {
    max = static_cast<acc_t>(-INFINITY);
    sum = acc_t(0);
  }
  // Moves the running max to include tile_max; returns the factor every earlier accumulation
  // (the sum, and any exp-weighted accumulator) must be scaled by.
  GF_HOST_DEVICE acc_t rescale(acc_t tile_max) {
    const acc_t new_max = tile_max > max ? tile_max : max;
    const acc_t alpha = exp_acc(max - new_max);  // exp(-inf) = 0 on the first tile
    max = new_max;
    sum *= alpha;
    return alpha;
  }
  GF_HOST_DEVICE acc_t lse() const { return max + log_acc(sum); }
};

// -p log(p + eps): one class's term of H(p).
template <typename acc_t>
GF_HOST_DEVICE acc_t entropy_term(acc_t p) {
  return -p * log_acc(p + static_cast<acc_t>(kEntropyEps));
}

// h'(p) = d/dp [-p log(p + eps)]
template <typename acc_t>
GF_HOST_DEVICE acc_t entropy_term_grad(acc_t p) {
  const acc_t q = p + static_cast<acc_t>(kEntropyEps);
  return -log_acc(q) - p / q;
}

// u_bc = d [mean_b H(p_b) - H(pbar)] / d p_bc, given h'(pbar_c) precomputed.
template <typename acc_t>
GF_HOST_DEVICE acc_t entropy_prob_grad(acc_t p, acc_t pbar_term_grad, acc_t inv_batch) {
  return (entropy_term_grad(p) - pbar_term_grad) * inv_batch;
}

// dz_bc without the incoming gradient: a (p - [c == y]) + ew p (u - r).
template <typename acc_t>
GF_HOST_DEVICE acc_t logit_grad(acc_t a, acc_t p, bool is_target, acc_t entropy_weight, acc_t u, acc_t r) {
  acc_t dz = a * (p - (is_target ? acc_t(1) : acc_t(0)));
  if (entropy_weight != acc_t(0)) dz += entropy_weight * p * (u - r);
  return dz;
}

}  // namespace multi_expert_loss
}  // namespace guidg_fast
