// CPU launchers for cmattn: the fused score / softmax-over-experts / mean-over-heads step of the
// cross-modal attention, forward and backward. q (B, H, D) holds every head's v-projection,
// keys (K, H, D) every head's pooled expert key; the projections themselves are GEMMs done by the
// caller (csrc/autograd/cmattn.cpp, or the Triton backend's guidg_fast/ops/cmattn.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "cpu_isa.h"
#include "cmattn.h"
#include "cmattn_cpu.h"
#include "cpu_blas.h"
#include "outputs.h"

namespace guidg_fast {
namespace {

// q (B, H, D) comes in one of two layouts, both with unit-stride-free indexing
// q[b, h, d] = q[b * sb + (h * D + d) * sd]:
//   row-major    (contiguous (B, H, D)):               sb = H * D, sd = 1
//   batch-minor  ((H * D, B) contiguous, viewed as (B, H, D)): sb = 1, sd = B
// guidg_fast::cmattn computes the v-projection on the CPU as (H*D, D) x (D, B) -- W f^T, the
// faster GEMM shape for B ~ 36 rows -- so its q is batch-minor; the loops below walk d outer and b
// inner, which vectorises over the batch in that layout. dq comes back in q's layout.
struct QLayout {
  int64_t sb, sd;
  bool batch_minor;
};

QLayout q_layout(const at::Tensor& q, const char* op) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  if (q.is_contiguous()) return {H * D, 1, false};
  const bool batch_minor = q.stride(0) == 1 && q.stride(2) == B && q.stride(1) == D * B;
  TORCH_CHECK(batch_minor, op, ": q must be contiguous (B, H, D), or the (B, H, D) view of a contiguous (H*D, B) ",
              "tensor; got shape ", q.sizes(), " with strides ", q.strides());
  return {1, B, true};
}

void check_inputs(const at::Tensor& q, const at::Tensor& keys, const char* op) {
  TORCH_CHECK(q.device().is_cpu() && keys.device().is_cpu(), op, " (CPU kernel): q and keys must be CPU tensors");
  GF_CHECK_DIM(q, 3, "q (B, H, D)");
  GF_CHECK_DIM(keys, 3, "keys (K, H, D)");
  GF_CHECK_CONTIGUOUS(keys, "keys");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, op,
              ": q must be float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(keys.scalar_type() == q.scalar_type(), op, ": keys must have q's dtype ", q.scalar_type(), ", got ",
              keys.scalar_type());
  TORCH_CHECK(keys.size(1) == q.size(1) && keys.size(2) == q.size(2), op, ": keys must have shape (K, ", q.size(1),
              ", ", q.size(2), ") to match q (B, H, D) = ", q.sizes(), ", got ", keys.sizes());
  TORCH_CHECK(q.size(0) > 0 && keys.size(0) > 0 && q.size(1) > 0 && q.size(2) > 0, op,
              ": q and keys must be non-empty, got ", q.sizes(), " and ", keys.sizes());
}

// An output with q's shape and layout (poisoned on request, see outputs.h).
at::Tensor like_q(const at::Tensor& q, const QLayout& layout) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  if (!layout.batch_minor) return new_output(q.sizes(), q.options());
  return new_output({H * D, B}, q.options()).t().view({B, H, D});
}

// Heads run in parallel only when a head's share of the work is worth a thread wake-up: tiny
// shapes stay on one thread; the step-2 shapes (B = 36, K = 3, D = 512: ~74k multiply-adds per head
// and pass) split their heads over the threads, which the GEMMs just before keep awake.
constexpr int64_t kWorkPerChunk = 1 << 16;

int64_t head_grain(int64_t B, int64_t K, int64_t D) {
  return std::max<int64_t>(1, kWorkPerChunk / std::max<int64_t>(1, B * (K + 1) * D));
}

// The per-head loops are compiled for AVX-512 / AVX2 / baseline and picked per call (cpu_isa.h; the
// extension itself targets the baseline ISA); they run over the batch, unit stride in the
// batch-minor layout (kBatchMinor: known at compile time, so the loops vectorise).

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
// With bias (bv, (H, D)), q_{b,h} += bv_h is applied in place first (the whole-op forward leaves the
// bias out of its GEMM, so q is written once there instead of filled, read and written back).
template <typename scalar_t, typename acc_t, bool kBatchMinor>
GF_ISA_INLINE void head_statistics_body(const scalar_t* q, int64_t sb_runtime, int64_t sd, const scalar_t* keys,
                                      int64_t h, int64_t B, int64_t H, int64_t K, int64_t D, acc_t* nrm, acc_t* dk,
                                      const scalar_t* bias) {
  const int64_t sb = kBatchMinor ? 1 : sb_runtime;
  for (int64_t b = 0; b < B; ++b) nrm[b] = 0;
  for (int64_t i = 0; i < K * B; ++i) dk[i] = 0;
  for (int64_t d = 0; d < D; ++d) {
    const scalar_t* col = q + (h * D + d) * sd;
    if (bias != nullptr) {
      scalar_t* mut = const_cast<scalar_t*>(col);
      const scalar_t bv = bias[h * D + d];
      for (int64_t b = 0; b < B; ++b) mut[b * sb] += bv;
    }
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
template <typename scalar_t, typename acc_t, bool kBatchMinor>
GF_ISA_TARGET_AVX512 void head_statistics_avx512(const scalar_t* q, int64_t sb_runtime, int64_t sd, const scalar_t* keys, int64_t h, int64_t B, int64_t H, int64_t K, int64_t D, acc_t* nrm, acc_t* dk, const scalar_t* bias) { head_statistics_body<scalar_t, acc_t, kBatchMinor>(q, sb_runtime, sd, keys, h, B, H, K, D, nrm, dk, bias); }
template <typename scalar_t, typename acc_t, bool kBatchMinor>
GF_ISA_TARGET_AVX2 void head_statistics_avx2(const scalar_t* q, int64_t sb_runtime, int64_t sd, const scalar_t* keys, int64_t h, int64_t B, int64_t H, int64_t K, int64_t D, acc_t* nrm, acc_t* dk, const scalar_t* bias) { head_statistics_body<scalar_t, acc_t, kBatchMinor>(q, sb_runtime, sd, keys, h, B, H, K, D, nrm, dk, bias); }
template <typename scalar_t, typename acc_t, bool kBatchMinor>
void head_statistics(const scalar_t* q, int64_t sb_runtime, int64_t sd, const scalar_t* keys, int64_t h, int64_t B, int64_t H, int64_t K, int64_t D, acc_t* nrm, acc_t* dk, const scalar_t* bias) {
  switch (cpu_isa()) {
    case Isa::kAvx512: return head_statistics_avx512<scalar_t, acc_t, kBatchMinor>(q, sb_runtime, sd, keys, h, B, H, K, D, nrm, dk, bias);
    case Isa::kAvx2: return head_statistics_avx2<scalar_t, acc_t, kBatchMinor>(q, sb_runtime, sd, keys, h, B, H, K, D, nrm, dk, bias);
    default: return head_statistics_body<scalar_t, acc_t, kBatchMinor>(q, sb_runtime, sd, keys, h, B, H, K, D, nrm, dk, bias);
  }
}

// Per-head statistics of every sample: dot[(b * H + h) * K + k] = q_{b,h} . key_{k,h} and
// qnorm[b * H + h] = ||q_{b,h}||; bias (or nullptr): added to q in place first (head_statistics).
template <typename scalar_t, typename acc_t>
void row_statistics(const scalar_t* q, const QLayout& L, const scalar_t* keys, int64_t B, int64_t H, int64_t K,
                    int64_t D, acc_t* dot, acc_t* qnorm, const scalar_t* bias = nullptr) {
  at::parallel_for(0, H, head_grain(B, K, D), [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> nrm(B), dk(K * B);
    for (int64_t h = lo; h < hi; ++h) {
      if (L.batch_minor) {
        head_statistics<scalar_t, acc_t, true>(q, L.sb, L.sd, keys, h, B, H, K, D, nrm.data(), dk.data(), bias);
      } else {
        head_statistics<scalar_t, acc_t, false>(q, L.sb, L.sd, keys, h, B, H, K, D, nrm.data(), dk.data(), bias);
      }
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

// Head h: dq_{b,h} = qw_b q_{b,h} + sum_k coef_{k,b} key_{k,h} (dq in q's layout) and
// dkey_{k,h} = self_k key_{k,h} + sum_b coef_{k,b} q_{b,h}; row (B) is scratch.
template <typename scalar_t, typename acc_t, bool kBatchMinor>
GF_ISA_INLINE void head_gradients_body(const scalar_t* qp, int64_t sb_runtime, int64_t sd, const scalar_t* kp,
                                     const acc_t* qw, const acc_t* coef, const acc_t* self, int64_t h, int64_t B,
                                     int64_t H, int64_t K, int64_t D, acc_t* __restrict__ row, scalar_t* dqp,
                                     scalar_t* dkp, scalar_t* dbvp) {
  const int64_t sb = kBatchMinor ? 1 : sb_runtime;
  // batch-minor: dkey_h (K x D) = coef (K x B) q_h (B x D) is one small GEMM on q_h^T (D x B,
  // contiguous) -- a per-(k, d) dot over the batch would end in a horizontal sum each time
  constexpr bool kGemmKeys = kBatchMinor && std::is_same<scalar_t, acc_t>::value;
  for (int64_t d = 0; d < D; ++d) {
    const scalar_t* col = qp + (h * D + d) * sd;
    scalar_t* dcol = dqp + (h * D + d) * sd;
    for (int64_t b = 0; b < B; ++b) row[b] = qw[b] * static_cast<acc_t>(col[b * sb]);
    for (int64_t k = 0; k < K; ++k) {
      const acc_t* ck = coef + k * B;
      const acc_t kv = static_cast<acc_t>(kp[(k * H + h) * D + d]);
      for (int64_t b = 0; b < B; ++b) row[b] += ck[b] * kv;
      if constexpr (!kGemmKeys) {
        dkp[(k * H + h) * D + d] = static_cast<scalar_t>(self[k] * kv + strided_dot<scalar_t, acc_t>(ck, col, sb, B));
      }
    }
    for (int64_t b = 0; b < B; ++b) dcol[b * sb] = static_cast<scalar_t>(row[b]);
    if (dbvp != nullptr) {  // dbv_{h,d} = sum_b dq_{b,h,d}, from the row just written
      dbvp[h * D + d] = static_cast<scalar_t>(lane_sum<acc_t>(B, [&](int64_t b) { return row[b]; }));
    }
  }
  if constexpr (kGemmKeys) {
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* key = kp + (k * H + h) * D;
      scalar_t* out = dkp + (k * H + h) * D;
      for (int64_t d = 0; d < D; ++d) out[d] = self[k] * key[d];
    }
    cpu_blas::gemm<scalar_t>(false, true, K, D, B, scalar_t(1), coef, B, qp + h * D * sd, sd, scalar_t(1),
                             dkp + h * D, H * D);
  }
}
template <typename scalar_t, typename acc_t, bool kBatchMinor>
GF_ISA_TARGET_AVX512 void head_gradients_avx512(const scalar_t* qp, int64_t sb_runtime, int64_t sd, const scalar_t* kp, const acc_t* qw, const acc_t* coef, const acc_t* self, int64_t h, int64_t B, int64_t H, int64_t K, int64_t D, acc_t* __restrict__ row, scalar_t* dqp, scalar_t* dkp, scalar_t* dbvp) { head_gradients_body<scalar_t, acc_t, kBatchMinor>(qp, sb_runtime, sd, kp, qw, coef, self, h, B, H, K, D, row, dqp, dkp, dbvp); }
template <typename scalar_t, typename acc_t, bool kBatchMinor>
GF_ISA_TARGET_AVX2 void head_gradients_avx2(const scalar_t* qp, int64_t sb_runtime, int64_t sd, const scalar_t* kp, const acc_t* qw, const acc_t* coef, const acc_t* self, int64_t h, int64_t B, int64_t H, int64_t K, int64_t D, acc_t* __restrict__ row, scalar_t* dqp, scalar_t* dkp, scalar_t* dbvp) { head_gradients_body<scalar_t, acc_t, kBatchMinor>(qp, sb_runtime, sd, kp, qw, coef, self, h, B, H, K, D, row, dqp, dkp, dbvp); }
template <typename scalar_t, typename acc_t, bool kBatchMinor>
void head_gradients(const scalar_t* qp, int64_t sb_runtime, int64_t sd, const scalar_t* kp, const acc_t* qw, const acc_t* coef, const acc_t* self, int64_t h, int64_t B, int64_t H, int64_t K, int64_t D, acc_t* __restrict__ row, scalar_t* dqp, scalar_t* dkp, scalar_t* dbvp) {
  switch (cpu_isa()) {
    case Isa::kAvx512: return head_gradients_avx512<scalar_t, acc_t, kBatchMinor>(qp, sb_runtime, sd, kp, qw, coef, self, h, B, H, K, D, row, dqp, dkp, dbvp);
    case Isa::kAvx2: return head_gradients_avx2<scalar_t, acc_t, kBatchMinor>(qp, sb_runtime, sd, kp, qw, coef, self, h, B, H, K, D, row, dqp, dkp, dbvp);
    default: return head_gradients_body<scalar_t, acc_t, kBatchMinor>(qp, sb_runtime, sd, kp, qw, coef, self, h, B, H, K, D, row, dqp, dkp, dbvp);
  }
}

// Every head's gradients from the per-row coefficients of cmattn_backward_cpu: coef (h, k, b),
// q_weight (h, b), key_sum (k, h).
template <typename scalar_t, typename acc_t>
void assemble_gradients(bool cosine, const scalar_t* qp, const QLayout& L, const scalar_t* kp, const acc_t* knorm,
                        const acc_t* coef, const acc_t* q_weight, const acc_t* key_sum, int64_t B, int64_t H, int64_t K,
                        int64_t D, scalar_t* dqp, scalar_t* dkp, scalar_t* dbvp) {
  at::parallel_for(0, H, head_grain(B, K, D), [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> row(B), self(K);
    for (int64_t h = lo; h < hi; ++h) {
      for (int64_t k = 0; k < K; ++k) self[k] = cmattn_key_self_weight(cosine, key_sum[k * H + h], knorm[k * H + h]);
      const acc_t* qw = q_weight + h * B;
      const acc_t* ch = coef + h * K * B;
      if (L.batch_minor) {
        head_gradients<scalar_t, acc_t, true>(qp, L.sb, L.sd, kp, qw, ch, self.data(), h, B, H, K, D, row.data(), dqp,
                                              dkp, dbvp);
      } else {
        head_gradients<scalar_t, acc_t, false>(qp, L.sb, L.sd, kp, qw, ch, self.data(), h, B, H, K, D, row.data(),
                                               dqp, dkp, dbvp);
      }
    }
  });
}

// The per-row statistics of score_forward that score_backward needs again, kept in one flat tensor
// of q's dtype: dot (B*H*K), then qnorm (B*H), then the key norms (K*H).
int64_t stats_size(int64_t B, int64_t H, int64_t K) { return B * H * K + B * H + K * H; }

// out (B, K); with bias defined ((H, D), q's dtype, contiguous) q += bias in place first; with stats
// given, the statistics above are written there for score_backward
at::Tensor score_forward(const at::Tensor& q, const at::Tensor& keys, bool cosine, const at::Tensor& bias,
                         at::Tensor* stats = nullptr) {
  check_inputs(q, keys, "cmattn_forward");
  const QLayout L = q_layout(q, "cmattn_forward");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), K = keys.size(0);
  at::Tensor out = new_output({B, K}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cmattn_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* kp = keys.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t sqrt_d = std::sqrt(static_cast<acc_t>(D));
    const std::vector<acc_t> knorm = key_norms<scalar_t, acc_t>(kp, K * H, D);
    std::vector<acc_t> dot(B * H * K), qnorm(B * H), s(K), acc(K);
    row_statistics<scalar_t, acc_t>(q.data_ptr<scalar_t>(), L, kp, B, H, K, D, dot.data(), qnorm.data(),
                                    bias.defined() ? bias.data_ptr<scalar_t>() : nullptr);
    for (int64_t b = 0; b < B; ++b) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t h = 0; h < H; ++h) {
        row_probabilities<acc_t>(cosine, dot.data() + (b * H + h) * K, qnorm[b * H + h], knorm.data(), K, H, h, sqrt_d,
                                 s.data());
        for (int64_t k = 0; k < K; ++k) acc[k] += s[k];
      }
      for (int64_t k = 0; k < K; ++k) op[b * K + k] = static_cast<scalar_t>(acc[k] / static_cast<acc_t>(H));
    }
    if (stats != nullptr) {
      static_assert(std::is_same<acc_t, scalar_t>::value, "stats are kept in q's dtype");
      *stats = at::empty({stats_size(B, H, K)}, q.options());
      scalar_t* sp = stats->data_ptr<scalar_t>();
      std::copy(dot.begin(), dot.end(), sp);
      std::copy(qnorm.begin(), qnorm.end(), sp + B * H * K);
      std::copy(knorm.begin(), knorm.end(), sp + B * H * K + B * H);
    }
  });
  return out;
}

at::Tensor cmattn_forward_cpu(const at::Tensor& q, const at::Tensor& keys, bool cosine) {
  return score_forward(q, keys, cosine, at::Tensor());
}

// dq (q's layout) and dkey; with dbv defined ((H, D), q's dtype) also dbv = sum_b dq_b; with stats
// defined (score_forward's, for this q and keys) the row statistics are read instead of recomputed
std::tuple<at::Tensor, at::Tensor> score_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                  const at::Tensor& keys, bool cosine, const at::Tensor& dbv,
                                                  const at::Tensor& stats = at::Tensor()) {
  check_inputs(q, keys, "cmattn_backward");
  const QLayout L = q_layout(q, "cmattn_backward");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), K = keys.size(0);
  TORCH_CHECK(grad_out.device().is_cpu(), "cmattn_backward (CPU kernel): grad_out must be a CPU tensor");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({B, K}), "cmattn_backward: grad_out must have shape (", B, ", ", K,
              ") = (B, K), got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type(), "cmattn_backward: grad_out must have q's dtype ",
              q.scalar_type(), ", got ", grad_out.scalar_type());
  GF_CHECK_CONTIGUOUS(grad_out, "grad_out");
  at::Tensor dq = like_q(q, L);
  at::Tensor dkey = new_output(keys.sizes(), keys.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cmattn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = keys.data_ptr<scalar_t>();
    const scalar_t* gp = grad_out.data_ptr<scalar_t>();
    scalar_t* dqp = dq.data_ptr<scalar_t>();
    scalar_t* dkp = dkey.data_ptr<scalar_t>();
    const acc_t sqrt_d = std::sqrt(static_cast<acc_t>(D));
    std::vector<acc_t> knorm(K * H), dot(B * H * K), qnorm(B * H);
    if (stats.defined()) {
      const scalar_t* sp = stats.data_ptr<scalar_t>();
      std::copy(sp, sp + B * H * K, dot.begin());
      std::copy(sp + B * H * K, sp + B * H * K + B * H, qnorm.begin());
      std::copy(sp + B * H * K + B * H, sp + stats_size(B, H, K), knorm.begin());
    } else {
      knorm = key_norms<scalar_t, acc_t>(kp, K * H, D);
      row_statistics<scalar_t, acc_t>(qp, L, kp, B, H, K, D, dot.data(), qnorm.data());
    }

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

    assemble_gradients<scalar_t, acc_t>(cosine, qp, L, kp, knorm.data(), coef.data(), q_weight.data(), key_sum.data(), B,
                                        H, K, D, dqp, dkp, dbv.defined() ? dbv.data_ptr<scalar_t>() : nullptr);
  });
  return {dq, dkey};
}

std::tuple<at::Tensor, at::Tensor> cmattn_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                                        const at::Tensor& keys, bool cosine) {
  return score_backward(grad_out, q, keys, cosine, at::Tensor());
}

// ---- the class pooling of the whole-op path and its weight gradient: (H, C) x (C, D) products
// with H = 4 rows, which the BLAS runs at ~25-45 GFLOP/s on the 2-core CPU (18 us per expert for
// the keys, 54 us for dwt in one float32 training step at C = 200). For float32 on a CPU with
// AVX-512 the loops below hold 4 heads' partial results in registers while the rows of T stream
// past once; other dtypes / CPUs keep the BLAS calls.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GF_POOL_AVX512 1

// AVX-512 where cpu_isa() (GUIDG_FAST_CPU_ISA) allows it; the BLAS path otherwise
bool pool_avx512() { return cpu_isa() == Isa::kAvx512; }

// keys rows h0..h0+3 (out: row h0), features [0, D - D % 64): 4 heads x 64 features in 16
// registers, bias first, then the classes in order
__attribute__((target("avx512f"))) void pool_keys4_avx512(const float* wt, const float* bt, const float* Tk,
                                                          int64_t C, int64_t D, float* out) {
  for (int64_t d0 = 0; d0 + 64 <= D; d0 += 64) {
    __m512 acc[16];
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) acc[4 * i + j] = _mm512_set1_ps(bt[i]);
    }
    for (int64_t c = 0; c < C; ++c) {
      const float* t = Tk + c * D + d0;
      const __m512 t0 = _mm512_loadu_ps(t), t1 = _mm512_loadu_ps(t + 16), t2 = _mm512_loadu_ps(t + 32),
                   t3 = _mm512_loadu_ps(t + 48);
      for (int i = 0; i < 4; ++i) {
        const __m512 w = _mm512_set1_ps(wt[i * C + c]);
        acc[4 * i + 0] = _mm512_fmadd_ps(w, t0, acc[4 * i + 0]);
        acc[4 * i + 1] = _mm512_fmadd_ps(w, t1, acc[4 * i + 1]);
        acc[4 * i + 2] = _mm512_fmadd_ps(w, t2, acc[4 * i + 2]);
        acc[4 * i + 3] = _mm512_fmadd_ps(w, t3, acc[4 * i + 3]);
      }
    }
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(out + i * D + d0 + 16 * j, acc[4 * i + j]);
    }
  }
}

// sums[2 i + a] = sum_k dkey_k[h0 + i] . T_k[class a] (i < 4; classes c_a, c_b) over features
// [0, D - D % 16): 8 accumulators; the rest of the features is added by the caller
__attribute__((target("avx512f"))) void key_grad8_avx512(const float* dkey, const float* T, int64_t K, int64_t H,
                                                         int64_t C, int64_t D, int64_t h0, int64_t c_a, int64_t c_b,
                                                         float* sums) {
  __m512 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* t0 = T + (k * C + c_a) * D;
    const float* t1 = T + (k * C + c_b) * D;
    const float* g = dkey + (k * H + h0) * D;
    for (int64_t d = 0; d + 16 <= D; d += 16) {
      const __m512 a0 = _mm512_loadu_ps(t0 + d), a1 = _mm512_loadu_ps(t1 + d);
      for (int i = 0; i < 4; ++i) {
        const __m512 gv = _mm512_loadu_ps(g + i * D + d);
        acc[2 * i] = _mm512_fmadd_ps(gv, a0, acc[2 * i]);
        acc[2 * i + 1] = _mm512_fmadd_ps(gv, a1, acc[2 * i + 1]);
      }
    }
  }
  for (int i = 0; i < 8; ++i) sums[i] = _mm512_reduce_add_ps(acc[i]);
}
#else
#define GF_POOL_AVX512 0
#endif

// keys_k (H, D) = wt (H, C) T_k (C, D) + bt for one expert
template <typename scalar_t>
void pool_keys(const scalar_t* wt, const scalar_t* bt, const scalar_t* Tk, int64_t H, int64_t C, int64_t D,
               scalar_t* out) {
#if GF_POOL_AVX512
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (pool_avx512()) {
      const int64_t d_vec = D - D % 64;
      for (int64_t h0 = 0; h0 < H; h0 += 4) {
        const int64_t hn = std::min<int64_t>(4, H - h0);
        if (hn == 4 && d_vec > 0) pool_keys4_avx512(wt + h0 * C, bt + h0, Tk, C, D, out + h0 * D);
        const int64_t from = hn == 4 ? d_vec : 0;  // the features the vector loop left
        for (int64_t i = h0; i < h0 + hn; ++i) {
          scalar_t* o = out + i * D;
          for (int64_t d = from; d < D; ++d) o[d] = bt[i];
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t w = wt[i * C + c];
            const scalar_t* t = Tk + c * D;
            for (int64_t d = from; d < D; ++d) o[d] += w * t[d];
          }
        }
      }
      return;
    }
  }
#endif
  for (int64_t h = 0; h < H; ++h) std::fill(out + h * D, out + (h + 1) * D, bt[h]);
  cpu_blas::gemm<scalar_t>(false, false, H, D, C, 1, wt, C, Tk, D, 1, out, D);
}

// dwt[:, c0:c1] = sum_k dkey_k T_k[c0:c1]^T, (H, D) x (D, n) per expert
template <typename scalar_t>
void key_weight_grad(const scalar_t* dkey, const scalar_t* T, int64_t K, int64_t H, int64_t C, int64_t D, int64_t c0,
                     int64_t c1, scalar_t* dwt) {
#if GF_POOL_AVX512
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (pool_avx512() && H % 4 == 0) {
      const int64_t d_vec = D - D % 16;
      for (int64_t c = c0; c < c1; c += 2) {
        const int64_t cn = std::min<int64_t>(2, c1 - c);
        for (int64_t h0 = 0; h0 < H; h0 += 4) {
          float sums[8];
          // a last odd class is paired with itself (the duplicate sums dropped below)
          key_grad8_avx512(dkey, T, K, H, C, D, h0, c, c + cn - 1, sums);
          for (int64_t a = 0; a < cn; ++a) {
            for (int i = 0; i < 4; ++i) {
              float s = sums[2 * i + a];
              for (int64_t k = 0; k < K; ++k) {
                const float* g = dkey + (k * H + h0 + i) * D;
                const float* t = T + (k * C + c + a) * D;
                for (int64_t d = d_vec; d < D; ++d) s += g[d] * t[d];
              }
              dwt[(h0 + i) * C + c + a] = s;
            }
          }
        }
      }
      return;
    }
  }
#endif
  for (int64_t k = 0; k < K; ++k) {
    cpu_blas::gemm<scalar_t>(false, true, H, c1 - c0, D, 1, dkey + k * H * D, D, T + (k * C + c0) * D, D,
                             k == 0 ? 0 : 1, dwt + c0, C);
  }
}

}  // namespace

// ---- whole-op CPU paths of cmattn_fused_forward / cmattn_fused_backward (csrc/include/cmattn_cpu.h)
// The same GEMMs as the device-generic composite (csrc/autograd/cmattn.cpp), but straight into
// BLAS on raw buffers (cpu_blas.h) and the score kernels called directly: at step-2 shapes the
// composite's dozen small ATen calls (bias broadcasts, a batched GEMM over an expanded operand,
// reductions for dbv / dwt / dbt) cost as much as the fused kernels themselves on a 2-core CPU.

bool cmattn_cpu_whole_op(const at::Tensor& f, const at::Tensor& T, const at::Tensor& wv) {
  const auto t = f.scalar_type();
  return f.device().is_cpu() && (t == at::kFloat || t == at::kDouble) && T.scalar_type() == t &&
         wv.scalar_type() == t && cpu_blas::blas_usable();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cmattn_cpu_forward(const at::Tensor& f_in, const at::Tensor& T_in,
                                                                  const at::Tensor& wv_in, const at::Tensor& bv_in,
                                                                  const at::Tensor& wt_in, const at::Tensor& bt_in,
                                                                  bool cosine, at::Tensor* stats) {
  const at::Tensor f = f_in.contiguous(), T = T_in.contiguous(), wv = wv_in.contiguous(), bv = bv_in.contiguous(),
                   wt = wt_in.contiguous(), bt = bt_in.contiguous();
  const int64_t B = f.size(0), D = f.size(1), K = T.size(0), C = T.size(1), H = wv.size(0);
  // q as W f^T: (H*D, D) x (D, B), read as the batch-minor (B, H, D) view; the score kernel adds
  // the bias in place as it first reads q
  at::Tensor q = new_output({H * D, B}, f.options());
  at::Tensor keys = new_output({K, H, D}, f.options());
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "cmattn_cpu_forward", [&] {
    cpu_blas::gemm<scalar_t>(false, true, H * D, B, D, 1, wv.data_ptr<scalar_t>(), D, f.data_ptr<scalar_t>(), D, 0,
                             q.data_ptr<scalar_t>(), B);

    // keys_k = wt T_k + bt, an (H, C) x (C, D) product per expert, one expert per task
    scalar_t* kp = keys.data_ptr<scalar_t>();
    const scalar_t* Tp = T.data_ptr<scalar_t>();
    const scalar_t* wtp = wt.data_ptr<scalar_t>();
    const scalar_t* btp = bt.data_ptr<scalar_t>();
    at::parallel_for(0, K, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) pool_keys<scalar_t>(wtp, btp, Tp + k * C * D, H, C, D, kp + k * H * D);
    });
  });
  q = q.t().view({B, H, D});
  at::Tensor out = score_forward(q, keys, cosine, bv, stats);
  return {out, q, keys};
}

std::vector<at::Tensor> cmattn_cpu_backward(const at::Tensor& grad_out, const at::Tensor& f_in, const at::Tensor& T_in,
                                            const at::Tensor& wv_in, const at::Tensor& wt_in, const at::Tensor& q,
                                            const at::Tensor& keys, bool cosine, std::array<bool, 6> needs,
                                            const at::Tensor& stats) {
  const at::Tensor f = f_in.contiguous(), T = T_in.contiguous(), wv = wv_in.contiguous(), wt = wt_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), K = keys.size(0), C = T.size(1);
  const auto options = f.options();
  auto none = [&] { return at::empty({0}, options); };  // one per slot: outputs must not alias
  at::Tensor dbv = needs[3] ? new_output({H, D}, options) : at::Tensor();
  if (stats.defined()) {
    TORCH_CHECK(stats.numel() == stats_size(B, H, K) && stats.scalar_type() == q.scalar_type() && stats.is_contiguous(),
                "cmattn_cpu_backward: stats do not come from cmattn_cpu_forward for these shapes");
  }
  auto [dq, dkey] = score_backward(grad_out.to(f.scalar_type()).contiguous(), q, keys, cosine, dbv, stats);
  const QLayout L = q_layout(dq, "cmattn_backward");
  at::Tensor df = needs[0] ? new_output({B, D}, options) : none();
  at::Tensor dT = needs[1] ? new_output({K, C, D}, options) : none();
  at::Tensor dwv = needs[2] ? new_output({H, D, D}, options) : none();
  at::Tensor dwt = needs[4] ? new_output({H, C}, options) : none();
  at::Tensor dbt = needs[5] ? new_output({H}, options) : none();
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "cmattn_cpu_backward", [&] {
    const scalar_t* dqp = dq.data_ptr<scalar_t>();  // (H*D, B) batch-minor, or (B, H*D)
    const scalar_t* dkp = dkey.data_ptr<scalar_t>();
    const scalar_t* Tp = T.data_ptr<scalar_t>();
    const bool bm = L.batch_minor;
    if (needs[0]) {  // df = dq W: (B, H*D) x (H*D, D)
      cpu_blas::gemm<scalar_t>(bm, false, B, D, H * D, 1, dqp, bm ? B : H * D, wv.data_ptr<scalar_t>(), D, 0,
                               df.data_ptr<scalar_t>(), D);
    }
    if (needs[1]) {  // dT_k = wt^T dkey_k: (C, H) x (H, D)
      for (int64_t k = 0; k < K; ++k) {
        cpu_blas::gemm<scalar_t>(true, false, C, D, H, 1, wt.data_ptr<scalar_t>(), C, dkp + k * H * D, D, 0,
                                 dT.data_ptr<scalar_t>() + k * C * D, D);
      }
    }
    if (needs[2]) {  // every head at once: dWv = dq^T f, (H*D, B) x (B, D)
      cpu_blas::gemm<scalar_t>(!bm, false, H * D, D, B, 1, dqp, bm ? B : H * D, f.data_ptr<scalar_t>(), D, 0,
                               dwv.data_ptr<scalar_t>(), D);
    }
    if (needs[4]) {  // dwt = sum_k dkey_k T_k^T, (H, D) x (D, C) per expert, in class-block tasks
      scalar_t* dwtp = dwt.data_ptr<scalar_t>();
      constexpr int64_t kClassBlock = 64;
      at::parallel_for(0, (C + kClassBlock - 1) / kClassBlock, 1, [&](int64_t lo, int64_t hi) {
        key_weight_grad<scalar_t>(dkp, Tp, K, H, C, D, lo * kClassBlock, std::min(C, hi * kClassBlock), dwtp);
      });
    }
    if (needs[5]) {  // dbt_h = sum over experts and features of dkey
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* out = dbt.data_ptr<scalar_t>();
      for (int64_t h = 0; h < H; ++h) {
        acc_t sum = 0;
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t d = 0; d < D; ++d) sum += static_cast<acc_t>(dkp[(k * H + h) * D + d]);
        }
        out[h] = static_cast<scalar_t>(sum);
      }
    }
  });
  return {df, dT, dwv, needs[3] ? dbv : none(), dwt, dbt};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> cmattn_fused_forward_cpu(const at::Tensor& f, const at::Tensor& T,
                                                                        const at::Tensor& wv, const at::Tensor& bv,
                                                                        const at::Tensor& wt, const at::Tensor& bt,
                                                                        bool cosine) {
  cmattn_check_params(f, T, wv, bv, wt, bt);
  if (!cmattn_cpu_whole_op(f, T, wv)) return cmattn_composite_forward(f, T, wv, bv, wt, bt, cosine);
  return cmattn_cpu_forward(f, T, wv, bv, wt, bt, cosine);
}

std::vector<at::Tensor> cmattn_fused_backward_cpu(const at::Tensor& grad_out, const at::Tensor& f, const at::Tensor& T,
                                                  const at::Tensor& wv, const at::Tensor& wt, const at::Tensor& q,
                                                  const at::Tensor& keys, bool cosine, std::array<bool, 6> needs) {
  if (!cmattn_cpu_whole_op(f, T, wv) || q.scalar_type() != f.scalar_type() || wt.scalar_type() != f.scalar_type()) {
    return cmattn_composite_backward(grad_out, f, T, wv, wt, q, keys, cosine, needs);
  }
  return cmattn_cpu_backward(grad_out, f, T, wv, wt, q, keys, cosine, needs);
}

}  // namespace

TORCH_LIBRARY_IMPL(guidg_fast, CPU, m) {
  m.impl("cmattn_forward", &cmattn_forward_cpu);
  m.impl("cmattn_backward", &cmattn_backward_cpu);
  m.impl("cmattn_fused_forward", &cmattn_fused_forward_cpu);
  m.impl("cmattn_fused_backward", &cmattn_fused_backward_cpu);
}

}  // namespace guidg_fast
