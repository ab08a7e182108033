// Shared-prefix causal attention, the math shared by the CPU and CUDA launchers.
//
// Query s of sequence (k, m) sees the P prefix keys of expert k and the suffix keys 0..s of (k, m).
// Keys are numbered j = 0..P+s: j < P is prefix key j, j >= P is suffix key j - P.
// Scores are scale * <q_s, key_j>; the softmax runs in the accumulation type with a running
// maximum and sum (online softmax) so that no (S, P + S) score tensor exists. The forward saves
// lse_s = max + log(sum) per query; the backward recomputes p = exp(score - lse) from q, k and lse:
//   delta_s = <dO_s, O_s>,  ds = p * (<dO_s, v_j> - delta_s),
//   dq_s += scale * ds * k_j,  dk_j += scale * ds * q_s,  dv_j += p * dO_s.
#pragma once
#include <cmath>
#include <cstdint>

#include "common.h"

namespace guidg_fast {

// Element strides of the (K, M, S, H, Dh) suffix tensors (the Dh stride is 1) and of the
// (K, P, H, Dh) prefix tensors, so slices of a fused QKV projection run without a copy.
struct SuffixStrides {
  int64_t k, m, s, h;
};
struct PrefixStrides {
  int64_t k, p, h;
};

struct PrefixAttentionShape {
  int64_t K, M, S, H, Dh, P;
};

GF_HOST_DEVICE int64_t prefix_attention_num_keys(int64_t s, int64_t P) { return P + s + 1; }

GF_HOST_DEVICE int64_t suffix_offset(const SuffixStrides& st, int64_t k, int64_t m, int64_t s, int64_t h) {
  return k * st.k + m * st.m + s * st.s + h * st.h;
}
GF_HOST_DEVICE int64_t prefix_offset(const PrefixStrides& st, int64_t k, int64_t p, int64_t h) {
  return k * st.k + p * st.p + h * st.h;
}
// Dense (K, M, S, H, Dh) layout of out / dq / dk / dv and dense (K, M, H, S) layout of lse.
GF_HOST_DEVICE int64_t dense_row(const PrefixAttentionShape& sh, int64_t k, int64_t m, int64_t s, int64_t h) {
  return ((k * sh.M + m) * sh.S + s) * sh.H + h;
}
GF_HOST_DEVICE int64_t lse_index(const PrefixAttentionShape& sh, int64_t k, int64_t m, int64_t h, int64_t s) {
  return ((k * sh.M + m) * sh.H + h) * sh.S + s;
}

template <typename acc_t>
GF_HOST_DEVICE acc_t gf_exp(acc_t x) {
  return exp(x);
}
template <>
GF_HOST_DEVICE float gf_exp<float>(float x) {
  return expf(x);
}
template <typename acc_t>
GF_HOST_DEVICE acc_t gf_log(acc_t x) {
  return log(x);
}
template <>
GF_HOST_DEVICE float gf_log<float>(float x) {
  return logf(x);
}

// Running max / sum of exp of one query's scores. ``absorb`` takes the maximum of a new tile of
// scores and returns the factor by which the partial output accumulated so far must be rescaled.
template <typename acc_t>
struct OnlineSoftmax {
  acc_t max;  // -inf until the first tile
  acc_t sum;

  GF_HOST_DEVICE void init() {
    max = -INFINITY;
    sum = acc_t(0);
  }
  GF_HOST_DEVICE acc_t absorb_max(acc_t tile_max) {
    const acc_t new_max = tile_max > max ? tile_max : max;
    const acc_t alpha = gf_exp<acc_t>(max - new_max);  // exp(-inf) = 0 on the first tile
    sum *= alpha;
    max = new_max;
    return alpha;
  }
  // probability weight (unnormalised) of a score under the current max; adds it to the sum
  GF_HOST_DEVICE acc_t weight(acc_t score) {
    const acc_t p = gf_exp<acc_t>(score - max);
    sum += p;
    return p;
  }
  GF_HOST_DEVICE acc_t lse() const { return max + gf_log<acc_t>(sum); }
  GF_HOST_DEVICE acc_t inv_sum() const { return acc_t(1) / sum; }
};

// Backward, per (query, key): the softmax probability recomputed from the saved lse, and the
// gradient of the score.
template <typename acc_t>
GF_HOST_DEVICE acc_t recompute_probability(acc_t score, acc_t lse) {
  return gf_exp<acc_t>(score - lse);
}
template <typename acc_t>
GF_HOST_DEVICE acc_t score_gradient(acc_t p, acc_t dp, acc_t delta) {
  return p * (dp - delta);
}

}  // namespace guidg_fast
