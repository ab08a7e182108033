// Cross-modal attention (cmattn) score / softmax / head-mean math, shared by the CPU and CUDA
// launchers. The projections (q = f Wv^T + bv for all heads, keys = wt T + bt for all heads and
// experts) are GEMMs done by the caller; these helpers cover what happens per (sample, head) row:
//
//   s_k  = cosine(q, key_k)   or   q . key_k / sqrt(D)              (k over the K experts)
//   a    = softmax_k(s);   out[b, k] += a_k / H
//
// Cosine follows torch.nn.functional.cosine_similarity exactly (torch 2.x): each vector is divided
// by max(||x||, eps), eps = 1e-8, where the clamp is applied under no_grad; so in backward the norm's
// own gradient still flows through the unclamped norm (x / ||x||, zero when ||x|| == 0):
//   dq     = sum_k c_k key_k - (sum_k ds_k dot_k / m_k) / (m_q^2 n_q) * q
//   dkey_k = sum_b c_{b,k} q_b - (sum_b ds_{b,k} dot_{b,k} / m_{q,b}) / (m_k^2 n_k) * key_k
// with n = ||x||, m = max(n, eps), c_k = ds_k / (m_q m_k), ds = a * (g - sum_j a_j g_j), g = grad/H.
#pragma once
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "common.h"

namespace guidg_fast {

constexpr double kCmattnEps = 1e-8;  // torch.nn.functional.cosine_similarity's default eps

// max(n, eps) with NaN propagated, as torch's clamp_min
template <typename acc_t>
GF_HOST_DEVICE acc_t cmattn_clamp_norm(acc_t norm) {
  const acc_t eps = static_cast<acc_t>(kCmattnEps);
  return norm < eps ? eps : norm;
}

// 1 / n, or 0 for n == 0 (the masked gradient of torch's vector_norm at zero)
template <typename acc_t>
GF_HOST_DEVICE acc_t cmattn_inv_or_zero(acc_t norm) {
  return norm == acc_t(0) ? acc_t(0) : acc_t(1) / norm;
}

// Score of one (row, expert) pair. For cosine, q_clamped / key_clamped are max(||.||, eps); for the
// dot product they are unused and scale is sqrt(D).
template <typename acc_t>
GF_HOST_DEVICE acc_t cmattn_score(bool cosine, acc_t dot, acc_t q_clamped, acc_t key_clamped, acc_t sqrt_d) {
  return cosine ? dot / (q_clamped * key_clamped) : dot / sqrt_d;
}

// In place: s[0..K) -> softmax(s).
template <typename acc_t>
GF_HOST_DEVICE void cmattn_softmax(acc_t* s, int64_t K) {
  using std::exp;
  acc_t m = s[0];
  for (int64_t k = 1; k < K; ++k) m = s[k] > m ? s[k] : m;
  acc_t total = 0;
  for (int64_t k = 0; k < K; ++k) {
    s[k] = exp(s[k] - m);
    total += s[k];
  }
  for (int64_t k = 0; k < K; ++k) s[k] = s[k] / total;
}

// Backward of one row. a: softmax probabilities (K), g: upstream gradient of out[b, :] (K), already
// divided by H. On return ds[k] = dL/ds_k.
template <typename acc_t>
GF_HOST_DEVICE void cmattn_softmax_backward(const acc_t* a, const acc_t* g, acc_t* ds, int64_t K) {
  acc_t ag = 0;
  for (int64_t k = 0; k < K; ++k) ag += a[k] * g[k];
  for (int64_t k = 0; k < K; ++k) ds[k] = a[k] * (g[k] - ag);
}

// Per-row coefficients of the score backward, given ds (K), dot (K), the key norms (K, unclamped)
// and the q norm (unclamped):
//   coef[k]      weight of key_k in dq (and of q in dkey_k)
//   key_term[k]  this row's contribution to sum_b ds dot / m_q (cosine; 0 for the dot product)
// Returns the weight of q itself in dq (0 for the dot product).
template <typename acc_t>
GF_HOST_DEVICE acc_t cmattn_row_backward(bool cosine, const acc_t* ds, const acc_t* dot, const acc_t* key_norm,
                                         acc_t q_norm, acc_t sqrt_d, int64_t K, acc_t* coef, acc_t* key_term) {
  if (!cosine) {
    for (int64_t k = 0; k < K; ++k) {
      coef[k] = ds[k] / sqrt_d;
      key_term[k] = 0;
    }
    return 0;
  }
  const acc_t mq = cmattn_clamp_norm(q_norm);
  acc_t q_term = 0;
  for (int64_t k = 0; k < K; ++k) {
    const acc_t mk = cmattn_clamp_norm(key_norm[k]);
    coef[k] = ds[k] / (mq * mk);
    q_term += ds[k] * dot[k] / mk;
    key_term[k] = ds[k] * dot[k] / mq;
  }
  return -q_term / (mq * mq) * cmattn_inv_or_zero(q_norm);
}

// Weight of key_k itself in dkey_k, from the summed key_term over the batch (cosine only).
template <typename acc_t>
GF_HOST_DEVICE acc_t cmattn_key_self_weight(bool cosine, acc_t key_term_sum, acc_t key_norm) {
  if (!cosine) return 0;
  const acc_t mk = cmattn_clamp_norm(key_norm);
  return -key_term_sum / (mk * mk) * cmattn_inv_or_zero(key_norm);
}

}  // namespace guidg_fast
