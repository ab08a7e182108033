// CPU launchers for cmattn: the fused score / softmax-over-experts / mean-over-heads step of the
// cross-modal attention, forward and backward. q (B, H, D) holds every head's v-projection,
// keys (K, H, D) every head's pooled expert key; the projections themselves are GEMMs done by the
// caller (guidg_fast/ops/cmattn.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "cmattn.h"
#include "outputs.h"

namespace guidg_fast {
namespace {

// Multiply-adds per parallel chunk. The step-2 shapes (B = 36, K = 3, H = 4, D = 512) are a few
// hundred thousand multiply-adds per call, faster on one thread than the cost of waking a team
// (which is far worse on a loaded machine); bigger batches still spread over the pool.
constexpr int64_t kWorkPerChunk = 1 << 20;

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kWorkPerChunk / std::max<int64_t>(1, work_per_item));
}

// Eight independent partial sums: the compiler vectorises the lanes without reassociating a single
// running sum, and the rounding error grows with D / 8 instead of D.
template <typename scalar_t, typename acc_t>
acc_t dot_lanes(const scalar_t* a, const scalar_t* b, int64_t n) {
  acc_t lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) lanes[j] += static_cast<acc_t>(a[i + j]) * static_cast<acc_t>(b[i + j]);
  }
  acc_t tail = 0;
  for (; i < n; ++i) tail += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  return ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7])) + tail;
}

void check_inputs(const at::Tensor& q, const at::Tensor& keys, const char* op) {
  TORCH_CHECK(q.device().is_cpu() && keys.device().is_cpu(), op, " (CPU kernel): q and keys must be CPU tensors");
  GF_CHECK_DIM(q, 3, "q (B, H, D)");
  GF_CHECK_DIM(keys, 3, "keys (K, H, D)");
  GF_CHECK_CONTIGUOUS(q, "q");
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

// Norms of every (expert, head) key, computed once per call: (K * H).
template <typename scalar_t, typename acc_t>
std::vector<acc_t> key_norms(const scalar_t* keys, int64_t KH, int64_t D) {
  std::vector<acc_t> norms(KH);
  at::parallel_for(0, KH, grain_for(D), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) norms[i] = std::sqrt(dot_lanes<scalar_t, acc_t>(keys + i * D, keys + i * D, D));
  });
  return norms;
}

// Scores of one (sample, head) row into s (softmax probabilities on return), dots into dot.
template <typename scalar_t, typename acc_t>
acc_t row_probabilities(bool cosine, const scalar_t* qrow, const scalar_t* keys, const acc_t* knorm, int64_t K,
                        int64_t H, int64_t h, int64_t D, acc_t sqrt_d, acc_t* dot, acc_t* s) {
  const acc_t q_norm = std::sqrt(dot_lanes<scalar_t, acc_t>(qrow, qrow, D));
  const acc_t mq = cmattn_clamp_norm(q_norm);
  for (int64_t k = 0; k < K; ++k) {
    dot[k] = dot_lanes<scalar_t, acc_t>(qrow, keys + (k * H + h) * D, D);
    s[k] = cmattn_score(cosine, dot[k], mq, cmattn_clamp_norm(knorm[k * H + h]), sqrt_d);
  }
  cmattn_softmax(s, K);
  return q_norm;
}

at::Tensor cmattn_forward_cpu(const at::Tensor& q, const at::Tensor& keys, bool cosine) {
  check_inputs(q, keys, "cmattn_forward");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), K = keys.size(0);
  at::Tensor out = new_output({B, K}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cmattn_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = keys.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t sqrt_d = std::sqrt(static_cast<acc_t>(D));
    const std::vector<acc_t> knorm = key_norms<scalar_t, acc_t>(kp, K * H, D);
    at::parallel_for(0, B, grain_for(H * (K + 1) * D), [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> s(K), dot(K), acc(K);
      for (int64_t b = lo; b < hi; ++b) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t h = 0; h < H; ++h) {
          row_probabilities<scalar_t, acc_t>(cosine, qp + (b * H + h) * D, kp, knorm.data(), K, H, h, D, sqrt_d,
                                             dot.data(), s.data());
          for (int64_t k = 0; k < K; ++k) acc[k] += s[k];
        }
        for (int64_t k = 0; k < K; ++k) op[b * K + k] = static_cast<scalar_t>(acc[k] / static_cast<acc_t>(H));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cmattn_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                                        const at::Tensor& keys, bool cosine) {
  check_inputs(q, keys, "cmattn_backward");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), K = keys.size(0);
  TORCH_CHECK(grad_out.device().is_cpu(), "cmattn_backward (CPU kernel): grad_out must be a CPU tensor");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({B, K}), "cmattn_backward: grad_out must have shape (", B, ", ", K,
              ") = (B, K), got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type(), "cmattn_backward: grad_out must have q's dtype ",
              q.scalar_type(), ", got ", grad_out.scalar_type());
  GF_CHECK_CONTIGUOUS(grad_out, "grad_out");
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
    // per (b, h, k): weight of q_{b,h} in dkey_{k,h}, and the row's share of dkey_k's self term
    std::vector<acc_t> coef(B * H * K), key_term(B * H * K);

    // Phase 1, rows: recompute the probabilities, then dq and the per-row coefficients.
    at::parallel_for(0, B, grain_for(H * (2 * K + 2) * D), [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> a(K), dot(K), g(K), ds(K), kn(K), row(D);
      for (int64_t b = lo; b < hi; ++b) {
        for (int64_t k = 0; k < K; ++k) g[k] = static_cast<acc_t>(gp[b * K + k]) / static_cast<acc_t>(H);
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t* qrow = qp + (b * H + h) * D;
          const acc_t q_norm = row_probabilities<scalar_t, acc_t>(cosine, qrow, kp, knorm.data(), K, H, h, D,
                                                                  sqrt_d, dot.data(), a.data());
          cmattn_softmax_backward(a.data(), g.data(), ds.data(), K);
          for (int64_t k = 0; k < K; ++k) kn[k] = knorm[k * H + h];
          acc_t* c = coef.data() + (b * H + h) * K;
          const acc_t q_weight = cmattn_row_backward(cosine, ds.data(), dot.data(), kn.data(), q_norm, sqrt_d, K, c,
                                                     key_term.data() + (b * H + h) * K);
          for (int64_t d = 0; d < D; ++d) row[d] = q_weight * static_cast<acc_t>(qrow[d]);
          for (int64_t k = 0; k < K; ++k) {
            const scalar_t* krow = kp + (k * H + h) * D;
            const acc_t ck = c[k];
            for (int64_t d = 0; d < D; ++d) row[d] += ck * static_cast<acc_t>(krow[d]);
          }
          scalar_t* out_row = dqp + (b * H + h) * D;
          for (int64_t d = 0; d < D; ++d) out_row[d] = static_cast<scalar_t>(row[d]);
        }
      }
    });

    // Phase 2, keys: each (expert, head) sums its coefficients over the batch (no races, fixed order).
    at::parallel_for(0, K * H, grain_for(B * D), [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> row(D);
      for (int64_t kh = lo; kh < hi; ++kh) {
        const int64_t k = kh / H, h = kh % H;
        acc_t term_sum = 0;
        for (int64_t b = 0; b < B; ++b) term_sum += key_term[(b * H + h) * K + k];
        const acc_t self_weight = cmattn_key_self_weight(cosine, term_sum, knorm[kh]);
        const scalar_t* krow = kp + kh * D;
        for (int64_t d = 0; d < D; ++d) row[d] = self_weight * static_cast<acc_t>(krow[d]);
        for (int64_t b = 0; b < B; ++b) {
          const acc_t cb = coef[(b * H + h) * K + k];
          const scalar_t* qrow = qp + (b * H + h) * D;
          for (int64_t d = 0; d < D; ++d) row[d] += cb * static_cast<acc_t>(qrow[d]);
        }
        scalar_t* out_row = dkp + kh * D;
        for (int64_t d = 0; d < D; ++d) out_row[d] = static_cast<scalar_t>(row[d]);
      }
    });
  });
  return {dq, dkey};
}

}  // namespace

TORCH_LIBRARY_IMPL(guidg_fast, CPU, m) {
  m.impl("cmattn_forward", &cmattn_forward_cpu);
  m.impl("cmattn_backward", &cmattn_backward_cpu);
}

}  // namespace guidg_fast
