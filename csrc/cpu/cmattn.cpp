// CPU launchers for cmattn: the fused score / softmax-over-experts / mean-over-heads step of the
// cross-modal attention, forward and backward. q (B, H, D) holds every head's v-projection,
// keys (K, H, D) every head's pooled expert key; the projections themselves are GEMMs done by the
// caller (guidg_fast/ops/cmattn.py, for every backend).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cmattn.h"
#include "cmattn_args.h"
#include "cpu_isa.h"
#include "outputs.h"
#include "launchers.h"

namespace guidg_fast {
namespace {

void check_inputs(const at::Tensor& q, const at::Tensor& keys, const char* op) {
  TORCH_CHECK(q.device().is_cpu(), op, " (CPU kernel): q and keys must be CPU tensors");
  cmattn::check_inputs(q, keys, op);
}

// Heads run in parallel only when a head's share of the work is worth a thread wake-up: tiny
// shapes stay on one thread; the step-2 shapes (B = 36, K = 3, D = 512: ~74k multiply-adds per head
// and pass) split their heads over the threads, which the GEMMs just before keep awake.
constexpr int64_t kWorkPerChunk = 1 << 16;

int64_t head_grain(int64_t B, int64_t K, int64_t D) {
  return std::max<int64_t>(1, kWorkPerChunk / std::max<int64_t>(1, B * (K + 1) * D));
}

// The per-head loops are compiled for AVX-512 / AVX2 / baseline and picked per call (cpu_isa.h; the
// extension itself targets the baseline ISA); they run over the batch.

// sum_i term(i) for i < n in eight independent lanes (vectorised, no serial add chain)
template <typename acc_t, typename Term>
inline acc_t lane_sum(int64_t n, Term term) {
  acc_t lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) lanes[j] += term(i + j);
  }
  acc_t tail = 0;
  for (; i < n; ++i) tail += term(i);
  return ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7])) + tail;
}

// sum_b a[b] * x[b * stride]
template <typename scalar_t, typename acc_t>
inline acc_t strided_dot(const acc_t* a, const scalar_t* x, int64_t stride, int64_t n) {
  return lane_sum<acc_t>(n, [&](int64_t i) { return a[i] * static_cast<acc_t>(x[i * stride]); });
}

// Head h: nrm[b] = ||q_{b,h}||^2 and dk[k * B + b] = q_{b,h} . key_{k,h} (sums over d in order).
template <typename scalar_t, typename acc_t>
GF_ISA_INLINE void head_statistics_body(const scalar_t* q, const scalar_t* keys, int64_t h, int64_t B, int64_t H,
                                        int64_t K, int64_t D, acc_t* nrm, acc_t* dk) {
  const int64_t sb = H * D;
  for (int64_t b = 0; b < B; ++b) nrm[b] = 0;
  for (int64_t i = 0; i < K * B; ++i) dk[i] = 0;
  for (int64_t d = 0; d < D; ++d) {
    const scalar_t* col = q + h * D + d;
    for (int64_t b = 0; b < B; ++b) {
      const acc_t x = static_cast<acc_t>(col[b * sb]);
      nrm[b] += x * x;
    }
    for (int64_t k = 0; k < K; ++k) {
      acc_t* __restrict__ dkk = dk + k * B;
      const acc_t kv = static_cast<acc_t>(keys[(k * H + h) * D + d]);
      for (int64_t b = 0; b < B; ++b) dkk[b] += static_cast<acc_t>(col[b * sb]) * kv;
    }
  }
}

template <typename scalar_t, typename acc_t>
GF_ISA_TARGET_AVX512 void head_statistics_avx512(const scalar_t* q, const scalar_t* keys, int64_t h, int64_t B,
                                                 int64_t H, int64_t K, int64_t D, acc_t* nrm, acc_t* dk) {
  head_statistics_body<scalar_t, acc_t>(q, keys, h, B, H, K, D, nrm, dk);
}
template <typename scalar_t, typename acc_t>
GF_ISA_TARGET_AVX2 void head_statistics_avx2(const scalar_t* q, const scalar_t* keys, int64_t h, int64_t B, int64_t H,
                                             int64_t K, int64_t D, acc_t* nrm, acc_t* dk) {
  head_statistics_body<scalar_t, acc_t>(q, keys, h, B, H, K, D, nrm, dk);
}
template <typename scalar_t, typename acc_t>
void head_statistics(const scalar_t* q, const scalar_t* keys, int64_t h, int64_t B, int64_t H, int64_t K, int64_t D,
                     acc_t* nrm, acc_t* dk) {
  switch (cpu_isa()) {
    case Isa::kAvx512: return head_statistics_avx512<scalar_t, acc_t>(q, keys, h, B, H, K, D, nrm, dk);
    case Isa::kAvx2: return head_statistics_avx2<scalar_t, acc_t>(q, keys, h, B, H, K, D, nrm, dk);
    default: return head_statistics_body<scalar_t, acc_t>(q, keys, h, B, H, K, D, nrm, dk);
  }
}

// Per-head statistics of every sample: dot[(b * H + h) * K + k] = q_{b,h} . key_{k,h} and
// qnorm[b * H + h] = ||q_{b,h}||.
template <typename scalar_t, typename acc_t>
void row_statistics(const scalar_t* q, const scalar_t* keys, int64_t B, int64_t H, int64_t K, int64_t D, acc_t* dot,
                    acc_t* qnorm) {
  at::parallel_for(0, H, head_grain(B, K, D), [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> nrm(B), dk(K * B);
    for (int64_t h = lo; h < hi; ++h) {
      head_statistics<scalar_t, acc_t>(q, keys, h, B, H, K, D, nrm.data(), dk.data());
      for (int64_t b = 0; b < B; ++b) {
        qnorm[b * H + h] = std::sqrt(nrm[b]);
        for (int64_t k = 0; k < K; ++k) dot[(b * H + h) * K + k] = dk[k * B + b];
      }
    }
  });
}

// Norms of every (expert, head) key: (K * H).
template <typename scalar_t, typename acc_t>
std::vector<acc_t> key_norms(const scalar_t* keys, int64_t KH, int64_t D) {
  std::vector<acc_t> norms(KH);
  std::vector<acc_t> row(D);
  for (int64_t i = 0; i < KH; ++i) {
    for (int64_t d = 0; d < D; ++d) row[d] = static_cast<acc_t>(keys[i * D + d]);
    norms[i] = std::sqrt(strided_dot<scalar_t, acc_t>(row.data(), keys + i * D, 1, D));
  }
  return norms;
}

// Softmax probabilities of one (sample, head) row from its dots and norms.
template <typename acc_t>
void row_probabilities(bool cosine, const acc_t* dot, acc_t q_norm, const acc_t* knorm, int64_t K, int64_t H,
                       int64_t h, acc_t sqrt_d, acc_t* s) {
  const acc_t mq = cmattn_clamp_norm(q_norm);
  for (int64_t k = 0; k < K; ++k) s[k] = cmattn_score(cosine, dot[k], mq, cmattn_clamp_norm(knorm[k * H + h]), sqrt_d);
  cmattn_softmax(s, K);
}

// Head h: dq_{b,h} = qw_b q_{b,h} + sum_k coef_{k,b} key_{k,h} and
// dkey_{k,h} = self_k key_{k,h} + sum_b coef_{k,b} q_{b,h}; row (B) is scratch.
template <typename scalar_t, typename acc_t>
GF_ISA_INLINE void head_gradients_body(const scalar_t* qp, const scalar_t* kp, const acc_t* qw, const acc_t* coef,
                                       const acc_t* self, int64_t h, int64_t B, int64_t H, int64_t K, int64_t D,
                                       acc_t* __restrict__ row, scalar_t* dqp, scalar_t* dkp) {
  const int64_t sb = H * D;
  for (int64_t d = 0; d < D; ++d) {
    const scalar_t* col = qp + h * D + d;
    scalar_t* dcol = dqp + h * D + d;
    for (int64_t b = 0; b < B; ++b) row[b] = qw[b] * static_cast<acc_t>(col[b * sb]);
    for (int64_t k = 0; k < K; ++k) {
      const acc_t* ck = coef + k * B;
      const acc_t kv = static_cast<acc_t>(kp[(k * H + h) * D + d]);
      for (int64_t b = 0; b < B; ++b) row[b] += ck[b] * kv;
      dkp[(k * H + h) * D + d] = static_cast<scalar_t>(self[k] * kv + strided_dot<scalar_t, acc_t>(ck, col, sb, B));
    }
    for (int64_t b = 0; b < B; ++b) dcol[b * sb] = static_cast<scalar_t>(row[b]);
  }
}

template <typename scalar_t, typename acc_t>
GF_ISA_TARGET_AVX512 void head_gradients_avx512(const scalar_t* qp, const scalar_t* kp, const acc_t* qw,
                                                const acc_t* coef, const acc_t* self, int64_t h, int64_t B, int64_t H,
                                                int64_t K, int64_t D, acc_t* __restrict__ row, scalar_t* dqp,
                                                scalar_t* dkp) {
  head_gradients_body<scalar_t, acc_t>(qp, kp, qw, coef, self, h, B, H, K, D, row, dqp, dkp);
}
template <typename scalar_t, typename acc_t>
GF_ISA_TARGET_AVX2 void head_gradients_avx2(const scalar_t* qp, const scalar_t* kp, const acc_t* qw, const acc_t* coef,
                                            const acc_t* self, int64_t h, int64_t B, int64_t H, int64_t K, int64_t D,
                                            acc_t* __restrict__ row, scalar_t* dqp, scalar_t* dkp) {
  head_gradients_body<scalar_t, acc_t>(qp, kp, qw, coef, self, h, B, H, K, D, row, dqp, dkp);
}
template <typename scalar_t, typename acc_t>
void head_gradients(const scalar_t* qp, const scalar_t* kp, const acc_t* qw, const acc_t* coef, const acc_t* self,
                    int64_t h, int64_t B, int64_t H, int64_t K, int64_t D, acc_t* __restrict__ row, scalar_t* dqp,
                    scalar_t* dkp) {
  switch (cpu_isa()) {
    case Isa::kAvx512: return head_gradients_avx512<scalar_t, acc_t>(qp, kp, qw, coef, self, h, B, H, K, D, row, dqp, dkp);
    case Isa::kAvx2: return head_gradients_avx2<scalar_t, acc_t>(qp, kp, qw, coef, self, h, B, H, K, D, row, dqp, dkp);
    default: return head_gradients_body<scalar_t, acc_t>(qp, kp, qw, coef, self, h, B, H, K, D, row, dqp, dkp);
  }
}

// Every head's gradients from the per-row coefficients of cmattn_backward_cpu: coef (h, k, b),
// q_weight (h, b), key_sum (k, h).
template <typename scalar_t, typename acc_t>
void assemble_gradients(bool cosine, const scalar_t* qp, const scalar_t* kp, const acc_t* knorm, const acc_t* coef,
                        const acc_t* q_weight, const acc_t* key_sum, int64_t B, int64_t H, int64_t K, int64_t D,
                        scalar_t* dqp, scalar_t* dkp) {
  at::parallel_for(0, H, head_grain(B, K, D), [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> row(B), self(K);
    for (int64_t h = lo; h < hi; ++h) {
      for (int64_t k = 0; k < K; ++k) self[k] = cmattn_key_self_weight(cosine, key_sum[k * H + h], knorm[k * H + h]);
      head_gradients<scalar_t, acc_t>(qp, kp, q_weight + h * B, coef + h * K * B, self.data(), h, B, H, K, D,
                                      row.data(), dqp, dkp);
    }
  });
}

}  // namespace

at::Tensor cmattn_forward_cpu(const at::Tensor& q, const at::Tensor& keys, bool cosine) {
  check_inputs(q, keys, "cmattn_forward");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), K = keys.size(0);
  at::Tensor out = new_output({B, K}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cmattn_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* kp = keys.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t sqrt_d = std::sqrt(static_cast<acc_t>(D));
    const std::vector<acc_t> knorm = key_norms<scalar_t, acc_t>(kp, K * H, D);
    std::vector<acc_t> dot(B * H * K), qnorm(B * H), s(K), acc(K);
    row_statistics<scalar_t, acc_t>(q.data_ptr<scalar_t>(), kp, B, H, K, D, dot.data(), qnorm.data());
    for (int64_t b = 0; b < B; ++b) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t h = 0; h < H; ++h) {
        row_probabilities<acc_t>(cosine, dot.data() + (b * H + h) * K, qnorm[b * H + h], knorm.data(), K, H, h, sqrt_d,
                                 s.data());
        for (int64_t k = 0; k < K; ++k) acc[k] += s[k];
      }
      for (int64_t k = 0; k < K; ++k) op[b * K + k] = static_cast<scalar_t>(acc[k] / static_cast<acc_t>(H));
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cmattn_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                                        const at::Tensor& keys, bool cosine) {
  check_inputs(q, keys, "cmattn_backward");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), K = keys.size(0);
  cmattn::check_grad_out(grad_out, q, keys);
  at::Tensor dq = new_output(q.sizes(), q.options());
  at::Tensor dkey = new_output(keys.sizes(), keys.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cmattn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = keys.data_ptr<scalar_t>();
    const scalar_t* gp = grad_out.data_ptr<scalar_t>();
    scalar_t* dqp = dq.data_ptr<scalar_t>();
    scalar_t* dkp = dkey.data_ptr<scalar_t>();
    const acc_t sqrt_d = std::sqrt(static_cast<acc_t>(D));
    const std::vector<acc_t> knorm = key_norms<scalar_t, acc_t>(kp, K * H, D);
    std::vector<acc_t> dot(B * H * K), qnorm(B * H);
    row_statistics<scalar_t, acc_t>(qp, kp, B, H, K, D, dot.data(), qnorm.data());

    // Per (sample, head) row: probabilities, then the score / softmax / head-mean backward.
    // coef (h, k, b): weight of key_{k,h} in dq_{b,h} and of q_{b,h} in dkey_{k,h}; q_weight (h, b):
    // weight of q_{b,h} in dq_{b,h}; key_sum (k, h): sum_b of the rows' key terms.
    std::vector<acc_t> coef(H * K * B), q_weight(H * B), key_sum(K * H, acc_t(0));
    {
      std::vector<acc_t> a(K), g(K), ds(K), kn(K), c(K), key_term(K);
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t k = 0; k < K; ++k) g[k] = static_cast<acc_t>(gp[b * K + k]) / static_cast<acc_t>(H);
        for (int64_t h = 0; h < H; ++h) {
          const acc_t* row_dot = dot.data() + (b * H + h) * K;
          row_probabilities<acc_t>(cosine, row_dot, qnorm[b * H + h], knorm.data(), K, H, h, sqrt_d, a.data());
          cmattn_softmax_backward(a.data(), g.data(), ds.data(), K);
          for (int64_t k = 0; k < K; ++k) kn[k] = knorm[k * H + h];
          q_weight[h * B + b] = cmattn_row_backward(cosine, ds.data(), row_dot, kn.data(), qnorm[b * H + h], sqrt_d,
                                                    K, c.data(), key_term.data());
          for (int64_t k = 0; k < K; ++k) {
            coef[(h * K + k) * B + b] = c[k];
            key_sum[k * H + h] += key_term[k];
          }
        }
      }
    }

    assemble_gradients<scalar_t, acc_t>(cosine, qp, kp, knorm.data(), coef.data(), q_weight.data(), key_sum.data(), B, H,
                                        K, D, dqp, dkp);
  });
  return {dq, dkey};
}

}  // namespace guidg_fast
